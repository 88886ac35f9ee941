//! The deterministic simulation of the owner protocol: N shards, messages delivered in a random order
//! (any message in flight may be next), steps lost before their commit and handled again, events and
//! commands (erase, unlink) fed in while the protocol runs. Guardrails on: type limits, profile size,
//! shared identifiers, consent refusals. At the end every shard must be quiet, every identifier in exactly
//! one shard's graph with its home's directory pointing there, and the result equal to one classic
//! instance replaying the same steps in the order they were applied.
//!
//! `SIM_TRACE='e0041|device_id-0"'` prints every message handled whose debug form contains one of the
//! `|`-separated strings (the first failing case proptest replays comes first in the output).
//! After every message, no profile id is live at one shard while any shard keeps a redirect from it, and
//! every directory entry is at its identifier's home (what a restore checks the changelog against).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;
use crate::config::GuardrailConfig;
use crate::model::ConsentChange;
use crate::scaleout::state::tests::{compacted, dump, restore_onto};
use crate::scaleout::state::{
    key, local_only, misplaced, ShardRead, DIR, FIRST_PLACEMENT, GEN, INDEX, NODE, PROFILE,
    REDIRECT, REDIRECTED_FROM,
};
use crate::stitch::{MemStore, Rules};
use crate::store::{decode_identifier, decode_value};

/// One shard's state in memory.
type MemKv = BTreeMap<Vec<u8>, Vec<u8>>;

/// Changelog records: key and value (`None`: a tombstone).
type Log = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The records of one kind of a shard: (rest of the key, value).
fn records(kv: &MemKv, shard: ShardId, kind: u8) -> Vec<(&[u8], &[u8])> {
    let prefix = key(shard, kind, &[]);
    kv.range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (&k[prefix.len()..], v.as_slice()))
        .collect()
}

