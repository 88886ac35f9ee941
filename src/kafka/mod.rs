//! Kafka plumbing: client settings, the consumer context (lag, rebalances), the transactional committer,
//! dead letters and topic creation.

pub mod call_thread;
pub mod committer;
pub mod consumer;
pub mod dead_letters;
pub mod reader;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub use committer::{CommitError, Committer, Deadline};
pub use consumer::{
    AssignmentWatch, FenceWatch, GroupPeers, StitchConsumer, StitchContext, TopicWatch,
};

/// Logs what librdkafka reports as client errors (the default context sends them to the `log` crate, which
/// this service does not read). Authentication and TLS failures are errors an operator must fix, so they are
/// logged as errors and say what to check; connection trouble is a warning (librdkafka retries).
pub fn log_client_error(error: &KafkaError, reason: &str) {
    let code = error.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::Authentication)
        | Some(RDKafkaErrorCode::SaslAuthenticationFailed) => {
            tracing::error!(
                %error,
                reason,
                "kafka authentication failed: check sasl.mechanism, sasl.username and sasl.password"
            )
        }
        Some(RDKafkaErrorCode::SSL) => tracing::error!(
            %error,
            reason,
            "kafka TLS handshake failed: check ssl.ca.location and the broker's certificate"
        ),
        _ => tracing::warn!(%error, reason, "kafka client error"),
    }
}

/// A client context that only logs client errors; for the admin client, the producers and the consumer that
/// only describes the group.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoggingContext;

impl ClientContext for LoggingContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for LoggingContext {}

impl ProducerContext for LoggingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Settings shared by every client: brokers plus `kafka.common`.
pub fn base_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.common {
        c.set(k, v);
    }
    c
}

/// The consumer's static member id in its group: the transactional id's prefix and the instance id.
pub fn group_instance_id(cfg: &Config) -> String {
    format!("{}-{}", cfg.kafka.transactional_id, cfg.kafka.instance_id)
}

/// Consumer settings: manual offsets (they travel in our transactions), read_committed.
pub fn consumer_config(cfg: &Config) -> ClientConfig {
    let mut c = base_config(cfg);
    c.set("group.id", &cfg.kafka.group_id)
        // Static membership: a restarted instance takes its partitions back at once, no rebalance.
        .set("group.instance.id", group_instance_id(cfg))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .set("statistics.interval.ms", "5000")
        // A topic created after start-up is subscribed within this time.
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("fetch.wait.max.ms", "50");
    if cfg.scaleout.enabled() {
        // The group's description tells every instance where the others' lookup API is.
        c.set(
            "client.id",
            crate::scaleout::routing::client_id(&cfg.http.advertised()),
        )
        // Shards deal out in turn, not in ranges: a tied merge goes to the lower shard (docs/DESIGN.md,
        // "Where the work lands"), so low shards change more, and a range would give the first instance
        // all of them.
        .set("partition.assignment.strategy", "roundrobin");
    }
    for (k, v) in &cfg.kafka.consumer {
        c.set(k, v);
    }
    c
}

/// A client that reads a consumer group's committed offsets (its progress) without joining the group and
/// without waiting for stable offsets. A read_committed client (librdkafka's default) asks for stable
/// offsets (KIP-447), which the broker gives only while none of the group's transactions is open: a reading
/// then waits for a gap between the service's transactions, and back-to-back transactions have none (a
/// fast run's progress was first seen at its end). The offsets read are still only those of committed
/// transactions.
pub fn progress_reader(brokers: &str, group: &str) -> Result<BaseConsumer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("isolation.level", "read_uncommitted")
        .create()
}

/// The sum of the committed offsets of the partitions in `tpl` (a partition never committed counts 0).
pub fn committed_sum(
    reader: &BaseConsumer,
    tpl: TopicPartitionList,
    timeout: Duration,
) -> Result<i64, KafkaError> {
    Ok(reader
        .committed_offsets(tpl, timeout)?
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .sum())
}

