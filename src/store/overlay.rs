//! The changes of one batch, layered over RocksDB: reads see the batch's own writes, and everything lands
//! in a single atomic `WriteBatch` together with the checkpoint.

use std::collections::{HashMap, HashSet};

use rocksdb::WriteBatch;

use super::{
    encode_profile, event_key, identifier_key, Store, StoreError, CF_EVENTS, CF_IDENTIFIERS,
    CF_META, CF_PROFILES, CF_PROFILE_IDS, CF_REDIRECTS, META_NEXT_NODE,
};
use crate::model::{Identifier, NodeId, ProfileId};
use crate::profile::Profile;
use crate::stitch::GraphStore;

pub struct Overlay<'a> {
    store: &'a Store,
    /// `None`: removed in this batch.
    nodes: HashMap<Identifier, Option<NodeId>>,
    profiles: HashMap<NodeId, Option<Profile>>,
    index: HashMap<ProfileId, Option<NodeId>>,
    redirects: HashMap<ProfileId, Option<ProfileId>>,
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

    pub fn remove_redirect(&mut self, id: &ProfileId) {
        self.redirects.insert(id.clone(), None);
    }

    /// Everything the batch changed, as one atomic write batch.
    pub fn into_write_batch(self) -> Result<WriteBatch, StoreError> {
        let s = self.store;
        let mut b = WriteBatch::default();
        let (ids_cf, prof_cf, idx_cf, red_cf, ev_cf, meta_cf) = (
            s.cf(CF_IDENTIFIERS)?,
            s.cf(CF_PROFILES)?,
            s.cf(CF_PROFILE_IDS)?,
            s.cf(CF_REDIRECTS)?,
            s.cf(CF_EVENTS)?,
            s.cf(CF_META)?,
        );
        for (id, node) in &self.nodes {
            match node {
                Some(n) => b.put_cf(ids_cf, identifier_key(id), n.0.to_be_bytes()),
                None => b.delete_cf(ids_cf, identifier_key(id)),
            }
        }
        for (node, p) in &self.profiles {
            match p {
                Some(p) => b.put_cf(prof_cf, node.0.to_be_bytes(), encode_profile(p)?),
                None => b.delete_cf(prof_cf, node.0.to_be_bytes()),
            }
        }
        for (id, node) in &self.index {
            match node {
                Some(n) => b.put_cf(idx_cf, id.as_str(), n.0.to_be_bytes()),
                None => b.delete_cf(idx_cf, id.as_str()),
            }
        }
        for (from, to) in &self.redirects {
            match to {
                Some(to) => b.put_cf(red_cf, from.as_str(), to.as_str()),
                None => b.delete_cf(red_cf, from.as_str()),
            }
        }
        for k in &self.seen {
            b.put_cf(ev_cf, k, []);
        }
        if self.next_node != self.first_node {
            b.put_cf(meta_cf, META_NEXT_NODE, self.next_node.to_be_bytes());
        }
        Ok(b)
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

    fn index(&mut self, id: &ProfileId, node: NodeId) {
        self.index.insert(id.clone(), Some(node));
    }

    fn unindex(&mut self, id: &ProfileId) {
        self.index.insert(id.clone(), None);
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
}
