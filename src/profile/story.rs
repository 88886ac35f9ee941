//! What every channel sees of a person's story: the recent cross-channel timeline, the channel switches
//! (switchpoints), the open errand, interests and stated preferences, and the computed traits a team
//! declares in its configuration (`[enrichment]`, README "Enrichment").
//!
//! Every value here is a join of what single events contribute, cut to its bound by a rule that commutes
//! with joins: the newest N by (event time, event id), or the keys whose stable hash is smallest (a
//! bottom-k sample: a key kept in a union is kept in every part holding it, so its count stays exact).
//! Merging in any order gives the same story, and a split rebuilds each side from its parts, equal to never
//! having merged. A bound travels with its value (`cap`), so joining needs no configuration; a value made by
//! [`Story::default`] is unbounded (`u32::MAX`), the neutral element of the join.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Latest;
use crate::model::{Event, Millis};

/// The bytes a string field can hold after normalisation (see `MAX_FIELD_LEN` in src/normalize.rs).
pub const MAX_TEXT: usize = 256;
/// Attributes one event may carry.
pub const MAX_ATTRIBUTES: usize = 32;
/// Length of a timeline summary.
const SUMMARY_LEN: usize = 120;
const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;

/// `[enrichment]`: bounds of the story and the computed traits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Enrichment {
    /// Interactions shown on the timeline with their summary, newest first.
    pub timeline: usize,
    /// Interactions kept to find switchpoints in (the newest; at least `timeline`).
    pub journey: usize,
    /// Recent switchpoints shown.
    pub switchpoints: usize,
    /// Categories and products counted per person (a bottom-k sample beyond this many).
    pub interests_kept: usize,
    /// Top categories and products shown.
    pub interests_top: usize,
    /// Stated preferences kept (the first keys in order).
    pub preferences: usize,
    /// Event types that are customer-service contacts (the open errand).
    pub errand_event_types: Vec<String>,
    /// Attribute holding a contact's reason.
    pub errand_reason: String,
    /// Attribute holding a contact's status; `closed`, `resolved` or `done` close the errand.
    pub errand_status: String,
    /// Attribute holding the category of what was viewed or bought.
    pub category: String,
    /// Attributes starting with this are stated preferences (`preference.newsletter_topic = "running"`).
    pub preference_prefix: String,
    /// At most this many traits may be declared.
    pub max_traits: usize,
    pub traits: Vec<TraitDef>,
}

impl Default for Enrichment {
    fn default() -> Self {
        Self {
            timeline: 20,
            journey: 32,
            switchpoints: 5,
            interests_kept: 32,
            interests_top: 5,
            preferences: 16,
            errand_event_types: [
                "call",
                "contact",
                "service_contact",
                "chat",
                "support_ticket",
            ]
            .map(String::from)
            .to_vec(),
            errand_reason: "reason".into(),
            errand_status: "status".into(),
            category: "category".into(),
            preference_prefix: "preference.".into(),
            max_traits: 32,
            traits: Vec::new(),
        }
    }
}

/// How a trait folds the values of its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraitKind {
    Count,
    Sum,
    Min,
    Max,
    First,
    Last,
    /// The most frequent values (top-k).
    Top,
    /// Distinct values, bounded.
    Distinct,
}

impl TraitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TraitKind::Count => "count",
            TraitKind::Sum => "sum",
            TraitKind::Min => "min",
            TraitKind::Max => "max",
            TraitKind::First => "first",
            TraitKind::Last => "last",
            TraitKind::Top => "top",
            TraitKind::Distinct => "distinct",
        }
    }

    fn needs_field(self) -> bool {
        self != TraitKind::Count
    }
}

/// One computed trait (`[[enrichment.traits]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraitDef {
    pub name: String,
    pub kind: TraitKind,
    /// The value folded: `amount`, `campaign_id`, `sku`, `channel`, `event_type`, `currency` or
    /// `attributes.<name>`; not needed for `count`.
    #[serde(default)]
    pub field: Option<String>,
    /// Only events of these types (all when empty).
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Only events of these channels (all when empty).
    #[serde(default)]
    pub channels: Vec<String>,
    /// Only events whose fields (named as `field`) have these values.
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, String>,
    /// A rolling window by event time, ending at the person's newest event (`"30d"`); all time if absent.
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// Values shown by `top`, kept by `distinct`.
    #[serde(default = "default_k")]
    pub k: usize,
}

fn default_k() -> usize {
    10
}

/// The fields a trait may read.
const FIELDS: &[&str] = &[
    "amount",
    "campaign_id",
    "sku",
    "channel",
    "event_type",
    "currency",
];

