//! The cross-partition stitching protocol for scale-out (issue 6): a per-shard state machine
//! ([`handle`]) with a deterministic simulation (the tests below), and its Kafka runtime ([`runtime`]) over
//! RocksDB state backed by a changelog topic ([`state`]). docs/DESIGN.md, "Scale-out", has the diagram.
//!
//! Every identifier has a *home* shard, `hash(identifier) mod shards`: the shard that keeps its parent
//! pointer. A component is a tree of parent pointers whose root is its smallest identifier; the root's home
//! keeps the component's profile (the join of its events' parts). Shards talk only by messages, records on
//! an internal topic partitioned by shard, consumed and produced in the same transactions as the shard's
//! state changes, so each message is handled exactly once.
//!
//! - `Event` goes to the home of its event id (the dedup set is partitioned the same way); the first copy
//!   sends `Part` for its most trusted identifier and `Union` for every other identifier with it.
//! - `Union(x, y)` climbs from x to its root `rx`, then `Meet(y, rx)` climbs from y to its root `ry`. The
//!   larger root is hooked under the smaller: locally if it is `ry`, by `Hook(rx, ry)` at rx's home if it
//!   is `rx`. A hook that finds its child no longer a root (another union hooked it meanwhile) turns back
//!   into `Union(child, parent)`. Parents are always smaller than children, so there is no cycle, and each
//!   retry follows a hook that removed a root, so unions terminate; the final root of a component is its
//!   smallest identifier, whatever the order.
//! - `Part` and `Absorb` (a hooked root's profile) climb to the current root and are joined there. Profiles
//!   are joins (commutative, associative), so the root ends with exactly the single-instance profile, and
//!   its public id (from the earliest event) is the single-instance id too.

pub mod lookup;
pub mod owner;
pub mod routing;
pub mod runtime;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Event, Identifier, ProfileId};
use crate::profile::Profile;
use crate::stitch::Rules;

/// A shard number: a partition of the internal topic and of the changelog.
pub type ShardId = u32;

/// The shard that keeps an identifier's parent pointer.
pub fn home(id: &Identifier, shards: ShardId) -> ShardId {
    hash_mod(&crate::store::identifier_key(id), shards)
}

/// The shard that deduplicates an event id.
pub fn event_home(event_id: &str, shards: ShardId) -> ShardId {
    hash_mod(event_id.as_bytes(), shards)
}

fn hash_mod(bytes: &[u8], shards: ShardId) -> ShardId {
    let d = Sha256::digest(bytes);
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % shards.max(1)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// A new event, at the home of its id.
    Event(Event),
    /// Join the components of the two identifiers; at the home of the first.
    Union(Identifier, Identifier),
    /// The second is a root: find the first's root and hook the larger under the smaller; at the home of
    /// the first.
    Meet(Identifier, Identifier),
    /// Hook root `child` under `parent` (smaller); at the home of the child.
    Hook {
        child: Identifier,
        parent: Identifier,
    },
    /// Join a hooked root's profile into the component's root; at the home of the identifier.
    Absorb(Identifier, Box<Profile>),
    /// Join an event's part into the profile of the identifier's component; at the home of the identifier.
    Part(Identifier, Box<Profile>),
}

impl Msg {
    /// The shard this message goes to.
    pub fn target(&self, shards: ShardId) -> ShardId {
        match self {
            Msg::Event(ev) => event_home(&ev.event_id, shards),
            Msg::Union(x, _) | Msg::Meet(x, _) | Msg::Absorb(x, _) | Msg::Part(x, _) => {
                home(x, shards)
            }
            Msg::Hook { child, .. } => home(child, shards),
        }
    }

    /// The message's kind, for metrics and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Event(_) => "event",
            Msg::Union(..) => "union",
            Msg::Meet(..) => "meet",
            Msg::Hook { .. } => "hook",
            Msg::Absorb(..) => "absorb",
            Msg::Part(..) => "part",
        }
    }
}

