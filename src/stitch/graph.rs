//! The merge logic. Pure: every read and write goes through [`GraphStore`].
//!
//! State model: an identifier points at the internal [`NodeId`] of its profile; a profile lives under its
//! node and knows its identifiers. A merge keeps the node of the profile with more identifiers (union by
//! size) and relabels only the smaller side's identifiers, so a merge costs O(smaller side). The public
//! [`ProfileId`] is derived from the profile's earliest event, so the oldest profile's id survives a merge
//! and the result does not depend on the order in which events arrive.
//!
//! Two more things are kept so that a merge can be undone:
//! - evidence: every pair of identifiers seen together in an accepted event is a link ([`Evidence`]);
//! - parts: what each event contributed to a profile is also added to the part of the event's most
//!   trusted identifier, so a profile is always the join of its identifiers' parts.
//!
//! A split (an identifier erased or found shared, a link removed) recomputes the connected components of
//! the profile's remaining links and rebuilds one profile per component from the parts.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{Event, Identifier, NodeId, ProfileId};
use crate::profile::{Enrichment, Profile, Seal, Seen};

use super::evidence::Evidence;
use super::rules::{Rule, Rules};

/// What stitching needs from state. Implemented by the RocksDB batch overlay and by [`MemStore`](super::MemStore).
pub trait GraphStore {
    type Error;
    fn node_of(&mut self, id: &Identifier) -> Result<Option<NodeId>, Self::Error>;
    fn set_node(&mut self, id: &Identifier, node: NodeId);
    fn remove_identifier(&mut self, id: &Identifier);
    /// Takes the profile out; it must be given back with `put_profile` or removed with `delete_profile`.
    /// Boxed, as the batch keeps it: a profile is large and moves through every merge.
    fn take_profile(&mut self, node: NodeId) -> Result<Option<Box<Profile>>, Self::Error>;
    fn put_profile(&mut self, node: NodeId, profile: Box<Profile>);
    /// A profile's seal, read without taking the profile out.
    fn seal(&mut self, node: NodeId) -> Result<Option<Seal>, Self::Error>;
    fn delete_profile(&mut self, node: NodeId);
    fn allocate_node(&mut self) -> Result<NodeId, Self::Error>;
    /// Marks the event as seen; false if it had been seen already.
    fn first_sighting(&mut self, event_id: &str) -> Result<bool, Self::Error>;
    /// Records that public id `from` now lives in `to`.
    fn redirect(&mut self, from: &ProfileId, to: &ProfileId);
    fn remove_redirect(&mut self, id: &ProfileId);
    fn redirect_of(&mut self, id: &ProfileId) -> Result<Option<ProfileId>, Self::Error>;
    /// Retired ids that redirect to `id` (splits and erasures; the in-memory store scans every redirect).
    fn redirects_to(&mut self, id: &ProfileId) -> Result<Vec<ProfileId>, Self::Error>;
    fn index(&mut self, id: &ProfileId, node: NodeId);
    fn unindex(&mut self, id: &ProfileId);
    fn indexed(&mut self, id: &ProfileId) -> Result<Option<NodeId>, Self::Error>;
    /// The identifiers linked to `id`, with the evidence of each link.
    fn links(&mut self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, Self::Error>;
    /// Adds evidence to the link between every two of `ids` (both directions).
    fn link_all(&mut self, ids: &[Identifier], evidence: &Evidence);
    fn remove_link(&mut self, a: &Identifier, b: &Identifier);
    /// Takes the part of an identifier out; give it back with `put_part`.
    fn take_part(&mut self, id: &Identifier) -> Result<Option<Box<Profile>>, Self::Error>;
    fn put_part(&mut self, id: &Identifier, part: Box<Profile>);
    /// Adds one event to the part of an identifier (`Profile::part_with`).
    fn add_to_part(&mut self, id: &Identifier, ev: &Event, cfg: &Enrichment);
    fn delete_part(&mut self, id: &Identifier);
}

/// Adds evidence to the links of `x` to every other of `ids`. `links` is sorted by identifier, as the
/// state keeps it, and stays so: the event's few identifiers are found by binary search and inserted in
/// place, without building a map of the list (most events add one link to a list of about ten). Generic
/// so that the state can edit a record's links borrowed from its encoding (`I` and `S` then borrow, and
/// order as `Identifier` and `String` do; `L` is then evidence that knows its bytes, see [`LinkValue`]).
pub(crate) fn add_evidence<I: Ord + Clone, S, L: LinkValue<S>>(
    links: &mut Vec<(I, L)>,
    x: &I,
    ids: &[I],
    evidence: &Evidence<S>,
) {
    debug_assert!(
        links.windows(2).all(|w| w[0].0 < w[1].0),
        "links not sorted"
    );
    for y in ids.iter().filter(|y| *y != x) {
        match links.binary_search_by(|(i, _)| i.cmp(y)) {
            Ok(at) => links[at].1.join(evidence),
            Err(at) => links.insert(at, (y.clone(), L::of(evidence))),
        }
    }
}

/// The value of a link in a list that [`add_evidence`] edits: its evidence, or (in the state) its
/// evidence together with the bytes it was read from, kept until an event changes it.
pub(crate) trait LinkValue<S> {
    /// A new link with this evidence.
    fn of(evidence: &Evidence<S>) -> Self;
    /// More evidence for this link.
    fn join(&mut self, evidence: &Evidence<S>);
}

impl<S: Ord + Clone> LinkValue<S> for Evidence<S> {
    fn of(evidence: &Evidence<S>) -> Self {
        evidence.clone()
    }

