//! The consumer and its context: rebalance logging and consumer lag from librdkafka statistics.

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
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
    /// Whether the group's rebalance protocol is cooperative, asked once of a live group (see
    /// [`StitchContext::rebalance`]).
    cooperative: std::sync::OnceLock<bool>,
}

impl StitchContext {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            assigned: std::sync::atomic::AtomicBool::new(false),
            rebalances: std::sync::atomic::AtomicU64::new(0),
            cooperative: std::sync::OnceLock::new(),
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
    /// rust-rdkafka's own handler, but for two calls that can hang the consumer's close for good
    /// (librdkafka#4041, seen here when an instance left while another joined): a rebalance event still
    /// queued when the group handle has terminated was answered by asking the group for its protocol and
    /// then (un)assigning, two requests a terminated group drops without reply, so the caller waits forever
    /// inside `BaseConsumer::drop`. Here the protocol is asked once, of a live group, and an event that
    /// arrives after the group terminated changes nothing: nothing waits for it any more.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => Rebalance::Error(rdkafka::error::KafkaError::Rebalance(err.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        if consumer.closed() {
            tracing::info!("rebalance event after the consumer closed: nothing to (un)assign");
            return;
        }
        let cooperative = *self.cooperative.get_or_init(|| {
            matches!(
                consumer.rebalance_protocol(),
                RebalanceProtocol::Cooperative
            )
        });
        let done = match (&rebalance, cooperative) {
            (Rebalance::Assign(tpl), true) => consumer.incremental_assign(tpl),
            (Rebalance::Assign(tpl), false) => consumer.assign(tpl),
            (_, true) => consumer.incremental_unassign(tpl),
            (_, false) => consumer.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "applying a rebalance failed");
        }
        self.post_rebalance(consumer, &rebalance);
    }

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

/// Watches the topics the service reads and writes in the cluster's metadata: which are missing (reported
/// to [`Health`], so the instance is not ready while a configured topic does not exist, and logged by
/// name). A topic it writes that is missing (`output.create_topics = false`, or deleted) would otherwise be
/// found only by the first record for it: a dead-letter topic by the first bad message, which then failed
/// every commit.
pub struct TopicWatch {
    topics: Vec<String>,
    /// When the metadata was last read.
    last: Option<Instant>,
    missing: Vec<String>,
    /// The consumer reported a topic it cannot find since the last read (one deleted, say).
    doubted: bool,
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
            doubted: false,
        }
    }

    /// The consumer says a subscribed topic does not exist (it was deleted, say): the next look reads the
    /// metadata if the last read is older than [`TOPICS_FRESH_MISSING`], not [`TOPICS_FRESH`], so the
    /// instance is not ready within seconds rather than a minute.
    pub fn doubt(&mut self) {
        self.doubted = true;
    }

    /// Reads which topics are missing if the last read is old enough, and reports a change; a read that
    /// fails (no broker answers now) is tried again next time.
    pub fn look(&mut self, consumer: &StitchConsumer, health: &Health) {
        let fresh = if self.missing.is_empty() && !self.doubted {
            TOPICS_FRESH
        } else {
            TOPICS_FRESH_MISSING
        };
        if self.last.is_some_and(|at| at.elapsed() < fresh) {
            return;
        }
        let mut missing = Vec::new();
        for topic in &self.topics {
            match super::partition_count(consumer.client(), topic, Duration::from_secs(5)) {
                Ok(Some(_)) => {}
                Ok(None) => missing.push(topic.clone()),
                Err(_) => return,
            }
        }
        if missing != self.missing {
            if missing.is_empty() {
                tracing::info!("every configured topic exists");
            } else {
                tracing::error!(
                    topics = missing.join(", ").as_str(),
                    "configured topics do not exist: create them (the service never creates input \
                     topics, and its own only with output.create_topics = true); not ready until they \
                     exist"
                );
            }
            health.set_missing_topics(missing.clone());
            self.missing = missing;
        }
        self.last = Some(Instant::now());
        self.doubted = false;
    }
}

/// Whether the consumer group has other members than this consumer, asked of the coordinator
/// (DescribeGroups) at most every five seconds.
#[derive(Default)]
pub struct GroupPeers {
    last: std::cell::Cell<Option<(Option<bool>, Instant)>>,
}

