//! The changes of one batch, layered over RocksDB: reads see the batch's own writes, and everything lands
//! in a single atomic `WriteBatch` together with the checkpoint.

use std::collections::{HashMap, HashSet};

use rocksdb::WriteBatch;

use super::{
    encode_evidence, encode_profile, event_key, identifier_key, link_key, Store, StoreError,
    CF_EVENTS, CF_IDENTIFIERS, CF_LINKS, CF_META, CF_PARTS, CF_PROFILES, CF_PROFILE_IDS,
    CF_REDIRECTS, META_NEXT_NODE,
};
use crate::model::{Identifier, NodeId, ProfileId};
use crate::profile::Profile;
use crate::stitch::{Evidence, GraphStore};

/// A pending change to one part.
#[derive(Debug, Clone)]
enum PartOp {
    /// To join with whatever is stored (a RocksDB merge).
    Join(Profile),
    /// The whole value; `None`: deleted, or taken and not put back.
    Set(Option<Profile>),
}

/// A pending change to one link.
#[derive(Debug, Clone)]
enum LinkOp {
    /// Evidence to join with whatever is stored (a RocksDB merge).
    Join(Evidence),
    /// The link's whole value (it was removed earlier in the batch).
    Put(Evidence),
    Delete,
}

pub struct Overlay<'a> {
    store: &'a Store,
    /// `None`: removed in this batch.
    nodes: HashMap<Identifier, Option<NodeId>>,
    profiles: HashMap<NodeId, Option<Profile>>,
    index: HashMap<ProfileId, Option<NodeId>>,
    redirects: HashMap<ProfileId, Option<ProfileId>>,
    /// Pending link changes by first identifier, then second (both directions are kept).
    links: HashMap<Identifier, HashMap<Identifier, LinkOp>>,
    parts: HashMap<Identifier, PartOp>,
    seen: HashSet<[u8; 16]>,
    next_node: u64,
    first_node: u64,
}

impl<'a> Overlay<'a> {
    pub(super) fn new(store: &'a Store) -> Result<Self, StoreError> {
        let next_node = store.next_node()?;
        Ok(Self {
            store,
            nodes: HashMap::new(),
            profiles: HashMap::new(),
            index: HashMap::new(),
            redirects: HashMap::new(),
            links: HashMap::new(),
            parts: HashMap::new(),
            seen: HashSet::new(),
            next_node,
            first_node: next_node,
        })
    }

    /// The profile under `node` as the batch leaves it.
    pub fn profile(&self, node: NodeId) -> Result<Option<Profile>, StoreError> {
        match self.profiles.get(&node) {
            Some(p) => Ok(p.clone()),
            None => self.store.profile(node),
        }
    }

    /// Same as [`Overlay::profile`] without a copy when the batch touched the profile.
    pub fn with_profile<T>(
        &self,
        node: NodeId,
        f: impl FnOnce(Option<&Profile>) -> T,
    ) -> Result<T, StoreError> {
        match self.profiles.get(&node) {
            Some(p) => Ok(f(p.as_ref())),
            None => Ok(f(self.store.profile(node)?.as_ref())),
        }
    }

    /// The node of a live public id (no redirects followed) as the batch leaves it.
    pub fn live_node(&self, id: &ProfileId) -> Result<Option<NodeId>, StoreError> {
        match self.index.get(id) {
            Some(n) => Ok(*n),
            None => self.store.node_of_profile_id(id),
        }
    }

    fn link_op(&mut self, a: &Identifier, b: &Identifier, op: impl Fn(Option<LinkOp>) -> LinkOp) {
        for (x, y) in [(a, b), (b, a)] {
            let slot = self.links.entry(x.clone()).or_default();
            let next = op(slot.remove(y));
            slot.insert(y.clone(), next);
        }
    }