    fn join(&mut self, evidence: &Evidence<S>) {
        Evidence::join(self, evidence);
    }
}

/// Removes the link to `y` from `links` (sorted by identifier).
pub(crate) fn remove_evidence(links: &mut Vec<(Identifier, Evidence)>, y: &Identifier) {
    if let Ok(at) = links.binary_search_by(|(i, _)| i.cmp(y)) {
        links.remove(at);
    }
}

/// A link that guardrails refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: Rule,
    /// The identifier type whose link was refused.
    pub kind: String,
    /// The profile that was not merged, if the refused link was to an existing profile.
    pub other: Option<ProfileId>,
}

/// One profile split into several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The id of the profile before the split.
    pub from: ProfileId,
    /// The nodes of the profiles that came out of it (the largest, or the one that kept the id, kept the
    /// old node).
    pub into: Vec<NodeId>,
}

/// Changes other than the event's own profile: splits, erased profiles, shared identifiers set apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reshape {
    pub splits: Vec<Split>,
    /// Public ids that no longer exist, with the version their end has; each gets a tombstone.
    pub erased: Vec<(ProfileId, u64)>,
    /// Nodes of profiles made for identifiers found to be shared.
    pub quarantined: Vec<NodeId>,
    /// Ids that stopped existing in a split that was not an erasure, each now redirecting to the
    /// largest piece (so that older redirects still lead somewhere).
    pub retired: Vec<(ProfileId, NodeId)>,
    /// Identifiers removed from state.
    pub identifiers_erased: u64,
    /// Links removed by unlink commands (whether or not the profile split).
    pub links_removed: u64,
}

impl Reshape {
    /// Adds another step's changes (erasing one identifier and its channel-scoped copies, say).
    pub fn extend(&mut self, more: Reshape) {
        self.splits.extend(more.splits);
        self.erased.extend(more.erased);
        self.quarantined.extend(more.quarantined);
        self.retired.extend(more.retired);
        self.identifiers_erased += more.identifiers_erased;
        self.links_removed += more.links_removed;
    }

    pub fn is_empty(&self) -> bool {
        self.splits.is_empty() && self.erased.is_empty() && self.quarantined.is_empty()
    }
}

/// The outcome of applying one new event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub node: NodeId,
    pub created: bool,
    /// Public ids that stopped existing in this step (absorbed, or renamed), each now redirecting here.
    pub retired: Vec<ProfileId>,
    /// Nodes whose profiles were absorbed into `node`.
    pub absorbed_nodes: Vec<NodeId>,
    pub refused: Vec<Refusal>,
    /// Whether the event linked an identifier the profile did not hold.
    pub linked_new: bool,
    /// For each merge, the types of the event's identifiers that matched the two sides (one entry when
    /// they are of one type): the merge-storm breaker counts merges by type.
    pub merged_kinds: Vec<String>,
    /// Splits caused by an identifier of the event found to be shared.
    pub reshape: Reshape,
}

