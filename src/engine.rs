//! The engine: what one batch does with the messages it consumed, with no Kafka client involved. An input
//! message becomes an `Event` for its event-home shard, a control command becomes messages for the shards
//! that hold its identifiers, a shard message is handled at its shard; each is handled to the end at the
//! shards held here ([`crate::scaleout::owner`]), and a message for a shard held elsewhere becomes a record
//! of the internal topic. The batch's records are its dead letters, those shard messages, the profile
//! updates, redirects and tombstones of what changed, and the changelog record of every state change.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::breaker::{topic_key, type_key, Breaker};
use crate::codec::update::ProfileRecord;
use crate::config::{Config, HashKey};
use crate::metrics::Metrics;
use crate::model::{now_millis, Event, Identifier, Millis, NodeId, ProfileId};
use crate::pipeline::PipelineError;
use crate::processor::{
    source, Batch, Control, Decoded, InMessage, ProcessError, Processor, ProfileReader,
    ProfileSource,
};
use crate::profile::Profile;
use crate::scaleout::owner::{Msg, Out, Shard, Step};
use crate::scaleout::state::{
    local_only, mark_shard_count, shard_of_key, suppression_hash, sweep_seen, Changes,
    ShardOverlay, ShardRead, ShardView,
};
use crate::scaleout::{entry_shard, home, ShardId};
use crate::stitch::{Applied, BatchChanges, Reshape, Trigger};
use crate::store::{decode_value, encode_value, OutRecord, RecordRef, StoreError};

/// What a batch produced besides state changes.
#[derive(Default)]
pub struct Work {
    /// Messages for shards held elsewhere.
    remote: Vec<OutRecord>,
    /// What the batch changed, over batch-wide node numbers ([`global`]).
    changes: BatchChanges,
    /// Components that left a shard held here for one held elsewhere: their profile as they left.
    departed: BTreeMap<NodeId, Profile>,
    /// Input messages the merge-storm breaker holds back, for the quarantine topic.
    quarantined: Vec<OutRecord>,
    /// The batch's shard messages by kind and route, and its applied events by channel, added to their
    /// labelled counters once, in [`Engine::output`]: a labelled counter hashes its labels and takes a
    /// lock at each lookup, several per message here.
    shard_messages: HashMap<(&'static str, &'static str), u64, foldhash::fast::RandomState>,
    events_applied: HashMap<String, u64, foldhash::fast::RandomState>,
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
    ) -> Result<Option<(ProfileId, ProfileRecord, u64)>, StoreError> {
        let (shard, n) = local(node);
        let read = ShardRead {
            kv: self.overlay,
            shard,
        };
        read.with_profile(n, |p| f(p.or_else(|| self.departed.get(&node))))
    }
}

/// The Kafka-free core of a batch: turns consumed messages into shard state changes (in the batch's
/// overlay) and the batch's records. The run loop ([`crate::pipeline`]) feeds it what it polls; the fuzz
/// target feeds it bytes.
pub struct Engine {
    processor: Arc<Processor>,
    metrics: Metrics,
    shards: ShardId,
    /// The internal topic of shard messages, and the changelog of the shards' state.
    topic: String,
    changelog: String,
    control_topic: String,
    /// Shards restored and handled here, under the current assignment.
    pub(crate) owned: BTreeSet<ShardId>,
    /// The merge-storm breaker (counts merges, holds back events while tripped).
    breaker: Breaker,
    /// `STITCHER_SUPPRESSION_SALT`, if set: erasures may suppress, events are checked.
    suppression: Option<HashKey>,
    /// `processing.dedup_retention` in ms (`None`: event ids are kept forever).
    retention_ms: Option<i64>,
    /// The shard whose event-id records are being swept, and where the sweep goes on.
    sweeping: (ShardId, Option<Vec<u8>>),
}

/// Decodes and normalises input messages, the part of a message's handling that needs no state, so that
/// it can run ahead of the batch on a thread of its own (docs/DESIGN.md, "Decoding ahead"). Messages of the
/// internal and control topics are left to the batch.
#[derive(Clone)]
pub struct Decoder {
    processor: Arc<Processor>,
    topic: String,
    control_topic: String,
}

impl Decoder {
    /// `None` for a message that is not an input's.
    pub fn decode(&self, msg: InMessage<'_>) -> Option<Result<Decoded, ProcessError>> {
        (msg.topic != self.topic && msg.topic != self.control_topic)
            .then(|| self.processor.decode(msg))
    }
}