/// What a shard keeps, wherever it keeps it: in memory for the simulation ([`Shard`]), in RocksDB with a
/// changelog when running ([`state::ShardOverlay`]).
pub trait ShardState {
    type Error;
    /// The parent of `x`, or `None` if this shard never saw `x`.
    fn parent(&mut self, x: &Identifier) -> Result<Option<Identifier>, Self::Error>;
    fn set_parent(&mut self, x: &Identifier, parent: &Identifier) -> Result<(), Self::Error>;
    /// Removes the profile of root `r` and returns it.
    fn take_profile(&mut self, r: &Identifier) -> Result<Option<Profile>, Self::Error>;
    fn put_profile(&mut self, r: &Identifier, profile: Profile) -> Result<(), Self::Error>;
    /// Records that `event_id` was applied; false if it already was.
    fn first_sighting(&mut self, event_id: &str) -> Result<bool, Self::Error>;
}

/// What handling messages produced, besides state changes.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages to send, each to its [`Msg::target`].
    pub msgs: Vec<Msg>,
    /// Roots whose profile changed (an update to publish).
    pub touched: Vec<Identifier>,
    /// Public profile ids that stopped existing, with the id that now holds their events.
    pub redirects: Vec<(ProfileId, ProfileId)>,
    /// Roots hooked under another root.
    pub merges: u64,
    /// Events seen before.
    pub duplicates: u64,
}

/// The parent of `x`, registering `x` as a new root if it was never seen.
fn parent_of<S: ShardState>(state: &mut S, x: &Identifier) -> Result<Identifier, S::Error> {
    match state.parent(x)? {
        Some(p) => Ok(p),
        None => {
            state.set_parent(x, x)?;
            Ok(x.clone())
        }
    }
}

/// Handles one message at its target shard.
pub fn handle<S: ShardState>(
    state: &mut S,
    msg: Msg,
    rules: &Rules,
    fx: &mut Effects,
) -> Result<(), S::Error> {
    match msg {
        Msg::Event(ev) => {
            if !state.first_sighting(&ev.event_id)? {
                fx.duplicates += 1;
                return Ok(());
            }
            let mut ids = ev.identifiers.clone();
            ids.sort_by(|a, b| rules.trust_key(a).cmp(&rules.trust_key(b)));
            let Some(anchor) = ids.first().cloned() else {
                return Ok(());
            };
            fx.msgs
                .push(Msg::Part(anchor.clone(), Box::new(Profile::new(&ev))));
            for other in ids.into_iter().skip(1) {
                fx.msgs.push(Msg::Union(anchor.clone(), other));
            }
        }
        Msg::Union(x, y) => {
            let p = parent_of(state, &x)?;
            if p == x {
                fx.msgs.push(Msg::Meet(y, x));
            } else {
                fx.msgs.push(Msg::Union(p, y));
            }
        }
        Msg::Meet(y, rx) => {
            let p = parent_of(state, &y)?;
            if p != y {
                fx.msgs.push(Msg::Meet(p, rx));
            } else if y == rx {
                // Already one component.
            } else if rx < y {
                hook(state, y, rx, fx)?;
            } else {
                fx.msgs.push(Msg::Hook {
                    child: rx,
                    parent: y,
                });
            }
        }
        Msg::Hook { child, parent } => {
            let p = parent_of(state, &child)?;
            if p == child {
                hook(state, child, parent, fx)?;
            } else {
                // Hooked elsewhere meanwhile: join its current tree with `parent` instead.
                fx.msgs.push(Msg::Union(child, parent));
            }
        }
        Msg::Part(x, part) => climb_to_join(state, x, part, false, fx)?,
        Msg::Absorb(x, profile) => climb_to_join(state, x, profile, true, fx)?,
    }
    Ok(())
}

/// `Part` (`absorbed` false) and `Absorb`: joins `profile` at `x` if it is a root, else sends it one step up.
fn climb_to_join<S: ShardState>(
    state: &mut S,
    x: Identifier,
    profile: Box<Profile>,
    absorbed: bool,
    fx: &mut Effects,
) -> Result<(), S::Error> {
    let p = parent_of(state, &x)?;
    if p == x {
        join_at_root(state, x, *profile, absorbed, fx)
    } else {
        fx.msgs.push(if absorbed {
            Msg::Absorb(p, profile)
        } else {
            Msg::Part(p, profile)
        });
        Ok(())
    }
}

