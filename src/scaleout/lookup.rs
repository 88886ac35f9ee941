//! Lookups in scale-out mode, from the committed local copy of the shards this instance holds. An
//! identifier's home shard knows which shard owns its component (the directory); the owner holds the
//! component whole: its profile, links and parts. When the home or the owner is held by another instance,
//! the answer says which shard to ask and whether it is the identifier's home or its owner, and the HTTP
//! API forwards the lookup there ([`super::routing`]).

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock};

use super::owner::Dir;
use super::state::ShardRead;
use super::{home, ShardId};
use crate::model::{Identifier, NodeId, ProfileId};
use crate::store::{follow_redirects, Store, StoreError};

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

    pub fn count(&self) -> ShardId {
        self.count
    }

    /// Whether this instance holds no shard (none assigned, or restoring).
    pub fn is_empty(&self) -> bool {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn holds(&self, shard: ShardId) -> bool {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&shard)
    }

    pub fn held(&self) -> BTreeSet<ShardId> {
        self.held
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The shards a stopped instance's state directory holds, for the offline commands (`inspect`, `export`,
/// `quality`): what it held when it stopped, as far as it had read their changelogs.
pub fn held_locally(store: &Store) -> Result<HeldShards, StoreError> {
    let count = store.shard_count()?.ok_or_else(|| StoreError::Corrupt {
        cf: crate::store::CF_META,
        reason: "the state directory holds no shards: was the service ever started on it?".into(),
    })?;
    let held = HeldShards::new(count);
    held.publish(&store.local_shards()?);
    Ok(held)
}

/// Where a lookup goes on: an identifier's home (its directory entry) or a shard that owns or owned its
/// component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Home,
    Owner(ShardId),
}

#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// The component: its owner shard and its node there.
    Found { shard: ShardId, node: NodeId },
    /// No component holds the identifier.
    Unknown,
    /// The lookup goes on at `step`, held by another instance.
    Elsewhere(Step),
}

/// Most shards a lookup visits here: the home, then owners along forwarding pointers.
const MAX_STEPS: usize = 8;

/// Finds the component of `id`, from `step` (`Step::Home` for a new lookup).
pub fn lookup(
    store: &Store,
    held: &HeldShards,
    id: &Identifier,
    mut step: Step,
) -> Result<Lookup, StoreError> {
    for _ in 0..MAX_STEPS {
        let shard = match step {
            Step::Home => home(id, held.count),
            Step::Owner(s) => s,
        };
        if !held.holds(shard) {
            return Ok(Lookup::Elsewhere(step));
        }
        let read = ShardRead { kv: store, shard };
        step = match step {
            // One shard: the graph is the directory (docs/DESIGN.md, "One shard: the graph is the
            // directory").
            Step::Home if held.count == 1 => Step::Owner(shard),
            Step::Home => match read.dir(id)? {
                Some(Dir::Owned(s, _)) => Step::Owner(s),
                _ => return Ok(Lookup::Unknown),
            },
            Step::Owner(_) => {
                if let Some(node) = read.node_of(id)? {
                    return Ok(Lookup::Found { shard, node });
                }
                // Moved on since the directory was written: follow it.
                match read.moved(id)? {
                    Some(super::owner::Moved::To(s, _)) => Step::Owner(s),
                    _ => return Ok(Lookup::Unknown),
                }
            }
        };
    }
    Ok(Lookup::Unknown)
}

