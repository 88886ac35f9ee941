//! Every metric, defined once, in the service's own registry. Naming: `stitcher_<name>_<unit>[_total]`,
//! base units (seconds, bytes). Labels never carry an identifier, email or profile id.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The service's metrics. Cheap to clone (handles are reference counted).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub events_consumed: IntCounterVec,
    pub events_applied: IntCounterVec,
    pub events_duplicate: IntCounterVec,
    pub identifiers_rejected: IntCounterVec,
    pub profiles_created: IntCounter,
    pub profile_merges: IntCounter,
    pub merge_refusals: IntCounterVec,
    pub profile_splits: IntCounter,
    pub shared_identifiers: IntCounter,
    pub identifiers_erased: IntCounter,
    pub control_commands: IntCounterVec,
    pub output_records: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub errors: IntCounterVec,
    pub transactions: IntCounterVec,
    pub batch_duration: Histogram,
    pub commit_duration: Histogram,
    pub batch_size: Histogram,
    pub event_latency: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub state_size: IntGaugeVec,
    pub ready: IntGauge,
    pub last_commit: IntGauge,
    pub shard_messages: IntCounterVec,
    pub shards_owned: IntGauge,
    pub restored_records: IntCounter,
    pub restore_duration: Histogram,
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
            events_applied: counter_vec(&r, "stitcher_events_applied_total", "Events applied to a profile, by channel.", &["channel"])?,
            events_duplicate: counter_vec(&r, "stitcher_events_duplicate_total", "Events skipped because their event_id was already applied, by channel.", &["channel"])?,
            identifiers_rejected: counter_vec(&r, "stitcher_identifiers_rejected_total", "Identifiers dropped by normalisation, by reason (blocked, invalid, unknown_type, too_long).", &["reason"])?,
            profiles_created: counter(&r, "stitcher_profiles_created_total", "New profiles created.")?,
            profile_merges: counter(&r, "stitcher_profile_merges_total", "Profiles absorbed into another profile.")?,
            merge_refusals: counter_vec(&r, "stitcher_merge_refusals_total", "Links refused by guardrails, by rule.", &["rule"])?,
            profile_splits: counter(&r, "stitcher_profile_splits_total", "Profiles split in several (erasure, unlink, a shared identifier taken out).")?,
            shared_identifiers: counter(&r, "stitcher_shared_identifiers_total", "Identifiers found to be shared by more people than guardrails.shared_limits allows and set apart.")?,
            identifiers_erased: counter(&r, "stitcher_identifiers_erased_total", "Identifiers removed from state by erasure commands.")?,
            control_commands: counter_vec(&r, "stitcher_control_commands_total", "Commands read from the control topic, by op (erase_identifier, erase_profile, unlink) and result (applied, not_found).", &["op", "result"])?,
            output_records: counter_vec(&r, "stitcher_output_records_total", "Records produced to the profile topic, by kind (update, redirect, tombstone).", &["kind"])?,
            dead_letters: counter_vec(&r, "stitcher_dead_letters_total", "Input messages sent to the dead-letter topic, by stage (decode, validate, control).", &["stage"])?,
            errors: counter_vec(&r, "stitcher_errors_total", "Errors by stage (consume, produce, commit, state); retried unless fatal.", &["stage"])?,
            transactions: counter_vec(&r, "stitcher_transactions_total", "Batches committed, by result (committed, aborted, recovered).", &["result"])?,
            batch_duration: histogram(&r, "stitcher_batch_duration_seconds", "Time to process and commit one batch.", exponential_buckets(0.001, 2.0, 15)?)?,
            commit_duration: histogram(&r, "stitcher_commit_duration_seconds", "Time to commit one batch to Kafka (transaction, or flush and offset commit), retries included.", exponential_buckets(0.001, 2.0, 15)?)?,
            batch_size: histogram(&r, "stitcher_batch_size_messages", "Input messages per committed batch.", exponential_buckets(1.0, 2.0, 15)?)?,
            event_latency: histogram(&r, "stitcher_event_latency_seconds", "From the event's timestamp to the commit of its profile update.", exponential_buckets(0.001, 2.0, 20)?)?,
            consumer_lag: gauge_vec(&r, "stitcher_consumer_lag_messages", "Messages behind the end of each input topic (sum over its partitions).", &["topic"])?,
            state_size: gauge_vec(&r, "stitcher_state_size_bytes", "Approximate RocksDB size per column family.", &["cf"])?,
            ready: gauge(&r, "stitcher_ready", "1 once recovery finished and the pipeline consumes.")?,
            last_commit: gauge(&r, "stitcher_last_commit_timestamp_seconds", "Unix time of the last committed batch.")?,
            shard_messages: counter_vec(&r, "stitcher_shard_messages_total", "Scale-out: messages handled by this instance's shards, by kind (event, union, meet, hook, absorb, part) and route (local: sent and handled in the same batch; topic: read from the internal topic).", &["kind", "route"])?,
            shards_owned: gauge(&r, "stitcher_shards_owned", "Scale-out: shards this instance holds (restored and processing).")?,
            restored_records: counter(&r, "stitcher_restored_records_total", "Scale-out: changelog records applied while restoring shards.")?,
            restore_duration: histogram(&r, "stitcher_restore_duration_seconds", "Scale-out: time to restore one shard from its changelog.", exponential_buckets(0.01, 2.0, 15)?)?,
            registry: r,
        };
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}
