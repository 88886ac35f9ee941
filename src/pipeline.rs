//! The run loop, on a dedicated thread (librdkafka polling and RocksDB are blocking). Instances of one
//! consumer group share the input partitions and the shards (the partitions of the internal topic), as
//! Kafka assigns them; one instance is the case where it holds them all. Per batch, in one Kafka transaction: the
//! consumed offsets (inputs and internal topic, and the internal topic's partition of every shard changed,
//! so that its next owner waits for the transaction), the messages for shards held elsewhere, the shard state
//! changes (changelog records), profile updates, redirects and dead letters. The local RocksDB copy of the
//! shards is written after the commit, with the changelog offsets it reached. The commit and the local
//! write of one batch run on a commit thread while the next batch is handled over its changes
//! (docs/DESIGN.md, "Overlapped commits").
//!
//! A message for a shard this instance holds is handled at once, in the batch that produced it: with one
//! instance the internal topic carries nothing. A batch built across a rebalance is dropped (nothing of it
//! is in Kafka or in local state); the new assignment starts from the committed offsets. A shard this
//! instance did not hold before is restored from its changelog before anything is handled. docs/DESIGN.md,
//! "Scale-out", explains why this is exactly-once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::ahead::{DecodeAhead, DecodedChunk, AHEAD, CHUNK};
use crate::config::Config;
use crate::engine::{changelog_records, sorted_changes, Engine, Work};
use crate::kafka::reader::QuietEof;
use crate::kafka::{
    base_config, consumer_config, partition_count, watermarks, AssignmentWatch, CommitError,
    Committer, Deadline, FenceWatch, GroupPeers, StitchConsumer, StitchContext, TopicWatch,
};
use crate::metrics::Metrics;
use crate::model::{now_millis, Millis};
use crate::processor::{positions_vec, Batch, InMessage, ProcessError};
use crate::scaleout::lookup::HeldShards;
use crate::scaleout::state::{
    misplaced, refuse_former_format, shard_of_key, Changes, Restore, ShardOverlay,
};
use crate::scaleout::ShardId;
use crate::store::{OutRecord, Position, RecordRef, Store, StoreError};
use crate::worker::{Ended, Worker};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka: {0}")]
    Kafka(KafkaError),
    #[error("commit: {0}")]
    Commit(CommitError),
    #[error("state: {0}")]
    Store(StoreError),
    #[error("processing: {0}")]
    Process(ProcessError),
    #[error("restoring shards: {0}")]
    Restore(String),
    /// The service was told to stop while it took shards over (waited for their previous owners'
    /// transactions, or restored them): not a failure. The restored part is kept with its changelog
    /// position, and the next restore goes on from there.
    #[error("stopped while taking shards over")]
    StoppedTakingOver,
    #[error("state directory: {0}")]
    WrongMode(String),
    /// The state directory or the changelog was made with another shard count.
    #[error("shard count: {0}")]
    ShardCount(String),
    /// The internal topics cannot hold the shards (their partitions, the changelog's cleanup policy).
    #[error("internal topics: {0}")]
    InternalTopics(String),
    #[error("commit thread: {0}")]
    CommitThread(String),
    #[error("decode thread: {0}")]
    DecodeThread(String),
    /// Another process runs with this instance's identity (see [`crate::kafka::FenceWatch`]).
    #[error("{0}")]
    InstanceTaken(String),
}

error_from!(PipelineError {
    KafkaError => Kafka,
    CommitError => Commit,
    StoreError => Store,
    ProcessError => Process,
});

/// How long one ask for stable committed offsets waits before a stop is looked for and it asks again.
const STABLE_TURN: Duration = Duration::from_millis(500);

/// How long a poll waits, while the batch holds messages and the commit before it is in flight, before
/// it looks again whether that commit has ended (a commit takes a few to a few tens of milliseconds).
const COMMIT_LOOK: Duration = Duration::from_millis(2);

/// Totals of one run, for logs and the demo's summary.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub batches: u64,
    pub messages: u64,
    pub records: u64,
    pub recovered_records: u64,
}

/// A closed batch whose transaction and local write run on the commit thread while the next batch is
/// handled.
struct InFlight {
    /// The batch's state changes: the next batch reads them before the store.
    changes: Arc<Changes>,
    closed: Closed,
    /// The consumer's rebalance count when the batch closed.
    generation: u64,
}

/// The messages polled for the batch being built.
#[derive(Default)]
struct Polled {
    /// Messages polled, not yet handed to the decode thread.
    chunk: Vec<OwnedMessage>,
    /// Messages polled in all.
    count: usize,
    /// Next offset per partition after the messages polled: the batch's positions once it closes.
    next: BTreeMap<(String, i32), i64>,
}

impl Polled {
    /// Adds a polled message, unless it was committed already (fetched before a rebalance, or polled
    /// again by a consumer that rejoined).
    fn push(&mut self, pipeline: &Pipeline, m: OwnedMessage) {
        let tp = (m.topic().to_string(), m.partition());
        let next = self.next.get(&tp).or(pipeline.expected.get(&tp));
        if next.is_some_and(|next| m.offset() < *next) {
            return;
        }
        self.next.insert(tp, m.offset() + 1);
        self.chunk.push(m);
        self.count += 1;
    }
}

/// A closed batch for the commit thread: its transaction, then its local write.
struct Job {
    records: Vec<OutRecord>,
    positions: Vec<Position>,
    /// The consumer group metadata when the batch closed: a rebalance since makes the offsets refused.
    group: Option<Arc<ConsumerGroupMetadata>>,
    changes: Arc<Changes>,
    started: Instant,
}

/// When a batch's transaction committed (ms since the epoch), and how long the batch took from its first
/// message to that commit.
struct Committed {
    at_ms: Millis,
    took: Duration,
}