/// Waits until every record produced so far is acknowledged or has failed.
///
/// rust-rdkafka's `flush`, which its `commit_transaction` calls first, serves the delivery queue from the
/// calling thread in steps of 100 ms. With a `ThreadedProducer`, whose own thread takes the delivery
/// reports, every step taken with a record still in flight sleeps its whole 100 ms: measured, 107 ms of a
/// 110 ms commit (docs/BENCHMARKS.md, "Where a commit's time went"). Waiting here in short steps leaves
/// `flush` nothing to wait for.
pub fn await_deliveries<C: ProducerContext + 'static>(
    producer: &ThreadedProducer<C>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(Duration::from_micros(250));
    }
    Ok(())
}

/// The low and high watermarks of a partition. A partition whose leader is moving or not yet elected (a topic
/// just created, a broker restarting) answers NOT_LEADER_FOR_PARTITION or LEADER_NOT_AVAILABLE for a
/// moment: asked again every 100 ms until `timeout`, not passed up as a failure of the service.
pub fn watermarks<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.fetch_watermarks(topic, partition, left.max(Duration::from_millis(100))) {
            Err(e)
                if leader_moving(&e) && Instant::now() + Duration::from_millis(100) < deadline =>
            {
                tracing::debug!(topic, partition, error = %e, "partition leader moving; asking again");
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

/// Whether a request failed only because the partition's leadership is changing (asking again will do).
fn leader_moving(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::NotLeaderForPartition | RDKafkaErrorCode::LeaderNotAvailable)
    )
}

/// Producer settings: idempotent always, transactional under exactly-once.
pub fn producer_config(cfg: &Config, instance: &str) -> ClientConfig {
    let mut c = base_config(cfg);
    c.set("enable.idempotence", "true")
        // A batch's records are produced in one burst when it commits, and the commit then waits for
        // every one of them: lingering would only hold back the last of them (docs/BENCHMARKS.md, "A
        // commit's records sent at once").
        .set("linger.ms", "0")
        // A transaction begun right after the one before is often told CONCURRENT_TRANSACTIONS while the
        // coordinator writes the markers, and retried after this; repeated answers back off no further
        // than the maximum, not up to librdkafka's 1 s (docs/DESIGN.md, "Overlapped commits").
        .set("retry.backoff.ms", "10")
        .set("retry.backoff.max.ms", RETRY_BACKOFF_MAX_MS.to_string())
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            cfg.processing.transaction_timeout.as_millis().to_string(),
        )
        // Room for the largest record plus a request's framing.
        .set(
            "message.max.bytes",
            (cfg.output.max_record_bytes.max(1_000_000) + 64 * 1024).to_string(),
        );
    c.set(
        "transactional.id",
        format!("{}-{}", cfg.kafka.transactional_id, instance),
    )
    .set(
        "transaction.timeout.ms",
        cfg.processing.transaction_timeout.as_millis().to_string(),
    );
    for (k, v) in &cfg.kafka.producer {
        c.set(k, v);
    }
    // A longer `retry.backoff.ms` set in `[kafka.producer]` keeps its meaning: librdkafka would only warn
    // and back off a fixed maximum instead.
    if !cfg.kafka.producer.contains_key("retry.backoff.max.ms") {
        if let Some(ms) = cfg
            .kafka
            .producer
            .get("retry.backoff.ms")
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms > RETRY_BACKOFF_MAX_MS)
        {
            c.set("retry.backoff.max.ms", ms.to_string());
        }
    }
    c
}

/// The producer's longest wait before a request is retried (librdkafka's default is 1 s).
const RETRY_BACKOFF_MAX_MS: u64 = 40;

/// How long the start-up's connection check waits for an answer before the attempt fails (and is logged).
const CONNECTION_CHECK: Duration = Duration::from_secs(10);
/// How long one ask of the connection check waits before a stop is looked for.
const CONNECTION_TURN: Duration = Duration::from_secs(1);

