//! The graph in memory: the twin of the RocksDB store that the property tests, the benches and the oracle
//! run the stitcher on.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{Event, Identifier, NodeId, ProfileId};
use crate::profile::{Enrichment, Profile, Seal};

use super::evidence::Evidence;
use super::graph::{add_evidence, remove_evidence, GraphStore};

/// An in-memory [`GraphStore`]: for tests, benches and the oracle check.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub nodes: HashMap<Identifier, NodeId>,
    pub profiles: HashMap<NodeId, Box<Profile>>,
    pub seen: std::collections::HashSet<String>,
    pub redirects: HashMap<ProfileId, ProfileId>,
    pub index: HashMap<ProfileId, NodeId>,
    /// Each identifier's links, sorted by identifier as the sharded state keeps them.
    pub links: HashMap<Identifier, Vec<(Identifier, Evidence)>>,
    pub parts: HashMap<Identifier, Box<Profile>>,
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
    fn take_profile(&mut self, node: NodeId) -> Result<Option<Box<Profile>>, Self::Error> {
        Ok(self.profiles.remove(&node))
    }
    fn put_profile(&mut self, node: NodeId, profile: Box<Profile>) {
        self.profiles.insert(node, profile);
    }
    fn seal(&mut self, node: NodeId) -> Result<Option<Seal>, Self::Error> {
        Ok(self.profiles.get(&node).map(|p| p.seal()))
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
        Ok(self.links.get(id).cloned().unwrap_or_default())
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
                remove_evidence(m, y);
                if m.is_empty() {
                    self.links.remove(x);
                }
            }
        }
    }
    fn take_part(&mut self, id: &Identifier) -> Result<Option<Box<Profile>>, Self::Error> {
        Ok(self.parts.remove(id))
    }
    fn put_part(&mut self, id: &Identifier, part: Box<Profile>) {
        self.parts.insert(id.clone(), part);
    }
    fn add_to_part(&mut self, id: &Identifier, ev: &Event, cfg: &Enrichment) {
        let part = Profile::part_with(self.parts.remove(id), ev, cfg);
        self.parts.insert(id.clone(), part);
    }
    fn delete_part(&mut self, id: &Identifier) {
        self.parts.remove(id);
    }
}

impl MemStore {
    /// Profiles by public id, for comparisons.
    pub fn by_public_id(&self) -> BTreeMap<ProfileId, &Profile> {
        self.profiles.values().map(|p| (p.id(), &**p)).collect()
    }

    /// The graph as sets of identifiers, for comparisons that ignore ids and enrichment.
    pub fn partition(&self) -> BTreeSet<BTreeSet<Identifier>> {
        self.profiles
            .values()
            .map(|p| p.identifiers.keys().cloned().collect())
            .collect()
    }
}
