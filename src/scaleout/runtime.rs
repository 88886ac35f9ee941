//! The scale-out pipeline: instances of one consumer group share the input partitions and the shards (the
//! partitions of the internal topic), as Kafka assigns them. Per batch, in one Kafka transaction: the
//! consumed offsets (inputs and internal topic), the messages for shards held elsewhere, the shard state
//! changes (changelog records), profile updates, redirects and dead letters. The local RocksDB copy of the
//! shards is written after the commit, with the changelog offsets it reached.
//!
//! A message for a shard this instance holds is handled at once, in the batch that produced it: with one
//! instance the internal topic carries nothing. A batch built across a rebalance is dropped (nothing of it
//! is in Kafka or in local state); the new assignment starts from the committed offsets. A shard this
//! instance did not hold before is restored from its changelog before anything is handled. docs/DESIGN.md,
//! "Scale-out", explains why this is exactly-once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use rocksdb::WriteBatch;
use tokio_util::sync::CancellationToken;

use super::lookup::HeldShards;
use super::owner::{Msg, Out, Shard, Step};
use super::state::{refuse_former_format, shard_of_key, ShardOverlay, ShardRead, ShardView};
use super::{event_home, home, ShardId};
use crate::codec::update::ProfileRecord;
use crate::config::Config;
use crate::kafka::reader::QuietEof;
use crate::kafka::{
    base_config, AssignmentWatch, CommitError, Committer, Deadline, GroupPeers, StitchConsumer,
    TopicWatch,
};
use crate::metrics::Metrics;
use crate::model::{now_millis, NodeId, ProfileId};
use crate::pipeline::{
    batch_committed, subscribed_consumer, subscribed_topics, PipelineError, RunSummary,
};
use crate::processor::{
    positions_vec, source, Batch, Control, InMessage, Processor, ProfileReader, ProfileSource,
};
use crate::profile::Profile;
use crate::stitch::{Applied, BatchChanges, Reshape};
use crate::store::{decode_value, encode_value, OutRecord, Store, StoreError};

/// Changelog records applied per RocksDB write while restoring.
const RESTORE_CHUNK: usize = 10_000;

/// What a batch produced besides state changes.
#[derive(Default)]
struct Work {
    /// Messages for shards held elsewhere.
    remote: Vec<OutRecord>,
    /// What the batch changed, over batch-wide node numbers ([`global`]).
    changes: BatchChanges,
    /// Components that left a shard held here for one held elsewhere: their profile as they left.
    departed: BTreeMap<NodeId, Profile>,
}

/// A node of a shard as a batch-wide node number: the shard in the top 24 bits.
fn global(shard: ShardId, node: NodeId) -> NodeId {
    NodeId(u64::from(shard) << 40 | node.0)
}

fn local(node: NodeId) -> (ShardId, NodeId) {
    ((node.0 >> 40) as ShardId, NodeId(node.0 & ((1 << 40) - 1)))
}

/// An outcome of the classic stitcher at `shard`, its nodes made batch-wide.
fn globalize_reshape(shard: ShardId, mut r: Reshape) -> Reshape {
    for split in &mut r.splits {
        for n in &mut split.into {
            *n = global(shard, *n);
        }
    }
    for n in &mut r.quarantined {
        *n = global(shard, *n);
    }
    for (_, n) in &mut r.retired {
        *n = global(shard, *n);
    }
    r
}

fn globalize(shard: ShardId, mut a: Applied) -> Applied {
    a.node = global(shard, a.node);
    for n in &mut a.absorbed_nodes {
        *n = global(shard, *n);
    }
    a.reshape = globalize_reshape(shard, a.reshape);
    a
}

/// The profiles as a batch leaves them, over the shards held here and the components that left.
struct BatchProfiles<'a, 's> {
    overlay: &'a ShardOverlay<'s>,
    owned: &'a BTreeSet<ShardId>,
    departed: &'a BTreeMap<NodeId, Profile>,
}

impl ProfileSource for BatchProfiles<'_, '_> {
    fn live_node(&self, id: &ProfileId) -> Result<Option<NodeId>, StoreError> {
        for s in self.owned {
            let read = ShardRead {
                kv: self.overlay,
                shard: *s,
            };
            if let Some(n) = read.indexed(id)? {
                return Ok(Some(global(*s, n)));
            }
        }
        Ok(None)
    }