/// The placement counts a shard holds (identifiers placed more than once).
fn gens(kv: &MemKv, shard: ShardId) -> BTreeMap<Identifier, u32> {
    records(kv, shard, GEN)
        .into_iter()
        .map(|(k, v)| {
            let x = decode_identifier(k).expect("identifier");
            (x, decode_value(v, "t", "gen").expect("gen"))
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Input {
    Event(Event),
    Erase(Identifier),
    /// A profile by the id a profile starting with this event would have (live, retired or never).
    EraseProfile(ProfileId),
    Unlink(Identifier, Identifier),
}

fn rules() -> Rules {
    Rules::new(&GuardrailConfig {
        limits: [("customer_id", 1), ("email", 2), ("anonymous_id", 4)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        max_profile_identifiers: 7,
        shared_limits: [("device_id".to_string(), 2)].into_iter().collect(),
        owner_types: vec!["customer_id".into(), "email".into()],
        ..GuardrailConfig::default()
    })
}

fn identifier(k: usize, v: u8) -> Identifier {
    let kind = ["anonymous_id", "email", "device_id", "customer_id"][k];
    Identifier::new(kind, format!("{kind}-{v}"))
}

fn event(n: usize, ts: i64, ids: &[Identifier], refuses: bool) -> Event {
    let channel = ["web", "app", "pos", "email"][n % 4];
    Event {
        consent: refuses.then_some(ConsentChange {
            cross_channel: Some(false),
            email_marketing: None,
        }),
        ..Event::new(format!("e{n:04}"), channel, "page_view", ts, ids.to_vec())
    }
}

/// Events over a small universe of identifiers (merges, limits and shared devices are frequent), some
/// refusing cross-channel identification, some repeated, with erase and unlink commands among them.
fn arb_inputs() -> impl Strategy<Value = Vec<Input>> {
    let id = (0usize..4, 0u8..10).prop_map(|(k, v)| identifier(k, v));
    let ev = (prop::collection::vec(id.clone(), 1..4), 0i64..1000, 0u8..20);
    let input = prop_oneof![
        12 => ev.prop_map(|(ids, ts, c)| (0u8, ids, ts, c)),
        1 => id.clone().prop_map(|x| (1u8, vec![x], 0, 0)),
        1 => (id.clone(), id).prop_map(|(a, b)| (2u8, vec![a, b], 0, 0)),
        1 => any::<u8>().prop_map(|k| (3u8, vec![], 0, k)),
    ];
    prop::collection::vec(input, 1..60).prop_map(|raw| {
        let mut out = Vec::new();
        for (n, (kind, ids, ts, c)) in raw.into_iter().enumerate() {
            out.push(match kind {
                0 => Input::Event(event(n, ts, &ids, c == 0)),
                1 => Input::Erase(ids[0].clone()),
                2 => Input::Unlink(ids[0].clone(), ids[1].clone()),
                _ => {
                    let events: Vec<&Event> = out
                        .iter()
                        .filter_map(|i| match i {
                            Input::Event(e) => Some(e),
                            _ => None,
                        })
                        .collect();
                    match events.get(usize::from(c) % events.len().max(1)) {
                        Some(e) => Input::EraseProfile(Profile::new(e, &Default::default()).id()),
                        None => continue,
                    }
                }
            });
            // A repeated event: dropped at its entry shard.
            if c == 1 && kind == 0 {
                if let Some(Input::Event(e)) =
                    out.iter().rev().find(|i| matches!(i, Input::Event(_)))
                {
                    out.push(Input::Event(e.clone()));
                }
            }
        }
        out
    })
}

/// Prints a message handled at shard `to` if `SIM_TRACE` names it (see the module's documentation).
fn trace(to: ShardId, msg: &Msg) {
    if let Ok(t) = std::env::var("SIM_TRACE") {
        let text = format!("{msg:?}");
        if t.split('|').any(|t| text.contains(t)) {
            eprintln!("@{to} {text}");
        }
    }
}

/// Which message is delivered next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// Any message in flight ([`Sim::step`]).
    AnyNext,
    /// Shards held by one to three instances, dealt again at random now and then (a rebalance); an
    /// instance handles what it sends its own shards to the end ([`Sim::step_instance`]).
    Instances,
}

struct Sim {
    shards: Vec<MemKv>,
    stitcher: Stitcher,
    in_flight: Vec<(ShardId, Msg)>,
    steps: Vec<Step>,
    handled: u64,
    by_kind: BTreeMap<&'static str, u64>,
    /// Messages sent to another shard than the sender's: hops between instances when shards are spread.
    between: u64,
    /// When set, what each message handled changed (but the event ids, which the simulation does not
    /// pack in `E` records; no step may be lost): the changelog a version before wrote. This version's
    /// leaves out the `local_only` records.
    log: Option<Log>,
}

impl Sim {
    fn new(n: ShardId) -> Self {
        Self {
            shards: (0..n).map(|_| MemKv::new()).collect(),
            // With the ground truth's traits: the comparison covers the story and computed traits.
            stitcher: Stitcher::new(rules()).with_enrichment(std::sync::Arc::new(
                toml::from_str::<crate::config::Config>(crate::journeys::TRUTH_TRAITS)
                    .expect("traits")
                    .enrichment,
            )),
            in_flight: Vec::new(),
            steps: Vec::new(),
            handled: 0,
            by_kind: BTreeMap::new(),
            between: 0,
            log: None,
        }
    }

    fn n(&self) -> ShardId {
        self.shards.len() as ShardId
    }

    fn feed(&mut self, input: Input) {
        let n = self.n();
        let (to, msg) = match input {
            Input::EraseProfile(id) => {
                for s in 0..n {
                    self.in_flight.push((
                        s,
                        Msg::EraseProfile {
                            id: id.clone(),
                            trigger: "t".into(),
                        },
                    ));
                }
                return;
            }
            Input::Event(ev) => (entry_shard(&ev, n), Msg::Event(Box::new(ev))),
            Input::Erase(x) => (
                home(&x, n),
                Msg::Erase {
                    x,
                    at_owner: None,
                    trigger: "t".into(),
                    suppress: None,
                },
            ),
            Input::Unlink(a, b) => (
                home(&a, n),
                Msg::Unlink {
                    a,
                    b,
                    at_owner: None,
                    trigger: "t".into(),
                },
            ),
        };
        self.in_flight.push((to, msg));
    }

    /// Handles `msg` at shard `to`.
    fn handle(&mut self, to: ShardId, msg: Msg) -> Out {
        let mut out = Out::default();
        let shards = self.n();
        let before = self.log.as_ref().map(|_| self.shards[to as usize].clone());
        let mut view = ShardView {
            kv: &mut self.shards[to as usize],
            shard: to,
        };
        Shard {
            view: &mut view,
            shards,
            suppression: None,
        }
        .handle(&self.stitcher, msg, &mut out)
        .expect("in-memory state cannot fail");
        self.check_redirects();
        self.check_derived(to);
        if let (Some(log), Some(before)) = (&mut self.log, before) {
            let after = &self.shards[to as usize];
            let keys: BTreeSet<&Vec<u8>> = before.keys().chain(after.keys()).collect();
            log.extend(
                keys.into_iter()
                    .filter(|k| before.get(*k) != after.get(*k) && k.get(4) != Some(&b'f'))
                    .map(|k| (k.clone(), after.get(k).cloned())),
            );
        }
        out
    }

    /// Delivers one message in flight, chosen at random; with probability `loss` the step is lost before
    /// its commit (state and effects discarded) and the message stays in flight.
    fn step(&mut self, rng: &mut impl Rng, loss: f64) {
        let i = rng.gen_range(0..self.in_flight.len());
        let (to, msg) = self.in_flight.swap_remove(i);
        if rng.gen_bool(loss) {
            let before = self.shards[to as usize].clone();
            self.handle(to, msg.clone());
            self.shards[to as usize] = before;
            self.in_flight.push((to, msg));
            return;
        }
        self.handled += 1;
        trace(to, &msg);
        *self.by_kind.entry(msg.kind()).or_default() += 1;
        let mut out = self.handle(to, msg);
        out.msgs.append(&mut out.deferred);
        self.between += out.msgs.iter().filter(|(s, _)| *s != to).count() as u64;
        self.in_flight.append(&mut out.msgs);
        self.steps.append(&mut out.steps);
    }

    /// Handles the oldest message for one shard the way an instance does: it and everything it sends to
    /// shards the same instance holds, to the end, before anything else (`Engine::deliver`); messages for
    /// other instances' shards wait in flight. Lost with probability `loss`: the instance's shards and the
    /// message are as before.
    fn step_instance(&mut self, rng: &mut impl Rng, holder: &[usize], loss: f64) {
        let shard = self.in_flight[rng.gen_range(0..self.in_flight.len())].0;
        let at = self
            .in_flight
            .iter()
            .position(|(s, _)| *s == shard)
            .expect("a message for the shard");
        let first = self.in_flight.remove(at);
        let mine = |s: ShardId| holder[s as usize] == holder[shard as usize];
        let lost = rng.gen_bool(loss);
        let before: Vec<(usize, MemKv)> = if lost {
            (0..self.shards.len())
                .filter(|s| mine(*s as ShardId))
                .map(|s| (s, self.shards[s].clone()))
                .collect()
        } else {
            Vec::new()
        };
        let (mut sent, mut steps, mut handled) = (Vec::new(), Vec::new(), 0u64);
        let mut queue = std::collections::VecDeque::from([first.clone()]);
        while let Some((to, msg)) = queue.pop_front() {
            handled += 1;
            trace(to, &msg);
            // Where `Engine::deliver` would give up handling them here.
            assert!(
                handled < crate::engine::LOCAL_STEPS_MAX as u64,
                "an instance never finishes one message: {} handled, last {msg:?} at {to}",
                handled
            );
            *self.by_kind.entry(msg.kind()).or_default() += u64::from(!lost);
            let mut out = self.handle(to, msg);
            steps.append(&mut out.steps);
            for (s, m) in out.msgs {
                if mine(s) {
                    queue.push_back((s, m));
                } else {
                    sent.push((s, m));
                }
            }
            sent.append(&mut out.deferred);
        }
        if lost {
            for (s, kv) in before {
                self.shards[s] = kv;
            }
            self.in_flight.insert(at, first);
            return;
        }
        self.handled += handled;
        self.between += sent.len() as u64;
        self.in_flight.append(&mut sent);
        self.steps.append(&mut steps);
    }

    /// Writes `Owned(0, gen)` for every identifier in shard 0's graph, as the version before stored it with
    /// one shard; returns those identifiers.
    fn write_owned_entries(&mut self) -> BTreeSet<Identifier> {
        let gens = gens(&self.shards[0], 0);
        let placed: Vec<(Identifier, u32)> = records(&self.shards[0], 0, NODE)
            .into_iter()
            .map(|(k, _)| {
                let x = decode_identifier(k).expect("identifier");
                let gen = gens.get(&x).copied().unwrap_or(FIRST_PLACEMENT);
                (x, gen)
            })
            .collect();
        let mut view = ShardView {
            kv: &mut self.shards[0],
            shard: 0,
        };
        for (x, gen) in &placed {
            view.set_dir(x, Some(&Dir::Owned(0, *gen)))
                .expect("in-memory state cannot fail");
        }
        placed.into_iter().map(|(x, _)| x).collect()
    }

    /// Feeds `inputs` in while delivering messages, until nothing is in flight.
    fn run(&mut self, inputs: Vec<Input>, schedule: Schedule, seed: u64, loss: f64) {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut inputs = inputs.into_iter().peekable();
        let n = self.shards.len();
        let mut holder: Vec<usize> = vec![0; n];
        let mut budget = 1_000_000u32;
        while inputs.peek().is_some() || !self.in_flight.is_empty() {
            budget -= 1;
            assert!(
                budget > 0,
                "no progress: {} in flight",
                self.in_flight.len()
            );
            if schedule == Schedule::Instances && rng.gen_bool(0.05) {
                let instances = rng.gen_range(1..=3);
                holder = (0..n).map(|_| rng.gen_range(0..instances)).collect();
            }
            if self.in_flight.is_empty() || (inputs.peek().is_some() && rng.gen_bool(0.3)) {
                if let Some(input) = inputs.next() {
                    self.feed(input);
                }
                continue;
            }
            match schedule {
                Schedule::AnyNext => self.step(&mut rng, loss),
                Schedule::Instances => self.step_instance(&mut rng, &holder, loss),
            }
        }
    }

    /// Every shard quiet; every identifier in one graph, its home's directory naming that shard with the
    /// count of placements the shard holds for it (no record: placed once). With one shard the graph is
    /// the directory: no entry, unless `legacy` has the identifier (an `Owned` entry written before).
    fn check_placement(&self) {
        self.check_placement_over(&BTreeSet::new());
    }

    fn check_placement_over(&self, legacy: &BTreeSet<Identifier>) {
        let n = self.n();
        let mut placed: BTreeMap<Identifier, (ShardId, u32)> = BTreeMap::new();
        let mut stuck = Vec::new();
        for (s, kv) in self.shards.iter().enumerate() {
            let s = s as ShardId;
            let reserved: Vec<Identifier> = records(kv, s, DIR)
                .into_iter()
                .filter(|(_, v)| matches!(decode_value(v, "t", "dir"), Ok(Dir::Reserved { .. })))
                .map(|(k, _)| decode_identifier(k).expect("identifier"))
                .collect();
            let waiting: Vec<&str> = [PENDING, WAITING, PARKED, PARKED_BEHIND]
                .into_iter()
                .flat_map(|kind| records(kv, s, kind))
                .filter_map(|(k, _)| std::str::from_utf8(k).ok())
                .collect();
            if !(waiting.is_empty() && reserved.is_empty()) {
                let parked: Vec<Vec<Msg>> = records(kv, s, PARKED)
                    .into_iter()
                    .map(|(_, v)| decode_value(v, "t", "parked").expect("parked"))
                    .collect();
                let pending: Vec<String> = records(kv, s, PENDING)
                    .into_iter()
                    .map(|(_, v)| {
                        let p: Pending = decode_value(v, "t", "pending").expect("pending");
                        format!(
                            "{}: missing {:?} found {:?}",
                            p.ev.event_id, p.missing, p.found
                        )
                    })
                    .collect();
                stuck.push(format!(
                    "shard {s}: {waiting:?}, reserved {reserved:?}, parked {parked:?}, pending {pending:?}"
                ));
            }
            let profiles = self.profiles(s);
            let gens = gens(kv, s);
            for (k, v) in records(kv, s, NODE) {
                let x = decode_identifier(k).expect("identifier");
                let node: NodeId = decode_value(v, "t", "node").expect("node");
                assert!(
                    profiles[&node].identifiers.contains_key(&x),
                    "{x} points at a profile without it"
                );
                let gen = gens.get(&x).copied().unwrap_or(FIRST_PLACEMENT);
                assert!(
                    placed.insert(x.clone(), (s, gen)).is_none(),
                    "{x} in two shards"
                );
            }
            for p in profiles.values() {
                assert_eq!(self.stitcher.rules().violation(p), None);
            }
        }
        assert!(stuck.is_empty(), "still waiting:\n{}", stuck.join("\n"));
        for (x, (s, gen)) in &placed {
            let h = home(x, n);
            let read = ShardRead {
                kv: &self.shards[h as usize],
                shard: h,
            };
            let dir: Option<Dir> = read.dir(x).expect("read");
            // One shard: the graph is the directory, and an identifier in it has no entry.
            assert!(
                if n == 1 {
                    dir.is_none()
                        || legacy.contains(x) && matches!(dir, Some(Dir::Owned(0, g)) if g == *gen)
                } else {
                    matches!(dir, Some(Dir::Owned(o, g)) if o == *s && g == *gen)
                },
                "directory of {x}: {dir:?}, placed at {s} for the {gen}th time"
            );
        }
    }

    /// As in one store, a live profile id redirects nowhere: a redirect from it kept at any shard would send
    /// the ids retired into it elsewhere (docs/DESIGN.md, *Splits*: a retired id comes back where its
    /// redirect is). Checked after every message, since a later erasure can hide it at the end.
    fn check_redirects(&self) {
        let n = self.n();
        let live: BTreeMap<&[u8], usize> = (0..n as usize)
            .flat_map(|s| {
                records(&self.shards[s], s as ShardId, INDEX)
                    .into_iter()
                    .map(move |(k, _)| (k, s))
            })
            .collect();
        for s in 0..n as usize {
            for (k, _) in records(&self.shards[s], s as ShardId, REDIRECT) {
                assert!(
                    !live.contains_key(k),
                    "profile {} live at shard {} and redirected at shard {s}",
                    String::from_utf8_lossy(k),
                    live[k]
                );
            }
        }
    }

    /// A shard's nodes, profile-id index and lists of ids redirecting to a profile are exactly what its
    /// profiles and redirects say (docs/DESIGN.md, "Indexes derived, not logged"): an identifier has a
    /// node iff a profile there holds it, a profile id is indexed iff a profile there has it, and a
    /// profile's list holds the ids that redirect to it. Checked after every message, as the restore
    /// derives them from the profile and redirect records at any transaction's end.
    fn check_derived(&self, s: ShardId) {
        let kv = &self.shards[s as usize];
        let profile_id = |k: &[u8]| ProfileId(String::from_utf8(k.to_vec()).expect("profile id"));
        let nodes: BTreeMap<Identifier, NodeId> = records(kv, s, NODE)
            .into_iter()
            .map(|(k, v)| {
                let x = decode_identifier(k).expect("identifier");
                (x, decode_value(v, "t", "node").expect("node"))
            })
            .collect();
        let index: BTreeMap<ProfileId, NodeId> = records(kv, s, INDEX)
            .into_iter()
            .map(|(k, v)| (profile_id(k), decode_value(v, "t", "index").expect("index")))
            .collect();
        let count = self.shards.len() as ShardId;
        for (k, _) in records(kv, s, DIR) {
            let misplaced = misplaced(&key(s, DIR, k), None, s as i32, count);
            assert_eq!(
                misplaced, None,
                "shard {s}: a directory entry away from home"
            );
        }
        let profiles = self.profiles(s);
        let held: BTreeMap<Identifier, NodeId> = profiles
            .iter()
            .flat_map(|(n, p)| p.identifiers.keys().map(|x| (x.clone(), *n)))
            .collect();
        let ids: BTreeMap<ProfileId, NodeId> = profiles.iter().map(|(n, p)| (p.id(), *n)).collect();
        assert_eq!(nodes, held, "shard {s}: nodes not those its profiles hold");
        assert_eq!(
            index.len(),
            profiles.len(),
            "shard {s}: two profiles with one id"
        );
        assert_eq!(index, ids, "shard {s}: index not its profiles' ids");
        let mut inverse: BTreeMap<ProfileId, Vec<ProfileId>> = BTreeMap::new();
        for (k, v) in records(kv, s, REDIRECT) {
            let to: ProfileId = decode_value(v, "t", "redirect").expect("redirect");
            inverse.entry(to).or_default().push(profile_id(k));
        }
        let lists: BTreeMap<ProfileId, Vec<ProfileId>> = records(kv, s, REDIRECTED_FROM)
            .into_iter()
            .map(|(k, v)| {
                let list = decode_value(v, "t", "redirected from").expect("list");
                (profile_id(k), list)
            })
            .collect();
        assert_eq!(
            lists, inverse,
            "shard {s}: ids redirecting here not the redirects' inverse"
        );
    }

    fn profiles(&self, s: ShardId) -> BTreeMap<NodeId, Profile> {
        records(&self.shards[s as usize], s, PROFILE)
            .into_iter()
            .map(|(k, v)| {
                let node = NodeId(u64::from_be_bytes(k.try_into().expect("node key")));
                (node, decode_value(v, "t", "profile").expect("profile"))
            })
            .collect()
    }

    fn merged(&self) -> MemStore {
        let mut all = MemStore::default();
        let mut next = 0;
        for s in 0..self.n() {
            for p in self.profiles(s).into_values() {
                next += 1;
                for x in p.identifiers.keys() {
                    all.nodes.insert(x.clone(), NodeId(next));
                }
                all.profiles.insert(NodeId(next), Box::new(p));
            }
        }
        all
    }
}

/// The same steps, in the order they were applied, on one classic store.
fn replay(stitcher: &Stitcher, steps: &[Step]) -> (MemStore, Vec<Step>) {
    let mut store = MemStore::default();
    let mut outcomes = Vec::new();
    for step in steps {
        outcomes.push(match step {
            Step::Event(ev, _) => {
                let Ok(a) = stitcher.apply(&mut store, ev);
                Step::Event(ev.clone(), a)
            }
            Step::Erase(x, t, _) => {
                let Ok(r) = stitcher.erase_identifier(&mut store, x);
                Step::Erase(x.clone(), t.clone(), r)
            }
            Step::EraseProfile(id, t, _) => {
                let Ok(r) = stitcher.erase_profile(&mut store, id);
                Step::EraseProfile(id.clone(), t.clone(), r)
            }
            Step::Unlink(a, b, t, _) => {
                let Ok(r) = stitcher.unlink(&mut store, a, b);
                Step::Unlink(a.clone(), b.clone(), t.clone(), r)
            }
            Step::Unsuppress(t, listed) => Step::Unsuppress(t.clone(), *listed),
        });
    }
    (store, outcomes)
}

/// What must be equal between the shards and one instance: the refusals, retired ids and splits of each
/// step, by public ids (node numbers are local to a store).
fn visible(step: &Step) -> String {
    match step {
        Step::Event(ev, a) => format!(
            "{} {:?}",
            ev.event_id,
            a.as_ref().map(|a| (
                a.created,
                &a.retired,
                &a.refused,
                a.reshape.erased.clone(),
                a.reshape
                    .splits
                    .iter()
                    .map(|s| (&s.from, s.into.len()))
                    .collect::<Vec<_>>(),
                a.reshape.quarantined.len()
            ))
        ),
        Step::EraseProfile(id, _, r) => format!("{id} {:?} {}", r.erased, r.identifiers_erased),
        Step::Unsuppress(t, listed) => format!("unsuppress {t} {listed}"),
        Step::Erase(x, _, r) | Step::Unlink(x, _, _, r) => format!(
            "{x} {:?} {} {} {:?}",
            r.erased,
            r.identifiers_erased,
            r.links_removed,
            r.splits
                .iter()
                .map(|s| (&s.from, s.into.len()))
                .collect::<Vec<_>>()
        ),
    }
}

fn canonical(store: &MemStore) -> BTreeMap<ProfileId, Profile> {
    store
        .by_public_id()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect()
}

fn check(inputs: Vec<Input>, n: ShardId, schedule: Schedule, seed: u64, loss: f64) -> Sim {
    let mut sim = Sim::new(n);
    let events = event_ids(&inputs);
    sim.run(inputs, schedule, seed, loss);
    sim.check_placement();
    equals_one_instance(&sim, events);
    sim
}

fn event_ids(inputs: &[Input]) -> BTreeSet<String> {
    inputs
        .iter()
        .filter_map(|i| match i {
            Input::Event(e) => Some(e.event_id.clone()),
            _ => None,
        })
        .collect()
}

/// Every event applied once, and the shards' result equal to one instance replaying their steps.
fn equals_one_instance(sim: &Sim, events: BTreeSet<String>) {
    // Counted, not collected: a repeat entering at another shard than its first copy would be applied
    // twice.
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    for s in &sim.steps {
        if let Step::Event(e, _) = s {
            *applied.entry(e.event_id.clone()).or_default() += 1;
        }
    }
    assert_eq!(
        applied,
        events.into_iter().map(|e| (e, 1)).collect(),
        "every event applied once"
    );
    let (one, outcomes) = replay(&sim.stitcher, &sim.steps);
    for (mine, theirs) in sim.steps.iter().zip(&outcomes) {
        assert_eq!(visible(mine), visible(theirs));
    }
    let merged = sim.merged();
    assert_eq!(merged.partition(), one.partition());
    assert_eq!(canonical(&merged), canonical(&one));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        crate::env_or("PROPTEST_CASES", 200)
    ))]

    /// An event enters at the shard of its first `Locate`: entering costs no hop of its own.
    #[test]
    fn an_event_enters_where_its_first_locate_goes(
        ids in prop::collection::vec((0usize..4, 0u8..10).prop_map(|(k, v)| identifier(k, v)), 1..4),
        n in 1u32..9,
    ) {
        let ev = event(1, 1, &ids, false);
        let first = &locate_order(&ev, n, false)[0];
        prop_assert_eq!(entry_shard(&ev, n), home(first, n));
    }

    /// Any number of shards, any delivery order, lost steps: the result of one instance applying the same
    /// steps in the same order, with every guardrail, consent, erasure and unlink.
    #[test]
    fn shards_equal_one_instance_replaying_the_same_order(
        inputs in arb_inputs(),
        n in 1u32..9,
        seed in any::<u64>(),
        loss in 0.0f64..0.3,
    ) {
        check(inputs, n, Schedule::AnyNext, seed, loss);
    }

    /// One shard over a state the version before wrote (every placed identifier with `Owned(0, gen)`),
    /// run on in any order: the same result as one instance, and each old entry still `Owned(0, gen)` or
    /// gone (docs/DESIGN.md, "One shard: the graph is the directory").
    #[test]
    fn one_shard_runs_on_over_a_state_with_owned_entries(
        inputs in arb_inputs(),
        split in 0usize..64,
        seed in any::<u64>(),
        loss in 0.0f64..0.3,
    ) {
        let events = event_ids(&inputs);
        let mut rest = inputs;
        let first: Vec<Input> = rest.drain(..split.min(rest.len())).collect();
        let mut sim = Sim::new(1);
        sim.run(first, Schedule::AnyNext, seed, loss);
        let legacy = sim.write_owned_entries();
        sim.run(rest, Schedule::AnyNext, seed.wrapping_add(1), loss);
        sim.check_placement_over(&legacy);
        equals_one_instance(&sim, events);
    }

    /// The same with shards held by instances that are dealt shards again now and then, each handling
    /// what it sends its own shards to the end before reading on: no message makes an instance spin.
    #[test]
    fn instances_finish_every_message_and_equal_one_instance(
        inputs in arb_inputs(),
        n in 2u32..9,
        seed in any::<u64>(),
        loss in 0.0f64..0.3,
    ) {
        check(inputs, n, Schedule::Instances, seed, loss);
    }
}