/// What the commit thread owns: the transactional producer, and the store committed batches are written
/// to.
struct Committing {
    committer: Committer,
    store: Store,
    /// Where the batches' state changes go, besides the store.
    changelog: String,
    /// For a new producer in place of a stuck one.
    cfg: Config,
    instance: String,
    metrics: Metrics,
    /// Bounds the retries of a commit, and of a new producer's start, once shutdown was requested.
    shutdown: CancellationToken,
}

impl Committing {
    fn start(
        cfg: &Config,
        store: &Store,
        instance: &str,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Self, CommitError> {
        Ok(Self {
            committer: producer(cfg, instance, metrics, shutdown)?,
            store: store.clone(),
            changelog: cfg.changelog_topic(),
            cfg: cfg.clone(),
            instance: instance.to_string(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        })
    }

    /// Commits a batch's transaction, then writes its changes with the changelog offsets they reached.
    fn commit(&mut self, job: Job) -> Result<Committed, PipelineError> {
        let deadline = Deadline::new(self.shutdown.clone(), self.cfg.processing.drain_timeout);
        let sorted = sorted_changes(&job.changes);
        let records: Vec<RecordRef<'_>> = job
            .records
            .iter()
            .map(OutRecord::borrowed)
            .chain(changelog_records(&self.changelog, &sorted))
            .collect();
        let result = self
            .committer
            .commit(&records, &job.positions, job.group.as_ref(), &deadline);
        if let Err(e) = result {
            // The deliveries of an aborted transaction say nothing of where the changelog stands.
            let _ = self.committer.take_delivered();
            if matches!(e, CommitError::Stuck(_) | CommitError::Hung(_)) {
                // A new producer with the same transactional.id fences the old and settles its transaction.
                self.committer = producer(&self.cfg, &self.instance, &self.metrics, &self.shutdown)
                    .map_err(|e| {
                        PipelineError::CommitThread(format!("no new producer for a stuck one: {e}"))
                    })?;
            }
            return Err(e.into());
        }
        let committed = Committed {
            at_ms: now_millis(),
            took: job.started.elapsed(),
        };
        let reached = self.committer.take_delivered();
        self.store.write_shard_changes(
            sorted.iter().map(|(k, v)| (k, v.as_ref())),
            reached.iter().map(|(p, next)| (*p as ShardId, *next)),
        )?;
        Ok(committed)
    }
}

/// The transactional producer, transactions initialised (which fences an older one with the same
/// `transactional.id` and settles its open transaction), remembering where it wrote to the changelog.
fn producer(
    cfg: &Config,
    instance: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Committer, CommitError> {
    Committer::watching(
        cfg,
        instance,
        metrics.clone(),
        &Deadline::new(shutdown.clone(), cfg.processing.drain_timeout),
        Some(&cfg.changelog_topic()),
    )
}

/// The commit thread: commits batches one at a time, in order, for the life of the pipeline (one
/// long-lived thread: the records and changes a job frees were allocated on the poll thread, and a thread
/// per batch grew the allocator's arenas).
///
/// Dropping it ends the thread and waits for it: the producer and the store it owns are closed before the
/// pipeline returns, not raced by the process's exit (a RocksDB closed on a thread while the process
/// exits aborts in its mutexes; the crash test's SIGTERM caught it).
struct CommitThread {
    worker: Worker<Job, Result<Committed, PipelineError>>,
    /// An outcome received by [`CommitThread::finished`], not yet waited for.
    early: Option<Result<Committed, PipelineError>>,
}

impl CommitThread {
    fn start(mut committing: Committing) -> Result<Self, PipelineError> {
        let worker = Worker::start("stitcher-commit", move |job| committing.commit(job))
            .map_err(|e| PipelineError::CommitThread(e.to_string()))?;
        Ok(Self {
            worker,
            early: None,
        })
    }

    fn run(&self, job: Job) -> Result<(), PipelineError> {
        self.worker
            .send(job)
            .map_err(|Ended| PipelineError::CommitThread("ended".into()))
    }

    /// The outcome of the oldest job not yet waited for.
    fn wait(&mut self) -> Result<Committed, PipelineError> {
        match self.early.take() {
            Some(outcome) => outcome,
            None => self
                .worker
                .recv()
                .map_err(|Ended| PipelineError::CommitThread("ended without an outcome".into()))?,
        }
    }

    /// Whether the job handed over last has an outcome (kept for [`CommitThread::wait`]); without
    /// waiting.
    fn finished(&mut self) -> bool {
        if self.early.is_none() {
            self.early = self.worker.try_recv().ok().flatten();
        }
        self.early.is_some()
    }
}

/// What the metrics and totals want of a closed batch.
struct Closed {
    event_times: Vec<Millis>,
    messages: usize,
    records: usize,
}

impl Closed {
    /// Records the committed batch in the metrics and the totals.
    fn committed(&self, committed: Committed, metrics: &Metrics, summary: &mut RunSummary) {
        for ts in &self.event_times {
            metrics
                .event_latency
                .observe(((committed.at_ms - ts).max(0)) as f64 / 1000.0);
        }
        metrics.batch_duration.observe(committed.took.as_secs_f64());
        metrics.batch_size.observe(self.messages as f64);
        metrics.last_commit.set(committed.at_ms / 1000);
        summary.batches += 1;
        summary.messages += self.messages as u64;
        summary.records += self.records as u64;
    }
}

/// Every topic the pipeline consumes: the inputs, the control topic if configured, and the internal shard
/// topic.
pub(crate) fn subscribed_topics(cfg: &Config) -> Vec<String> {
    let shard_topic = Some(cfg.shard_topic());
    cfg.inputs
        .iter()
        .map(|i| i.topic.clone())
        .chain(Some(cfg.control.topic.clone()).filter(|t| !t.is_empty()))
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
    let topics = subscribed_topics(cfg);
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(consumer)
}

/// Records (changelog records and those they derive) per RocksDB write while restoring.
const RESTORE_CHUNK: usize = 10_000;

pub struct Pipeline {
    cfg: Config,
    store: Store,
    metrics: Metrics,
    engine: Engine,
    consumer: StitchConsumer,
    /// The batch being committed, if any.
    in_flight: Option<InFlight>,
    /// The thread that commits batches; it owns the transactional producer.
    commits: CommitThread,
    /// The thread that decodes input messages ahead of the batch.
    ahead: DecodeAhead,
    summary: RunSummary,
    /// The engine's shards, as the lookup API sees them.
    held: HeldShards,
    /// The consumer's rebalance count when `owned` was last brought in line with the assignment.
    synced_at: Option<u64>,
    /// Per assigned partition, the committed offset: a message before it (fetched before a rebalance) is
    /// not taken again.
    expected: BTreeMap<(String, i32), i64>,
    /// The message whose poll revealed a rebalance: the first of the next batch.
    carried: Option<OwnedMessage>,
    /// The keys the last batch touched: the next batch's overlay starts with room for as many.
    batch_keys: usize,
    /// The subscribed topics in the cluster's metadata, for the missing-topic readiness check.
    topics: TopicWatch,
    /// A consumer that never gets its partitions back is replaced.
    unassigned: AssignmentWatch,
    fences: FenceWatch,
    /// Whether another member is in the consumer group.
    peers: GroupPeers,
}

impl Pipeline {
    pub fn start(
        cfg: Config,
        store: Store,
        metrics: Metrics,
        instance: &str,
        held: HeldShards,
        shutdown: &CancellationToken,
    ) -> Result<Self, PipelineError> {
        check_internal_topics(&cfg)?;
        if store.shard_count()?.is_none() {
            store.put_shard_count(cfg.scaleout.shards)?;
        }
        let engine = Engine::new(&cfg, metrics.clone())?;
        let ahead = DecodeAhead::start(engine.decoder())?;
        let consumer = subscribed_consumer(&cfg, &metrics)?;
        let committing = Committing::start(&cfg, &store, instance, &metrics, shutdown)?;
        tracing::info!(
            shards = cfg.scaleout.shards,
            topic = cfg.shard_topic().as_str(),
            "shards of the graph"
        );
        let topics = TopicWatch::new(cfg.topic_roles().into_iter().map(|(_, t)| t).collect());
        Ok(Self {
            topics,
            unassigned: AssignmentWatch::default(),
            fences: FenceWatch::default(),
            peers: GroupPeers::default(),
            cfg,
            store,
            metrics,
            engine,
            consumer,
            in_flight: None,
            commits: CommitThread::start(committing)?,
            ahead,
            summary: RunSummary::default(),
            held,
            synced_at: None,
            expected: BTreeMap::new(),
            carried: None,
            batch_keys: 0,
        })
    }

    /// Runs until `shutdown`; the batch under way is finished and committed within the drain timeout.
    pub fn run(mut self, shutdown: CancellationToken) -> Result<RunSummary, PipelineError> {
        tracing::info!(inputs = self.cfg.inputs.len(), "pipeline running");
        while !shutdown.is_cancelled() {
            match self.run_batch(&shutdown) {
                Ok(()) => {}
                Err(PipelineError::StoppedTakingOver) => {
                    tracing::info!("stopped while taking shards over; the part restored is kept");
                }
                Err(e) => {
                    if let Err(also) = self.settle() {
                        tracing::warn!(error = %also, "the batch in flight did not commit either");
                    }
                    return Err(e);
                }
            }
        }
        self.settle()?;
        self.metrics.health.set_running(false);
        tracing::info!(
            batches = self.summary.batches,
            messages = self.summary.messages,
            "pipeline drained"
        );
        Ok(self.summary)
    }

    fn run_batch(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        self.metrics.health.turned();
        self.topics.look(&self.consumer, &self.metrics.health);
        if self.unassigned.stuck(
            &self.consumer,
            &self.cfg.kafka.group_id,
            &self.peers,
            &self.metrics.health,
        ) {
            self.metrics.errors.with_label_values(&["consume"]).inc();
            self.settle()?;
            return self.restart_consumer();
        }
        self.sync_assignment(shutdown)?;
        let generation = self.consumer.context().rebalances();
        let started = Instant::now();
        let linger_until = started + self.cfg.processing.batch_linger;
        let open_until = started + self.cfg.processing.batch_min_duration;
        let store = self.store.clone();
        let pending = self.in_flight.as_ref().map(|f| Arc::clone(&f.changes));
        let mut overlay = ShardOverlay::over(&store, pending).with_capacity(self.batch_keys);
        let mut batch = Batch::default();
        let mut work = Work::default();
        let mut rebalanced = false;
        // Polled messages go to the decode thread in chunks and come back decoded, in the order polled, to
        // be handled here (docs/DESIGN.md, "Decoding ahead").
        self.ahead.discard()?;
        let mut polled = Polled::default();
        if let Some(m) = self.carried.take() {
            polled.push(self, m);
        }
        while polled.count < self.cfg.processing.batch_max_events && !shutdown.is_cancelled() {
            let now = Instant::now();
            if now >= linger_until {
                break;
            }
            while let Some(chunk) = self.ahead.ready()? {
                self.take_all(&mut overlay, &mut batch, &mut work, chunk)?;
            }
            if polled.chunk.len() >= CHUNK {
                self.ahead.send(std::mem::take(&mut polled.chunk))?;
            }
            if self.ahead.in_flight() >= AHEAD {
                if let Some(chunk) = self.ahead.wait()? {
                    self.take_all(&mut overlay, &mut batch, &mut work, chunk)?;
                }
            }
            // Nothing would come of waiting once the batch before has committed and this one is
            // `batch_min_duration` old: the batch closes as soon as no message is ready (docs/DESIGN.md,
            // "Overlapped commits"). Nor while polled messages are at the decode thread: they are taken
            // back instead.
            let may_close = polled.count > 0 && self.commit_idle();
            let ready = may_close && now >= open_until;
            let busy = !polled.chunk.is_empty() || self.ahead.in_flight() > 0;
            let next = self.consumer.poll(if ready || busy {
                Duration::ZERO
            } else if may_close {
                open_until - now
            } else if polled.count > 0 {
                // The commit before is in flight and nothing wakes this poll when it ends: look again
                // soon, or the batch's last messages would wait out the linger.
                (linger_until - now).min(COMMIT_LOOK)
            } else {
                linger_until - now
            });
            // Rebalance callbacks run inside `poll`: whatever it returned comes from the new assignment.
            if self.consumer.context().rebalances() != generation {
                if let Some(Ok(m)) = &next {
                    self.carried = Some(m.detach());
                }
                rebalanced = true;
                break;
            }
            match next {
                None if !polled.chunk.is_empty() => {
                    self.ahead.send(std::mem::take(&mut polled.chunk))?;
                }
                None if self.ahead.in_flight() > 0 => {
                    if let Some(chunk) = self.ahead.wait()? {
                        self.take_all(&mut overlay, &mut batch, &mut work, chunk)?;
                    }
                }
                None if ready => break,
                None => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    self.metrics.errors.with_label_values(&["consume"]).inc();
                    drop(overlay);
                    self.settle()?;
                    if code == RDKafkaErrorCode::FencedInstanceId
                        && self.fences.another_process(Instant::now())
                    {
                        return Err(PipelineError::InstanceTaken(format!(
                            "kafka.instance_id {:?} is in use by another process in group {:?} (its \
                             consumer, group.instance.id {:?}, was fenced three times within two \
                             minutes): every instance needs a kafka.instance_id of its own",
                            self.cfg.kafka.instance_id,
                            self.cfg.kafka.group_id,
                            crate::kafka::group_instance_id(&self.cfg),
                        )));
                    }
                    tracing::warn!(?code, "consumer failed fatally; replacing it");
                    return self.restart_consumer();
                }
                Some(Err(e)) => {
                    self.metrics.errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(error = %e, "consume error");
                    if matches!(
                        e,
                        KafkaError::MessageConsumption(
                            RDKafkaErrorCode::UnknownTopicOrPartition
                                | RDKafkaErrorCode::UnknownTopic
                        )
                    ) {
                        self.topics.doubt();
                    }
                }
                Some(Ok(m)) => polled.push(self, m.detach()),
            }
        }
        if !rebalanced {
            // The batch closes with every message polled for it handled.
            self.ahead.send(std::mem::take(&mut polled.chunk))?;
            while let Some(chunk) = self.ahead.wait()? {
                self.take_all(&mut overlay, &mut batch, &mut work, chunk)?;
            }
            batch.positions = polled.next;
        }
        if rebalanced {
            // Partitions moved while this batch was built: it may hold messages of partitions that are no
            // longer ours. Nothing of it is in Kafka or in local state; the new assignment starts from the
            // committed offsets.
            if !batch.is_empty() {
                tracing::info!(
                    messages = batch.messages,
                    "rebalance during the batch; dropping it"
                );
            }
            return Ok(());
        }
        if batch.is_empty() {
            // Idle: the batch in flight is finished rather than left half done.
            drop(overlay);
            self.settle()?;
            return Ok(());
        }
        self.engine
            .sweep(&mut overlay, batch.messages, now_millis())?;
        self.engine.mark_shard_count(&mut overlay)?;
        let records = self.engine.output(&overlay, &mut batch, &mut work)?;
        self.batch_keys = overlay.keys();
        let changes = overlay.into_changes()?;
        fence_changed_shards(
            &mut batch.positions,
            &changes,
            self.engine.shard_topic(),
            &self.expected,
        );
        if !self.settle()? {
            // Built on a batch that did not commit: read again with it.
            return Ok(());
        }
        for (tp, next) in &batch.positions {
            self.expected.insert(tp.clone(), *next);
        }
        self.commit_behind(batch, records, changes, started, generation)
    }

    /// Starts the commit of a closed batch, then its local write, on the commit thread.
    fn commit_behind(
        &mut self,
        batch: Batch,
        records: Vec<OutRecord>,
        changes: Changes,
        started: Instant,
        generation: u64,
    ) -> Result<(), PipelineError> {
        let changes = Arc::new(changes);
        let positions = positions_vec(&batch.positions);
        // Taken now: a rebalance from here on makes the coordinator refuse these offsets.
        let group = self.consumer.group_metadata().map(Arc::new);
        // With the changelog records the commit thread adds.
        let count = records.len() + changes.len();
        self.commits.run(Job {
            records,
            positions,
            group,
            changes: Arc::clone(&changes),
            started,
        })?;
        self.in_flight = Some(InFlight {
            changes,
            closed: Closed {
                event_times: batch.event_times,
                messages: batch.messages,
                records: count,
            },
            generation,
        });
        Ok(())
    }

    /// Whether no commit is in flight: none was handed over, or its outcome is in.
    fn commit_idle(&mut self) -> bool {
        self.in_flight.is_none() || self.commits.finished()
    }

    /// Waits for the batch in flight, if any. True if it committed (or nothing was in flight); false if it
    /// did not, so that it and whatever was built on it are read again from the committed offsets (by a
    /// new consumer, or by this one if it rejoined since the batch closed).
    fn settle(&mut self) -> Result<bool, PipelineError> {
        let Some(InFlight {
            closed, generation, ..
        }) = self.in_flight.take()
        else {
            return Ok(true);
        };
        let e = match self.commits.wait() {
            Ok(committed) => {
                closed.committed(committed, &self.metrics, &mut self.summary);
                return Ok(true);
            }
            Err(PipelineError::Commit(e)) => e,
            Err(other) => return Err(other),
        };
        if matches!(e, CommitError::Fatal(_) | CommitError::Deadline(_)) {
            return Err(e.into());
        }
        // Not committed, so not in local state either (a stuck producer was replaced on the commit thread).
        self.metrics.health.commit_settled();
        // Refused for a rebalance this consumer went through since the batch closed: an eager rebalance
        // revoked every partition and assigned them again from the committed offsets, which this batch did
        // not move, so the consumer reads it again as it is and only the shards and expected offsets are
        // synced again. Replacing it would be one more rejoin, and a new static member taking over
        // mid-rebalance left the group waiting for the old one (the group test's flake).
        let rejoined = matches!(e, CommitError::Rejoin(_))
            && self.consumer.context().rebalances() != generation
            && matches!(self.consumer.rebalance_protocol(), RebalanceProtocol::Eager);
        tracing::warn!(error = %e, rejoined, "batch not committed; reading it again");
        if rejoined {
            self.synced_at = None;
        } else {
            self.restart_consumer()?;
        }
        Ok(false)
    }

    /// Adds decoded messages to the batch, in the order they were polled.
    fn take_all(
        &self,
        overlay: &mut ShardOverlay<'_>,
        batch: &mut Batch,
        work: &mut Work,
        chunk: DecodedChunk,
    ) -> Result<(), PipelineError> {
        for (m, decoded) in chunk {
            self.engine
                .take_decoded(overlay, batch, work, InMessage::of(&m), decoded)?;
        }
        Ok(())
    }

    /// A new consumer, which reads from the committed offsets; shards are restored again when assigned
    /// (from where the local copy stands: usually nothing to read).
    fn restart_consumer(&mut self) -> Result<(), PipelineError> {
        self.expected.clear();
        self.carried = None;
        self.consumer = subscribed_consumer(&self.cfg, &self.metrics)?;
        self.engine.owned.clear();
        self.held.publish(&self.engine.owned);
        self.synced_at = None;
        self.metrics.shards_owned.set(0);
        Ok(())
    }

    /// Brings the shards handled here in line with the consumer's assignment after a rebalance.
    fn sync_assignment(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        if self.synced_at == Some(self.consumer.context().rebalances()) {
            return Ok(());
        }
        // The restore starts from the local copy's position: the commit in flight decides it.
        self.settle()?;
        let generation = self.consumer.context().rebalances();
        // Every shard is caught up again, also those assigned before: between two looks at the assignment
        // a shard may have been handled elsewhere and come back. A restore reads only what this instance's
        // copy lacks, usually nothing.
        self.engine.owned.clear();
        self.held.publish(&self.engine.owned);
        let assignment = self.consumer.assignment()?;
        let (assigned, beyond): (Vec<ShardId>, Vec<ShardId>) = assignment
            .elements_for_topic(self.engine.shard_topic())
            .iter()
            .filter_map(|e| ShardId::try_from(e.partition()).ok())
            .partition(|s| *s < self.cfg.scaleout.shards);
        if !beyond.is_empty() {
            // Partitions added to the shard topic while the service runs: no identifier is placed there.
            // The next start refuses the topic ([`check_internal_topics`]).
            tracing::error!(
                partitions = ?beyond,
                topic = self.engine.shard_topic(),
                shards = self.cfg.scaleout.shards,
                "partitions of the shard topic beyond the shard count: ignored"
            );
        }
        self.expected.clear();
        if assignment.count() == 0 {
            self.synced(generation);
            return Ok(());
        }
        if !assigned.is_empty() {
            self.metrics.health.set_running(false);
        }
        let started = Instant::now();
        let committed = self.stable_offsets(&assignment, shutdown)?;
        if !assigned.is_empty() {
            self.restore(&assigned, started, shutdown)?;
            self.engine.owned.extend(assigned);
        }
        for e in committed.elements() {
            // A partition never committed starts at its beginning.
            let next = match e.offset() {
                Offset::Offset(o) => o,
                _ => {
                    watermarks(
                        &self.consumer,
                        e.topic(),
                        e.partition(),
                        Duration::from_secs(10),
                    )?
                    .0
                }
            };
            self.expected
                .insert((e.topic().to_string(), e.partition()), next);
        }
        self.synced(generation);
        Ok(())
    }

    /// The shards in `owned` are ready: publishes them and reports ready.
    fn synced(&mut self, generation: u64) {
        self.metrics
            .shards_owned
            .set(self.engine.owned.len() as i64);
        self.held.publish(&self.engine.owned);
        self.metrics.health.set_running(true);
        self.synced_at = Some(generation);
    }

    /// The committed offsets of `assignment`, stable (KIP-447): known once a transaction of a previous owner
    /// of these partitions is over, so the changelog records of the shards' previous owners are final. That
    /// can take twice the transaction timeout (a killed owner's is aborted by the coordinator), so they are
    /// asked for in turns of [`STABLE_TURN`], and a stop ends the wait.
    fn stable_offsets(
        &self,
        assignment: &TopicPartitionList,
        shutdown: &CancellationToken,
    ) -> Result<TopicPartitionList, PipelineError> {
        let deadline = Instant::now() + self.cfg.processing.transaction_timeout * 2;
        loop {
            let turn = deadline
                .saturating_duration_since(Instant::now())
                .min(STABLE_TURN);
            match self.consumer.committed_offsets(assignment.clone(), turn) {
                Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut))
                    if Instant::now() < deadline =>
                {
                    if shutdown.is_cancelled() {
                        return Err(PipelineError::StoppedTakingOver);
                    }
                }
                other => return Ok(other?),
            }
        }
    }

