//! Every metric, defined once, in the service's own registry. Naming: `stitcher_<name>_<unit>[_total]`,
//! base units (seconds, bytes). Labels never carry an identifier, email or profile id.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::now_millis;
use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The service's metrics. Cheap to clone (handles are reference counted).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub events_consumed: IntCounterVec,
    pub input_tombstones: IntCounterVec,
    pub events_applied: IntCounterVec,
    pub events_duplicate: IntCounterVec,
    pub identifiers_rejected: IntCounterVec,
    pub profiles_created: IntCounter,
    pub profile_merges: IntCounter,
    pub merge_refusals: IntCounterVec,
    pub profile_splits: IntCounter,
    pub shared_identifiers: IntCounter,
    pub identifiers_erased: IntCounter,
    pub suppressed: IntCounterVec,
    pub breaker_tripped: IntGaugeVec,
    pub quarantined: IntCounterVec,
    pub control_commands: IntCounterVec,
    pub output_records: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub errors: IntCounterVec,
    pub transactions: IntCounterVec,
    pub batch_duration: Histogram,
    pub commit_duration: Histogram,
    pub commit_steps: HistogramVec,
    pub batch_size: Histogram,
    pub event_latency: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub state_size: IntGaugeVec,
    pub state_memory: IntGaugeVec,
    pub ready: IntGauge,
    pub last_commit: IntGauge,
    pub shard_messages: IntCounterVec,
    pub shards_owned: IntGauge,
    pub restored_records: IntCounter,
    /// Shards whose local copy held changes of an aborted transaction, restored from the start.
    pub state_rewound: IntCounter,
    pub restore_duration: Histogram,
    /// What `stitcher_ready` and `/readyz` report.
    pub health: Health,
}

/// How long the brokers may be unreachable before the instance reports not ready.
pub const BROKER_GRACE: Duration = Duration::from_secs(15);

/// How long the running pipeline's loop may go without starting a batch before the instance reports not
/// ready: a batch closes within `processing.batch_linger` of its first message, and an idle loop turns at
/// least that often, so a loop this late is stuck (in a call that never returns, say), whatever else looks
/// healthy.
pub const STALL_GRACE: Duration = Duration::from_secs(30);

/// How many producers left behind by a transactional call that did not return (see
/// [`crate::kafka::call_thread`]) fail `/healthz`: each keeps its threads and buffers until its call returns,
/// and a process that keeps leaking them is better restarted.
pub const LEFT_BEHIND_LIMIT: usize = 3;

/// Readiness means progress: the pipeline is running (recovered, holding its partitions, not draining), its
/// last commit did not fail, the brokers answered within [`BROKER_GRACE`], and every input topic exists.
#[derive(Clone, Default)]
pub struct Health(Arc<HealthState>);

#[derive(Default)]
struct HealthState {
    running: AtomicBool,
    /// Since when (epoch ms) commits fail; 0 while the last one succeeded.
    commit_failing_since: AtomicI64,
    /// The last failed commit's error, for the readiness answer.
    commit_error: Mutex<String>,
    /// Since when (epoch ms) the commit under way has been trying; 0 between commits.
    committing_since: AtomicI64,
    /// Since when (epoch ms) no broker is up; 0 while one is.
    brokers_down_since: AtomicI64,
    missing_topics: Mutex<Vec<String>>,
    /// Since when the consumer has held no partition (while running), if it holds none.
    unassigned_since: Mutex<Option<Instant>>,
    /// When (epoch ms) the pipeline's loop last started a batch, or started running.
    turned_at: AtomicI64,
    /// Producers left behind by a transactional call that has not returned.
    left_behind: AtomicUsize,
}

impl Health {
    /// The pipeline consumes (true) or not: recovering, paused, draining (false).
    pub fn set_running(&self, running: bool) {
        if running {
            self.turned();
        }
        self.0.running.store(running, Ordering::Release);
    }

    /// The pipeline's loop starts a batch; one that does not for [`STALL_GRACE`] while running makes the
    /// instance not ready.
    pub fn turned(&self) {
        self.0.turned_at.store(now_millis(), Ordering::Release);
    }

