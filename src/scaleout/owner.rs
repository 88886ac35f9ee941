//! One engine for N shards: every component is kept whole at one shard, its owner, where the classic
//! [`Stitcher`] decides everything about it (limits, shared identifiers and their splits, consent sealing,
//! erasure, unlink) exactly as with one instance. Messages move components between shards when an event
//! joins components owned by different shards. docs/DESIGN.md, "One engine for N instances", has the
//! protocol, why it is correct and what it costs; the simulation below checks it.
//!
//! This module is the per-shard state machine ([`Shard::handle`]), free of IO: the graph of a shard is a
//! [`GraphStore`], messages in, messages and applied steps out. Here: an event located, gathered and
//! applied; `moves`: components taken from one shard's graph and put into another's; `commands`: erasure
//! and unlink at the owner.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::state::{
    suppression_hash, Kv, ShardGraph, ShardView, FIRST_PLACEMENT, MOVED_PROFILE, PARKED,
    PARKED_BEHIND, PENDING, WAITING,
};
use super::{entry_shard, home, ShardId};
use crate::config::HashKey;
use crate::model::{Event, Identifier, NodeId, ProfileId};
use crate::profile::Profile;
use crate::stitch::{Applied, Evidence, GraphStore, Reshape, Stitcher};
use crate::store::{KeyRest, StoreError};

/// What `Locate` found for one identifier at its home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    /// The identifier's component is (or was last reported) at this shard.
    Owned(ShardId),
    /// The identifier is new; the event holds its reservation, at this gen.
    New(u32),
    /// A copy scoped to the event's channel, not located: the event needs it only if consent sealing
    /// puts it in that channel's space, and then starts again locating and reserving its scoped copies.
    /// (Locating them for every event would cost every event a directory read and up to one hop per
    /// identifier for what few events need; reserving them would queue every event that carries a
    /// popular identifier behind one reservation.)
    Unreserved,
    /// The identifier's component was placed at this shard at this gen or later: a `Gather` that
    /// followed it from where it was located says so, so that the shard does not mistake an older
    /// erasure of it there for its end. (Appended: messages of the version before still decode.)
    Followed(ShardId, u32),
}

impl Found {
    /// The shard the identifier's component is at, and the gen since which it has been (0: as a
    /// directory said, with no gen to compare).
    fn owner(&self) -> Option<(ShardId, u32)> {
        match *self {
            Found::Owned(s) => Some((s, 0)),
            Found::Followed(s, gen) => Some((s, gen)),
            Found::New(_) | Found::Unreserved => None,
        }
    }
}

/// One identifier of a component in transit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: Identifier,
    pub links: Vec<(Identifier, Evidence)>,
    pub part: Option<Box<Profile>>,
    /// How many times the identifier has been placed (created or moved).
    pub gen: u32,
}