    fn with_profile(
        &self,
        node: NodeId,
        f: &mut ProfileReader<'_>,
    ) -> Result<Option<(ProfileId, ProfileRecord)>, StoreError> {
        let (shard, n) = local(node);
        let read = ShardRead {
            kv: self.overlay,
            shard,
        };
        match read.profile(n)? {
            Some(p) => Ok(f(Some(&p))),
            None => Ok(f(self.departed.get(&node))),
        }
    }
}

pub struct ShardedPipeline {
    cfg: Config,
    store: Store,
    metrics: Metrics,
    processor: Processor,
    consumer: StitchConsumer,
    committer: Committer,
    instance: String,
    shards: ShardId,
    topic: String,
    changelog: String,
    /// Shards restored and handled here, under the current assignment.
    owned: BTreeSet<ShardId>,
    /// `owned`, as the lookup API sees it.
    held: HeldShards,
    /// The consumer's rebalance count when `owned` was last brought in line with the assignment.
    synced_at: Option<u64>,
    /// Per assigned partition, the committed offset: a message before it (fetched before a rebalance) is
    /// not taken again.
    expected: BTreeMap<(String, i32), i64>,
    /// The message whose poll revealed a rebalance: the first of the next batch.
    carried: Option<OwnedMessage>,
    /// The subscribed topics in the cluster's metadata, for the missing-topic readiness check.
    topics: TopicWatch,
    /// A consumer that never gets its partitions back is replaced.
    unassigned: AssignmentWatch,
    /// Whether another member is in the consumer group.
    peers: GroupPeers,
}

impl ShardedPipeline {
    pub fn start(
        cfg: Config,
        store: Store,
        metrics: Metrics,
        instance: &str,
        held: HeldShards,
        shutdown: &CancellationToken,
    ) -> Result<Self, PipelineError> {
        if store.checkpoint()?.is_some() {
            return Err(PipelineError::WrongMode(format!(
                "{} holds the state of one instance (no [scaleout]); scale-out mode keeps its state in \
                 shards restored from Kafka and cannot take it over. Start each instance with an empty \
                 state directory under a new consumer group and output topic and let them replay the \
                 input topics (README \"Scale-out\")",
                cfg.state.dir.display()
            )));
        }
        let processor = Processor::new(&cfg, metrics.clone())?;
        let consumer = subscribed_consumer(&cfg, &metrics)?;
        let changelog = cfg.scaleout.changelog_topic();
        let committer = Committer::watching(
            &cfg,
            instance,
            metrics.clone(),
            &Deadline::new(shutdown.clone(), cfg.processing.drain_timeout),
            Some(&changelog),
        )?;
        tracing::info!(
            shards = cfg.scaleout.shards,
            topic = cfg.scaleout.topic.as_str(),
            "scale-out mode"
        );
        let topics = TopicWatch::new(
            subscribed_topics(&cfg)
                .into_iter()
                .map(str::to_string)
                .collect(),
        );
        Ok(Self {
            topics,
            unassigned: AssignmentWatch::default(),
            peers: GroupPeers::default(),
            shards: cfg.scaleout.shards,
            topic: cfg.scaleout.topic.clone(),
            changelog,
            cfg,
            store,
            metrics,
            processor,
            consumer,
            committer,
            instance: instance.to_string(),
            owned: BTreeSet::new(),
            held,
            synced_at: None,
            expected: BTreeMap::new(),
            carried: None,
        })
    }

