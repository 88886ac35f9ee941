//! Command line: `run`, `demo`, `generate`, `inspect`, `export`, `erase`, `unlink`, `bench`, `quality`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "stitcher",
    version,
    about = "Omnichannel identity stitching on Apache Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: consume channel topics, stitch, produce profile updates.
    Run(RunArgs),
    /// A self-contained demo on librdkafka's in-process mock cluster: no broker needed.
    Demo(DemoArgs),
    /// Produce synthetic omnichannel journeys with a known ground truth to the channel topics.
    Generate(GenerateArgs),
    /// Show a profile, its identifiers and their links, by profile id or by any identifier.
    Inspect(InspectArgs),
    /// Export the identifier -> profile mapping of a state directory as JSON lines.
    Export(ExportArgs),
    /// Erase an identifier or a whole profile (right to be forgotten): sends the command to the control
    /// topic; the running service applies it exactly once and produces the tombstones and splits.
    Erase(EraseArgs),
    /// Remove the link between two identifiers of one profile; the profile splits if nothing else holds
    /// it together. Sent to the control topic like `erase`.
    Unlink(UnlinkArgs),
    /// Close the merge-storm breaker on every instance, then produce the events it held back to their input
    /// topics again (--replay) or drop them (--discard).
    Release(ReleaseArgs),
    /// Lift the suppression of an identifier erased with --suppress (the person consents again): later
    /// events carrying it link it as before.
    Unsuppress(UnsuppressArgs),
    /// End-to-end benchmark against a real broker: passthrough rate vs pipeline rate, latency, memory.
    Bench(BenchArgs),
    /// Stitching quality against a ground-truth file: pairwise precision, recall, F1, over/under-merges.
    Quality(QualityArgs),
    /// Replay the retained input topics under candidate rules into a temporary state (the live group,
    /// state and topics are only read) and report how the profiles would differ from the live ones.
    Backtest(BacktestArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML configuration file (see README.md, "Configuration").
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides kafka.brokers).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Consumer group (overrides kafka.group_id).
    #[arg(long)]
    pub group_id: Option<String>,
    /// RocksDB state directory (overrides state.dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz, /readyz and lookups (overrides http.listen).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Persons in the generated stream.
    #[arg(long, default_value_t = 2000)]
    pub persons: usize,
    /// Seed of the generated stream.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Where /metrics is served while the demo runs.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub http_listen: SocketAddr,
    /// Keep serving /metrics and lookups after the summary, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Avro,
    Json,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Configuration whose [[inputs]] name the channel topics and formats.
    #[command(flatten)]
    pub config: ConfigArgs,
    #[arg(long, default_value_t = 1000)]
    pub persons: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of events sent twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Share of messages that are garbage (dead-letter material).
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Shuffle events within windows of this many (out-of-order delivery).
    #[arg(long, default_value_t = 0)]
    pub shuffle_window: usize,
    /// Share of persons sharing a home phone with the previous person (households).
    #[arg(long, default_value_t = 0.0)]
    pub households: f64,
    /// Channel mix: only these channels emit events (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Adversarial: this many persons also log in on one shared device (it must not glue them).
    #[arg(long, default_value_t = 0)]
    pub shared_device_persons: usize,
    /// Adversarial: share of events that also carry a junk identifier (test@test.com, undefined, ...).
    #[arg(long, default_value_t = 0.0)]
    pub junk_rate: f64,
    /// Messages per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Event times start now instead of at a fixed date (for latency measurements).
    #[arg(long)]
    pub now: bool,
    /// Write the ground truth here (JSON lines).
    #[arg(long)]
    pub truth: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// State directory of a stopped instance (RocksDB allows one process at a time).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Profile id (p-...).
    #[arg(long, conflicts_with = "identifier")]
    pub profile: Option<String>,
    /// Identifier as type:value (email:alice@example.com).
    #[arg(long)]
    pub identifier: Option<String>,
    /// Configuration: the normalisation rules of --identifier, and `[enrichment]`.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EraseArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Identifier as type:value (email:alice@example.com); normalised like event identifiers.
    #[arg(long, required_unless_present = "profile", conflicts_with = "profile")]
    pub identifier: Option<String>,
    /// Profile id (p-...), current or merged away.
    #[arg(long)]
    pub profile: Option<String>,
    /// With --identifier: also keep a salted hash of it (`STITCHER_SUPPRESSION_SALT` on the service) so
    /// that later events carrying it are stripped of it, until `stitcher unsuppress`.
    #[arg(long, requires = "identifier")]
    pub suppress: bool,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Produce the quarantined events to their input topics again, once the cause is fixed...
    #[arg(long, conflicts_with = "discard", required_unless_present = "discard")]
    pub replay: bool,
    /// ...or drop them.
    #[arg(long)]
    pub discard: bool,
    /// How long to wait for the service to take the release command before replaying.
    #[arg(long, default_value_t = 120)]
    pub wait_secs: u64,
}

#[derive(Debug, Args)]
pub struct UnsuppressArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Identifier as type:value, as it was erased with --suppress.
    #[arg(long)]
    pub identifier: String,
}