/// Joins `incoming` into the profile of root `r`. A profile's public id follows its earliest event, so a
/// join may retire the root's id (an earlier event arrived) or, for an absorbed profile, the absorbed id.
fn join_at_root<S: ShardState>(
    state: &mut S,
    r: Identifier,
    incoming: Profile,
    absorbed: bool,
    fx: &mut Effects,
) -> Result<(), S::Error> {
    let joined = match state.take_profile(&r)? {
        None => incoming,
        Some(mut mine) => {
            let (before, theirs) = (mine.id(), incoming.id());
            mine.absorb(incoming);
            let after = mine.id();
            if before != after {
                fx.redirects.push((before, after.clone()));
            }
            if absorbed && theirs != after {
                fx.redirects.push((theirs, after));
            }
            mine
        }
    };
    state.put_profile(&r, joined)?;
    fx.touched.push(r);
    Ok(())
}

/// Makes root `child` a child of `parent` (smaller) and sends its profile up.
fn hook<S: ShardState>(
    state: &mut S,
    child: Identifier,
    parent: Identifier,
    fx: &mut Effects,
) -> Result<(), S::Error> {
    debug_assert!(parent < child);
    state.set_parent(&child, &parent)?;
    fx.merges += 1;
    if let Some(profile) = state.take_profile(&child)? {
        fx.msgs.push(Msg::Absorb(parent, Box::new(profile)));
    }
    Ok(())
}

/// One shard's state in memory: the simulation's, and a reference for the RocksDB one.
#[derive(Debug, Default, Clone)]
pub struct Shard {
    /// Parent of every identifier homed here; a root is its own parent.
    pub parent: HashMap<Identifier, Identifier>,
    /// Profiles of the roots homed here.
    pub profiles: HashMap<Identifier, Profile>,
    /// Event ids homed here that were applied.
    pub seen: HashSet<String>,
}

impl ShardState for Shard {
    type Error = Infallible;

    fn parent(&mut self, x: &Identifier) -> Result<Option<Identifier>, Infallible> {
        Ok(self.parent.get(x).cloned())
    }

    fn set_parent(&mut self, x: &Identifier, parent: &Identifier) -> Result<(), Infallible> {
        self.parent.insert(x.clone(), parent.clone());
        Ok(())
    }

    fn take_profile(&mut self, r: &Identifier) -> Result<Option<Profile>, Infallible> {
        Ok(self.profiles.remove(r))
    }

    fn put_profile(&mut self, r: &Identifier, profile: Profile) -> Result<(), Infallible> {
        self.profiles.insert(r.clone(), profile);
        Ok(())
    }

    fn first_sighting(&mut self, event_id: &str) -> Result<bool, Infallible> {
        Ok(self.seen.insert(event_id.to_string()))
    }
}

/// Every shard, for following parent pointers across them (tests, the simulation, reports).
pub struct Cluster {
    pub shards: Vec<Shard>,
}

impl Cluster {
    pub fn new(shards: ShardId) -> Self {
        Self {
            shards: vec![Shard::default(); shards.max(1) as usize],
        }
    }

    fn count(&self) -> ShardId {
        self.shards.len() as ShardId
    }

    /// The root of `x`'s tree.
    pub fn root(&self, x: &Identifier) -> Identifier {
        let mut cur = x.clone();
        loop {
            let shard = &self.shards[home(&cur, self.count()) as usize];
            match shard.parent.get(&cur) {
                Some(p) if *p != cur => cur = p.clone(),
                _ => return cur,
            }
        }
    }

    /// The profile of the root `r`.
    pub fn profile(&self, r: &Identifier) -> Option<&Profile> {
        self.shards[home(r, self.count()) as usize].profiles.get(r)
    }

