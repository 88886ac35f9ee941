//! `stitcher demo`: the whole pipeline on librdkafka's in-process mock cluster, no broker needed.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::codec::update::ProfileRecord;
use crate::config::{Config, Format, InputConfig};
use crate::generate::{self, Routes};
use crate::journeys::{self, JourneyConfig, CHANNELS};
use crate::metrics::Metrics;
use crate::profile::Profile;
use crate::store::Store;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    let state_dir = std::env::temp_dir().join(format!("stitcher-demo-{}", std::process::id()));
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.clone();
    cfg.inputs = CHANNELS
        .iter()
        .map(|ch| {
            // Two channels publish JSON, the others Avro: both paths run.
            let format = if matches!(*ch, "web" | "social") {
                Format::Json
            } else {
                Format::Avro
            };
            InputConfig::new(format!("{ch}-events"), *ch, format)
        })
        .collect();
    cfg.identity.custom_types = vec!["social_id".into()];
    // Computed traits, as a team would declare them.
    cfg.enrichment = toml::from_str::<Config>(journeys::TRUTH_TRAITS)?.enrichment;
    cfg.state.dir = state_dir.clone();
    cfg.http.listen = args.http_listen;
    cfg.output.create_topics = false;
    // The mock cluster does not answer DescribeConfigs: its topics take the default record limit, and the
    // changelog it is given here is not read back.
    cfg.output.read_topic_configs = false;
    for t in cfg.inputs.iter().map(|i| i.topic.clone()).chain([
        cfg.output.topic.clone(),
        cfg.output.dead_letter_topic.clone(),
        cfg.output.identity_topic.clone(),
        cfg.breaker.quarantine_topic.clone(),
    ]) {
        if t.is_empty() {
            continue;
        }
        cluster.create_topic(&t, 3, 1)?;
    }
    // Commands apply in the order sent only within one partition; the service refuses more.
    cluster.create_topic(&cfg.control.topic, 1, 1)?;
    // The graph's shards: their message topic and changelog, one partition per shard.
    let shards = i32::try_from(cfg.scaleout.shards)?;
    for t in [cfg.shard_topic(), cfg.changelog_topic()] {
        cluster.create_topic(&t, shards, 1)?;
    }
    cfg.validate()?;

    println!(
        "mock cluster at {brokers}; metrics on http://{}/metrics",
        args.http_listen
    );
    let jc = JourneyConfig {
        persons: args.persons,
        seed: args.seed,
        duplicate_rate: 0.02,
        malformed_rate: 0.002,
        shuffle_window: 200,
        // A shop's kiosk tablet that 3% of the people log in on, and junk identifiers on 2% of events:
        // the guardrails must keep both from gluing anyone together.
        shared_device_persons: args.persons * 3 / 100,
        junk_rate: 0.02,
        ..Default::default()
    };
    let routes: Routes = cfg
        .inputs
        .iter()
        .map(|i| (i.channel.clone(), (i.topic.clone(), i.format())))
        .collect();
    let gen_brokers = brokers.clone();
    let (journeys, sent) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let j = journeys::generate(&jc);
        let sent = generate::send(&gen_brokers, &routes, &j, 0)?;
        Ok((j, sent))
    })
    .await??;
    println!(
        "generated {} journeys: {} events on {} channel topics, {} duplicates, {} malformed ({} messages)",
        args.persons, journeys.events, CHANNELS.len(), journeys.duplicates, journeys.malformed, sent
    );

    let metrics = Metrics::new()?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signals(shutdown.clone());
    let started = Instant::now();
    let service = tokio::spawn(crate::app::run(
        cfg.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    // Wait until every message has been taken into a batch. The erase below waits for its own batch to be
    // committed, which commits every batch before it; without it, the stop's drain commits the last batch.
    // (Waiting here for one more commit hung whenever the last batch was committed between two looks.)
    let consumed = || -> u64 {
        CHANNELS
            .iter()
            .map(|c| metrics.events_consumed.with_label_values(&[c]).get())
            .sum()
    };
    while consumed() < sent
        && !shutdown.is_cancelled()
        && !service.is_finished()
        && started.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if service.is_finished() {
        // The service failed before it took every message: its error ends the demo (the waits below
        // would wait for it for ever).
        service.await??;
        anyhow::bail!("the service stopped before it took every message");
    }
    let elapsed = started.elapsed();
    // Right to be forgotten: erase one person's email through the control topic, as `stitcher erase` does.
    let erased = journeys
        .truth
        .iter()
        .flat_map(|t| t.identifiers.iter())
        .find(|(kind, _)| kind == "email")
        .map(|(_, value)| value.clone());
    if let Some(email) = &erased {
        erase_email(&cfg, email, &metrics, &shutdown).await?;
    }
    if args.serve {
        println!(
            "serving http://{}/metrics and /v1/identifiers/{{type}}/{{value}} until Ctrl-C",
            args.http_listen
        );
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    let summary = service.await??;

    let store = Store::open(&state_dir, 64)?;
    let held = crate::scaleout::lookup::held_locally(&store)?;
    let mut profiles: Vec<Profile> = Vec::new();
    crate::scaleout::state::for_each_profile(&store, &held.held(), |_, _, p| profiles.push(p))?;
    let applied: u64 = CHANNELS
        .iter()
        .map(|c| metrics.events_applied.with_label_values(&[c]).get())
        .sum();
    let dups: u64 = CHANNELS
        .iter()
        .map(|c| metrics.events_duplicate.with_label_values(&[c]).get())
        .sum();
    let dead: u64 = ["decode", "validate", "route"]
        .iter()
        .map(|s| metrics.dead_letters.with_label_values(&[s]).get())
        .sum();
    println!();
    println!(
        "processed {} messages in {:.1}s ({:.0}/s), {} transactions",
        consumed(),
        elapsed.as_secs_f64(),
        consumed() as f64 / elapsed.as_secs_f64(),
        summary.batches
    );
    println!("  events applied      {applied}");
    println!("  duplicates skipped  {dups}");
    println!("  dead letters        {dead}");
    println!("  profiles created    {}", metrics.profiles_created.get());
    println!("  merges              {}", metrics.profile_merges.get());
    let shared = profiles.iter().filter(|p| p.shared).count();
    println!(
        "  profiles now        {} people + {shared} shared device (ground truth: {} persons)",
        profiles.len() - shared,
        journeys.truth.len()
    );
    println!(
        "  updates produced    {}",
        metrics.output_records.with_label_values(&["update"]).get()
    );
    println!(
        "  redirects produced  {}",
        metrics
            .output_records
            .with_label_values(&["redirect"])
            .get()
    );
    println!(
        "  junk identifiers    {} blocked (test@test.com, undefined, ...)",
        metrics
            .identifiers_rejected
            .with_label_values(&["blocked"])
            .get()
    );
    println!(
        "  shared identifiers  {} set apart (the kiosk tablet), {} profile splits",
        metrics.shared_identifiers.get(),
        metrics.profile_splits.get()
    );
    if let Some(email) = &erased {
        let id = crate::model::Identifier::new("email", email.as_str());
        let gone = crate::scaleout::lookup::lookup(
            &store,
            &held,
            &id,
            crate::scaleout::lookup::Step::Home,
        )? == crate::scaleout::lookup::Lookup::Unknown;
        println!(
            "  erasure             email {email}: {}, {} tombstone(s)",
            if gone {
                "gone from state"
            } else {
                "STILL PRESENT"
            },
            metrics
                .output_records
                .with_label_values(&["tombstone"])
                .get()
        );
    }
    profiles.sort_by(|a, b| {
        (b.channels.len(), b.events, &b.anchor).cmp(&(a.channels.len(), a.events, &a.anchor))
    });
    println!();
    println!("three of the most omnichannel profiles:");
    for p in profiles.iter().take(3) {
        print_profile(p);
    }
    if let Some(p) = profiles.iter().find(|p| p.story.errand.is_some()) {
        println!();
        println!("what the next channel sees of one of them:");
        print_story(&ProfileRecord::new(p, &cfg.enrichment));
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

/// Sends an erase command to the control topic and waits until the pipeline has applied and committed it.
async fn erase_email(
    cfg: &Config,
    email: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let command = crate::control::Command::EraseIdentifier {
        kind: "email".into(),
        value: Some(email.to_string()),
        hash: None,
        suppress: false,
    };
    let committed = || metrics.transactions.with_label_values(&["committed"]).get();
    let before = committed();
    crate::control::send(cfg, &command).await?;
    let applied = || {
        metrics
            .control_commands
            .with_label_values(&["erase_identifier", "applied"])
            .get()
    };
    // Applied, and the transaction of its batch committed.
    let started = Instant::now();
    while (applied() == 0 || committed() == before)
        && !shutdown.is_cancelled()
        && started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn print_profile(p: &Profile) {
    println!(
        "  {}  {} events, first seen {}, last seen {}",
        p.id(),
        p.events,
        fmt_ts(p.seen.first),
        fmt_ts(p.seen.last)
    );
    let ids: Vec<String> = p.identifiers.keys().map(|i| i.to_string()).collect();
    println!("    identifiers: {}", ids.join(", "));
    let channels: Vec<String> = p
        .channels
        .iter()
        .map(|(c, a)| format!("{c}={}", a.events))
        .collect();
    println!("    channels:    {}", channels.join(" "));
    for ((venue, currency), t) in &p.purchases {
        println!(
            "    purchases:   {} {} orders, {:.2} {currency}",
            venue.as_str(),
            t.orders,
            t.revenue_minor as f64 / 100.0
        );
    }
    let skus: Vec<&str> = p.cart.open_lines().map(|l| l.sku.as_str()).collect();
    if !skus.is_empty() {
        println!("    open cart:   {}", skus.join(", "));
    }
    if p.email.opens + p.email.clicks > 0 {
        println!(
            "    email:       {} opens, {} clicks",
            p.email.opens, p.email.clicks
        );
    }
}

fn print_story(r: &ProfileRecord) {
    println!("    timeline (newest first):");
    for i in r.timeline.iter().take(6) {
        println!(
            "      {}  {:<10} {:<14} {}",
            fmt_ts(i.at),
            i.channel,
            i.event_type,
            i.summary
        );
    }
    let switches: Vec<String> = r
        .switch_counts
        .iter()
        .map(|c| format!("{}->{} {}", c.from, c.to, c.count))
        .collect();
    println!("    switches:    {}", switches.join(", "));
    if let Some(e) = &r.errand {
        println!(
            "    errand:      {} via {} at {} ({})",
            e.reason.as_deref().unwrap_or("(no reason)"),
            e.channel,
            fmt_ts(e.at),
            if e.open { "open" } else { "closed" }
        );
    }
    let top: Vec<String> = r
        .top_categories
        .iter()
        .map(|c| format!("{} {}", c.value, c.count))
        .collect();
    println!("    interests:   {}", top.join(", "));
    for (k, v) in &r.preferences {
        println!("    prefers:     {k} = {v}");
    }
    for t in &r.traits {
        let value = t
            .count
            .map(|n| n.to_string())
            .or(t.number.map(|n| format!("{n:.2}")))
            .or(t.text.clone())
            .unwrap_or_default();
        println!("    trait:       {} = {value}", t.name);
    }
}

fn fmt_ts(ms: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}