#[derive(Debug, Args)]
pub struct UnlinkArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// One identifier as type:value.
    #[arg(long)]
    pub a: String,
    /// The other identifier as type:value.
    #[arg(long)]
    pub b: String,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Persons generated for the throughput runs (about 16 events each).
    #[arg(long, default_value_t = 12_000)]
    pub persons: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Partitions of every input topic.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Messages per batch (one transaction) for both the passthrough and the pipeline; the service's
    /// default (`processing.batch_max_events`) if not given.
    #[arg(long)]
    pub batch_max_events: Option<usize>,
    /// Longest wait for a batch to fill (ms), for both the passthrough and the pipeline; the service's
    /// default (`processing.batch_linger`) if not given.
    #[arg(long)]
    pub batch_linger_ms: Option<u64>,
    /// Shortest a pipeline batch stays open (ms) unless it fills; the service's default
    /// (`processing.batch_min_duration`) if not given.
    #[arg(long)]
    pub batch_min_ms: Option<u64>,
    /// Shards of the pipeline's graph (one instance holds them all).
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// A librdkafka producer setting (`key=value`, repeatable) for both the passthrough and the pipeline,
    /// as `[kafka.producer]` sets it for the service.
    #[arg(long = "producer", value_name = "KEY=VALUE", value_parser = key_value)]
    pub producer: Vec<(String, String)>,
    /// A librdkafka consumer setting (`key=value`, repeatable) for both, as `[kafka.consumer]`.
    #[arg(long = "consumer", value_name = "KEY=VALUE", value_parser = key_value)]
    pub consumer: Vec<(String, String)>,
    /// Share of persons sharing a home phone with another (over-merges the quality report shows).
    #[arg(long, default_value_t = 0.02)]
    pub households: f64,
    /// Messages per second produced during the latency phase; by default half of the pipeline's rate
    /// measured in the same run (where the latency target is set).
    #[arg(long)]
    pub latency_rate: Option<u64>,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 20)]
    pub latency_secs: u64,
    /// Give up a phase after this long.
    #[arg(long, default_value_t = 240)]
    pub timeout_secs: u64,
    /// Also write the figures here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also run the Kafka Streams baseline built in this directory (`benches/kstreams`, built with
    /// `mvn -f benches/kstreams/pom.xml package`) on the same input, after the pipeline. It stitches per
    /// partition: compare with `--partitions 1`. Its JVM compiles for its first seconds (the report shows
    /// the compiler threads' share): compare on `--persons 48000` or more.
    #[arg(long)]
    pub kstreams: Option<PathBuf>,
    /// Keep the service's log in this file (otherwise it goes with the run's directory). With
    /// `--service-log-level warn,librdkafka=debug --producer debug=eos` it holds librdkafka's
    /// account of each transaction's requests and their retries.
    #[arg(long, value_name = "FILE")]
    pub service_log: Option<PathBuf>,
    /// The service's `STITCHER_LOG` (an `EnvFilter`).
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    pub service_log_level: String,
    /// Also measure the pipeline's own Kafka traffic without its work, after the second passthrough: the
    /// passthrough's loop writing, for each input message, the output, identity and changelog records the
    /// pipeline wrote (their rates and mean sizes, counted after the pipeline's phase), to topics set up
    /// as the pipeline's are. The rate a pipeline writing that much could reach on this broker.
    #[arg(long)]
    pub traffic: bool,
    /// The process id of the broker, when it runs on this machine (deploy/local-kafka's: `pgrep -f
    /// kafka.Kafka`): its CPU per message is reported for every phase too, which says whether a phase was
    /// bound by the broker, by its client or by neither (waiting on commits).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Before the first measured phase, run unmeasured passthroughs for up to this many seconds, so that
    /// a broker started shortly before is not measured while its JVM compiles itself (a fifth to a half of
    /// a core for minutes). With `--broker-pid` they stop once they find the broker's JIT
    /// compiler under 0.05 of a core three times in a row. 0: none.
    #[arg(long, default_value_t = 0)]
    pub warm_up_secs: u64,
}

#[derive(Debug, Args)]
pub struct BacktestArgs {
    /// The candidate configuration: the live one (same brokers, inputs, control and output topics) with
    /// the rules to try. `output.topic` is read as the live profiles.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Replay from the first record at or after this time (ms since the epoch, Kafka timestamps) instead
    /// of from the beginning of the retained topics.
    #[arg(long)]
    pub from_ms: Option<i64>,
    /// Stop each partition at its first record after this time (ms since the epoch, Kafka timestamps).
    #[arg(long)]
    pub until_ms: Option<i64>,
    /// Examples kept per kind of difference.
    #[arg(long, default_value_t = 10)]
    pub sample: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct QualityArgs {
    /// Ground truth written by `generate --truth`.
    #[arg(long)]
    pub truth: PathBuf,
    /// Read the mapping from a stopped instance's state directory...
    #[arg(long, conflicts_with = "topic")]
    pub state_dir: Option<PathBuf>,
    /// ...or from the compacted, read_committed view of this profile topic.
    #[arg(long, requires = "brokers")]
    pub topic: Option<String>,
    #[arg(long)]
    pub brokers: Option<String>,
}

/// A `key=value` argument.
fn key_value(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected KEY=VALUE, got {arg:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_takes_client_settings_as_key_value() {
        let cli = Cli::try_parse_from([
            "stitcher",
            "bench",
            "--producer",
            "compression.type=zstd",
            "--producer",
            "linger.ms = 5",
            "--consumer",
            "fetch.min.bytes=1",
        ])
        .expect("parses");
        let Command::Bench(args) = cli.command else {
            panic!("not bench: {:?}", cli.command);
        };
        assert_eq!(
            args.producer,
            [
                ("compression.type".to_string(), "zstd".to_string()),
                ("linger.ms".to_string(), "5".to_string())
            ]
        );
        assert_eq!(args.consumer, [("fetch.min.bytes".into(), "1".into())]);
        assert!(Cli::try_parse_from(["stitcher", "bench", "--producer", "linger.ms"]).is_err());
        assert!(Cli::try_parse_from(["stitcher", "bench", "--producer", "=5"]).is_err());
    }
}