    /// Restores shards from their changelog partitions, from where the local copy stands to the end, once
    /// their previous owners' transactions are over (see [`Self::sync_assignment`]). The time reported runs
    /// from `started`, the start of that wait.
    fn restore(
        &self,
        shards: &[ShardId],
        started: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), PipelineError> {
        let restorer: BaseConsumer<QuietEof> =
            restore_config(&self.cfg).create_with_context(QuietEof)?;
        // The end to read to is the log's, not the last stable offset the restorer would be told: records
        // committed after a transaction that is still open (a killed owner's, aborted at its timeout) are
        // past that offset, and the shard's next owner wrote them.
        let ends: BaseConsumer<QuietEof> = restore_config(&self.cfg)
            .set("isolation.level", "read_uncommitted")
            .create_with_context(QuietEof)?;
        let mut start = TopicPartitionList::new();
        let mut high = BTreeMap::new();
        let mut bounds = BTreeMap::new();
        for s in shards {
            let p = *s as i32;
            let (low, hw) = watermarks(&ends, self.engine.changelog(), p, Duration::from_secs(30))?;
            bounds.insert(*s, (self.store.changelog_position(*s)?, low, hw));
        }
        let below: BTreeMap<i32, i64> = bounds
            .iter()
            .filter_map(|(s, (local, low, hw))| match local {
                Some(at) if at > low && at <= hw => Some((*s as i32, at - 1)),
                _ => None,
            })
            .collect();
        let aborted = self.aborted_below(&ends, &restorer, &below, shutdown)?;
        for (s, (local, low, hw)) in bounds {
            let p = s as i32;
            let from = match local {
                Some(at) if at >= low && at <= hw && !aborted.contains(&p) => at,
                local => {
                    if aborted.contains(&p) {
                        tracing::error!(
                            shard = s,
                            record = below.get(&p).copied().unwrap_or_default(),
                            "the local copy of the shard holds changes of an aborted transaction \
                             (its commit was reported done); restoring the shard from the start"
                        );
                        self.metrics.state_rewound.inc();
                    } else if local.is_some() {
                        tracing::warn!(
                            shard = s,
                            "local copy of the shard is outside its changelog; restoring from the start"
                        );
                    }
                    self.store.wipe_shard(s)?;
                    low
                }
            };
            if from < hw {
                start.add_partition_offset(self.engine.changelog(), p, Offset::Offset(from))?;
                high.insert(p, hw);
            }
        }
        let mut applied = 0u64;
        if start.count() > 0 {
            restorer.assign(&start)?;
            applied = self.read_changelog(&restorer, &mut high, shutdown)?;
            // It may have brought in event ids as a version before wrote them.
            self.store.forget_prefixes();
        }
        let elapsed = started.elapsed();
        self.metrics.restored_records.inc_by(applied);
        for _ in shards {
            self.metrics
                .restore_duration
                .observe(elapsed.as_secs_f64() / shards.len() as f64);
        }
        tracing::info!(
            instance = %self.cfg.kafka.instance_id,
            shards = ?shards,
            records = applied,
            elapsed_ms = elapsed.as_millis() as u64,
            records_per_second = (applied as f64 / elapsed.as_secs_f64().max(1e-3)) as u64,
            "shards restored"
        );
        Ok(())
    }

