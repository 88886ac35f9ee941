//! The consumer and its context: rebalance logging and consumer lag from librdkafka statistics.

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::metrics::Metrics;

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
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(|p| p.consumer_lag)
                .sum();
            self.metrics
                .consumer_lag
                .with_label_values(&[topic])
                .set(lag);
        }
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
