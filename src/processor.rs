//! Turning input messages into state changes and output records, with no Kafka client involved: decode,
//! normalise, stitch, enrich; then, per batch, one profile update per touched profile and one redirect per
//! retired profile id. Bad messages become dead letters; nothing else is lost.

use std::collections::{BTreeMap, HashMap};

use prometheus::IntCounter;

use crate::codec::identity::{IdentityChange, IdentityRef, TriggerRecord};
use crate::codec::update::ProfileRecord;
use crate::codec::{DecodeError, EventDecoder, Layout, ProfileUpdate, SchemaError, UpdateEncoder};
use crate::config::{Config, ConfigError};
use crate::control::Command;
use crate::kafka::dead_letters::{self, Source};
use crate::metrics::Metrics;
use crate::model::{Event, Identifier, Millis, NodeId, Origin, ProfileId};
use crate::normalize::Normalizer;
use crate::profile::Profile;
use crate::stitch::{BatchChanges, Reshape, Rules, Stitcher};
use crate::store::{OutRecord, Position, StoreError};

/// One input message, borrowed from wherever it came from.
#[derive(Debug, Clone, Copy)]
pub struct InMessage<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

impl<'a> InMessage<'a> {
    /// A message as a Kafka consumer returned it.
    pub fn of(m: &'a impl rdkafka::Message) -> Self {
        Self {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload(),
        }
    }

    /// Where it was read.
    pub fn origin(&self) -> Origin {
        Origin {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("state: {0}")]
    Store(StoreError),
    #[error("encoding output: {0}")]
    Encode(SchemaError),
    #[error("configuration: {0}")]
    Config(ConfigError),
    /// A writer schema could not be fetched: the batch cannot go on (nothing of it is written).
    #[error("{0}")]
    Registry(String),
}

error_from!(ProcessError {
    StoreError => Store,
    SchemaError => Encode,
    ConfigError => Config,
});

/// What one batch has gathered so far.
#[derive(Debug, Default)]
pub struct Batch {
    pub dead_letters: Vec<OutRecord>,
    /// Next offset per (topic, partition) after this batch: what the pipeline polled for it.
    pub positions: BTreeMap<(String, i32), i64>,
    pub messages: usize,
    /// Timestamps of applied events, for the latency histogram.
    pub event_times: Vec<Millis>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }
}

/// An input message decoded and normalised, before it meets the state.
// Nearly every message is an event: boxing it would add an allocation per message to save space in the
// rare refusal.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decoded {
    Event(Event),
    /// A record without a value, skipped: on a compacted topic (a table's changes, say) it says a key was
    /// deleted upstream, which is no event and no error.
    Tombstone,
    /// For the dead-letter topic: the stage that refused the message, and why.
    Refused {
        stage: &'static str,
        error: String,
    },
}

impl Decoded {
    fn refused(stage: &'static str, error: impl ToString) -> Self {
        Self::Refused {
            stage,
            error: error.to_string(),
        }
    }
}

/// How messages of one input topic are read.
struct Input {
    channel: String,
    layout: Layout,
    /// `stitcher_events_consumed_total` for its channel, looked up once.
    consumed: IntCounter,
    /// `stitcher_input_tombstones_total` for its channel.
    tombstones: IntCounter,
}

/// `stitcher_output_records_total` by kind, looked up once: a labelled counter hashes its labels and
/// takes a lock at each lookup, and a batch makes a few records per message.
struct OutputCounters {
    update: IntCounter,
    redirect: IntCounter,
    tombstone: IntCounter,
    identity: IntCounter,
}

impl OutputCounters {
    fn new(metrics: &Metrics) -> Self {
        let kind = |k: &str| metrics.output_records.with_label_values(&[k]);
        Self {
            update: kind("update"),
            redirect: kind("redirect"),
            tombstone: kind("tombstone"),
            identity: kind("identity"),
        }
    }
}