/// Fetches cluster metadata: proves the brokers are reachable with these credentials, waiting up to
/// [`CONNECTION_CHECK`] for an answer, less after `stop`. librdkafka's own error events (an authentication
/// or TLS failure, say) are logged through [`LoggingContext`] on the way.
pub fn check_connection(cfg: &Config, stop: &CancellationToken) -> Result<(), KafkaError> {
    use rdkafka::producer::{BaseProducer, Producer};
    let producer: BaseProducer<LoggingContext> =
        base_config(cfg).create_with_context(LoggingContext)?;
    // Asked in turns, so that a stop is seen within one; the client goes on connecting between them.
    let until = Instant::now() + CONNECTION_CHECK;
    let result = loop {
        let turn = Instant::now();
        let result = producer
            .client()
            .fetch_metadata(None, CONNECTION_TURN)
            .map(|_| ());
        if result.is_ok() || stop.is_cancelled() || Instant::now() >= until {
            break result;
        }
        // A turn that failed at once is waited out, not asked again at once.
        std::thread::sleep(CONNECTION_TURN.saturating_sub(turn.elapsed()));
        if stop.is_cancelled() {
            break result;
        }
    };
    // Error events are delivered to the context when the client is polled.
    producer.poll(Duration::from_millis(200));
    result
}

/// [`check_connection`] for a command-line tool, off the async runtime's threads: brokers that do not
/// answer fail the command within the check (librdkafka would keep a record for its `message.timeout.ms`,
/// five minutes, while the operator waits), with an error that names them.
pub async fn ensure_reachable(cfg: &Config) -> anyhow::Result<()> {
    let probe = cfg.clone();
    tokio::task::spawn_blocking(move || check_connection(&probe, &CancellationToken::new()))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot reach the brokers at {}: {e}", cfg.kafka.brokers))
}

/// The settings of the profile and identity topics: compacted, the last record of every key kept, and a
/// record kept at least a minute before the cleaner may drop it.
pub const PROFILE_TOPIC_SETTINGS: [(&str, &str); 2] = [
    ("cleanup.policy", "compact"),
    ("min.compaction.lag.ms", "60000"),
];

/// The settings of the state changelog: compacted, the latest value of every state key is all a restore
/// needs.
pub const CHANGELOG_TOPIC_SETTINGS: [(&str, &str); 1] = [("cleanup.policy", "compact")];

/// `topic` with `settings`.
pub fn with_settings<'a>(topic: NewTopic<'a>, settings: &[(&'a str, &'a str)]) -> NewTopic<'a> {
    settings.iter().fold(topic, |topic, (k, v)| topic.set(k, v))
}

/// Creates the output, dead-letter and control topics if missing (compacted output topic), and in scale-out
/// mode the internal topic and its compacted changelog, one partition per shard.
pub async fn ensure_topics(cfg: &Config) -> Result<(), rdkafka::error::KafkaError> {
    let admin: AdminClient<LoggingContext> =
        base_config(cfg).create_with_context(LoggingContext)?;
    let partitions = cfg.output.partitions.max(1);
    let output = with_settings(
        NewTopic::new(&cfg.output.topic, partitions, TopicReplication::Fixed(1)),
        &PROFILE_TOPIC_SETTINGS,
    );
    let dlq = NewTopic::new(&cfg.output.dead_letter_topic, 1, TopicReplication::Fixed(1));
    let mut topics = vec![output, dlq];
    if cfg.breaker.enabled() {
        topics.push(NewTopic::new(
            &cfg.breaker.quarantine_topic,
            partitions,
            TopicReplication::Fixed(1),
        ));
    }
    if !cfg.output.identity_topic.is_empty() {
        // Compacted: the last record of every profile id is what rebuilding the mapping needs.
        topics.push(with_settings(
            NewTopic::new(
                &cfg.output.identity_topic,
                partitions,
                TopicReplication::Fixed(1),
            ),
            &PROFILE_TOPIC_SETTINGS,
        ));
    }
    if !cfg.control.topic.is_empty() {
        // One partition: commands apply in the order they were sent.
        topics.push(NewTopic::new(
            &cfg.control.topic,
            1,
            TopicReplication::Fixed(1),
        ));
    }
    let (shard_topic, changelog) = (cfg.shard_topic(), cfg.changelog_topic());
    if cfg.scaleout.enabled() {
        let shards = i32::try_from(cfg.scaleout.shards).unwrap_or(i32::MAX);
        topics.push(NewTopic::new(
            &shard_topic,
            shards,
            TopicReplication::Fixed(1),
        ));
        topics.push(with_settings(
            NewTopic::new(&changelog, shards, TopicReplication::Fixed(1)),
            &CHANGELOG_TOPIC_SETTINGS,
        ));
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(rdkafka::error::KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "cannot create topic");
                })
            }
        }
    }
    Ok(())
}

