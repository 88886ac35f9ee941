//! Scale-out against the real broker: three instances of one consumer group over 12-partition topics and 12
//! shards; one is killed with SIGKILL during the run, a fourth joins later, and one leaves with SIGTERM.
//! The final profiles must be exactly those of one instance (one shard, guardrails off) over the same
//! input, with no output record committed twice. `SCALEOUT_BENCH=1` with `--ignored` measures throughput
//! with 1, 2 and 3 instances.
#![cfg(feature = "kafka-it")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use common::*;
use stitcher::codec::update::ProfileRecord;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig, PersonTruth};

const PARTITIONS: i32 = 12;
const TIMEOUT: Duration = Duration::from_secs(900);

/// Guardrails that never refuse: what the sharded protocol computes (it applies no stateful guardrail).
fn unlimited() -> String {
    format!("[guardrails]\nmax_profile_identifiers = 1000000\n{NO_TYPE_LIMITS}")
}

/// A sharded setup: its own internal topic, failover within seconds (short session and transaction
/// timeouts), with these guardrails (`""`: the defaults).
fn sharded(test: &str, guardrails: &str) -> (Setup, String) {
    let shard_topic = unique(&format!("{test}-shards"));
    let setup = Setup::new(
        test,
        PARTITIONS,
        &format!("{guardrails}\n[scaleout]\nshards = {PARTITIONS}\ntopic = \"{shard_topic}\"\n"),
    );
    setup.edit_config(|c| {
        c.replace(
            "[processing]\n",
            "[processing]\ntransaction_timeout = \"10s\"\n",
        )
    });
    (setup, shard_topic)
}

/// Mean time of a batch and of its commit, in ms, over the instances.
fn batch_and_commit_ms(ports: &[u16]) -> (f64, f64) {
    let mean = |name: &str| {
        let sum: f64 = counters(ports, &format!("{name}_sum")).values().sum();
        let count: f64 = counters(ports, &format!("{name}_count")).values().sum();
        1000.0 * sum / count.max(1.0)
    };
    (
        mean("stitcher_batch_duration_seconds"),
        mean("stitcher_commit_duration_seconds"),
    )
}

/// Sets `processing.batch_max_events` (the tests' linger is 50 ms).
fn batching(setup: &Setup, max_events: usize) {
    setup.edit_config(|c| {
        c.replace(
            "[processing]\n",
            &format!("[processing]\nbatch_max_events = {max_events}\n"),
        )
    });
}

/// One instance of a sharded setup, with its own id, state and HTTP port.
struct Instance {
    child: Child,
    port: u16,
}

fn start_instance(setup: &Setup, n: usize) -> Instance {
    let state = setup.dir.join(format!("state-{n}"));
    let port = free_port();
    let child = setup.start_with_env(&[
        ("STITCHER_INSTANCE_ID", &format!("i{n}")),
        ("STITCHER_STATE_DIR", &state.to_string_lossy()),
        ("STITCHER_HTTP_LISTEN", &format!("127.0.0.1:{port}")),
    ]);
    Instance { child, port }
}