pub struct Processor {
    decoder: EventDecoder,
    normalizer: Normalizer,
    stitcher: Stitcher,
    encoder: UpdateEncoder,
    /// By topic, looked up for every message.
    inputs: HashMap<String, Input, foldhash::fast::RandomState>,
    /// Every input channel, for the channel-scoped copies of an erased identifier.
    channels: Vec<String>,
    output_topic: String,
    /// Whether `STITCHER_SUPPRESSION_SALT` is set (erasures can suppress).
    suppression_salt: bool,
    /// `output.identity_topic`, if set.
    identity_topic: Option<String>,
    dlq_topic: String,
    /// Largest record produced (`output.max_record_bytes`).
    max_record_bytes: usize,
    metrics: Metrics,
    output_counts: OutputCounters,
}

impl Processor {
    pub fn new(cfg: &Config, metrics: Metrics) -> Result<Self, ProcessError> {
        let registry = match cfg.registry.enabled() {
            true => Some(std::sync::Arc::new(
                crate::registry::Registry::new(&cfg.registry)
                    .map_err(|e| ProcessError::Registry(e.to_string()))?,
            )),
            false => None,
        };
        Ok(Self {
            decoder: EventDecoder::new(
                &cfg.processing.avro_schema_ids,
                cfg.processing.max_message_bytes,
            )?,
            normalizer: Normalizer::new(&cfg.identity)?.with_limits(&cfg.limits),
            stitcher: Stitcher::new(Rules::new(&cfg.guardrails))
                .with_enrichment(std::sync::Arc::new(cfg.enrichment.clone())),
            encoder: UpdateEncoder::new(cfg.output.schema_id)?,
            inputs: cfg
                .inputs
                .iter()
                .map(|i| {
                    let layout = i
                        .layout(registry.clone())
                        .map_err(|e| ConfigError::Invalid(format!("input {:?}: {e}", i.topic)))?;
                    let input = Input {
                        channel: i.channel.clone(),
                        layout,
                        consumed: metrics.events_consumed.with_label_values(&[&i.channel]),
                        tombstones: metrics.input_tombstones.with_label_values(&[&i.channel]),
                    };
                    Ok((i.topic.clone(), input))
                })
                .collect::<Result<_, ProcessError>>()?,
            channels: {
                let mut c: Vec<String> = cfg.inputs.iter().map(|i| i.channel.clone()).collect();
                c.sort();
                c.dedup();
                c
            },
            output_topic: cfg.output.topic.clone(),
            suppression_salt: cfg.identity.suppression_salt.is_some(),
            identity_topic: Some(cfg.output.identity_topic.clone()).filter(|t| !t.is_empty()),
            dlq_topic: cfg.output.dead_letter_topic.clone(),
            max_record_bytes: cfg.output.max_record_bytes,
            output_counts: OutputCounters::new(&metrics),
            metrics,
        })
    }

    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    pub fn stitcher(&self) -> &Stitcher {
        &self.stitcher
    }

    /// Decodes and normalises an input message. Fails only when the message's writer schema cannot be
    /// fetched (the registry is unreachable). Needs nothing of the batch: the decode thread calls it ahead
    /// of the batch ([`crate::pipeline`]).
    pub fn decode(&self, msg: InMessage<'_>) -> Result<Decoded, ProcessError> {
        let Some(input) = self.inputs.get(msg.topic) else {
            return Ok(Decoded::refused(
                "route",
                "message from a topic that is not a configured input",
            ));
        };
        input.consumed.inc();
        let Some(payload) = msg.payload else {
            input.tombstones.inc();
            return Ok(Decoded::Tombstone);
        };
        let raw = match self.decoder.decode(&input.layout, payload) {
            Ok(raw) => raw,
            Err(DecodeError::RegistryUnavailable(e)) => return Err(ProcessError::Registry(e)),
            Err(e) => return Ok(Decoded::refused("decode", e)),
        };
        // A mapped input may name the channel per event (`fields.channel`): one of the configured
        // channels, or the input's own.
        let channel = match (&input.layout.mapping, &raw.channel) {
            (Some(_), Some(c)) if self.channels.contains(c) => c.clone(),
            _ => input.channel.clone(),
        };
        match self
            .normalizer
            .event(raw, &channel, crate::model::now_millis(), |r| {
                self.metrics
                    .identifiers_rejected
                    .with_label_values(&[r.as_str()])
                    .inc();
            }) {
            Ok(ev) => Ok(Decoded::Event(Event {
                origin: Some(msg.origin()),
                ..ev
            })),
            Err(e) => Ok(Decoded::refused("validate", e)),
        }
    }

