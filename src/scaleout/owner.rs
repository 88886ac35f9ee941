//! One engine for N shards: every component is kept whole at one shard, its owner, where the classic
//! [`Stitcher`] decides everything about it (limits, shared identifiers and their splits, consent sealing,
//! erasure, unlink) exactly as with one instance. Messages move components between shards when an event
//! joins components owned by different shards. docs/DESIGN.md, "One engine for N instances", has the
//! protocol, why it is correct and what it costs; the simulation below checks it.
//!
//! This module is the per-shard state machine ([`Shard::handle`]), free of IO: the graph of a shard is a
//! [`GraphStore`], messages in, messages and applied steps out.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{event_home, home, ShardId};
use crate::model::{Event, Identifier, NodeId, ProfileId};
use crate::profile::Profile;
use crate::stitch::{Applied, Evidence, MemStore, Reshape, Stitcher};

/// What `Locate` found for one identifier at its home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    /// The identifier's component is (or was last reported) at this shard.
    Owned(ShardId),
    /// The identifier is new; the event holds its reservation, at this gen.
    New(u32),
}

/// One identifier of a component in transit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: Identifier,
    pub links: Vec<(Identifier, Evidence)>,
    pub part: Option<Profile>,
    /// How many times the identifier has been placed (created or moved).
    pub gen: u32,
}

/// A whole component on its way from one shard to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub profile: Profile,
    pub members: Vec<Member>,
    /// Retired public ids redirecting to this profile's id.
    pub redirects: Vec<ProfileId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// A new event, at the home of its id.
    Event(Event),
    /// Find the owners of `ids` (sorted by home, then identifier), from `ids[next]` on, at its home.
    Locate {
        ev: Event,
        ids: Vec<Identifier>,
        next: usize,
        found: Vec<(Identifier, Found)>,
    },
    /// Apply `ev` here once the components of every identifier in `found` are here.
    Gather {
        ev: Event,
        found: Vec<(Identifier, Found)>,
    },
    /// Send the component of `x` to shard `to`, for event `event`.
    Fetch {
        x: Identifier,
        to: ShardId,
        event: String,
    },
    /// A component fetched for `event`.
    Component { event: String, piece: Box<Piece> },
    /// Directory update at the home of `x`: its component is at `owner` (`None`: it exists nowhere).
    Own {
        x: Identifier,
        owner: Option<ShardId>,
        gen: u32,
    },
    /// `x`, located for `event`, was erased meanwhile: the event starts again.
    Gone { x: Identifier, event: String },
    /// Erase an identifier: at its home, then at its owner (`at_owner`).
    Erase { x: Identifier, at_owner: bool },
    /// Remove the link between two identifiers: at the home of the first, then at its owner.
    Unlink {
        a: Identifier,
        b: Identifier,
        at_owner: bool,
    },
}

impl Msg {
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Event(_) => "event",
            Msg::Locate { .. } => "locate",
            Msg::Gather { .. } => "gather",
            Msg::Fetch { .. } => "fetch",
            Msg::Component { .. } => "component",
            Msg::Own { .. } => "own",
            Msg::Gone { .. } => "gone",
            Msg::Erase { .. } => "erase",
            Msg::Unlink { .. } => "unlink",
        }
    }
}

/// A change to the graph, applied at the shard that owns the components it touches, with the classic
/// stitcher's outcome: what the output and the simulation's one-instance replay are built from.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Event(Event, Option<Applied>),
    Erase(Identifier, Reshape),
    Unlink(Identifier, Identifier, Reshape),
}

