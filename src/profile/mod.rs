//! Enrichment: what we know about one person, built from every channel.
//!
//! Every field is a join of the events applied (sums, minimums, maximums, last-writer-wins by event time),
//! so applying the same set of events in any order, or merging two profiles in any order, gives the same
//! profile. That is what lets a crashed and restarted run, or a different interleaving of partitions,
//! produce exactly the same output.

pub mod story;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Event, Identifier, Millis, ProfileId, Venue};
pub use story::{Enrichment, Story};

/// Reads a map as a `BTreeMap` writes it, keys in order (every stored profile and part): built in one
/// pass from its entries (`FromIterator` finds them sorted and builds the tree bottom up) rather than by
/// inserting each one with a search from the root. A profile's identifiers (dozens for a customer seen on
/// many devices, up to `guardrails.max_profile_identifiers`) made that search a third of reading such a
/// profile (docs/BENCHMARKS.md, thirty-seventh session). Entries out of order or
/// repeated give the map inserting them in turn gives: they are sorted stably, and the last of equal keys
/// is kept. For `#[serde(deserialize_with)]` on the profile's maps; the encoding does not change.
pub(crate) fn sorted_map<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(std::marker::PhantomData<(K, V)>);

    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> serde::de::Visitor<'de>
        for Entries<K, V>
    {
        type Value = BTreeMap<K, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            // A corrupt count cannot reserve more than this; the vector grows past it if it must.
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries.into_iter().collect())
        }
    }

    d.deserialize_map(Entries(std::marker::PhantomData))
}

/// First and last time something was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub first: Millis,
    pub last: Millis,
}

impl Seen {
    pub fn at(ts: Millis) -> Self {
        Self {
            first: ts,
            last: ts,
        }
    }

    pub fn observe(&mut self, ts: Millis) {
        self.first = self.first.min(ts);
        self.last = self.last.max(ts);
    }

    pub fn join(&mut self, other: Seen) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelActivity {
    pub seen: Seen,
    pub events: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub orders: u64,
    pub revenue_minor: i64,
}

impl Totals {
    /// Adds `other`; saturates instead of overflowing (amounts are bounded per event by
    /// `limits.max_amount`, so only an implausible number of orders reaches the bound).
    fn add(&mut self, other: Totals) {
        self.orders = self.orders.saturating_add(other.orders);
        self.revenue_minor = self.revenue_minor.saturating_add(other.revenue_minor);
    }
}

/// Adds `n` under `key`, which becomes a `String` only when it is new (most events repeat a key).
fn add_count<K: AsRef<str> + Into<String>>(counts: &mut BTreeMap<String, u64>, key: K, n: u64) {
    match counts.get_mut(key.as_ref()) {
        Some(slot) => *slot = slot.saturating_add(n),
        None => {
            counts.insert(key.into(), n);
        }
    }
}

/// Keeps the [`bounds::EVENT_TYPES`] smallest event types and adds the counts of the others up under
/// [`bounds::OTHER_EVENT_TYPES`]: the smallest keys of a union are the smallest of its parts, so this
/// commutes with joins.
fn bound_event_types(types: &mut BTreeMap<String, u64>) {
    let named = types.len() - usize::from(types.contains_key(bounds::OTHER_EVENT_TYPES));
    if named <= bounds::EVENT_TYPES {
        return;
    }
    let other = types.remove(bounds::OTHER_EVENT_TYPES).unwrap_or(0);
    let excess: u64 = types
        .split_off(
            types
                .keys()
                .nth(bounds::EVENT_TYPES)
                .cloned()
                .unwrap_or_default()
                .as_str(),
        )
        .into_values()
        .fold(other, u64::saturating_add);
    types.insert(bounds::OTHER_EVENT_TYPES.to_string(), excess);
}

/// Keeps the first [`bounds::PURCHASE_TOTALS`] (venue, currency) totals.
fn bound_purchases(purchases: &mut BTreeMap<(Venue, String), Totals>) {
    while purchases.len() > bounds::PURCHASE_TOTALS {
        purchases.pop_last();
    }
}

/// A value that the latest event (by event time, then event id) decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest<T> {
    pub at: Millis,
    pub event_id: String,
    pub value: T,
}