    /// A commit begins; one that takes longer than [`BROKER_GRACE`] (a transactional call blocked on an
    /// unreachable coordinator, say) makes the instance not ready.
    pub fn commit_started(&self) {
        self.0
            .committing_since
            .store(now_millis(), Ordering::Release);
    }

    /// A commit failed with `error` (said by `/readyz` while commits fail).
    pub fn commit_failed(&self, error: &dyn std::fmt::Display) {
        if let Ok(mut e) = self.0.commit_error.lock() {
            *e = error.to_string();
        }
        let _ = self.0.commit_failing_since.compare_exchange(
            0,
            now_millis(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The last commit succeeded, or its batch is known to be committed or to be read again: nothing
    /// waits to be committed.
    pub fn commit_settled(&self) {
        self.0.commit_failing_since.store(0, Ordering::Release);
        self.0.committing_since.store(0, Ordering::Release);
    }

    /// A transactional call was left behind with its producer (it had not returned in time).
    pub fn call_left_behind(&self) {
        self.0.left_behind.fetch_add(1, Ordering::AcqRel);
    }

    /// A call left behind returned at last, and its producer is closed.
    pub fn left_call_returned(&self) {
        self.0.left_behind.fetch_sub(1, Ordering::AcqRel);
    }

    /// Producers left behind whose call has not returned.
    pub fn left_behind(&self) -> usize {
        self.0.left_behind.load(Ordering::Acquire)
    }

    /// `Ok` while the process can still make progress by itself (`/healthz`); otherwise why not: as many
    /// producers left behind by calls that never returned as [`LEFT_BEHIND_LIMIT`].
    pub fn live(&self) -> Result<(), String> {
        let left = self.left_behind();
        if left >= LEFT_BEHIND_LIMIT {
            return Err(format!(
                "{left} producers were left behind by transactional calls that have not returned \
                 (librdkafka#5456): restart the process to reclaim them"
            ));
        }
        Ok(())
    }

    /// From librdkafka's statistics: whether any broker connection is up.
    pub fn brokers_up(&self, up: bool) {
        if up {
            self.0.brokers_down_since.store(0, Ordering::Release);
        } else {
            let _ = self.0.brokers_down_since.compare_exchange(
                0,
                now_millis(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Since when the consumer has held no partition; `None` while it holds some.
    pub fn set_unassigned_since(&self, since: Option<Instant>) {
        if let Ok(mut u) = self.0.unassigned_since.lock() {
            *u = since;
        }
    }

    /// The configured topics the cluster does not have.
    pub fn set_missing_topics(&self, topics: Vec<String>) {
        if let Ok(mut m) = self.0.missing_topics.lock() {
            *m = topics;
        }
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        let s = &self.0;
        if let Ok(m) = s.missing_topics.lock() {
            if !m.is_empty() {
                return Err(format!("topics missing: {}", m.join(", ")));
            }
        }
        let since = s.commit_failing_since.load(Ordering::Acquire);
        if since != 0 {
            let error = s.commit_error.lock().map(|e| e.clone()).unwrap_or_default();
            return Err(format!(
                "commits failing for {} s (last: {})",
                (now_millis() - since).max(0) / 1000,
                crate::kafka::dead_letters::truncate_str(&error, 300)
            ));
        }
        let committing = s.committing_since.load(Ordering::Acquire);
        if committing != 0 && now_millis() - committing > BROKER_GRACE.as_millis() as i64 {
            return Err(format!(
                "a commit has been under way for {} s",
                (now_millis() - committing) / 1000
            ));
        }
        let down = s.brokers_down_since.load(Ordering::Acquire);
        if down != 0 && now_millis() - down > BROKER_GRACE.as_millis() as i64 {
            return Err(format!(
                "no broker reachable for {} s",
                (now_millis() - down) / 1000
            ));
        }
        let unassigned = s.unassigned_since.lock().ok().and_then(|u| *u);
        if let Some(since) = unassigned.filter(|t| t.elapsed() > BROKER_GRACE) {
            return Err(format!(
                "no input partition assigned for {} s",
                since.elapsed().as_secs()
            ));
        }
        if !s.running.load(Ordering::Acquire) {
            return Err("pipeline not consuming (starting, recovering, paused or draining)".into());
        }
        let turned = s.turned_at.load(Ordering::Acquire);
        if now_millis() - turned > STALL_GRACE.as_millis() as i64 {
            return Err(format!(
                "the pipeline has started no batch for {} s (stuck)",
                (now_millis() - turned) / 1000
            ));
        }
        Ok(())
    }
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let m = Metrics {
            events_consumed: counter_vec(&r, "stitcher_events_consumed_total", "Input messages read, by channel.", &["channel"])?,
            input_tombstones: counter_vec(&r, "stitcher_input_tombstones_total", "Input records without a value (tombstones of a compacted topic: a deletion upstream), skipped, by channel: they carry no event.", &["channel"])?,
            events_applied: counter_vec(&r, "stitcher_events_applied_total", "Events applied to a profile, by channel.", &["channel"])?,
            events_duplicate: counter_vec(&r, "stitcher_events_duplicate_total", "Events skipped because their event_id was already applied, by channel.", &["channel"])?,
            identifiers_rejected: counter_vec(&r, "stitcher_identifiers_rejected_total", "Identifiers dropped by normalisation, by reason (blocked, invalid, unknown_type, too_long).", &["reason"])?,
            profiles_created: counter(&r, "stitcher_profiles_created_total", "New profiles created.")?,
            profile_merges: counter(&r, "stitcher_profile_merges_total", "Profiles absorbed into another profile.")?,
            merge_refusals: counter_vec(&r, "stitcher_merge_refusals_total", "Links refused by guardrails, by rule.", &["rule"])?,
            profile_splits: counter(&r, "stitcher_profile_splits_total", "Profiles split in several (erasure, unlink, a shared identifier taken out).")?,
            shared_identifiers: counter(&r, "stitcher_shared_identifiers_total", "Identifiers found to be shared by more people than guardrails.shared_limits allows and set apart.")?,
            identifiers_erased: counter(&r, "stitcher_identifiers_erased_total", "Identifiers removed from state by erasure commands.")?,
            breaker_tripped: gauge_vec(&r, "stitcher_breaker_tripped", "1 while the merge-storm breaker holds back events of this key (type:<identifier type> or topic:<input topic>).", &["key"])?,
            quarantined: counter_vec(&r, "stitcher_quarantined_total", "Events held back by the merge-storm breaker and written to the quarantine topic, by tripped key.", &["key"])?,
            suppressed: counter_vec(&r, "stitcher_suppressed_total", "Identifiers stripped from events for being on the suppression list (what=identifier), and events left with none (what=event).", &["what"])?,
            control_commands: counter_vec(&r, "stitcher_control_commands_total", "Commands read from the control topic, by op (erase_identifier, erase_profile, unlink) and result (applied, not_found).", &["op", "result"])?,
            output_records: counter_vec(&r, "stitcher_output_records_total", "Records produced, by kind: update, redirect, tombstone (profile topic), identity (identity change stream).", &["kind"])?,
            dead_letters: counter_vec(&r, "stitcher_dead_letters_total", "Input messages sent to the dead-letter topic, by stage (decode, validate, control).", &["stage"])?,
            errors: counter_vec(&r, "stitcher_errors_total", "Errors by stage (consume, produce, commit, state; shard: a delivery that would not end, sent on through the internal topic); retried unless fatal.", &["stage"])?,
            transactions: counter_vec(&r, "stitcher_transactions_total", "Batches committed, by result (committed, aborted, recovered).", &["result"])?,
            batch_duration: histogram(&r, "stitcher_batch_duration_seconds", "Time to process and commit one batch.", exponential_buckets(0.001, 2.0, 15)?)?,
            commit_duration: histogram(&r, "stitcher_commit_duration_seconds", "Time to commit one batch to Kafka (transaction, or flush and offset commit), retries included.", exponential_buckets(0.001, 2.0, 15)?)?,
            commit_steps: histogram_vec(&r, "stitcher_commit_step_seconds", "Time of each step of a batch's transaction: produce (handing its records to the producer), offsets (send_offsets_to_transaction), deliveries (waiting for the records still in flight after it), end (commit_transaction).", &["step"], exponential_buckets(0.0001, 2.0, 15)?)?,
            batch_size: histogram(&r, "stitcher_batch_size_messages", "Input messages per committed batch.", exponential_buckets(1.0, 2.0, 15)?)?,
            event_latency: histogram(&r, "stitcher_event_latency_seconds", "From the event's timestamp to the commit of its profile update.", exponential_buckets(0.001, 2.0, 20)?)?,
            consumer_lag: gauge_vec(&r, "stitcher_consumer_lag_messages", "Messages behind the end of each input topic (sum over its partitions).", &["topic"])?,
            state_size: gauge_vec(&r, "stitcher_state_size_bytes", "Approximate RocksDB size per column family.", &["cf"])?,
            state_memory: gauge_vec(&r, "stitcher_state_memory_bytes", "RocksDB memory by part: memtables, table_readers (filters and indexes, outside the block cache, growing with the state), block_cache.", &["part"])?,
            ready: gauge(&r, "stitcher_ready", "1 while the instance makes progress: recovered, consuming, commits succeeding, brokers reachable, input topics present (as /readyz).")?,
            last_commit: gauge(&r, "stitcher_last_commit_timestamp_seconds", "Unix time of the last committed batch.")?,
            shard_messages: counter_vec(&r, "stitcher_shard_messages_total", "Scale-out: messages handled by this instance's shards, by kind (event, locate, gather, fetch, component, own, gone, erase, unsuppress, release, erase_profile, unlink) and route (local: sent and handled in the same batch; topic: read from the internal topic).", &["kind", "route"])?,
            shards_owned: gauge(&r, "stitcher_shards_owned", "Scale-out: shards this instance holds (restored and processing).")?,
            restored_records: counter(&r, "stitcher_restored_records_total", "Scale-out: changelog records applied while restoring shards (not counting the records derived from them).")?,
            state_rewound: counter(&r, "stitcher_state_rewound_total", "Shards whose local copy held changes of a transaction aborted after its commit was reported, restored from the start of their changelog.")?,
            restore_duration: histogram(&r, "stitcher_restore_duration_seconds", "Scale-out: time to restore one shard from its changelog.", exponential_buckets(0.01, 2.0, 15)?)?,
            registry: r,
            health: Health::default(),
        };
        Ok(m)
    }

    /// The metrics' current values (what `render` shows), for a command that reports them itself.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.ready.set(i64::from(self.health.check().is_ok()));
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ready means progress: a running pipeline whose loop stopped turning is not ready, whatever else
    /// looks healthy; it is ready again once the loop turns.
    #[test]
    fn a_running_pipeline_that_stopped_turning_is_not_ready() {
        let h = Health::default();
        assert!(h.check().is_err(), "not running yet");
        h.set_running(true);
        assert_eq!(h.check(), Ok(()));
        let late = now_millis() - STALL_GRACE.as_millis() as i64 - 1_000;
        h.0.turned_at.store(late, Ordering::Release);
        let why = h.check().expect_err("stuck");
        assert!(why.contains("started no batch"), "{why}");
        h.turned();
        assert_eq!(h.check(), Ok(()));
    }

    /// While commits fail, `/readyz` says with what (it said only for how long), and a commit that
    /// succeeds clears it.
    #[test]
    fn failing_commits_are_not_ready_and_say_their_last_error() {
        let h = Health::default();
        h.set_running(true);
        h.commit_failed(&"Broker: Topic authorization failed");
        let why = h.check().expect_err("failing");
        assert!(
            why.starts_with("commits failing for 0 s (last: Broker: Topic authorization failed)"),
            "{why}"
        );
        h.commit_failed(&"x".repeat(1_000));
        assert!(h.check().expect_err("failing").len() < 400);
        h.commit_settled();
        assert_eq!(h.check(), Ok(()));
    }
}
