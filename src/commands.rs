//! The subcommands other than the demo.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cli::{
    BacktestArgs, BenchArgs, ConfigArgs, EraseArgs, ExportArgs, GenerateArgs, InspectArgs,
    QualityArgs, ReleaseArgs, RunArgs, UnlinkArgs, UnsuppressArgs,
};
use crate::codec::mapping::Preset;
use crate::config::{Config, Overrides};
use crate::control::{Command as ControlCommand, RawId};
use crate::generate::{self, Routes};
use crate::journeys::{self, JourneyConfig};
use crate::metrics::Metrics;
use crate::model::{Identifier, ProfileId};
use crate::normalize::Normalizer;
use crate::scaleout::state::{for_each_profile, ShardRead};
use crate::store::Store;

fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let flags = Overrides {
        brokers: args.brokers.clone(),
        group_id: args.group_id.clone(),
        state_dir: args.state_dir.clone(),
        http_listen: args.http_listen,
    };
    Ok(Config::load(
        args.config.as_deref(),
        std::env::vars(),
        &flags,
    )?)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.config)?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signals(shutdown.clone());
    let summary = crate::app::run(cfg, Metrics::new()?, shutdown).await?;
    tracing::info!(
        batches = summary.batches,
        messages = summary.messages,
        records = summary.records,
        "stopped"
    );
    Ok(())
}

pub async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.config)?;
    let routes: Routes = cfg
        .inputs
        .iter()
        // Generated events are in the service's own schema.
        .filter(|i| i.preset == Preset::Stitcher && i.fields.is_none())
        .map(|i| (i.channel.clone(), (i.topic.clone(), i.format())))
        .collect();
    if let Some(unknown) = args
        .channels
        .iter()
        .find(|c| !journeys::CHANNELS.contains(&c.as_str()))
    {
        anyhow::bail!(
            "--channels: {unknown:?} is not a generated channel (one of {})",
            journeys::CHANNELS.join(", ")
        );
    }
    let start_ms = if args.now {
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64
    } else {
        JourneyConfig::default().start_ms
    };
    let jc = JourneyConfig {
        persons: args.persons,
        seed: args.seed,
        start_ms,
        span_ms: if args.now {
            1
        } else {
            JourneyConfig::default().span_ms
        },
        duplicate_rate: args.duplicates,
        malformed_rate: args.malformed,
        shuffle_window: args.shuffle_window,
        household_rate: args.households,
        channels: args.channels.clone(),
        shared_device_persons: args.shared_device_persons,
        junk_rate: args.junk_rate,
    };
    let (j, routes) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let j = journeys::generate(&jc);
        // Every generated channel needs a configured input; checked before anything is sent, and the
        // truth is written only once everything was.
        let mut unrouted: Vec<&str> = j
            .messages
            .iter()
            .map(journeys::Generated::channel)
            .filter(|c| !routes.contains_key(*c))
            .collect();
        unrouted.sort_unstable();
        unrouted.dedup();
        anyhow::ensure!(
            unrouted.is_empty(),
            "no [[inputs]] entry in the configuration for channel(s) {}: configure them or choose \
             --channels among {}",
            unrouted.join(", "),
            {
                let mut known: Vec<&str> = routes.keys().map(String::as_str).collect();
                known.sort_unstable();
                known.join(", ")
            }
        );
        Ok((j, routes))
    })
    .await??;
    if let Some(path) = &args.truth {
        // Written once everything was sent: a directory that is not there would lose it after the run.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        anyhow::ensure!(
            dir.is_dir(),
            "--truth {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    crate::kafka::ensure_reachable(&cfg).await?;
    let client = crate::kafka::base_config(&cfg);
    let rate = args.rate;
    let truth_path = args.truth.clone();
    let (sent, events, malformed, duplicates) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let sent = generate::send_with(client, &routes, &j, rate)?;
            if let Some(path) = &truth_path {
                generate::write_truth(path, &j.truth)?;
            }
            Ok((sent, j.events, j.malformed, j.duplicates))
        })
        .await??;
    println!(
        "sent {sent} messages: {events} events of {} persons, {duplicates} duplicates, {malformed} malformed",
        args.persons
    );
    Ok(())
}

/// Opens a stopped instance's state directory for the tools that read it (`inspect`, `export`,
/// `quality`): a path that holds no state is an error, not an empty state created there.
/// A `--profile` argument, refused by name unless it is a profile id.
fn profile_arg(p: &str) -> anyhow::Result<ProfileId> {
    ProfileId::parse(p)
        .with_context(|| format!("--profile {p:?}: {}", crate::model::MALFORMED_PROFILE_ID))
}

