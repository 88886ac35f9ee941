//! The consumer and its context: rebalance logging and consumer lag from librdkafka statistics.

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;

use crate::metrics::{Health, Metrics};

pub type StitchConsumer = BaseConsumer<StitchContext>;

pub struct StitchContext {
    metrics: Metrics,
    /// Set when partitions were assigned; the pipeline takes it to re-check its assignment.
    assigned: std::sync::atomic::AtomicBool,
    /// Assignments and revocations so far: a batch built across a change is not committed in scale-out mode.
    rebalances: std::sync::atomic::AtomicU64,
}

impl StitchContext {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            assigned: std::sync::atomic::AtomicBool::new(false),
            rebalances: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times partitions were assigned or revoked.
    pub fn rebalances(&self) -> u64 {
        self.rebalances.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether partitions were assigned since the last call.
    pub fn take_assigned(&self) -> bool {
        self.assigned
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

impl ClientContext for StitchContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::log_client_error(&error, reason);
    }

    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            let lag: i64 = t
                .partitions
                .values()
                .filter(|p| p.partition >= 0 && p.desired)
                .map(partition_lag)
                .sum();
            self.metrics
                .consumer_lag
                .with_label_values(&[topic])
                .set(lag);
        }
        if !stats.brokers.is_empty() {
            let up = stats.brokers.values().any(|b| b.state == "UP");
            self.metrics.health.brokers_up(up);
        }
    }
}

/// Messages behind the end of one partition, as a `read_committed` consumer sees it: from the position of
/// the application (the next message it will be given) to the last stable offset. librdkafka's own
/// `consumer_lag` counts from the offset this consumer committed, which never moves here (offsets are
/// committed by the transactional producer), so it would stay at its value of the last restart.
fn partition_lag(p: &rdkafka::statistics::Partition) -> i64 {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    let at = if p.app_offset >= 0 {
        p.app_offset
    } else {
        p.committed_offset
    };
    if end < 0 || at < 0 {
        0
    } else {
        (end - at).max(0)
    }
}

impl ConsumerContext for StitchContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Watches the subscribed topics in the cluster's metadata: how many partitions they have, and which are
/// missing (reported to [`Health`], so the instance is not ready while a configured topic does not exist,
/// and logged by name).
pub struct TopicWatch {
    topics: Vec<String>,
    /// Partitions of the existing topics, and when that was read.
    last: Option<(usize, Instant)>,
    missing: Vec<String>,
}

/// How old the metadata may be while every topic exists; while one is missing it is read this often.
const TOPICS_FRESH: Duration = Duration::from_secs(60);
const TOPICS_FRESH_MISSING: Duration = Duration::from_secs(5);

impl TopicWatch {
    pub fn new(topics: Vec<String>) -> Self {
        Self {
            topics,
            last: None,
            missing: Vec::new(),
        }
    }

    /// Partitions of the subscribed topics that exist, from recent metadata; `None` if the metadata cannot
    /// be read now.
    pub fn partitions(&mut self, consumer: &StitchConsumer, health: &Health) -> Option<usize> {
        let fresh = if self.missing.is_empty() {
            TOPICS_FRESH
        } else {
            TOPICS_FRESH_MISSING
        };
        if let Some((n, at)) = self.last {
            if at.elapsed() < fresh {
                return Some(n);
            }
        }
        let mut total = 0;
        let mut missing = Vec::new();
        for topic in &self.topics {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()?;
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    total += t.partitions().len()
                }
                _ => missing.push(topic.clone()),
            }
        }
        if missing != self.missing {
            if missing.is_empty() {
                tracing::info!("every subscribed topic exists");
            } else {
                tracing::error!(
                    topics = missing.join(", ").as_str(),
                    "subscribed topics do not exist: create them (the service does not create input \
                     topics); not ready until they exist"
                );
            }
            health.set_missing_topics(missing.clone());
            self.missing = missing;
        }
        self.last = Some((total, Instant::now()));
        Some(total)
    }
}

/// Whether the consumer group has other members than this one (`None` if the coordinator cannot tell now).
pub fn group_has_others(consumer: &StitchConsumer, group: &str) -> Option<bool> {
    let list = consumer
        .fetch_group_list(Some(group), Duration::from_secs(5))
        .ok()?;
    let members = list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map_or(0, |g| g.members().len());
    Some(members > 1)
}