    /// How long a restore read waits for a transaction still open on a changelog partition: a killed
    /// owner's is aborted by the coordinator after the transaction timeout plus its sweep for timed-out
    /// transactions, twice that at most.
    fn restore_deadline(&self) -> Instant {
        Instant::now() + self.cfg.processing.transaction_timeout * 2 + ABORT_SWEEP
    }

    /// The changelog partitions among `below` (partition, offset of the last record the local copy holds)
    /// where that record is in the log but a committed read skips it: its transaction was aborted after
    /// this instance's commit of it was reported done (docs/DESIGN.md, "Restore"). A record not found
    /// uncommitted (a marker, or compacted away) cannot be checked and counts as committed. The committed
    /// read waits for a transaction still open there, as the restore does.
    fn aborted_below(
        &self,
        uncommitted: &BaseConsumer<QuietEof>,
        committed: &BaseConsumer<QuietEof>,
        below: &BTreeMap<i32, i64>,
        shutdown: &CancellationToken,
    ) -> Result<BTreeSet<i32>, PipelineError> {
        if below.is_empty() {
            return Ok(BTreeSet::new());
        }
        let topic = self.engine.changelog();
        let deadline = self.restore_deadline();
        let in_log = first_offsets(uncommitted, topic, below, deadline, shutdown)?;
        let present: BTreeMap<i32, i64> = below
            .iter()
            .filter(|(p, at)| in_log.get(p) == Some(&Some(**at)))
            .map(|(p, at)| (*p, *at))
            .collect();
        if present.is_empty() {
            return Ok(BTreeSet::new());
        }
        let read = first_offsets(committed, topic, &present, deadline, shutdown)?;
        Ok(present
            .iter()
            .filter(|(p, at)| read.get(p) != Some(&Some(**at)))
            .map(|(p, _)| *p)
            .collect())
    }