/// The sharded state of `shards` (all of them in one map, as one store holds them), without the event
/// ids: the simulation writes them unpacked, and the restore of their `E` records is tested on its own
/// (`state::tests::event_ids_restored_equal_event_ids_written`).
fn without_event_ids<'a>(shards: impl IntoIterator<Item = &'a MemKv>) -> MemKv {
    shards
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.get(4) != Some(&b'f'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A store holding `state`, then restored from `log` in chunks of `chunk` records.
fn restored(state: &MemKv, log: &[(Vec<u8>, Option<Vec<u8>>)], chunk: usize) -> MemKv {
    let t = crate::store::TempStore::new().expect("store");
    t.store
        .write_shard_changes(state.iter().map(|(k, v)| (k, Some(v))), [])
        .expect("write");
    restore_onto(&t.store, log, chunk);
    dump(&t.store)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        crate::env_or("PROPTEST_CASES", 64)
    ))]

    /// docs/DESIGN.md, "Indexes derived, not logged": the changelog records of the simulation's steps
    /// (each message handled a transaction, without the node, index and redirect-list records) restore
    /// the state the steps wrote, those records included: whole, compacted, and onto a local copy written
    /// part of the way, from there, in chunks of any size. So does a changelog a version before wrote
    /// (with those records), whole, compacted, and followed by this version's (an upgrade).
    #[test]
    fn indexes_restored_equal_those_written(
        inputs in arb_inputs(),
        n in 1u32..5,
        split in 0usize..64,
        seed in any::<u64>(),
        chunk in 1usize..40,
    ) {
        let mut rest = inputs;
        let first: Vec<Input> = rest.drain(..split.min(rest.len())).collect();
        let mut sim = Sim::new(n);
        sim.log = Some(Vec::new());
        sim.run(first, Schedule::AnyNext, seed, 0.0);
        let midway = without_event_ids(&sim.shards);
        let from = sim.log.as_ref().map_or(0, Vec::len);
        sim.run(rest, Schedule::AnyNext, seed.wrapping_add(1), 0.0);
        let before = sim.log.take().unwrap_or_default();
        let now: Log = before.iter().filter(|(k, _)| !local_only(k)).cloned().collect();
        let from_now = before[..from].iter().filter(|(k, _)| !local_only(k)).count();
        prop_assert!(now
            .iter()
            .all(|(k, _)| !matches!(k.get(4), Some(&(NODE | INDEX | REDIRECTED_FROM)))));
        let upgrade: Log = before[..from].iter().chain(&now[from_now..]).cloned().collect();
        let written = without_event_ids(&sim.shards);
        for log in [&now, &before, &upgrade] {
            prop_assert_eq!(&restored(&MemKv::new(), log, chunk), &written);
            prop_assert_eq!(&restored(&MemKv::new(), &compacted(log, false), chunk), &written);
        }
        prop_assert_eq!(&restored(&midway, &compacted(&now[from_now..], true), chunk), &written);
    }
}