/// A whole component on its way from one shard to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    /// Boxed, as the graph hands it out (serde writes a box as what it holds).
    pub profile: Box<Profile>,
    pub members: Vec<Member>,
    /// Retired public ids leading to this profile's id (directly or through a chain), with where each
    /// redirects.
    pub redirects: Vec<(ProfileId, ProfileId)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    /// A new event, at its entry shard (`entry_shard`), where it is deduplicated.
    Event(Box<Event>),
    /// Find the owners of `ids` (sorted by home, then identifier), from `ids[next]` on, at its home;
    /// `scoped`: `ids` holds the event's scoped copies too (else they count as [`Found::Unreserved`]).
    Locate {
        ev: Box<Event>,
        ids: Vec<Identifier>,
        next: usize,
        found: Vec<(Identifier, Found)>,
        scoped: bool,
    },
    /// Apply `ev` here once the components of every identifier in `found` are here.
    Gather {
        ev: Box<Event>,
        found: Vec<(Identifier, Found)>,
    },
    /// Send the component of `x` to shard `to`, for event `event`. `after`: the gen at which the
    /// forwarding pointer followed last says `x` was placed where this is sent (0 from a directory).
    Fetch {
        x: Identifier,
        to: ShardId,
        event: String,
        after: u32,
    },
    /// A fetched component, from a node of another shard.
    Component {
        from: (ShardId, NodeId),
        piece: Box<Piece>,
    },
    /// Directory update at the home of `x`: its component is at `owner` (`None`: it exists nowhere).
    Own {
        x: Identifier,
        owner: Option<ShardId>,
        gen: u32,
    },
    /// `x`, located for `event`, was erased meanwhile: the event starts again.
    Gone { x: Identifier, event: String },
    /// Erase an identifier: at its home (`at_owner` `None`), then at its owner (`Some(after)`, as for
    /// `Fetch`).
    Erase {
        x: Identifier,
        at_owner: Option<u32>,
        /// Where the command came from (`control:<topic>:<partition>:<offset>`), for the output.
        trigger: String,
        /// Its suppression hash, to put on the home's suppression list.
        suppress: Option<[u8; 32]>,
    },
    /// Close the merge-storm breaker of the instance that holds this shard (sent to every shard).
    Release { trigger: String },
    /// Take an identifier off its home's suppression list (by its suppression hash); `primary` for the
    /// identifier itself rather than one of its channel-scoped copies.
    Unsuppress {
        hash: [u8; 32],
        trigger: String,
        primary: bool,
    },
    /// Erase a profile by any of its public ids: sent to every shard; the one holding it erases it, one
    /// that sent it away forwards the command after it.
    EraseProfile { id: ProfileId, trigger: String },
    /// Remove the link between two identifiers: at the home of the first, then at its owner.
    Unlink {
        a: Identifier,
        b: Identifier,
        at_owner: Option<u32>,
        trigger: String,
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
            Msg::Unsuppress { .. } => "unsuppress",
            Msg::Release { .. } => "release",
            Msg::EraseProfile { .. } => "erase_profile",
            Msg::Unlink { .. } => "unlink",
        }
    }
}

/// A change to the graph, applied at the shard that owns the components it touches, with the classic
/// stitcher's outcome: what the output and the simulation's one-instance replay are built from.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // made and consumed once per step, never stored
pub enum Step {
    Event(Event, Option<Applied>),
    /// The identifier erased, the command's trigger, the outcome.
    Erase(Identifier, String, Reshape),
    EraseProfile(ProfileId, String, Reshape),
    Unlink(Identifier, Identifier, String, Reshape),
    /// A suppression lifted (the trigger; whether the identifier was on the list).
    Unsuppress(String, bool),
}

