//! `stitcher bench`: end-to-end throughput and latency against a real broker, in one run.
//!
//! 1. Generated journeys are written once to fresh channel topics.
//!    With `--warm-up-secs`, unmeasured passthroughs follow until the broker's JIT compiler is quiet or
//!    the time is spent ([`warm_up`]): a broker started minutes before spends much of a core compiling.
//! 2. **Passthrough**: a consumer and a transactional producer built from the same client settings as the
//!    service read every input message and write the same bytes to another topic, committing offsets in
//!    transactions of the same batch size. No decoding, no state: the rate this broker and client allow.
//! 3. **Pipeline**: the service (this binary, `run`) processes the same input with exactly-once on.
//! 4. **Latency**: with the service caught up, new journeys are produced live at a fixed rate with event time
//!    = send time; a read_committed consumer of the profile topic measures, for every event, event time →
//!    its batch's update visible ([`event_latencies`]).
//! 5. **Passthrough again**, with the service stopped: the ratio is taken against the mean of both
//!    passthroughs, so that neither the first phase's place (right after the input was written) nor the
//!    machine's drift over the run lands on one side of it alone.
//! 6. **The pipeline's traffic** (`--traffic`): the passthrough's loop writing, for each input message, what
//!    the pipeline wrote for it (its output, identity and changelog records at the rates and mean sizes
//!    counted in phase 3, to topics configured like the pipeline's) and nothing else: no decoding, no state.
//!    What this broker and client allow a pipeline that writes that much, the ceiling of the pipeline's rate.
//!
//! Both rates are measured the same way, from the group's committed offsets: messages committed between
//! the first commit and the last, over that time, so start-up (group join, RocksDB open) counts for neither.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::codec::{AvroCodec, ProfileUpdate};
use crate::config::{Config, Format, InputConfig};
use crate::generate::{self, Routes};
use crate::journeys::{self, Generated, JourneyConfig};
use crate::kafka::reader::for_each_committed;
use crate::kafka::{
    consumer_config, producer_config, StitchContext, CHANGELOG_TOPIC_SETTINGS,
    PROFILE_TOPIC_SETTINGS,
};
use crate::metrics::Metrics;
use crate::model::now_millis;
use crate::quality::{self, QualityReport};
use crate::scaleout::state::record_kind;

/// What one run measured; printed and optionally written as JSON.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The unmeasured passthroughs before the first phase, if `--warm-up-secs` asked for them.
    pub warm_up: Option<WarmUp>,
    pub messages: u64,
    pub events: usize,
    pub partitions: i32,
    /// The mean of `passthrough_runs`.
    pub passthrough_msgs_per_sec: f64,
    /// Before the pipeline and after it.
    pub passthrough_runs: [f64; 2],
    /// What each passthrough run's client (this process) and the broker spent per message.
    pub passthrough_cpu: [PhaseCpu; 2],
    pub pipeline_msgs_per_sec: f64,
    /// What the service and the broker spent per message in the throughput phase.
    pub pipeline_cpu: PhaseCpu,
    /// The pipeline's rate over the passthroughs' mean.
    pub ratio: f64,
    pub latency_rate_msgs_per_sec: u64,
    /// Live events timed: those that a seen update's trigger follows in their input partition.
    pub latency_samples: usize,
    /// Live events sent that no seen update's trigger follows in their input partition.
    pub latency_untimed: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// The latency phase's stretches of 100 ms (by send time) in which the events at or above p99 were
    /// sent: when each began (Unix ms, to find in a log), and how many stretches the phase had
    /// ([`tail_stretches`]).
    pub latency_tail_stretches: (Vec<i64>, usize),
    /// What the service, the broker, this bench (its sender and reader) and the whole machine spent
    /// while the latency phase sent: whether the latencies were the service's or a full machine's.
    pub latency_cpu: LatencyCpu,
    pub service_peak_rss_mib: f64,
    pub service_cpu_secs: f64,
    /// Offsets of the state's changelog (its records and the transactions' commit markers) per input
    /// message, after the throughput phase.
    pub changelog_offsets_per_message: f64,
    /// The changelog's records after the throughput phase by kind, most value bytes first: which state
    /// records an input message costs.
    pub changelog_kinds: Vec<RecordKind>,
    /// The pipeline's own Kafka traffic alone, when asked for.
    pub traffic: Option<Traffic>,
    /// The Kafka Streams baseline on the same input, when asked for.
    pub kstreams: Option<Baseline>,
    pub total_secs: f64,
    /// Stitching quality of the throughput run against its ground truth.
    pub quality: QualityReport,
}

/// One kind of the state changelog's records (by their keys' kind byte), counted from its beginning.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct RecordKind {
    pub kind: &'static str,
    pub records: u64,
    /// Tombstones among `records`.
    pub deletions: u64,
    /// The values' bytes, as produced (before compression).
    pub value_bytes: u64,
}

/// Changelog records counted by kind as they are read.
#[derive(Default)]
struct KindTally(BTreeMap<&'static str, RecordKind>);

impl KindTally {
    /// Counts a record of `kind`, and its value's length (`None` for a tombstone).
    fn add(&mut self, kind: &'static str, value_len: Option<usize>) {
        let k = self.0.entry(kind).or_insert_with(|| RecordKind {
            kind,
            ..Default::default()
        });
        k.records += 1;
        match value_len {
            Some(n) => k.value_bytes += n as u64,
            None => k.deletions += 1,
        }
    }

    /// The kinds, most value bytes first.
    fn into_kinds(self) -> Vec<RecordKind> {
        let mut kinds: Vec<RecordKind> = self.0.into_values().collect();
        kinds.sort_by_key(|k| std::cmp::Reverse((k.value_bytes, k.records)));
        kinds
    }
}

/// A topic's records by kind (`kind_of` its key), read committed from the beginning of every partition.
fn topic_kinds(
    cfg: &Config,
    topic: &str,
    kind_of: fn(&[u8]) -> &'static str,
    timeout: Duration,
) -> anyhow::Result<Vec<RecordKind>> {
    let mut tally = KindTally::default();
    for_each_committed(crate::kafka::base_config(cfg), topic, timeout, |m| {
        tally.add(
            kind_of(m.key().unwrap_or_default()),
            m.payload().map(<[u8]>::len),
        )
    })?;
    Ok(tally.into_kinds())
}

/// What phase 6 measured: the pipeline's output, identity and changelog records written for each input
/// message by a transactional passthrough, with no work between reading and writing.
#[derive(Debug, Serialize)]
pub struct Traffic {
    /// Records written per input message, and their mean value (bytes; deletions have none).
    pub records_per_message: f64,
    pub value_bytes_per_message: f64,
    pub msgs_per_sec: f64,
    /// This rate over the passthroughs' mean.
    pub passthrough_ratio: f64,
    /// The pipeline's rate over this rate: how much of its traffic's ceiling the pipeline reaches.
    pub pipeline_share: f64,
    pub cpu: PhaseCpu,
}

/// A baseline application's figures, measured like the pipeline's.
#[derive(Debug, Serialize)]
pub struct Baseline {
    pub msgs_per_sec: f64,
    /// Pipeline rate over this rate.
    pub pipeline_multiple: f64,
    /// This rate over the passthroughs' mean: what the baseline itself reaches of the broker's rate.
    pub passthrough_ratio: f64,
    pub cpu_secs: f64,
    pub peak_rss_mib: f64,
    /// What it and the broker spent per message over its steady window.
    pub cpu: PhaseCpu,
}

/// CPU one process spent over a phase's steady window (the one its rate is measured over).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// User and system CPU per message committed in the window, in microseconds.
    pub us_per_message: f64,
    /// The same as a share of one core: near 1.0, the process was bound by its CPU.
    pub cores: f64,
}

/// A phase's CPU: the process doing the phase's work (the passthrough's client, the service, the
/// baseline) and, when its pid is given, the broker.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseCpu {
    pub process: CpuUse,
    pub broker: Option<CpuUse>,
    /// Of the broker's share, what its JVM's JIT compiler threads used: a broker started shortly before
    /// spends a part of the phase compiling, which a broker in service long since does not.
    pub broker_jit_cores: Option<f64>,
    /// The process's share of a core by kind of thread, largest first: which thread bounds it (a thread
    /// that ended within the window is not counted).
    pub threads: Vec<(String, f64)>,
}

impl std::fmt::Display for PhaseCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let CpuUse {
            us_per_message,
            cores,
        } = self.process;
        write!(f, "{us_per_message:.1} µs ({cores:.2} of a core)")?;
        let busiest: Vec<String> = self
            .threads
            .iter()
            .filter(|(_, c)| *c >= 0.01)
            .take(5)
            .map(|(k, c)| format!("{k} {c:.2}"))
            .collect();
        if !busiest.is_empty() {
            write!(f, " [{}]", busiest.join(", "))?;
        }
        if let Some(b) = self.broker {
            write!(
                f,
                "; broker {:.1} µs ({:.2} of a core",
                b.us_per_message, b.cores
            )?;
            match self.broker_jit_cores {
                Some(jit) if jit >= 0.01 => write!(f, ", of it JIT compiling {jit:.2})")?,
                _ => write!(f, ")")?,
            }
        }
        Ok(())
    }
}