/// A larger fixed-seed run, with the protocol's cost per event. `SIM_SEED` picks another delivery order
/// (7 unless set): a change to the protocol's cost is judged over several seeds, not one.
#[test]
fn fixed_seed_run_and_its_cost() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let mut inputs = Vec::new();
    for round in 0..20 {
        for input in arb_inputs()
            .new_tree(&mut runner)
            .expect("inputs")
            .current()
        {
            inputs.push(match input {
                // Event ids unique across rounds (repeats within a round stay repeats).
                Input::Event(mut e) => {
                    e.event_id = format!("r{round:02}-{}", e.event_id);
                    Input::Event(e)
                }
                other => other,
            });
        }
    }
    let events = inputs
        .iter()
        .filter(|i| matches!(i, Input::Event(_)))
        .count();
    let seed = crate::env_or("SIM_SEED", 7);
    let schedule = if std::env::var("SIM_INSTANCES").is_ok() {
        Schedule::Instances
    } else {
        Schedule::AnyNext
    };
    let sim = check(inputs, 12, schedule, seed, 0.1);
    println!(
        "seed {seed}: {events} inputs over 12 shards: {} messages, {:.1} per event, {:.1} of them between shards; {:?}",
        sim.handled,
        sim.handled as f64 / events as f64,
        sim.between as f64 / events as f64,
        sim.by_kind
    );
}

