//! The merge logic. Pure: every read and write goes through [`GraphStore`].
//!
//! State model: an identifier points at the internal [`NodeId`] of its profile; a profile lives under its
//! node and knows its identifiers. A merge keeps the node of the profile with more identifiers (union by
//! size) and relabels only the smaller side's identifiers, so a merge costs O(smaller side). The public
//! [`ProfileId`] is derived from the profile's earliest event, so the oldest profile's id survives a merge
//! and the result does not depend on the order in which events arrive.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{Event, Identifier, NodeId, ProfileId};
use crate::profile::Profile;

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
    fn delete_profile(&mut self, node: NodeId);
    fn allocate_node(&mut self) -> Result<NodeId, Self::Error>;
    /// Marks the event as seen; false if it had been seen already.
    fn first_sighting(&mut self, event_id: &str) -> Result<bool, Self::Error>;
    /// Records that public id `from` now lives in `to` (and `to` is served by `node`).
    fn redirect(&mut self, from: &ProfileId, to: &ProfileId);
    fn index(&mut self, id: &ProfileId, node: NodeId);
    fn unindex(&mut self, id: &ProfileId);
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
}

/// Applies events to the graph under the guardrails.
#[derive(Debug, Clone)]
pub struct Stitcher {
    rules: Rules,
}

