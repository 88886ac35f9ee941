//! Lookups in scale-out mode: the profile of an identifier's component, read from the committed local copy
//! of the shards this instance holds. The path from the identifier to its root crosses the homes of the
//! identifiers on it; if one of them is held by another instance, the answer says which shard and where the
//! climb stopped, and the HTTP API forwards the rest of the climb to the shard's owner
//! ([`super::routing`]).

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock};

use super::state::{committed_parent, committed_profile};
use super::{home, ShardId};
use crate::model::Identifier;
use crate::profile::Profile;
use crate::store::{Store, StoreError};

/// The shards this instance holds, published by the sharded pipeline for the lookup API.
#[derive(Debug, Clone)]
pub struct HeldShards {
    count: ShardId,
    held: Arc<RwLock<BTreeSet<ShardId>>>,
}

impl HeldShards {
    pub fn new(count: ShardId) -> Self {
        Self {
            count,
            held: Arc::default(),
        }
    }

    /// Replaces the set of shards held here.
    pub fn publish(&self, shards: &BTreeSet<ShardId>) {
        let mut held = self.held.write().unwrap_or_else(PoisonError::into_inner);
        held.clone_from(shards);
    }

    fn holds(&self, shard: ShardId) -> bool {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&shard)
    }
}

#[derive(Debug, PartialEq)]
pub enum Lookup {
    Found(Box<Profile>),
    /// No component holds the identifier (as far as the shards held here know).
    Unknown,
    /// The path to the component's root goes on at `at`, whose home shard is held by another instance.
    Elsewhere {
        shard: ShardId,
        at: Identifier,
    },
}

/// The profile of the component holding `id`. Parents are smaller than their children, so the climb ends.
pub fn lookup(store: &Store, held: &HeldShards, id: &Identifier) -> Result<Lookup, StoreError> {
    let mut cur = id.clone();
    loop {
        let shard = home(&cur, held.count);
        if !held.holds(shard) {
            return Ok(Lookup::Elsewhere { shard, at: cur });
        }
        match committed_parent(store, shard, &cur)? {
            None => return Ok(Lookup::Unknown),
            Some(parent) if parent == cur => {
                // A root whose first part is still on its way has no profile yet.
                return Ok(committed_profile(store, shard, &cur)?
                    .map_or(Lookup::Unknown, |p| Lookup::Found(Box::new(p))));
            }
            Some(parent) => cur = parent,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use rocksdb::WriteBatch;

    use super::*;
    use crate::model::Event;
    use crate::scaleout::state::ShardOverlay;
    use crate::scaleout::tests::ev;
    use crate::scaleout::{handle, Effects, Msg};
    use crate::stitch::Rules;
    use crate::store::TempStore;

    const SHARDS: ShardId = 4;

    /// Handles the events to the end over four shards and commits the state.
    fn stitched(store: &Store, events: &[Event]) {
        let rules = Rules::unlimited();
        let mut overlay = ShardOverlay::new(store);
        let mut queue: VecDeque<Msg> = events.iter().cloned().map(Msg::Event).collect();
        while let Some(msg) = queue.pop_front() {
            let mut fx = Effects::default();
            let target = msg.target(SHARDS);
            handle(&mut overlay.shard(target), msg, &rules, &mut fx).expect("handle");
            queue.extend(fx.msgs);
        }
        let mut batch = WriteBatch::default();
        store
            .put_shard_changes(&mut batch, overlay.changes(), std::iter::empty())
            .expect("changes");
        store.write(batch).expect("write");
    }

    #[test]
    fn every_identifier_finds_its_component_when_the_path_is_held_here() {
        let tmp = TempStore::new().expect("store");
        let store = &tmp.store;
        let ids = [
            ("email", "a@x.io"),
            ("anonymous_id", "c1"),
            ("anonymous_id", "c2"),
            ("device_id", "d1"),
            ("phone", "+15550000001"),
        ];
        stitched(
            store,
            &[
                ev(0, 1000, [ids[0], ids[1]]),
                ev(1, 1001, [ids[2], ids[3]]),
                ev(2, 1002, [ids[1], ids[3]]),
                ev(3, 1003, [ids[4], ids[2]]),
                ev(4, 1004, [("email", "b@x.io")]),
            ],
        );
        let held = HeldShards::new(SHARDS);
        held.publish(&(0..SHARDS).collect());
        let all: BTreeSet<Identifier> = ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect();
        for id in &all {
            let Lookup::Found(profile) = lookup(store, &held, id).expect("lookup") else {
                panic!("{id:?} not found");
            };
            let found: BTreeSet<Identifier> = profile.identifiers.keys().cloned().collect();
            assert_eq!(found, all);
            assert_eq!(profile.events, 4);
        }
        let unknown = Identifier::new("email", "nobody@x.io");
        assert_eq!(
            lookup(store, &held, &unknown).expect("lookup"),
            Lookup::Unknown
        );

        // Without the root's shard, every identifier of the component is answered elsewhere.
        let root = all.iter().next().expect("root");
        let missing = home(root, SHARDS);
        held.publish(&(0..SHARDS).filter(|s| *s != missing).collect());
        for id in &all {
            assert!(matches!(
                lookup(store, &held, id).expect("lookup"),
                Lookup::Elsewhere { shard, .. } if shard == missing
            ));
        }
    }
}