/// What handling one message produced.
#[derive(Debug, Default)]
pub struct Out {
    pub msgs: Vec<(ShardId, Msg)>,
    pub steps: Vec<Step>,
    /// Events seen before (dropped at their home).
    pub duplicates: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Dir {
    Owned(ShardId, u32),
    /// An event that brings the identifier for the first time holds it; `waiting` resume once it is placed.
    Reserved {
        event: String,
        gen: u32,
        waiting: Vec<Msg>,
    },
    Absent(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    To(ShardId),
    Erased,
}

#[derive(Debug, Clone)]
struct Pending {
    ev: Event,
    found: BTreeMap<Identifier, Found>,
    /// Identifiers whose component is not here yet.
    missing: BTreeSet<Identifier>,
}

/// One shard: the components it owns, the directory of the identifiers homed here, forwarding pointers,
/// the dedup set of event ids homed here, events waiting for components, and parked messages.
#[derive(Debug, Clone, Default)]
pub struct Shard {
    pub id: ShardId,
    pub shards: ShardId,
    pub graph: MemStore,
    dir: BTreeMap<Identifier, Dir>,
    gens: HashMap<Identifier, u32>,
    moved: HashMap<Identifier, Moved>,
    seen: HashSet<String>,
    /// By event id: the smallest id is the highest priority.
    pending: BTreeMap<String, Pending>,
    parked: Vec<Msg>,
}

impl Shard {
    pub fn new(id: ShardId, shards: ShardId) -> Self {
        Self {
            id,
            shards,
            ..Self::default()
        }
    }

    /// Handles one message; everything it changes is in `self` and `out`.
    pub fn handle(&mut self, stitcher: &Stitcher, msg: Msg, out: &mut Out) {
        match msg {
            Msg::Event(ev) => self.event(ev, out),
            Msg::Locate {
                ev,
                ids,
                next,
                found,
            } => self.locate(ev, ids, next, found, out),
            Msg::Gather { ev, found } => self.gather(stitcher, ev, found, out),
            Msg::Fetch { x, to, event } => self.fetch(x, to, event, out),
            Msg::Component { event, piece } => self.component(stitcher, &event, *piece, out),
            Msg::Own { x, owner, gen } => self.own(stitcher, x, owner, gen, out),
            Msg::Gone { event, .. } => self.restart(stitcher, &event, out),
            Msg::Erase { x, at_owner } => self.erase(stitcher, x, at_owner, out),
            Msg::Unlink { a, b, at_owner } => self.unlink(stitcher, a, b, at_owner, out),
        }
    }

    /// Whether nothing waits here: no pending event, parked message or reservation.
    pub fn is_quiet(&self) -> bool {
        self.pending.is_empty()
            && self.parked.is_empty()
            && !self.dir.values().any(|d| matches!(d, Dir::Reserved { .. }))
    }

    /// The directory's owner of an identifier homed here.
    pub fn directory(&self, x: &Identifier) -> Option<ShardId> {
        match self.dir.get(x) {
            Some(Dir::Owned(s, _)) => Some(*s),
            _ => None,
        }
    }

    fn send(&self, out: &mut Out, to: ShardId, msg: Msg) {
        out.msgs.push((to, msg));
    }

    fn event(&mut self, ev: Event, out: &mut Out) {
        if !self.seen.insert(ev.event_id.clone()) {
            out.duplicates += 1;
            return;
        }
        self.start(ev, out);
    }

    /// Starts locating an event's identifiers, at the first home in order.
    fn start(&mut self, ev: Event, out: &mut Out) {
        let ids = locate_order(&ev, self.shards);
        match ids.first() {
            Some(first) => {
                let to = home(first, self.shards);
                let msg = Msg::Locate {
                    ev,
                    ids,
                    next: 0,
                    found: vec![],
                };
                self.send(out, to, msg);
            }
            // Nothing to stitch: applied where it is.
            None => self.send(out, self.id, Msg::Gather { ev, found: vec![] }),
        }
    }

    fn locate(
        &mut self,
        ev: Event,
        ids: Vec<Identifier>,
        mut next: usize,
        mut found: Vec<(Identifier, Found)>,
        out: &mut Out,
    ) {
        while let Some(x) = ids.get(next).filter(|x| home(x, self.shards) == self.id) {
            let x = x.clone();
            let entry = self.dir.entry(x.clone()).or_insert(Dir::Absent(0));
            match entry {
                Dir::Owned(s, _) => found.push((x, Found::Owned(*s))),
                Dir::Absent(gen) => {
                    let gen = *gen + 1;
                    *entry = Dir::Reserved {
                        event: ev.event_id.clone(),
                        gen,
                        waiting: vec![],
                    };
                    found.push((x, Found::New(gen)));
                }
                // Its own reservation from before a restart, whose release is still on its way: taken
                // again under the next gen, so that the late release is ignored.
                Dir::Reserved { event, gen, .. } if *event == ev.event_id => {
                    *gen += 1;
                    found.push((x, Found::New(*gen)));
                }
                Dir::Reserved { waiting, .. } => {
                    waiting.push(Msg::Locate {
                        ev,
                        ids,
                        next,
                        found,
                    });
                    return;
                }
            }
            next += 1;
        }
        if let Some(x) = ids.get(next) {
            let to = home(x, self.shards);
            let msg = Msg::Locate {
                ev,
                ids,
                next,
                found,
            };
            self.send(out, to, msg);
            return;
        }
        let to = choose_target(&ev, &found, self.shards);
        self.send(out, to, Msg::Gather { ev, found });
    }

    fn gather(
        &mut self,
        stitcher: &Stitcher,
        ev: Event,
        found: Vec<(Identifier, Found)>,
        out: &mut Out,
    ) {
        let event = ev.event_id.clone();
        let mut missing = Vec::new();
        let mut erased = false;
        for (x, f) in &found {
            let Found::Owned(s) = *f else {
                continue; // new: reserved for this event
            };
            if self.graph.nodes.contains_key(x) {
                continue;
            }
            missing.push(x.clone());
            let to = match (s == self.id, self.moved.get(x)) {
                (false, _) => s,
                (true, Some(Moved::To(u))) => *u,
                // Erased after it was located.
                (true, Some(Moved::Erased)) => {
                    erased = true;
                    continue;
                }
                (true, None) => continue, // in flight to here
            };
            let msg = Msg::Fetch {
                x: x.clone(),
                to: self.id,
                event: event.clone(),
            };
            self.send(out, to, msg);
        }
        let pending = self
            .pending
            .entry(event.clone())
            .or_insert_with(|| Pending {
                ev,
                found: BTreeMap::new(),
                missing: BTreeSet::new(),
            });
        for (x, f) in found {
            pending.missing.remove(&x);
            pending.found.insert(x, f);
        }
        pending.missing.extend(missing);
        if erased {
            return self.restart(stitcher, &event, out);
        }
        self.apply_ready(stitcher, out);
    }

    /// The highest-priority pending event here that needs the component of node `node`.
    fn holder(&self, node: NodeId) -> Option<&str> {
        self.pending
            .iter()
            .find(|(_, p)| {
                p.found
                    .keys()
                    .any(|x| self.graph.nodes.get(x) == Some(&node))
            })
            .map(|(e, _)| e.as_str())
    }

    fn fetch(&mut self, x: Identifier, to: ShardId, event: String, out: &mut Out) {
        if let Some(&node) = self.graph.nodes.get(&x) {
            if to == self.id {
                return; // fetched by this shard for itself: it is here
            }
            if self.holder(node).is_some_and(|h| h < event.as_str()) {
                self.parked.push(Msg::Fetch { x, to, event });
                return;
            }
            let Some(piece) = self.take_component(node) else {
                return;
            };
            let moved: Vec<Identifier> = piece.members.iter().map(|m| m.id.clone()).collect();
            for id in &moved {
                self.moved.insert(id.clone(), Moved::To(to));
            }
            self.send(
                out,
                to,
                Msg::Component {
                    event,
                    piece: Box::new(piece),
                },
            );
            // Pending events here that needed the component lose it: they fetch it again from `to`.
            let lost: Vec<(String, Identifier)> = self
                .pending
                .iter_mut()
                .flat_map(|(e, p)| {
                    let lost: Vec<Identifier> = p
                        .found
                        .keys()
                        .filter(|y| moved.contains(y))
                        .cloned()
                        .collect();
                    p.missing.extend(lost.iter().cloned());
                    lost.into_iter().map(|y| (e.clone(), y)).collect::<Vec<_>>()
                })
                .collect();
            for (e, y) in lost {
                let msg = Msg::Fetch {
                    x: y,
                    to: self.id,
                    event: e,
                };
                self.send(out, to, msg);
            }
            return;
        }
        match self.moved.get(&x) {
            Some(Moved::To(u)) if *u != self.id => {
                let u = *u;
                self.send(out, u, Msg::Fetch { x, to, event });
            }
            Some(Moved::Erased) => self.send(out, to, Msg::Gone { x, event }),
            // In flight to here: parked until it arrives.
            _ if to != self.id => self.parked.push(Msg::Fetch { x, to, event }),
            _ => {}
        }
    }

    /// Removes the whole component of `node` from the graph.
    fn take_component(&mut self, node: NodeId) -> Option<Piece> {
        let g = &mut self.graph;
        let profile = g.profiles.remove(&node)?;
        let members = profile
            .identifiers
            .keys()
            .map(|id| {
                g.nodes.remove(id);
                Member {
                    id: id.clone(),
                    links: g
                        .links
                        .remove(id)
                        .map(|m| m.into_iter().collect())
                        .unwrap_or_default(),
                    part: g.parts.remove(id),
                    gen: self.gens.remove(id).unwrap_or_default(),
                }
            })
            .collect();
        let live = profile.id();
        g.index.retain(|_, n| *n != node);
        let redirects: Vec<ProfileId> = g
            .redirects
            .iter()
            .filter(|(_, to)| **to == live)
            .map(|(from, _)| from.clone())
            .collect();
        for r in &redirects {
            g.redirects.remove(r);
        }
        Some(Piece {
            profile,
            members,
            redirects,
        })
    }

    /// Puts a component into the graph under a new node; its identifiers' homes learn where it is.
    fn put_component(&mut self, piece: Piece, out: &mut Out) {
        use crate::stitch::GraphStore;
        let Ok(node) = self.graph.allocate_node();
        let live = piece.profile.id();
        for m in piece.members {
            self.graph.nodes.insert(m.id.clone(), node);
            if !m.links.is_empty() {
                self.graph
                    .links
                    .insert(m.id.clone(), m.links.into_iter().collect());
            }
            if let Some(part) = m.part {
                self.graph.parts.insert(m.id.clone(), part);
            }
            let gen = m.gen + 1;
            self.gens.insert(m.id.clone(), gen);
            self.moved.remove(&m.id);
            let to = home(&m.id, self.shards);
            let msg = Msg::Own {
                x: m.id,
                owner: Some(self.id),
                gen,
            };
            self.send(out, to, msg);
        }
        for r in piece.redirects {
            self.graph.redirects.insert(r, live.clone());
        }
        self.graph.index.insert(live, node);
        self.graph.profiles.insert(node, piece.profile);
    }

    fn component(&mut self, stitcher: &Stitcher, _event: &str, piece: Piece, out: &mut Out) {
        self.put_component(piece, out);
        let present: Vec<Identifier> = self
            .pending
            .values()
            .flat_map(|p| p.missing.iter())
            .filter(|x| self.graph.nodes.contains_key(*x))
            .cloned()
            .collect();
        for p in self.pending.values_mut() {
            for x in &present {
                p.missing.remove(x);
            }
        }
        self.apply_ready(stitcher, out);
        // Fetches and commands parked until the component arrived.
        self.retry_parked(stitcher, out);
    }

    /// Applies every pending event that has all it needs, highest priority first.
    fn apply_ready(&mut self, stitcher: &Stitcher, out: &mut Out) {
        let mut applied = false;
        loop {
            let ready = self
                .pending
                .iter()
                .find(|(_, p)| p.missing.is_empty())
                .map(|(e, _)| e.clone());
            let Some(p) = ready.and_then(|e| self.pending.remove(&e)) else {
                break;
            };
            self.apply(stitcher, p, out);
            applied = true;
        }
        // Fetches parked behind an event applied now can go on.
        if applied {
            self.retry_parked(stitcher, out);
        }
    }

    fn apply(&mut self, stitcher: &Stitcher, p: Pending, out: &mut Out) {
        let Ok(applied) = stitcher.apply(&mut self.graph, &p.ev);
        // Reservations end: the identifiers the stitcher linked are here, the others exist nowhere.
        for (x, f) in &p.found {
            if let Found::New(gen) = f {
                let owner = if self.graph.nodes.contains_key(x) {
                    self.gens.insert(x.clone(), *gen);
                    self.moved.remove(x);
                    Some(self.id)
                } else {
                    None
                };
                let msg = Msg::Own {
                    x: x.clone(),
                    owner,
                    gen: *gen,
                };
                self.send(out, home(x, self.shards), msg);
            }
        }
        out.steps.push(Step::Event(p.ev, applied));
    }

    /// Handles parked messages again (a component arrived, or an event was applied).
    fn retry_parked(&mut self, stitcher: &Stitcher, out: &mut Out) {
        let parked = std::mem::take(&mut self.parked);
        for msg in parked {
            self.handle(stitcher, msg, out);
        }
    }

    fn own(
        &mut self,
        stitcher: &Stitcher,
        x: Identifier,
        owner: Option<ShardId>,
        gen: u32,
        out: &mut Out,
    ) {
        let entry = self.dir.entry(x).or_insert(Dir::Absent(0));
        let current = match entry {
            Dir::Owned(_, g) | Dir::Absent(g) => *g,
            Dir::Reserved { gen, .. } => *gen,
        };
        // A reservation ends with its own gen; any other entry only moves forward.
        let reserved = matches!(entry, Dir::Reserved { .. });
        if gen < current || (gen == current && !reserved) {
            return;
        }
        let new = match owner {
            Some(s) => Dir::Owned(s, gen),
            None => Dir::Absent(gen),
        };
        if let Dir::Reserved { waiting, .. } = std::mem::replace(entry, new) {
            for msg in waiting {
                self.handle(stitcher, msg, out);
            }
        }
    }

    /// An identifier the event located was erased before the event was applied: the event gives up its
    /// reservations and locates all its identifiers again, from the start and in order (a locate that
    /// resumed out of order could wait in a cycle with another event's reservations).
    fn restart(&mut self, stitcher: &Stitcher, event: &str, out: &mut Out) {
        let Some(p) = self.pending.remove(event) else {
            return;
        };
        for (x, f) in &p.found {
            if let Found::New(gen) = f {
                let msg = Msg::Own {
                    x: x.clone(),
                    owner: None,
                    gen: *gen,
                };
                self.send(out, home(x, self.shards), msg);
            }
        }
        self.start(p.ev, out);
        // Fetches parked behind this event can go on.
        self.retry_parked(stitcher, out);
    }

    /// Sends a command for `x` from its home to its owner. A reserved identifier is being created: the
    /// command waits at the home, as it came, and is routed again once the identifier is placed. An
    /// identifier that does not exist has nothing to change.
    fn route_command(&mut self, x: &Identifier, msg: Msg, out: &mut Out) {
        match self.dir.get_mut(x) {
            Some(Dir::Owned(s, _)) => {
                let s = *s;
                let msg = match msg {
                    Msg::Erase { x, .. } => Msg::Erase { x, at_owner: true },
                    Msg::Unlink { a, b, .. } => Msg::Unlink {
                        a,
                        b,
                        at_owner: true,
                    },
                    other => other,
                };
                self.send(out, s, msg);
            }
            Some(Dir::Reserved { waiting, .. }) => waiting.push(msg),
            _ => {}
        }
    }

    /// At the owner of `x`: true if the command can run here now; otherwise it is forwarded or parked.
    fn at_owner(&mut self, x: &Identifier, msg: &Msg, out: &mut Out) -> bool {
        if self.graph.nodes.contains_key(x) {
            return true;
        }
        match self.moved.get(x) {
            Some(Moved::To(u)) => {
                let u = *u;
                self.send(out, u, msg.clone());
            }
            Some(Moved::Erased) => {}
            None => self.parked.push(msg.clone()),
        }
        false
    }

    fn erase(&mut self, stitcher: &Stitcher, x: Identifier, at_owner: bool, out: &mut Out) {
        let msg = Msg::Erase {
            x: x.clone(),
            at_owner,
        };
        if !at_owner {
            return self.route_command(&x, msg, out);
        }
        if !self.at_owner(&x, &msg, out) {
            return;
        }
        let Ok(reshape) = stitcher.erase_identifier(&mut self.graph, &x);
        let gen = self.gens.remove(&x).unwrap_or_default() + 1;
        self.moved.insert(x.clone(), Moved::Erased);
        self.send(
            out,
            home(&x, self.shards),
            Msg::Own {
                x: x.clone(),
                owner: None,
                gen,
            },
        );
        out.steps.push(Step::Erase(x.clone(), reshape));
        // Pending events here that located it start again.
        let events: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.found.contains_key(&x))
            .map(|(e, _)| e.clone())
            .collect();
        for e in events {
            self.restart(stitcher, &e, out);
        }
    }

    fn unlink(
        &mut self,
        stitcher: &Stitcher,
        a: Identifier,
        b: Identifier,
        at_owner: bool,
        out: &mut Out,
    ) {
        let msg = Msg::Unlink {
            a: a.clone(),
            b: b.clone(),
            at_owner,
        };
        if !at_owner {
            return self.route_command(&a, msg, out);
        }
        if !self.at_owner(&a, &msg, out) {
            return;
        }
        let Ok(reshape) = stitcher.unlink(&mut self.graph, &a, &b);
        out.steps.push(Step::Unlink(a, b, reshape));
    }
}

/// The identifiers an event must have whole before it is applied: its own and, unless already scoped,
/// their copies scoped to its channel (consent sealing may put the event there); by home, then identifier.
pub fn locate_order(ev: &Event, shards: ShardId) -> Vec<Identifier> {
    let mut ids: BTreeSet<Identifier> = ev.identifiers.iter().cloned().collect();
    for x in &ev.identifiers {
        if x.scope().is_none() {
            ids.insert(x.scoped(&ev.channel));
        }
    }
    let mut ids: Vec<Identifier> = ids.into_iter().collect();
    ids.sort_by_cached_key(|x| (home(x, shards), x.clone()));
    ids
}

/// The shard an event is applied at: the one that owns most of its identifiers (the fewest moves);
/// ties go to the smallest shard; with no owner at all, the home of its smallest identifier.
fn choose_target(ev: &Event, found: &[(Identifier, Found)], shards: ShardId) -> ShardId {
    let mut count: BTreeMap<ShardId, usize> = BTreeMap::new();
    for (_, f) in found {
        if let Found::Owned(s) = f {
            *count.entry(*s).or_default() += 1;
        }
    }
    let best = count
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(s, _)| *s);
    best.unwrap_or_else(|| match ev.identifiers.iter().min() {
        Some(x) => home(x, shards),
        None => event_home(&ev.event_id, shards),
    })
}

#[cfg(test)]
mod tests;