    /// Runs until `shutdown`; the batch under way is finished and committed within the drain timeout.
    pub fn run(mut self, shutdown: CancellationToken) -> Result<RunSummary, PipelineError> {
        let mut summary = RunSummary::default();
        tracing::info!(inputs = self.cfg.inputs.len(), "sharded pipeline running");
        while !shutdown.is_cancelled() {
            self.run_batch(&shutdown, &mut summary)?;
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
        self.topics.partitions(&self.consumer, &self.metrics.health);
        if self.unassigned.stuck(
            &self.consumer,
            &self.cfg.kafka.group_id,
            &self.peers,
            &self.metrics.health,
        ) {
            self.metrics.errors.with_label_values(&["consume"]).inc();
            return self.restart_consumer();
        }
        self.sync_assignment(shutdown)?;
        let generation = self.consumer.context().rebalances();
        let started = Instant::now();
        let linger_until = started + self.cfg.processing.batch_linger;
        let store = self.store.clone();
        let mut overlay = ShardOverlay::new(&store);
        let mut batch = Batch::default();
        let mut work = Work::default();
        let mut rebalanced = false;
        if let Some(m) = self.carried.take() {
            self.take(&mut overlay, &mut batch, &mut work, &m)?;
        }
        while batch.messages < self.cfg.processing.batch_max_events && !shutdown.is_cancelled() {
            let now = Instant::now();
            if now >= linger_until {
                break;
            }
            let polled = self.consumer.poll(linger_until - now);
            // Rebalance callbacks run inside `poll`: whatever it returned comes from the new assignment.
            if self.consumer.context().rebalances() != generation {
                if let Some(Ok(m)) = &polled {
                    self.carried = Some(m.detach());
                }
                rebalanced = true;
                break;
            }
            match polled {
                None => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    self.metrics.errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(?code, "consumer failed fatally; replacing it");
                    drop(overlay);
                    return self.restart_consumer();
                }
                Some(Err(e)) => {
                    self.metrics.errors.with_label_values(&["consume"]).inc();
                    tracing::warn!(error = %e, "consume error");
                }
                Some(Ok(m)) => {
                    self.take(&mut overlay, &mut batch, &mut work, &m)?;
                }
            }
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
            return Ok(());
        }
        let records = self.output(&overlay, &mut batch, &mut work)?;
        let positions = positions_vec(&batch.positions);
        let deadline = Deadline::new(shutdown.clone(), self.cfg.processing.drain_timeout);
        match self
            .committer
            .commit(&records, &positions, &self.consumer, &deadline)
        {
            Ok(()) => {}
            Err(e @ CommitError::Fatal(_)) | Err(e @ CommitError::Deadline(_)) => {
                return Err(e.into())
            }
            Err(e) => {
                // Not committed, so not in local state either: read the batch again from the committed
                // offsets, with a new producer if the old one is stuck.
                tracing::warn!(error = %e, "batch not committed; reading it again");
                if matches!(e, CommitError::Stuck(_)) {
                    self.committer = Committer::watching(
                        &self.cfg,
                        &self.instance,
                        self.metrics.clone(),
                        &deadline,
                        Some(&self.changelog),
                    )?;
                }
                drop(overlay);
                // Nothing is pending: the batch is read again from the committed offsets.
                self.metrics.health.commit_settled();
                return self.restart_consumer();
            }
        }
        for (tp, next) in &batch.positions {
            self.expected.insert(tp.clone(), *next);
        }
        let mut wb = WriteBatch::default();
        let reached = self.committer.take_delivered();
        let positions = reached.iter().map(|(p, next)| (*p as ShardId, *next));
        self.store
            .put_shard_changes(&mut wb, overlay.changes(), positions)?;
        self.store.write(wb)?;
        batch_committed(&self.metrics, &batch, started, records.len(), summary);
        Ok(())
    }

    /// Adds one consumed message to the batch.
    fn take(
        &self,
        overlay: &mut ShardOverlay<'_>,
        batch: &mut Batch,
        work: &mut Work,
        m: &impl Message,
    ) -> Result<(), PipelineError> {
        let tp = (m.topic().to_string(), m.partition());
        if batch
            .positions
            .get(&tp)
            .or(self.expected.get(&tp))
            .is_some_and(|next| m.offset() < *next)
        {
            return Ok(()); // committed already
        }
        let msg = InMessage {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload(),
        };
        self.processor.track(batch, msg);
        if msg.topic == self.topic {
            let shard = ShardId::try_from(msg.partition).unwrap_or_default();
            match decode_value::<Msg>(msg.payload.unwrap_or_default(), "shards", "message") {
                Ok(x) => self.deliver(overlay, work, vec![(shard, x)], "topic")?,
                Err(e) => self.processor.dead_letter(
                    batch,
                    source(msg),
                    msg,
                    "shard",
                    &format!("undecodable shard message: {e}"),
                ),
            }
        } else if msg.topic == self.cfg.control.topic {
            let Some(command) = self.processor.control_command(batch, source(msg), msg) else {
                return Ok(());
            };
            let msgs = match command {
                Control::Erase(copies) => copies
                    .into_iter()
                    .map(|x| {
                        let to = home(&x, self.shards);
                        (to, Msg::Erase { x, at_owner: None })
                    })
                    .collect(),
                // Every shard looks for the profile id; the one holding it erases it.
                Control::EraseProfile(id) => (0..self.shards)
                    .map(|s| (s, Msg::EraseProfile(id.clone())))
                    .collect(),
                Control::Unlink(a, b) => vec![(
                    home(&a, self.shards),
                    Msg::Unlink {
                        a,
                        b,
                        at_owner: None,
                    },
                )],
            };
            self.deliver(overlay, work, msgs, "local")?;
        } else if let Some(ev) = self.processor.event(batch, msg)? {
            batch.event_times.push(ev.timestamp);
            let to = event_home(&ev.event_id, self.shards);
            self.deliver(overlay, work, vec![(to, Msg::Event(ev))], "local")?;
        }
        Ok(())
    }