    /// Applies changelog records until every partition in `high` reached its high watermark. The restorer
    /// reads committed records only, so a partition with an open transaction below its watermark (a killed
    /// owner's that had not committed offsets yet: a live owner's in flight was waited for by the stable
    /// offset fetch, [`fence_changed_shards`]) is waited for until the coordinator aborts it, at most the
    /// transaction timeout plus its sweep for timed-out transactions; gives up after twice the timeout
    /// plus [`ABORT_SWEEP`].
    fn read_changelog(
        &self,
        restorer: &BaseConsumer<QuietEof>,
        high: &mut BTreeMap<i32, i64>,
        shutdown: &CancellationToken,
    ) -> Result<u64, PipelineError> {
        let deadline = self.restore_deadline();
        let mut restore = Restore::default();
        let mut reached: BTreeMap<i32, i64> = BTreeMap::new();
        while !high.is_empty() {
            if shutdown.is_cancelled() {
                return Err(PipelineError::StoppedTakingOver);
            }
            if Instant::now() > deadline {
                return Err(PipelineError::Restore(format!(
                    "changelog partitions {:?} of {} did not reach their end: an open transaction \
                     that never ends? `kafka-transactions.sh find-hanging` finds a hanging one \
                     (README, \"Delivery guarantees\")",
                    high.keys().collect::<Vec<_>>(),
                    self.engine.changelog()
                )));
            }
            match restorer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let key = m.key().unwrap_or_default();
                    refuse_former_format(key)?;
                    if let Some(what) =
                        misplaced(key, m.payload(), m.partition(), self.cfg.scaleout.shards)
                    {
                        return Err(PipelineError::ShardCount(format!(
                            "partition {} of {} holds {what}: the changelog was written with another \
                             shard count than scaleout.shards = {} (were partitions added to the \
                             internal topics?). Identifiers are placed by hash modulo the shard count, \
                             so it is fixed for the life of the state: replay the input topics into a \
                             new deployment (README \"Changing the number of shards\")",
                            m.partition(),
                            self.engine.changelog(),
                            self.cfg.scaleout.shards
                        )));
                    }
                    restore.apply(&self.store, key.to_vec(), m.payload().map(<[u8]>::to_vec))?;
                    reached.insert(m.partition(), m.offset() + 1);
                    if m.offset() + 1 >= high.get(&m.partition()).copied().unwrap_or(0) {
                        high.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    let at = position(restorer, self.engine.changelog(), p)?;
                    if let (Some(at), Some(hw)) = (at, high.get(&p).copied()) {
                        if at >= hw {
                            reached.insert(p, at);
                            high.remove(&p);
                        }
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    // Past the last record, a partition may end on transaction markers: done once the
                    // fetch position reached the watermark.
                    let positions = restorer.position()?;
                    high.retain(|p, hw| {
                        let at = positions
                            .find_partition(self.engine.changelog(), *p)
                            .and_then(|e| e.offset().to_raw());
                        match at {
                            Some(at) if at >= *hw => {
                                reached.insert(*p, at);
                                false
                            }
                            _ => true,
                        }
                    });
                }
            }
            if restore.held() >= RESTORE_CHUNK || high.is_empty() {
                self.store.write_shard_changes(
                    restore.take(),
                    reached.iter().map(|(p, at)| (*p as ShardId, *at)),
                )?;
            }
        }
        Ok(restore.applied)
    }
}

