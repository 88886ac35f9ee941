//! Kafka plumbing: client settings, the consumer context (lag, rebalances), the transactional committer,
//! dead letters and topic creation.

pub mod committer;
pub mod consumer;
pub mod dead_letters;
pub mod reader;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{Config, Guarantee};

pub use committer::{CommitError, Committer, Deadline};
pub use consumer::{StitchConsumer, StitchContext};

/// Settings shared by every client: brokers plus `kafka.common`.
pub fn base_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.common {
        c.set(k, v);
    }
    c
}

/// Consumer settings: manual offsets (they travel in our transactions), read_committed.
pub fn consumer_config(cfg: &Config) -> ClientConfig {
    let mut c = base_config(cfg);
    c.set("group.id", &cfg.kafka.group_id)
        // Static membership: a restarted instance takes its partitions back at once, no rebalance.
        .set(
            "group.instance.id",
            format!("{}-{}", cfg.kafka.transactional_id, cfg.kafka.instance_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .set("statistics.interval.ms", "5000")
        .set("fetch.wait.max.ms", "50");
    for (k, v) in &cfg.kafka.consumer {
        c.set(k, v);
    }
    c
}

/// Producer settings: idempotent always, transactional under exactly-once.
pub fn producer_config(cfg: &Config, instance: &str) -> ClientConfig {
    let mut c = base_config(cfg);
    c.set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set(
            "message.timeout.ms",
            cfg.processing.transaction_timeout.as_millis().to_string(),
        );
    if cfg.processing.guarantee == Guarantee::ExactlyOnce {
        c.set(
            "transactional.id",
            format!("{}-{}", cfg.kafka.transactional_id, instance),
        )
        .set(
            "transaction.timeout.ms",
            cfg.processing.transaction_timeout.as_millis().to_string(),
        );
    }
    for (k, v) in &cfg.kafka.producer {
        c.set(k, v);
    }
    c
}

/// Creates the output, dead-letter and control topics if missing (compacted output topic).
pub async fn ensure_topics(cfg: &Config) -> Result<(), rdkafka::error::KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base_config(cfg).create()?;
    let partitions = cfg.output.partitions.max(1);
    let output = NewTopic::new(&cfg.output.topic, partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("min.compaction.lag.ms", "60000");
    let dlq = NewTopic::new(&cfg.output.dead_letter_topic, 1, TopicReplication::Fixed(1));
    let mut topics = vec![output, dlq];
    if !cfg.control.topic.is_empty() {
        // One partition: commands apply in the order they were sent.
        topics.push(NewTopic::new(
            &cfg.control.topic,
            1,
            TopicReplication::Fixed(1),
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