impl TraitDef {
    /// Bucket width and buckets kept for the window.
    fn buckets(&self) -> (Millis, u32) {
        match self.window {
            None => (0, 1),
            Some(w) => {
                let w = Millis::try_from(w.as_millis()).unwrap_or(Millis::MAX);
                let width = if w < 2 * DAY { HOUR } else { DAY };
                (width, u32::try_from(w / width + 1).unwrap_or(u32::MAX))
            }
        }
    }

    fn matches(&self, ev: &Event) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&ev.event_type))
            && (self.channels.is_empty() || self.channels.contains(&ev.channel))
            && self
                .filter
                .iter()
                .all(|(f, want)| field_values(ev, f).iter().any(|v| v == want))
    }
}

fn check_field(trait_name: &str, field: &str) -> Result<(), String> {
    if FIELDS.contains(&field)
        || field
            .strip_prefix("attributes.")
            .is_some_and(|a| !a.is_empty())
    {
        Ok(())
    } else {
        Err(format!(
            "enrichment.traits {trait_name:?}: unknown field {field:?} (one of {}, or attributes.<name>)",
            FIELDS.join(", ")
        ))
    }
}

/// The values an event has for a trait field (several for `sku`).
fn field_values(ev: &Event, field: &str) -> Vec<String> {
    match field {
        "amount" => ev
            .purchase
            .as_ref()
            .map(|p| Decimal(p.amount_minor).to_string())
            .into_iter()
            .collect(),
        "currency" => ev.purchase.iter().map(|p| p.currency.clone()).collect(),
        "campaign_id" => ev.campaign_id.iter().cloned().collect(),
        "sku" => ev.items.iter().map(|i| i.sku.clone()).collect(),
        "channel" => vec![ev.channel.clone()],
        "event_type" => vec![ev.event_type.clone()],
        other => other
            .strip_prefix("attributes.")
            .and_then(|a| ev.attributes.get(a))
            .cloned()
            .into_iter()
            .collect(),
    }
}

/// Minor units, displayed as a decimal number (`-0.50`).
struct Decimal(i64);

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// A number in thousandths, so that sums are exact and joins associative.
fn milli(text: &str) -> Option<i64> {
    let v: f64 = text.trim().parse().ok()?;
    v.is_finite().then(|| (v * 1000.0).round() as i64)
}

impl Enrichment {
    /// Refuses a configuration that cannot hold: names, fields, bounds, and a story whose worst case takes
    /// more than half of `max_record_bytes` (`output.max_record_bytes`).
    pub fn validate(&self, max_record_bytes: usize) -> Result<(), String> {
        if self.traits.len() > self.max_traits {
            return Err(format!(
                "enrichment: {} traits declared, at most max_traits = {}",
                self.traits.len(),
                self.max_traits
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &self.traits {
            if t.name.is_empty() || t.name.len() > 64 {
                return Err(format!(
                    "enrichment.traits: name {:?} must have 1 to 64 bytes",
                    t.name
                ));
            }
            if !names.insert(&t.name) {
                return Err(format!("enrichment.traits: {:?} declared twice", t.name));
            }
            match (&t.field, t.kind.needs_field()) {
                (None, true) => {
                    return Err(format!(
                        "enrichment.traits {:?}: kind {} needs a field",
                        t.name,
                        t.kind.as_str()
                    ))
                }
                (Some(f), _) => check_field(&t.name, f)?,
                (None, false) => {}
            }
            for f in t.filter.keys() {
                check_field(&t.name, f)?;
            }
            if !(1..=1000).contains(&t.k) {
                return Err(format!(
                    "enrichment.traits {:?}: k = {} not within 1..=1000",
                    t.name, t.k
                ));
            }
            if let Some(w) = t.window {
                if w < Duration::from_secs(3600) || w > Duration::from_secs(400 * 86_400) {
                    return Err(format!(
                        "enrichment.traits {:?}: window {} not within 1h..=400d",
                        t.name,
                        humantime::format_duration(w)
                    ));
                }
            }
        }
        for (what, n, max) in [
            ("timeline", self.timeline, 1000),
            ("journey", self.journey, 10_000),
            ("switchpoints", self.switchpoints, 1000),
            ("interests_kept", self.interests_kept, 10_000),
            ("interests_top", self.interests_top, self.interests_kept),
            ("preferences", self.preferences, 1000),
        ] {
            if n > max {
                return Err(format!("enrichment.{what} = {n}: at most {max}"));
            }
        }
        let worst = self.worst_case_bytes();
        if worst > max_record_bytes / 2 {
            return Err(format!(
                "enrichment: the story of one profile update could reach {worst} bytes with these bounds, \
                 more than half of output.max_record_bytes = {max_record_bytes} (the other half is for \
                 identifiers, counters and the cart); lower timeline, journey, switchpoints, interests_top, \
                 preferences or the traits' k"
            ));
        }
        Ok(())
    }

    /// An upper bound of the bytes the story adds to one profile update (Avro: strings of at most
    /// [`MAX_TEXT`] bytes plus their length, longs of at most 10 bytes).
    pub fn worst_case_bytes(&self) -> usize {
        let text = MAX_TEXT + 2;
        let long = 10;
        let counted = text + long;
        let traits: usize = self
            .traits
            .iter()
            .map(|t| 66 + 10 + 3 * long + text + t.k * counted)
            .sum();
        self.timeline * (long + 3 * text + SUMMARY_LEN + 2)
            + self.journey.saturating_sub(1) * (2 * text + long)
            + self.switchpoints * (6 * text + 2 * long)
            + (3 * text + 2 * long)
            + 2 * self.interests_top * counted
            + self.preferences * 2 * text
            + traits
    }

    /// The story one event contributes.
    pub fn story_of(&self, ev: &Event) -> Story {
        let mut s = Story::default();
        s.apply(self, ev);
        s
    }
}

/// One interaction on the timeline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Interaction {
    pub at: Millis,
    pub event_id: String,
    pub channel: String,
    pub event_type: String,
    /// What happened, shortly: the order total, the campaign, the products, the contact reason.
    pub summary: String,
}

/// The newest interactions, newest first: the newest `cap` (the journey, for switchpoints), of which the
/// newest `summarised` keep their summary (the timeline). An interaction is among the newest N of a union
/// only if it is among the newest N of its part, so cutting commutes with joining for both bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub cap: u32,
    pub summarised: u32,
    pub items: Vec<Interaction>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            cap: u32::MAX,
            summarised: u32::MAX,
            items: Vec::new(),
        }
    }
}

