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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::model::{Event, Identifier, NodeId, Origin, ProfileId};
use crate::profile::{Enrichment, Profile, Seal, Seen};

use super::evidence::Evidence;
use super::rules::{Rule, Rules};

/// What stitching needs from state. Implemented by the RocksDB batch overlay and by [`MemStore`].
pub trait GraphStore {
    type Error;
    fn node_of(&mut self, id: &Identifier) -> Result<Option<NodeId>, Self::Error>;
    fn set_node(&mut self, id: &Identifier, node: NodeId);
    fn remove_identifier(&mut self, id: &Identifier);
    /// Takes the profile out; it must be given back with `put_profile` or removed with `delete_profile`.
    fn take_profile(&mut self, node: NodeId) -> Result<Option<Profile>, Self::Error>;
    fn put_profile(&mut self, node: NodeId, profile: Profile);
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
    /// Retired ids that redirect to `id`. May scan every redirect: erasure only.
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
    fn take_part(&mut self, id: &Identifier) -> Result<Option<Profile>, Self::Error>;
    fn put_part(&mut self, id: &Identifier, part: Profile);
    /// Joins more into the part of an identifier (a blind write: parts join like profiles).
    fn join_part(&mut self, id: &Identifier, more: Profile);
    fn delete_part(&mut self, id: &Identifier);
}