/// The latency phase's CPU, over the messages it sent while it sent them.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyCpu {
    pub service: PhaseCpu,
    /// This process, the phase's sender and reader, as a share of a core.
    pub bench_cores: f64,
    /// Transactions the service committed per second (none if its metrics could not be read).
    pub transactions_per_sec: Option<f64>,
    /// Mean milliseconds of each step of those transactions' commits (`stitcher_commit_step_seconds`).
    pub commit_steps_ms: BTreeMap<String, f64>,
    /// The phase's slow spells: how many of those commits spent more than [`SLOW_STEP_SECS`] in each
    /// step, and how many batches took more than [`SLOW_BATCH_SECS`] from their first message to their
    /// commit (`stitcher_batch_duration_seconds`). The events of such a batch are the tail of the latency.
    pub slow_steps: BTreeMap<String, u64>,
    pub slow_batches: Option<u64>,
    /// Cores idle on the machine, of `cores` (unknown where `/proc/stat` is not readable).
    pub idle_cores: Option<f64>,
    pub cores: usize,
}

impl std::fmt::Display for LatencyCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service {}; the bench's sender and reader {:.2} of a core",
            self.service, self.bench_cores
        )?;
        if let Some(idle) = self.idle_cores {
            write!(f, "; {idle:.2} of the machine's {} cores idle", self.cores)?;
        }
        if let Some(t) = self.transactions_per_sec {
            write!(f, "; {t:.0} transactions a second")?;
        }
        if !self.commit_steps_ms.is_empty() {
            let steps = by_step(&self.commit_steps_ms, |s, ms| format!("{s} {ms:.1}"));
            write!(f, "; a commit's steps, mean ms: {steps}")?;
        }
        if let Some(batches) = self.slow_batches {
            let ms = |secs: f64| (secs * 1000.0).round();
            write!(f, "; batches over {} ms: {batches}", ms(SLOW_BATCH_SECS))?;
            let steps = by_step(&self.slow_steps, |s, n| format!("{s} {n}"));
            if !steps.is_empty() {
                write!(f, ", commit steps over {} ms: {steps}", ms(SLOW_STEP_SECS))?;
            }
        }
        Ok(())
    }
}

/// A commit's steps in their order (`stitcher_commit_step_seconds`'s `step` label).
const COMMIT_STEPS: [&str; 4] = ["produce", "offsets", "deliveries", "end"];