impl Applied {
    /// What the step did to the identity of its profile, for the identity change stream.
    pub fn identity_changes(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        if self.created {
            kinds.push("create");
        } else if self.linked_new {
            kinds.push("link");
        }
        if !self.absorbed_nodes.is_empty() {
            kinds.push("merge");
        } else if !self.retired.is_empty() {
            kinds.push("rename");
        }
        if !self.refused.is_empty() {
            kinds.push("refused");
        }
        kinds
    }
}

/// Applies events to the graph under the guardrails.
#[derive(Debug, Clone)]
pub struct Stitcher {
    rules: Rules,
    enrichment: Arc<Enrichment>,
}

impl Stitcher {
    /// A stitcher with the default enrichment.
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            enrichment: Arc::default(),
        }
    }

    /// With `[enrichment]` from the configuration.
    pub fn with_enrichment(mut self, enrichment: Arc<Enrichment>) -> Self {
        self.enrichment = enrichment;
        self
    }

    pub fn enrichment(&self) -> &Enrichment {
        &self.enrichment
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    fn sort_by_trust(&self, ids: &mut [Identifier]) {
        ids.sort_by(|a, b| self.rules.trust_key(a).cmp(&self.rules.trust_key(b)));
    }

    /// Applies one event. `Ok(None)` means the event id was seen before and nothing changed.
    pub fn apply<S: GraphStore>(
        &self,
        store: &mut S,
        ev: &Event,
    ) -> Result<Option<Applied>, S::Error> {
        if !store.first_sighting(&ev.event_id)? {
            return Ok(None);
        }
        let mut reshape = Reshape::default();
        let (ids, mut owner) = self.identify(store, ev)?;
        // A shared identifier must not glue anyone together: find them before linking anything.
        if self.detect_shared(store, &ids, ev, &mut reshape)? {
            owner = resolve(store, &ids)?;
        }
        let (candidates, shared) = take_matched(store, &owner)?;
        let has_unowned = owner.iter().any(Option::is_none);
        if candidates.is_empty() && !has_unowned && !shared.is_empty() {
            // Only shared identifiers: the event belongs to the first shared identifier's own profile.
            let mut shared = shared;
            let (node, mut profile) = shared.remove(0);
            for (n, p) in shared {
                store.put_profile(n, p);
            }
            let linked: Vec<Identifier> = ids
                .iter()
                .filter(|i| profile.identifiers.contains_key(*i))
                .cloned()
                .collect();
            let joined = [(profile.anchor.1.clone(), node)];
            profile.apply(ev, &linked, &self.enrichment);
            self.record_part(store, &linked, ev)?;
            // An event older than the profile's anchor renames it, as below.
            let applied = Applied {
                node,
                created: false,
                retired: reindex(store, &joined, &profile, node),
                absorbed_nodes: vec![],
                refused: vec![],
                linked_new: false,
                merged_kinds: vec![],
                reshape,
            };
            if !applied.identity_changes().is_empty() {
                profile.version += 1;
            }
            store.put_profile(node, profile);
            return Ok(Some(applied));
        }
        // The type of the event's identifier that matched a node.
        let kind_of = |node: NodeId| {
            ids.iter()
                .zip(&owner)
                .find(|(_, o)| **o == Some(node))
                .map(|(id, _)| id.base_kind().to_string())
                .unwrap_or_default()
        };
        let mut refused = Vec::new();
        for (n, p) in shared {
            let kind = kind_of(n);
            refused.push(Refusal {
                rule: Rule::Shared,
                kind,
                other: None,
            });
            store.put_profile(n, p);
        }

        let mut absorbed_nodes = Vec::new();
        let mut merged_kinds = Vec::new();
        let mut rest = candidates.into_iter();
        let (mut node, mut profile, created) = match rest.next() {
            Some((n, p)) => (n, p, false),
            None => {
                let mut p = Box::new(Profile::new(ev, &self.enrichment));
                // Identifiers are linked below, within the limits.
                p.identifiers.clear();
                (store.allocate_node()?, p, true)
            }
        };
        // The profiles joined, by the event id of their anchor (a profile's id is a hash of it, made only
        // where an id changes), and where each is indexed: ids other than the one after are retired, and
        // the index is written again only if the id after is not already indexed at its node.
        let mut joined: Vec<(String, NodeId)> = Vec::new();
        if !created {
            joined.push((profile.anchor.1.clone(), node));
        }
        let mut merged_into_primary: BTreeSet<NodeId> = BTreeSet::from([node]);
        let event_refuses = ev
            .consent
            .as_ref()
            .and_then(|c| c.cross_channel)
            .is_some_and(|v| !v);

        // Merge the other matched profiles, most trusted first, unless a rule forbids it.
        for (other, other_profile) in rest {
            let verdict = if event_refuses
                || profile.cross_channel_refused()
                || other_profile.cross_channel_refused()
            {
                Err(Rule::Consent)
            } else {
                self.rules.check_merge(&profile, &other_profile)
            };
            match verdict {
                Ok(()) => {
                    let (mine, theirs) = (kind_of(node), kind_of(other));
                    if mine != theirs {
                        merged_kinds.push(mine);
                    }
                    merged_kinds.push(theirs);
                    joined.push((other_profile.anchor.1.clone(), other));
                    // Union by size: the larger side keeps its node, the smaller side is relabelled.
                    let (keep, gone, mut big, small) = if other_profile.identifiers.len()
                        > profile.identifiers.len()
                        || (other_profile.identifiers.len() == profile.identifiers.len()
                            && other < node)
                    {
                        (other, node, other_profile, profile)
                    } else {
                        (node, other, profile, other_profile)
                    };
                    for id in small.identifiers.keys() {
                        store.set_node(id, keep);
                    }
                    big.absorb(*small);
                    store.delete_profile(gone);
                    absorbed_nodes.push(gone);
                    merged_into_primary.insert(other);
                    node = keep;
                    profile = big;
                }
                Err(rule) => {
                    refused.push(Refusal {
                        rule,
                        kind: kind_of(other),
                        other: Some(other_profile.id()),
                    });
                    store.put_profile(other, other_profile);
                }
            }
        }

        // Link the event's identifiers that belong to no profile yet, within the limits.
        let mut counts = profile.type_counts();
        let mut total = profile.identifiers.len();
        let mut linked: Vec<Identifier> = Vec::with_capacity(ids.len());
        let mut linked_new = false;
        for (id, own) in ids.iter().zip(&owner) {
            match own {
                Some(n) if merged_into_primary.contains(n) => linked.push(id.clone()),
                Some(_) => {} // belongs to a profile whose merge was refused, or to a shared identifier
                None if profile.identifiers.contains_key(id) => linked.push(id.clone()),
                None => match self.rules.check_add(&counts, total, id) {
                    Ok(()) => {
                        *counts.entry(id.base_kind()).or_insert(0) += 1;
                        total += 1;
                        store.set_node(id, node);
                        linked.push(id.clone());
                        linked_new = true;
                    }
                    Err(rule) => refused.push(Refusal {
                        rule,
                        kind: id.base_kind().to_string(),
                        other: None,
                    }),
                },
            }
        }
        if created {
            profile.observe_identifiers(&linked, ev.timestamp);
        } else {
            profile.apply(ev, &linked, &self.enrichment);
        }
        let evidence = Evidence::of(ev);
        store.link_all(&linked, &evidence);
        self.record_part(store, &linked, ev)?;

        let applied = Applied {
            node,
            created,
            retired: reindex(store, &joined, &profile, node),
            absorbed_nodes,
            refused,
            linked_new,
            merged_kinds,
            reshape,
        };
        if !applied.identity_changes().is_empty() {
            // Absorbing took the largest version of the profiles joined.
            profile.version += 1;
        }
        store.put_profile(node, profile);
        Ok(Some(applied))
    }

    /// The event's identifiers in decreasing trust (the most trusted match decides the primary profile),
    /// in the identity space the event belongs to, with the node of each. Consent: a person who refused
    /// cross-channel identification is sealed to one channel; an event of another channel lives in that
    /// channel's own identity space (identifiers scoped to the channel).
    fn identify<S: GraphStore>(
        &self,
        store: &mut S,
        ev: &Event,
    ) -> Result<(Vec<Identifier>, Owners), S::Error> {
        let mut ids: Vec<Identifier> = ev.identifiers.clone();
        self.sort_by_trust(&mut ids);
        let owner = resolve(store, &ids)?;
        let Some(first) = owner.iter().flatten().next().copied() else {
            return Ok((ids, owner));
        };
        let sealed = store.seal(first)?.is_some_and(|s| s.seals_out(&ev.channel));
        if !sealed || ids.iter().any(|id| id.scope().is_some()) {
            return Ok((ids, owner));
        }
        let mut scoped: Vec<Identifier> = ids.iter().map(|id| id.scoped(&ev.channel)).collect();
        self.sort_by_trust(&mut scoped);
        let owner = resolve(store, &scoped)?;
        Ok((scoped, owner))
    }

    /// Adds the event to the part of its most trusted linked identifier.
    fn record_part<S: GraphStore>(
        &self,
        store: &mut S,
        linked: &[Identifier],
        ev: &Event,
    ) -> Result<(), S::Error> {
        if let Some(anchor) = linked.first() {
            store.add_to_part(anchor, ev, &self.enrichment);
        }
        Ok(())
    }
}