    /// Handles messages at their shards, and everything they send to shards held here, to the end; a
    /// message for a shard held elsewhere becomes a record of the internal topic.
    fn deliver(
        &self,
        overlay: &mut ShardOverlay<'_>,
        work: &mut Work,
        msgs: Vec<(ShardId, Msg)>,
        route: &'static str,
    ) -> Result<(), PipelineError> {
        let mut queue: VecDeque<(ShardId, Msg, &'static str)> =
            msgs.into_iter().map(|(s, m)| (s, m, route)).collect();
        while let Some((shard, msg, route)) = queue.pop_front() {
            if !self.owned.contains(&shard) {
                work.remote.push(self.shard_record(shard, &msg)?);
                continue;
            }
            self.metrics
                .shard_messages
                .with_label_values(&[msg.kind(), route])
                .inc();
            let channel = match &msg {
                Msg::Event(ev) => Some(ev.channel.clone()),
                _ => None,
            };
            let mut out = Out::default();
            let mut view = ShardView { kv: overlay, shard };
            Shard {
                view: &mut view,
                shards: self.shards,
            }
            .handle(self.processor.stitcher(), msg, &mut out)?;
            self.record(work, shard, out.steps);
            if let (Some(channel), true) = (channel, out.duplicates > 0) {
                self.metrics
                    .events_duplicate
                    .with_label_values(&[&channel])
                    .inc();
            }
            for (node, profile) in out.departed {
                work.departed.insert(global(shard, node), profile);
            }
            for ((from_shard, from_node), node) in out.arrived {
                let from = global(from_shard, from_node);
                work.departed.remove(&from);
                work.changes.moved(from, global(shard, node));
            }
            queue.extend(out.msgs.into_iter().map(|(s, m)| (s, m, "local")));
        }
        Ok(())
    }

    /// Records what the classic stitcher did at `shard`, for the batch's output and metrics.
    fn record(&self, work: &mut Work, shard: ShardId, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Event(ev, applied) => {
                    let Some(applied) = applied else { continue };
                    self.metrics
                        .events_applied
                        .with_label_values(&[&ev.channel])
                        .inc();
                    work.changes.record(&ev, globalize(shard, applied));
                }
                Step::Erase(x, reshape) => {
                    self.command("erase_identifier", &x.to_string(), shard, reshape, work)
                }
                Step::EraseProfile(id, reshape) => {
                    self.command("erase_profile", id.as_str(), shard, reshape, work)
                }
                Step::Unlink(a, b, reshape) => {
                    self.command("unlink", &format!("{a} {b}"), shard, reshape, work)
                }
            }
        }
    }

    fn command(&self, op: &str, target: &str, shard: ShardId, reshape: Reshape, work: &mut Work) {
        let trigger = format!("control:{op}:{target}");
        self.processor.control_applied(op, &trigger, &reshape);
        work.changes
            .record_reshape(&trigger, "control", globalize_reshape(shard, reshape));
    }

    fn shard_record(&self, shard: ShardId, msg: &Msg) -> Result<OutRecord, StoreError> {
        Ok(OutRecord {
            topic: self.topic.clone(),
            partition: Some(shard as i32),
            key: None,
            payload: Some(encode_value(msg, 256)?),
            headers: vec![],
        })
    }

    /// The batch's records: dead letters, messages for other instances' shards, tombstones, redirects
    /// and updates of the profiles changed, and the changelog records of every state change.
    fn output(
        &self,
        overlay: &ShardOverlay<'_>,
        batch: &mut Batch,
        work: &mut Work,
    ) -> Result<Vec<OutRecord>, PipelineError> {
        let now = now_millis();
        let mut out = std::mem::take(&mut batch.dead_letters);
        out.append(&mut work.remote);
        let profiles = BatchProfiles {
            overlay,
            owned: &self.owned,
            departed: &work.departed,
        };
        self.processor
            .changes_records(&profiles, &work.changes, now, &mut out)?;
        for (key, value) in overlay.changes() {
            out.push(OutRecord {
                topic: self.changelog.clone(),
                partition: shard_of_key(key).map(|s| s as i32),
                key: Some(key.to_vec()),
                payload: value.map(<[u8]>::to_vec),
                headers: vec![],
            });
        }
        Ok(out)
    }

    /// A new consumer, which reads from the committed offsets; shards are restored again when assigned
    /// (from where the local copy stands: usually nothing to read).
    fn restart_consumer(&mut self) -> Result<(), PipelineError> {
        let _ = self.committer.take_delivered();
        self.expected.clear();
        self.carried = None;
        self.consumer = subscribed_consumer(&self.cfg, &self.metrics)?;
        self.owned.clear();
        self.held.publish(&self.owned);
        self.synced_at = None;
        self.metrics.shards_owned.set(0);
        Ok(())
    }

    /// Brings the shards handled here in line with the consumer's assignment after a rebalance.
    fn sync_assignment(&mut self, shutdown: &CancellationToken) -> Result<(), PipelineError> {
        let generation = self.consumer.context().rebalances();
        if self.synced_at == Some(generation) {
            return Ok(());
        }
        // Every shard is caught up again, also those assigned before: between two looks at the assignment
        // a shard may have been handled elsewhere and come back. A restore reads only what this instance's
        // copy lacks, usually nothing.
        self.owned.clear();
        self.held.publish(&self.owned);
        let assignment = self.consumer.assignment()?;
        let assigned: Vec<ShardId> = assignment
            .elements_for_topic(&self.topic)
            .iter()
            .filter_map(|e| ShardId::try_from(e.partition()).ok())
            .collect();
        self.expected.clear();
        if assignment.count() == 0 {
            self.synced(generation);
            return Ok(());
        }
        if !assigned.is_empty() {
            self.metrics.health.set_running(false);
        }
        let started = Instant::now();
        // Stable committed offsets (KIP-447): this returns once a transaction of a previous owner of these
        // partitions is over, so the changelog records of the shards' previous owners are final.
        let committed = self.consumer.committed_offsets(
            assignment.clone(),
            self.cfg.processing.transaction_timeout * 2,
        )?;
        if !assigned.is_empty() {
            self.restore(&assigned, started, shutdown)?;
            self.owned.extend(assigned);
        }
        for e in committed.elements() {
            // A partition never committed starts at its beginning.
            let next = match e.offset() {
                Offset::Offset(o) => o,
                _ => {
                    self.consumer
                        .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))?
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
        self.metrics.shards_owned.set(self.owned.len() as i64);
        self.held.publish(&self.owned);
        self.metrics.health.set_running(true);
        self.synced_at = Some(generation);
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
        let mut start = TopicPartitionList::new();
        let mut high = BTreeMap::new();
        for s in shards {
            let p = *s as i32;
            let (low, hw) =
                restorer.fetch_watermarks(&self.changelog, p, Duration::from_secs(30))?;
            let from = match self.store.changelog_position(*s)? {
                Some(at) if at >= low && at <= hw => at,
                local => {
                    if local.is_some() {
                        tracing::warn!(
                            shard = s,
                            "local copy of the shard is outside its changelog; restoring from the start"
                        );
                    }
                    self.store.wipe_shard(*s)?;
                    low
                }
            };
            if from < hw {
                start.add_partition_offset(&self.changelog, p, Offset::Offset(from))?;
                high.insert(p, hw);
            }
        }
        let mut applied = 0u64;
        if start.count() > 0 {
            restorer.assign(&start)?;
            applied = self.read_changelog(&restorer, &mut high, shutdown)?;
        }
        let elapsed = started.elapsed();
        self.metrics.restored_records.inc_by(applied);
        for _ in shards {
            self.metrics
                .restore_duration
                .observe(elapsed.as_secs_f64() / shards.len() as f64);
        }
        tracing::info!(
            shards = shards.len(),
            records = applied,
            elapsed_ms = elapsed.as_millis() as u64,
            records_per_second = (applied as f64 / elapsed.as_secs_f64().max(1e-3)) as u64,
            "shards restored"
        );
        Ok(())
    }

    /// Applies changelog records until every partition in `high` reached its high watermark. A partition
    /// that stops short has an open transaction (its previous owner's, about to be aborted or committed):
    /// it is waited for, up to twice the transaction timeout.
    fn read_changelog(
        &self,
        restorer: &BaseConsumer<QuietEof>,
        high: &mut BTreeMap<i32, i64>,
        shutdown: &CancellationToken,
    ) -> Result<u64, PipelineError> {
        let deadline = Instant::now() + self.cfg.processing.transaction_timeout * 2;
        let mut pending: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut reached: BTreeMap<i32, i64> = BTreeMap::new();
        let mut applied = 0u64;
        while !high.is_empty() {
            if shutdown.is_cancelled() {
                return Err(PipelineError::Restore("shutdown during restore".into()));
            }
            if Instant::now() > deadline {
                return Err(PipelineError::Restore(format!(
                    "changelog partitions {:?} of {} did not reach their end: an open transaction \
                     that never ends?",
                    high.keys().collect::<Vec<_>>(),
                    self.changelog
                )));
            }
            match restorer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    refuse_former_format(m.key().unwrap_or_default())?;
                    pending.push((
                        m.key().unwrap_or_default().to_vec(),
                        m.payload().map(<[u8]>::to_vec),
                    ));
                    reached.insert(m.partition(), m.offset() + 1);
                    if m.offset() + 1 >= high.get(&m.partition()).copied().unwrap_or(0) {
                        high.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    let at = restorer
                        .position()?
                        .find_partition(&self.changelog, p)
                        .and_then(|e| e.offset().to_raw());
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
                            .find_partition(&self.changelog, *p)
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
            if pending.len() >= RESTORE_CHUNK || high.is_empty() {
                applied += pending.len() as u64;
                let mut wb = WriteBatch::default();
                self.store.put_shard_changes(
                    &mut wb,
                    pending.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
                    reached.iter().map(|(p, at)| (*p as ShardId, *at)),
                )?;
                self.store.write(wb)?;
                pending.clear();
            }
        }
        Ok(applied)
    }
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
    use rocksdb::WriteBatch;

    use super::*;
    use crate::pipeline::Pipeline;
    use crate::store::{Checkpoint, TempStore};

    fn start_error<T>(r: Result<T, PipelineError>) -> String {
        match r {
            Ok(_) => panic!("started on state of the other mode"),
            Err(e) => e.to_string(),
        }
    }

    /// State of one mode is refused by the other, saying what to do, before anything connects.
    #[test]
    fn a_state_directory_of_the_other_mode_is_refused() {
        let shutdown = CancellationToken::new();
        let cfg = Config::default();
        let classic = TempStore::new().expect("store");
        let mut wb = WriteBatch::default();
        let cp = Checkpoint {
            sequence: 1,
            positions: vec![],
            outbox: vec![],
        };
        classic
            .store
            .put_checkpoint(&mut wb, &cp)
            .expect("checkpoint");
        classic.store.write(wb).expect("write");
        let metrics = Metrics::new().expect("metrics");
        let held = HeldShards::new(4);
        let why = start_error(ShardedPipeline::start(
            cfg.clone(),
            classic.store.clone(),
            metrics.clone(),
            "i0",
            held,
            &shutdown,
        ));
        assert!(why.contains("holds the state of one instance"), "{why}");
        assert!(why.contains("empty"), "{why}");

        let sharded = TempStore::new().expect("store");
        let mut wb = WriteBatch::default();
        let changes = [(b"\0\0\0\0n-x".as_slice(), Some(b"v".as_slice()))];
        sharded
            .store
            .put_shard_changes(&mut wb, changes, [(0, 1)])
            .expect("changes");
        sharded.store.write(wb).expect("write");
        let why = start_error(Pipeline::start(
            cfg,
            sharded.store.clone(),
            metrics,
            "i0",
            &shutdown,
        ));
        assert!(why.contains("holds scale-out state"), "{why}");
    }
}
