//! Sharded state in RocksDB (column family `shards`), written through an overlay whose changes are also
//! the shard's changelog records.
//!
//! | key                                          | value                                   |
//! |----------------------------------------------|-----------------------------------------|
//! | shard (u32 BE) `p` identifier key            | v2 + postcard(Identifier): the parent  |
//! | shard (u32 BE) `r` identifier key            | v2 + postcard(Profile): a root's profile |
//! | shard (u32 BE) `e` SHA-256(event id)[..16]   | empty: the event was applied            |
//!
//! A batch's changes go to partition `shard` of the changelog topic (same key and value; a delete is a
//! tombstone) inside the batch's transaction. The local copy is written only after that transaction
//! committed, with the changelog offsets it reached, so it is never ahead of the changelog: a crash in
//! between leaves it behind, and the restore on start-up catches up (docs/DESIGN.md, "Scale-out").

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::{ShardId, ShardState};
use crate::model::Identifier;
use crate::profile::Profile;
use crate::store::{decode_value, encode_value, identifier_key, Store, StoreError, CF_SHARDS};

const PARENT: u8 = b'p';
const ROOT_PROFILE: u8 = b'r';
const EVENT: u8 = b'e';

fn key(shard: ShardId, kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

/// The shard a state key belongs to.
pub fn shard_of_key(key: &[u8]) -> Option<ShardId> {
    Some(ShardId::from_be_bytes(key.get(..4)?.try_into().ok()?))
}

/// One batch's view of the sharded state: reads see the batch's own writes.
pub struct ShardOverlay<'s> {
    store: &'s Store,
    dirty: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'s> ShardOverlay<'s> {
    pub fn new(store: &'s Store) -> Self {
        Self {
            store,
            dirty: BTreeMap::new(),
        }
    }

    /// The state of one shard, for [`super::handle`].
    pub fn shard(&mut self, shard: ShardId) -> ShardView<'_, 's> {
        ShardView {
            overlay: self,
            shard,
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.dirty.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.store.shard_value(key),
        }
    }

    /// The profile of root `r` of `shard`, as the batch left it.
    pub fn profile(&self, shard: ShardId, r: &Identifier) -> Result<Option<Profile>, StoreError> {
        self.get(&key(shard, ROOT_PROFILE, &identifier_key(r)))?
            .map(|v| decode_value(&v, CF_SHARDS, "profile"))
            .transpose()
    }

    /// Every key the batch changed, with its new value (`None`: deleted), in key order.
    pub fn changes(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.dirty.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }
}

/// The parent of `x` as recorded in `store` (committed state only): for lookups.
pub fn committed_parent(
    store: &Store,
    shard: ShardId,
    x: &Identifier,
) -> Result<Option<Identifier>, StoreError> {
    store
        .shard_value(&key(shard, PARENT, &identifier_key(x)))?
        .map(|v| decode_value(&v, CF_SHARDS, "parent"))
        .transpose()
}

/// The profile of root `r` as recorded in `store`: for lookups.
pub fn committed_profile(
    store: &Store,
    shard: ShardId,
    r: &Identifier,
) -> Result<Option<Profile>, StoreError> {
    ShardOverlay::new(store).profile(shard, r)
}

/// One shard of a [`ShardOverlay`].
pub struct ShardView<'o, 's> {
    overlay: &'o mut ShardOverlay<'s>,
    shard: ShardId,
}

impl ShardState for ShardView<'_, '_> {
    type Error = StoreError;

    fn parent(&mut self, x: &Identifier) -> Result<Option<Identifier>, StoreError> {
        self.overlay
            .get(&key(self.shard, PARENT, &identifier_key(x)))?
            .map(|v| decode_value(&v, CF_SHARDS, "parent"))
            .transpose()
    }

    fn set_parent(&mut self, x: &Identifier, parent: &Identifier) -> Result<(), StoreError> {
        let value = encode_value(parent, 64)?;
        self.overlay
            .dirty
            .insert(key(self.shard, PARENT, &identifier_key(x)), Some(value));
        Ok(())
    }

    fn take_profile(&mut self, r: &Identifier) -> Result<Option<Profile>, StoreError> {
        let k = key(self.shard, ROOT_PROFILE, &identifier_key(r));
        let found = self.overlay.get(&k)?;
        if found.is_some() {
            self.overlay.dirty.insert(k, None);
        }
        found
            .map(|v| decode_value(&v, CF_SHARDS, "profile"))
            .transpose()
    }

    fn put_profile(&mut self, r: &Identifier, profile: Profile) -> Result<(), StoreError> {
        let value = encode_value(&profile, 512)?;
        self.overlay.dirty.insert(
            key(self.shard, ROOT_PROFILE, &identifier_key(r)),
            Some(value),
        );
        Ok(())
    }

    fn first_sighting(&mut self, event_id: &str) -> Result<bool, StoreError> {
        let digest = Sha256::digest(event_id.as_bytes());
        let k = key(self.shard, EVENT, &digest[..16]);
        if self.overlay.get(&k)?.is_some() {
            return Ok(false);
        }
        self.overlay.dirty.insert(k, Some(Vec::new()));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use rocksdb::WriteBatch;

    use super::*;
    use crate::scaleout::tests::ev;
    use crate::scaleout::{handle, Effects, Msg, Shard};
    use crate::stitch::Rules;
    use crate::store::TempStore;

    /// Runs every message to completion on one shard kept in RocksDB and on one kept in memory,
    /// committing the RocksDB overlay after every message; both must end equal.
    #[test]
    fn rocksdb_shard_behaves_like_the_in_memory_shard() {
        let tmp = TempStore::new().expect("store");
        let store = &tmp.store;
        let rules = Rules::unlimited();
        let mut mem = Shard::default();
        let events = [
            ev(0, 1000, [("email", "a@x.io"), ("anonymous_id", "c1")]),
            ev(1, 1001, [("anonymous_id", "c2"), ("device_id", "d1")]),
            ev(2, 1002, [("anonymous_id", "c1"), ("device_id", "d1")]),
            ev(2, 1002, [("anonymous_id", "c1"), ("device_id", "d1")]),
            ev(3, 1003, [("email", "b@x.io")]),
        ];
        let mut queue: std::collections::VecDeque<Msg> =
            events.iter().cloned().map(Msg::Event).collect();
        let mut duplicates = 0;
        while let Some(msg) = queue.pop_front() {
            let mut fx_mem = Effects::default();
            let Ok(()) = handle(&mut mem, msg.clone(), &rules, &mut fx_mem);
            let mut overlay = ShardOverlay::new(store);
            let mut fx_db = Effects::default();
            handle(&mut overlay.shard(0), msg, &rules, &mut fx_db).expect("handle");
            assert_eq!(fx_db.msgs, fx_mem.msgs);
            duplicates += fx_db.duplicates;
            let mut batch = WriteBatch::default();
            store
                .put_shard_changes(&mut batch, overlay.changes(), [(0, 1)])
                .expect("changes");
            store.write(batch).expect("write");
            queue.extend(fx_db.msgs.drain(..));
        }
        assert_eq!(duplicates, 1);
        for (x, p) in &mem.parent {
            assert_eq!(
                committed_parent(store, 0, x).expect("read").as_ref(),
                Some(p)
            );
        }
        for (r, p) in &mem.profiles {
            assert_eq!(
                committed_profile(store, 0, r).expect("read").as_ref(),
                Some(p)
            );
        }
        assert_eq!(mem.profiles.len(), 2);
        assert_eq!(store.changelog_position(0).expect("position"), Some(1));
        store.wipe_shard(0).expect("wipe");
        assert_eq!(store.changelog_position(0).expect("position"), None);
        for x in mem.parent.keys() {
            assert_eq!(committed_parent(store, 0, x).expect("read"), None);
        }
    }
}