impl Stitcher {
    pub fn new(rules: Rules) -> Self {
        Self { rules }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
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
        // Identifiers in decreasing trust; the most trusted match decides the primary profile.
        let mut ids: Vec<&Identifier> = ev.identifiers.iter().collect();
        ids.sort_by(|a, b| self.rules.trust_key(a).cmp(&self.rules.trust_key(b)));
        let mut owner: Vec<Option<NodeId>> = Vec::with_capacity(ids.len());
        let mut candidates: Vec<NodeId> = Vec::new();
        for id in &ids {
            let node = store.node_of(id)?;
            if let Some(n) = node {
                if !candidates.contains(&n) {
                    candidates.push(n);
                }
            }
            owner.push(node);
        }

        let mut refused = Vec::new();
        let mut retired = Vec::new();
        let mut absorbed_nodes = Vec::new();
        let (mut node, mut profile, created) = match candidates.first() {
            Some(&first) => match store.take_profile(first)? {
                Some(p) => (first, p, false),
                None => (first, Profile::new(ev), true),
            },
            None => (store.allocate_node()?, Profile::new(ev), true),
        };
        if created {
            // Identifiers are linked below, within the limits.
            profile.identifiers.clear();
        }
        let mut ids_before: BTreeSet<ProfileId> = BTreeSet::new();
        if !created {
            ids_before.insert(profile.id());
        }
        let mut merged_into_primary: BTreeSet<NodeId> = BTreeSet::from([node]);

        // Merge the other matched profiles, most trusted first, unless a rule forbids it.
        for &other in candidates.iter().skip(1) {
            let Some(other_profile) = store.take_profile(other)? else {
                continue;
            };
            let verdict =
                if profile.cross_channel_refused() || other_profile.cross_channel_refused() {
                    Err(Rule::Consent)
                } else {
                    self.rules.check_merge(&profile, &other_profile)
                };
            match verdict {
                Ok(()) => {
                    ids_before.insert(other_profile.id());
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
                    let kind = ids
                        .iter()
                        .zip(&owner)
                        .find(|(_, o)| **o == Some(other))
                        .map(|(id, _)| id.kind.clone())
                        .unwrap_or_default();
                    refused.push(Refusal {
                        rule,
                        kind,
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
        for (id, own) in ids.iter().zip(&owner) {
            match own {
                Some(n) if merged_into_primary.contains(n) => linked.push((*id).clone()),
                Some(_) => {} // belongs to a profile whose merge was refused
                None if profile.identifiers.contains_key(*id) => linked.push((*id).clone()),
                None => match self.rules.check_add(&counts, total, id) {
                    Ok(()) => {
                        *counts.entry(id.kind.clone()).or_insert(0) += 1;
                        total += 1;
                        store.set_node(id, node);
                        linked.push((*id).clone());
                    }
                    Err(rule) => refused.push(Refusal {
                        rule,
                        kind: id.kind.clone(),
                        other: None,
                    }),
                },
            }
        }
        if created {
            profile.observe_identifiers(&linked, ev.timestamp);
        } else {
            profile.apply(ev, &linked);
        }

        let id_after = profile.id();
        for old in ids_before {
            if old != id_after {
                store.redirect(&old, &id_after);
                store.unindex(&old);
                retired.push(old);
            }
        }
        store.index(&id_after, node);
        store.put_profile(node, profile);
        Ok(Some(Applied {
            node,
            created,
            retired,
            absorbed_nodes,
            refused,
        }))
    }
}

/// What one batch changed, coalesced: one update per live profile, one redirect per retired id.
#[derive(Debug, Default)]
pub struct BatchChanges {
    /// Touched nodes with the last event that touched them (event id, channel).
    touched: BTreeMap<NodeId, (String, String)>,
    /// Node absorbed -> node it went into, within this batch.
    forwarded: HashMap<NodeId, NodeId>,
    /// Retired public ids and the node they went into.
    retired: BTreeMap<ProfileId, NodeId>,
    /// Refusals per node, to report on the output.
    refused: BTreeMap<NodeId, Vec<Refusal>>,
    pub created: u64,
    pub merges: u64,
}

impl BatchChanges {
    pub fn record(&mut self, ev: &Event, applied: Applied) {
        for gone in &applied.absorbed_nodes {
            self.forwarded.insert(*gone, applied.node);
            if let Some(t) = self.touched.remove(gone) {
                self.touched.entry(applied.node).or_insert(t);
            }
            if let Some(r) = self.refused.remove(gone) {
                self.refused.entry(applied.node).or_default().extend(r);
            }
        }
        self.merges += applied.absorbed_nodes.len() as u64;
        self.created += u64::from(applied.created);
        for id in applied.retired {
            self.retired.insert(id, applied.node);
        }
        if !applied.refused.is_empty() {
            self.refused
                .entry(applied.node)
                .or_default()
                .extend(applied.refused);
        }
        self.touched
            .insert(applied.node, (ev.event_id.clone(), ev.channel.clone()));
    }

    pub fn is_empty(&self) -> bool {
        self.touched.is_empty()
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
            .map(|(node, (event_id, channel))| NodeUpdate {
                node: *node,
                trigger_event_id: event_id.clone(),
                trigger_channel: channel.clone(),
                merged_from: merged_from.remove(node).unwrap_or_default(),
                refused: self.refused.get(node).cloned().unwrap_or_default(),
            })
            .collect()
    }
}

/// One profile to emit at the end of a batch.
#[derive(Debug, Clone)]
pub struct NodeUpdate {
    pub node: NodeId,
    pub trigger_event_id: String,
    pub trigger_channel: String,
    /// Public ids now living in this profile; each also gets a redirect record.
    pub merged_from: Vec<ProfileId>,
    pub refused: Vec<Refusal>,
}

/// An in-memory [`GraphStore`]: for tests, benches and the oracle check.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub nodes: HashMap<Identifier, NodeId>,
    pub profiles: HashMap<NodeId, Profile>,
    pub seen: std::collections::HashSet<String>,
    pub redirects: HashMap<ProfileId, ProfileId>,
    pub index: HashMap<ProfileId, NodeId>,
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
    }
    fn index(&mut self, id: &ProfileId, node: NodeId) {
        self.index.insert(id.clone(), node);
    }
    fn unindex(&mut self, id: &ProfileId) {
        self.index.remove(id);
    }
}

impl MemStore {
    /// Profiles by public id, for comparisons.
    pub fn by_public_id(&self) -> BTreeMap<ProfileId, &Profile> {
        self.profiles.values().map(|p| (p.id(), p)).collect()
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
        }
    }

    fn run(stitcher: &Stitcher, events: &[Event]) -> MemStore {
        let mut store = MemStore::default();
        for e in events {
            let _ = stitcher.apply(&mut store, e);
        }
        store
    }

    /// The graph as a canonical value: each profile's identifier set, with the profile itself.
    fn canonical(store: &MemStore) -> BTreeMap<ProfileId, Profile> {
        store
            .by_public_id()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
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
        assert_eq!(updates[0].trigger_event_id, "e5");
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Without guardrails, any order and any repetition of the same events gives the same graph and
        /// the same profiles.
        #[test]
        fn order_and_repetition_do_not_matter(
            events in arb_events(),
            seed in any::<u64>(),
            repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            use rand::{seq::SliceRandom, SeedableRng};
            let s = Stitcher::new(Rules::unlimited());
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
    }
}
