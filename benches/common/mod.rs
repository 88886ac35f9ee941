//! The stitch step's workload, shared by the benches: a store preloaded with persons of ten identifiers
//! each, the stream of events measured over it, and the step itself (every event through the owner
//! protocol of one shard, one write per batch).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use stitcher::model::{Event, Identifier};
use stitcher::scaleout::owner::{Msg, Out, Shard};
use stitcher::scaleout::state::{Kv, ShardOverlay, ShardView};
use stitcher::stitch::Stitcher;
use stitcher::store::Store;

/// Events per batch of the measured stream.
pub const BATCH: usize = 2000;

/// The measured stream over a store preloaded with `persons` persons of ten identifiers each: most events
/// come back for a known person with a fresh cookie (lookup hit, profile read-modify-write), some are new
/// anonymous visitors, some log a recent visitor in (a merge into a known profile). Its events are dated
/// after the preload's.
pub struct Stream {
    rng: SmallRng,
    persons: u64,
    next: u64,
    visitors: Vec<u64>,
}

pub fn person_identifiers(p: u64) -> Vec<Identifier> {
    let mut ids = vec![
        Identifier::new("customer_id", format!("C{p}")),
        Identifier::new("email", format!("person{p}@example.org")),
        Identifier::new("phone", format!("+1207{:07}", p % 10_000_000)),
        Identifier::new("loyalty_id", format!("LC{p}")),
    ];
    for k in 0..3 {
        ids.push(Identifier::new("device_id", format!("dv-{p}-{k}")));
        ids.push(Identifier::new("anonymous_id", format!("ck-{p}-{k}")));
    }
    ids
}

pub fn event(id: u64, identifiers: Vec<Identifier>) -> Event {
    Event::new(
        format!("b-{id}"),
        "web",
        "page_view",
        1_767_225_600_000 + id as i64,
        identifiers,
    )
}

impl Stream {
    pub fn new(persons: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(9),
            persons,
            next: 0,
            visitors: Vec::new(),
        }
    }

    pub fn next_event(&mut self) -> Event {
        self.next += 1;
        let n = self.next;
        let roll = self.rng.gen_range(0..10);
        let ids = if roll < 7 || self.visitors.is_empty() && roll >= 9 {
            let p = self.rng.gen_range(0..self.persons);
            vec![
                Identifier::new("email", format!("person{p}@example.org")),
                Identifier::new("anonymous_id", format!("ck-{p}-r{n}")),
            ]
        } else if roll < 9 {
            self.visitors.push(n);
            vec![
                Identifier::new("anonymous_id", format!("visitor-{n}")),
                Identifier::new("device_id", format!("vdev-{n}")),
            ]
        } else {
            let v = self
                .visitors
                .swap_remove(self.rng.gen_range(0..self.visitors.len()));
            let p = self.rng.gen_range(0..self.persons);
            vec![
                Identifier::new("anonymous_id", format!("visitor-{v}")),
                Identifier::new("customer_id", format!("C{p}")),
            ]
        };
        // Dated after every preloaded event, as live traffic is: an event dated before a profile's first
        // event re-anchors the profile (a new public id, the old one redirected), which a backfill does but
        // live traffic seldom does.
        event(self.persons + n, ids)
    }
}

/// Applies events in batches the way one instance does: every event through the owner protocol of a
/// single shard (dedup at its home, locate, apply at the owner), an overlay per batch, one write (unsynced,
/// as the service's local write is).
pub fn apply_batch(store: &Store, stitcher: &Stitcher, events: &[Event]) {
    let mut overlay = ShardOverlay::new(store);
    apply_events(&mut overlay, stitcher, events);
    store
        .write_shard_changes(overlay.into_changes().expect("encode"), [])
        .expect("write");
}

/// Every event through the owner protocol of a single shard held in `kv`.
pub fn apply_events<K: Kv + ?Sized>(kv: &mut K, stitcher: &Stitcher, events: &[Event]) {
    for ev in events {
        let mut queue = vec![Msg::Event(Box::new(ev.clone()))];
        while let Some(msg) = queue.pop() {
            let mut out = Out::default();
            let mut view = ShardView {
                kv: &mut *kv,
                shard: 0,
            };
            Shard {
                view: &mut view,
                shards: 1,
                suppression: None,
            }
            .handle(stitcher, msg, &mut out)
            .expect("handle");
            queue.extend(out.msgs.into_iter().map(|(_, m)| m));
        }
    }
}

/// The preload: `persons` persons of ten identifiers each, in batches of 10,000 events.
pub fn preload(persons: u64, mut apply: impl FnMut(&[Event])) {
    let mut batch = Vec::with_capacity(10_000);
    for p in 0..persons {
        let mut e = event(p, person_identifiers(p));
        e.event_id = format!("pre-{p}");
        batch.push(e);
        if batch.len() == 10_000 {
            apply(&batch);
            batch.clear();
        }
    }
    apply(&batch);
}