impl Timeline {
    fn cut(&mut self) {
        // Newest first; one entry per event (the one with its summary, should both be there).
        self.items.sort_unstable_by(|a, b| b.cmp(a));
        self.items
            .dedup_by(|later, kept| (later.at, &later.event_id) == (kept.at, &kept.event_id));
        self.items.truncate(self.cap as usize);
        for old in self.items.iter_mut().skip(self.summarised as usize) {
            old.summary.clear();
        }
    }

    /// Adds one interaction to a cut timeline: where it belongs, unless its event is there already or it
    /// is older than everything a full timeline keeps.
    fn push(&mut self, item: Interaction) {
        // Newest first: the position after every interaction newer than `item`.
        let key = (item.at, &item.event_id);
        if let Err(at) = self
            .items
            .binary_search_by(|x| key.cmp(&(x.at, &x.event_id)))
        {
            if at < self.cap as usize {
                self.items.insert(at, item);
                self.items.truncate(self.cap as usize);
                if let Some(old) = self.items.get_mut(self.summarised as usize) {
                    old.summary.clear();
                }
            }
        }
    }

    fn join(&mut self, other: Timeline) {
        self.cap = self.cap.min(other.cap);
        self.summarised = self.summarised.min(other.summarised);
        self.items.extend(other.items);
        self.cut();
    }

    /// The interactions that keep their summary.
    pub fn summarised(&self) -> &[Interaction] {
        &self.items[..self.items.len().min(self.summarised as usize)]
    }
}

/// Counts per key, for at most `cap` keys: those with the smallest stable hash (a bottom-k sample; exact
/// for every person with at most `cap` distinct keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub cap: u32,
    #[serde(deserialize_with = "super::sorted_map")]
    pub counts: BTreeMap<String, u64>,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            cap: u32::MAX,
            counts: BTreeMap::new(),
        }
    }
}

/// FNV-1a: stable across processes and versions, unlike std's hasher.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Counts {
    fn bounded(cap: usize) -> Self {
        Self {
            cap: u32::try_from(cap).unwrap_or(u32::MAX),
            counts: BTreeMap::new(),
        }
    }

    fn cut(&mut self) {
        if self.counts.len() <= self.cap as usize {
            return;
        }
        let mut keys: Vec<(u64, String)> = self
            .counts
            .keys()
            .map(|k| (stable_hash(k), k.clone()))
            .collect();
        keys.sort_unstable();
        for (_, k) in keys.into_iter().skip(self.cap as usize) {
            self.counts.remove(&k);
        }
    }

    fn add(&mut self, key: &str, n: u64) {
        match self.counts.get_mut(key) {
            Some(slot) => *slot = slot.saturating_add(n),
            None => {
                self.counts.insert(key.to_owned(), n);
            }
        }
        self.cut();
    }

    fn join(&mut self, other: Counts) {
        self.cap = self.cap.min(other.cap);
        for (k, n) in other.counts {
            let slot = self.counts.entry(k).or_insert(0);
            *slot = slot.saturating_add(n);
        }
        self.cut();
    }

    /// The `k` most frequent, ties by key.
    pub fn top(&self, k: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> =
            self.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }
}