/// The largest record the output and dead-letter topics accept: their effective `max.message.bytes`
/// (the broker's `message.max.bytes` unless the topic overrides it). `None` for a topic that does not
/// exist or whose configuration cannot be read.
pub async fn topic_record_limit(cfg: &Config) -> Result<Option<usize>, KafkaError> {
    let topics = [
        cfg.output.topic.as_str(),
        cfg.output.dead_letter_topic.as_str(),
    ];
    Ok(topic_settings(cfg, &topics, "max.message.bytes")
        .await?
        .iter()
        .filter_map(|v| v.parse::<usize>().ok())
        .min())
}

/// How many partitions `topic` has; `None` if it does not exist (or has none the metadata shows).
pub fn partition_count<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, KafkaError> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(match md.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Some(t.partitions().len()),
        _ => None,
    })
}

/// The effective value of the topic setting `name` of each of `topics` that exists and whose
/// configuration can be read.
pub async fn topic_settings(
    cfg: &Config,
    topics: &[&str],
    name: &str,
) -> Result<Vec<String>, KafkaError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<LoggingContext> =
        base_config(cfg).create_with_context(LoggingContext)?;
    let resources: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    Ok(admin
        .describe_configs(&resources, &opts)
        .await?
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|r| r.get(name)?.value.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    const NOT_LEADER: RDKafkaRespErr = RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION;

    /// Shards are dealt in turn by default (docs/DESIGN.md, "Where the work lands"); a `[kafka.consumer]`
    /// setting, like every consumer setting there, has the last word.
    #[test]
    fn the_group_deals_partitions_in_turn_unless_the_operator_says_otherwise() {
        let strategy = |cfg: &Config| {
            consumer_config(cfg)
                .get("partition.assignment.strategy")
                .map(str::to_string)
        };
        let mut cfg = Config::default();
        assert_eq!(strategy(&cfg).as_deref(), Some("roundrobin"));
        cfg.kafka.consumer.insert(
            "partition.assignment.strategy".into(),
            "cooperative-sticky".into(),
        );
        assert_eq!(strategy(&cfg).as_deref(), Some("cooperative-sticky"));
    }

    /// The producer's retries back off at most 40 ms, unless `[kafka.producer]` says otherwise: its own
    /// maximum, or a longer first backoff, which then is the maximum too.
    #[test]
    fn retries_back_off_at_most_40_ms_unless_the_operator_says_otherwise() {
        let backoff = |cfg: &Config| {
            let c = producer_config(cfg, "test");
            let get = |k: &str| c.get(k).map(str::to_string);
            (get("retry.backoff.ms"), get("retry.backoff.max.ms"))
        };
        let some = |ms: &str| Some(ms.to_string());
        let mut cfg = Config::default();
        assert_eq!(backoff(&cfg), (some("10"), some("40")));
        cfg.kafka
            .producer
            .insert("retry.backoff.ms".into(), "20".into());
        assert_eq!(backoff(&cfg), (some("20"), some("40")));
        cfg.kafka
            .producer
            .insert("retry.backoff.ms".into(), "200".into());
        assert_eq!(backoff(&cfg), (some("200"), some("200")));
        cfg.kafka
            .producer
            .insert("retry.backoff.max.ms".into(), "5000".into());
        assert_eq!(backoff(&cfg), (some("200"), some("5000")));
    }

    #[test]
    fn watermarks_are_asked_again_while_the_leader_moves_and_not_for_ever() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("moving", 1, 1).expect("topic");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .expect("consumer");
        cluster.request_errors(RDKafkaApiKey::ListOffsets, &[NOT_LEADER; 3]);
        let got = watermarks(&consumer, "moving", 0, Duration::from_secs(10));
        assert_eq!(got.expect("answered once the leader settled"), (0, 0));

        cluster.request_errors(RDKafkaApiKey::ListOffsets, &[NOT_LEADER; 500]);
        let e = watermarks(&consumer, "moving", 0, Duration::from_millis(600))
            .expect_err("a leader that never settles is an error at the timeout");
        assert!(leader_moving(&e), "{e}");
    }
}