/// A `Locate` sent by the version before this one took the event's scoped copies along without
/// `scoped` (it reserved the absent ones): the copies it reserved are released, and the event is applied.
#[test]
fn a_locate_that_took_the_scoped_copies_along_leaves_no_reservation() {
    for n in [1, 3] {
        let mut sim = Sim::new(n);
        let ev = event(1, 1, &[identifier(1, 1), identifier(2, 2)], false);
        let ids = locate_order(&ev, n, true);
        assert_eq!(ids.len(), 2 * ev.identifiers.len());
        let msg = Msg::Locate {
            ev: Box::new(ev),
            ids: ids.clone(),
            next: 0,
            found: vec![],
            scoped: false,
        };
        sim.in_flight.push((home(&ids[0], n), msg));
        sim.run(vec![], Schedule::AnyNext, 7, 0.0);
        sim.check_placement();
        assert_eq!(sim.steps.len(), 1, "applied once");
    }
}

/// A `Gather` sent to a shard whose component left after the `Locate` read the directory follows the
/// component (one more `Gather`, to where it went) instead of fetching it back: it moves once, and the
/// event is applied where it is.
#[test]
fn a_gather_for_a_component_that_moved_on_follows_it() {
    let n = 3;
    let mut sim = Sim::new(n);
    let a = identifier(1, 1);
    sim.run(
        vec![Input::Event(event(1, 1, std::slice::from_ref(&a), false))],
        Schedule::AnyNext,
        1,
        0.0,
    );
    let holder = |sim: &mut Sim| -> ShardId {
        let holders: Vec<ShardId> = (0..n)
            .filter(|s| {
                let view = ShardView {
                    kv: &mut sim.shards[*s as usize],
                    shard: *s,
                };
                view.read().node_of(&a).expect("read").is_some()
            })
            .collect();
        assert_eq!(holders.len(), 1, "{a} in one shard");
        holders[0]
    };
    let from = holder(&mut sim);
    let to = (from + 1) % n;
    // Another event's target takes the component away.
    sim.in_flight.push((
        from,
        Msg::Fetch {
            x: a.clone(),
            to,
            event: "e-other".into(),
            after: 0,
        },
    ));
    sim.run(vec![], Schedule::AnyNext, 2, 0.0);
    assert_eq!(holder(&mut sim), to);
    let moves = sim.by_kind.get("component").copied().unwrap_or(0);

    // An event located `a` at its old owner before it moved.
    let ev = event(2, 2, std::slice::from_ref(&a), false);
    let msg = Msg::Gather {
        ev: Box::new(ev),
        found: vec![(a.clone(), Found::Owned(from))],
    };
    sim.in_flight.push((from, msg));
    sim.step(&mut rand::rngs::SmallRng::seed_from_u64(3), 0.0);
    assert!(
        matches!(sim.in_flight.as_slice(), [(s, Msg::Gather { found, .. })]
            if *s == to && matches!(found.as_slice(), [(x, Found::Followed(t, _))] if *x == a && *t == to)),
        "followed the component: {:?}",
        sim.in_flight
    );
    sim.run(vec![], Schedule::AnyNext, 4, 0.0);
    sim.check_placement();
    assert_eq!(holder(&mut sim), to, "applied where the component is");
    assert_eq!(
        sim.by_kind.get("component").copied().unwrap_or(0),
        moves,
        "not moved back"
    );
    assert_eq!(sim.steps.len(), 2, "both events applied once");
}

proptest! {
    /// The locate order is the event's identifiers (and, scoped, their scoped copies) once each, by home
    /// and then identifier, whatever order and repetition the event carries them in.
    #[test]
    fn the_locate_order_is_by_home_then_identifier(
        ids in prop::collection::vec((0usize..4, 0u8..10), 0..6),
        shards in 1u32..5,
        scoped in any::<bool>(),
    ) {
        let ids: Vec<Identifier> = ids.into_iter().map(|(k, v)| identifier(k, v)).collect();
        // As carried, not as `Event::new` orders them.
        let ev = Event { identifiers: ids, ..event(1, 1, &[], false) };
        let mut want: BTreeSet<Identifier> = ev.identifiers.iter().cloned().collect();
        if scoped {
            want.extend(ev.identifiers.iter().map(|x| x.scoped(&ev.channel)));
        }
        let mut want: Vec<Identifier> = want.into_iter().collect();
        want.sort_by_key(|x| home(x, shards));
        prop_assert_eq!(locate_order(&ev, shards, scoped), want);
    }
}