    /// Everything the batch changed, as one atomic write batch.
    ///
    /// Each column family's keys go in sorted: RocksDB's memtable skiplist reuses the position of the
    /// previous insert, so keys in order cost a short step each instead of a search from the top, which
    /// in hash-map order was a tenth of the pipeline's CPU (`RecomputeSpliceLevels`, docs/BENCHMARKS.md).
    pub fn into_write_batch(self) -> Result<WriteBatch, StoreError> {
        let s = self.store;
        let mut b = WriteBatch::default();

        let mut links = Vec::new();
        for (x, ops) in &self.links {
            for (y, op) in ops {
                links.push((
                    link_key(x, y),
                    match op {
                        LinkOp::Join(e) => Write::Merge(encode_evidence(e)?),
                        LinkOp::Put(e) => Write::Put(encode_evidence(e)?),
                        LinkOp::Delete => Write::Delete,
                    },
                ));
            }
        }
        add_sorted(&mut b, s.cf(CF_LINKS)?, links);

        let mut parts = Vec::with_capacity(self.parts.len());
        for (id, part) in &self.parts {
            parts.push((
                identifier_key(id),
                match part {
                    PartOp::Join(p) => Write::Merge(encode_profile(p)?),
                    PartOp::Set(Some(p)) => Write::Put(encode_profile(p)?),
                    PartOp::Set(None) => Write::Delete,
                },
            ));
        }
        add_sorted(&mut b, s.cf(CF_PARTS)?, parts);

        let nodes = self.nodes.iter().map(|(id, node)| {
            let write = node.map_or(Write::Delete, |n| Write::Put(n.0.to_be_bytes().to_vec()));
            (identifier_key(id), write)
        });
        add_sorted(&mut b, s.cf(CF_IDENTIFIERS)?, nodes.collect());

        let mut profiles = Vec::with_capacity(self.profiles.len());
        for (node, p) in &self.profiles {
            let write = match p {
                Some(p) => Write::Put(encode_profile(p)?),
                None => Write::Delete,
            };
            profiles.push((node.0.to_be_bytes().to_vec(), write));
        }
        add_sorted(&mut b, s.cf(CF_PROFILES)?, profiles);

        let index = self.index.iter().map(|(id, node)| {
            let write = node.map_or(Write::Delete, |n| Write::Put(n.0.to_be_bytes().to_vec()));
            (id.as_str().as_bytes().to_vec(), write)
        });
        add_sorted(&mut b, s.cf(CF_PROFILE_IDS)?, index.collect());

        let redirects = self.redirects.iter().map(|(from, to)| {
            let write = to.as_ref().map_or(Write::Delete, |to| {
                Write::Put(to.as_str().as_bytes().to_vec())
            });
            (from.as_str().as_bytes().to_vec(), write)
        });
        add_sorted(&mut b, s.cf(CF_REDIRECTS)?, redirects.collect());

        // The write time, for `processing.dedup_retention`.
        let written = crate::model::now_millis().to_be_bytes();
        let seen = self
            .seen
            .iter()
            .map(|k| (k.to_vec(), Write::Put(written.to_vec())));
        add_sorted(&mut b, s.cf(CF_EVENTS)?, seen.collect());

        if self.next_node != self.first_node {
            b.put_cf(s.cf(CF_META)?, META_NEXT_NODE, self.next_node.to_be_bytes());
        }
        Ok(b)
    }
}

/// One key's change in a write batch.
enum Write {
    Put(Vec<u8>),
    Merge(Vec<u8>),
    Delete,
}

/// Adds the changes of one column family in key order (each key at most once).
fn add_sorted(b: &mut WriteBatch, cf: &rocksdb::ColumnFamily, mut writes: Vec<(Vec<u8>, Write)>) {
    writes.sort_unstable_by(|x, y| x.0.cmp(&y.0));
    for (key, write) in writes {
        match write {
            Write::Put(v) => b.put_cf(cf, key, v),
            Write::Merge(v) => b.merge_cf(cf, key, v),
            Write::Delete => b.delete_cf(cf, key),
        }
    }
}