/// The steps `values` holds, in [`COMMIT_STEPS`] order, each shown by `show`, joined by commas.
fn by_step<V>(values: &BTreeMap<String, V>, show: impl Fn(&str, &V) -> String) -> String {
    COMMIT_STEPS
        .iter()
        .filter_map(|s| values.get(*s).map(|v| show(s, v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A bucket bound of `stitcher_batch_duration_seconds` (1 ms doubling): a batch slower than this is a
/// slow spell of the latency phase, near the target's p99 of 150 ms.
const SLOW_BATCH_SECS: f64 = 0.128;

/// A bucket bound of `stitcher_commit_step_seconds` (0.1 ms doubling): a commit step slower than this
/// alone makes its batch's events late.
const SLOW_STEP_SECS: f64 = 0.1024;

/// What the latency phase reads of the service's metrics, before and after it: committed transactions
/// (`stitcher_transactions_total`), the time of each step of their commits
/// (`stitcher_commit_step_seconds`, its sum and count by step, and how many took longer than
/// [`SLOW_STEP_SECS`]), and how many batches took longer than [`SLOW_BATCH_SECS`].
#[derive(Default)]
struct ServiceCounters {
    transactions: f64,
    steps: BTreeMap<String, Observed>,
    /// Batches (their `quick`: those that took at most [`SLOW_BATCH_SECS`]; no sum kept).
    batches: Observed,
}

/// A histogram's reading: the sum and count of its observations, and how many were at most its slow
/// bound ([`SLOW_STEP_SECS`] or [`SLOW_BATCH_SECS`]).
#[derive(Default, Clone, Copy)]
struct Observed {
    sum: f64,
    count: f64,
    quick: f64,
}

impl Observed {
    fn slow(&self) -> f64 {
        self.count - self.quick
    }
}

impl ServiceCounters {
    fn read(listen: std::net::SocketAddr) -> Option<Self> {
        let text = ureq::get(&format!("http://{listen}/metrics"))
            .timeout(Duration::from_secs(5))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        Self::parse(&text)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut counters = Self::default();
        let mut transactions = None;
        let quick_step = format!("\",le=\"{SLOW_STEP_SECS}\"}}");
        let quick_batches =
            format!("stitcher_batch_duration_seconds_bucket{{le=\"{SLOW_BATCH_SECS}\"}}");
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name == r#"stitcher_transactions_total{result="committed"}"# {
                transactions = Some(value);
            } else if let Some(step) = name
                .strip_prefix(r#"stitcher_commit_step_seconds_sum{step=""#)
                .and_then(|s| s.strip_suffix("\"}"))
            {
                counters.steps.entry(step.to_string()).or_default().sum = value;
            } else if let Some(step) = name
                .strip_prefix(r#"stitcher_commit_step_seconds_count{step=""#)
                .and_then(|s| s.strip_suffix("\"}"))
            {
                counters.steps.entry(step.to_string()).or_default().count = value;
            } else if let Some(step) = name
                .strip_prefix(r#"stitcher_commit_step_seconds_bucket{step=""#)
                .and_then(|s| s.strip_suffix(quick_step.as_str()))
            {
                counters.steps.entry(step.to_string()).or_default().quick = value;
            } else if name == "stitcher_batch_duration_seconds_count" {
                counters.batches.count = value;
            } else if name == quick_batches {
                counters.batches.quick = value;
            }
        }
        counters.transactions = transactions?;
        Some(counters)
    }

    /// Mean milliseconds of each commit step between `before` and `self`, over the commits in between.
    fn step_means_since(&self, before: &Self) -> BTreeMap<String, f64> {
        self.steps
            .iter()
            .filter_map(|(step, now)| {
                let then = before.steps.get(step).copied().unwrap_or_default();
                let n = now.count - then.count;
                (n > 0.0).then(|| (step.clone(), (now.sum - then.sum) / n * 1000.0))
            })
            .collect()
    }

    /// Between `before` and `self`: per step, the commits whose step took longer than
    /// [`SLOW_STEP_SECS`] (steps with none left out), and the batches that took longer than
    /// [`SLOW_BATCH_SECS`].
    fn slow_since(&self, before: &Self) -> (BTreeMap<String, u64>, u64) {
        let slow = |now: &Observed, then: Option<&Observed>| {
            (now.slow() - then.map_or(0.0, Observed::slow))
                .max(0.0)
                .round() as u64
        };
        let steps = self
            .steps
            .iter()
            .filter_map(|(step, now)| {
                let n = slow(now, before.steps.get(step));
                (n > 0).then(|| (step.clone(), n))
            })
            .collect();
        (steps, slow(&self.batches, Some(&before.batches)))
    }
}

/// Clock ticks per second in `/proc`'s CPU times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Idle CPU seconds of the whole machine so far (idle and waiting on I/O, of every core), and how many
/// cores it has; `None` where `/proc/stat` is not readable.
fn machine_idle() -> Option<(f64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let total = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = total
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = (f.get(3)? + f.get(4)?) / USER_HZ;
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    Some((idle, cores))
}

/// The processes whose CPU a phase reports: the one doing its work and the broker.
#[derive(Clone, Copy)]
struct Watched {
    process: u32,
    broker: Option<u32>,
}

/// CPU seconds so far of each thread of a process, by thread id: its kind and seconds.
type ThreadCpu = HashMap<u32, (String, f64)>;

/// CPU seconds so far: of the process and of each of its threads, and of the broker and each of its
/// threads.
struct Reading {
    process: f64,
    threads: ThreadCpu,
    broker: Option<(f64, ThreadCpu)>,
}

impl Watched {
    fn cpu(&self) -> Reading {
        Reading {
            process: cpu_secs(self.process),
            threads: thread_cpu(self.process),
            broker: self.broker.map(|pid| (cpu_secs(pid), thread_cpu(pid))),
        }
    }

    /// The CPU spent between two readings of [`Watched::cpu`], over `messages` in `secs`.
    fn spent(before: &Reading, after: &Reading, messages: i64, secs: f64) -> PhaseCpu {
        let used = |b: f64, a: f64| CpuUse {
            us_per_message: (a - b) * 1e6 / messages.max(1) as f64,
            cores: (a - b) / secs,
        };
        let mut threads: Vec<(String, f64)> = secs_by_kind(&before.threads, &after.threads)
            .into_iter()
            .map(|(k, s)| (k.to_string(), s / secs))
            .collect();
        threads.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let broker = before.broker.as_ref().zip(after.broker.as_ref());
        PhaseCpu {
            process: used(before.process, after.process),
            broker: broker.map(|((b, _), (a, _))| used(*b, *a)),
            // HotSpot starts and stops compiler threads as the work needs.
            broker_jit_cores: broker
                .map(|((_, b), (_, a))| secs_by_kind(b, a).get(JIT).copied().unwrap_or(0.0) / secs),
            threads,
        }
    }
}

/// CPU seconds by kind of thread between two readings of one process's threads: a thread born in
/// between counts from zero, one that ended is not counted.
fn secs_by_kind<'a>(before: &ThreadCpu, after: &'a ThreadCpu) -> HashMap<&'a str, f64> {
    let mut kinds: HashMap<&str, f64> = HashMap::new();
    for (tid, (kind, a)) in after {
        let b = before.get(tid).map_or(0.0, |(_, b)| *b);
        *kinds.entry(kind.as_str()).or_default() += a - b;
    }
    kinds
}

/// The kind of a HotSpot JVM's compiler threads (`C1 CompilerThread0`, `C2 CompilerThread1`, ...).
const JIT: &str = "JIT compiler";

/// The kind of a thread, from its name: the service's own threads by role, librdkafka's and RocksDB's
/// together, a JVM's compiler threads together, any other by its name (a JVM's, say).
fn thread_kind(name: &str) -> String {
    match name {
        "tokio-rt-worker" | "tokio-runtime-w" => "worker",
        "stitcher-commit" => "commit",
        "stitcher-decode" => "decode",
        "stitcher-txn" => "transactional calls",
        n if n.starts_with("rdk:") || n == "producer_pollin" || n == "admin_client_po" => {
            "librdkafka"
        }
        n if n.starts_with("rocksdb:") => "rocksdb",
        n if n.starts_with("C1 CompilerThre") || n.starts_with("C2 CompilerThre") => JIT,
        n => n,
    }
    .to_string()
}

/// CPU seconds of each thread of a process, with its kind; empty if unreadable.
fn thread_cpu(pid: u32) -> ThreadCpu {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let secs = stat_cpu_secs(&std::fs::read_to_string(t.path().join("stat")).ok()?)?;
            Some((tid, (thread_kind(name.trim_end()), secs)))
        })
        .collect()
}

struct Topics {
    routes: Routes,
    inputs: Vec<String>,
    passthrough: String,
    output: String,
    dead_letters: String,
}

/// Sets `cfg` to read the generated channels' topics (`routes`), one input per channel in channel order, and
/// the generator's custom identifier type.
pub fn read_generated(cfg: &mut Config, routes: &Routes) {
    let mut channels: Vec<_> = routes.iter().collect();
    channels.sort_by_key(|(ch, _)| ch.as_str());
    cfg.inputs = channels
        .into_iter()
        .map(|(ch, (topic, format))| InputConfig::new(topic, ch, *format))
        .collect();
    cfg.identity.custom_types = vec!["social_id".into()];
}

fn bench_config(args: &BenchArgs, run: &str, topics: &Topics, state: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = args.brokers.clone();
    cfg.kafka.group_id = format!("{run}-pipeline");
    cfg.kafka.transactional_id = format!("{run}-pipeline");
    read_generated(&mut cfg, &topics.routes);
    cfg.output.topic = topics.output.clone();
    cfg.output.dead_letter_topic = topics.dead_letters.clone();
    cfg.output.identity_topic = format!("{}-identity", topics.output);
    cfg.output.partitions = args.partitions;
    cfg.state.dir = state.to_path_buf();
    cfg.http.listen = ([127, 0, 0, 1], 0).into();
    if let Some(n) = args.batch_max_events {
        cfg.processing.batch_max_events = n;
    }
    if let Some(ms) = args.batch_linger_ms {
        cfg.processing.batch_linger = std::time::Duration::from_millis(ms);
    }
    if let Some(ms) = args.batch_min_ms {
        cfg.processing.batch_min_duration = std::time::Duration::from_millis(ms);
    }
    cfg.scaleout.shards = args.shards;
    cfg.kafka.producer.extend(args.producer.iter().cloned());
    cfg.kafka.consumer.extend(args.consumer.iter().cloned());
    cfg
}

/// Sum of the group's committed offsets over the inputs, and the total of messages in them.
struct Progress {
    consumer: BaseConsumer,
    tpl: TopicPartitionList,
}

impl Progress {
    fn new(brokers: &str, group: &str, inputs: &[String], partitions: i32) -> anyhow::Result<Self> {
        let consumer = crate::kafka::progress_reader(brokers, group)?;
        let mut tpl = TopicPartitionList::new();
        for t in inputs {
            for p in 0..partitions {
                tpl.add_partition(t, p);
            }
        }
        Ok(Self { consumer, tpl })
    }

    /// The sum of the group's committed offsets; an error (the group coordinator still loading, say) is
    /// no observation, not zero.
    fn committed(&self) -> anyhow::Result<i64> {
        Ok(crate::kafka::committed_sum(
            &self.consumer,
            self.tpl.clone(),
            Duration::from_secs(10),
        )?)
    }

    /// Waits until `total` is committed; returns the steady rate (messages per second between the first
    /// commit seen and the last). `alive` is checked so that a dead service fails the run instead of
    /// hanging it. Each reading is dated at the middle of its query (a query answered by a busy broker
    /// can take longer than a fast run's window). A run whose first readable progress already covers
    /// more than half of it has no measurable steady rate: an error, not a rate read off a few of its
    /// last commits (a passthrough of 200k messages whose progress was first readable 0.1 s before its
    /// end was reported at 1.9M msg/s).
    fn measure(
        &self,
        total: i64,
        timeout: Duration,
        watched: Watched,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<(f64, PhaseCpu)> {
        let started = Instant::now();
        let mut first: Option<(Instant, i64, Reading)> = None;
        let mut unreadable = None;
        let mut last = 0;
        loop {
            alive()?;
            let asked = Instant::now();
            let committed = self.committed();
            let now = asked + asked.elapsed() / 2;
            match committed {
                Ok(c) if c > 0 => {
                    last = c;
                    // CPU is read at the window's two ends only: the passthrough's client is this
                    // process, whose reads of `/proc` would count in its figure.
                    let (t0, c0, cpu0) = first.get_or_insert_with(|| (now, c, watched.cpu()));
                    let (t0, c0) = (*t0, *c0);
                    if c >= total {
                        if c0 > total / 2 {
                            bail!(
                                "progress first seen at {c0} of {total} committed messages: too late \
                                 for a steady rate (give the run more --persons; committed offsets \
                                 unreadable until then: {unreadable:?})"
                            );
                        }
                        let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
                        let spent = Watched::spent(cpu0, &watched.cpu(), c - c0, secs);
                        return Ok(((c - c0) as f64 / secs, spent));
                    }
                }
                Ok(_) => {}
                Err(e) => unreadable = Some(e.to_string()),
            }
            if started.elapsed() > timeout {
                bail!("not done after {timeout:?}: {last}/{total} committed");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What a passthrough writes for each input message.
enum Writes {
    /// The message's key and bytes, to one topic.
    Copy(String),
    /// Records at the rates and sizes a run of the pipeline wrote (phase 6).
    Like(Likeness),
}

/// The streams of phase 6 and what writing them carries from message to message.
struct Likeness {
    streams: Vec<Stream>,
    /// Per stream, the fractions of a value and of a tombstone not yet written.
    carry: Vec<(f64, f64)>,
    /// Records written so far: each one's key.
    written: u64,
    key: String,
    value: Vec<u8>,
}

impl Likeness {
    fn new(streams: Vec<Stream>) -> Self {
        Self {
            carry: vec![(0.0, 0.0); streams.len()],
            streams,
            written: 0,
            key: String::new(),
            value: Vec::new(),
        }
    }

    /// Sends what the streams have due after one more input message, whose bytes (`payload`) the values
    /// are cut from.
    fn send_due(
        &mut self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let bytes = if payload.is_empty() { b"-" } else { payload };
        for (i, (s, carry)) in self.streams.iter().zip(&mut self.carry).enumerate() {
            let (values, tombstones) = s.due(carry);
            for v in 0..values + tombstones {
                self.written += 1;
                self.key.clear();
                // Distinct keys of a changelog key's length: no record shadows another.
                write!(self.key, "{i:02}-{:020}", self.written)?;
                let record = BaseRecord::<'_, [u8], [u8]>::to(&s.topic).key(self.key.as_bytes());
                if v >= values {
                    send(producer, record)?;
                    continue;
                }
                self.value.clear();
                while self.value.len() < s.value_bytes {
                    let more = bytes.len().min(s.value_bytes - self.value.len());
                    self.value.extend_from_slice(&bytes[..more]);
                }
                send(producer, record.payload(&self.value))?;
            }
        }
        Ok(())
    }
}

/// Records of one kind that the pipeline wrote, as the traffic phase writes them: `records` values and
/// `deletions` tombstones per input message, values of `value_bytes` taken from the input message's own
/// bytes (so that they compress as real data does), each under a key of its own.
#[derive(Debug, Clone, PartialEq)]
struct Stream {
    topic: String,
    records: f64,
    deletions: f64,
    value_bytes: usize,
}

impl Stream {
    /// The stream of each kind in `kinds`, counted over `messages` input messages, to `topic`.
    fn from_kinds(topic: &str, kinds: &[RecordKind], messages: u64) -> Vec<Stream> {
        let messages = messages.max(1) as f64;
        kinds
            .iter()
            .map(|k| {
                let values = k.records - k.deletions;
                Stream {
                    topic: topic.to_string(),
                    records: values as f64 / messages,
                    deletions: k.deletions as f64 / messages,
                    value_bytes: (k.value_bytes / values.max(1)) as usize,
                }
            })
            .collect()
    }

    /// How many values and tombstones are due after one more input message: the fractions left over are
    /// carried in `carry` from message to message, so that over a run the stream writes its rates.
    fn due(&self, carry: &mut (f64, f64)) -> (usize, usize) {
        carry.0 += self.records;
        carry.1 += self.deletions;
        let now = (carry.0.floor(), carry.1.floor());
        carry.0 -= now.0;
        carry.1 -= now.1;
        (now.0 as usize, now.1 as usize)
    }
}

/// One passthrough phase (`name` names its group, so each reads every input message): its steady rate,
/// measured as the pipeline's is, and the CPU its client (this process) and the broker spent.
fn measure_passthrough(
    cfg: &Config,
    topics: &Topics,
    writes: Writes,
    (messages, partitions, timeout): (u64, i32, Duration),
    (name, broker): (&str, Option<u32>),
) -> anyhow::Result<(f64, PhaseCpu)> {
    let mut cfg = cfg.clone();
    cfg.kafka.group_id = format!("{}-passthrough-{name}", cfg.kafka.group_id);
    let progress = Progress::new(
        &cfg.kafka.brokers,
        &cfg.kafka.group_id,
        &topics.inputs,
        partitions,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        let inputs = topics.inputs.clone();
        std::thread::spawn(move || passthrough(&cfg, &inputs, writes, &stop))
    };
    let watched = Watched {
        process: std::process::id(),
        broker,
    };
    let rate = progress.measure(messages as i64, timeout, watched, || {
        if worker.is_finished() {
            bail!("passthrough stopped early");
        }
        Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("passthrough panicked"))??;
    let (rate, cpu) = rate?;
    eprintln!("bench: passthrough {name} {rate:.0} msg/s; CPU per message: client {cpu}");
    Ok((rate, cpu))
}

/// The warm-up ends when the broker's JIT compiler took less than this share of a core in each of its last
/// `QUIET_ROUNDS` rounds: a broker in service long since compiles next to nothing. One quiet round is not
/// enough: a broker restarted a minute before compiled in bursts, 0.02 of a core in one round and 0.36 in
/// another.
const WARM_JIT_CORES: f64 = 0.05;
const QUIET_ROUNDS: usize = 3;

/// The unmeasured passthroughs run before the first measured phase (`--warm-up-secs`).
#[derive(Debug, Clone, Serialize)]
pub struct WarmUp {
    /// Each round's rate and, with `--broker-pid`, the share of a core the broker's JIT compiler took.
    pub rounds: Vec<(f64, Option<f64>)>,
    pub secs: f64,
}

/// Whether the warm-up is over: its time is spent, or its last rounds found the broker's compiler quiet.
fn warmed(rounds: &[(f64, Option<f64>)], spent: Duration, budget: Duration) -> bool {
    spent >= budget
        || rounds.len() >= QUIET_ROUNDS
            && rounds[rounds.len() - QUIET_ROUNDS..]
                .iter()
                .all(|r| r.1.is_some_and(|jit| jit < WARM_JIT_CORES))
}

/// Passthroughs over the input, measured only to decide when to stop (`--warm-up-secs`).
fn warm_up(
    cfg: &Config,
    topics: &Topics,
    copy: impl Fn() -> Writes,
    phase: (u64, i32, Duration),
    args: &BenchArgs,
) -> anyhow::Result<Option<WarmUp>> {
    if args.warm_up_secs == 0 {
        return Ok(None);
    }
    let (started, budget) = (Instant::now(), Duration::from_secs(args.warm_up_secs));
    let mut rounds = Vec::new();
    while !warmed(&rounds, started.elapsed(), budget) {
        let name = format!("warm-up-{}", rounds.len() + 1);
        let (rate, cpu) =
            measure_passthrough(cfg, topics, copy(), phase, (&name, args.broker_pid))?;
        rounds.push((rate, cpu.broker_jit_cores));
    }
    Ok(Some(WarmUp {
        rounds,
        secs: started.elapsed().as_secs_f64(),
    }))
}

/// Reads every input message and writes what `writes` says for it, in transactions of `batch_max_events`
/// with offsets, with the service's client settings (`cfg`, whose group it joins). Returns when `stop` is
/// set.
fn passthrough(
    cfg: &Config,
    inputs: &[String],
    mut writes: Writes,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    // The service's consumer context too (statistics parsed for lag), so the clients differ in nothing.
    let consumer: BaseConsumer<StitchContext> =
        consumer_config(cfg).create_with_context(StitchContext::new(Metrics::new()?))?;
    let producer: ThreadedProducer<DefaultProducerContext> =
        producer_config(cfg, "passthrough").create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&inputs)?;
    let linger = cfg.processing.batch_linger;
    while !stop.load(Ordering::Relaxed) {
        let until = Instant::now() + linger;
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        let mut n = 0;
        producer.begin_transaction()?;
        while n < cfg.processing.batch_max_events {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let Some(m) = consumer.poll(until - now) else {
                continue;
            };
            let m = m?;
            match &mut writes {
                Writes::Copy(output) => {
                    let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(output);
                    if let Some(k) = m.key() {
                        record = record.key(k);
                    }
                    if let Some(p) = m.payload() {
                        record = record.payload(p);
                    }
                    send(&producer, record)?;
                }
                Writes::Like(likeness) => {
                    likeness.send_due(&producer, m.payload().unwrap_or_default())?
                }
            }
            next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            n += 1;
        }
        if !next.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((t, p), o) in &next {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
            }
            let group = consumer
                .group_metadata()
                .context("consumer has no group metadata")?;
            producer.send_offsets_to_transaction(&tpl, &group, Duration::from_secs(30))?;
        }
        crate::kafka::await_deliveries(&producer, Duration::from_secs(30))?;
        producer.commit_transaction(Duration::from_secs(30))?;
    }
    Ok(())
}

/// Sends `record`, waiting while the producer's queue is full.
fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    record: BaseRecord<'_, [u8], [u8]>,
) -> anyhow::Result<()> {
    let mut pending = record;
    loop {
        match producer.send(pending) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                pending = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// A numeric field of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`, in KiB); 0 if unreadable.
pub fn proc_status(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// User + system CPU seconds of a process.
fn cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_cpu_secs(&s))
        .unwrap_or(0.0)
}

/// User + system CPU seconds from a `/proc/.../stat` line.
fn stat_cpu_secs(stat: &str) -> Option<f64> {
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / USER_HZ)
}

struct Service {
    child: Child,
}

impl Service {
    /// This binary's `run` with `config`, logging at `level` (`STITCHER_LOG`) to `log`.
    fn start(config: &Path, log: &Path, level: &str) -> anyhow::Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("STITCHER_LOG", level);
        Self::spawn(cmd, log)
    }

    fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Self { child })
    }

    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); see its log", self.child.id());
        }
        Ok(())
    }

    /// SIGTERM, then its exit status.
    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        Ok(self.child.wait()?)
    }

    /// Peak RSS (MiB) and CPU seconds so far.
    fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        (proc_status(pid, "VmHWM:") / 1024.0, cpu_secs(pid))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The send time and latency of each live event, from its send time to its batch's update being visible