/// Event-id records looked at by the sweep of expired ones, per message of the batch: an event adds at most
/// one record, so the sweep keeps up with twice that.
const SWEEP_PER_MESSAGE: usize = 2;

/// Messages one delivery handles at shards held here before the rest go through the internal topic. An
/// event takes about six; the largest cascades (an erasure sent to every shard, the events parked behind
/// a popular identifier's reservation) take thousands.
pub(crate) const LOCAL_STEPS_MAX: usize = 100_000;

impl Engine {
    pub fn new(cfg: &Config, metrics: Metrics) -> Result<Self, ProcessError> {
        Ok(Self {
            processor: Arc::new(Processor::new(cfg, metrics.clone())?),
            metrics,
            shards: cfg.scaleout.shards,
            topic: cfg.shard_topic(),
            changelog: cfg.changelog_topic(),
            control_topic: cfg.control.topic.clone(),
            owned: BTreeSet::new(),
            suppression: cfg.identity.suppression_salt.clone(),
            breaker: Breaker::new(&cfg.breaker),
            retention_ms: Some(cfg.processing.dedup_retention)
                .filter(|d| !d.is_zero())
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            sweeping: (0, None),
        })
    }

    /// Holds every shard, as an instance alone does (the back-test, the fuzz target, the benches).
    pub fn hold_every_shard(&mut self) {
        self.owned = (0..self.shards).collect();
    }

    /// Deletes event-id records older than `processing.dedup_retention` from the shards held here, looking
    /// at [`SWEEP_PER_MESSAGE`] records per message of the batch (`messages`), one shard after the other:
    /// the deletions go out with the batch (changelog tombstones), so the changelog stays bounded too. A
    /// duplicate arriving after its record was swept is applied again.
    pub fn sweep(
        &mut self,
        overlay: &mut ShardOverlay<'_>,
        messages: usize,
        now: Millis,
    ) -> Result<(), StoreError> {
        let Some(retention) = self.retention_ms else {
            return Ok(());
        };
        let (at, cursor) = std::mem::take(&mut self.sweeping);
        let Some(shard) = self
            .owned
            .range(at..)
            .next()
            .or(self.owned.first())
            .copied()
        else {
            return Ok(());
        };
        let from = cursor.filter(|_| shard == at);
        let before = now.saturating_sub(retention);
        let limit = messages.max(1) * SWEEP_PER_MESSAGE;
        self.sweeping = match sweep_seen(overlay, shard, from.as_deref(), limit, before)? {
            Some(next) => (shard, Some(next)),
            None => (shard.saturating_add(1), None),
        };
        Ok(())
    }

    /// Marks the changelog of every shard held here with the shard count where the batch's view holds no
    /// mark yet: once per shard, and a restore refuses a changelog marked with another count (docs/DESIGN.md,
    /// "Dedup retention and the shard count").
    pub fn mark_shard_count(&self, overlay: &mut ShardOverlay<'_>) -> Result<(), StoreError> {
        for shard in &self.owned {
            mark_shard_count(overlay, *shard, self.shards)?;
        }
        Ok(())
    }

    /// The internal topic of shard messages.
    pub fn shard_topic(&self) -> &str {
        &self.topic
    }

    /// The changelog topic of the shards' state.
    pub fn changelog(&self) -> &str {
        &self.changelog
    }

    /// What decodes input messages ahead of the batch, on another thread.
    pub fn decoder(&self) -> Decoder {
        Decoder {
            processor: Arc::clone(&self.processor),
            topic: self.topic.clone(),
            control_topic: self.control_topic.clone(),
        }
    }

    /// Adds one message to the batch: an input event, a control command or a shard message, handled to
    /// the end at the shards held here.
    pub fn take(
        &self,
        overlay: &mut ShardOverlay<'_>,
        batch: &mut Batch,
        work: &mut Work,
        msg: InMessage<'_>,
    ) -> Result<(), PipelineError> {
        self.take_decoded(overlay, batch, work, msg, None)
    }