impl GroupPeers {
    /// `None` if the coordinator cannot tell now.
    pub fn others(&self, consumer: &StitchConsumer, group: &str) -> Option<bool> {
        if let Some((others, at)) = self.last.get() {
            if at.elapsed() < Duration::from_secs(5) {
                return others;
            }
        }
        let others = consumer
            .fetch_group_list(Some(group), Duration::from_secs(5))
            .ok()
            .map(|list| {
                list.groups()
                    .iter()
                    .find(|g| g.name() == group)
                    .map_or(0, |g| g.members().len())
                    > 1
            });
        self.last.set(Some((others, Instant::now())));
        others
    }

    /// Asks again next time.
    pub fn forget(&self) {
        self.last.set(None);
    }
}

/// Tells a static member that races itself once while rejoining (a coordinator restart: the consumer is
/// replaced and goes on) from another process running with the same `group.instance.id`. Two such
/// processes fence each other's new consumers back and forth for ever, each ready now and then and neither
/// saying why; fenced this often, this one gives way.
#[derive(Default)]
pub struct FenceWatch {
    /// When the consumer was fenced, within the last [`FENCED_WINDOW`].
    fenced: Vec<Instant>,
}

/// How many fencings within the window mean another process: a self-race happens once per rejoin.
const FENCED_TIMES: usize = 3;
const FENCED_WINDOW: Duration = Duration::from_secs(120);

impl FenceWatch {
    /// Records a fencing at `now`; whether the consumer has been fenced too often to go on.
    pub fn another_process(&mut self, now: Instant) -> bool {
        self.fenced
            .retain(|at| now.duration_since(*at) < FENCED_WINDOW);
        self.fenced.push(now);
        self.fenced.len() >= FENCED_TIMES
    }
}

/// Watches for a consumer that holds no partition although nothing else in its group does: librdkafka can
/// fail to rejoin a group for good after its session timed out during a broker outage when static
/// membership is on (librdkafka issue 3437, seen here after a broker stop). Such a consumer polls happily
/// and never gets a partition; the only cure is a new consumer. (Holding nothing while other members hold
/// everything is a legitimate standby, not this.)
#[derive(Default)]
pub struct AssignmentWatch {
    /// Since when the consumer has held no partition.
    since: Option<Instant>,
}

/// How long a consumer may hold no partition, alone in its group, before it is replaced: three session
/// timeouts, time for any ordinary rejoin.
pub const UNASSIGNED_REPLACE_AFTER: Duration = Duration::from_secs(30);

impl AssignmentWatch {
    /// Whether the consumer must be replaced now. Tells `health` since when it has held nothing while
    /// alone in its group.
    pub fn stuck(
        &mut self,
        consumer: &StitchConsumer,
        group: &str,
        peers: &GroupPeers,
        health: &Health,
    ) -> bool {
        let held = consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false);
        if held {
            self.since = None;
            health.set_unassigned_since(None);
            return false;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_secs(10) {
            return false; // an ordinary rebalance
        }
        let alone = peers.others(consumer, group) == Some(false);
        health.set_unassigned_since(alone.then_some(since));
        if !alone || since.elapsed() < UNASSIGNED_REPLACE_AFTER {
            return false;
        }
        tracing::warn!(
            secs = since.elapsed().as_secs(),
            "the consumer has held no partition although no other member is in the group (a rejoin \
             librdkafka never finished); replacing it"
        );
        self.since = None;
        peers.forget();
        health.set_unassigned_since(None);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One fencing (a self-race while rejoining) or one now and then is gone on from; three within two
    /// minutes are another process with the same instance id.
    #[test]
    fn fenced_three_times_within_two_minutes_is_another_process() {
        let mut watch = FenceWatch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!watch.another_process(at(0)));
        assert!(!watch.another_process(at(100)));
        // The first one is out of the window by now.
        assert!(!watch.another_process(at(130)));
        assert!(watch.another_process(at(131)));
        let mut spaced = FenceWatch::default();
        assert!((0..10).all(|i| !spaced.another_process(at(i * 61))));
    }
}