/// ([`event_latencies`]), and how many events were sent that no update timed.
fn measure_latency(
    args: &BenchArgs,
    rate: u64,
    topics: &Topics,
    persons: usize,
    (service, metrics): (Watched, std::net::SocketAddr),
) -> anyhow::Result<(Vec<Timed>, usize, LatencyCpu)> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", format!("{}-latency", topics.output))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..args.partitions {
        tpl.add_partition_offset(&topics.output, p, Offset::End)?;
    }
    reader.assign(&tpl)?;
    // Let the assignment settle at the end before producing.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        reader.poll(Duration::from_millis(100));
    }
    // The output is read on a thread of its own that does nothing else, so an update is timed when a
    // read_committed consumer can first see it, not when the pacing loop below has time to look.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        let codec = AvroCodec::profile_update()?;
        std::thread::spawn(move || {
            let mut seen: Vec<(String, i64)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(m)) = reader.poll(Duration::from_millis(20)) else {
                    continue;
                };
                let at = now_millis();
                if let Some(Ok((_, u))) = m
                    .payload()
                    .map(|p| codec.decode_confluent::<ProfileUpdate>(p))
                {
                    if let Some(id) = u.trigger_event_id {
                        seen.push((id, at));
                    }
                }
            }
            seen
        })
    };
    let (before, counters, bench, idle, started) = (
        service.cpu(),
        ServiceCounters::read(metrics),
        cpu_secs(std::process::id()),
        machine_idle(),
        Instant::now(),
    );
    let sent = pace_events(args, rate, topics, persons);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let messages = sent.as_ref().map_or(0, |(sent, _)| sent.len() as i64);
    let (idle_cores, cores) = match (idle, machine_idle()) {
        (Some((b, cores)), Some((a, _))) => (Some((a - b) / secs), cores),
        _ => (None, 0),
    };
    let after = ServiceCounters::read(metrics);
    let (transactions_per_sec, commit_steps_ms, (slow_steps, slow_batches)) =
        match (&counters, &after) {
            (Some(b), Some(a)) => {
                let (steps, batches) = a.slow_since(b);
                (
                    Some((a.transactions - b.transactions) / secs),
                    a.step_means_since(b),
                    (steps, Some(batches)),
                )
            }
            _ => (None, BTreeMap::new(), (BTreeMap::new(), None)),
        };
    let cpu = LatencyCpu {
        service: Watched::spent(&before, &service.cpu(), messages, secs),
        bench_cores: (cpu_secs(std::process::id()) - bench) / secs,
        transactions_per_sec,
        commit_steps_ms,
        slow_steps,
        slow_batches,
        idle_cores,
        cores,
    };
    // Drain what is still in flight, whether or not sending failed.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let seen = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the latency reader panicked"))?;
    let (sent, landed) = sent?;
    let (timed, untimed) = event_latencies(&sent, &landed, &seen);
    Ok((timed, untimed, cpu))
}