/// A customer-service contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errand {
    pub channel: String,
    pub reason: Option<String>,
    pub open: bool,
}

/// The fold of one trait within one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acc {
    Count(u64),
    /// Thousandths.
    Sum(i64),
    Min(i64),
    Max(i64),
    /// The earliest value (by event time, then event id).
    First(Latest<String>),
    Last(Latest<String>),
    Top(Counts),
    Distinct(Counts),
}

impl Acc {
    /// Joins `other` in; accumulators of different kinds (a trait whose kind was changed) keep the
    /// smaller kind, so the join stays commutative.
    fn join(&mut self, other: Acc) {
        match (&mut *self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a = a.saturating_add(b),
            (Acc::Sum(a), Acc::Sum(b)) => *a = a.saturating_add(b),
            (Acc::Min(a), Acc::Min(b)) => *a = (*a).min(b),
            (Acc::Max(a), Acc::Max(b)) => *a = (*a).max(b),
            (Acc::First(a), Acc::First(b)) => {
                if (b.at, &b.event_id) < (a.at, &a.event_id) {
                    *a = b;
                }
            }
            (Acc::Last(a), Acc::Last(b)) => {
                if (b.at, &b.event_id) > (a.at, &a.event_id) {
                    *a = b;
                }
            }
            (Acc::Top(a), Acc::Top(b)) | (Acc::Distinct(a), Acc::Distinct(b)) => a.join(b),
            (_, b) => {
                if b.rank() < self.rank() {
                    *self = b;
                }
            }
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Acc::Count(_) => 0,
            Acc::Sum(_) => 1,
            Acc::Min(_) => 2,
            Acc::Max(_) => 3,
            Acc::First(_) => 4,
            Acc::Last(_) => 5,
            Acc::Top(_) => 6,
            Acc::Distinct(_) => 7,
        }
    }
}

/// A trait's folds per time bucket (one bucket, key 0, without a window); the newest `keep` buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraitState {
    /// Bucket width in ms (0: no window).
    pub width: Millis,
    pub keep: u32,
    #[serde(deserialize_with = "super::sorted_map")]
    pub buckets: BTreeMap<Millis, Acc>,
}

impl TraitState {
    fn cut(&mut self) {
        while self.buckets.len() > self.keep as usize {
            self.buckets.pop_first();
        }
    }

    fn join(&mut self, other: TraitState) {
        if (other.width, other.keep) != (self.width, self.keep) {
            // The window was reconfigured: the smaller (width, keep) wins, commutatively.
            if (other.width, other.keep) < (self.width, self.keep) {
                *self = other;
            }
            return;
        }
        for (b, acc) in other.buckets {
            match self.buckets.get_mut(&b) {
                Some(mine) => mine.join(acc),
                None => {
                    self.buckets.insert(b, acc);
                }
            }
        }
        self.cut();
    }

    /// The fold over the window ending at `newest` (all buckets without a window).
    pub fn value(&self, newest: Millis) -> Option<Acc> {
        let (from, last) = if self.width == 0 {
            (Millis::MIN, Millis::MAX)
        } else {
            let last = newest.div_euclid(self.width) * self.width;
            let span = self.width.saturating_mul(Millis::from(self.keep) - 1);
            (last.saturating_sub(span), last)
        };
        let mut out: Option<Acc> = None;
        for (_, acc) in self.buckets.range(from..=last) {
            match &mut out {
                Some(o) => o.join(acc.clone()),
                None => out = Some(acc.clone()),
            }
        }
        out
    }
}

/// Keeps the later of `value` and what `map` holds under `key`.
fn later(map: &mut BTreeMap<String, Latest<String>>, key: String, value: Latest<String>) {
    match map.get_mut(&key) {
        Some(mine) if (value.at, &value.event_id) <= (mine.at, &mine.event_id) => {}
        Some(mine) => *mine = value,
        None => {
            map.insert(key, value);
        }
    }
}

/// Everything of the story that a profile keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Story {
    pub timeline: Timeline,
    pub errand: Option<Latest<Errand>>,
    pub categories: Counts,
    pub products: Counts,
    /// Stated preferences, the latest per key; the first `preferences_cap` keys.
    #[serde(deserialize_with = "super::sorted_map")]
    pub preferences: BTreeMap<String, Latest<String>>,
    pub preferences_cap: u32,
    #[serde(deserialize_with = "super::sorted_map")]
    pub traits: BTreeMap<String, TraitState>,
}