fn open_state(dir: &std::path::Path) -> anyhow::Result<Store> {
    anyhow::ensure!(
        dir.join("CURRENT").is_file(),
        "{} holds no state (no RocksDB database): give the state.dir of a service",
        dir.display()
    );
    Store::open(dir, 64).context("opening state (is the service still running?)")
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    use crate::scaleout::lookup::{self, Lookup, Step};
    let store = open_state(&args.state_dir)?;
    let held = lookup::held_locally(&store)?;
    let cfg = match &args.config {
        Some(path) => Config::from_toml_file(path)?,
        None => Config::default(),
    };
    let found = match (&args.profile, &args.identifier) {
        (Some(p), _) => lookup::profile_here(&store, &held, &profile_arg(p)?)?
            .map(|(shard, _, node)| (shard, node)),
        (None, Some(spec)) => {
            let id = parse_identifier(&Normalizer::new(&cfg.identity)?, spec)?;
            match lookup::lookup(&store, &held, &id, Step::Home)? {
                Lookup::Found { shard, node } => Some((shard, node)),
                Lookup::Unknown => None,
                Lookup::Elsewhere(step) => anyhow::bail!(
                    "this state directory does not hold the shard that knows this identifier \
                     ({step:?}); ask a running instance: GET /v1/identifiers/{{type}}/{{value}}/explain"
                ),
            }
        }
        (None, None) => anyhow::bail!("give --profile or --identifier"),
    };
    let (shard, node) = found.context("no profile for this id")?;
    let read = ShardRead { kv: &store, shard };
    let inspection = crate::inspect::inspection(&read, node, &cfg.enrichment)?
        .context("identifier points at a missing profile")?;
    println!("{}", serde_json::to_string_pretty(&inspection)?);
    Ok(())
}

/// `type:value`, normalised like an event's identifier.
fn parse_identifier(normalizer: &Normalizer, spec: &str) -> anyhow::Result<Identifier> {
    raw_identifier(normalizer, spec).map(|(_, id)| id)
}

/// `type:value` as given (what a control command carries) and normalised (checked here for a clear error
/// now rather than a dead letter later).
fn raw_identifier(normalizer: &Normalizer, spec: &str) -> anyhow::Result<(RawId, Identifier)> {
    let (kind, value) = spec
        .split_once(':')
        .context("an identifier is written type:value")?;
    let id = normalizer
        .identifier(kind, value)
        .map_err(|r| anyhow::anyhow!("identifier {spec:?} refused: {}", r.as_str()))?;
    let raw = RawId {
        kind: kind.to_string(),
        value: value.to_string(),
    };
    Ok((raw, id))
}

pub async fn erase(args: EraseArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.config)?;
    let command = match (&args.identifier, &args.profile) {
        (Some(spec), _) => {
            let (raw, id) = raw_identifier(&Normalizer::new(&cfg.identity)?, spec)?;
            // A hashed type is sent as its hash: the clear value stays off the control topic.
            let hashed = cfg.identity.hashed_types.contains(&id.kind);
            ControlCommand::EraseIdentifier {
                kind: raw.kind,
                value: (!hashed).then_some(raw.value),
                hash: hashed.then_some(id.value),
                suppress: args.suppress,
            }
        }
        (None, Some(p)) => ControlCommand::EraseProfile {
            profile_id: profile_arg(p)?.0,
        },
        (None, None) => anyhow::bail!("give --identifier or --profile"),
    };
    send_control(&cfg, &command).await
}

pub async fn unsuppress(args: UnsuppressArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.config)?;
    let (raw, id) = raw_identifier(&Normalizer::new(&cfg.identity)?, &args.identifier)?;
    let hashed = cfg.identity.hashed_types.contains(&id.kind);
    let command = ControlCommand::Unsuppress {
        kind: raw.kind,
        value: (!hashed).then_some(raw.value),
        hash: hashed.then_some(id.value),
    };
    send_control(&cfg, &command).await
}