/// How far ahead of its schedule the latency phase's sender gets before it sleeps: it sends in bursts of
/// at most this long's messages.
const PACING_TICK: Duration = Duration::from_millis(1);

/// One live event sent: its id, input topic and send time (its event time).
struct Sent {
    event_id: String,
    topic: String,
    at: i64,
}

/// A live event timed: its send time (Unix ms) and its latency (ms).
type Timed = (i64, f64);

/// Where live events landed: (partition, offset) by their index in the order sent.
type Places = HashMap<usize, (i32, i64)>;

/// The live events' [`Places`], set by each one's delivery report.
#[derive(Default)]
struct Landed(std::sync::Mutex<Places>);

impl rdkafka::ClientContext for Landed {}

impl rdkafka::producer::ProducerContext for Landed {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, index: Box<usize>) {
        if let (Ok(m), Ok(mut landed)) = (result, self.0.lock()) {
            landed.insert(*index, (m.partition(), m.offset()));
        }
    }
}

/// Each live event's latency: from its send time to the first update seen whose trigger is at or after it
/// in its input partition. That update's transaction, or one before it, committed the event's batch (a
/// batch commits its input offsets with its output, and batches commit in order), so every event is
/// timed, not only the one an update names (the last of its profile in its batch: timing only those
/// would favour large batches). An event whose own update names a later event of another partition is
/// timed by the next trigger in its own, a little late. Also: how many sent events no seen trigger
/// follows in their partition (untimed).
fn event_latencies(sent: &[Sent], landed: &Places, seen: &[(String, i64)]) -> (Vec<Timed>, usize) {
    let index: HashMap<&str, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, s)| (s.event_id.as_str(), i))
        .collect();
    let place = |i: usize| {
        landed
            .get(&i)
            .map(|(p, o)| ((sent[i].topic.as_str(), *p), *o))
    };
    // Per input partition: trigger offsets, each with the earliest time any trigger at or after it was
    // seen.
    let mut triggers: HashMap<(&str, i32), Vec<(i64, i64)>> = HashMap::new();
    for (id, at) in seen {
        if let Some((tp, offset)) = index.get(id.as_str()).and_then(|i| place(*i)) {
            triggers.entry(tp).or_default().push((offset, *at));
        }
    }
    for list in triggers.values_mut() {
        list.sort_unstable();
        let mut earliest = i64::MAX;
        for (_, at) in list.iter_mut().rev() {
            earliest = earliest.min(*at);
            *at = earliest;
        }
    }
    let mut latencies = Vec::with_capacity(sent.len());
    let mut untimed = 0;
    for (i, s) in sent.iter().enumerate() {
        let visible = place(i).and_then(|(tp, offset)| {
            let list = triggers.get(&tp)?;
            list.get(list.partition_point(|(o, _)| *o < offset))
                .map(|(_, at)| *at)
        });
        match visible {
            Some(at) => latencies.push((s.at, (at - s.at) as f64)),
            None => untimed += 1,
        }
    }
    (latencies, untimed)
}

/// The stretches of the latency phase, by send time, that [`tail_stretches`] counts.
const STRETCH_MS: i64 = 100;

/// The phase's stretches of [`STRETCH_MS`] (by send time) in which the events whose latency is at least
/// `p99` were sent, each by when it began, and how many stretches the phase had: a few means stalls (a
/// flush, a slow commit, a pause of the broker), most means that every batch waits about that long.
fn tail_stretches(timed: &[Timed], p99: f64) -> (Vec<i64>, usize) {
    let (Some(first), Some(last)) = (
        timed.iter().map(|(at, _)| *at).min(),
        timed.iter().map(|(at, _)| *at).max(),
    ) else {
        return (Vec::new(), 0);
    };
    let hit: BTreeSet<i64> = timed
        .iter()
        .filter(|(_, latency)| *latency >= p99)
        .map(|(at, _)| first + (at - first) / STRETCH_MS * STRETCH_MS)
        .collect();
    (
        hit.into_iter().collect(),
        ((last - first) / STRETCH_MS + 1) as usize,
    )
}

/// Sends `persons`' journeys at `rate` messages per second for at most `args.latency_secs`, each event
/// stamped with the time it is sent: the events sent, in order, and where each landed.
fn pace_events(
    args: &BenchArgs,
    rate: u64,
    topics: &Topics,
    persons: usize,
) -> anyhow::Result<(Vec<Sent>, Places)> {
    let j = journeys::generate(&JourneyConfig {
        persons,
        seed: args.seed.wrapping_add(1),
        ..Default::default()
    });
    // librdkafka's default linger, as a channel's producer would have it (1 ms made a produce request
    // per millisecond and a wake-up of its thread for each, on the machine being measured); an event
    // is stamped before it is sent, so its wait in the producer counts in its latency.
    let producer: ThreadedProducer<Landed> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create_with_context(Landed::default())?;
    let event_codec = AvroCodec::channel_event()?;
    let mut sent: Vec<Sent> = Vec::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.latency_secs);
    for m in &j.messages {
        if Instant::now() >= deadline {
            break;
        }
        let Generated::Event {
            channel,
            key,
            event,
        } = m
        else {
            continue;
        };
        let Some((topic, format)) = topics.routes.get(*channel) else {
            continue;
        };
        let mut event = event.clone();
        event.timestamp = now_millis();
        let bytes = match format {
            Format::Avro => event_codec.encode(1, &event)?,
            Format::Json => serde_json::to_vec(&event)?,
        };
        producer
            .send(
                BaseRecord::with_opaque_to(topic, Box::new(sent.len()))
                    .key(key.as_bytes())
                    .payload(&bytes),
            )
            .map_err(|(e, _)| e)?;
        sent.push(Sent {
            event_id: event.event_id,
            topic: topic.clone(),
            at: event.timestamp,
        });
        // Pace to the rate, sleeping only once a whole tick ahead: a sleep per message (60 µs apart at
        // 17,000 msg/s) cost the bench a wake-up each, a fifth of a core taken from the machine it measures.
        let due = started + Duration::from_secs_f64(sent.len() as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            if wait >= PACING_TICK {
                std::thread::sleep(wait);
            }
        }
    }
    producer.flush(Duration::from_secs(30))?;
    let landed = std::mem::take(
        &mut *producer
            .context()
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("a delivery report panicked"))?,
    );
    Ok((sent, landed))
}

/// (d) The Kafka Streams stitching of `benches/kstreams` (built in `build`) over the same input, exactly-once
/// v2, its rate measured from its group's committed offsets like the pipeline's.
/// Phase 6: a passthrough writing `streams` for each input message, measured as the others are.
fn measure_traffic(
    cfg: &Config,
    topics: &Topics,
    streams: Vec<Stream>,
    phase: (u64, i32, Duration),
    broker: Option<u32>,
    (pipeline_rate, passthrough_rate): (f64, f64),
) -> anyhow::Result<Traffic> {
    let records_per_message = streams.iter().map(|s| s.records + s.deletions).sum();
    let value_bytes_per_message = streams
        .iter()
        .map(|s| s.records * s.value_bytes as f64)
        .sum();
    let (rate, cpu) = measure_passthrough(
        cfg,
        topics,
        Writes::Like(Likeness::new(streams)),
        phase,
        ("traffic", broker),
    )?;
    Ok(Traffic {
        records_per_message,
        value_bytes_per_message,
        msgs_per_sec: rate,
        passthrough_ratio: rate / passthrough_rate,
        pipeline_share: pipeline_rate / rate,
        cpu,
    })
}