    /// The event of a decoded input message; one that was refused becomes a dead letter.
    pub fn admit(&self, batch: &mut Batch, msg: InMessage<'_>, decoded: Decoded) -> Option<Event> {
        match decoded {
            Decoded::Event(ev) => Some(ev),
            Decoded::Tombstone => None,
            Decoded::Refused { stage, error } => {
                self.dead_letter(batch, source(msg), msg, stage, &error);
                None
            }
        }
    }

    /// Parses a control message (see [`crate::control`]), its identifiers normalised; a malformed one is
    /// dead-lettered (`None`).
    pub fn control_command(
        &self,
        batch: &mut Batch,
        src: Source<'_>,
        msg: InMessage<'_>,
    ) -> Option<Control> {
        let command = match Command::parse(msg.payload.unwrap_or_default()) {
            Ok(c) => c,
            Err(e) => {
                self.dead_letter(batch, src, msg, "control", &e);
                return None;
            }
        };
        let normalize = |kind: &str, value: &str| {
            self.normalizer.identifier(kind, value).map_err(|r| {
                format!(
                    "control command identifier {kind:?} refused: {}",
                    r.as_str()
                )
            })
        };
        let given = |kind: &str, value: Option<String>, hash: Option<String>| {
            let id = match (value, hash) {
                (Some(value), _) => normalize(kind, &value),
                (None, Some(hash)) => self.normalizer.hashed_identifier(kind, &hash).map_err(|r| {
                    format!("control command hash for type {kind:?} refused: {} (a hash is 64 hex digits, for a type in identity.hashed_types)", r.as_str())
                }),
                (None, None) => Err("the command takes either value or hash".into()),
            };
            // The identifier and its copies scoped to each channel (consent sealing).
            id.map(|id| -> Vec<Identifier> {
                std::iter::once(id.clone())
                    .chain(self.channels.iter().map(|ch| id.scoped(ch)))
                    .collect()
            })
        };
        let salt = |op: &str| {
            if self.suppression_salt {
                Ok(())
            } else {
                Err(format!(
                    "{op} needs STITCHER_SUPPRESSION_SALT in the service's environment (README \"Erasure and unmerge\")"
                ))
            }
        };
        let control = match command {
            Command::EraseIdentifier {
                kind,
                value,
                hash,
                suppress,
            } => (if suppress {
                salt("erase_identifier with suppress")
            } else {
                Ok(())
            })
            .and_then(|()| given(&kind, value, hash))
            .map(|copies| Control::Erase { copies, suppress }),
            Command::Unsuppress { kind, value, hash } => salt("unsuppress")
                .and_then(|()| given(&kind, value, hash))
                .map(Control::Unsuppress),
            Command::Release {} => Ok(Control::Release),
            Command::EraseProfile { profile_id } => ProfileId::parse(&profile_id)
                .map(Control::EraseProfile)
                .ok_or_else(|| crate::model::MALFORMED_PROFILE_ID.to_string()),
            Command::Unlink { a, b } => {
                match (normalize(&a.kind, &a.value), normalize(&b.kind, &b.value)) {
                    (Ok(a), Ok(b)) => Ok(Control::Unlink(a, b)),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
        };
        match control {
            Ok(c) => Some(c),
            Err(e) => {
                self.dead_letter(batch, src, msg, "control", &e);
                None
            }
        }
    }

    /// Logs and counts a control command applied (or that found nothing to change).
    pub fn control_applied(&self, op: &str, trigger: &str, reshape: &Reshape) {
        let found =
            !reshape.is_empty() || reshape.identifiers_erased > 0 || reshape.links_removed > 0;
        let result = if found { "applied" } else { "not_found" };
        tracing::info!(
            op,
            result,
            trigger,
            splits = reshape.splits.len(),
            erased = reshape.erased.len(),
            "control command"
        );
        self.count_control(op, result);
    }

    /// Logs and counts a control command without a graph outcome: `found` whether it had something to
    /// change.
    pub fn control_result(&self, op: &str, trigger: &str, found: bool) {
        let result = if found { "applied" } else { "not_found" };
        tracing::info!(op, result, trigger, "control command");
        self.count_control(op, result);
    }

    fn count_control(&self, op: &str, result: &str) {
        self.metrics
            .control_commands
            .with_label_values(&[op, result])
            .inc();
    }

    pub fn dead_letter(
        &self,
        batch: &mut Batch,
        src: Source<'_>,
        msg: InMessage<'_>,
        stage: &str,
        error: &str,
    ) {
        tracing::debug!(
            topic = src.topic,
            partition = src.partition,
            offset = src.offset,
            stage,
            error,
            "dead letter"
        );
        self.metrics.dead_letters.with_label_values(&[stage]).inc();
        batch.dead_letters.push(dead_letters::record(
            &self.dlq_topic,
            src,
            msg.key,
            msg.payload,
            stage,
            error,
            self.max_record_bytes,
        ));
    }

    /// The records of a batch's changes: a tombstone per id that stopped existing (and is not alive again
    /// at the end of the batch), then per touched live profile its redirects and its update.
    pub fn changes_records(
        &self,
        profiles: &impl ProfileSource,
        changes: &BatchChanges,
        now: Millis,
        out: &mut Vec<OutRecord>,
    ) -> Result<(), ProcessError> {
        self.metrics.profiles_created.inc_by(changes.created);
        self.metrics.profile_merges.inc_by(changes.merges);
        self.metrics.profile_splits.inc_by(changes.splits);
        self.metrics.shared_identifiers.inc_by(changes.shared_found);
        self.metrics
            .identifiers_erased
            .inc_by(changes.identifiers_erased);
        // Tombstones first, so that a key that came back within the batch ends on its update.
        for (id, version, kind, trigger) in changes.erased() {
            if profiles.live_node(id)?.is_none() {
                out.push(self.output(id.as_str(), None));
                self.output_counts.tombstone.inc();
                let ended = IdentityChange::ended(
                    id.to_string(),
                    version,
                    kind,
                    None,
                    TriggerRecord::from(trigger),
                    now,
                );
                self.identity_change(out, ended);
            }
        }
        for u in changes.updates() {
            let Some(record) = profiles.with_profile(u.node, &mut |p| {
                p.map(|p| {
                    (
                        p.id(),
                        ProfileRecord::new(p, self.stitcher.enrichment()),
                        p.version,
                    )
                })
            })?
            else {
                continue;
            };
            let (id, profile, version) = record;
            // An id retired earlier in the batch may live again at its end (set apart as a shared
            // identifier's profile, say): it neither redirects nor ends.
            let mut merged_from: Vec<&ProfileId> = Vec::with_capacity(u.merged_from.len());
            for old in u.merged_from.iter().filter(|old| **old != id) {
                if profiles.live_node(old)?.is_none() {
                    merged_from.push(old);
                }
            }
            for old in &merged_from {
                out.push(self.redirect(old, &id, now)?);
            }
            if !u.identity.is_empty() {
                let trigger = TriggerRecord::from(&u.trigger);
                for old in &merged_from {
                    let ended = IdentityChange::ended(
                        old.to_string(),
                        version,
                        "merged_into",
                        Some(id.to_string()),
                        trigger.clone(),
                        now,
                    );
                    self.identity_change(out, ended);
                }
                self.identity_change(
                    out,
                    IdentityChange {
                        profile_id: id.to_string(),
                        version,
                        changes: u.identity.iter().map(|k| k.to_string()).collect(),
                        identifiers: profile
                            .identifiers
                            .iter()
                            .map(|i| IdentityRef {
                                kind: i.kind.clone(),
                                value: i.value.clone(),
                            })
                            .collect(),
                        merged_into: None,
                        merged_from: merged_from.iter().map(|p| p.to_string()).collect(),
                        split_from: u.split_from.as_ref().map(|p| p.to_string()),
                        refused: u.refused.iter().map(Into::into).collect(),
                        trigger,
                        at: now,
                    },
                );
            }
            let update = ProfileUpdate {
                profile_id: id.to_string(),
                redirect_to: None,
                merged_from: merged_from.iter().map(|p| p.to_string()).collect(),
                trigger_event_id: Some(u.trigger.id.clone()),
                trigger_channel: Some(u.trigger.channel.clone()),
                updated_at: now,
                refused_links: u.refused.iter().map(Into::into).collect(),
                profile: Some(profile),
                split_from: u
                    .split_from
                    .as_ref()
                    .filter(|from| u.split_into_several || **from != id)
                    .map(|p| p.to_string()),
            };
            out.push(self.update(&update)?);
        }
        Ok(())
    }

    /// A record of the identity change stream, if there is one.
    fn identity_change(&self, out: &mut Vec<OutRecord>, change: IdentityChange) {
        let Some(topic) = &self.identity_topic else {
            return;
        };
        self.output_counts.identity.inc();
        out.push(OutRecord {
            topic: topic.clone(),
            partition: None,
            key: Some(change.profile_id.as_bytes().to_vec()),
            payload: Some(change.encode()),
            headers: vec![],
        });
    }

    /// The record saying that profile `old` now lives in `to`.
    pub fn redirect(
        &self,
        old: &ProfileId,
        to: &ProfileId,
        now: Millis,
    ) -> Result<OutRecord, ProcessError> {
        let redirect = ProfileUpdate::redirect(old, to, now);
        self.output_counts.redirect.inc();
        Ok(self.output(old.as_str(), Some(self.encoder.encode(&redirect)?)))
    }

    /// The record of a profile update, keyed by its profile id.
    pub fn update(&self, update: &ProfileUpdate) -> Result<OutRecord, ProcessError> {
        self.output_counts.update.inc();
        Ok(self.output(&update.profile_id, Some(self.encoder.encode(update)?)))
    }

    /// A record on the profile topic; `None` payload is a tombstone.
    pub fn output(&self, key: &str, payload: Option<Vec<u8>>) -> OutRecord {
        OutRecord {
            topic: self.output_topic.clone(),
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            payload,
            headers: vec![],
        }
    }

    pub fn encoder(&self) -> &UpdateEncoder {
        &self.encoder
    }
}

/// Where a message came from, for its dead letter.
pub fn source(msg: InMessage<'_>) -> Source<'_> {
    Source {
        topic: msg.topic,
        partition: msg.partition,
        offset: msg.offset,
    }
}

/// Positions as stored in the checkpoint.
pub fn positions_vec(map: &BTreeMap<(String, i32), i64>) -> Vec<Position> {
    map.iter()
        .map(|((topic, partition), next)| Position {
            topic: topic.clone(),
            partition: *partition,
            next_offset: *next,
        })
        .collect()
}

/// A control command with its identifiers normalised.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// An identifier and its channel-scoped copies; with `suppress`, later events are stripped of them.
    Erase {
        copies: Vec<Identifier>,
        suppress: bool,
    },
    /// Lift the suppression of an identifier and its copies.
    Unsuppress(Vec<Identifier>),
    /// Close the merge-storm breaker everywhere.
    Release,
    EraseProfile(ProfileId),
    Unlink(Identifier, Identifier),
}

impl Control {
    pub fn op(&self) -> &'static str {
        match self {
            Control::Erase { .. } => "erase_identifier",
            Control::Unsuppress(_) => "unsuppress",
            Control::Release => "release",
            Control::EraseProfile(_) => "erase_profile",
            Control::Unlink(..) => "unlink",
        }
    }
}

/// What reads a profile into its record: its id and its output form.
pub type ProfileReader<'a> =
    dyn FnMut(Option<&Profile>) -> Option<(ProfileId, ProfileRecord, u64)> + 'a;

/// Where the records of a batch's changes read the profiles as the batch leaves them.
pub trait ProfileSource {
    /// The node of a live public id (no redirects followed).
    fn live_node(&self, id: &ProfileId) -> Result<Option<NodeId>, StoreError>;
    /// The profile of a node, handed to `f`.
    fn with_profile(
        &self,
        node: NodeId,
        f: &mut ProfileReader<'_>,
    ) -> Result<Option<(ProfileId, ProfileRecord, u64)>, StoreError>;
}