    /// [`Engine::take`] with what [`Decoder::decode`] made of the message ahead of the batch, if it did.
    pub fn take_decoded(
        &self,
        overlay: &mut ShardOverlay<'_>,
        batch: &mut Batch,
        work: &mut Work,
        msg: InMessage<'_>,
        ahead: Option<Result<Decoded, ProcessError>>,
    ) -> Result<(), PipelineError> {
        batch.messages += 1;
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
        } else if msg.topic == self.control_topic {
            let Some(command) = self.processor.control_command(batch, source(msg), msg) else {
                return Ok(());
            };
            let trigger = Trigger::command_name(&msg.origin());
            // The receipt: what follows is logged (and counted) where a shard changes something, and a
            // command about what the state does not hold changes nothing.
            tracing::info!(
                op = command.op(),
                trigger = trigger.as_str(),
                "control command read"
            );
            let hash = |x: &Identifier| {
                self.suppression
                    .as_ref()
                    .map(|salt| suppression_hash(salt, x))
            };
            let msgs = match command {
                Control::Erase { copies, suppress } => copies
                    .into_iter()
                    .map(|x| {
                        let to = home(&x, self.shards);
                        let trigger = trigger.clone();
                        let suppress = hash(&x).filter(|_| suppress);
                        (
                            to,
                            Msg::Erase {
                                x,
                                at_owner: None,
                                trigger,
                                suppress,
                            },
                        )
                    })
                    .collect(),
                // Checked for a salt when parsed.
                Control::Unsuppress(copies) => copies
                    .iter()
                    .enumerate()
                    .filter_map(|(i, x)| {
                        let msg = Msg::Unsuppress {
                            hash: hash(x)?,
                            trigger: trigger.clone(),
                            primary: i == 0,
                        };
                        Some((home(x, self.shards), msg))
                    })
                    .collect(),
                // Every shard looks for the profile id; the one holding it erases it.
                Control::Release => (0..self.shards)
                    .map(|s| {
                        let trigger = trigger.clone();
                        (s, Msg::Release { trigger })
                    })
                    .collect(),
                Control::EraseProfile(id) => (0..self.shards)
                    .map(|s| {
                        let (id, trigger) = (id.clone(), trigger.clone());
                        (s, Msg::EraseProfile { id, trigger })
                    })
                    .collect(),
                Control::Unlink(a, b) => vec![(
                    home(&a, self.shards),
                    Msg::Unlink {
                        a,
                        b,
                        at_owner: None,
                        trigger,
                    },
                )],
            };
            self.deliver(overlay, work, msgs, "local")?;
        } else if let Some(ev) = {
            let decoded = ahead.unwrap_or_else(|| self.processor.decode(msg))?;
            self.processor.admit(batch, msg, decoded)
        } {
            if let Some(key) = self.breaker.holds(&ev) {
                work.quarantined.push(self.quarantine(msg, &key));
                return Ok(());
            }
            batch.event_times.push(ev.timestamp);
            let to = entry_shard(&ev, self.shards);
            self.deliver(overlay, work, vec![(to, Msg::Event(Box::new(ev)))], "local")?;
        }
        Ok(())
    }

    /// Handles messages at their shards, and everything they send to shards held here, to the end; a
    /// message for a shard held elsewhere becomes a record of the internal topic (as does every message
    /// past the first [`LOCAL_STEPS_MAX`], should they never end).
    fn deliver(
        &self,
        overlay: &mut ShardOverlay<'_>,
        work: &mut Work,
        msgs: Vec<(ShardId, Msg)>,
        route: &'static str,
    ) -> Result<(), PipelineError> {
        let mut queue: VecDeque<(ShardId, Msg, &'static str)> =
            msgs.into_iter().map(|(s, m)| (s, m, route)).collect();
        let mut handled = 0usize;
        while let Some((shard, msg, route)) = queue.pop_front() {
            let here = self.owned.contains(&shard);
            if here {
                handled += 1;
            }
            if here && handled == LOCAL_STEPS_MAX + 1 {
                // A defect of the protocol, not of the input: the simulation finds none. Handled
                // further through the internal topic, the messages meet the ones waiting there rather
                // than keeping the poll loop from reading them. Said once per delivery.
                tracing::warn!(
                    kind = msg.kind(),
                    shard,
                    "a message keeps sending messages to shards held here; the rest go through the \
                     internal topic"
                );
                self.metrics.errors.with_label_values(&["shard"]).inc();
            }
            if !here || handled > LOCAL_STEPS_MAX {
                work.remote.push(self.shard_record(shard, &msg)?);
                continue;
            }
            *work.shard_messages.entry((msg.kind(), route)).or_default() += 1;
            let mut out = Out::default();
            let mut view = ShardView { kv: overlay, shard };
            Shard {
                view: &mut view,
                shards: self.shards,
                suppression: self.suppression.as_ref(),
            }
            .handle(self.processor.stitcher(), msg, &mut out)?;
            self.record(work, shard, out.steps);
            if let Some(trigger) = out.release.take() {
                self.release(&trigger);
            }
            let (identifiers, events) = out.suppressed;
            if identifiers > 0 {
                self.metrics
                    .suppressed
                    .with_label_values(&["identifier"])
                    .inc_by(identifiers);
            }
            if events > 0 {
                self.metrics
                    .suppressed
                    .with_label_values(&["event"])
                    .inc_by(events);
            }
            if let Some(channel) = &out.duplicate {
                self.metrics
                    .events_duplicate
                    .with_label_values(&[channel])
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
            for (shard, msg) in out.deferred {
                work.remote.push(self.shard_record(shard, &msg)?);
            }
        }
        Ok(())
    }

    /// Records what the classic stitcher did at `shard`, for the batch's output and metrics.
    fn record(&self, work: &mut Work, shard: ShardId, steps: Vec<Step>) {
        for step in steps {
            match step {
                Step::Event(ev, applied) => {
                    let Some(applied) = applied else { continue };
                    match work.events_applied.get_mut(&ev.channel) {
                        Some(n) => *n += 1,
                        None => {
                            work.events_applied.insert(ev.channel.clone(), 1);
                        }
                    }
                    for r in &applied.refused {
                        self.metrics
                            .merge_refusals
                            .with_label_values(&[r.rule.name()])
                            .inc();
                    }
                    self.count_merges(&ev, &applied);
                    work.changes.record(&ev, globalize(shard, applied));
                }
                Step::Erase(_, trigger, reshape) => {
                    self.command("erase_identifier", "erase", &trigger, shard, reshape, work)
                }
                Step::EraseProfile(_, trigger, reshape) => {
                    self.command("erase_profile", "erase", &trigger, shard, reshape, work)
                }
                Step::Unlink(_, _, trigger, reshape) => {
                    self.command("unlink", "unlink", &trigger, shard, reshape, work)
                }
                Step::Unsuppress(trigger, listed) => {
                    self.processor
                        .control_result("unsuppress", &trigger, listed)
                }
            }
        }
    }

    /// Records a control command's outcome; `kind` names it on the identity change stream.
    fn command(
        &self,
        op: &str,
        kind: &'static str,
        trigger: &str,
        shard: ShardId,
        reshape: Reshape,
        work: &mut Work,
    ) {
        self.processor.control_applied(op, trigger, &reshape);
        work.changes.record_reshape(
            &Trigger::command(trigger),
            kind,
            globalize_reshape(shard, reshape),
        );
    }

    /// Counts an event's merges in the breaker, by the types that matched and by its input topic.
    fn count_merges(&self, ev: &Event, applied: &Applied) {
        // Most events merge nothing: they count nothing, so no key is made for them.
        let merges = applied.absorbed_nodes.len() as u64;
        let by_topic = ev.origin.as_ref().filter(|_| merges > 0);
        let keys = applied
            .merged_kinds
            .iter()
            .map(|kind| (type_key(kind), 1))
            .chain(by_topic.map(|o| (topic_key(&o.topic), merges)));
        let trips: Vec<_> = keys
            .filter_map(|(key, n)| {
                let trip = self.breaker.observe(&key, ev.timestamp, n)?;
                Some((key, trip))
            })
            .collect();
        for (key, trip) in trips {
            tracing::warn!(
                key = key.as_str(),
                merges = trip.merges,
                per_minute_before = trip.baseline,
                minute = trip.minute,
                quarantine = self.breaker.quarantine_topic(),
                "merge storm: the breaker holds back events of this key until `stitcher release`"
            );
            self.metrics
                .breaker_tripped
                .with_label_values(&[&key])
                .set(1);
        }
    }

    /// Closes the breaker (a `release` command reached a shard held here).
    fn release(&self, trigger: &str) {
        let keys = self.breaker.release();
        if keys.is_empty() {
            // Nothing tripped here (or another shard held here closed it already).
            return;
        }
        for key in &keys {
            self.metrics
                .breaker_tripped
                .with_label_values(&[key])
                .set(0);
        }
        tracing::info!(trigger, released = ?keys, "merge-storm breaker released");
        self.processor.control_result("release", trigger, true);
    }

    /// The record that keeps an input message the breaker holds back: as read, with where it came from.
    fn quarantine(&self, msg: InMessage<'_>, key: &str) -> OutRecord {
        self.metrics.quarantined.with_label_values(&[key]).inc();
        OutRecord {
            topic: self.breaker.quarantine_topic().to_string(),
            partition: None,
            key: msg.key.map(<[u8]>::to_vec),
            payload: msg.payload.map(<[u8]>::to_vec),
            headers: vec![
                (
                    "quarantine.source.topic".into(),
                    msg.topic.as_bytes().to_vec(),
                ),
                (
                    "quarantine.source.partition".into(),
                    msg.partition.to_string().into_bytes(),
                ),
                (
                    "quarantine.source.offset".into(),
                    msg.offset.to_string().into_bytes(),
                ),
                ("quarantine.key".into(), key.as_bytes().to_vec()),
            ],
        }
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
    /// and updates of the profiles changed. The changelog records follow from the batch's changes
    /// ([`changelog_records`]).
    pub fn output(
        &self,
        overlay: &ShardOverlay<'_>,
        batch: &mut Batch,
        work: &mut Work,
    ) -> Result<Vec<OutRecord>, PipelineError> {
        for ((kind, route), n) in work.shard_messages.drain() {
            self.metrics
                .shard_messages
                .with_label_values(&[kind, route])
                .inc_by(n);
        }
        for (channel, n) in work.events_applied.drain() {
            self.metrics
                .events_applied
                .with_label_values(&[&channel])
                .inc_by(n);
        }
        let now = now_millis();
        let mut out = std::mem::take(&mut batch.dead_letters);
        out.append(&mut work.remote);
        out.append(&mut work.quarantined);
        let profiles = BatchProfiles {
            overlay,
            owned: &self.owned,
            departed: &work.departed,
        };
        self.processor
            .changes_records(&profiles, &work.changes, now, &mut out)?;
        Ok(out)
    }
}

/// A batch's state changes in key order: sorted once on the commit thread, for its changelog records and
/// for the local write ([`Store::write_shard_changes`](crate::store::Store::write_shard_changes) does not
/// sort what is in order already).
pub fn sorted_changes(changes: &Changes) -> Vec<(&Vec<u8>, &Option<Vec<u8>>)> {
    let mut sorted: Vec<_> = changes.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    sorted
}

/// The changelog records of a batch's state changes ([`sorted_changes`]), in key order (the same input
/// gives the same records): each to its shard's partition, with the same key and value (a deletion is a
/// tombstone), but for the changes kept in the local copy only (the event ids, which their `E` record
/// carries). Made on the commit thread, from the changes the batch hands over, after the batch's other
/// records.
pub fn changelog_records<'a>(
    topic: &'a str,
    sorted: &'a [(&'a Vec<u8>, &'a Option<Vec<u8>>)],
) -> impl Iterator<Item = RecordRef<'a>> + 'a {
    sorted
        .iter()
        .filter(|(k, _)| !local_only(k))
        .map(move |&(key, value)| RecordRef {
            topic,
            partition: shard_of_key(key).map(|s| s as i32),
            key: Some(key),
            payload: value.as_deref(),
            headers: &[],
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaleout::state::{misplaced, Kv, KvRead};
    use crate::store::TempStore;

    /// The sweep deletes event-id records older than the retention, in the batch's overlay (so in the
    /// changelog), a bounded number per batch, and comes round to every shard held.
    #[test]
    fn expired_event_ids_are_swept_in_bounded_steps() {
        let tmp = TempStore::new().expect("store");
        let mut cfg = Config::default();
        cfg.scaleout.shards = 2;
        cfg.processing.dedup_retention = std::time::Duration::from_secs(3600);
        let mut engine = Engine::new(&cfg, Metrics::new().expect("metrics")).expect("engine");
        engine.owned = [0, 1].into();
        let now = now_millis();
        let seen = |shard: u32, n: usize, at: i64| {
            let mut key = shard.to_be_bytes().to_vec();
            key.push(b'e');
            key.extend(format!("{n:016}").as_bytes());
            (key, at.to_be_bytes().to_vec())
        };
        let mut records = Vec::new();
        for shard in [0, 1] {
            for n in 0..1_500 {
                // Every third record is fresh.
                let at = if n % 3 == 0 {
                    now - 60_000
                } else {
                    now - 7_200_000
                };
                records.push(seen(shard, n, at));
            }
        }
        tmp.store
            .write_shard_changes(records.iter().map(|(k, v)| (k, Some(v))), [])
            .expect("write");
        let mut deleted = BTreeSet::new();
        for _ in 0..4 {
            let mut overlay = ShardOverlay::new(&tmp.store);
            engine.sweep(&mut overlay, 500, now).expect("sweep");
            let changes = overlay.into_changes().expect("encode");
            assert!(changes.len() <= 500 * SWEEP_PER_MESSAGE);
            assert!(changes.values().all(Option::is_none));
            deleted.extend(changes.into_keys());
        }
        let expired: BTreeSet<Vec<u8>> = records
            .iter()
            .filter(|(_, v)| v.as_slice() < (now - 3_600_000).to_be_bytes().as_slice())
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(expired.len(), 2_000);
        assert_eq!(deleted, expired);
    }

    /// Takes `payloads` of `topic` (at the offsets after `offset`, which is moved on) into one batch over
    /// `overlay`, and builds the batch's output.
    fn take_batch(
        engine: &mut Engine,
        overlay: &mut ShardOverlay<'_>,
        topic: &str,
        payloads: &[String],
        offset: &mut i64,
    ) -> (Batch, Vec<OutRecord>) {
        let (mut batch, mut work) = (Batch::default(), Work::default());
        for payload in payloads {
            *offset += 1;
            let msg = InMessage {
                topic,
                partition: 0,
                offset: *offset,
                key: None,
                payload: Some(payload.as_bytes()),
            };
            engine
                .take(overlay, &mut batch, &mut work, msg)
                .expect("take");
        }
        let out = engine
            .output(overlay, &mut batch, &mut work)
            .expect("output");
        (batch, out)
    }

    /// A record, in a form whose differences are legible.
    fn readable(r: RecordRef<'_>) -> String {
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        format!(
            "{} {:?} {} {}",
            r.topic,
            r.partition,
            text(r.key),
            text(r.payload)
        )
    }

    /// A store's records, in key order.
    type State = Vec<(Vec<u8>, Vec<u8>)>;

    /// Handles `batches` of web events on a fresh engine and store over three shards; with `overlapped`,
    /// each batch is handled over the changes of the batch before, which reach the store only after it
    /// (the commit thread's order). Returns each batch's records and the store's records at the end. The
    /// clock stands still meanwhile.
    fn handle_batches(batches: &[Vec<String>], overlapped: bool) -> (Vec<Vec<String>>, State) {
        use crate::config::{Format, InputConfig};
        let tmp = TempStore::new().expect("store");
        let mut cfg = Config::default();
        cfg.scaleout.shards = 3;
        cfg.inputs = vec![InputConfig::new("web-events", "web", Format::Json)];
        let mut engine = Engine::new(&cfg, Metrics::new().expect("metrics")).expect("engine");
        engine.owned = [0, 1, 2].into();
        crate::model::STOPPED_CLOCK.with(|c| c.set(Some(1_800_000_000_000)));
        let mut pending: Option<std::sync::Arc<Changes>> = None;
        let mut outputs = Vec::new();
        let mut offset = 0;
        for payloads in batches {
            let mut overlay = ShardOverlay::over(&tmp.store, pending.clone());
            let (_, records) = take_batch(
                &mut engine,
                &mut overlay,
                "web-events",
                payloads,
                &mut offset,
            );
            let changes = overlay.into_changes().expect("encode");
            let sorted = sorted_changes(&changes);
            let changelog = changelog_records(engine.changelog(), &sorted);
            outputs.push(
                records
                    .iter()
                    .map(OutRecord::borrowed)
                    .chain(changelog)
                    .map(readable)
                    .collect(),
            );
            let write = |c: &Changes| {
                tmp.store
                    .write_shard_changes(c.iter().map(|(k, v)| (k, v.as_ref())), [])
                    .expect("write")
            };
            if overlapped {
                if let Some(before) = pending.replace(std::sync::Arc::new(changes)) {
                    write(&before);
                }
            } else {
                write(&changes);
            }
        }
        if let Some(last) = pending {
            tmp.store
                .write_shard_changes(last.iter().map(|(k, v)| (k, v.as_ref())), [])
                .expect("write");
        }
        let mut state = Vec::new();
        tmp.store
            .scan_shards(&[], &[], usize::MAX, |k, v| {
                state.push((k.to_vec(), v.to_vec()));
                Ok(std::ops::ControlFlow::Continue(()))
            })
            .expect("scan");
        crate::model::STOPPED_CLOCK.with(|c| c.set(None));
        (outputs, state)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            crate::env_or("PROPTEST_CASES", 32)
        ))]

        /// A batch handled over the changes of the batch before it, not yet in the store, produces what it
        /// would have produced after them were written: the same records, batch by batch, and the same
        /// state (docs/DESIGN.md, "Overlapped commits"). Events join and repeat (event ids recur).
        #[test]
        fn an_overlapped_batch_sees_the_batch_before_it(
            events in proptest::collection::vec((0u8..10, 0u8..10, 0u8..40, proptest::bool::ANY), 1..80),
            cuts in proptest::collection::vec(1usize..9, 1..40),
        ) {
            let payloads: Vec<String> = events
                .iter()
                .map(|(email, cookie, id, order)| {
                    let mut ids = vec![
                        serde_json::json!({"type": "email", "value": format!("p{email}@x.io")}),
                        serde_json::json!({"type": "anonymous_id", "value": format!("c{cookie}")}),
                    ];
                    if *order {
                        ids.reverse();
                    }
                    let kind = if id % 3 == 0 { "order_completed" } else { "page_view" };
                    serde_json::json!({"event_id": format!("e{id}"), "event_type": kind,
                        "timestamp": 1_700_000_000_000i64 + i64::from(*id), "identifiers": ids})
                    .to_string()
                })
                .collect();
            let mut batches = Vec::new();
            let mut rest = payloads.as_slice();
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at((*cut).min(rest.len()));
                batches.push(head.to_vec());
                rest = tail;
            }
            let one_by_one = handle_batches(&batches, false);
            let overlapped = handle_batches(&batches, true);
            proptest::prop_assert_eq!(one_by_one.0, overlapped.0);
            proptest::prop_assert_eq!(one_by_one.1, overlapped.1);
        }
    }

    /// An event id swept in one batch and seen again in the next is not swept by that next batch's sweep,
    /// which scans the store (still holding the expired record) under the pending batch that deleted it.
    #[test]
    fn the_sweep_spares_a_record_written_above_the_store() {
        let tmp = TempStore::new().expect("store");
        let mut cfg = Config::default();
        cfg.processing.dedup_retention = std::time::Duration::from_secs(3600);
        let mut engine = Engine::new(&cfg, Metrics::new().expect("metrics")).expect("engine");
        engine.owned = [0].into();
        let now = now_millis();
        let mut key = 0u32.to_be_bytes().to_vec();
        key.push(b'e');
        key.extend([7u8; 16]);
        let expired = (now - 7_200_000).to_be_bytes().to_vec();
        tmp.store
            .write_shard_changes([(key.clone(), Some(expired))], [])
            .expect("write");
        let mut first = ShardOverlay::new(&tmp.store);
        engine.sweep(&mut first, 1, now).expect("sweep");
        let swept = std::sync::Arc::new(first.into_changes().expect("encode"));
        assert_eq!(swept.get(&key), Some(&None));
        let mut next = ShardOverlay::over(&tmp.store, Some(swept));
        next.set(key.clone(), Some(now.to_be_bytes().to_vec()));
        engine.sweep(&mut next, 1, now).expect("sweep");
        assert_eq!(
            next.get(&key).expect("read"),
            Some(now.to_be_bytes().to_vec())
        );
    }

    /// The first batch marks the changelog of every shard held here with the shard count; once the mark
    /// is in the view (the batch in flight's changes, the store), no batch writes it again.
    #[test]
    fn each_shard_held_is_marked_with_the_shard_count_once() {
        let tmp = TempStore::new().expect("store");
        let mut cfg = Config::default();
        cfg.scaleout.shards = 3;
        let mut engine = Engine::new(&cfg, Metrics::new().expect("metrics")).expect("engine");
        engine.owned = [0, 2].into();
        let mut first = ShardOverlay::new(&tmp.store);
        engine.mark_shard_count(&mut first).expect("mark");
        let marks = std::sync::Arc::new(first.into_changes().expect("encode"));
        let mut shards: Vec<_> = marks.keys().filter_map(|k| shard_of_key(k)).collect();
        shards.sort_unstable();
        assert_eq!(shards, [0, 2]);
        for (key, value) in marks.iter() {
            let shard = shard_of_key(key).expect("shard") as i32;
            assert_eq!(misplaced(key, value.as_deref(), shard, 3), None);
            assert!(misplaced(key, value.as_deref(), shard, 4).is_some());
        }
        let mut next = ShardOverlay::over(&tmp.store, Some(std::sync::Arc::clone(&marks)));
        engine.mark_shard_count(&mut next).expect("mark");
        assert!(next.is_empty(), "marked again above the batch in flight");
        tmp.store
            .write_shard_changes(marks.iter().map(|(k, v)| (k.clone(), v.clone())), [])
            .expect("write");
        let mut later = ShardOverlay::new(&tmp.store);
        engine.mark_shard_count(&mut later).expect("mark");
        assert!(later.is_empty(), "marked again above the store");
    }

    /// Over three shards held here: an erasure with `suppress` strips the identifier from later events
    /// (an event with nothing else is dropped), an unsuppress lifts it; the identity change stream of the
    /// batches rebuilds the mapping of the state, and names each trigger's input record.
    #[test]
    fn suppression_and_the_identity_change_stream() {
        use crate::codec::identity::{IdentityChange, Mapping};
        use crate::config::{Format, InputConfig};
        let tmp = TempStore::new().expect("store");
        let mut cfg = Config::default();
        cfg.scaleout.shards = 3;
        cfg.inputs = vec![InputConfig::new("web-events", "web", Format::Json)];
        cfg.control.topic = "ctl".into();
        cfg.output.identity_topic = "ids".into();
        cfg.identity.suppression_salt = Some(HashKey(b"sixteen bytes or more".to_vec()));
        let metrics = Metrics::new().expect("metrics");
        let mut engine = Engine::new(&cfg, metrics.clone()).expect("engine");
        engine.owned = [0, 1, 2].into();
        let mut mapping = Mapping::default();
        let mut offset = 0;
        let mut batch_of = |topic: &str, payload: String, mapping: &mut Mapping| {
            let mut overlay = ShardOverlay::new(&tmp.store);
            let (batch, out) =
                take_batch(&mut engine, &mut overlay, topic, &[payload], &mut offset);
            assert!(batch.dead_letters.is_empty());
            for r in out.iter().filter(|r| r.topic == "ids") {
                let c =
                    IdentityChange::decode(r.payload.as_deref().expect("payload")).expect("json");
                assert_eq!(c.trigger.topic.as_deref(), Some(topic), "{c:?}");
                assert_eq!(c.trigger.offset, Some(offset), "{c:?}");
                mapping.apply(c).expect("versions increase");
            }
            tmp.store
                .write_shard_changes(overlay.into_changes().expect("encode"), [])
                .expect("write");
        };
        let event = |id: &str, ids: &[(&str, &str)]| {
            let ids: Vec<serde_json::Value> = ids
                .iter()
                .map(|(t, v)| serde_json::json!({"type": t, "value": v}))
                .collect();
            serde_json::json!({"event_id": id, "event_type": "page_view",
                "timestamp": now_millis(), "identifiers": ids})
            .to_string()
        };
        let names = |m: &Mapping| -> Vec<String> {
            m.identifiers()
                .keys()
                .map(|i| format!("{}:{}", i.kind, i.value))
                .collect()
        };
        batch_of(
            "web-events",
            event("e1", &[("email", "a@x.io"), ("anonymous_id", "c1")]),
            &mut mapping,
        );
        batch_of(
            "web-events",
            event("e2", &[("email", "b@x.io"), ("anonymous_id", "c1")]),
            &mut mapping,
        );
        assert_eq!(
            names(&mapping),
            ["anonymous_id:c1", "email:a@x.io", "email:b@x.io"]
        );
        batch_of(
            "ctl",
            r#"{"op":"erase_identifier","type":"email","value":"a@x.io","suppress":true}"#.into(),
            &mut mapping,
        );
        assert_eq!(names(&mapping), ["anonymous_id:c1", "email:b@x.io"]);
        batch_of(
            "web-events",
            event("e3", &[("email", "a@x.io"), ("anonymous_id", "c2")]),
            &mut mapping,
        );
        batch_of(
            "web-events",
            event("e4", &[("email", "A@x.io")]),
            &mut mapping,
        );
        assert_eq!(
            names(&mapping),
            ["anonymous_id:c1", "anonymous_id:c2", "email:b@x.io"]
        );
        let suppressed = |what: &str| metrics.suppressed.with_label_values(&[what]).get();
        assert_eq!((suppressed("identifier"), suppressed("event")), (2, 1));
        batch_of(
            "ctl",
            r#"{"op":"unsuppress","type":"email","value":"a@x.io"}"#.into(),
            &mut mapping,
        );
        batch_of(
            "web-events",
            event("e5", &[("email", "a@x.io"), ("anonymous_id", "c2")]),
            &mut mapping,
        );
        assert_eq!(
            names(&mapping),
            [
                "anonymous_id:c1",
                "anonymous_id:c2",
                "email:a@x.io",
                "email:b@x.io"
            ]
        );
        let c2 = &mapping.identifiers()[&crate::codec::identity::IdentityRef {
            kind: "email".into(),
            value: "a@x.io".into(),
        }];
        let last = mapping.get(c2).expect("a record");
        assert!(last.changes.contains(&"link".to_string()), "{last:?}");
    }
}