/// Sums of the counters named `name` over the instances' `/metrics`, per label set.
fn counters(ports: &[u16], name: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for port in ports {
        let (status, body) = http_get(*port, "/metrics");
        assert_eq!(status, 200, "metrics of the instance on port {port}");
        for line in body.lines().filter(|l| l.starts_with(name)) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let labels = series[name.len()..].trim_matches(|c| c == '{' || c == '}');
            *sums.entry(labels.to_string()).or_default() += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sums
}

/// The shard topic's partitions each instance holds (by its HTTP port), from the group's description.
fn shards_held(group: &str, shard_topic: &str, ports: &[u16]) -> Vec<Vec<i32>> {
    let admin: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let list = admin
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("describe the group");
    let members = list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map(|g| g.members())
        .unwrap_or_default();
    ports
        .iter()
        .map(|port| {
            let me = stitcher::scaleout::routing::client_id(&format!("127.0.0.1:{port}"));
            let mut held: Vec<i32> = members
                .iter()
                .filter(|m| m.client_id() == me)
                .flat_map(|m| {
                    stitcher::scaleout::routing::assigned_partitions(
                        m.assignment().unwrap_or_default(),
                        shard_topic,
                    )
                })
                .collect();
            held.sort_unstable();
            held
        })
        .collect()
}

/// Records written to each partition of `topic` (high watermark less low), by partition.
fn records_per_partition(topic: &str) -> Vec<i64> {
    let admin: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    (0..PARTITIONS)
        .map(|p| {
            let (low, high) = admin
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            high - low
        })
        .collect()
}

/// Waits until every instance holds shards, all of them together every shard, the same for a second.
fn wait_shards_shared(setup: &Setup, instances: &[Instance]) {
    let started = Instant::now();
    let held = || -> Vec<f64> {
        instances
            .iter()
            .map(|i| {
                // Not listening yet: holds nothing yet.
                if std::net::TcpStream::connect(("127.0.0.1", i.port)).is_err() {
                    return 0.0;
                }
                counters(&[i.port], "stitcher_shards_owned").values().sum()
            })
            .collect()
    };
    let shared =
        |h: &[f64]| h.iter().all(|n| *n > 0.0) && h.iter().sum::<f64>() == f64::from(PARTITIONS);
    loop {
        assert!(started.elapsed() < TIMEOUT, "{}", setup.log_tail());
        let before = held();
        if shared(&before) {
            std::thread::sleep(Duration::from_secs(1));
            if held() == before {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the group's first commit on the inputs.
fn wait_first_commit(setup: &Setup, timeout: Duration) -> Instant {
    let started = Instant::now();
    let inputs: Vec<&str> = setup.input_topics.iter().map(String::as_str).collect();
    while setup.progress_of(&inputs).0 == 0 {
        assert!(started.elapsed() < timeout, "{}", setup.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    Instant::now()
}

/// The broker's pid (the local launcher's java process), for its CPU time.
fn broker_pid() -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "kafka.Kafka"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// User + system CPU seconds of a running process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime is the 14th field, stime the 15th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

fn live_profiles(out: &Output) -> BTreeMap<String, ProfileRecord> {
    out.view
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_ref()?.profile.clone()?)))
        .collect()
}

/// An answer without what depends on where and in which order it was computed: the internal node
/// number (local to a store or a shard) and the ids merged into the profile (which profiles existed
/// before they merged depends on the order events arrived in, with one instance as with many, and so does
/// the identity version, which counts changes).
fn comparable(body: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(body).expect("json");
    if let Some(o) = v.as_object_mut() {
        o.remove("node");
        o.remove("merged_ids");
        if let Some(r) = o.get_mut("reflects").and_then(|r| r.as_object_mut()) {
            r.remove("version");
        }
    }
    v
}

/// Asks an instance, retrying a 503 as its Retry-After asks: the status, whether the answer was forwarded,
/// the time taken, the answer.
fn ask(port: u16, path: &str) -> (u16, bool, Duration, String) {
    let mut tries = 0;
    loop {
        let t = std::time::Instant::now();
        let (status, headers, body) = http_get_head(port, path);
        if status == 503 && tries < 40 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        let forwarded = headers.iter().any(|(k, _)| k == "stitcher-forwarded");
        return (status, forwarded, t.elapsed(), body);
    }
}

/// Asks every live instance about up to 200 persons (`SCALEOUT_LOOKUPS`), by email, by profile id, and for
/// both explanations:
/// each answers what the one-instance reference answers, forwarding to the instance that holds the answer
/// when it does not. Returns the latencies of the identifier lookups answered by the instance asked and of
/// those it forwarded.
fn lookups_agree(
    truth: &[PersonTruth],
    ports: &[u16],
    reference: &Setup,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut local, mut forwarded) = (Vec::new(), Vec::new());
    let emails = truth
        .iter()
        .filter_map(|p| p.identifiers.iter().find(|(k, _)| k == "email"))
        .take(env_or("SCALEOUT_LOOKUPS", 200usize));
    for (_, email) in emails {
        let path = format!("/v1/identifiers/email/{email}");
        let (status, body) = reference.http_get(&path);
        assert_eq!(status, 200, "reference lookup of {email}: {body}");
        let want = comparable(&body);
        let profile_id = want["profile_id"].as_str().expect("profile id").to_string();
        let paths = [
            format!("/v1/identifiers/email/{email}/explain"),
            format!("/v1/profiles/{profile_id}"),
            format!("/v1/profiles/{profile_id}/explain"),
        ];
        let wants: Vec<serde_json::Value> = paths
            .iter()
            .map(|p| {
                let (status, body) = reference.http_get(p);
                assert_eq!(status, 200, "reference {p}: {body}");
                comparable(&body)
            })
            .collect();
        for port in ports {
            let (status, was_forwarded, took, body) = ask(*port, &path);
            assert_eq!(status, 200, "lookup of {email} on port {port}: {body}");
            if was_forwarded {
                forwarded.push(took);
            } else {
                local.push(took);
            }
            assert_eq!(comparable(&body), want, "lookup of {email} on port {port}");
            for (p, want) in paths.iter().zip(&wants) {
                let (status, _, _, body) = ask(*port, p);
                assert_eq!(status, 200, "{p} on port {port}: {body}");
                assert_eq!(&comparable(&body), want, "{p} on port {port}");
            }
        }
    }
    (local, forwarded)
}

#[test]
fn three_instances_one_killed_one_added_one_leaving_equal_one_instance() {
    let persons = env_or("SCALEOUT_PERSONS", 3_000usize);
    let (setup, shard_topic) = sharded("scaleout", &unlimited());
    let reference = setup.sibling("scaleout-ref", &unlimited());
    let j = journeys::generate(&JourneyConfig {
        persons,
        seed: 33,
        duplicate_rate: 0.01,
        shuffle_window: 200,
        ..Default::default()
    });
    // The input arrives in three parts, so that the kill and the new instance land amid work.
    let third = j.messages.len().div_ceil(3);
    let part = |n: usize| {
        journeys::Journeys::of_messages(
            j.messages
                .iter()
                .skip(n * third)
                .take(third)
                .cloned()
                .collect(),
        )
    };
    let send = |n: usize| generate::send(&brokers(), &setup.routes, &part(n), 0).expect("send");
    let mut sent = send(0);

    let started = Instant::now();
    let mut reference_child = reference.start();
    let mut a = start_instance(&setup, 0);
    let mut b = start_instance(&setup, 1);
    let mut c = start_instance(&setup, 2);
    let inputs: Vec<&str> = setup.input_topics.iter().map(String::as_str).collect();
    let wait_for = |share: f64, children: &mut [&mut Child]| {
        let left = TIMEOUT.saturating_sub(started.elapsed());
        setup.wait_for_share(&inputs, share, children, left)
    };
    wait_for(0.5, &mut [&mut a.child, &mut b.child, &mut c.child]);
    sent += send(1);
    let at_kill = wait_for(0.6, &mut [&mut a.child, &mut b.child, &mut c.child]);
    // The last part arrives just before the kill, so that the killed instance is in the middle of a batch.
    sent += send(2);
    std::thread::sleep(Duration::from_millis(300));
    kill9(&mut b.child);
    let in_flight = setup.backlog(&shard_topic).unwrap_or_default();
    println!(
        "scaleout: killed instance 1 at {}/{} input messages committed (then {sent} sent), {in_flight} \
         shard messages waiting",
        at_kill.0, at_kill.1
    );
    let at_add = wait_for(0.75, &mut [&mut a.child, &mut c.child]);
    let mut d = start_instance(&setup, 3);
    println!("scaleout: added instance 3 at {}/{}", at_add.0, at_add.1);
    println!("scaleout: sent {sent} messages ({} events)", j.events);
    // Instance 0 leaves gracefully: it commits its last batch and exits; the others take its shards over.
    let at_leave = wait_for(0.9, &mut [&mut a.child, &mut c.child, &mut d.child]);
    assert!(sigterm(&mut a.child).success(), "{}", setup.log_tail());
    println!("scaleout: instance 0 left at {}/{}", at_leave.0, at_leave.1);
    setup.wait_done(&mut [&mut c.child, &mut d.child], TIMEOUT);
    let took = started.elapsed();
    reference.wait_caught_up(&mut reference_child, TIMEOUT);
    let (mut local, mut forwarded) = lookups_agree(&j.truth, &[c.port, d.port], &reference);
    let answered = local.len() + forwarded.len();
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "scaleout: {answered} lookups, every one answered by every instance: {} by the instance asked \
         (p50 {:?}, p99 {:?}), {} forwarded to the owner (p50 {:?}, p99 {:?})",
        local.len(),
        pct(&mut local, 50),
        pct(&mut local, 99),
        forwarded.len(),
        pct(&mut forwarded, 50),
        pct(&mut forwarded, 99)
    );
    for child in [&mut c.child, &mut d.child, &mut reference_child] {
        assert!(sigterm(child).success(), "{}", setup.log_tail());
    }

    let out = setup.output();
    let want = reference.output();
    assert!(
        setup.identity_mapping() == out.identity_mapping(),
        "the identity change stream of three instances rebuilds their mapping"
    );
    assert!(reference.identity_mapping() == want.identity_mapping());
    let got_profiles = live_profiles(&out);
    let want_profiles = live_profiles(&want);
    let log = setup.log();
    let restored: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("shards restored"))
        .collect();
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let restored_records: u64 = restored.iter().map(|l| field(l, "records")).sum();
    let restore_ms: u64 = restored.iter().map(|l| field(l, "elapsed_ms")).sum();
    println!(
        "scaleout: {} events, 3 instances (one killed, one added, one left) in {took:.1?}: {} live profiles, \
         reference {}; {} output records, {} duplicates; {} restores of {restored_records} changelog \
         records in {restore_ms} ms in all",
        j.events,
        got_profiles.len(),
        want_profiles.len(),
        out.records.len(),
        out.duplicates(),
        restored.len()
    );
    assert!(
        restored_records > 0,
        "the killed instance's shards were restored elsewhere from their changelog"
    );
    assert!(answered > 0, "no lookup asked");
    assert_eq!(out.duplicates(), 0, "committed output records repeated");
    let only_here: Vec<_> = got_profiles
        .iter()
        .filter(|(id, _)| !want_profiles.contains_key(*id))
        .map(|(id, p)| (id, p.identifiers.len(), p.events))
        .collect();
    let only_there: Vec<_> = want_profiles
        .iter()
        .filter(|(id, _)| !got_profiles.contains_key(*id))
        .map(|(id, p)| (id, p.identifiers.len(), p.events))
        .collect();
    assert!(
        only_here.is_empty() && only_there.is_empty(),
        "live profile ids differ: only sharded {only_here:?}, only one instance {only_there:?}"
    );
    let differing: Vec<_> = got_profiles
        .iter()
        .filter(|(id, p)| want_profiles.get(*id) != Some(*p))
        .collect();
    if let Some((id, p)) = differing.first() {
        panic!(
            "{} profiles differ from the one-instance run; first {id}:\nsharded   {p:?}\none instance {:?}",
            differing.len(),
            want_profiles.get(*id)
        );
    }
    // Every redirect of the sharded run leads to a live profile.
    let summaries = live_summaries(&out.view);
    assert_eq!(
        summaries,
        truth_summaries(&j.truth),
        "profiles equal the truth"
    );
}

/// Persons of their own, sent only with the first part of the input, for the commands sent mid-run: the
/// first five lose their email (erased), the other five the link between their cookie and their device
/// (unlinked).
fn commanded_persons() -> Vec<journeys::Generated> {
    (0..10)
        .flat_map(|k| {
            let (email, cookie, device) = (
                format!("person{k}@erase.test"),
                format!("erase-cookie-{k}"),
                format!("erase-device-{k}"),
            );
            [
                stitcher::model::ChannelEvent::new(
                    format!("cmd-{k}-a"),
                    "login",
                    1_700_000_000_000 + k,
                    &[("email", &email), ("anonymous_id", &cookie)],
                ),
                stitcher::model::ChannelEvent::new(
                    format!("cmd-{k}-b"),
                    "page_view",
                    1_700_000_001_000 + k,
                    &[("anonymous_id", &cookie), ("device_id", &device)],
                ),
            ]
        })
        .map(|event| journeys::Generated::Event {
            channel: "web",
            key: event.event_id.clone(),
            event,
        })
        .collect()
}

/// Persons who refuse cross-channel identification: the refusal (on the web, with their email) is sent with
/// the first part of the input, so that it is applied before anything else of theirs in every run; their
/// web login and app login (the same email, a cookie, a device) come with the second part. The web login
/// lands in the sealed profile; the app login is stitched in the app's own identity space, apart.
fn refusing_persons(count: usize) -> (Vec<journeys::Generated>, Vec<journeys::Generated>) {
    let mut refusals = Vec::new();
    let mut later = Vec::new();
    for k in 0..count {
        let email = format!("person{k}@consent.test");
        let ts = 1_700_000_000_000 + k as i64;
        let mut refusal = stitcher::model::ChannelEvent::new(
            format!("consent-{k}-refuse"),
            "consent_change",
            ts,
            &[("email", &email)],
        );
        refusal.consent = Some(stitcher::model::ConsentChange {
            cross_channel: Some(false),
            email_marketing: None,
        });
        refusals.push(("web", refusal));
        later.push((
            "web",
            stitcher::model::ChannelEvent::new(
                format!("consent-{k}-web"),
                "login",
                ts + 1_000,
                &[
                    ("email", &email),
                    ("anonymous_id", &format!("consent-cookie-{k:04}")),
                ],
            ),
        ));
        later.push((
            "app",
            stitcher::model::ChannelEvent::new(
                format!("consent-{k}-app"),
                "login",
                ts + 2_000,
                &[
                    ("email", &email),
                    ("device_id", &format!("consent-device-{k:04}")),
                ],
            ),
        ));
    }
    let generated = |events: Vec<(&'static str, stitcher::model::ChannelEvent)>| {
        events
            .into_iter()
            .map(|(channel, event)| journeys::Generated::Event {
                channel,
                key: event.event_id.clone(),
                event,
            })
            .collect()
    };
    (generated(refusals), generated(later))
}

/// Sends the erase and unlink commands for [`commanded_persons`] through a setup's control topic.
fn send_commands(setup: &Setup) {
    for k in 0..10 {
        let out = if k < 5 {
            setup.cli(&[
                "erase",
                "--identifier",
                &format!("email:person{k}@erase.test"),
            ])
        } else {
            setup.cli(&[
                "unlink",
                "--a",
                &format!("anonymous_id:erase-cookie-{k}"),
                "--b",
                &format!("device_id:erase-device-{k}"),
            ])
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The adversarial data (a device shared by most persons, junk identifiers on half the events, 5% more
/// persons refusing cross-channel identification) under the default guardrails, over three instances of
/// which one is killed mid-run and one added, with erase and unlink commands sent between two parts of the
/// input: the people equal the ground truth and the one-instance run, the shared device lives alone,
/// erased identifiers are in no profile, unlinked devices are apart, refusing persons' channels are apart,
/// and tombstones are those of the one-instance run.
#[test]
fn guardrails_shared_split_and_commands_on_three_instances_equal_one_instance() {
    let persons = env_or("SCALEOUT_ADVERSARIAL_PERSONS", 1_500usize);
    let (setup, shard_topic) = sharded("scaleout-adv", "");
    let reference = setup.sibling("scaleout-adv-ref", "");
    let j = journeys::generate(&JourneyConfig {
        persons,
        seed: 44,
        shuffle_window: 200,
        shared_device_persons: persons * 10 / 12,
        junk_rate: 0.5,
        ..Default::default()
    });
    let half = j.messages.len() / 2;
    let part = journeys::Journeys::of_messages;
    let (refusals, refusing_later) = refusing_persons(persons / 20);
    let mut first: Vec<journeys::Generated> = j.messages[..half].to_vec();
    first.extend(commanded_persons());
    first.extend(refusals);
    generate::send(&brokers(), &setup.routes, &part(first), 0).expect("send");
    let mut reference_child = reference.start();
    let mut a = start_instance(&setup, 0);
    let mut b = start_instance(&setup, 1);
    let mut c = start_instance(&setup, 2);
    setup.wait_done(&mut [&mut a.child, &mut b.child, &mut c.child], TIMEOUT);
    reference.wait_caught_up(&mut reference_child, TIMEOUT);
    send_commands(&setup);
    send_commands(&reference);
    let mut second = j.messages[half..].to_vec();
    second.extend(refusing_later);
    generate::send(&brokers(), &setup.routes, &part(second), 0).expect("send");
    std::thread::sleep(Duration::from_millis(1500));
    kill9(&mut b.child);
    let mut d = start_instance(&setup, 3);
    setup.wait_done(&mut [&mut a.child, &mut c.child, &mut d.child], TIMEOUT);
    reference.wait_caught_up(&mut reference_child, TIMEOUT);
    let held = shards_held(&setup.group, &shard_topic, &[a.port, c.port, d.port]);
    assert!(
        held.iter()
            .all(|s| s.len() == 4 && s.windows(2).all(|w| w[1] - w[0] == 3)),
        "the shards are dealt in turn, not in ranges (docs/DESIGN.md, \"Where the work lands\"): {held:?}"
    );
    let (local, forwarded) = lookups_agree(&j.truth, &[a.port, c.port, d.port], &reference);
    for child in [
        &mut a.child,
        &mut c.child,
        &mut d.child,
        &mut reference_child,
    ] {
        assert!(sigterm(child).success(), "{}", setup.log_tail());
    }

    let (out, want) = (setup.output(), reference.output());
    assert_eq!(out.duplicates(), 0, "committed output records repeated");
    assert!(
        setup.identity_mapping() == out.identity_mapping(),
        "the identity change stream (splits, erasures, unlinks, a shared device, three instances) \
         rebuilds the live mapping"
    );
    assert!(reference.identity_mapping() == want.identity_mapping());
    let (got_profiles, want_profiles) = (live_profiles(&out), live_profiles(&want));
    let tombstones = |o: &Output| -> Vec<String> {
        o.view
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.clone())
            .collect()
    };
    println!(
        "scaleout adversarial: {} events over 3 instances (one killed, one added), {} live profiles \
         (reference {}), {} tombstones (reference {}), {} lookups answered here and {} forwarded",
        j.events,
        got_profiles.len(),
        want_profiles.len(),
        tombstones(&out).len(),
        tombstones(&want).len(),
        local.len(),
        forwarded.len()
    );
    assert_eq!(tombstones(&out), tombstones(&want), "tombstones");
    // A shared identifier's own profile keeps the times it was seen until it was set apart, which depends
    // on the order events arrived in (with one instance as with many): compared without them.
    let comparable =
        |profiles: &BTreeMap<String, ProfileRecord>| -> BTreeMap<String, ProfileRecord> {
            profiles
                .iter()
                .map(|(k, p)| {
                    let mut p = p.clone();
                    if p.shared {
                        for i in &mut p.identifiers {
                            (i.first_seen, i.last_seen) = (0, 0);
                        }
                        (p.first_seen, p.last_seen) = (0, 0);
                    }
                    (k.clone(), p)
                })
                .collect()
        };
    let (got_cmp, want_cmp) = (comparable(&got_profiles), comparable(&want_profiles));
    let differing: Vec<(&String, &ProfileRecord, Option<&ProfileRecord>)> = got_cmp
        .iter()
        .filter(|(k, v)| want_cmp.get(*k) != Some(*v))
        .map(|(k, v)| (k, v, want_cmp.get(k)))
        .collect();
    assert!(
        got_cmp == want_cmp,
        "profiles differ from one instance: {} differ; first: {:#?}",
        differing.len(),
        differing.first()
    );
    // The shared device alone, the erased emails nowhere, the unlinked devices apart.
    let holders = |kind: &str, value: &str| -> Vec<&ProfileRecord> {
        got_profiles
            .values()
            .filter(|p| {
                p.identifiers
                    .iter()
                    .any(|i| i.kind == kind && i.value == value)
            })
            .collect()
    };
    let shared = holders("device_id", journeys::SHARED_DEVICE);
    assert_eq!(shared.len(), 1);
    assert!(shared[0].shared && shared[0].identifiers.len() == 1);
    for k in 0..10 {
        if k < 5 {
            assert!(holders("email", &format!("person{k}@erase.test")).is_empty());
            assert_eq!(
                holders("anonymous_id", &format!("erase-cookie-{k}")).len(),
                1
            );
        } else {
            let device = holders("device_id", &format!("erase-device-{k}"));
            assert_eq!(device.len(), 1);
            assert_eq!(device[0].identifiers.len(), 1, "device {k} unlinked");
        }
    }
    // A refusing person's web profile holds the email and the cookie; the app login is apart.
    let holding = |needle: &str| -> Vec<&ProfileRecord> {
        got_profiles
            .values()
            .filter(|p| p.identifiers.iter().any(|i| i.value.contains(needle)))
            .collect()
    };
    for k in 0..persons / 20 {
        let (cookie, device) = (
            format!("consent-cookie-{k:04}"),
            format!("consent-device-{k:04}"),
        );
        let device_profiles = holding(&device);
        assert_eq!(device_profiles.len(), 1, "refusing person {k}");
        assert!(
            !device_profiles[0]
                .identifiers
                .iter()
                .any(|i| i.value.contains(&cookie)),
            "refusing person {k}: app and web joined"
        );
        assert_eq!(holding(&cookie).len(), 1, "refusing person {k}");
    }
    let mut people = out.view.clone();
    people.retain(|k, v| {
        !v.as_ref().is_some_and(|u| {
            u.profile.as_ref().is_some_and(|p| {
                p.shared
                    || p.identifiers
                        .iter()
                        .any(|i| i.value.contains("erase") || i.value.contains("consent"))
            })
        }) && !k.is_empty()
    });
    let got = live_summaries(&people);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "people: {}", diff(&got, &want));
}

/// Throughput with 1, 2 and 3 instances on this machine, each over the same input, with each instance's
/// CPU time and the messages between shards per event and per merge (fetches and components moved),
/// after one instance with one shard (no `[scaleout]`) as the baseline. The instances share the shards
/// before the input is sent.
/// `SCALEOUT_BENCH=1 cargo test --release --features kafka-it --test scaleout -- --ignored --nocapture`;
/// `SCALEOUT_PERSONS` and `SCALEOUT_BATCH` (most messages per batch, 2,000) change the run.
/// `SCALEOUT_ROUNDS=N` runs the sharded phases N times, in turn forwards and backwards (1, 2, 3, then
/// 3, 2, 1, ...), and prints the CPU of three instances against one for each round: this machine's speed
/// drifts within minutes, so a ratio is only worth what its two sides measured next to each other.
#[test]
#[ignore]
fn throughput_with_one_two_three_instances() {
    if std::env::var("SCALEOUT_BENCH").is_err() {
        return;
    }
    let persons = env_or("SCALEOUT_PERSONS", 10_000usize);
    let batch = env_or("SCALEOUT_BATCH", 2_000usize);
    println!("scaleout-bench: batches of at most {batch} messages or 50 ms");
    let j = journeys::generate(&JourneyConfig {
        persons,
        seed: 34,
        shuffle_window: 200,
        ..Default::default()
    });
    {
        // Baseline: one shard (no `[scaleout]`), one instance, same input and guardrails.
        let one_shard = Setup::new("scaleout-bench-one-shard", PARTITIONS, &unlimited());
        batching(&one_shard, batch);
        let sent = generate::send(&brokers(), &one_shard.routes, &j, 0).expect("send");
        let mut child = one_shard.start();
        let first = wait_first_commit(&one_shard, TIMEOUT);
        let cpu_at_first = cpu_seconds(child.id());
        one_shard.wait_caught_up(&mut child, TIMEOUT);
        let secs = first.elapsed().as_secs_f64();
        let cpu = cpu_seconds(child.id());
        let in_run = cpu - cpu_at_first;
        let (batch_ms, commit_ms) = batch_and_commit_ms(&[one_shard.http_port]);
        sigterm(&mut child);
        println!(
            "scaleout-bench: one shard, 1 instance: {sent} messages in {secs:.1}s = {:.0} msg/s; CPU \
             seconds {cpu:.1} ({in_run:.1} in the run); batches of {batch_ms:.0} ms, {commit_ms:.0} ms of it committing",
            sent as f64 / secs
        );
    }
    let rounds = env_or("SCALEOUT_ROUNDS", 1usize).max(1);
    // CPU seconds in the run, summed over the instances, per round and instance count.
    let mut in_run_cpu: Vec<BTreeMap<usize, f64>> = vec![BTreeMap::new(); rounds];
    let phases = (0..rounds).flat_map(|round| {
        let counts: Vec<usize> = if round % 2 == 0 {
            vec![1, 2, 3]
        } else {
            vec![3, 2, 1]
        };
        counts.into_iter().map(move |n| (round, n))
    });
    for (round, n) in phases {
        let (setup, shard_topic) = sharded(&format!("scaleout-bench{n}"), &unlimited());
        batching(&setup, batch);
        if let Ok(assignor) = std::env::var("SCALEOUT_ASSIGNOR") {
            // For a comparison: the group's partition assignment strategy instead of the service's.
            setup.edit_config(|c| {
                c.replace(
                    "[output]\n",
                    &format!(
                        "[kafka.consumer]\n\"partition.assignment.strategy\" = \"{assignor}\"\n\n[output]\n"
                    ),
                )
            });
        }
        // The instances join and share the shards before the input comes: what is measured is the
        // steady state, not the rebalances of instances joining one after another (restores paid once
        // per change of membership, not per event).
        let mut instances: Vec<Instance> = (0..n).map(|i| start_instance(&setup, i)).collect();
        wait_shards_shared(&setup, &instances);
        let sent = generate::send(&brokers(), &setup.routes, &j, 0).expect("send");
        let broker = broker_pid();
        let broker_before = broker.map(cpu_seconds).unwrap_or_default();
        let first = wait_first_commit(&setup, TIMEOUT);
        let cpu_at_first: Vec<f64> = instances
            .iter()
            .map(|i| cpu_seconds(i.child.id()))
            .collect();
        let done = {
            let mut children: Vec<&mut Child> =
                instances.iter_mut().map(|i| &mut i.child).collect();
            setup.wait_done(&mut children, TIMEOUT)
        };
        let secs = (done - first).as_secs_f64();
        // Over each instance's life (start-up, joining and restoring included), and over the run alone
        // (from the group's first input commit until drained): the start-up is paid once per instance,
        // not per event.
        let cpu: Vec<String> = instances
            .iter()
            .zip(&cpu_at_first)
            .map(|(i, at_first)| {
                let now = cpu_seconds(i.child.id());
                let in_run = now - at_first;
                *in_run_cpu[round].entry(n).or_default() += in_run;
                format!("{now:.1} ({in_run:.1} in the run)")
            })
            .collect();
        let broker_cpu = broker.map(cpu_seconds).unwrap_or_default() - broker_before;
        let ports: Vec<u16> = instances.iter().map(|i| i.port).collect();
        let by_series = counters(&ports, "stitcher_shard_messages_total");
        let sum_of = |name: &str| -> f64 { counters(&ports, name).values().sum() };
        let merges = sum_of("stitcher_profile_merges_total");
        let batches = sum_of("stitcher_batch_size_messages_count");
        let batch_mean = sum_of("stitcher_batch_size_messages_sum") / batches.max(1.0);
        let (batch_ms, commit_ms) = batch_and_commit_ms(&ports);
        let restored = sum_of("stitcher_restored_records_total");
        let held = shards_held(&setup.group, &shard_topic, &ports);
        let changelog = records_per_partition(&format!("{shard_topic}-changelog"));
        let shard_messages = records_per_partition(&shard_topic);
        let memtables_mib = counters(&ports, "stitcher_state_memory_bytes")
            .iter()
            .filter(|(k, _)| k.contains("memtables"))
            .map(|(_, v)| v)
            .sum::<f64>()
            / f64::from(1 << 20);
        for instance in instances.iter_mut() {
            sigterm(&mut instance.child);
        }
        let count = |pred: &dyn Fn(&str) -> bool| -> f64 {
            by_series
                .iter()
                .filter(|(k, _)| pred(k))
                .map(|(_, v)| v)
                .sum()
        };
        let events = count(&|k| k.contains("kind=\"event\""));
        let linking = count(&|k| {
            ["fetch", "component"]
                .iter()
                .any(|kind| k.contains(&format!("kind=\"{kind}\"")))
        });
        let all = count(&|_| true);
        let crossing = count(&|k| k.contains("route=\"topic\""));
        let kinds: BTreeSet<&str> = by_series
            .keys()
            .filter_map(|k| k.split("kind=\"").nth(1)?.split('"').next())
            .collect();
        let per_kind: Vec<String> = kinds
            .iter()
            .map(|kind| {
                let of_kind = |k: &str| k.contains(&format!("kind=\"{kind}\""));
                let through = count(&|k| of_kind(k) && k.contains("route=\"topic\""));
                // `abs`: a sum of no values is -0.
                format!(
                    "{kind} {:.2} ({:.2})",
                    count(&of_kind) / events.max(1.0),
                    (through / events.max(1.0)).abs()
                )
            })
            .collect();
        println!(
            "scaleout-bench: {n} instance(s): {sent} messages in {secs:.1}s = {:.0} msg/s; CPU seconds per \
             instance [{}], broker {broker_cpu:.1}; {batches} batches of {batch_mean:.0} messages, \
             {batch_ms:.0} ms each, {commit_ms:.0} ms of it committing; {:.1} shard messages per event, {:.1} fetch/component per merge \
             ({merges} merges), {:.0}% through the internal topic; {restored} changelog records restored, \
             {memtables_mib:.0} MiB in memtables; per event by kind (through the topic): {}",
            sent as f64 / secs,
            cpu.join(", "),
            all / events.max(1.0),
            linking / merges.max(1.0),
            (100.0 * crossing / all.max(1.0)).abs(),
            per_kind.join(", "),
        );
        // Where the work is: a shard's changelog records are its state changes, its topic records the
        // messages other instances sent it.
        let thousands = |v: &[i64]| -> String {
            let k: Vec<String> = v
                .iter()
                .map(|n| format!("{:.0}k", *n as f64 / 1e3))
                .collect();
            k.join(" ")
        };
        println!(
            "scaleout-bench: {n} instance(s): changelog records per shard [{}], shard topic records per \
             shard [{}]",
            thousands(&changelog),
            thousands(&shard_messages)
        );
        for (i, shards) in held.iter().enumerate() {
            let of = |v: &[i64]| -> i64 { shards.iter().map(|s| v[*s as usize]).sum() };
            println!(
                "scaleout-bench: {n} instance(s): instance {i} holds shards {shards:?}: changelog \
                 records {:.0}k, shard topic records {:.0}k, CPU seconds {}",
                of(&changelog) as f64 / 1e3,
                of(&shard_messages) as f64 / 1e3,
                cpu[i]
            );
        }
    }
    let mut ratios: Vec<f64> = Vec::new();
    for (round, cpu) in in_run_cpu.iter().enumerate() {
        if let (Some(one), Some(three)) = (cpu.get(&1), cpu.get(&3)) {
            let ratio = three / one.max(f64::MIN_POSITIVE);
            ratios.push(ratio);
            println!(
                "scaleout-bench: round {round}: CPU seconds in the run, 1 instance {one:.1}, 3 instances \
                 {three:.1}: {ratio:.2}x"
            );
        }
    }
    ratios.sort_by(f64::total_cmp);
    let middle = ratios.len() / 2;
    let median = match ratios.len() {
        0 => None,
        n if n % 2 == 1 => Some(ratios[middle]),
        _ => Some((ratios[middle - 1] + ratios[middle]) / 2.0),
    };
    if let Some(median) = median {
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        println!(
            "scaleout-bench: 3 instances against 1, CPU in the run: {median:.2}x the median of {} \
             rounds ({})",
            ratios.len(),
            each.join(", ")
        );
    }
}

/// README "Changing the number of shards", run once: a deployment on the default single shard, then a new
/// deployment with four shards (new group, transactional id, output topic, empty state) replaying the same
/// input topics ends with the same profiles. The old state directory started with the new count is
/// refused, saying what to do.
/// Topics made beforehand (a platform team's, with `output.create_topics = false`) are checked: a changelog
/// with the default cleanup policy (delete) would lose the state's records older than its retention, and a
/// control topic of three partitions would apply commands out of order. Each start is refused, naming
/// the topic; once both are right, the instance starts, and is not ready while the dead-letter topic, never
/// made, is missing (the first bad message would have failed every commit), until it is created.
#[test]
fn topics_made_beforehand_are_checked() {
    let setup = Setup::new("own-topics", 1, "");
    setup.edit_config(|c| c.replacen("[output]\n", "[output]\ncreate_topics = false\n", 1));
    let shard_topic = format!("{}-shards", setup.group);
    let changelog = format!("{shard_topic}-changelog");
    create_topics(
        &[
            shard_topic,
            changelog.clone(),
            setup.output_topic.clone(),
            setup.identity_topic.clone(),
        ],
        1,
    );
    let refused_saying = |says: &str| {
        let mut refused = setup.start();
        let status = exit_within(&mut refused, Duration::from_secs(60)).expect("exits");
        assert!(!status.success(), "started: {}", setup.log_tail());
        assert!(setup.log().contains(says), "{}", setup.log_tail());
    };
    refused_saying(&format!(
        "internal topics: {changelog} has cleanup.policy=delete"
    ));
    set_topic_config(&changelog, &[("cleanup.policy", "compact")]);
    let spread = format!("{}-spread", setup.control_topic);
    create_topics(std::slice::from_ref(&spread), 3);
    setup.edit_config(|c| c.replace(&setup.control_topic, &spread));
    refused_saying(&format!(
        "internal topics: {spread} (control.topic) has 3 partitions"
    ));
    setup.edit_config(|c| c.replace(&spread, &setup.control_topic));
    let mut child = setup.start();
    let bound = Duration::from_secs(60);
    let missing = format!("topics missing: {}", setup.dlq_topic);
    setup.wait_for("not ready naming the dead-letter topic", bound, || {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "{}",
            setup.log_tail()
        );
        std::net::TcpStream::connect(("127.0.0.1", setup.http_port)).is_ok()
            && setup.http_get("/readyz").1.contains(&missing)
    });
    create_topics(std::slice::from_ref(&setup.dlq_topic), 1);
    setup.wait_for("ready once it exists", bound, || is_ready(setup.http_port));
    assert!(sigterm(&mut child).success(), "{}", setup.log_tail());
}

#[test]
fn changing_the_shard_count_by_replay_gives_the_same_profiles() {
    let old = Setup::new("reshard-1", 4, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 800,
        seed: 45,
        shuffle_window: 100,
        ..Default::default()
    });
    generate::send(&brokers(), &old.routes, &j, 0).expect("send");
    let mut child = old.start();
    old.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success(), "{}", old.log_tail());

    old.edit_config(|c| format!("{c}\n[scaleout]\nshards = 4\n"));
    let mut refused = old.start();
    let status = refused.wait().expect("wait");
    assert!(
        !status.success(),
        "started on a state made with another shard count"
    );
    assert!(
        old.log()
            .contains("was made with 1 shards and the configuration says 4"),
        "{}",
        old.log_tail()
    );

    // A new state directory (a lost volume) passes that check: the internal topics' partitions refuse it.
    old.edit_config(|c| c.replace("/state\"", "/state-fresh\""));
    let shard_topic = format!("{}-shards", old.group);
    let internal = [shard_topic.clone(), format!("{shard_topic}-changelog")];
    let refused_saying = |says: &str| {
        let mut child = old.start();
        let status = exit_within(&mut child, Duration::from_secs(120)).expect("exits");
        assert!(!status.success(), "started: {}", old.log_tail());
        assert!(old.log().contains(says), "{}", old.log_tail());
    };
    refused_saying(&format!(
        "{shard_topic} has 1 partitions and scaleout.shards = 4"
    ));
    // Partitions added to match (kafka-topics --alter): the changelog's placement refuses it.
    add_partitions(&internal, 4);
    refused_saying(&format!(
        "partition 0 of {shard_topic}-changelog holds the mark of a changelog of 1 shards"
    ));

    let new = old.sibling("reshard-4", "[scaleout]\nshards = 4\n");
    let mut child = new.start();
    new.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success(), "{}", new.log_tail());
    let (before, after) = (live_profiles(&old.output()), live_profiles(&new.output()));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same profile ids after the replay"
    );
    assert!(before == after, "the same profiles after the replay");
    assert_eq!(
        live_summaries(&new.output().view),
        truth_summaries(&j.truth)
    );
    println!(
        "reshard: {} profiles on 1 shard, the same {} after a replay into 4 shards",
        before.len(),
        after.len()
    );
}