/// `stitcher release`: the release command to every instance (through the control topic and every
/// shard); once the group has taken it, the quarantine topic from where the last release left it to its
/// end is produced to the input topics again (`--replay`) or skipped (`--discard`), and that position is
/// committed under the group `<kafka.group_id>-quarantine`.
pub async fn release(args: ReleaseArgs) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let cfg = load_config(&args.config)?;
    anyhow::ensure!(
        cfg.breaker.enabled(),
        "the merge-storm breaker is off in this configuration (breaker.multiple = 0)"
    );
    let (partition, offset) = crate::control::send(&cfg, &ControlCommand::Release {}).await?;
    println!(
        "release sent to {} (partition {partition}, offset {offset})",
        cfg.control.topic
    );
    let wait = std::time::Duration::from_secs(10);
    // The service's group has taken the command once its committed offset passes it (read without joining).
    let group: BaseConsumer = crate::kafka::base_config(&cfg)
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut at = TopicPartitionList::new();
    at.add_partition(&cfg.control.topic, partition);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.wait_secs);
    loop {
        let committed = group.committed_offsets(at.clone(), wait)?;
        let next = committed
            .find_partition(&cfg.control.topic, partition)
            .and_then(|p| p.offset().to_raw());
        if next.is_some_and(|n| n > offset) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the service did not take the release command within {} s; is it running?",
            args.wait_secs
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let topic = &cfg.breaker.quarantine_topic;
    let reader: BaseConsumer = crate::kafka::base_config(&cfg)
        .set("group.id", format!("{}-quarantine", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = reader.fetch_metadata(Some(topic), wait)?;
    let partitions: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut ends = std::collections::BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (_, high) = crate::kafka::watermarks(&reader, topic, p, wait)?;
        ends.insert(p, high);
        tpl.add_partition_offset(topic, p, Offset::Stored)?;
    }
    reader.assign(&tpl)?;
    let producer: FutureProducer = crate::kafka::base_config(&cfg)
        .set("enable.idempotence", "true")
        .create()?;
    let mut done = TopicPartitionList::new();
    let (mut replayed, mut dropped) = (0u64, 0u64);
    while !ends.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(3600),
            "reading {topic} did not reach its end"
        );
        // The position is known only once a partition is fetched; an empty rest ends it.
        for (p, high) in ends.clone() {
            if reader
                .position()?
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                >= Some(high)
            {
                ends.remove(&p);
            }
        }
        let Some(m) = reader.poll(std::time::Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        if !ends.contains_key(&m.partition()) {
            continue;
        }
        if args.replay {
            let source = m
                .headers()
                .and_then(|h| {
                    use rdkafka::message::Headers;
                    h.iter()
                        .find(|x| x.key == "quarantine.source.topic")
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .context("a quarantined record without quarantine.source.topic")?;
            let mut record = FutureRecord::<[u8], [u8]>::to(&source);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(v) = m.payload() {
                record = record.payload(v);
            }
            producer
                .send(record, std::time::Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)?;
            replayed += 1;
        } else {
            dropped += 1;
        }
        done.add_partition_offset(topic, m.partition(), Offset::Offset(m.offset() + 1))?;
        if m.offset() + 1 >= ends[&m.partition()] {
            ends.remove(&m.partition());
        }
    }
    if done.count() > 0 {
        reader.commit(&done, CommitMode::Sync)?;
    }
    println!("quarantine {topic}: {replayed} events produced to their input topics again, {dropped} dropped");
    Ok(())
}

pub async fn unlink(args: UnlinkArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.config)?;
    let normalizer = Normalizer::new(&cfg.identity)?;
    let command = ControlCommand::Unlink {
        a: raw_identifier(&normalizer, &args.a)?.0,
        b: raw_identifier(&normalizer, &args.b)?.0,
    };
    send_control(&cfg, &command).await
}

/// Sends a command to the control topic and says where it landed.
async fn send_control(cfg: &Config, command: &ControlCommand) -> anyhow::Result<()> {
    let (partition, offset) = crate::control::send(cfg, command).await?;
    println!(
        "{} sent to {} (partition {partition}, offset {offset}); the service applies it with its next batch",
        command.op(),
        cfg.control.topic,
    );
    Ok(())
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let store = open_state(&args.state_dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let held = crate::scaleout::lookup::held_locally(&store)?;
    let mut result = Ok(());
    for_each_profile(&store, &held.held(), |_, _, p| {
        let id = p.id();
        for ident in p.identifiers.keys() {
            if result.is_ok() {
                result = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"type": ident.kind, "value": ident.value, "profile_id": id})
                );
            }
        }
    })?;
    result?;
    out.flush()?;
    Ok(())
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let json = args.json.clone();
    let report = tokio::task::spawn_blocking(move || crate::bench::run(&args)).await??;
    print!("{report}");
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `stitcher backtest`: prints the report as JSON on stdout, a summary on stderr.
pub fn backtest(args: BacktestArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.config)?;
    let dir = std::env::temp_dir().join(format!(
        "stitcher-backtest-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = crate::backtest::run(
        cfg,
        &dir,
        (args.from_ms, args.until_ms),
        args.sample,
        std::time::Duration::from_secs(args.timeout_secs),
    );
    // The temporary state goes whatever happened.
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    eprintln!(
        "backtest: {} messages in {:.1} s ({:.0} msg/s): {} live profiles, {} under the candidate rules; \
         {} would split, {} would merge, {} would change id",
        report.messages,
        report.seconds,
        report.messages_per_second,
        report.live_profiles,
        report.candidate_profiles,
        report.splits,
        report.merges,
        report.renamed
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

pub fn quality(args: QualityArgs) -> anyhow::Result<()> {
    let truth = generate::read_truth(&args.truth)
        .with_context(|| format!("reading {}", args.truth.display()))?;
    let mapping = match (&args.state_dir, &args.topic, &args.brokers) {
        (Some(dir), _, _) => {
            let store = open_state(dir)?;
            crate::quality::mapping_from_state(&store)?
        }
        (None, Some(topic), Some(brokers)) => {
            let mut base = rdkafka::ClientConfig::new();
            base.set("bootstrap.servers", brokers);
            crate::quality::mapping_from_topic(base, topic, std::time::Duration::from_secs(300))?
        }
        _ => anyhow::bail!("give --state-dir, or --topic and --brokers"),
    };
    println!("{}", crate::quality::evaluate(&truth, &mapping));
    Ok(())
}