/// What handling one message produced.
#[derive(Debug, Default)]
pub struct Out {
    pub msgs: Vec<(ShardId, Msg)>,
    /// Messages that go through the internal topic even to a shard held by the same instance, behind what
    /// waits there: an `EraseProfile` that follows its component by forwarding pointers without gens
    /// (two shards can point at each other while the component is in flight to one of them, and only the
    /// `Component` waiting on the topic ends that).
    pub deferred: Vec<(ShardId, Msg)>,
    pub steps: Vec<Step>,
    /// Components that left this shard: their node here and their profile as it left.
    pub departed: Vec<(NodeId, Profile)>,
    /// Components that arrived: the shard and node they came from, and their node here.
    pub arrived: Vec<((ShardId, NodeId), NodeId)>,
    /// An event seen before (dropped at its home): its channel, which the duplicates are counted by.
    pub duplicate: Option<String>,
    /// Identifiers stripped from events for being on the suppression list, and events left with none.
    pub suppressed: (u64, u64),
    /// A release of the merge-storm breaker reached this shard (its trigger).
    pub release: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Dir {
    Owned(ShardId, u32),
    /// An event that brings the identifier for the first time holds it; `waiting` resume once it is placed.
    Reserved {
        event: String,
        gen: u32,
        waiting: Vec<Msg>,
    },
    Absent(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Moved {
    /// Sent to this shard; it had been placed here for the given gen's time.
    To(ShardId, u32),
    /// Erased here, at the given gen.
    Erased(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    ev: Box<Event>,
    found: BTreeMap<Identifier, Found>,
    /// Identifiers whose component is not here yet.
    missing: BTreeSet<Identifier>,
}

impl Pending {
    /// Whether the event needs the component of `x` here: every identifier it located, not the scoped
    /// copies it did not.
    fn waits_on(&self, x: &Identifier) -> bool {
        self.found.get(x).is_some_and(|f| *f != Found::Unreserved)
    }

    /// The identifiers whose components the event needs here.
    fn waited_on(&self) -> impl Iterator<Item = &Identifier> + '_ {
        self.found.keys().filter(|x| self.waits_on(x))
    }
}

/// Where a message about an identifier that is not here goes.
enum Follow {
    /// On to this shard, where it was placed at this gen or later.
    Forward(ShardId, u32),
    /// Erased here, at this gen.
    Gone(u32),
    /// On its way here.
    InFlight,
}

/// One shard's protocol step: its graph and tables in a [`ShardView`], with the total number of shards.
pub struct Shard<'v, 'k, K: ?Sized> {
    pub view: &'v mut ShardView<'k, K>,
    pub shards: ShardId,
    /// `STITCHER_SUPPRESSION_SALT`: events are checked against the suppression list when set.
    pub suppression: Option<&'v HashKey>,
}

impl<'k, K: Kv + ?Sized> Shard<'_, 'k, K> {
    fn id(&self) -> ShardId {
        self.view.shard
    }

    /// Handles one message; everything it changes is in the view and `out`.
    pub fn handle(
        &mut self,
        stitcher: &Stitcher,
        msg: Msg,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        match msg {
            Msg::Event(ev) => self.event(ev, out),
            Msg::Locate {
                ev,
                ids,
                next,
                found,
                scoped,
            } => self.locate(ev, ids, next, found, scoped, out),
            Msg::Gather { ev, found } => self.gather(stitcher, ev, found, out),
            Msg::Fetch {
                x,
                to,
                event,
                after,
            } => self.fetch(stitcher, x, to, event, after, out),
            Msg::Component { from, piece } => self.component(stitcher, from, *piece, out),
            Msg::Own { x, owner, gen } => self.own(stitcher, x, owner, gen, out),
            Msg::Gone { event, .. } => self.restart(stitcher, &event, None, out),
            Msg::Erase {
                x,
                at_owner,
                trigger,
                suppress,
            } => self.erase(stitcher, x, at_owner, (trigger, suppress), out),
            Msg::Release { trigger } => {
                out.release = Some(trigger);
                Ok(())
            }
            Msg::Unsuppress {
                hash,
                trigger,
                primary,
            } => {
                let listed = self.view.suppressed(&hash)?;
                if listed {
                    self.view.set_suppressed(&hash, None)?;
                }
                if primary {
                    out.steps.push(Step::Unsuppress(trigger, listed));
                }
                Ok(())
            }
            Msg::EraseProfile { id, trigger } => self.erase_profile(stitcher, id, trigger, out),
            Msg::Unlink {
                a,
                b,
                at_owner,
                trigger,
            } => self.unlink(stitcher, (a, b), at_owner, trigger, out),
        }
    }

    fn send(&self, out: &mut Out, to: ShardId, msg: Msg) {
        out.msgs.push((to, msg));
    }

    /// Tells the home of `x`, erased here at `gen`, that it exists nowhere (again, if it asked before:
    /// the home ignores what it knows already).
    fn tell_home_erased(&self, out: &mut Out, x: &Identifier, gen: u32) {
        let msg = Msg::Own {
            x: x.clone(),
            owner: None,
            gen: gen + 1,
        };
        self.send(out, home(x, self.shards), msg);
    }

    /// The shard's graph, for the classic stitcher.
    fn graph(&mut self) -> ShardGraph<'_, 'k, K> {
        ShardGraph {
            view: &mut *self.view,
            error: None,
        }
    }

    fn node_of(&self, x: &Identifier) -> Result<Option<NodeId>, StoreError> {
        self.view.read().node_of(x)
    }

    fn here(&self, x: &Identifier) -> Result<bool, StoreError> {
        Ok(self.node_of(x)?.is_some())
    }

    /// The directory entry of `x`, homed here. With one shard the graph is the directory: an identifier in
    /// it is owned here, whatever entry is stored (docs/DESIGN.md, "One shard: the graph is the
    /// directory").
    fn dir(&self, x: &Identifier) -> Result<Dir, StoreError> {
        if self.shards == 1 && self.here(x)? {
            return Ok(Dir::Owned(self.id(), 0));
        }
        Ok(self.view.read().dir(x)?.unwrap_or(Dir::Absent(0)))
    }

    fn moved(&self, x: &Identifier) -> Result<Option<Moved>, StoreError> {
        self.view.moved(x)
    }

    fn pending(&self, event: &str) -> Result<Option<Pending>, StoreError> {
        self.view.get(PENDING, event.as_bytes())
    }

    fn put_pending(&mut self, event: &str, p: &Pending) -> Result<(), StoreError> {
        self.view.put(PENDING, event.as_bytes(), Some(p))
    }

    /// Events pending here that located `x` (they need its component).
    fn waiting_on(&self, x: &Identifier) -> Result<Vec<String>, StoreError> {
        Ok(self.view.get(WAITING, x)?.unwrap_or_default())
    }

    fn edit_waiting(
        &mut self,
        x: &Identifier,
        f: impl FnOnce(&mut Vec<String>),
    ) -> Result<(), StoreError> {
        self.view.edit_set(WAITING, x, f)
    }

    /// The events pending here that need any of `ids`, highest priority first.
    fn waiting_on_any(&self, ids: &[Identifier]) -> Result<BTreeSet<String>, StoreError> {
        let mut events = BTreeSet::new();
        for x in ids {
            events.extend(self.waiting_on(x)?);
        }
        Ok(events)
    }

    /// A pending event is over (applied, or starting again): it no longer waits here.
    fn forget_pending(&mut self, event: &str, p: &Pending) -> Result<(), StoreError> {
        self.view.put::<Pending>(PENDING, event.as_bytes(), None)?;
        // Every identifier it found, not only those it waits on: a pending record of an earlier version
        // waited on its unreserved copies too, and a stale entry would name a holder that is gone.
        for x in p.found.keys() {
            self.edit_waiting(x, |v| v.retain(|e| e != event))?;
        }
        Ok(())
    }

    /// Parks a message about `x`, whose component is on its way here, until it arrives.
    fn park(&mut self, x: &Identifier, msg: Msg) -> Result<(), StoreError> {
        self.park_under(PARKED, x, msg)
    }

    /// Parks a fetch behind the pending event `event` that holds the component, until that event is
    /// applied, starts again or loses the component.
    fn park_behind(&mut self, event: &str, msg: Msg) -> Result<(), StoreError> {
        self.park_under(PARKED_BEHIND, event.as_bytes(), msg)
    }

    /// Adds a message to the list parked under a key of `kind`.
    fn park_under(
        &mut self,
        kind: u8,
        key: &(impl KeyRest + ?Sized),
        msg: Msg,
    ) -> Result<(), StoreError> {
        let mut parked: Vec<Msg> = self.view.get(kind, key)?.unwrap_or_default();
        parked.push(msg);
        self.view.put(kind, key, Some(&parked))
    }

    /// Takes the messages parked under a key of `kind` and handles them again.
    fn unpark(
        &mut self,
        stitcher: &Stitcher,
        kind: u8,
        key: &(impl KeyRest + ?Sized),
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let parked: Option<Vec<Msg>> = self.view.get(kind, key)?;
        let Some(parked) = parked else {
            return Ok(());
        };
        self.view.put::<Vec<Msg>>(kind, key, None)?;
        for msg in parked {
            self.handle(stitcher, msg, out)?;
        }
        Ok(())
    }

    /// Handles again the fetches parked behind `event`.
    fn retry_behind(
        &mut self,
        stitcher: &Stitcher,
        event: &str,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        self.unpark(stitcher, PARKED_BEHIND, event.as_bytes(), out)
    }

    fn event(&mut self, ev: Box<Event>, out: &mut Out) -> Result<(), StoreError> {
        if !self
            .view
            .first_seen(&ev.event_id, crate::model::now_millis())?
        {
            out.duplicate = Some(ev.channel);
            return Ok(());
        }
        self.start(ev, false, out);
        Ok(())
    }

    /// Starts locating an event's identifiers, at the first home in order.
    fn start(&mut self, ev: Box<Event>, scoped: bool, out: &mut Out) {
        let ids = locate_order(&ev, self.shards, scoped);
        match ids.first() {
            Some(first) => {
                let to = home(first, self.shards);
                let msg = Msg::Locate {
                    ev,
                    ids,
                    next: 0,
                    found: vec![],
                    scoped,
                };
                self.send(out, to, msg);
            }
            // Nothing to stitch: applied where it is.
            None => self.send(out, self.id(), Msg::Gather { ev, found: vec![] }),
        }
    }

    fn locate(
        &mut self,
        mut ev: Box<Event>,
        mut ids: Vec<Identifier>,
        mut next: usize,
        mut found: Vec<(Identifier, Found)>,
        scoped: bool,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        while let Some(x) = ids.get(next).filter(|x| home(x, self.shards) == self.id()) {
            let x = x.clone();
            if let Some(salt) = self.suppression {
                if self.view.suppressed(&suppression_hash(salt, &x))? {
                    // Erased and suppressed: the event goes on without it, and nothing of it is kept.
                    ids.remove(next);
                    if ev.identifiers.contains(&x) {
                        ev.identifiers.retain(|i| *i != x);
                        out.suppressed.0 += 1;
                    }
                    continue;
                }
            }
            let entry = match self.dir(&x)? {
                Dir::Owned(s, _) => {
                    found.push((x, Found::Owned(s)));
                    next += 1;
                    continue;
                }
                Dir::Absent(gen) => {
                    found.push((x.clone(), Found::New(gen + 1)));
                    Dir::Reserved {
                        event: ev.event_id.clone(),
                        gen: gen + 1,
                        waiting: vec![],
                    }
                }
                // Its own reservation from before a restart, whose release is still on its way: taken
                // again under the next gen, so that the late release is ignored.
                Dir::Reserved {
                    event,
                    gen,
                    waiting,
                } if event == ev.event_id => {
                    found.push((x.clone(), Found::New(gen + 1)));
                    Dir::Reserved {
                        event,
                        gen: gen + 1,
                        waiting,
                    }
                }
                Dir::Reserved {
                    event,
                    gen,
                    mut waiting,
                } => {
                    waiting.push(Msg::Locate {
                        ev,
                        ids,
                        next,
                        found,
                        scoped,
                    });
                    return self.view.set_dir(
                        &x,
                        Some(&Dir::Reserved {
                            event,
                            gen,
                            waiting,
                        }),
                    );
                }
            };
            self.view.set_dir(&x, Some(&entry))?;
            next += 1;
        }
        if let Some(x) = ids.get(next) {
            let to = home(x, self.shards);
            let msg = Msg::Locate {
                ev,
                ids,
                next,
                found,
                scoped,
            };
            self.send(out, to, msg);
            return Ok(());
        }
        if ev.identifiers.is_empty() {
            // Every identifier suppressed: nobody to apply it to. Nothing was reserved for it (only its
            // own identifiers reserve, and those are gone).
            out.suppressed.1 += 1;
            return Ok(());
        }
        if !scoped {
            // Not located, unless a `Locate` of an earlier version, which took every copy along, did.
            let copies: Vec<Identifier> = scoped_copies(&ev)
                .filter(|c| !found.iter().any(|(x, _)| x == c))
                .collect();
            found.extend(copies.into_iter().map(|x| (x, Found::Unreserved)));
        }
        let to = choose_target(&ev, &found, self.shards);
        self.send(out, to, Msg::Gather { ev, found });
        Ok(())
    }

    fn gather(
        &mut self,
        stitcher: &Stitcher,
        ev: Box<Event>,
        found: Vec<(Identifier, Found)>,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let event = ev.event_id.clone();
        let mut missing = Vec::new();
        let mut fetches = Vec::new();
        let mut erased = false;
        // Whether a component of the event is here or on its way here, and where those located here
        // went since.
        let mut stays = false;
        let mut went: BTreeMap<Identifier, (ShardId, u32)> = BTreeMap::new();
        for (x, f) in &found {
            if *f == Found::New(FIRST_PLACEMENT) {
                // Never placed before (its home had no directory entry): nothing of it exists anywhere.
                self.view.first_placement(x);
            }
            let Some((s, after)) = f.owner() else {
                continue; // new (reserved for this event), or a scoped copy not needed yet
            };
            if self.here(x)? {
                stays = true;
                continue;
            }
            missing.push(x.clone());
            let (to, after) = if s == self.id() {
                match self.follow(x, after)? {
                    Follow::Forward(u, after) => {
                        went.insert(x.clone(), (u, after));
                        (u, after)
                    }
                    // Erased after it was located. Its home may not have heard yet (the news can
                    // wait on the internal topic behind this very event): told again, ahead of the
                    // event's new `Locate`, or the event would be located here again, for ever.
                    Follow::Gone(gen) => {
                        self.tell_home_erased(out, x, gen);
                        erased = true;
                        continue;
                    }
                    Follow::InFlight => {
                        stays = true;
                        continue;
                    }
                }
            } else {
                (s, after)
            };
            fetches.push((to, x.clone(), after));
        }
        if !stays && !erased && !went.is_empty() {
            // Every component located here left after its `Locate` read the directory and none of the
            // event's is here or on its way: fetching them back would move them twice (docs/DESIGN.md,
            // "Messages"). The event goes where they are, with those owners brought up to date.
            let found: Vec<(Identifier, Found)> = found
                .into_iter()
                .map(|(x, f)| match went.get(&x) {
                    Some((u, after)) => (x, Found::Followed(*u, *after)),
                    None => (x, f),
                })
                .collect();
            let to = choose_target(&ev, &found, self.shards);
            self.send(out, to, Msg::Gather { ev, found });
            return Ok(());
        }
        for (to, x, after) in fetches {
            let msg = Msg::Fetch {
                x,
                to: self.id(),
                event: event.clone(),
                after,
            };
            self.send(out, to, msg);
        }
        // An attempt sends one `Gather`, and an attempt that starts again first forgets its pending
        // record: none of this event is here (claimed, so not read; the simulation's state checks it).
        self.view.known_absent(PENDING, event.as_bytes());
        if missing.is_empty()
            && !erased
            && !self.needs_copies(&ev, found.iter().map(|(x, f)| (x, f)))?
        {
            // Everything is here: applied at once, never pending, so nothing waits on it or is parked
            // behind it.
            let p = Pending {
                ev,
                found: found.into_iter().collect(),
                missing: BTreeSet::new(),
            };
            return self.apply(stitcher, p, out);
        }
        let p = Pending {
            ev,
            found: found.into_iter().collect(),
            missing: missing.into_iter().collect(),
        };
        for x in p.waited_on() {
            self.edit_waiting(x, |v| v.push(event.clone()))?;
        }
        self.put_pending(&event, &p)?;
        if erased {
            return self.restart(stitcher, &event, None, out);
        }
        self.apply_ready(stitcher, BTreeSet::from([event]), out)
    }

    /// `ids` are here now: the pending events waiting for them no longer do, and those that have all
    /// they need are applied.
    fn present(
        &mut self,
        stitcher: &Stitcher,
        ids: &[Identifier],
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let events = self.waiting_on_any(ids)?;
        for e in &events {
            if let Some(mut p) = self.pending(e)? {
                let before = p.missing.len();
                p.missing.retain(|x| !ids.contains(x));
                if p.missing.len() != before {
                    self.put_pending(e, &p)?;
                }
            }
        }
        self.apply_ready(stitcher, events, out)
    }

    /// Applies those of `events` that have all they need, highest priority first; then retries what
    /// was parked on the components they held.
    fn apply_ready(
        &mut self,
        stitcher: &Stitcher,
        events: BTreeSet<String>,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        for e in events {
            let Some(p) = self.pending(&e)?.filter(|p| p.missing.is_empty()) else {
                continue;
            };
            if self.needs_copies(&p.ev, &p.found)? {
                // Consent sealing puts the event in its channel's space: its scoped copies are needed.
                self.restart(stitcher, &e, Some(true), out)?;
                continue;
            }
            self.forget_pending(&e, &p)?;
            self.apply(stitcher, p, out)?;
            self.retry_behind(stitcher, &e, out)?;
        }
        Ok(())
    }

    fn apply(&mut self, stitcher: &Stitcher, p: Pending, out: &mut Out) -> Result<(), StoreError> {
        let mut graph = self.graph();
        let applied = stitcher.apply(&mut graph, &p.ev)?;
        graph.finish()?;
        // Reservations end: the identifiers the stitcher linked are here, the others exist nowhere.
        for (x, f) in &p.found {
            if let Found::New(gen) = f {
                let owner = if self.here(x)? {
                    self.view.set_gen(x, *gen)?;
                    self.view.clear_moved::<Moved>(x)?;
                    Some(self.id())
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
        out.steps.push(Step::Event(*p.ev, applied));
        Ok(())
    }

    /// Handles again the messages parked on `ids` (their component arrived).
    fn retry_parked(
        &mut self,
        stitcher: &Stitcher,
        ids: &[Identifier],
        out: &mut Out,
    ) -> Result<(), StoreError> {
        for x in ids {
            self.unpark(stitcher, PARKED, x, out)?;
        }
        Ok(())
    }

    fn own(
        &mut self,
        stitcher: &Stitcher,
        x: Identifier,
        owner: Option<ShardId>,
        gen: u32,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        for msg in self.own_entry(&x, owner, gen)? {
            self.handle(stitcher, msg, out)?;
        }
        Ok(())
    }

    /// Moves the directory entry of `x` to `owner` at `gen` (or leaves it, if the news is stale). Returns
    /// the messages that waited on a reservation it ends, for the caller to handle.
    fn own_entry(
        &mut self,
        x: &Identifier,
        owner: Option<ShardId>,
        gen: u32,
    ) -> Result<Vec<Msg>, StoreError> {
        // The stored entry: a reservation's waiting messages are there even when the graph has `x`.
        let stored: Option<Dir> = self.view.read().dir(x)?;
        if self.shards == 1 && stored.is_none() && self.here(x)? {
            // One shard: in the graph with no entry, its placement's `Own` came before (an erasure
            // writes its entry itself): this one is stale.
            return Ok(Vec::new());
        }
        let entry = stored.unwrap_or(Dir::Absent(0));
        let (current, reserved) = match &entry {
            Dir::Owned(_, g) | Dir::Absent(g) => (*g, false),
            Dir::Reserved { gen, .. } => (*gen, true),
        };
        // A reservation ends with its own gen; any other entry only moves forward.
        if gen < current || (gen == current && !reserved) {
            return Ok(Vec::new());
        }
        let new = match owner {
            // One shard: the graph says it.
            Some(_) if self.shards == 1 => None,
            Some(s) => Some(Dir::Owned(s, gen)),
            None => Some(Dir::Absent(gen)),
        };
        self.view.set_dir(x, new.as_ref())?;
        Ok(match entry {
            Dir::Reserved { waiting, .. } => waiting,
            _ => Vec::new(),
        })
    }

    /// Whether the event, located without reserving its scoped copies, needs them after all.
    fn needs_copies<'a>(
        &self,
        ev: &Event,
        found: impl IntoIterator<Item = (&'a Identifier, &'a Found)>,
    ) -> Result<bool, StoreError> {
        Ok(found.into_iter().any(|(_, f)| *f == Found::Unreserved) && self.sealed_elsewhere(ev)?)
    }

    /// Whether one of the event's components is sealed to another channel (consent), so that the classic
    /// stitcher may put the event in its channel's space. A superset of when it does: it looks at every
    /// component, the stitcher at the most trusted one.
    fn sealed_elsewhere(&self, ev: &Event) -> Result<bool, StoreError> {
        let mut seen = Vec::with_capacity(ev.identifiers.len());
        for x in &ev.identifiers {
            if let Some(node) = self.node_of(x)? {
                // Identifiers of one component share its profile: read it once.
                if seen.contains(&node) {
                    continue;
                }
                seen.push(node);
                if self
                    .view
                    .read()
                    .seal(node)?
                    .is_some_and(|s| s.seals_out(&ev.channel))
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The event starts again (an identifier it located was erased before it was applied, or it needs
    /// its scoped copies reserved): it gives up its reservations and locates all its identifiers again,
    /// from the start and in order (a locate that resumed out of order could wait in a cycle with another
    /// event's reservations).
    fn restart(
        &mut self,
        stitcher: &Stitcher,
        event: &str,
        scoped: Option<bool>,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let Some(p) = self.pending(event)? else {
            return Ok(());
        };
        self.forget_pending(event, &p)?;
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
        // Scoped copies are reserved again if they were (or if `scoped` says so).
        let scoped = scoped.unwrap_or_else(|| !p.found.values().any(|f| *f == Found::Unreserved));
        self.start(p.ev, scoped, out);
        self.retry_behind(stitcher, event, out)
    }
}

/// The identifiers an event must have whole before it is applied: its own and, if `scoped`, the
/// [`scoped_copies`] of them (consent sealing puts the event in its channel's space); by home, then
/// identifier.
pub fn locate_order(ev: &Event, shards: ShardId, scoped: bool) -> Vec<Identifier> {
    let mut ids = ev.identifiers.clone();
    if scoped {
        ids.extend(scoped_copies(ev));
    }
    // Already in order and distinct as `Event::new` made them, mostly: then the sort only checks.
    ids.sort();
    ids.dedup();
    if shards > 1 {
        // Stable: by identifier within a home.
        ids.sort_by_cached_key(|x| home(x, shards));
    }
    ids
}

/// The copies of an event's unscoped identifiers scoped to its channel that it does not carry itself.
fn scoped_copies(ev: &Event) -> impl Iterator<Item = Identifier> + '_ {
    ev.identifiers
        .iter()
        .filter(|x| x.scope().is_none())
        .map(|x| x.scoped(&ev.channel))
        .filter(|c| !ev.identifiers.contains(c))
}

/// The shard an event is applied at: the one that owns most of its identifiers (the fewest moves);
/// ties go to the smallest shard; with no owner at all, the home of its smallest identifier.
fn choose_target(ev: &Event, found: &[(Identifier, Found)], shards: ShardId) -> ShardId {
    let mut count: BTreeMap<ShardId, usize> = BTreeMap::new();
    for (_, f) in found {
        if let Some((s, _)) = f.owner() {
            *count.entry(s).or_default() += 1;
        }
    }
    let best = count
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(s, _)| *s);
    best.unwrap_or_else(|| match ev.identifiers.iter().min() {
        Some(x) => home(x, shards),
        None => entry_shard(ev, shards),
    })
}

mod commands;
mod moves;

#[cfg(test)]
mod tests;