/// Adds evidence to the links of `x` to every other of `ids`.
pub(crate) fn add_evidence(
    links: &mut BTreeMap<Identifier, Evidence>,
    x: &Identifier,
    ids: &[Identifier],
    evidence: &Evidence,
) {
    for y in ids.iter().filter(|y| *y != x) {
        links
            .entry(y.clone())
            .and_modify(|e| e.join(evidence))
            .or_insert_with(|| evidence.clone());
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
            profile.apply(ev, &linked, &self.enrichment);
            self.record_part(store, &linked, ev)?;
            store.put_profile(node, profile);
            return Ok(Some(Applied {
                node,
                created: false,
                retired: vec![],
                absorbed_nodes: vec![],
                refused: vec![],
                linked_new: false,
                merged_kinds: vec![],
                reshape,
            }));
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

        let mut retired = Vec::new();
        let mut absorbed_nodes = Vec::new();
        let mut merged_kinds = Vec::new();
        let mut rest = candidates.into_iter();
        let (mut node, mut profile, created) = match rest.next() {
            Some((n, p)) => (n, p, false),
            None => {
                let mut p = Profile::new(ev, &self.enrichment);
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
                    big.absorb(small);
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
        let mut counts: BTreeMap<String, usize> = profile
            .type_counts()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
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
                        *counts.entry(id.base_kind().to_string()).or_insert(0) += 1;
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

        // The ids joined that are not the id after, in id order.
        let changed: BTreeSet<ProfileId> = joined
            .iter()
            .filter(|(anchor, _)| *anchor != profile.anchor.1)
            .map(|(anchor, _)| ProfileId::from_anchor(anchor))
            .collect();
        if !changed.is_empty() {
            let id_after = profile.id();
            for old in changed {
                store.redirect(&old, &id_after);
                store.unindex(&old);
                retired.push(old);
            }
        }
        let applied = Applied {
            node,
            created,
            retired,
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
        if !joined
            .iter()
            .any(|(anchor, n)| *n == node && *anchor == profile.anchor.1)
        {
            store.index(&profile.id(), node);
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
            store.join_part(anchor, Profile::part_of(ev, &self.enrichment));
        }
        Ok(())
    }

    /// Finds the event's identifiers that have now been seen with more owners than their type allows
    /// (owners in this event, or linked to it before), and sets each apart in a profile of its own,
    /// splitting the profile it was in. True if any was.
    fn detect_shared<S: GraphStore>(
        &self,
        store: &mut S,
        ids: &[Identifier],
        ev: &Event,
        reshape: &mut Reshape,
    ) -> Result<bool, S::Error> {
        let owners: Vec<&Identifier> = ids.iter().filter(|i| self.rules.is_owner(i)).collect();
        if owners.is_empty() {
            return Ok(false);
        }
        let mut found = false;
        for x in ids {
            let Some(limit) = self.rules.shared_limit(x) else {
                continue;
            };
            // Looked up afresh: setting another identifier of this event apart may have moved this one.
            let node = store.node_of(x)?;
            let mut seen: BTreeSet<Identifier> = owners.iter().map(|o| (*o).clone()).collect();
            if let Some(n) = node {
                if store.seal(n)?.is_some_and(|s| s.shared) {
                    continue;
                }
                seen.extend(
                    store
                        .links(x)?
                        .into_iter()
                        .map(|(y, _)| y)
                        .filter(|y| self.rules.is_owner(y)),
                );
            }
            if seen.len() > limit {
                self.quarantine(store, x, node, ev, reshape)?;
                found = true;
            }
        }
        Ok(found)
    }

    /// Moves a shared identifier out of its profile (which is split along its remaining links) into a
    /// profile of its own that never merges.
    fn quarantine<S: GraphStore>(
        &self,
        store: &mut S,
        x: &Identifier,
        node: Option<NodeId>,
        ev: &Event,
        reshape: &mut Reshape,
    ) -> Result<(), S::Error> {
        let mut seen = Seen::at(ev.timestamp);
        let mut version = 1;
        if let Some(n) = node {
            if let Some(profile) = store.take_profile(n)? {
                if let Some(s) = profile.identifiers.get(x) {
                    seen = *s;
                }
                version = profile.version + 1;
                for (y, _) in store.links(x)? {
                    store.remove_link(x, &y);
                }
                self.split(store, n, profile, std::slice::from_ref(x), false, reshape)?;
            }
        }
        let q = store.allocate_node()?;
        let mut own = Profile::empty();
        if let Some(part) = store.take_part(x)? {
            own.absorb(part.clone());
            store.put_part(x, part);
        }
        own.identifiers.insert(x.clone(), seen);
        fill_anchor(&mut own);
        own.shared = true;
        own.version = version;
        store.set_node(x, q);
        let id = own.id();
        store.remove_redirect(&id);
        store.index(&id, q);
        store.put_profile(q, own);
        reshape.quarantined.push(q);
        Ok(())
    }

    /// Recomputes a profile whose identifiers `removed` are gone (or one of whose links is): one profile per
    /// connected component of the remaining links, each the join of its identifiers' parts. The component
    /// that keeps the old public id (or else the largest) keeps the node. `purge` (erasure) also removes
    /// the redirects to an id that stops existing.
    fn split<S: GraphStore>(
        &self,
        store: &mut S,
        node: NodeId,
        profile: Profile,
        removed: &[Identifier],
        purge: bool,
        reshape: &mut Reshape,
    ) -> Result<(), S::Error> {
        let old_id = profile.id();
        let version = profile.version + 1;
        let remaining: BTreeSet<&Identifier> = profile
            .identifiers
            .keys()
            .filter(|id| !removed.contains(id))
            .collect();
        let components = components(store, &remaining)?;
        if components.len() == 1 && removed.is_empty() {
            // Still one piece: nothing changes.
            store.put_profile(node, profile);
            return Ok(());
        }
        store.unindex(&old_id);
        let mut pieces: Vec<Profile> = Vec::with_capacity(components.len());
        for component in &components {
            let mut piece = Profile::empty();
            for id in component {
                if let Some(part) = store.take_part(id)? {
                    piece.absorb(part.clone());
                    store.put_part(id, part);
                }
                if let Some(seen) = profile.identifiers.get(id) {
                    piece.identifiers.insert(id.clone(), *seen);
                }
            }
            piece.shared = profile.shared;
            piece.version = version;
            fill_anchor(&mut piece);
            pieces.push(piece);
        }
        // The piece that keeps the node: the one that kept the public id, else the largest.
        let kept_id = pieces.iter().any(|p| p.id() == old_id);
        let keeper = pieces.iter().position(|p| p.id() == old_id).or_else(|| {
            (0..pieces.len()).max_by_key(|i| (pieces[*i].identifiers.len(), usize::MAX - i))
        });
        let keeper_id = keeper.map(|k| pieces[k].id());
        let mut into = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.into_iter().enumerate() {
            let n = if Some(i) == keeper {
                node
            } else {
                store.allocate_node()?
            };
            if n != node {
                for id in piece.identifiers.keys() {
                    store.set_node(id, n);
                }
            }
            let id = piece.id();
            // An id that comes back (it was retired by a merge) no longer redirects anywhere.
            store.remove_redirect(&id);
            store.index(&id, n);
            store.put_profile(n, piece);
            into.push(n);
        }
        match keeper {
            None => {
                store.delete_profile(node);
                self.retire_erased(store, &old_id, version, purge, reshape)?;
            }
            Some(_) if kept_id => {}
            Some(_) if purge => self.retire_erased(store, &old_id, version, purge, reshape)?,
            Some(_) => {
                // Not an erasure: the old id continues as the largest piece.
                if let Some(to) = &keeper_id {
                    store.redirect(&old_id, to);
                    reshape.retired.push((old_id.clone(), node));
                }
            }
        }
        reshape.splits.push(Split { from: old_id, into });
        Ok(())
    }

    /// An id that stops existing at `version`: a tombstone, and with `purge` the redirects to it go too.
    fn retire_erased<S: GraphStore>(
        &self,
        store: &mut S,
        id: &ProfileId,
        version: u64,
        purge: bool,
        reshape: &mut Reshape,
    ) -> Result<(), S::Error> {
        store.unindex(id);
        if purge {
            for from in store.redirects_to(id)? {
                store.remove_redirect(&from);
                reshape.erased.push((from, version));
            }
        }
        reshape.erased.push((id.clone(), version));
        Ok(())
    }

    /// Erases an identifier: its node entry, links and part are removed and its profile is recomputed
    /// without it (and split if it held the profile together).
    pub fn erase_identifier<S: GraphStore>(
        &self,
        store: &mut S,
        x: &Identifier,
    ) -> Result<Reshape, S::Error> {
        let mut reshape = Reshape::default();
        let Some(node) = store.node_of(x)? else {
            return Ok(reshape);
        };
        for (y, _) in store.links(x)? {
            store.remove_link(x, &y);
        }
        store.delete_part(x);
        store.remove_identifier(x);
        reshape.identifiers_erased += 1;
        if let Some(profile) = store.take_profile(node)? {
            self.split(
                store,
                node,
                profile,
                std::slice::from_ref(x),
                true,
                &mut reshape,
            )?;
        }
        Ok(reshape)
    }

    /// Erases a whole profile, found by its public id (redirects followed): every identifier, link and
    /// part, the profile, and the ids redirecting to it.
    pub fn erase_profile<S: GraphStore>(
        &self,
        store: &mut S,
        id: &ProfileId,
    ) -> Result<Reshape, S::Error> {
        let mut reshape = Reshape::default();
        let Some((live, node)) = resolve_profile_id(store, id)? else {
            return Ok(reshape);
        };
        let mut version = 1;
        if let Some(profile) = store.take_profile(node)? {
            version = profile.version + 1;
            for x in profile.identifiers.keys() {
                for (y, _) in store.links(x)? {
                    store.remove_link(x, &y);
                }
                store.delete_part(x);
                store.remove_identifier(x);
                reshape.identifiers_erased += 1;
            }
        }
        store.delete_profile(node);
        self.retire_erased(store, &live, version, true, &mut reshape)?;
        Ok(reshape)
    }

    /// Removes the link between two identifiers of one profile and splits the profile if nothing else
    /// holds it together. Later events that carry both identifiers link them again.
    pub fn unlink<S: GraphStore>(
        &self,
        store: &mut S,
        a: &Identifier,
        b: &Identifier,
    ) -> Result<Reshape, S::Error> {
        let mut reshape = Reshape::default();
        let (Some(na), Some(nb)) = (store.node_of(a)?, store.node_of(b)?) else {
            return Ok(reshape);
        };
        if na != nb {
            return Ok(reshape);
        }
        reshape.links_removed += 1;
        store.remove_link(a, b);
        if let Some(profile) = store.take_profile(na)? {
            self.split(store, na, profile, &[], false, &mut reshape)?;
        }
        Ok(reshape)
    }
}

/// The node of each of an event's identifiers, in the same order.
type Owners = Vec<Option<NodeId>>;

/// Profiles taken out of the store, with their nodes.
type Taken = Vec<(NodeId, Profile)>;

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

/// Connected components of `ids` over their links (links to identifiers outside `ids` are ignored), in a
/// deterministic order.
fn components<S: GraphStore>(
    store: &mut S,
    ids: &BTreeSet<&Identifier>,
) -> Result<Vec<Vec<Identifier>>, S::Error> {
    let mut done: HashSet<&Identifier> = HashSet::with_capacity(ids.len());
    let mut out = Vec::new();
    for &start in ids {
        if !done.insert(start) {
            continue;
        }
        let mut component = vec![start.clone()];
        let mut queue = vec![start.clone()];
        while let Some(x) = queue.pop() {
            for (y, _) in store.links(&x)? {
                if let Some(&y) = ids.get(&y) {
                    if done.insert(y) {
                        component.push(y.clone());
                        queue.push(y.clone());
                    }
                }
            }
        }
        component.sort();
        out.push(component);
    }
    Ok(out)
}

/// A profile rebuilt from parts that carried no event (all its events were anchored on identifiers now
/// gone) still needs a stable anchor: its earliest identifier sighting. Its `seen` stays empty; the
/// output shows the identifiers' times instead.
fn fill_anchor(p: &mut Profile) {
    if p.has_events() {
        return;
    }
    if let Some((id, seen)) = p.identifiers.iter().min_by_key(|(id, s)| (s.first, *id)) {
        p.anchor = (seen.first, format!("identifier:{id}"));
    }
}

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

/// An in-memory [`GraphStore`]: for tests, benches and the oracle check.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub nodes: HashMap<Identifier, NodeId>,
    pub profiles: HashMap<NodeId, Profile>,
    pub seen: std::collections::HashSet<String>,
    pub redirects: HashMap<ProfileId, ProfileId>,
    pub index: HashMap<ProfileId, NodeId>,
    pub links: HashMap<Identifier, BTreeMap<Identifier, Evidence>>,
    pub parts: HashMap<Identifier, Profile>,
    next: u64,
}

impl GraphStore for MemStore {
    type Error = std::convert::Infallible;

    fn node_of(&mut self, id: &Identifier) -> Result<Option<NodeId>, Self::Error> {
        Ok(self.nodes.get(id).copied())
    }
    fn set_node(&mut self, id: &Identifier, node: NodeId) {
        self.nodes.insert(id.clone(), node);
    }
    fn remove_identifier(&mut self, id: &Identifier) {
        self.nodes.remove(id);
    }
    fn take_profile(&mut self, node: NodeId) -> Result<Option<Profile>, Self::Error> {
        Ok(self.profiles.remove(&node))
    }
    fn put_profile(&mut self, node: NodeId, profile: Profile) {
        self.profiles.insert(node, profile);
    }
    fn seal(&mut self, node: NodeId) -> Result<Option<Seal>, Self::Error> {
        Ok(self.profiles.get(&node).map(Profile::seal))
    }
    fn delete_profile(&mut self, node: NodeId) {
        self.profiles.remove(&node);
    }
    fn allocate_node(&mut self) -> Result<NodeId, Self::Error> {
        self.next += 1;
        Ok(NodeId(self.next))
    }
    fn first_sighting(&mut self, event_id: &str) -> Result<bool, Self::Error> {
        Ok(self.seen.insert(event_id.to_string()))
    }
    fn redirect(&mut self, from: &ProfileId, to: &ProfileId) {
        self.redirects.insert(from.clone(), to.clone());
        self.redirects.remove(to);
    }
    fn remove_redirect(&mut self, id: &ProfileId) {
        self.redirects.remove(id);
    }
    fn redirect_of(&mut self, id: &ProfileId) -> Result<Option<ProfileId>, Self::Error> {
        Ok(self.redirects.get(id).cloned())
    }
    fn redirects_to(&mut self, id: &ProfileId) -> Result<Vec<ProfileId>, Self::Error> {
        let mut v: Vec<ProfileId> = self
            .redirects
            .iter()
            .filter(|(_, to)| *to == id)
            .map(|(from, _)| from.clone())
            .collect();
        v.sort();
        Ok(v)
    }
    fn index(&mut self, id: &ProfileId, node: NodeId) {
        self.index.insert(id.clone(), node);
    }
    fn unindex(&mut self, id: &ProfileId) {
        self.index.remove(id);
    }
    fn indexed(&mut self, id: &ProfileId) -> Result<Option<NodeId>, Self::Error> {
        Ok(self.index.get(id).copied())
    }
    fn links(&mut self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, Self::Error> {
        Ok(self
            .links
            .get(id)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }
    fn link_all(&mut self, ids: &[Identifier], evidence: &Evidence) {
        if ids.len() < 2 {
            return;
        }
        for x in ids {
            let links = self.links.entry(x.clone()).or_default();
            add_evidence(links, x, ids, evidence);
        }
    }
    fn remove_link(&mut self, a: &Identifier, b: &Identifier) {
        for (x, y) in [(a, b), (b, a)] {
            if let Some(m) = self.links.get_mut(x) {
                m.remove(y);
                if m.is_empty() {
                    self.links.remove(x);
                }
            }
        }
    }
    fn take_part(&mut self, id: &Identifier) -> Result<Option<Profile>, Self::Error> {
        Ok(self.parts.remove(id))
    }
    fn put_part(&mut self, id: &Identifier, part: Profile) {
        self.parts.insert(id.clone(), part);
    }
    fn join_part(&mut self, id: &Identifier, more: Profile) {
        match self.parts.get_mut(id) {
            Some(p) => p.absorb(more),
            None => {
                self.parts.insert(id.clone(), more);
            }
        }
    }
    fn delete_part(&mut self, id: &Identifier) {
        self.parts.remove(id);
    }
}

impl MemStore {
    /// Profiles by public id, for comparisons.
    pub fn by_public_id(&self) -> BTreeMap<ProfileId, &Profile> {
        self.profiles.values().map(|p| (p.id(), p)).collect()
    }

    /// The graph as sets of identifiers, for comparisons that ignore ids and enrichment.
    pub fn partition(&self) -> BTreeSet<BTreeSet<Identifier>> {
        self.profiles
            .values()
            .map(|p| p.identifiers.keys().cloned().collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuardrailConfig;
    use proptest::prelude::*;

    fn ev(n: u32, ts: i64, ids: &[(&str, String)]) -> Event {
        Event {
            event_id: format!("e{n}"),
            channel: ["web", "app", "pos", "email"][n as usize % 4].into(),
            event_type: "page_view".into(),
            timestamp: ts,
            identifiers: {
                let mut v: Vec<Identifier> = ids
                    .iter()
                    .map(|(k, v)| Identifier::new(*k, v.clone()))
                    .collect();
                v.sort();
                v.dedup();
                v
            },
            purchase: None,
            items: vec![],
            campaign_id: None,
            consent: None,
            attributes: Default::default(),
            origin: None,
        }
    }

    fn run(stitcher: &Stitcher, events: &[Event]) -> MemStore {
        let mut store = MemStore::default();
        for e in events {
            let _ = stitcher.apply(&mut store, e);
        }
        store
    }

    /// The graph as a canonical value: each profile's identifier set, with the profile itself, without its
    /// version (which counts identity changes, so depends on the order).
    fn canonical(store: &MemStore) -> BTreeMap<ProfileId, Profile> {
        store
            .by_public_id()
            .into_iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.version = 0;
                (k, v)
            })
            .collect()
    }

    #[test]
    fn transitive_merge_keeps_oldest_id_and_redirects() {
        let s = Stitcher::new(Rules::unlimited());
        let mut store = MemStore::default();
        let a = ev(1, 100, &[("anonymous_id", "c1".into())]);
        let b = ev(2, 50, &[("email", "x@y.io".into())]);
        let c = ev(
            3,
            200,
            &[("anonymous_id", "c1".into()), ("email", "x@y.io".into())],
        );
        s.apply(&mut store, &a).unwrap();
        s.apply(&mut store, &b).unwrap();
        let applied = s.apply(&mut store, &c).unwrap().unwrap();
        assert_eq!(store.profiles.len(), 1);
        let p = store.profiles.values().next().unwrap();
        assert_eq!(p.id(), ProfileId::from_anchor("e2"));
        assert_eq!(applied.retired, vec![ProfileId::from_anchor("e1")]);
        assert_eq!(
            store.redirects[&ProfileId::from_anchor("e1")],
            ProfileId::from_anchor("e2")
        );
        assert_eq!(p.events, 3);
        assert!(
            s.apply(&mut store, &c).unwrap().is_none(),
            "a repeated event changes nothing"
        );
    }

    #[test]
    fn type_limit_refuses_merge_and_keeps_event_in_best_profile() {
        let s = Stitcher::new(Rules::new(&GuardrailConfig::default()));
        let mut store = MemStore::default();
        s.apply(
            &mut store,
            &ev(
                1,
                1,
                &[("customer_id", "A".into()), ("device_id", "tablet".into())],
            ),
        )
        .unwrap();
        s.apply(&mut store, &ev(2, 2, &[("customer_id", "B".into())]))
            .unwrap();
        let applied = s
            .apply(
                &mut store,
                &ev(
                    3,
                    3,
                    &[("customer_id", "B".into()), ("device_id", "tablet".into())],
                ),
            )
            .unwrap();
        let applied = applied.unwrap();
        assert_eq!(store.profiles.len(), 2);
        assert_eq!(applied.refused.len(), 1);
        assert_eq!(
            applied.refused[0].rule,
            Rule::TypeLimit {
                kind: "customer_id".into(),
                limit: 1
            }
        );
        // The event landed in B's profile (customer_id is the most trusted type).
        let b = &store.profiles[&applied.node];
        assert!(b
            .identifiers
            .contains_key(&Identifier::new("customer_id", "B")));
        assert_eq!(b.events, 2);
    }

    #[test]
    fn batch_changes_coalesce_chains() {
        let s = Stitcher::new(Rules::unlimited());
        let mut store = MemStore::default();
        let mut batch = BatchChanges::default();
        let events = [
            ev(1, 30, &[("anonymous_id", "a".into())]),
            ev(2, 20, &[("anonymous_id", "b".into())]),
            ev(3, 10, &[("anonymous_id", "c".into())]),
            ev(
                4,
                40,
                &[("anonymous_id", "a".into()), ("anonymous_id", "b".into())],
            ),
            ev(
                5,
                50,
                &[("anonymous_id", "b".into()), ("anonymous_id", "c".into())],
            ),
        ];
        for e in &events {
            let applied = s.apply(&mut store, e).unwrap().unwrap();
            batch.record(e, applied);
        }
        let updates = batch.updates();
        assert_eq!(updates.len(), 1);
        let mut from = updates[0].merged_from.clone();
        from.sort();
        let mut want = vec![ProfileId::from_anchor("e1"), ProfileId::from_anchor("e2")];
        want.sort();
        assert_eq!(from, want);
        assert_eq!(updates[0].trigger.id, "e5");
        assert_eq!(updates[0].identity, ["create", "merge"]);
    }

    /// Cases per property: 300 in CI; `PROPTEST_CASES=20000` for a soak run.
    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300)
    }

    /// Events over a small universe of identifiers so that merges are frequent.
    fn arb_events() -> impl Strategy<Value = Vec<Event>> {
        let id = (0usize..4, 0u8..12).prop_map(|(k, v)| {
            let kind = ["anonymous_id", "email", "device_id", "customer_id"][k];
            (kind, format!("{kind}-{v}"))
        });
        prop::collection::vec((prop::collection::vec(id, 1..4), 0i64..1000), 1..40).prop_map(
            |evs| {
                evs.into_iter()
                    .enumerate()
                    .map(|(i, (ids, ts))| ev(i as u32, ts, &ids))
                    .collect()
            },
        )
    }

    /// A stitcher that also computes the ground truth's traits (`journeys::TRUTH_TRAITS`), so that the
    /// property tests' profile comparisons cover the story and computed traits too.
    fn enriched(rules: Rules) -> Stitcher {
        let cfg: crate::config::Config =
            toml::from_str(crate::journeys::TRUTH_TRAITS).expect("traits");
        Stitcher::new(rules).with_enrichment(Arc::new(cfg.enrichment))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Without guardrails, any order and any repetition of the same events gives the same graph and
        /// the same profiles.
        #[test]
        fn order_and_repetition_do_not_matter(
            events in arb_events(),
            seed in any::<u64>(),
            repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            use rand::{seq::SliceRandom, SeedableRng};
            let s = enriched(Rules::unlimited());
            let base = canonical(&run(&s, &events));
            let mut shuffled = events.clone();
            for r in &repeats {
                shuffled.push(r.get(&events).clone());
            }
            shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
            let other = run(&s, &shuffled);
            prop_assert_eq!(&base, &canonical(&other));
            // Every identifier points at the profile that holds it.
            for (id, node) in &other.nodes {
                prop_assert!(other.profiles[node].identifiers.contains_key(id));
            }
        }

        /// With guardrails on, no profile ever breaks a limit, whatever the order.
        #[test]
        fn guardrails_always_hold(events in arb_events(), seed in any::<u64>()) {
            use rand::{seq::SliceRandom, SeedableRng};
            let mut cfg = GuardrailConfig::default();
            cfg.limits.insert("email".into(), 2);
            cfg.limits.insert("anonymous_id".into(), 3);
            cfg.max_profile_identifiers = 6;
            let s = Stitcher::new(Rules::new(&cfg));
            let mut shuffled = events.clone();
            shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
            let store = run(&s, &shuffled);
            for p in store.profiles.values() {
                prop_assert_eq!(s.rules().violation(p), None);
            }
            for (id, node) in &store.nodes {
                prop_assert!(store.profiles[node].identifiers.contains_key(id));
            }
        }

        /// While a profile id lives, its version never decreases and increases whenever its identifiers
        /// change, under guardrails that merge, refuse, set shared identifiers apart and split, and
        /// erasures. (An id that ended and is made again later starts a new life: its version comes from
        /// the profile it is made of; the proptest regression file holds a case where that is lower.)
        #[test]
        fn versions_increase_with_every_identity_change(
            events in arb_events(),
            seed in any::<u64>(),
        ) {
            use rand::{seq::SliceRandom, SeedableRng};
            let mut cfg = GuardrailConfig::default();
            cfg.limits.insert("email".into(), 2);
            cfg.max_profile_identifiers = 6;
            cfg.shared_limits.insert("device_id".into(), 2);
            let s = Stitcher::new(Rules::new(&cfg));
            let mut shuffled = events.clone();
            shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
            let mut store = MemStore::default();
            // Per id: its version and identifiers when last live (None once it stopped existing).
            let mut last: BTreeMap<ProfileId, (u64, Option<BTreeSet<Identifier>>)> = BTreeMap::new();
            for (i, e) in shuffled.iter().enumerate() {
                let _ = s.apply(&mut store, e);
                if i % 7 == 3 {
                    if let Some(x) = e.identifiers.first() {
                        let _ = s.erase_identifier(&mut store, x);
                    }
                }
                let now: BTreeMap<ProfileId, (u64, BTreeSet<Identifier>)> = store
                    .by_public_id()
                    .into_iter()
                    .map(|(id, p)| (id, (p.version, p.identifiers.keys().cloned().collect())))
                    .collect();
                for (id, (v, ids)) in &now {
                    if let Some((before, Some(before_ids))) = last.get(id) {
                        prop_assert!(v >= before, "{} went from {} to {}", id, before, v);
                        if before_ids != ids {
                            prop_assert!(v > before, "{} changed at version {}", id, v);
                        }
                    }
                }
                for (id, (v, ids)) in now {
                    last.insert(id, (v, Some(ids)));
                }
                let live: BTreeSet<ProfileId> = store.by_public_id().into_keys().collect();
                for (id, entry) in last.iter_mut() {
                    if !live.contains(id) {
                        entry.1 = None;
                    }
                }
            }
        }
    }

    fn ids(pairs: &[(&str, &str)]) -> Vec<(&'static str, String)> {
        pairs
            .iter()
            .map(|(k, v)| {
                let k: &'static str = match *k {
                    "email" => "email",
                    "device_id" => "device_id",
                    "anonymous_id" => "anonymous_id",
                    "customer_id" => "customer_id",
                    other => panic!("unknown type {other}"),
                };
                (k, v.to_string())
            })
            .collect()
    }

    fn node_of(store: &MemStore, kind: &str, value: &str) -> NodeId {
        store.nodes[&Identifier::new(kind, value)]
    }

    /// A profile and the join of its identifiers' parts must agree on everything but the identifiers.
    fn assert_parts_add_up(store: &MemStore) {
        for p in store.profiles.values() {
            if !p.has_events() {
                continue;
            }
            let mut joined = Profile::empty();
            for id in p.identifiers.keys() {
                if let Some(part) = store.parts.get(id) {
                    joined.absorb(part.clone());
                }
            }
            joined.identifiers = p.identifiers.clone();
            joined.shared = p.shared;
            joined.version = p.version;
            if p.anchor.1.starts_with("identifier:") {
                // Rebuilt from parts that had no event: anchored on its earliest identifier for good.
                joined.anchor = p.anchor.clone();
            }
            assert_eq!(&joined, p, "profile {} differs from its parts", p.id());
        }
    }

    #[test]
    fn shared_device_is_set_apart_and_the_people_it_glued_split() {
        let cfg = GuardrailConfig {
            shared_limits: BTreeMap::from([("device_id".to_string(), 2)]),
            ..Default::default()
        };
        let s = Stitcher::new(Rules::new(&cfg));
        let mut store = MemStore::default();
        // Three people log in on the same till device; each also has a cookie of their own.
        for (n, who) in ["a", "b"].iter().enumerate() {
            let n = n as u32 * 10;
            let email = format!("{who}@x.io");
            let cookie = format!("c-{who}");
            s.apply(
                &mut store,
                &ev(
                    n + 1,
                    i64::from(n) + 1,
                    &ids(&[("email", &email), ("anonymous_id", &cookie)]),
                ),
            )
            .unwrap();
            s.apply(
                &mut store,
                &ev(
                    n + 2,
                    i64::from(n) + 2,
                    &ids(&[("email", &email), ("device_id", "till")]),
                ),
            )
            .unwrap();
        }
        assert_eq!(
            node_of(&store, "email", "a@x.io"),
            node_of(&store, "email", "b@x.io"),
            "two owners: glued"
        );
        let applied = s
            .apply(
                &mut store,
                &ev(31, 31, &ids(&[("email", "c@x.io"), ("device_id", "till")])),
            )
            .unwrap()
            .unwrap();
        assert_eq!(applied.reshape.quarantined.len(), 1);
        assert_eq!(applied.reshape.splits.len(), 1);
        assert_eq!(applied.refused[0].rule, Rule::Shared);
        let (a, b, c, till) = (
            node_of(&store, "email", "a@x.io"),
            node_of(&store, "email", "b@x.io"),
            node_of(&store, "email", "c@x.io"),
            node_of(&store, "device_id", "till"),
        );
        assert!(a != b && b != c && a != c && till != a);
        assert_eq!(
            store.profiles[&a].identifiers.len(),
            2,
            "a keeps its cookie"
        );
        assert!(store.profiles[&till].shared);
        // The split profiles carry their own events only.
        assert_eq!(store.profiles[&a].events, 2);
        assert_eq!(store.profiles[&b].events, 2);
        assert_parts_add_up(&store);
        // Later events with the till land in the person's profile, not the till's.
        let later = s
            .apply(
                &mut store,
                &ev(
                    41,
                    41,
                    &ids(&[("anonymous_id", "c-a"), ("device_id", "till")]),
                ),
            )
            .unwrap()
            .unwrap();
        assert_eq!(later.node, a);
        // An event with only the till lands in the till's own profile.
        let alone = s
            .apply(&mut store, &ev(42, 42, &ids(&[("device_id", "till")])))
            .unwrap()
            .unwrap();
        assert_eq!(alone.node, till);
        assert_parts_add_up(&store);
    }

    #[test]
    fn erasing_the_bridge_splits_and_retires_the_id_it_anchored() {
        let s = Stitcher::new(Rules::new(&GuardrailConfig::default()));
        let mut store = MemStore::default();
        s.apply(&mut store, &ev(1, 1, &ids(&[("anonymous_id", "bridge")])))
            .unwrap();
        s.apply(
            &mut store,
            &ev(
                2,
                2,
                &ids(&[("anonymous_id", "bridge"), ("email", "a@x.io")]),
            ),
        )
        .unwrap();
        s.apply(
            &mut store,
            &ev(
                3,
                3,
                &ids(&[("anonymous_id", "bridge"), ("email", "b@x.io")]),
            ),
        )
        .unwrap();
        assert_eq!(store.profiles.len(), 1);
        let before = store.profiles.values().next().unwrap().id();
        assert_eq!(before, ProfileId::from_anchor("e1"));
        let r = s
            .erase_identifier(&mut store, &Identifier::new("anonymous_id", "bridge"))
            .unwrap();
        assert_eq!(r.identifiers_erased, 1);
        assert_eq!(r.splits.len(), 1);
        assert_eq!(r.splits[0].from, before);
        assert_eq!(r.splits[0].into.len(), 2);
        assert_eq!(
            r.erased
                .iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>(),
            vec![before.clone()],
            "the anchor event was the bridge's: its id goes"
        );
        let mut now: Vec<ProfileId> = store.by_public_id().into_keys().collect();
        now.sort();
        let mut want = vec![ProfileId::from_anchor("e2"), ProfileId::from_anchor("e3")];
        want.sort();
        assert_eq!(now, want);
        assert!(!store
            .nodes
            .contains_key(&Identifier::new("anonymous_id", "bridge")));
        assert!(store
            .links
            .values()
            .all(|m| !m.contains_key(&Identifier::new("anonymous_id", "bridge"))));
        assert!(!store.index.contains_key(&before));
        assert_parts_add_up(&store);
    }

    #[test]
    fn erase_profile_removes_everything_and_names_every_id() {
        let s = Stitcher::new(Rules::unlimited());
        let mut store = MemStore::default();
        s.apply(&mut store, &ev(1, 10, &ids(&[("anonymous_id", "c1")])))
            .unwrap();
        s.apply(&mut store, &ev(2, 5, &ids(&[("email", "a@x.io")])))
            .unwrap();
        s.apply(
            &mut store,
            &ev(3, 20, &ids(&[("anonymous_id", "c1"), ("email", "a@x.io")])),
        )
        .unwrap();
        s.apply(&mut store, &ev(4, 30, &ids(&[("email", "other@x.io")])))
            .unwrap();
        // Erase by the retired id: redirects are followed.
        let r = s
            .erase_profile(&mut store, &ProfileId::from_anchor("e1"))
            .unwrap();
        assert_eq!(r.identifiers_erased, 2);
        let mut erased: Vec<ProfileId> = r.erased.iter().map(|(id, _)| id.clone()).collect();
        erased.sort();
        let mut want = vec![ProfileId::from_anchor("e1"), ProfileId::from_anchor("e2")];
        want.sort();
        assert_eq!(erased, want);
        assert_eq!(store.profiles.len(), 1, "the other person stays");
        assert!(store.redirects.is_empty());
        assert_eq!(store.nodes.len(), 1);
        assert!(store.parts.keys().all(|id| id.value == "other@x.io"));
        assert!(s
            .erase_profile(&mut store, &ProfileId::from_anchor("e1"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unlink_splits_only_when_nothing_else_holds() {
        let s = Stitcher::new(Rules::unlimited());
        let mut store = MemStore::default();
        let (a, b, c) = (
            Identifier::new("email", "a@x.io"),
            Identifier::new("anonymous_id", "b"),
            Identifier::new("anonymous_id", "c"),
        );
        s.apply(
            &mut store,
            &ev(1, 1, &ids(&[("email", "a@x.io"), ("anonymous_id", "b")])),
        )
        .unwrap();
        s.apply(
            &mut store,
            &ev(2, 2, &ids(&[("anonymous_id", "b"), ("anonymous_id", "c")])),
        )
        .unwrap();
        s.apply(
            &mut store,
            &ev(3, 3, &ids(&[("email", "a@x.io"), ("anonymous_id", "c")])),
        )
        .unwrap();
        assert!(
            s.unlink(&mut store, &a, &b).unwrap().is_empty(),
            "a-c-b still holds"
        );
        assert_eq!(store.profiles.len(), 1);
        let r = s.unlink(&mut store, &b, &c).unwrap();
        assert_eq!(r.splits.len(), 1);
        assert_eq!(store.profiles.len(), 2);
        assert_ne!(store.nodes[&a], store.nodes[&b]);
        assert_eq!(store.nodes[&a], store.nodes[&c]);
        assert_parts_add_up(&store);
    }

    #[test]
    fn refused_consent_seals_the_profile_to_its_channel() {
        let s = Stitcher::new(Rules::new(&GuardrailConfig::default()));
        let mut store = MemStore::default();
        let mut refuse = ev(1, 1, &ids(&[("email", "a@x.io")]));
        refuse.channel = "web".into();
        refuse.consent = Some(crate::model::ConsentChange {
            cross_channel: Some(false),
            email_marketing: None,
        });
        let home = s.apply(&mut store, &refuse).unwrap().unwrap().node;
        // The same email in the email channel: a separate, channel-scoped profile.
        let mut other = ev(2, 2, &ids(&[("email", "a@x.io")]));
        other.channel = "email".into();
        let scoped = s.apply(&mut store, &other).unwrap().unwrap().node;
        assert_ne!(home, scoped);
        assert!(store
            .nodes
            .contains_key(&Identifier::new("email@email", "a@x.io")));
        // The home channel still lands at home.
        let mut web = ev(3, 3, &ids(&[("email", "a@x.io")]));
        web.channel = "web".into();
        assert_eq!(s.apply(&mut store, &web).unwrap().unwrap().node, home);
        // Consent given again: later events of every channel stitch to the main profile again.
        let mut grant = ev(4, 4, &ids(&[("email", "a@x.io")]));
        grant.channel = "web".into();
        grant.consent = Some(crate::model::ConsentChange {
            cross_channel: Some(true),
            email_marketing: None,
        });
        s.apply(&mut store, &grant).unwrap();
        let mut again = ev(5, 5, &ids(&[("email", "a@x.io")]));
        again.channel = "email".into();
        assert_eq!(s.apply(&mut store, &again).unwrap().unwrap().node, home);
        assert_eq!(
            store.profiles[&scoped].events, 1,
            "what was kept apart stays apart"
        );
    }

    /// Expected graph under shared-identifier detection alone, computed directly: identifiers seen with
    /// more than `limit` distinct owners (in the same events) stand alone; everything else is connected
    /// components of co-occurrence without them.
    fn expected_partition(events: &[Event], rules: &Rules) -> BTreeSet<BTreeSet<Identifier>> {
        let mut owners: HashMap<&Identifier, BTreeSet<&Identifier>> = HashMap::new();
        for e in events {
            for x in &e.identifiers {
                if rules.shared_limit(x).is_some() {
                    let slot = owners.entry(x).or_default();
                    slot.extend(e.identifiers.iter().filter(|o| rules.is_owner(o)));
                }
            }
        }
        let shared: BTreeSet<&Identifier> = owners
            .iter()
            .filter(|(x, o)| o.len() > rules.shared_limit(x).unwrap_or(usize::MAX))
            .map(|(x, _)| *x)
            .collect();
        let mut parent: HashMap<&Identifier, &Identifier> = HashMap::new();
        fn find<'a>(
            p: &mut HashMap<&'a Identifier, &'a Identifier>,
            x: &'a Identifier,
        ) -> &'a Identifier {
            let mut r = x;
            while let Some(&n) = p.get(r) {
                if n == r {
                    break;
                }
                r = n;
            }
            p.insert(x, r);
            r
        }
        for e in events {
            let kept: Vec<&Identifier> = e
                .identifiers
                .iter()
                .filter(|i| !shared.contains(i))
                .collect();
            for i in &kept {
                parent.entry(i).or_insert(i);
            }
            for w in kept.windows(2) {
                let (a, b) = (find(&mut parent, w[0]), find(&mut parent, w[1]));
                parent.insert(a, b);
            }
        }
        let mut groups: HashMap<&Identifier, BTreeSet<Identifier>> = HashMap::new();
        let keys: Vec<&Identifier> = parent.keys().copied().collect();
        for k in keys {
            let r = find(&mut parent, k);
            groups.entry(r).or_default().insert(k.clone());
        }
        let mut out: BTreeSet<BTreeSet<Identifier>> = groups.into_values().collect();
        for x in shared {
            out.insert(BTreeSet::from([x.clone()]));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Erasing an identifier leaves the graph it would be if the identifier had never been seen.
        #[test]
        fn erasure_equals_never_having_seen_it(
            events in arb_events(),
            pick in any::<prop::sample::Index>(),
        ) {
            let s = enriched(Rules::unlimited());
            let all: Vec<&Identifier> = events.iter().flat_map(|e| &e.identifiers).collect();
            let x: Identifier = (*pick.get(&all)).clone();
            let mut store = run(&s, &events);
            s.erase_identifier(&mut store, &x).unwrap();
            let without: Vec<Event> = events
                .iter()
                .cloned()
                .map(|mut e| {
                    e.identifiers.retain(|i| i != &x);
                    e
                })
                .filter(|e| !e.identifiers.is_empty())
                .collect();
            prop_assert_eq!(store.partition(), run(&s, &without).partition());
            for (id, node) in &store.nodes {
                prop_assert!(store.profiles[node].identifiers.contains_key(id));
            }
            assert_parts_add_up(&store);
        }

        /// With shared-identifier detection, any order and repetition gives the graph computed directly
        /// from the events, and every profile is the join of its parts.
        #[test]
        fn shared_detection_is_order_independent(
            events in arb_events(),
            seed in any::<u64>(),
            repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            use rand::{seq::SliceRandom, SeedableRng};
            let rules = Rules::shared_only(
                BTreeMap::from([("device_id".to_string(), 2), ("anonymous_id".to_string(), 3)]),
                vec!["email".into(), "customer_id".into()],
            );
            let s = enriched(rules.clone());
            let mut shuffled = events.clone();
            for r in &repeats {
                shuffled.push(r.get(&events).clone());
            }
            shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
            let store = run(&s, &shuffled);
            prop_assert_eq!(store.partition(), expected_partition(&events, &rules));
            assert_parts_add_up(&store);
        }
    }
}