fn kstreams(
    args: &BenchArgs,
    build: &Path,
    run: &str,
    topics: &Topics,
    (messages, pipeline_rate, passthrough_rate): (u64, f64, f64),
    dir: &Path,
) -> anyhow::Result<Baseline> {
    let classes = build.join("target/classes");
    if !classes.is_dir() {
        bail!(
            "{} is not built: mvn -q -f {} package",
            build.display(),
            build.join("pom.xml").display()
        );
    }
    if args.partitions != 1 {
        eprintln!(
            "bench: Kafka Streams stitches within a partition; its components are per partition"
        );
    }
    let app = format!("{run}-kstreams");
    generate::create_topics(&args.brokers, std::slice::from_ref(&app), args.partitions)?;
    let schema = dir.join("channel_event.avsc");
    std::fs::write(&schema, crate::codec::CHANNEL_EVENT_AVSC)?;
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!(
            "{}:{}/*",
            classes.display(),
            build.join("target/libs").display()
        ))
        .arg(format!("-Djava.io.tmpdir={}", dir.display()))
        .arg("dev.stitcher.bench.KStitch")
        .args([&args.brokers, &app, &app])
        .arg(&schema)
        .args(&topics.inputs);
    let mut streams = Service::spawn(cmd, &dir.join("kstreams.log"))?;
    let progress = Progress::new(&args.brokers, &app, &topics.inputs, args.partitions)?;
    let watched = Watched {
        process: streams.child.id(),
        broker: args.broker_pid,
    };
    let (rate, cpu) = progress.measure(
        messages as i64,
        Duration::from_secs(args.timeout_secs),
        watched,
        || streams.check(),
    )?;
    let (peak_rss_mib, cpu_secs) = streams.usage();
    streams.stop()?;
    eprintln!("bench: Kafka Streams {rate:.0} msg/s; CPU per message: {cpu}");
    Ok(Baseline {
        msgs_per_sec: rate,
        pipeline_multiple: pipeline_rate / rate,
        passthrough_ratio: rate / passthrough_rate,
        cpu_secs,
        peak_rss_mib,
        cpu,
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let started = Instant::now();
    let run = format!(
        "bench-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    );
    let dir: PathBuf = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir)?;
    let (routes, inputs) = generate::channel_routes(&run);
    let topics = Topics {
        routes,
        passthrough: format!("{run}-passthrough"),
        output: format!("{run}-profiles"),
        dead_letters: format!("{run}-dlq"),
        inputs,
    };
    let mut all = topics.inputs.clone();
    all.push(topics.passthrough.clone());
    generate::create_topics(&args.brokers, &all, args.partitions)?;

    let j = journeys::generate(&JourneyConfig {
        persons: args.persons,
        seed: args.seed,
        duplicate_rate: 0.01,
        shuffle_window: 100,
        household_rate: args.households,
        ..Default::default()
    });
    let t = Instant::now();
    let messages = generate::send(&args.brokers, &topics.routes, &j, 0)?;
    eprintln!(
        "bench: wrote {messages} messages ({} events) to {} topics x {} partitions in {:.1?}",
        j.events,
        topics.inputs.len(),
        args.partitions,
        t.elapsed()
    );

    let mut cfg = bench_config(args, &run, &topics, &dir.join("state"));
    // A port known here, so that the latency phase can read the service's transaction count.
    cfg.http.listen = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?;
    let timeout = Duration::from_secs(args.timeout_secs);

    let phase = (messages, args.partitions, timeout);
    let copy = || Writes::Copy(topics.passthrough.clone());
    let warm_up = warm_up(&cfg, &topics, copy, phase, args)?;

    // (a) passthrough
    let (pass_before, pass_before_cpu) =
        measure_passthrough(&cfg, &topics, copy(), phase, ("1", args.broker_pid))?;

    // (b) pipeline
    let config_path = dir.join("stitcher.toml");
    std::fs::write(&config_path, toml::to_string(&cfg)?)?;
    let service_log = args
        .service_log
        .clone()
        .unwrap_or_else(|| dir.join("service.log"));
    let mut service = Service::start(&config_path, &service_log, &args.service_log_level)?;
    let progress = Progress::new(
        &args.brokers,
        &cfg.kafka.group_id,
        &topics.inputs,
        args.partitions,
    )?;
    let watched = Watched {
        process: service.child.id(),
        broker: args.broker_pid,
    };
    let (pipe_rate, pipe_cpu) =
        progress.measure(messages as i64, timeout, watched, || service.check())?;
    eprintln!("bench: pipeline {pipe_rate:.0} msg/s; CPU per message: service {pipe_cpu}");
    let changelog_topic = cfg.changelog_topic();
    let changelog = (0..cfg.scaleout.shards as i32)
        .map(|p| {
            crate::kafka::watermarks(&progress.consumer, &changelog_topic, p, timeout)
                .map(|(_, high)| high)
        })
        .sum::<Result<i64, _>>()?;
    let changelog_kinds = topic_kinds(&cfg, &changelog_topic, record_kind, timeout)?;
    // What the pipeline wrote per input message, read before the latency phase adds to its topics.
    let pipeline_writes = if args.traffic {
        // Set up as the pipeline's topics are (`kafka::ensure_topics`): the cleaner's work too.
        let topic = |what: &str| format!("{run}-traffic-{what}");
        let (output, identity, changelog) =
            (topic("output"), topic("identity"), topic("changelog"));
        generate::create_topics_with(
            &args.brokers,
            &[output.clone(), identity.clone()],
            cfg.output.partitions,
            &PROFILE_TOPIC_SETTINGS,
        )?;
        generate::create_topics_with(
            &args.brokers,
            std::slice::from_ref(&changelog),
            i32::try_from(cfg.scaleout.shards).unwrap_or(i32::MAX),
            &CHANGELOG_TOPIC_SETTINGS,
        )?;
        let written = topic_kinds(&cfg, &topics.output, |_| "output", timeout)?;
        let mut all = Stream::from_kinds(&output, &written, messages);
        let written = topic_kinds(&cfg, &cfg.output.identity_topic, |_| "identity", timeout)?;
        all.extend(Stream::from_kinds(&identity, &written, messages));
        all.extend(Stream::from_kinds(&changelog, &changelog_kinds, messages));
        Some(all)
    } else {
        None
    };
    let quality = quality::evaluate(
        &j.truth,
        &quality::mapping_from_topic(crate::kafka::base_config(&cfg), &topics.output, timeout)?,
    );

    // (c) latency at a fixed live rate: half of the pipeline's unless one is given
    let live_rate = args
        .latency_rate
        .unwrap_or((pipe_rate / 2.0).round() as u64)
        .max(1);
    let live_persons = (live_rate * args.latency_secs / 15).max(10) as usize;
    let (timed, untimed, latency_cpu) = measure_latency(
        args,
        live_rate,
        &topics,
        live_persons,
        (watched, cfg.http.listen),
    )?;
    service.check()?;
    let (rss, cpu) = service.usage();
    let status = service.stop()?;
    if !status.success() {
        bail!("the service exited with {status}");
    }
    let mut latencies: Vec<f64> = timed.iter().map(|(_, latency)| *latency).collect();
    latencies.sort_by(f64::total_cmp);
    if latencies.is_empty() {
        bail!("no profile update seen for {untimed} live events");
    }
    let p99 = percentile(&latencies, 0.99);
    // (d) passthrough again, the machine as the pipeline left it
    let (pass_after, pass_after_cpu) =
        measure_passthrough(&cfg, &topics, copy(), phase, ("2", args.broker_pid))?;
    let pass_rate = (pass_before + pass_after) / 2.0;
    // (e) the pipeline's traffic alone
    let traffic = match pipeline_writes {
        Some(streams) => Some(measure_traffic(
            &cfg,
            &topics,
            streams,
            phase,
            args.broker_pid,
            (pipe_rate, pass_rate),
        )?),
        None => None,
    };
    let report = BenchReport {
        warm_up,
        messages,
        events: j.events,
        partitions: args.partitions,
        passthrough_msgs_per_sec: pass_rate,
        passthrough_runs: [pass_before, pass_after],
        passthrough_cpu: [pass_before_cpu, pass_after_cpu],
        pipeline_msgs_per_sec: pipe_rate,
        pipeline_cpu: pipe_cpu,
        ratio: pipe_rate / pass_rate,
        latency_rate_msgs_per_sec: live_rate,
        latency_samples: latencies.len(),
        latency_untimed: untimed,
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: p99,
        latency_max_ms: percentile(&latencies, 1.0),
        latency_tail_stretches: tail_stretches(&timed, p99),
        latency_cpu,
        service_peak_rss_mib: rss,
        service_cpu_secs: cpu,
        changelog_offsets_per_message: changelog as f64 / messages as f64,
        changelog_kinds,
        traffic,
        kstreams: match &args.kstreams {
            Some(build) => Some(kstreams(
                args,
                build,
                &run,
                &topics,
                (messages, pipe_rate, pass_rate),
                &dir,
            )?),
            None => None,
        },
        total_secs: started.elapsed().as_secs_f64(),
        quality,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "end-to-end, {} messages ({} events) over {} partitions, exactly-once",
            self.messages, self.events, self.partitions
        )?;
        if let Some(w) = &self.warm_up {
            let jit: Vec<String> = w
                .rounds
                .iter()
                .filter_map(|r| r.1)
                .map(|jit| format!("{jit:.2}"))
                .collect();
            write!(
                f,
                "  warm-up (unmeasured): {} passthroughs in {:.0} s",
                w.rounds.len(),
                w.secs
            )?;
            if jit.is_empty() {
                writeln!(f)?;
            } else {
                writeln!(
                    f,
                    "; the broker's JIT compiler took {} of a core",
                    jit.join(", ")
                )?;
            }
        }
        let [before, after] = self.passthrough_runs;
        writeln!(
            f,
            "  passthrough (same bytes, same client settings, transactions): {:>9.0} msg/s (before the pipeline {before:.0}, after it {after:.0})",
            self.passthrough_msgs_per_sec
        )?;
        for (when, cpu) in ["before", "after"].iter().zip(&self.passthrough_cpu) {
            writeln!(f, "    CPU per message, {when}: client {cpu}")?;
        }
        writeln!(
            f,
            "  pipeline:                                                     {:>9.0} msg/s",
            self.pipeline_msgs_per_sec
        )?;
        writeln!(f, "    CPU per message: service {}", self.pipeline_cpu)?;
        writeln!(
            f,
            "  pipeline / passthrough: {:.2} ({:.2} and {:.2} against each)",
            self.ratio,
            self.pipeline_msgs_per_sec / before,
            self.pipeline_msgs_per_sec / after
        )?;
        writeln!(
            f,
            "  latency event time -> its batch's update visible, live at {} msg/s ({} events timed, {} not): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.latency_rate_msgs_per_sec,
            self.latency_samples,
            self.latency_untimed,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_max_ms
        )?;
        let (hit, stretches) = &self.latency_tail_stretches;
        writeln!(
            f,
            "    the slowest 1% sent in {} of the phase's {stretches} stretches of {STRETCH_MS} ms",
            hit.len()
        )?;
        writeln!(f, "    CPU per message while sending: {}", self.latency_cpu)?;
        writeln!(
            f,
            "  service peak RSS {:.0} MiB, CPU {:.1} s; whole run {:.0} s",
            self.service_peak_rss_mib, self.service_cpu_secs, self.total_secs
        )?;
        writeln!(
            f,
            "  state changelog after the throughput phase: {:.2} offsets (records and commit markers) per input message",
            self.changelog_offsets_per_message
        )?;
        let per_message = |n: u64| n as f64 / self.messages as f64;
        let kinds: Vec<String> = self
            .changelog_kinds
            .iter()
            .map(|k| {
                format!(
                    "{} {:.2} ({:.2}; {:.0} B)",
                    k.kind,
                    per_message(k.records),
                    per_message(k.deletions),
                    k.value_bytes as f64 / (k.records - k.deletions).max(1) as f64
                )
            })
            .collect();
        writeln!(
            f,
            "    its records per input message by kind, most bytes first (deletions among them; mean value): {}",
            kinds.join(", ")
        )?;
        if let Some(t) = &self.traffic {
            writeln!(
                f,
                "  the pipeline's traffic alone ({:.2} records, {:.0} B per message; no work): {:>9.0} msg/s; it / passthrough {:.2}; the pipeline reaches {:.2} of it",
                t.records_per_message,
                t.value_bytes_per_message,
                t.msgs_per_sec,
                t.passthrough_ratio,
                t.pipeline_share
            )?;
            writeln!(f, "    CPU per message: client {}", t.cpu)?;
        }
        if let Some(k) = &self.kstreams {
            writeln!(
                f,
                "  Kafka Streams baseline (exactly_once_v2, same input):          {:>9.0} msg/s; pipeline = {:.2}x; it / passthrough {:.2}; its CPU {:.1} s, peak RSS {:.0} MiB",
                k.msgs_per_sec, k.pipeline_multiple, k.passthrough_ratio, k.cpu_secs, k.peak_rss_mib
            )?;
            writeln!(f, "    CPU per message: Kafka Streams {}", k.cpu)?;
        }
        writeln!(f, "quality of the throughput run against its ground truth:")?;
        for line in self.quality.to_string().lines() {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelog_records_are_tallied_by_the_kind_byte_of_their_keys() {
        let key = |kind: u8, rest: &[u8]| [&7u32.to_be_bytes()[..], &[kind], rest].concat();
        let mut tally = KindTally::default();
        tally.add(record_kind(&key(b'P', &1u64.to_be_bytes())), Some(400));
        tally.add(record_kind(&key(b'P', &2u64.to_be_bytes())), None);
        tally.add(record_kind(&key(b't', b"email\0a@b.io")), Some(300));
        tally.add(record_kind(&key(b't', b"email\0c@d.io")), Some(200));
        tally.add(record_kind(&key(b'l', b"email\0a@b.io")), Some(90));
        tally.add(record_kind(b""), Some(3));
        let kinds = tally.into_kinds();
        let row = |kind, records, deletions, value_bytes| RecordKind {
            kind,
            records,
            deletions,
            value_bytes,
        };
        assert_eq!(
            kinds,
            vec![
                row("part", 2, 0, 500),
                row("profile", 2, 1, 400),
                row("links", 1, 0, 90),
                row("record", 1, 0, 3),
            ]
        );
    }

    #[test]
    fn the_traffic_phase_writes_each_kind_at_its_rate_and_mean_size() {
        let kind = |kind, records, deletions, value_bytes| RecordKind {
            kind,
            records,
            deletions,
            value_bytes,
        };
        let kinds = [kind("profile", 7, 3, 4_000), kind("part", 2, 0, 600)];
        let streams = Stream::from_kinds("t", &kinds, 4);
        let stream = |records, deletions, value_bytes| Stream {
            topic: "t".into(),
            records,
            deletions,
            value_bytes,
        };
        assert_eq!(
            streams,
            vec![stream(1.0, 0.75, 1_000), stream(0.5, 0.0, 300)]
        );
        let mut due = vec![(0.0, 0.0); streams.len()];
        let mut written = [(0, 0); 2];
        let mut most = 0;
        for _ in 0..400 {
            for ((w, s), carry) in written.iter_mut().zip(&streams).zip(&mut due) {
                let (values, tombstones) = s.due(carry);
                (w.0, w.1) = (w.0 + values, w.1 + tombstones);
                most = most.max(values + tombstones);
            }
        }
        assert_eq!(written, [(400, 300), (200, 0)]);
        // Spread over the messages, not bunched: at most one value and one tombstone of a kind each.
        assert_eq!(most, 2);
    }

    #[test]
    fn cpu_is_per_message_committed_and_per_second_of_the_window() {
        // 1.5 s of the process and 0.25 s of the broker (0.1 s of it compiling) for 50,000 messages over
        // 2 s.
        let reading =
            |process, commit, worker: Option<f64>, broker: Option<(f64, [(u32, f64); 2])>| {
                Reading {
                    process,
                    threads: [(7, ("commit".to_string(), commit))]
                        .into_iter()
                        .chain(worker.map(|w| (8, ("worker".to_string(), w))))
                        .collect(),
                    broker: broker.map(|(cpu, jit)| {
                        let jit = jit.map(|(tid, secs)| (tid, (JIT.to_string(), secs)));
                        (cpu, HashMap::from(jit))
                    }),
                }
            };
        // A worker thread born within the window counts from zero.
        let spent = Watched::spent(
            &reading(10.0, 3.0, None, Some((4.0, [(20, 1.0), (21, 0.5)]))),
            // Compiler thread 21 ended; 22 began and used 0.02 s.
            &reading(11.5, 3.2, Some(1.2), Some((4.25, [(20, 1.08), (22, 0.02)]))),
            50_000,
            2.0,
        );
        assert!((spent.process.us_per_message - 30.0).abs() < 1e-9);
        assert!((spent.process.cores - 0.75).abs() < 1e-9);
        let broker = spent.broker.expect("the broker was watched");
        assert!((broker.us_per_message - 5.0).abs() < 1e-9);
        assert!((broker.cores - 0.125).abs() < 1e-9);
        assert!((spent.broker_jit_cores.expect("watched") - 0.05).abs() < 1e-9);
        assert_eq!(
            spent.to_string(),
            "30.0 µs (0.75 of a core) [worker 0.60, commit 0.10]; broker 5.0 µs (0.12 of a core, of it \
             JIT compiling 0.05)"
        );
        // A warm broker's compiler, idle or nearly, is not mentioned.
        let warm = Watched::spent(
            &reading(10.0, 3.0, None, Some((4.0, [(20, 1.0), (21, 0.5)]))),
            &reading(11.5, 3.2, None, Some((4.25, [(20, 1.01), (21, 0.5)]))),
            50_000,
            2.0,
        );
        assert!(warm
            .to_string()
            .ends_with("; broker 5.0 µs (0.12 of a core)"));
        let alone = Watched::spent(
            &reading(1.0, 0.0, None, None),
            &reading(1.5, 0.0, None, None),
            10_000,
            1.0,
        );
        assert!(alone.broker.is_none());
        assert_eq!(alone.to_string(), "50.0 µs (0.50 of a core)");
    }

    #[test]
    fn this_process_cpu_is_read_from_proc() {
        // Spins until the kernel's count moves by 50 ms (a busy machine may give this thread little).
        let before = cpu_secs(std::process::id());
        let t = Instant::now();
        let mut x = 0u64;
        while cpu_secs(std::process::id()) - before < 0.05 && t.elapsed() < Duration::from_secs(20)
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let after = cpu_secs(std::process::id());
        assert!(after - before >= 0.05, "{before} -> {after}");
        // This test's own thread is among the process's threads, and spent some of it.
        let threads = thread_cpu(std::process::id());
        assert!(threads.values().any(|(_, secs)| *secs > 0.0), "{threads:?}");
    }

    #[test]
    fn threads_are_grouped_by_role() {
        assert_eq!(thread_kind("stitcher-commit"), "commit");
        assert_eq!(thread_kind("rdk:broker1"), "librdkafka");
        assert_eq!(thread_kind("rocksdb:high"), "rocksdb");
        assert_eq!(thread_kind("C2 CompilerThre"), "JIT compiler");
        assert_eq!(thread_kind("C1 CompilerThre"), "JIT compiler");
        assert_eq!(thread_kind("GC Thread#0"), "GC Thread#0");
    }

    /// The latency phase's reading of the service's metrics: the committed transactions, and each commit
    /// step's mean over the commits between two readings (a step with no commit in between is left out).
    #[test]
    fn commit_steps_are_averaged_over_the_commits_between_two_readings() {
        let before = ServiceCounters::parse(concat!(
            "# TYPE stitcher_transactions_total counter\n",
            "stitcher_transactions_total{result=\"aborted\"} 2\n",
            "stitcher_transactions_total{result=\"committed\"} 10\n",
            "stitcher_commit_step_seconds_bucket{step=\"offsets\",le=\"0.01\"} 3\n",
            "stitcher_commit_step_seconds_sum{step=\"offsets\"} 0.1\n",
            "stitcher_commit_step_seconds_count{step=\"offsets\"} 10\n",
            "stitcher_commit_step_seconds_sum{step=\"end\"} 0.02\n",
            "stitcher_commit_step_seconds_count{step=\"end\"} 10\n",
        ))
        .expect("parsed");
        let after = ServiceCounters::parse(concat!(
            "stitcher_transactions_total{result=\"committed\"} 14\n",
            "stitcher_commit_step_seconds_sum{step=\"offsets\"} 0.18\n",
            "stitcher_commit_step_seconds_count{step=\"offsets\"} 14\n",
            "stitcher_commit_step_seconds_sum{step=\"end\"} 0.02\n",
            "stitcher_commit_step_seconds_count{step=\"end\"} 10\n",
            "stitcher_commit_step_seconds_sum{step=\"produce\"} 0.008\n",
            "stitcher_commit_step_seconds_count{step=\"produce\"} 4\n",
        ))
        .expect("parsed");
        assert_eq!(after.transactions - before.transactions, 4.0);
        let means = after.step_means_since(&before);
        assert_eq!(means.len(), 2, "{means:?}");
        assert!((means["offsets"] - 20.0).abs() < 1e-9, "{means:?}");
        assert!((means["produce"] - 2.0).abs() < 1e-9, "{means:?}");
        assert!(
            ServiceCounters::parse("stitcher_up 1\n").is_none(),
            "no transactions counter"
        );
    }

    /// The slow spells are read from the service's own histograms: a bound that is not one of their
    /// buckets would count nothing (or everything) and fails here.
    #[test]
    fn slow_batches_and_commit_steps_are_counted_from_the_service_histograms() {
        let metrics = Metrics::new().expect("metrics");
        metrics.transactions.with_label_values(&["committed"]).inc();
        let before = ServiceCounters::parse(&metrics.render()).expect("parsed");
        for secs in [0.01, 0.2, 0.127, 0.5] {
            metrics.batch_duration.observe(secs);
        }
        for (step, secs) in [
            ("offsets", 0.15),
            ("offsets", 0.003),
            ("offsets", 0.2),
            ("end", 0.001),
            ("deliveries", 0.11),
        ] {
            metrics
                .commit_steps
                .with_label_values(&[step])
                .observe(secs);
        }
        let after = ServiceCounters::parse(&metrics.render()).expect("parsed");
        let (steps, batches) = after.slow_since(&before);
        assert_eq!(batches, 2, "0.2 s and 0.5 s");
        assert_eq!(
            steps.into_iter().collect::<Vec<_>>(),
            [("deliveries".to_string(), 1), ("offsets".to_string(), 2)]
        );
        let (steps, batches) = after.slow_since(&after);
        assert!(
            steps.is_empty() && batches == 0,
            "nothing between one reading and itself"
        );
    }

    #[test]
    fn every_event_is_timed_by_the_first_trigger_at_or_after_it_in_its_partition() {
        let sent: Vec<Sent> = [
            ("a", "web", 100),
            ("b", "web", 110),
            ("c", "pos", 120),
            ("d", "web", 130),
        ]
        .into_iter()
        .map(|(id, topic, at)| Sent {
            event_id: id.into(),
            topic: topic.into(),
            at,
        })
        .collect();
        // a, b and d in web's partition 0 at offsets 5, 6, 7; c in pos's partition 0 at offset 5.
        let landed = HashMap::from([(0, (0, 5)), (1, (0, 6)), (2, (0, 5)), (3, (0, 7))]);
        // b's update (naming a too) at 150; d's at 140, seen earlier though later in the partition;
        // c's trigger never seen. An unknown id is ignored.
        let seen = vec![
            ("d".to_string(), 140),
            ("b".to_string(), 150),
            ("x".to_string(), 1),
        ];
        let (timed, untimed) = event_latencies(&sent, &landed, &seen);
        let mut latencies: Vec<f64> = timed.iter().map(|(_, latency)| *latency).collect();
        latencies.sort_by(f64::total_cmp);
        // a: 140 - 100 (d's commit covers it too); b: 140 - 110; d: 140 - 130.
        assert_eq!(latencies, vec![10.0, 30.0, 40.0]);
        assert_eq!(untimed, 1);
        // An event whose delivery was not reported is untimed too.
        let (latencies, untimed) = event_latencies(&sent, &HashMap::new(), &seen);
        assert!(latencies.is_empty());
        assert_eq!(untimed, 4);
    }

    /// Warming up goes on while the broker compiles and there is time left; without the broker's pid,
    /// for all the time given.
    #[test]
    fn the_warm_up_ends_when_the_broker_stops_compiling_or_the_time_is_spent() {
        let (spent, budget) = (Duration::from_secs(10), Duration::from_secs(60));
        let jit = |shares: &[f64]| -> Vec<(f64, Option<f64>)> {
            shares.iter().map(|s| (1e5, Some(*s))).collect()
        };
        assert!(!warmed(&[], spent, budget), "at least one round");
        assert!(!warmed(&jit(&[0.40]), spent, budget));
        assert!(
            !warmed(&jit(&[0.40, 0.03]), spent, budget),
            "one quiet round"
        );
        assert!(!warmed(&jit(&[0.40, 0.03, 0.04]), spent, budget));
        assert!(warmed(&jit(&[0.40, 0.03, 0.04, 0.01]), spent, budget));
        assert!(!warmed(&jit(&[0.03, 0.04, 0.01, 0.20]), spent, budget));
        assert!(!warmed(&[(9e4, None); 4], spent, budget));
        assert!(warmed(&[(9e4, None)], budget, budget));
        assert!(warmed(&[(9e4, Some(0.40))], budget, budget));
    }

    /// The slowest events bunched in one stretch of the phase are a stall; spread over all of it, a
    /// steady wait.
    #[test]
    fn the_tail_says_whether_it_was_a_stall() {
        // An event a millisecond for a second, 10 ms each.
        let steady = |at: i64| (at, 10.0);
        let stall: Vec<(i64, f64)> = (0..1000)
            .map(|at| {
                if (300..310).contains(&at) {
                    (at, 250.0)
                } else {
                    steady(at)
                }
            })
            .collect();
        assert_eq!(tail_stretches(&stall, 250.0), (vec![300], 10));
        let spread: Vec<(i64, f64)> = (0..1000)
            .map(|at| {
                if at % 100 == 50 {
                    (at, 250.0)
                } else {
                    steady(at)
                }
            })
            .collect();
        let (hit, stretches) = tail_stretches(&spread, 250.0);
        assert_eq!((hit.len(), stretches), (10, 10));
        assert_eq!(tail_stretches(&[], 1.0), (vec![], 0));
    }
}