/// A profile by any of its public ids (redirects followed) in the shards held here: the shard, the live
/// id and the node.
pub fn profile_here(
    store: &Store,
    held: &HeldShards,
    id: &ProfileId,
) -> Result<Option<(ShardId, ProfileId, NodeId)>, StoreError> {
    for shard in held.held() {
        let read = ShardRead { kv: store, shard };
        if let Some((live, node)) =
            follow_redirects(id, |p| read.indexed(p), |p| read.redirect_of(p))?
        {
            return Ok(Some((shard, live, node)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::model::Event;
    use crate::scaleout::entry_shard;
    use crate::scaleout::owner::{Msg, Out, Shard};
    use crate::scaleout::state::{ShardOverlay, ShardView};
    use crate::stitch::{Rules, Stitcher};
    use crate::store::TempStore;

    const SHARDS: ShardId = 4;

    fn ev(n: u32, ts: i64, ids: &[(&str, &str)]) -> Event {
        let ids = ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect();
        Event::new(format!("e{n}"), "web", "page_view", ts, ids)
    }

    /// Handles the events over four shards kept in RocksDB, each to the end before the next (so they are
    /// applied in their order), and commits the state.
    fn stitched(store: &Store, events: &[Event]) {
        let stitcher = Stitcher::new(Rules::unlimited());
        let mut overlay = ShardOverlay::new(store);
        for e in events {
            let mut queue =
                VecDeque::from([(entry_shard(e, SHARDS), Msg::Event(Box::new(e.clone())))]);
            while let Some((shard, msg)) = queue.pop_front() {
                let mut out = Out::default();
                let mut view = ShardView {
                    kv: &mut overlay,
                    shard,
                };
                Shard {
                    view: &mut view,
                    shards: SHARDS,
                    suppression: None,
                }
                .handle(&stitcher, msg, &mut out)
                .expect("handle");
                queue.extend(out.msgs);
                queue.extend(out.deferred);
            }
        }
        store
            .write_shard_changes(overlay.into_changes().expect("encode"), [])
            .expect("write");
    }

    #[test]
    fn every_identifier_and_profile_id_finds_its_component() {
        let tmp = TempStore::new().expect("store");
        let store = &tmp.store;
        let ids = [
            ("email", "a@x.io"),
            ("anonymous_id", "c1"),
            ("anonymous_id", "c2"),
            ("device_id", "d1"),
            ("phone", "+15550000001"),
        ];
        let events = [
            ev(0, 1000, &[ids[0], ids[1]]),
            ev(1, 1001, &[ids[2], ids[3]]),
            ev(2, 1002, &[ids[1], ids[3]]),
            ev(3, 1003, &[ids[4], ids[2]]),
            ev(4, 1004, &[("email", "b@x.io")]),
        ];
        stitched(store, &events);
        let held = HeldShards::new(SHARDS);
        held.publish(&(0..SHARDS).collect());
        let all: BTreeSet<Identifier> = ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect();
        let mut owner = None;
        for id in &all {
            let Lookup::Found { shard, node } =
                lookup(store, &held, id, Step::Home).expect("lookup")
            else {
                panic!("{id:?} not found");
            };
            let read = ShardRead { kv: store, shard };
            let profile = read.profile(node).expect("read").expect("profile");
            let found: BTreeSet<Identifier> = profile.identifiers.keys().cloned().collect();
            assert_eq!(found, all);
            owner = Some((shard, node));
        }
        // The merged profile by its live id and by the retired ids of the profiles merged into it.
        for first in [&events[0], &events[1]] {
            let id = crate::profile::Profile::new(first, &Default::default()).id();
            let (shard, live, node) = profile_here(store, &held, &id)
                .expect("read")
                .unwrap_or_else(|| panic!("profile id {id} of {} found", first.event_id));
            assert_eq!(Some((shard, node)), owner);
            assert_eq!(
                live,
                crate::profile::Profile::new(&events[0], &Default::default()).id()
            );
        }
        assert_eq!(
            lookup(
                store,
                &held,
                &Identifier::new("email", "nobody@x.io"),
                Step::Home
            )
            .expect("lookup"),
            Lookup::Unknown
        );
        // Holding none of the shards: the lookup goes on at the identifier's home, elsewhere.
        held.publish(&BTreeSet::new());
        let x = Identifier::new("email", "a@x.io");
        assert_eq!(
            lookup(store, &held, &x, Step::Home).expect("lookup"),
            Lookup::Elsewhere(Step::Home)
        );
    }
}