impl GraphStore for Overlay<'_> {
    type Error = StoreError;

    fn node_of(&mut self, id: &Identifier) -> Result<Option<NodeId>, StoreError> {
        match self.nodes.get(id) {
            Some(n) => Ok(*n),
            None => self.store.node_of(id),
        }
    }

    fn set_node(&mut self, id: &Identifier, node: NodeId) {
        self.nodes.insert(id.clone(), Some(node));
    }

    fn remove_identifier(&mut self, id: &Identifier) {
        self.nodes.insert(id.clone(), None);
    }

    fn take_profile(&mut self, node: NodeId) -> Result<Option<Profile>, StoreError> {
        match self.profiles.get_mut(&node) {
            Some(slot) => Ok(slot.take()),
            None => {
                let p = self.store.profile(node)?;
                // Remember it was taken: if it is not put back, it reads as deleted.
                self.profiles.insert(node, None);
                Ok(p)
            }
        }
    }

    fn put_profile(&mut self, node: NodeId, profile: Profile) {
        self.profiles.insert(node, Some(profile));
    }

    fn delete_profile(&mut self, node: NodeId) {
        self.profiles.insert(node, None);
    }

    fn allocate_node(&mut self) -> Result<NodeId, StoreError> {
        let n = self.next_node;
        self.next_node += 1;
        Ok(NodeId(n))
    }

    fn first_sighting(&mut self, event_id: &str) -> Result<bool, StoreError> {
        let key = event_key(event_id);
        if self.seen.contains(&key) {
            return Ok(false);
        }
        if self
            .store
            .db()
            .get_pinned_cf(self.store.cf(CF_EVENTS)?, key)?
            .is_some()
        {
            return Ok(false);
        }
        self.seen.insert(key);
        Ok(true)
    }

    fn redirect(&mut self, from: &ProfileId, to: &ProfileId) {
        self.redirects.insert(from.clone(), Some(to.clone()));
        // A retired id that comes back (an older event renamed a profile to an id once redirected) must
        // not keep redirecting away from itself.
        self.redirects.insert(to.clone(), None);
    }

    fn remove_redirect(&mut self, id: &ProfileId) {
        self.redirects.insert(id.clone(), None);
    }

    fn redirect_of(&mut self, id: &ProfileId) -> Result<Option<ProfileId>, StoreError> {
        match self.redirects.get(id) {
            Some(to) => Ok(to.clone()),
            None => self.store.redirect_of(id),
        }
    }

    fn redirects_to(&mut self, id: &ProfileId) -> Result<Vec<ProfileId>, StoreError> {
        let mut out: Vec<ProfileId> = self
            .store
            .redirects_to(id)?
            .into_iter()
            .filter(|from| !self.redirects.contains_key(from))
            .collect();
        out.extend(
            self.redirects
                .iter()
                .filter(|(_, to)| to.as_ref() == Some(id))
                .map(|(from, _)| from.clone()),
        );
        out.sort();
        Ok(out)
    }

    fn index(&mut self, id: &ProfileId, node: NodeId) {
        self.index.insert(id.clone(), Some(node));
    }

    fn unindex(&mut self, id: &ProfileId) {
        self.index.insert(id.clone(), None);
    }

    fn indexed(&mut self, id: &ProfileId) -> Result<Option<NodeId>, StoreError> {
        self.live_node(id)
    }

    fn links(&mut self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, StoreError> {
        let stored = self.store.links(id)?;
        let Some(pending) = self.links.get(id) else {
            return Ok(stored);
        };
        let mut out: Vec<(Identifier, Evidence)> = Vec::with_capacity(stored.len());
        for (other, mut e) in stored {
            match pending.get(&other) {
                None => out.push((other, e)),
                Some(LinkOp::Join(more)) => {
                    e.join(more);
                    out.push((other, e));
                }
                Some(LinkOp::Put(_)) | Some(LinkOp::Delete) => {}
            }
        }
        for (other, op) in pending {
            match op {
                LinkOp::Put(e) => out.push((other.clone(), e.clone())),
                LinkOp::Join(e) if !out.iter().any(|(o, _)| o == other) => {
                    out.push((other.clone(), e.clone()))
                }
                _ => {}
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn add_link(&mut self, a: &Identifier, b: &Identifier, evidence: &Evidence) {
        self.link_op(a, b, |prev| match prev {
            None => LinkOp::Join(evidence.clone()),
            Some(LinkOp::Join(mut e)) => {
                e.join(evidence);
                LinkOp::Join(e)
            }
            Some(LinkOp::Put(mut e)) => {
                e.join(evidence);
                LinkOp::Put(e)
            }
            Some(LinkOp::Delete) => LinkOp::Put(evidence.clone()),
        });
    }

    fn remove_link(&mut self, a: &Identifier, b: &Identifier) {
        self.link_op(a, b, |_| LinkOp::Delete);
    }

    fn take_part(&mut self, id: &Identifier) -> Result<Option<Profile>, StoreError> {
        // Whatever happens, the slot reads as deleted until the part is put back.
        match self.parts.insert(id.clone(), PartOp::Set(None)) {
            Some(PartOp::Set(p)) => Ok(p),
            Some(PartOp::Join(more)) => Ok(Some(match self.store.part(id)? {
                Some(mut stored) => {
                    stored.absorb(more);
                    stored
                }
                None => more,
            })),
            None => self.store.part(id),
        }
    }

    fn put_part(&mut self, id: &Identifier, part: Profile) {
        self.parts.insert(id.clone(), PartOp::Set(Some(part)));
    }

    fn join_part(&mut self, id: &Identifier, more: Profile) {
        match self.parts.get_mut(id) {
            Some(PartOp::Join(p)) | Some(PartOp::Set(Some(p))) => p.absorb(more),
            Some(slot @ PartOp::Set(None)) => *slot = PartOp::Set(Some(more)),
            None => {
                self.parts.insert(id.clone(), PartOp::Join(more));
            }
        }
    }

    fn delete_part(&mut self, id: &Identifier) {
        self.parts.insert(id.clone(), PartOp::Set(None));
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Event, Identifier};
    use crate::stitch::{Rules, Stitcher};
    use crate::store::TempStore;

    fn ev(n: u32, ids: &[(&str, &str)]) -> Event {
        Event {
            event_id: format!("e{n}"),
            channel: "web".into(),
            event_type: "page_view".into(),
            timestamp: i64::from(n),
            identifiers: ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
            purchase: None,
            items: vec![],
            campaign_id: None,
            consent: None,
        }
    }

    #[test]
    fn batches_persist_and_lookups_follow_redirects() {
        let t = TempStore::new().unwrap();
        let s = Stitcher::new(Rules::unlimited());
        let mut o = t.store.overlay().unwrap();
        s.apply(&mut o, &ev(1, &[("email", "a@x.io")])).unwrap();
        s.apply(&mut o, &ev(2, &[("anonymous_id", "c1")])).unwrap();
        t.store.write(o.into_write_batch().unwrap()).unwrap();

        let mut o = t.store.overlay().unwrap();
        assert!(
            s.apply(&mut o, &ev(1, &[("email", "a@x.io")]))
                .unwrap()
                .is_none(),
            "dedup survives commit"
        );
        let applied = s
            .apply(
                &mut o,
                &ev(3, &[("email", "a@x.io"), ("anonymous_id", "c1")]),
            )
            .unwrap()
            .unwrap();
        t.store.write(o.into_write_batch().unwrap()).unwrap();
        assert_eq!(
            applied.retired,
            vec![crate::model::ProfileId::from_anchor("e2")]
        );

        let node = t
            .store
            .node_of(&Identifier::new("anonymous_id", "c1"))
            .unwrap()
            .unwrap();
        let p = t.store.profile(node).unwrap().unwrap();
        assert_eq!(p.events, 3);
        let (resolved, n) = t
            .store
            .resolve_profile_id(&crate::model::ProfileId::from_anchor("e2"))
            .unwrap()
            .unwrap();
        assert_eq!((resolved, n), (p.id(), node));
        let mut count = 0;
        t.store.for_each_profile(|_, _| count += 1).unwrap();
        assert_eq!(count, 1);
    }

    /// Links and parts written in one batch (RocksDB merge operands) and read in a later one give the same
    /// split as the in-memory store.
    #[test]
    fn links_and_parts_persist_and_split_like_memory() {
        use crate::stitch::{GraphStore, MemStore};
        let t = TempStore::new().unwrap();
        let s = Stitcher::new(Rules::new(&crate::config::GuardrailConfig::default()));
        let events = [
            ev(1, &[("anonymous_id", "bridge")]),
            ev(2, &[("anonymous_id", "bridge"), ("email", "a@x.io")]),
            ev(3, &[("anonymous_id", "bridge"), ("email", "b@x.io")]),
            ev(4, &[("anonymous_id", "bridge"), ("email", "a@x.io")]),
        ];
        let mut mem = MemStore::default();
        for e in &events {
            // One batch per event: evidence for the same link accumulates as merge operands.
            let mut o = t.store.overlay().unwrap();
            s.apply(&mut o, e).unwrap();
            s.apply(&mut mem, e).unwrap();
            t.store.write(o.into_write_batch().unwrap()).unwrap();
        }
        let bridge = Identifier::new("anonymous_id", "bridge");
        let a = Identifier::new("email", "a@x.io");
        let links = t.store.links(&bridge).unwrap();
        assert_eq!(links.len(), 2);
        let (_, ev_a) = links.iter().find(|(id, _)| *id == a).unwrap();
        assert_eq!((ev_a.events, ev_a.first_event.as_str()), (2, "e2"));
        assert_eq!(links, mem.links(&bridge).unwrap());

        let mut o = t.store.overlay().unwrap();
        let r = s.erase_identifier(&mut o, &bridge).unwrap();
        let r_mem = s.erase_identifier(&mut mem, &bridge).unwrap();
        assert_eq!(r.erased, r_mem.erased);
        assert_eq!(r.splits.len(), 1);
        t.store.write(o.into_write_batch().unwrap()).unwrap();
        assert!(t.store.links(&bridge).unwrap().is_empty());
        assert!(t.store.links(&a).unwrap().is_empty());
        assert!(t.store.part(&bridge).unwrap().is_none());
        let mut profiles = Vec::new();
        t.store.for_each_profile(|_, p| profiles.push(p)).unwrap();
        profiles.sort_by_key(|p| p.id());
        let mut want: Vec<_> = mem.profiles.values().cloned().collect();
        want.sort_by_key(|p| p.id());
        assert_eq!(profiles, want);
    }
}