impl Default for Story {
    fn default() -> Self {
        Self {
            timeline: Timeline::default(),
            errand: None,
            categories: Counts::default(),
            products: Counts::default(),
            preferences: BTreeMap::new(),
            preferences_cap: u32::MAX,
            traits: BTreeMap::new(),
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// What an interaction was about, shortly: its parts joined by `; `, written into one string.
fn summary(cfg: &Enrichment, ev: &Event) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let mut first = true;
    let mut part = |args: std::fmt::Arguments<'_>| {
        if !first {
            text.push_str("; ");
        }
        first = false;
        // Writing into a `String` does not fail.
        let _ = text.write_fmt(args);
    };
    if let Some(p) = &ev.purchase {
        part(format_args!(
            "order {} {}",
            Decimal(p.amount_minor),
            p.currency
        ));
    }
    if let Some(c) = &ev.campaign_id {
        part(format_args!("campaign {c}"));
    }
    if let Some(r) = ev.attributes.get(&cfg.errand_reason) {
        part(format_args!("reason {r}"));
    }
    if let Some(c) = ev.attributes.get(&cfg.category) {
        part(format_args!("category {c}"));
    }
    if let Some((first, rest)) = ev.items.split_first() {
        part(format_args!("{}", first.sku));
        for item in rest.iter().take(2) {
            text.push_str(", ");
            text.push_str(&item.sku);
        }
        let more = ev.items.len().saturating_sub(3);
        if more > 0 {
            let _ = write!(text, " +{more}");
        }
    }
    clip(text, SUMMARY_LEN)
}

impl Story {
    /// Lowers the bounds to the configured ones (a join of bounds: the smaller wins).
    fn bound(&mut self, cfg: &Enrichment) {
        let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let bounds = (
            self.timeline.cap.min(cap(cfg.timeline.max(cfg.journey))),
            self.timeline.summarised.min(cap(cfg.timeline)),
        );
        if bounds != (self.timeline.cap, self.timeline.summarised) {
            (self.timeline.cap, self.timeline.summarised) = bounds;
            self.timeline.cut();
        }
        self.categories.cap = self.categories.cap.min(cap(cfg.interests_kept));
        self.products.cap = self.products.cap.min(cap(cfg.interests_kept));
        self.preferences_cap = self.preferences_cap.min(cap(cfg.preferences));
    }

    /// Adds what `ev` tells.
    pub fn apply(&mut self, cfg: &Enrichment, ev: &Event) {
        let at = ev.timestamp;
        self.bound(cfg);
        self.timeline.push(Interaction {
            at,
            event_id: ev.event_id.clone(),
            channel: ev.channel.clone(),
            event_type: ev.event_type.clone(),
            summary: summary(cfg, ev),
        });
        let latest = |value| Latest {
            at,
            event_id: ev.event_id.clone(),
            value,
        };
        let stated = |value: &String| Latest {
            at,
            event_id: ev.event_id.clone(),
            value: value.clone(),
        };
        if cfg.errand_event_types.contains(&ev.event_type) {
            let closed = ev.attributes.get(&cfg.errand_status).is_some_and(|s| {
                matches!(
                    s.to_ascii_lowercase().as_str(),
                    "closed" | "resolved" | "done"
                )
            });
            Latest::join(
                &mut self.errand,
                latest(Errand {
                    channel: ev.channel.clone(),
                    reason: ev.attributes.get(&cfg.errand_reason).cloned(),
                    open: !closed,
                }),
            );
        }
        if let Some(c) = ev.attributes.get(&cfg.category) {
            self.categories.add(c, 1);
        }
        for item in &ev.items {
            self.products.add(&item.sku, 1);
        }
        for (k, v) in &ev.attributes {
            match k.strip_prefix(&cfg.preference_prefix) {
                Some(key) if !key.is_empty() => {
                    later(&mut self.preferences, key.to_string(), stated(v))
                }
                _ => {}
            }
        }
        self.cut_preferences();
        for t in &cfg.traits {
            if !t.matches(ev) {
                continue;
            }
            let values = match &t.field {
                Some(f) => field_values(ev, f),
                None => Vec::new(),
            };
            let acc = match t.kind {
                TraitKind::Count => Some(Acc::Count(1)),
                TraitKind::Sum => {
                    let total: i64 = values.iter().filter_map(|v| milli(v)).sum();
                    (!values.is_empty()).then_some(Acc::Sum(total))
                }
                TraitKind::Min => values.iter().filter_map(|v| milli(v)).min().map(Acc::Min),
                TraitKind::Max => values.iter().filter_map(|v| milli(v)).max().map(Acc::Max),
                TraitKind::First | TraitKind::Last => values.first().map(|v| {
                    let l = Latest {
                        at,
                        event_id: ev.event_id.clone(),
                        value: clip(v.clone(), MAX_TEXT),
                    };
                    if t.kind == TraitKind::First {
                        Acc::First(l)
                    } else {
                        Acc::Last(l)
                    }
                }),
                TraitKind::Top | TraitKind::Distinct => {
                    // `top` counts a sample of keys wider than it shows, so that its top is exact
                    // for most persons.
                    let cap = if t.kind == TraitKind::Top {
                        t.k * 4
                    } else {
                        t.k
                    };
                    let mut c = Counts::bounded(cap);
                    for v in &values {
                        c.add(v, 1);
                    }
                    (!values.is_empty()).then_some(if t.kind == TraitKind::Top {
                        Acc::Top(c)
                    } else {
                        Acc::Distinct(c)
                    })
                }
            };
            let Some(acc) = acc else { continue };
            let (width, keep) = t.buckets();
            let bucket = if width == 0 {
                0
            } else {
                at.div_euclid(width) * width
            };
            let mut one = TraitState {
                width,
                keep,
                buckets: BTreeMap::new(),
            };
            one.buckets.insert(bucket, acc);
            match self.traits.get_mut(&t.name) {
                Some(s) => s.join(one),
                None => {
                    self.traits.insert(t.name.clone(), one);
                }
            }
        }
    }

