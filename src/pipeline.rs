//! The consume-process-commit loop, on a dedicated thread (librdkafka polling and RocksDB are blocking).
//!
//! Per batch: poll up to `batch_max_events` messages or `batch_linger`; apply them to a RocksDB overlay;
//! write state + checkpoint (positions and the batch's output) in one synced RocksDB write; then commit the
//! output and the offsets in one Kafka transaction. docs/DESIGN.md explains why this order is crash-safe.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::{
    consumer_config, AssignmentWatch, CommitError, Committer, Deadline, GroupPeers, StitchConsumer,
    StitchContext, TopicWatch,
};
use crate::metrics::Metrics;
use crate::model::now_millis;
use crate::processor::{positions_vec, Batch, InMessage, ProcessError, Processor};
use crate::store::{Checkpoint, OutRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("commit: {0}")]
    Commit(#[from] CommitError),
    #[error("state: {0}")]
    Store(#[from] StoreError),
    #[error("processing: {0}")]
    Process(#[from] ProcessError),
    #[error("restoring shards: {0}")]
    Restore(String),
    #[error("state directory: {0}")]
    WrongMode(String),
}

/// Totals of one run, for logs and the demo's summary.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub batches: u64,
    pub messages: u64,
    pub records: u64,
    pub recovered_records: u64,
}

pub struct Pipeline {
    cfg: Config,
    store: Store,
    metrics: Metrics,
    processor: Processor,
    consumer: StitchConsumer,
    committer: Committer,
    /// This instance's name in the transactional id, to create a new producer.
    instance: String,
    positions: BTreeMap<(String, i32), i64>,
    /// Output of the last checkpoint whose transaction is not known to have committed.
    carry: Vec<OutRecord>,
    sequence: u64,
    /// The subscribed topics in the cluster's metadata: their partitions, and which are missing.
    topics: std::cell::RefCell<TopicWatch>,
    /// Whether another member is in the consumer group.
    peers: GroupPeers,
    /// Whether this instance has paused its partitions because it holds only some of them.
    paused: bool,
    /// A consumer that never gets its partitions back is replaced.
    unassigned: AssignmentWatch,
}

/// Records a committed batch (started at `started`, `records` produced) in the metrics and the totals.
pub(crate) fn batch_committed(
    metrics: &Metrics,
    batch: &Batch,
    started: Instant,
    records: usize,
    summary: &mut RunSummary,
) {
    let committed_ms = now_millis();
    for ts in &batch.event_times {
        metrics
            .event_latency
            .observe(((committed_ms - ts).max(0)) as f64 / 1000.0);
    }
    metrics
        .batch_duration
        .observe(started.elapsed().as_secs_f64());
    metrics.batch_size.observe(batch.messages as f64);
    metrics.last_commit.set(committed_ms / 1000);
    summary.batches += 1;
    summary.messages += batch.messages as u64;
    summary.records += records as u64;
}

/// Every topic the pipeline consumes: the inputs, the control topic if configured, and in scale-out mode
/// the internal shard topic.
pub(crate) fn subscribed_topics(cfg: &Config) -> Vec<&str> {
    let shard_topic = cfg
        .scaleout
        .enabled()
        .then_some(cfg.scaleout.topic.as_str());
    cfg.inputs
        .iter()
        .map(|i| i.topic.as_str())
        .chain(Some(cfg.control.topic.as_str()).filter(|t| !t.is_empty()))
        .chain(shard_topic)
        .collect()
}

/// A consumer with the service's settings, subscribed to [`subscribed_topics`].
pub(crate) fn subscribed_consumer(
    cfg: &Config,
    metrics: &Metrics,
) -> Result<StitchConsumer, KafkaError> {
    let consumer: StitchConsumer =
        consumer_config(cfg).create_with_context(StitchContext::new(metrics.clone()))?;
    consumer.subscribe(&subscribed_topics(cfg))?;
    Ok(consumer)
}

impl Pipeline {
    /// Connects, fences older instances, and recovers the last checkpoint's transaction if it never
    /// committed.
    pub fn start(
        cfg: Config,
        store: Store,
        metrics: Metrics,
        instance: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, PipelineError> {
        if store.has_shard_state()? {
            return Err(PipelineError::WrongMode(format!(
                "{} holds scale-out state ([scaleout] shards > 0); this configuration runs one \
                 instance with the whole graph. Keep [scaleout], or start with an empty state \
                 directory, a new consumer group and output topic, and let it replay the input topics",
                cfg.state.dir.display()
            )));
        }
        let processor = Processor::new(&cfg, metrics.clone())?;
        let consumer = subscribed_consumer(&cfg, &metrics)?;
        let committer = Committer::new(
            &cfg,
            instance,
            metrics.clone(),
            &Deadline::new(shutdown.clone(), cfg.processing.drain_timeout),
        )?;
        let checkpoint = store.checkpoint()?.unwrap_or_default();
        let topics = TopicWatch::new(
            subscribed_topics(&cfg)
                .into_iter()
                .map(str::to_string)
                .collect(),
        );
        let positions: BTreeMap<(String, i32), i64> = checkpoint
            .positions
            .iter()
            .map(|p| ((p.topic.clone(), p.partition), p.next_offset))
            .collect();
        let mut pipeline = Pipeline {
            cfg,
            store,
            metrics,
            processor,
            consumer,
            committer,
            instance: instance.to_string(),
            positions,
            carry: Vec::new(),
            sequence: checkpoint.sequence,
            topics: std::cell::RefCell::new(topics),
            peers: GroupPeers::default(),
            paused: false,
            unassigned: AssignmentWatch::default(),
        };
        if !checkpoint.outbox.is_empty() && !pipeline.checkpoint_committed(&checkpoint, shutdown)? {
            tracing::warn!(
                records = checkpoint.outbox.len(),
                sequence = checkpoint.sequence,
                "last batch was written to state but its transaction did not commit; producing it again"
            );
            pipeline
                .metrics
                .transactions
                .with_label_values(&["recovered"])
                .inc();
            pipeline.carry = checkpoint.outbox;
        }
        Ok(pipeline)
    }

    /// Did Kafka commit the checkpoint's offsets? Once `init_transactions` has fenced any older producer,
    /// the group's committed offsets are final: equal to the checkpoint's positions if its transaction
    /// committed, behind them if not.
    fn checkpoint_committed(
        &self,
        cp: &Checkpoint,
        shutdown: &CancellationToken,
    ) -> Result<bool, PipelineError> {
        let mut tpl = TopicPartitionList::new();
        for p in &cp.positions {
            tpl.add_partition(&p.topic, p.partition);
        }
        let mut backoff = Duration::from_millis(200);
        let committed = loop {
            match self
                .consumer
                .committed_offsets(tpl.clone(), Duration::from_secs(10))
            {
                Ok(c) => break c,
                Err(e) if shutdown.is_cancelled() => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read committed offsets, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        Ok(cp.positions.iter().all(|p| {
            matches!(committed.find_partition(&p.topic, p.partition).map(|e| e.offset()),
                Some(Offset::Offset(o)) if o >= p.next_offset)
        }))
    }

    /// Runs until `shutdown`; then finishes and commits the current batch within the drain timeout.
    pub fn run(mut self, shutdown: CancellationToken) -> Result<RunSummary, PipelineError> {
        let mut summary = RunSummary {
            recovered_records: self.carry.len() as u64,
            ..RunSummary::default()
        };
        self.metrics.health.set_running(true);
        tracing::info!(inputs = self.cfg.inputs.len(), "pipeline running");
        while !shutdown.is_cancelled() {
            if let Err(e) = self.run_batch(&shutdown, &mut summary) {
                self.metrics.health.set_running(false);
                return Err(e);
            }
        }
        self.metrics.health.set_running(false);
        tracing::info!(
            batches = summary.batches,
            messages = summary.messages,
            "pipeline drained"
        );
        Ok(summary)
    }

    fn run_batch(
        &mut self,
        shutdown: &CancellationToken,
        summary: &mut RunSummary,
    ) -> Result<(), PipelineError> {
        if self.hold_partial_assignment()? {
            return Ok(());
        }
        if self.unassigned.stuck(
            &self.consumer,
            &self.cfg.kafka.group_id,
            &self.peers,
            &self.metrics.health,
        ) {
            self.metrics.errors.with_label_values(&["consume"]).inc();
            self.consumer = subscribed_consumer(&self.cfg, &self.metrics)?;
            return Ok(());
        }
        let started = Instant::now();
        let linger_until = started + self.cfg.processing.batch_linger;
        let store = self.store.clone();
        let mut overlay = store.overlay()?;
        let mut batch = Batch::default();
        while batch.messages < self.cfg.processing.batch_max_events && !shutdown.is_cancelled() {
            let now = Instant::now();
            if now >= linger_until {
                break;
            }
            match self.consumer.poll(linger_until - now) {
                None => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    // librdkafka gave this consumer up (for example a static member fenced after the
                    // coordinator restarted). Nothing of this batch is in state yet: drop it, start a
                    // new consumer, and read again from the committed offsets; what is already in state
                    // is skipped by the positions.
                    self.metrics.errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(?code, "consumer failed fatally; replacing it");
                    drop(overlay);
                    self.consumer = subscribed_consumer(&self.cfg, &self.metrics)?;
                    return Ok(());
                }
                Some(Err(e)) => {
                    self.metrics.errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(error = %e, "consume error");
                }
                Some(Ok(m)) => {
                    if self.consumer.context().take_assigned() && self.partial_assignment()? {
                        // A rebalance left this instance with part of the partitions: nothing of this
                        // batch is in state or sent; drop it, the next round pauses.
                        return Ok(());
                    }
                    let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
                    let next = self
                        .positions
                        .get(&(topic.to_string(), partition))
                        .copied()
                        .unwrap_or(0);
                    if offset < next {
                        continue; // already in state: re-read after a crash before the commit
                    }
                    let msg = InMessage {
                        topic,
                        partition,
                        offset,
                        key: m.key(),
                        payload: m.payload(),
                    };
                    self.processor.process(&mut overlay, &mut batch, msg)?;
                }
            }
        }
        if batch.is_empty() && (self.carry.is_empty() || !self.assigned()) {
            return Ok(());
        }
        let now_ms = now_millis();
        let mut records = std::mem::take(&mut self.carry);
        records.extend(self.processor.finish(&overlay, &mut batch, now_ms)?);
        for (tp, next) in &batch.positions {
            self.positions.insert(tp.clone(), *next);
        }
        let positions = positions_vec(&self.positions);
        self.sequence += 1;
        let checkpoint = Checkpoint {
            sequence: self.sequence,
            positions,
            outbox: records,
        };
        let mut wb = overlay.into_write_batch()?;
        self.store.put_checkpoint(&mut wb, &checkpoint)?;
        self.store.write(wb)?;
        let deadline = Deadline::new(shutdown.clone(), self.cfg.processing.drain_timeout);
        match self.committer.commit(
            &checkpoint.outbox,
            &checkpoint.positions,
            &self.consumer,
            &deadline,
        ) {
            Ok(()) => {}
            Err(CommitError::Rejoin(e)) => {
                // Only polling rejoins the group. The batch is in state; its records go out with the next
                // transaction, together with these positions.
                tracing::warn!(error = %e, "consumer group membership lost; rejoining, batch carried over");
                self.carry = checkpoint.outbox;
                summary.messages += batch.messages as u64;
                return Ok(());
            }
            Err(CommitError::Stuck(e)) => {
                // A new producer with the same transactional id fences the stuck one; once it is
                // initialised, the fate of the batch's transaction is final and the committed offsets tell
                // it, exactly as on a restart.
                tracing::warn!(error = %e, "transactional producer stuck; replacing it");
                self.committer =
                    Committer::new(&self.cfg, &self.instance, self.metrics.clone(), &deadline)?;
                if self.checkpoint_committed(&checkpoint, shutdown)? {
                    self.metrics.health.commit_settled();
                } else {
                    self.carry = checkpoint.outbox;
                }
                summary.messages += batch.messages as u64;
                return Ok(());
            }
            Err(e) => {
                // The checkpoint is in state: a restart produces this batch again.
                self.carry = checkpoint.outbox;
                return Err(e.into());
            }
        }
        batch_committed(
            &self.metrics,
            &batch,
            started,
            checkpoint.outbox.len(),
            summary,
        );
        Ok(())
    }

    /// One instance must hold every input partition: the identity graph is not partitioned (yet), so an
    /// instance holding some partitions would stitch their identifiers apart from the others'. When a second
    /// instance joins the group, both hold a part: each pauses its partitions, reports not ready and keeps
    /// its group membership, until one is stopped and the other gets everything back; it then rewinds to
    /// its own positions (nothing read while paused is lost) and carries on. True while paused.
    fn hold_partial_assignment(&mut self) -> Result<bool, PipelineError> {
        self.expected_partitions();
        let assignment = self.consumer.assignment()?;
        let assigned = assignment.count();
        if self.is_partial(assigned) {
            if !self.paused {
                self.consumer.pause(&assignment)?;
                self.paused = true;
                self.metrics.health.set_running(false);
                tracing::error!(
                    assigned,
                    expected = self.expected_partitions().unwrap_or_default(),
                    group = self.cfg.kafka.group_id.as_str(),
                    "this instance was assigned only part of the input partitions: another instance runs \
                     in the same consumer group. One instance must hold them all (the identity graph is not \
                     partitioned across instances); pausing until it does"
                );
            }
            // Polling keeps the group membership; paused partitions deliver nothing.
            let _ = self.consumer.poll(Duration::from_millis(500));
            return Ok(true);
        }
        if self.paused && assigned > 0 {
            self.rewind(&assignment)?;
            self.consumer.resume(&assignment)?;
            self.paused = false;
            self.metrics.health.set_running(true);
            tracing::info!(assigned, "all input partitions assigned again; resuming");
        }
        Ok(false)
    }

    /// Whether the current assignment holds only some of the partitions.
    fn partial_assignment(&self) -> Result<bool, PipelineError> {
        let assigned = self.consumer.assignment()?.count();
        Ok(self.is_partial(assigned))
    }

    /// Whether `assigned` partitions are some, but not all, of the subscribed topics' partitions because
    /// another instance holds the rest. Fewer partitions with no other member in the group is a topic
    /// created after start-up that the subscription has not seen yet: not a reason to pause.
    fn is_partial(&self, assigned: usize) -> bool {
        assigned > 0
            && self.expected_partitions().is_some_and(|e| assigned < e)
            // Assumed so when the coordinator cannot tell: pausing is the safe side.
            && self
                .peers
                .others(&self.consumer, &self.cfg.kafka.group_id)
                .unwrap_or(true)
    }

    /// Seeks every assigned partition to where this instance's state stands (or, for a partition it never
    /// read, to the group's committed offset), so that whatever a paused fetch dropped is read again.
    fn rewind(&self, assignment: &TopicPartitionList) -> Result<(), PipelineError> {
        let committed = self
            .consumer
            .committed_offsets(assignment.clone(), Duration::from_secs(10))?;
        for e in assignment.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            let offset = match self.positions.get(&(topic.to_string(), partition)) {
                Some(next) => Offset::Offset(*next),
                None => match committed
                    .find_partition(topic, partition)
                    .map(|c| c.offset())
                {
                    Some(Offset::Offset(o)) => Offset::Offset(o),
                    _ => Offset::Beginning,
                },
            };
            self.consumer
                .seek(topic, partition, offset, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Partitions of every subscribed topic that exists, from recent metadata.
    fn expected_partitions(&self) -> Option<usize> {
        self.topics
            .borrow_mut()
            .partitions(&self.consumer, &self.metrics.health)
    }

    fn assigned(&self) -> bool {
        self.consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false)
    }
}