/// The node of each of an event's identifiers, in the same order.
type Owners = Vec<Option<NodeId>>;

/// Profiles taken out of the store, with their nodes.
type Taken = Vec<(NodeId, Box<Profile>)>;

/// Nodes of identifiers, in the same order.
fn resolve<S: GraphStore>(store: &mut S, ids: &[Identifier]) -> Result<Owners, S::Error> {
    ids.iter().map(|id| store.node_of(id)).collect()
}

/// Takes the profiles the event's identifiers matched out of the store, each once, in trust order: the
/// merge candidates, and the profiles of shared identifiers (never merge candidates).
fn take_matched<S: GraphStore>(
    store: &mut S,
    owner: &[Option<NodeId>],
) -> Result<(Taken, Taken), S::Error> {
    let mut candidates: Taken = Vec::new();
    let mut shared: Taken = Vec::new();
    for n in owner.iter().flatten() {
        if candidates.iter().chain(&shared).any(|(c, _)| c == n) {
            continue;
        }
        if let Some(p) = store.take_profile(*n)? {
            if p.shared {
                shared.push((*n, p));
            } else {
                candidates.push((*n, p));
            }
        }
    }
    Ok((candidates, shared))
}

/// A public id to its live id and node, following redirects.
pub fn resolve_profile_id<S: GraphStore>(
    store: &mut S,
    id: &ProfileId,
) -> Result<Option<(ProfileId, NodeId)>, S::Error> {
    // Both lookups need the store mutably; they never run at the same time.
    let store = std::cell::RefCell::new(store);
    crate::store::follow_redirects(
        id,
        |p| store.borrow_mut().indexed(p),
        |p| store.borrow_mut().redirect_of(p),
    )
}

/// The index after an event: the profiles `joined` (by the event id of their anchor, and where each was
/// indexed) whose id is not the id of `profile` after the event are retired (unindexed, redirected to
/// it; returned in id order), and the id after is indexed at `node` unless it already was. A profile's
/// id is a hash of its anchor, made only where an id changes.
fn reindex<S: GraphStore>(
    store: &mut S,
    joined: &[(String, NodeId)],
    profile: &Profile,
    node: NodeId,
) -> Vec<ProfileId> {
    let changed: BTreeSet<ProfileId> = joined
        .iter()
        .filter(|(anchor, _)| *anchor != profile.anchor.1)
        .map(|(anchor, _)| ProfileId::from_anchor(anchor))
        .collect();
    let mut retired = Vec::with_capacity(changed.len());
    if !changed.is_empty() {
        // Hashed once, and only when an id changes.
        let id_after = profile.id();
        for old in changed {
            store.redirect(&old, &id_after);
            store.unindex(&old);
            retired.push(old);
        }
    }
    if !joined
        .iter()
        .any(|(anchor, n)| *n == node && *anchor == profile.anchor.1)
    {
        store.index(&profile.id(), node);
    }
    retired
}

mod split;

pub use split::redirect_tree;

#[cfg(test)]
mod tests;
