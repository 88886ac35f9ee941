//! What one batch changed, coalesced for the output: one update per live profile with what merged into it
//! or split from it, one redirect per retired id, one tombstone per erased id.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{Event, NodeId, Origin, ProfileId};

use super::graph::{Applied, Refusal, Reshape};

/// What one batch changed, coalesced: one update per live profile, one redirect per retired id, one
/// tombstone per erased id.
#[derive(Debug, Default)]
pub struct BatchChanges {
    /// Touched nodes with the last event (or command) that touched them.
    touched: BTreeMap<NodeId, Trigger>,
    /// Touched nodes whose identity changed, and how (the identity change stream).
    identity: BTreeMap<NodeId, BTreeSet<&'static str>>,
    /// Node absorbed -> node it went into, within this batch.
    forwarded: HashMap<NodeId, NodeId>,
    /// Retired public ids and the node they went into.
    retired: BTreeMap<ProfileId, NodeId>,
    /// Refusals per node, to report on the output.
    refused: BTreeMap<NodeId, Vec<Refusal>>,
    /// Nodes that came out of a split, with the id of the profile they came from and whether it split
    /// into several pieces (rather than losing identifiers and staying one).
    split_from: BTreeMap<NodeId, (ProfileId, bool)>,
    /// Ids erased (or split away) in this batch, with the version, kind and trigger of their end.
    erased: BTreeMap<ProfileId, (u64, &'static str, Trigger)>,
    pub created: u64,
    pub merges: u64,
    pub splits: u64,
    pub shared_found: u64,
    pub identifiers_erased: u64,
}

/// The event (or command) that last touched a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// The event id, or `control:<topic>:<partition>:<offset>` for a command.
    pub id: String,
    pub channel: String,
    /// The input record it came from.
    pub origin: Option<Origin>,
    /// A control command, not an event.
    pub command: bool,
}

impl Trigger {
    pub fn of(ev: &Event) -> Self {
        Self {
            id: ev.event_id.clone(),
            channel: ev.channel.clone(),
            origin: ev.origin.clone(),
            command: false,
        }
    }

    /// How a control command read at `origin` is named: never by the identifier it is about, which the
    /// output and the logs must not carry after an erasure.
    pub fn command_name(origin: &Origin) -> String {
        format!("control:{origin}")
    }

    /// A control command, by its [`Trigger::command_name`].
    pub fn command(trigger: &str) -> Self {
        Self {
            id: trigger.to_string(),
            channel: "control".to_string(),
            origin: trigger.strip_prefix("control:").and_then(Origin::parse),
            command: true,
        }
    }
}

impl BatchChanges {
    pub fn record(&mut self, ev: &Event, applied: Applied) {
        let trigger = Trigger::of(ev);
        let kinds = applied.identity_changes();
        self.record_reshape(&trigger, "split", applied.reshape);
        for gone in &applied.absorbed_nodes {
            self.moved(*gone, applied.node);
        }
        self.merges += applied.absorbed_nodes.len() as u64;
        self.created += u64::from(applied.created);
        for id in applied.retired {
            self.erased.remove(&id);
            self.retired.insert(id, applied.node);
        }
        if !applied.refused.is_empty() {
            self.refused
                .entry(applied.node)
                .or_default()
                .extend(applied.refused);
        }
        if !kinds.is_empty() {
            self.identity.entry(applied.node).or_default().extend(kinds);
        }
        self.touched.insert(applied.node, trigger);
    }

    /// The profile of node `from` now lives under node `to` (absorbed by it, or moved there whole): what
    /// the batch recorded for it follows it.
    pub fn moved(&mut self, from: NodeId, to: NodeId) {
        self.forwarded.insert(from, to);
        if let Some(t) = self.touched.remove(&from) {
            self.touched.entry(to).or_insert(t);
        }
        if let Some(r) = self.refused.remove(&from) {
            self.refused.entry(to).or_default().extend(r);
        }
        if let Some(split) = self.split_from.remove(&from) {
            self.split_from.entry(to).or_insert(split);
        }
        if let Some(kinds) = self.identity.remove(&from) {
            self.identity.entry(to).or_default().extend(kinds);
        }
    }

    /// Records splits, erasures and shared identifiers, triggered by an event or a control command; `kind`
    /// is what the identity change stream calls its splits and ends (`split`, `erase`, `unlink`).
    pub fn record_reshape(&mut self, trigger: &Trigger, kind: &'static str, reshape: Reshape) {
        self.splits += reshape.splits.len() as u64;
        self.shared_found += reshape.quarantined.len() as u64;
        self.identifiers_erased += reshape.identifiers_erased;
        for split in reshape.splits {
            let several = split.into.len() > 1;
            for n in split.into {
                self.split_from.insert(n, (split.from.clone(), several));
                self.touched.insert(n, trigger.clone());
                self.identity.entry(n).or_default().insert(kind);
            }
        }
        for n in reshape.quarantined {
            self.touched.insert(n, trigger.clone());
            self.identity.entry(n).or_default().insert("shared");
        }
        for (id, version) in reshape.erased {
            self.retired.remove(&id);
            self.erased.insert(id, (version, kind, trigger.clone()));
        }
        for (id, node) in reshape.retired {
            self.erased.remove(&id);
            self.retired.insert(id, node);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.touched.is_empty() && self.erased.is_empty()
    }

    /// Ids to tombstone: erased in this batch and not alive again at its end (`live` tells), with the
    /// version, kind and trigger of their end.
    pub fn erased(&self) -> impl Iterator<Item = (&ProfileId, u64, &'static str, &Trigger)> {
        self.erased
            .iter()
            .map(|(id, (v, kind, trigger))| (id, *v, *kind, trigger))
    }

    /// The node a node ended up in at the end of the batch.
    pub fn resolve(&self, mut node: NodeId) -> NodeId {
        while let Some(next) = self.forwarded.get(&node) {
            node = *next;
        }
        node
    }

    /// Live nodes touched, with their trigger, the ids they absorbed and their refusals.
    pub fn updates(&self) -> Vec<NodeUpdate> {
        let mut merged_from: BTreeMap<NodeId, Vec<ProfileId>> = BTreeMap::new();
        for (id, node) in &self.retired {
            merged_from
                .entry(self.resolve(*node))
                .or_default()
                .push(id.clone());
        }
        self.touched
            .iter()
            .map(|(node, trigger)| NodeUpdate {
                node: *node,
                trigger: trigger.clone(),
                identity: self
                    .identity
                    .get(node)
                    .map(|k| k.iter().copied().collect())
                    .unwrap_or_default(),
                merged_from: merged_from.remove(node).unwrap_or_default(),
                refused: self.refused.get(node).cloned().unwrap_or_default(),
                split_from: self.split_from.get(node).map(|(from, _)| from.clone()),
                split_into_several: self.split_from.get(node).is_some_and(|(_, s)| *s),
            })
            .collect()
    }
}

/// One profile to emit at the end of a batch.
#[derive(Debug, Clone)]
pub struct NodeUpdate {
    pub node: NodeId,
    pub trigger: Trigger,
    /// How its identity changed in the batch (empty: it did not).
    pub identity: Vec<&'static str>,
    /// Public ids now living in this profile; each also gets a redirect record.
    pub merged_from: Vec<ProfileId>,
    pub refused: Vec<Refusal>,
    /// The profile this one was split from, if it came out of a split in this batch.
    pub split_from: Option<ProfileId>,
    /// Whether that split made several profiles (every piece, the one keeping the id included, reports
    /// `split_from`); otherwise the profile only lost identifiers, which matters only if its id changed.
    pub split_into_several: bool,
}