    /// Every known identifier.
    pub fn identifiers(&self) -> impl Iterator<Item = &Identifier> {
        self.shards.iter().flat_map(|s| s.parent.keys())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::stitch::{MemStore, Stitcher};

    /// Statistics of one simulated run.
    #[derive(Debug, Default)]
    struct Run {
        messages: u64,
        redeliveries: u64,
        /// Messages handled, by kind.
        by_kind: BTreeMap<&'static str, u64>,
    }

    /// Delivers every message in a random order (each shard's queue in order, as a Kafka partition is, the
    /// shards interleaved at random); with probability `crash`, a step is lost before it commits and the
    /// message is handled again later (what a transaction abort and restart do).
    fn simulate(
        events: &[Event],
        shards: ShardId,
        seed: u64,
        crash: f64,
        rules: &Rules,
    ) -> (Cluster, Run) {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut cluster = Cluster::new(shards);
        let mut queues: Vec<VecDeque<Msg>> = vec![VecDeque::new(); shards as usize];
        // Events reach their shards from the input partitions in an order of their own.
        let mut input: Vec<&Event> = events.iter().collect();
        for i in (1..input.len()).rev() {
            input.swap(i, rng.gen_range(0..=i));
        }
        let mut input = input.into_iter();
        let mut run = Run::default();
        loop {
            // Now and then the next input event arrives.
            if rng.gen_bool(0.3) {
                if let Some(ev) = input.next() {
                    let m = Msg::Event(ev.clone());
                    queues[m.target(shards) as usize].push_back(m);
                }
            }
            let busy: Vec<usize> = (0..queues.len())
                .filter(|i| !queues[*i].is_empty())
                .collect();
            if busy.is_empty() {
                match input.next() {
                    Some(ev) => {
                        let m = Msg::Event(ev.clone());
                        queues[m.target(shards) as usize].push_back(m);
                        continue;
                    }
                    None => break,
                }
            }
            let s = busy[rng.gen_range(0..busy.len())];
            // Mostly the head of the queue, as a partition delivers; now and then a later message first,
            // as when the runtime handles a message for a shard of its own within the batch that sent it.
            let at = if rng.gen_bool(0.2) {
                rng.gen_range(0..queues[s].len())
            } else {
                0
            };
            let Some(msg) = queues[s].remove(at) else {
                continue;
            };
            if rng.gen_bool(crash) {
                // Crashed before the commit: state and output of this step never happened.
                queues[s].insert(at, msg);
                run.redeliveries += 1;
                continue;
            }
            let mut fx = Effects::default();
            *run.by_kind.entry(msg.kind()).or_default() += 1;
            let Ok(()) = handle(&mut cluster.shards[s], msg, rules, &mut fx);
            run.messages += 1;
            for m in fx.msgs {
                queues[m.target(shards) as usize].push_back(m);
            }
        }
        (cluster, run)
    }

    /// Components as identifier sets, each with its profile.
    fn sharded_result(c: &Cluster) -> BTreeMap<BTreeSet<Identifier>, Profile> {
        let mut groups: HashMap<Identifier, BTreeSet<Identifier>> = HashMap::new();
        for id in c.identifiers() {
            groups.entry(c.root(id)).or_default().insert(id.clone());
        }
        groups
            .into_iter()
            .map(|(root, ids)| {
                let p = c.profile(&root).cloned().unwrap_or_else(Profile::empty);
                assert!(
                    p.identifiers.keys().eq(ids.iter()),
                    "the root's profile lists exactly its component's identifiers"
                );
                (ids, p)
            })
            .collect()
    }

    fn single_instance_result(
        events: &[Event],
        rules: &Rules,
    ) -> BTreeMap<BTreeSet<Identifier>, Profile> {
        let s = Stitcher::new(rules.clone());
        let mut store = MemStore::default();
        for e in events {
            let _ = s.apply(&mut store, e);
        }
        store
            .profiles
            .values()
            .map(|p| (p.identifiers.keys().cloned().collect(), p.clone()))
            .collect()
    }

    /// Event `e{n}` at `ts` with identifiers `ids`; also for the tests of `state` and `lookup`.
    pub(super) fn ev<V: Into<String>>(
        n: usize,
        ts: i64,
        ids: impl IntoIterator<Item = (&'static str, V)>,
    ) -> Event {
        let mut identifiers: Vec<Identifier> = ids
            .into_iter()
            .map(|(k, v)| Identifier::new(k, v))
            .collect();
        identifiers.sort();
        identifiers.dedup();
        Event {
            event_id: format!("e{n}"),
            channel: ["web", "app", "pos", "email"][n % 4].into(),
            event_type: "page_view".into(),
            timestamp: ts,
            identifiers,
            purchase: None,
            items: vec![],
            campaign_id: None,
            consent: None,
        }
    }

    fn arb_events() -> impl Strategy<Value = Vec<Event>> {
        let id = (0usize..4, 0u8..40).prop_map(|(k, v)| {
            let kind = ["anonymous_id", "email", "device_id", "customer_id"][k];
            (kind, format!("{kind}-{v}"))
        });
        prop::collection::vec((prop::collection::vec(id, 1..4), 0i64..1000), 1..80).prop_map(
            |evs| {
                evs.into_iter()
                    .enumerate()
                    .map(|(i, (ids, ts))| ev(i, ts, ids))
                    .collect()
            },
        )
    }

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    }

    #[test]
    fn a_fixed_seed_run_equals_the_single_instance() {
        // Deterministic: this exact interleaving runs in CI every time.
        let rules = Rules::unlimited();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let events: Vec<Event> = (0..3000)
            .map(|i| {
                let person = rng.gen_range(0..400);
                let ids = vec![
                    ("email", format!("p{person}@x.io")),
                    (
                        "anonymous_id",
                        format!("ck-{person}-{}", rng.gen_range(0..3)),
                    ),
                    // One in twenty events ties two people through a shared cookie.
                    if rng.gen_bool(0.05) {
                        ("anonymous_id", format!("shared-{}", rng.gen_range(0..20)))
                    } else {
                        ("device_id", format!("dv-{person}"))
                    },
                ];
                ev(i, rng.gen_range(0..1_000_000), ids)
            })
            .collect();
        let want = single_instance_result(&events, &rules);
        let (cluster, run) = simulate(&events, 12, 42, 0.05, &rules);
        let got = sharded_result(&cluster);
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "sharded result differs from the single instance"
        );
        // A merge is a hook: identifiers that are not roots at the end.
        let identifiers = cluster.identifiers().count() as u64;
        let merges = identifiers - got.len() as u64;
        let stitching: u64 = ["union", "meet", "hook", "absorb"]
            .iter()
            .map(|k| run.by_kind.get(k).copied().unwrap_or(0))
            .sum();
        println!(
            "scaleout: {} events over 12 shards: {} messages handled ({:.1} per event: {:?}), {} redelivered \
             after crashes; {identifiers} identifiers, {} components, {merges} merges, {:.1} union/meet/hook/absorb \
             messages per merge",
            events.len(),
            run.messages,
            run.messages as f64 / events.len() as f64,
            run.by_kind,
            run.redeliveries,
            got.len(),
            stitching as f64 / merges.max(1) as f64
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Any number of shards, any interleaving, lost steps redelivered: the same components and the
        /// same profiles as one instance.
        #[test]
        fn sharded_stitching_converges_to_the_single_instance(
            events in arb_events(),
            shards in 1u32..16,
            seed in any::<u64>(),
            crash in 0.0f64..0.3,
        ) {
            let rules = Rules::unlimited();
            let (cluster, _) = simulate(&events, shards, seed, crash, &rules);
            prop_assert_eq!(sharded_result(&cluster), single_instance_result(&events, &rules));
            // Every non-root points at a smaller identifier: no cycles.
            for shard in &cluster.shards {
                for (x, p) in &shard.parent {
                    prop_assert!(p <= x);
                }
            }
        }
    }
}