    fn cut_preferences(&mut self) {
        while self.preferences.len() > self.preferences_cap as usize {
            self.preferences.pop_last();
        }
    }

    /// Joins another story in (a merge). Commutative and associative.
    pub fn join(&mut self, other: Story) {
        self.timeline.join(other.timeline);
        if let Some(e) = other.errand {
            Latest::join(&mut self.errand, e);
        }
        self.categories.join(other.categories);
        self.products.join(other.products);
        for (k, v) in other.preferences {
            later(&mut self.preferences, k, v);
        }
        self.preferences_cap = self.preferences_cap.min(other.preferences_cap);
        self.cut_preferences();
        for (name, t) in other.traits {
            match self.traits.get_mut(&name) {
                Some(mine) => mine.join(t),
                None => {
                    self.traits.insert(name, t);
                }
            }
        }
    }

    /// The channel switches of the kept journey, oldest first: (from, to).
    pub fn switchpoints(&self) -> Vec<(&Interaction, &Interaction)> {
        let steps: Vec<&Interaction> = self.timeline.items.iter().rev().collect();
        steps
            .windows(2)
            .filter(|w| w[0].channel != w[1].channel)
            .map(|w| (w[0], w[1]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Item, Purchase, Venue};
    use proptest::prelude::*;

    /// Small bounds, so that every cut is exercised, and one trait of every kind, some windowed.
    fn cfg() -> Enrichment {
        let t = |name: &str, kind, field: Option<&str>, window: Option<u64>| TraitDef {
            name: name.into(),
            kind,
            field: field.map(str::to_string),
            event_types: vec![],
            channels: vec![],
            filter: BTreeMap::new(),
            window: window.map(|h| Duration::from_secs(h * 3600)),
            k: 2,
        };
        let mut calls = t("web_views_3h", TraitKind::Count, None, Some(3));
        calls.channels = vec!["web".into()];
        calls.event_types = vec!["page_view".into()];
        Enrichment {
            timeline: 3,
            journey: 4,
            switchpoints: 2,
            interests_kept: 2,
            interests_top: 2,
            preferences: 2,
            traits: vec![
                calls,
                t("spend", TraitKind::Sum, Some("amount"), None),
                t("spend_72h", TraitKind::Sum, Some("amount"), Some(72)),
                t("smallest", TraitKind::Min, Some("amount"), None),
                t("largest", TraitKind::Max, Some("attributes.score"), None),
                t("first_channel", TraitKind::First, Some("channel"), None),
                t(
                    "last_reason",
                    TraitKind::Last,
                    Some("attributes.reason"),
                    None,
                ),
                t("top_skus", TraitKind::Top, Some("sku"), None),
                t(
                    "categories_5h",
                    TraitKind::Distinct,
                    Some("attributes.category"),
                    Some(5),
                ),
            ],
            ..Enrichment::default()
        }
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            0u32..40,
            0i64..20,
            0usize..3,
            0usize..4,
            proptest::option::of(0usize..4),
            proptest::option::of(0usize..3),
            proptest::collection::vec(0usize..5, 0..3),
            proptest::option::of(-50i64..500),
        )
            .prop_map(|(n, hour, ch, ty, cat, pref, skus, score)| {
                let kind = ["page_view", "purchase", "call", "add_to_cart"][ty];
                let mut attributes = BTreeMap::new();
                if let Some(c) = cat {
                    attributes.insert("category".into(), format!("cat{c}"));
                }
                if let Some(p) = pref {
                    attributes.insert(format!("preference.k{p}"), format!("v{n}"));
                }
                if kind == "call" {
                    attributes.insert("reason".into(), format!("r{}", n % 3));
                    attributes.insert("status".into(), ["open", "closed"][n as usize % 2].into());
                }
                if let Some(s) = score {
                    attributes.insert("score".into(), format!("{}.5", s));
                }
                let channel = ["web", "app", "callcenter"][ch];
                Event {
                    purchase: (kind == "purchase").then(|| Purchase {
                        amount_minor: i64::from(n) * 101,
                        currency: "EUR".into(),
                        venue: Venue::Online,
                    }),
                    items: skus
                        .into_iter()
                        .map(|s| Item {
                            sku: format!("sku{s}"),
                            quantity: 1,
                            price: None,
                        })
                        .collect(),
                    attributes,
                    ..Event::new(
                        format!("e{n}"),
                        channel,
                        kind,
                        hour * HOUR + i64::from(n),
                        vec![],
                    )
                }
            })
    }

    /// Distinct events (by id, as deduplication upstream guarantees).
    fn arb_events() -> impl Strategy<Value = Vec<Event>> {
        proptest::collection::vec(arb_event(), 1..24).prop_map(|mut v| {
            let mut seen = std::collections::HashSet::new();
            v.retain(|e| seen.insert(e.event_id.clone()));
            v
        })
    }

    fn applied(cfg: &Enrichment, events: &[Event]) -> Story {
        let mut s = Story::default();
        for e in events {
            s.apply(cfg, e);
        }
        s
    }

    proptest! {
        /// Any order and any grouping give the same story: applying one by one, or joining the stories
        /// of groups (merges), in any order. A split or an erasure rebuilds a side as the join of its
        /// remaining parts, so it equals never having merged: the story of just those events.
        #[test]
        fn order_and_grouping_do_not_matter(
            events in arb_events(),
            order in any::<proptest::sample::Index>(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..5),
        ) {
            let cfg = cfg();
            let one = applied(&cfg, &events);
            let mut shuffled = events.clone();
            shuffled.rotate_left(order.index(events.len()));
            shuffled.reverse();
            prop_assert_eq!(&applied(&cfg, &shuffled), &one);

            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(events.len() + 1)).collect();
            bounds.extend([0, events.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            let groups: Vec<Story> = bounds
                .windows(2)
                .map(|w| applied(&cfg, &events[w[0]..w[1]]))
                .collect();
            let mut left = Story::default();
            for g in groups.iter().cloned() {
                left.join(g);
            }
            let mut right = Story::default();
            for g in groups.into_iter().rev() {
                let mut g = g;
                g.join(right);
                right = g;
            }
            prop_assert_eq!(&left, &one);
            prop_assert_eq!(&right, &one);
            // Joining the neutral element changes nothing.
            let mut with_empty = one.clone();
            with_empty.join(Story::default());
            prop_assert_eq!(&with_empty, &one);
        }

        /// Every bound holds after any apply.
        #[test]
        fn bounds_hold(events in arb_events()) {
            let cfg = cfg();
            let s = applied(&cfg, &events);
            prop_assert!(s.timeline.items.len() <= cfg.timeline.max(cfg.journey));
            prop_assert!(s.timeline.items.iter().skip(cfg.timeline).all(|i| i.summary.is_empty()));
            prop_assert!(s.categories.counts.len() <= cfg.interests_kept);
            prop_assert!(s.products.counts.len() <= cfg.interests_kept);
            prop_assert!(s.preferences.len() <= cfg.preferences);
            for t in s.traits.values() {
                prop_assert!(t.buckets.len() <= t.keep as usize);
            }
        }
    }

    fn event(n: u32, at: Millis, channel: &str, kind: &str, attrs: &[(&str, &str)]) -> Event {
        Event {
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Event::new(format!("e{n:02}"), channel, kind, at, vec![])
        }
    }

    /// Every part of a summary, in order, joined by `; `; at most three SKUs and how many more.
    #[test]
    fn a_summary_names_what_the_interaction_was_about() {
        use crate::model::{Item, Purchase, Venue};
        let cfg = Enrichment::default();
        let item = |sku: &str| Item {
            sku: sku.into(),
            quantity: 1,
            price: None,
        };
        let mut ev = event(1, 1_000, "store", "purchase", &[("reason", "gift")]);
        ev.attributes.insert("category".into(), "shoes".into());
        ev.purchase = Some(Purchase {
            amount_minor: -1_205,
            currency: "EUR".into(),
            venue: Venue::Store,
        });
        ev.campaign_id = Some("spring".into());
        ev.items = ["a", "b", "c", "d", "e"].map(item).to_vec();
        assert_eq!(
            summary(&cfg, &ev),
            "order -12.05 EUR; campaign spring; reason gift; category shoes; a, b, c +2"
        );
        ev.items.truncate(2);
        ev.purchase = None;
        assert_eq!(
            summary(&cfg, &ev),
            "campaign spring; reason gift; category shoes; a, b"
        );
        ev.items = vec![item("")];
        ev.attributes.clear();
        assert_eq!(summary(&cfg, &ev), "campaign spring; ");
        ev.items = vec![item(&"x".repeat(200))];
        assert_eq!(summary(&cfg, &ev).len(), SUMMARY_LEN);
        assert_eq!(summary(&cfg, &event(2, 1_000, "web", "page_view", &[])), "");
    }

    #[test]
    fn the_story_of_a_channel_switch() {
        let cfg = Enrichment::default();
        let s = applied(
            &cfg,
            &[
                event(1, 1_000, "web", "page_view", &[("category", "shoes")]),
                event(2, 2_000, "social", "contact", &[("reason", "delivery")]),
                event(
                    3,
                    3_000,
                    "email",
                    "contact",
                    &[("reason", "delivery"), ("status", "Resolved")],
                ),
                event(
                    4,
                    4_000,
                    "web",
                    "page_view",
                    &[("category", "shoes"), ("preference.size", "42")],
                ),
            ],
        );
        let ids: Vec<&str> = s
            .timeline
            .items
            .iter()
            .map(|i| i.event_id.as_str())
            .collect();
        assert_eq!(ids, ["e04", "e03", "e02", "e01"]);
        assert_eq!(s.timeline.items[1].summary, "reason delivery");
        let switches: Vec<(&str, &str)> = s
            .switchpoints()
            .iter()
            .map(|(a, b)| (a.channel.as_str(), b.channel.as_str()))
            .collect();
        assert_eq!(
            switches,
            [("web", "social"), ("social", "email"), ("email", "web")]
        );
        let errand = s.errand.as_ref().unwrap();
        assert_eq!(
            (errand.value.channel.as_str(), errand.value.open),
            ("email", false)
        );
        assert_eq!(errand.value.reason.as_deref(), Some("delivery"));
        assert_eq!(s.categories.top(5), [("shoes".to_string(), 2)]);
        assert_eq!(s.preferences["size"].value, "42");
    }

    #[test]
    fn a_window_counts_only_its_own_time() {
        let mut cfg = cfg();
        cfg.traits.retain(|t| t.name == "web_views_3h");
        let s = applied(
            &cfg,
            &[
                event(1, 0, "web", "page_view", &[]),
                event(2, HOUR, "web", "page_view", &[]),
                event(3, 5 * HOUR, "web", "page_view", &[]),
                event(4, 5 * HOUR + 1, "app", "page_view", &[]),
            ],
        );
        let t = &s.traits["web_views_3h"];
        // Ending at the newest event (hour 5): hours 2..=5 hold one web view.
        assert_eq!(t.value(5 * HOUR + 1), Some(Acc::Count(1)));
        assert_eq!(t.value(HOUR), Some(Acc::Count(2)));
    }

    #[test]
    fn a_configuration_that_cannot_fit_is_refused() {
        let mut cfg = Enrichment::default();
        assert!(cfg.validate(1_000_000).is_ok());
        cfg.timeline = 1000;
        let e = cfg.validate(1_000_000).unwrap_err();
        assert!(e.contains("max_record_bytes"), "{e}");
        let mut cfg = Enrichment::default();
        cfg.traits.push(TraitDef {
            name: "x".into(),
            kind: TraitKind::Sum,
            field: None,
            event_types: vec![],
            channels: vec![],
            filter: BTreeMap::new(),
            window: None,
            k: 10,
        });
        assert!(cfg
            .validate(1_000_000)
            .unwrap_err()
            .contains("needs a field"));
        cfg.traits[0].field = Some("payload.total".into());
        assert!(cfg
            .validate(1_000_000)
            .unwrap_err()
            .contains("unknown field"));
        cfg.traits[0].field = Some("attributes.total".into());
        assert!(cfg.validate(1_000_000).is_ok());
        cfg.traits.push(cfg.traits[0].clone());
        assert!(cfg.validate(1_000_000).unwrap_err().contains("twice"));
    }
}