/// Where `consumer` fetches partition `p` of `topic` next (`None`: no position yet).
fn position(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    p: i32,
) -> Result<Option<i64>, KafkaError> {
    Ok(consumer
        .position()?
        .find_partition(topic, p)
        .and_then(|e| e.offset().to_raw()))
}

/// Per partition of `topic` in `from`, the offset of the first record `consumer` returns from there (`None`:
/// none before the end of the partition, which for a committed read is the last stable offset: a record in
/// a transaction still open is waited for). Leaves the consumer unassigned.
fn first_offsets(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    from: &BTreeMap<i32, i64>,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Result<BTreeMap<i32, Option<i64>>, PipelineError> {
    let mut tpl = TopicPartitionList::new();
    for (p, at) in from {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*at))?;
    }
    consumer.assign(&tpl)?;
    let mut first = BTreeMap::new();
    while first.len() < from.len() {
        if shutdown.is_cancelled() {
            return Err(PipelineError::StoppedTakingOver);
        }
        if Instant::now() > deadline {
            return Err(PipelineError::Restore(format!(
                "changelog partitions of {topic} did not answer from {from:?}: an open transaction \
                 that never ends? `kafka-transactions.sh find-hanging` finds a hanging one (README, \
                 \"Delivery guarantees\")"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                first.entry(m.partition()).or_insert(Some(m.offset()));
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // A committed read stops at the last stable offset: it reached the end only once its
                // position went past the offset asked for (what lies there was skipped as aborted).
                let past = position(consumer, topic, p)?
                    .zip(from.get(&p))
                    .is_some_and(|(at, asked)| at > *asked);
                if past {
                    first.entry(p).or_insert(None);
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(first)
}

/// Adds to a batch's positions the shard topic's partition of every shard whose state the batch changed,
/// at the offset expected there when the batch consumed none of it. The transaction then holds a pending
/// offset on the partition of every shard whose changelog records it writes, and a new owner's stable
/// offset fetch waits for it before the restore (DESIGN, "Restore"); without it the rebalance did not wait
/// for the commit in flight and the restore could end before its records.
fn fence_changed_shards(
    positions: &mut BTreeMap<(String, i32), i64>,
    changes: &Changes,
    shard_topic: &str,
    expected: &BTreeMap<(String, i32), i64>,
) {
    let shards: BTreeSet<ShardId> = changes.keys().filter_map(|k| shard_of_key(k)).collect();
    for shard in shards {
        let tp = (shard_topic.to_string(), shard as i32);
        if positions.contains_key(&tp) {
            continue;
        }
        match expected.get(&tp) {
            Some(next) => {
                positions.insert(tp, *next);
            }
            None => tracing::warn!(shard, "a changed shard has no expected offset to commit"),
        }
    }
}

/// How late past its timeout the transaction coordinator may abort a transaction: it looks for timed-out
/// ones every `transaction.abort.timed.out.transaction.cleanup.interval.ms` (10 s by default), twice that.
const ABORT_SWEEP: Duration = Duration::from_secs(20);

/// Refuses a state directory this configuration cannot take: one of the former one-instance mode, or one
/// made with another shard count. Checked once the state is open, before anything connects.
pub fn check_state(cfg: &Config, store: &Store) -> Result<(), PipelineError> {
    if store.has_former_state()? {
        return Err(PipelineError::WrongMode(format!(
            "{} holds the state of stitcher 0.3's one-instance mode, which this version does not \
             read: its state is kept in shards restored from Kafka. Start with an empty state \
             directory under a new consumer group and output topic and let it replay the input \
             topics (README \"Upgrading\")",
            cfg.state.dir.display()
        )));
    }
    match store.shard_count()? {
        Some(n) if n != cfg.scaleout.shards => Err(PipelineError::ShardCount(format!(
            "{} was made with {n} shards and the configuration says {}: identifiers are placed by \
             hash modulo the shard count, so it is fixed for the life of the state. To change it, \
             replay the input topics into a new deployment (README \"Changing the number of \
             shards\"), or set scaleout.shards = {n}",
            cfg.state.dir.display(),
            cfg.scaleout.shards
        ))),
        _ => Ok(()),
    }
}

/// Refuses internal topics that cannot hold the shards: a shard topic or changelog whose partition count
/// is not the shard count (shard s is partition s of both; docs/DESIGN.md, "Dedup retention and the shard
/// count"), or a control topic of more than one partition (commands would not apply in the order sent).
/// A topic that does not exist yet is left to [`TopicWatch`] and the restore. (The changelog's cleanup
/// policy is read with the other topic configurations at start-up: `app::check_changelog_policy`.)
fn check_internal_topics(cfg: &Config) -> Result<(), PipelineError> {
    let client: BaseConsumer<QuietEof> = restore_config(cfg).create_with_context(QuietEof)?;
    let partitions = |topic: &str| partition_count(client.client(), topic, Duration::from_secs(30));
    let shards = cfg.scaleout.shards;
    for topic in [cfg.shard_topic(), cfg.changelog_topic()] {
        match partitions(&topic)? {
            Some(n) if n != shards as usize => {
                return Err(PipelineError::InternalTopics(format!(
                    "{topic} has {n} partitions and scaleout.shards = {shards}: shard s is partition s \
                     of the shard topic and of its changelog, so each needs exactly {shards}. Set \
                     scaleout.shards to the count this deployment was made with, or to change the \
                     count replay the input topics into a new deployment (README \"Changing the number \
                     of shards\")"
                )));
            }
            _ => {}
        }
    }
    let control = &cfg.control.topic;
    if !control.is_empty() {
        if let Some(n) = partitions(control)?.filter(|n| *n > 1) {
            return Err(PipelineError::InternalTopics(format!(
                "{control} (control.topic) has {n} partitions: commands apply in the order they were \
                 sent only within one partition (an unsuppress could come before the erasure it \
                 undoes). Give control.topic a topic of one partition"
            )));
        }
    }
    Ok(())
}

/// A consumer outside the group, reading changelog partitions as committed.
fn restore_config(cfg: &Config) -> ClientConfig {
    let mut c = base_config(cfg);
    c.set(
        "group.id",
        format!("{}-restore-{}", cfg.kafka.group_id, cfg.kafka.instance_id),
    )
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "true")
    .set("isolation.level", "read_committed")
    .set("auto.offset.reset", "earliest");
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TempStore;

    /// A report of the error chain (what `main` prints) names each cause once.
    #[test]
    fn an_error_report_names_its_cause_once() {
        let cause = postcard::Error::SerializeBufferFull.to_string();
        let e = PipelineError::from(ProcessError::from(StoreError::from(
            postcard::Error::SerializeBufferFull,
        )));
        let report = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(report.matches(&cause).count(), 1, "{report}");
        assert!(
            report.starts_with("processing: state: cannot encode state: "),
            "{report}"
        );
    }

    /// Every shard a batch changed is in its positions: at the batch's own offset when it consumed messages
    /// of the shard, else at the one expected (committed again, unchanged); shards it did not change are
    /// not.
    #[test]
    fn a_batch_commits_an_offset_of_every_shard_it_changed() {
        let tp = |t: &str, p: i32| (t.to_string(), p);
        let key = |shard: ShardId, rest: &[u8]| [&shard.to_be_bytes()[..], rest].concat();
        let expected: BTreeMap<_, _> = [
            (tp("shards", 0), 10),
            (tp("shards", 1), 20),
            (tp("shards", 2), 30),
            (tp("web", 0), 5),
        ]
        .into();
        let mut positions: BTreeMap<_, _> = [(tp("web", 0), 7), (tp("shards", 1), 25)].into();
        let mut changes = Changes::default();
        changes.insert(key(0, b"\x01a"), Some(vec![1]));
        changes.insert(key(0, b"\x02b"), None);
        changes.insert(key(1, b"\x01c"), Some(vec![2]));
        fence_changed_shards(&mut positions, &changes, "shards", &expected);
        let want: BTreeMap<_, _> = [
            (tp("web", 0), 7),
            (tp("shards", 0), 10),
            (tp("shards", 1), 25),
        ]
        .into();
        assert_eq!(positions, want);
    }

    fn start_error(cfg: &Config, store: &Store) -> String {
        check_state(cfg, store)
            .expect_err("took a state it cannot")
            .to_string()
    }

    /// A state directory of the former one-instance mode, or one made with another shard count, is
    /// refused before anything connects, saying what to do.
    #[test]
    fn state_of_another_mode_or_shard_count_is_refused() {
        let cfg = Config::default();
        let former = TempStore::new().expect("store");
        let path = former.path().to_path_buf();
        drop(former.store);
        {
            let mut opts = rocksdb::Options::default();
            opts.create_missing_column_families(true);
            let db = rocksdb::DB::open_cf(&opts, &path, ["meta", "shards", "identifiers"])
                .expect("former state");
            drop(db);
        }
        let store = Store::open(&path, 8).expect("open");
        let why = start_error(&cfg, &store);
        assert!(why.contains("one-instance mode"), "{why}");
        assert!(why.contains("empty state directory"), "{why}");

        let other = TempStore::new().expect("store");
        other.store.put_shard_count(4).expect("count");
        let mut twelve = cfg.clone();
        twelve.scaleout.shards = 12;
        let why = start_error(&twelve, &other.store);
        assert!(why.contains("made with 4 shards"), "{why}");
        assert!(why.contains("Changing the number of shards"), "{why}");
    }
}