impl<T: Clone> Latest<T> {
    fn newer_than(&self, other: &Latest<T>) -> bool {
        (self.at, &self.event_id) > (other.at, &other.event_id)
    }

    /// Keeps whichever of the two is later.
    pub fn join(slot: &mut Option<Latest<T>>, candidate: Latest<T>) {
        match slot {
            Some(current) if !candidate.newer_than(current) => {}
            _ => *slot = Some(candidate),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailEngagement {
    pub opens: u64,
    pub clicks: u64,
    pub last_open_at: Option<Millis>,
    /// The latest click and its campaign.
    pub last_click: Option<Latest<Option<String>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CartLine {
    pub added_at: Millis,
    pub sku: String,
    pub quantity: i32,
    pub price_minor: Option<i64>,
    pub channel: String,
    pub event_id: String,
}

/// Bounds on what one profile holds, so that a profile update always fits in a Kafka record (README
/// "Bounds"). Each bound keeps a deterministic subset of the union of what was applied (the newest cart
/// lines, the smallest keys), so merges stay commutative and associative: truncating before or after a join
/// gives the same profile.
pub mod bounds {
    /// Cart lines kept: the newest since the last purchase.
    pub const CART_LINES: usize = 100;
    /// Per-sku removals kept: the newest since the last purchase.
    pub const CART_REMOVALS: usize = 400;
    /// Distinct event types counted one by one; the counts of the others add up under [`OTHER_EVENT_TYPES`].
    pub const EVENT_TYPES: usize = 64;
    /// The key of the event types beyond [`EVENT_TYPES`].
    pub const OTHER_EVENT_TYPES: &str = "(other)";
    /// Purchase totals per (venue, currency) kept: the first in (venue, currency) order.
    pub const PURCHASE_TOTALS: usize = 32;
}

/// The open cart that follows the customer across channels: lines added anywhere, cleared by a purchase
/// anywhere. Clearing is recorded as a time so that a late-arriving older add stays cleared.
///
/// `lines` holds the newest [`bounds::CART_LINES`] lines added after the last clearing, including lines
/// removed since (a removal is per sku and not a time threshold, so pruning on it would make truncation
/// depend on the order of joins); [`Cart::open_lines`] is the cart as the customer sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    pub lines: Vec<CartLine>,
    pub cleared_at: Option<Millis>,
    /// Per sku, the latest removal.
    #[serde(deserialize_with = "sorted_map")]
    pub removed: BTreeMap<String, Millis>,
}

impl Cart {
    fn live(&self, line: &CartLine) -> bool {
        self.cleared_at.is_none_or(|c| line.added_at > c)
            && self
                .removed
                .get(&line.sku)
                .is_none_or(|r| line.added_at > *r)
    }

    /// The lines in the cart now: added after the last clearing and not removed since.
    pub fn open_lines(&self) -> impl Iterator<Item = &CartLine> {
        self.lines.iter().filter(|l| self.live(l))
    }

    fn prune(&mut self) {
        let cleared = self.cleared_at;
        let after_clearing = |at: Millis| cleared.is_none_or(|c| at > c);
        let mut lines = std::mem::take(&mut self.lines);
        lines.retain(|l| after_clearing(l.added_at));
        lines.sort();
        lines.dedup();
        let excess = lines.len().saturating_sub(bounds::CART_LINES);
        lines.drain(..excess);
        self.lines = lines;
        self.removed.retain(|_, at| after_clearing(*at));
        if self.removed.len() > bounds::CART_REMOVALS {
            let mut newest: Vec<(Millis, String)> = std::mem::take(&mut self.removed)
                .into_iter()
                .map(|(sku, at)| (at, sku))
                .collect();
            newest.sort_unstable_by(|a, b| b.cmp(a));
            newest.truncate(bounds::CART_REMOVALS);
            self.removed = newest.into_iter().map(|(at, sku)| (sku, at)).collect();
        }
    }

    pub fn join(&mut self, other: Cart) {
        self.lines.extend(other.lines);
        self.cleared_at = self.cleared_at.max(other.cleared_at);
        for (sku, at) in other.removed {
            let slot = self.removed.entry(sku).or_insert(at);
            *slot = (*slot).max(at);
        }
        self.prune();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub cross_channel: Option<Latest<bool>>,
    /// The channel of the event that set `cross_channel`: a refusing profile is sealed to it.
    pub cross_channel_on: Option<String>,
    pub email_marketing: Option<Latest<bool>>,
}

impl Consent {
    /// Whether the person refused cross-channel identification.
    pub fn cross_channel_refused(&self) -> bool {
        matches!(&self.cross_channel, Some(Latest { value: false, .. }))
    }

    /// The channel a refusing person is sealed to.
    pub fn sealed_to(&self) -> Option<&str> {
        if self.cross_channel_refused() {
            self.cross_channel_on.as_deref()
        } else {
            None
        }
    }

    fn join_cross_channel(&mut self, candidate: Latest<bool>, channel: Option<String>) {
        let newer = match &self.cross_channel {
            Some(current) => candidate.newer_than(current),
            None => true,
        };
        if newer {
            self.cross_channel = Some(candidate);
            self.cross_channel_on = channel;
        }
    }
}

/// A profile's consent seal and whether it is a shared identifier's: what every event looks at before it
/// is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// The channel a person who refused cross-channel identification is sealed to.
    pub sealed_to: Option<String>,
    pub shared: bool,
}

impl Seal {
    fn of(consent: &Consent, shared: bool) -> Self {
        Self {
            sealed_to: consent.sealed_to().map(str::to_string),
            shared,
        }
    }

    /// Whether an event of `channel` must live in that channel's own identity space: sealed to another
    /// channel, and not a shared identifier's profile.
    pub fn seals_out(&self, channel: &str) -> bool {
        self.sealed_to
            .as_deref()
            .is_some_and(|home| home != channel)
            && !self.shared
    }
}

/// The leading fields of a stored [`Profile`], in its order, up to `shared`: decoded from a stored
/// profile's bytes without the story and what follows it (postcard reads fields in order and leaves the
/// rest), for the looks at consent and sharing that every event takes.
#[derive(Debug, Deserialize)]
pub struct ProfileHead {
    anchor: (Millis, String),
    #[serde(deserialize_with = "sorted_map")]
    identifiers: BTreeMap<Identifier, Seen>,
    _seen: Seen,
    _events: u64,
    #[serde(deserialize_with = "sorted_map")]
    _channels: BTreeMap<String, ChannelActivity>,
    #[serde(deserialize_with = "sorted_map")]
    _event_types: BTreeMap<String, u64>,
    #[serde(deserialize_with = "sorted_map")]
    _purchases: BTreeMap<(Venue, String), Totals>,
    _email: EmailEngagement,
    _cart: Cart,
    consent: Consent,
    shared: bool,
}

impl ProfileHead {
    pub fn seal(&self) -> Seal {
        Seal::of(&self.consent, self.shared)
    }

    /// The public id, as [`Profile::id`].
    pub fn id(&self) -> ProfileId {
        ProfileId::from_anchor(&self.anchor.1)
    }

    pub fn identifiers(&self) -> impl Iterator<Item = &Identifier> {
        self.identifiers.keys()
    }

    pub fn holds(&self, id: &Identifier) -> bool {
        self.identifiers.contains_key(id)
    }
}

/// Everything known about one person. Stored in RocksDB, emitted as schemas/profile_update.avsc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The earliest event (time, id); the public profile id derives from it.
    pub anchor: (Millis, String),
    #[serde(deserialize_with = "sorted_map")]
    pub identifiers: BTreeMap<Identifier, Seen>,
    pub seen: Seen,
    pub events: u64,
    #[serde(deserialize_with = "sorted_map")]
    pub channels: BTreeMap<String, ChannelActivity>,
    #[serde(deserialize_with = "sorted_map")]
    pub event_types: BTreeMap<String, u64>,
    #[serde(deserialize_with = "sorted_map")]
    pub purchases: BTreeMap<(Venue, String), Totals>,
    pub email: EmailEngagement,
    pub cart: Cart,
    pub consent: Consent,
    /// The profile of one shared identifier (see `guardrails.shared_limits`): it holds only that
    /// identifier and never merges.
    pub shared: bool,
    /// The timeline, switchpoints, errand, interests, preferences and computed traits.
    pub story: Story,
    /// Identity changes so far (docs/DESIGN.md, "The identity change stream"): only increases while one
    /// profile id lives, across merges, splits and moves. Not a function of the set of events.
    pub version: u64,
    /// Per input partition (topic, partition), the largest offset of an event in this profile: what a
    /// read-your-writes lookup waits for (README "HTTP").
    #[serde(deserialize_with = "sorted_map")]
    pub positions: BTreeMap<(String, i32), i64>,
}

impl Profile {
    /// A profile made from its first event.
    pub fn new(event: &Event, cfg: &Enrichment) -> Self {
        let mut p = Self::empty();
        p.apply(event, &event.identifiers, cfg);
        p
    }

    /// An identifier's part (a profile without identifiers: the unit that splits carry, docs/DESIGN.md
    /// "Evidence and parts") with one more event: `part`, or a new one, with the event applied in place,
    /// which is joining the event's own part into it (parts join like profiles).
    pub fn part_with(part: Option<Box<Self>>, event: &Event, cfg: &Enrichment) -> Box<Self> {
        let mut p = part.unwrap_or_else(|| Box::new(Self::empty()));
        p.apply(event, &[], cfg);
        p
    }

    /// A profile with nothing in it yet, to absorb parts into: its anchor and times are neutral elements.
    pub fn empty() -> Self {
        Profile {
            anchor: (Millis::MAX, String::new()),
            identifiers: BTreeMap::new(),
            seen: Seen {
                first: Millis::MAX,
                last: Millis::MIN,
            },
            events: 0,
            channels: BTreeMap::new(),
            event_types: BTreeMap::new(),
            purchases: BTreeMap::new(),
            email: EmailEngagement::default(),
            cart: Cart::default(),
            consent: Consent {
                cross_channel: None,
                cross_channel_on: None,
                email_marketing: None,
            },
            shared: false,
            story: Story::default(),
            version: 0,
            positions: BTreeMap::new(),
        }
    }

    /// Whether anything was absorbed into a profile made by [`Profile::empty`].
    pub fn has_events(&self) -> bool {
        self.events > 0
    }

    /// The channel a profile is sealed to: set while the person refuses cross-channel identification.
    pub fn sealed_to(&self) -> Option<&str> {
        self.consent.sealed_to()
    }

    pub fn seal(&self) -> Seal {
        Seal::of(&self.consent, self.shared)
    }

    pub fn id(&self) -> ProfileId {
        ProfileId::from_anchor(&self.anchor.1)
    }

    /// Counts of identifiers per type.
    pub fn type_counts(&self) -> BTreeMap<&str, usize> {
        // The identifiers are in order of type: counted by run, each run's type scoped or not looked up
        // once (a profile has a dozen identifiers of three or four types).
        let mut counts = BTreeMap::new();
        let mut keys = self
            .identifiers
            .keys()
            .map(|id| id.kind.as_str())
            .peekable();
        while let Some(kind) = keys.next() {
            let mut n = 1;
            while keys.next_if_eq(&kind).is_some() {
                n += 1;
            }
            *counts.entry(crate::model::base_kind(kind)).or_insert(0) += n;
        }
        counts
    }

    /// Whether the person said no to being recognised across channels (latest consent event wins).
    pub fn cross_channel_refused(&self) -> bool {
        self.consent.cross_channel_refused()
    }

    /// Applies one event; `linked` are the event's identifiers that now belong to this profile (guardrails
    /// may have kept some out).
    pub fn apply(&mut self, ev: &Event, linked: &[Identifier], cfg: &Enrichment) {
        let ts = ev.timestamp;
        if self.anchor.1.is_empty() || (ts, &ev.event_id) < (self.anchor.0, &self.anchor.1) {
            self.anchor = (ts, ev.event_id.clone());
        }
        self.observe_identifiers(linked, ts);
        self.seen.observe(ts);
        self.events = self.events.saturating_add(1);
        match self.channels.get_mut(&ev.channel) {
            Some(c) => {
                c.seen.observe(ts);
                c.events = c.events.saturating_add(1);
            }
            None => {
                let c = ChannelActivity {
                    seen: Seen::at(ts),
                    events: 1,
                };
                self.channels.insert(ev.channel.clone(), c);
            }
        }
        add_count(&mut self.event_types, &ev.event_type, 1);
        bound_event_types(&mut self.event_types);
        if let Some(p) = &ev.purchase {
            self.purchases
                .entry((p.venue, p.currency.clone()))
                .or_default()
                .add(Totals {
                    orders: 1,
                    revenue_minor: p.amount_minor,
                });
            bound_purchases(&mut self.purchases);
        }
        match ev.event_type.as_str() {
            "email_open" => {
                self.email.opens = self.email.opens.saturating_add(1);
                self.email.last_open_at = self.email.last_open_at.max(Some(ts));
            }
            "email_click" => {
                self.email.clicks = self.email.clicks.saturating_add(1);
                Latest::join(
                    &mut self.email.last_click,
                    Latest {
                        at: ts,
                        event_id: ev.event_id.clone(),
                        value: ev.campaign_id.clone(),
                    },
                );
            }
            "add_to_cart" => {
                self.cart.lines.extend(ev.items.iter().map(|item| CartLine {
                    added_at: ts,
                    sku: item.sku.clone(),
                    quantity: item.quantity,
                    price_minor: item.price.map(crate::model::to_minor_units),
                    channel: ev.channel.clone(),
                    event_id: ev.event_id.clone(),
                }));
                self.cart.prune();
            }
            "remove_from_cart" => {
                for item in &ev.items {
                    let slot = self.cart.removed.entry(item.sku.clone()).or_insert(ts);
                    *slot = (*slot).max(ts);
                }
                self.cart.prune();
            }
            _ => {}
        }
        if ev.purchase.is_some() {
            self.cart.cleared_at = self.cart.cleared_at.max(Some(ts));
            self.cart.prune();
        }
        if let Some(consent) = &ev.consent {
            let latest = |value| Latest {
                at: ts,
                event_id: ev.event_id.clone(),
                value,
            };
            if let Some(v) = consent.cross_channel {
                self.consent
                    .join_cross_channel(latest(v), Some(ev.channel.clone()));
            }
            if let Some(v) = consent.email_marketing {
                Latest::join(&mut self.consent.email_marketing, latest(v));
            }
        }
        self.story.apply(cfg, ev);
        if let Some(o) = &ev.origin {
            // A profile's input partitions are few: found by a scan, so that the topic is copied only
            // for a partition new to the profile.
            let mine = self
                .positions
                .iter_mut()
                .find(|((topic, p), _)| *p == o.partition && *topic == o.topic);
            match mine {
                Some((_, at)) => *at = (*at).max(o.offset),
                None => {
                    self.positions
                        .insert((o.topic.clone(), o.partition), o.offset);
                }
            }
        }
    }

    /// Records that `ids` were seen at `ts`.
    pub fn observe_identifiers(&mut self, ids: &[Identifier], ts: Millis) {
        for id in ids {
            match self.identifiers.get_mut(id) {
                Some(seen) => seen.observe(ts),
                None => {
                    self.identifiers.insert(id.clone(), Seen::at(ts));
                }
            }
        }
    }

    /// Absorbs another profile (a merge). Commutative and associative.
    pub fn absorb(&mut self, other: Profile) {
        if other.anchor < self.anchor {
            self.anchor = other.anchor;
        }
        for (id, seen) in other.identifiers {
            self.identifiers
                .entry(id)
                .and_modify(|s| s.join(seen))
                .or_insert(seen);
        }
        self.seen.join(other.seen);
        self.events = self.events.saturating_add(other.events);
        for (ch, act) in other.channels {
            self.channels
                .entry(ch)
                .and_modify(|c| {
                    c.seen.join(act.seen);
                    c.events = c.events.saturating_add(act.events);
                })
                .or_insert(act);
        }
        for (t, n) in other.event_types {
            add_count(&mut self.event_types, t, n);
        }
        bound_event_types(&mut self.event_types);
        for (k, t) in other.purchases {
            self.purchases.entry(k).or_default().add(t);
        }
        bound_purchases(&mut self.purchases);
        self.email.opens = self.email.opens.saturating_add(other.email.opens);
        self.email.clicks = self.email.clicks.saturating_add(other.email.clicks);
        self.email.last_open_at = self.email.last_open_at.max(other.email.last_open_at);
        if let Some(c) = other.email.last_click {
            Latest::join(&mut self.email.last_click, c);
        }
        self.cart.join(other.cart);
        if let Some(c) = other.consent.cross_channel {
            self.consent
                .join_cross_channel(c, other.consent.cross_channel_on);
        }
        self.shared |= other.shared;
        if let Some(c) = other.consent.email_marketing {
            Latest::join(&mut self.consent.email_marketing, c);
        }
        self.story.join(other.story);
        self.version = self.version.max(other.version);
        for (at, offset) in other.positions {
            let mine = self.positions.entry(at).or_insert(offset);
            *mine = (*mine).max(offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Item, Purchase};

    #[derive(Deserialize)]
    struct Sorted(#[serde(deserialize_with = "sorted_map")] BTreeMap<(u8, String), u8>);

    proptest::proptest! {
        /// A map read in one pass is the map read by inserting its entries in turn, in or out of order,
        /// with repeated keys too (a map's encoding in postcard is its entries' count and then the entries,
        /// as a list of pairs is).
        #[test]
        fn a_map_read_sorted_is_the_map_read_entry_by_entry(
            entries in proptest::collection::vec(((0u8..4, "[ab]{0,2}"), proptest::num::u8::ANY), 0..40),
            sort in proptest::bool::ANY,
        ) {
            let mut entries = entries;
            if sort {
                entries.sort();
            }
            let bytes = postcard::to_allocvec(&entries).unwrap();
            let one_by_one: BTreeMap<(u8, String), u8> = postcard::from_bytes(&bytes).unwrap();
            let Sorted(sorted) = postcard::from_bytes(&bytes).unwrap();
            proptest::prop_assert_eq!(sorted, one_by_one);
        }
    }

    #[test]
    fn type_counts_count_scoped_identifiers_with_their_type() {
        let mut p = Profile::empty();
        let ids: Vec<Identifier> = [
            ("email", "a"),
            ("email@web", "a"),
            ("anonymous_id", "1"),
            ("email", "b"),
            ("anonymous_id", "2"),
            ("anonymous_id@app", "3"),
            ("phone", "4"),
        ]
        .into_iter()
        .map(|(k, v)| Identifier::new(k, v))
        .collect();
        p.observe_identifiers(&ids, 1);
        let want: BTreeMap<&str, usize> = [("anonymous_id", 3), ("email", 3), ("phone", 1)].into();
        assert_eq!(p.type_counts(), want);
    }

    fn cfg() -> Enrichment {
        Enrichment::default()
    }

    fn ev(id: &str, ts: Millis, kind: &str, ids: &[(&str, &str)]) -> Event {
        let channel = if kind == "purchase" { "pos" } else { "web" };
        let ids = ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect();
        Event {
            purchase: (kind == "purchase").then(|| Purchase {
                amount_minor: 1000,
                currency: "EUR".into(),
                venue: Venue::Store,
            }),
            items: if kind == "add_to_cart" {
                vec![Item {
                    sku: format!("sku-{id}"),
                    quantity: 1,
                    price: Some(5.0),
                }]
            } else {
                vec![]
            },
            ..Event::new(id, channel, kind, ts, ids)
        }
    }

    /// The head of a stored profile is read from the leading fields of its record: whatever the story and
    /// the fields after it hold, the seal is the whole profile's.
    #[test]
    fn the_seal_read_from_a_stored_head_is_the_profiles() {
        use crate::model::ConsentChange;
        use crate::store::{decode_value, encode_value};
        let mut refusing = ev("r", 10, "add_to_cart", &[("email", "x@y.io")]);
        refusing.consent = Some(ConsentChange {
            cross_channel: Some(false),
            email_marketing: Some(true),
        });
        refusing
            .attributes
            .insert("preference.size".into(), "M".into());
        let events = [
            refusing,
            ev("a", 20, "purchase", &[("email", "x@y.io")]),
            ev("b", 30, "page_view", &[("anonymous_id", "c1")]),
        ];
        let mut p = Profile::new(&events[0], &cfg());
        for e in &events[1..] {
            p.apply(e, &e.identifiers, &cfg());
        }
        p.positions.insert(("web".into(), 0), 41);
        p.version = 7;
        assert_eq!(p.seal().sealed_to.as_deref(), Some("web"));
        for shared in [false, true] {
            p.shared = shared;
            let stored = encode_value(&p, 256).expect("encode");
            let head: ProfileHead = decode_value(&stored, "shards", "profile").expect("head");
            assert_eq!(head.seal(), p.seal());
            assert_eq!(head.seal().seals_out("pos"), !shared);
            assert!(!head.seal().seals_out("web"));
        }
    }

    #[test]
    fn cart_follows_customer_and_purchase_clears_it() {
        let a = ev("a", 10, "add_to_cart", &[("email", "x@y.io")]);
        let b = ev("b", 20, "purchase", &[("email", "x@y.io")]);
        let c = ev("c", 30, "add_to_cart", &[("email", "x@y.io")]);
        let mut in_order = Profile::new(&a, &cfg());
        in_order.apply(&b, &b.identifiers, &cfg());
        in_order.apply(&c, &c.identifiers, &cfg());
        let mut reversed = Profile::new(&c, &cfg());
        reversed.apply(&b, &b.identifiers, &cfg());
        reversed.apply(&a, &a.identifiers, &cfg());
        assert_eq!(in_order, reversed);
        assert_eq!(in_order.cart.lines.len(), 1);
        assert_eq!(in_order.cart.lines[0].sku, "sku-c");
        assert_eq!(in_order.id(), ProfileId::from_anchor("a"));
    }

    #[test]
    fn absorb_equals_applying_everything_to_one_profile() {
        let events = [
            ev("a", 10, "page_view", &[("anonymous_id", "c1")]),
            ev("b", 5, "purchase", &[("email", "x@y.io")]),
        ];
        let mut one = Profile::new(&events[0], &cfg());
        one.apply(&events[1], &events[1].identifiers, &cfg());
        let mut left = Profile::new(&events[0], &cfg());
        left.absorb(Profile::new(&events[1], &cfg()));
        let mut right = Profile::new(&events[1], &cfg());
        right.absorb(Profile::new(&events[0], &cfg()));
        assert_eq!(one, left);
        assert_eq!(left, right);
        assert_eq!(one.anchor, (5, "b".into()));
        assert_eq!(
            one.purchases[&(Venue::Store, "EUR".into())],
            Totals {
                orders: 1,
                revenue_minor: 1000
            }
        );
    }
}
