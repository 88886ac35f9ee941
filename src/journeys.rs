//! Synthetic omnichannel journeys with a known ground truth, deterministic from a seed.
//!
//! Each person has cookies that rotate, one or two devices, maybe an account (customer id), an email, a
//! phone and a loyalty card. Their journey: anonymous browsing, a login, app sessions, email opens and
//! clicks, carts, store purchases with the loyalty card, calls to support, social logins. Every identifier
//! of a person is connected to the others through the person's events, and no identifier is shared between
//! persons, so the ground truth is one profile per person. Raw values carry realistic noise (case, spaces,
//! national phone formats) that normalisation must undo.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{ChannelEvent, ConsentChange, Item, RawIdentifier};

/// The channels of a generated stream, each with its own topic.
pub const CHANNELS: &[&str] = &["web", "app", "email", "pos", "callcenter", "social"];

#[derive(Debug, Clone)]
pub struct JourneyConfig {
    pub persons: usize,
    pub seed: u64,
    /// Event time of the first event, in ms since the epoch.
    pub start_ms: i64,
    /// Time span over which journeys are spread.
    pub span_ms: i64,
    /// Share of events sent twice (same event id).
    pub duplicate_rate: f64,
    /// Share of messages replaced by garbage (not counted in the truth).
    pub malformed_rate: f64,
    /// Events are shuffled within windows of this many events (0: in time order).
    pub shuffle_window: usize,
    /// Share of persons who live with the previous person and share their home phone. Stitching on phone
    /// then merges two true persons: the quality report shows it as over-merges.
    pub household_rate: f64,
    /// Channels to emit (empty: all of [`CHANNELS`]). Events of other channels are dropped and the truth only
    /// holds identifiers the emitted events carry, so a person seen on one channel only is one profile per
    /// disconnected part: the quality report counts it as under-merged.
    pub channels: Vec<String>,
    /// Adversarial: this many persons (those with an email, in order) also log in on one and the same
    /// device, `SHARED_DEVICE`. It belongs to nobody: the truth leaves it out, and stitching must not let
    /// it glue those persons together.
    pub shared_device_persons: usize,
    /// Adversarial: share of events that also carry a junk identifier (`test@test.com`, `undefined`, ...),
    /// which normalisation must drop.
    pub junk_rate: f64,
}

/// The device id every person of `shared_device_persons` uses.
pub const SHARED_DEVICE: &str = "shared-kiosk-tablet";

/// Junk values put on events by `junk_rate`, as (type, value).
const JUNK: &[(&str, &str)] = &[
    ("email", "test@test.com"),
    ("anonymous_id", "undefined"),
    ("customer_id", "null"),
    ("device_id", "00000000-0000-0000-0000-000000000000"),
];

impl Default for JourneyConfig {
    fn default() -> Self {
        Self {
            persons: 1000,
            seed: 42,
            start_ms: 1_767_225_600_000,
            span_ms: 30 * 24 * 3600 * 1000,
            duplicate_rate: 0.0,
            malformed_rate: 0.0,
            shuffle_window: 0,
            household_rate: 0.0,
            channels: Vec::new(),
            shared_device_persons: 0,
            junk_rate: 0.0,
        }
    }
}

/// One person's ground truth: normalised identifiers and what their profile must sum to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonTruth {
    pub person: usize,
    /// (type, normalised value), sorted.
    pub identifiers: BTreeSet<(String, String)>,
    pub events: u64,
    /// "venue/currency" -> (orders, revenue in minor units).
    pub purchases: BTreeMap<String, (u64, i64)>,
    pub channels: BTreeMap<String, u64>,
    /// The story under the default `[enrichment]` bounds (src/profile/story.rs), computed here directly
    /// from the person's events.
    #[serde(default)]
    pub story: StoryTruth,
}

/// What a person's profile must tell every channel, for the default enrichment bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StoryTruth {
    /// Event ids of the newest interactions, newest first.
    pub timeline: Vec<String>,
    /// `from>to` -> channel switches among the newest journey steps.
    pub switch_counts: BTreeMap<String, u64>,
    /// The latest contact: (channel, reason, open).
    pub errand: Option<(String, Option<String>, bool)>,
    /// The categories seen most, with their counts: most first, then by name.
    pub top_categories: Vec<(String, u64)>,
    /// Stated preferences.
    pub preferences: BTreeMap<String, String>,
    /// The traits of [`TRUTH_TRAITS`], rendered by [`render_trait`].
    pub traits: BTreeMap<String, String>,
}

/// Computed traits whose values the ground truth knows (`[enrichment]` TOML): the end-to-end tests and the
/// demo declare them.
pub const TRUTH_TRAITS: &str = r#"
[[enrichment.traits]]
name = "contacts"
kind = "count"
event_types = ["call", "contact"]

[[enrichment.traits]]
name = "contacts_7d"
kind = "count"
event_types = ["call", "contact"]
window = "7d"

[[enrichment.traits]]
name = "spend"
kind = "sum"
field = "amount"

[[enrichment.traits]]
name = "favourite_categories"
kind = "top"
field = "attributes.category"
k = 2

[[enrichment.traits]]
name = "channels_used"
kind = "distinct"
field = "channel"
k = 8

[[enrichment.traits]]
name = "first_channel"
kind = "first"
field = "channel"
"#;

/// One trait value as text, the same for the truth and for a profile update: a count, a number to
/// thousandths, a text, or `value:count` pairs (in the order given: top most first, distinct by value).
pub fn render_trait(
    count: Option<i64>,
    number: Option<f64>,
    text: Option<&str>,
    values: &[(String, i64)],
) -> String {
    match (count, number, text) {
        (Some(n), _, _) if values.is_empty() => n.to_string(),
        (_, Some(x), _) => format!("{x:.3}"),
        (_, _, Some(t)) => t.to_string(),
        _ => values
            .iter()
            .map(|(v, n)| format!("{v}:{n}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}

impl StoryTruth {
    /// The story of `events`, by the rules the README gives, without the profile code.
    fn of(events: &[(&str, ChannelEvent)]) -> Self {
        let defaults = crate::profile::Enrichment::default();
        let mut sorted: Vec<&ChannelEvent> = events.iter().map(|(_, e)| e).collect();
        sorted.sort_by(|a, b| (b.timestamp, &b.event_id).cmp(&(a.timestamp, &a.event_id)));
        let mut t = StoryTruth {
            timeline: sorted
                .iter()
                .take(defaults.timeline)
                .map(|e| e.event_id.clone())
                .collect(),
            ..Default::default()
        };
        let steps: Vec<&str> = sorted
            .iter()
            .take(defaults.journey)
            .rev()
            .filter_map(|e| e.channel.as_deref())
            .collect();
        for w in steps.windows(2).filter(|w| w[0] != w[1]) {
            *t.switch_counts
                .entry(format!("{}>{}", w[0], w[1]))
                .or_insert(0) += 1;
        }
        t.errand = sorted
            .iter()
            .find(|e| defaults.errand_event_types.contains(&e.event_type))
            .map(|e| {
                (
                    e.channel.clone().unwrap_or_default(),
                    e.attributes.get("reason").cloned(),
                    e.attributes.get("status").map(String::as_str) != Some("resolved"),
                )
            });
        let mut categories: BTreeMap<&str, u64> = BTreeMap::new();
        for e in &sorted {
            if let Some(c) = e.attributes.get("category") {
                *categories.entry(c).or_insert(0) += 1;
            }
        }
        let mut top: Vec<(String, u64)> = categories
            .into_iter()
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(defaults.interests_top);
        t.top_categories = top;
        for e in sorted.iter().rev() {
            for (k, v) in &e.attributes {
                if let Some(key) = k.strip_prefix("preference.") {
                    t.preferences.insert(key.to_string(), v.clone());
                }
            }
        }
        t.traits = Self::traits_of(&sorted, &t.top_categories);
        t
    }

    /// The values of [`TRUTH_TRAITS`] for events sorted newest first.
    fn traits_of(
        newest_first: &[&ChannelEvent],
        top_categories: &[(String, u64)],
    ) -> BTreeMap<String, String> {
        const DAY: i64 = 24 * 3_600_000;
        let mut out = BTreeMap::new();
        let contacts: Vec<i64> = newest_first
            .iter()
            .filter(|e| matches!(e.event_type.as_str(), "call" | "contact"))
            .map(|e| e.timestamp)
            .collect();
        if let (false, Some(newest)) = (contacts.is_empty(), newest_first.first()) {
            out.insert("contacts".to_string(), contacts.len().to_string());
            // Whole days: the newest event's day and the seven before it.
            let from = newest.timestamp.div_euclid(DAY) - 7;
            let recent = contacts
                .iter()
                .filter(|t| t.div_euclid(DAY) >= from)
                .count();
            if recent > 0 {
                out.insert("contacts_7d".to_string(), recent.to_string());
            }
        }
        let purchases: Vec<i64> = newest_first
            .iter()
            .filter(|e| e.event_type == "purchase")
            .filter_map(|e| e.amount.map(crate::model::to_minor_units))
            .collect();
        if !purchases.is_empty() {
            let cents: i64 = purchases.iter().sum();
            let spend = render_trait(None, Some(cents as f64 / 100.0), None, &[]);
            out.insert("spend".to_string(), spend);
        }
        if !top_categories.is_empty() {
            let top: Vec<(String, i64)> = top_categories
                .iter()
                .take(2)
                .map(|(c, n)| (c.clone(), *n as i64))
                .collect();
            out.insert(
                "favourite_categories".to_string(),
                render_trait(None, None, None, &top),
            );
        }
        let mut channels: BTreeMap<String, i64> = BTreeMap::new();
        for e in newest_first {
            if let Some(c) = &e.channel {
                *channels.entry(c.clone()).or_insert(0) += 1;
            }
        }
        let distinct: Vec<(String, i64)> = channels.into_iter().collect();
        out.insert(
            "channels_used".to_string(),
            render_trait(Some(distinct.len() as i64), None, None, &distinct),
        );
        if let Some(first) = newest_first.last().and_then(|e| e.channel.clone()) {
            out.insert("first_channel".to_string(), first);
        }
        out
    }
}

/// Categories of what generated persons view and cart.
const CATEGORIES: &[&str] = &["shoes", "running", "outdoor", "kitchen", "kids", "beauty"];
/// Reasons generated persons contact customer service for.
const REASONS: &[&str] = &["delivery", "return", "billing", "product_question"];

/// One message to send: the channel (topic chosen by the caller), a key, and either an event or garbage.
// Garbage is rare (≈1%), so boxing every event to shrink the enum would cost more than it saves.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Generated {
    Event {
        channel: &'static str,
        key: String,
        event: ChannelEvent,
    },
    Malformed {
        channel: &'static str,
        key: String,
        bytes: Vec<u8>,
    },
}

/// US area codes in service, for generated phone numbers that validate.
const US_AREA_CODES: &[u16] = &[
    201, 202, 203, 205, 206, 207, 208, 209, 210, 212, 213, 214, 215, 216, 217, 218, 219, 224, 225,
    228, 229, 231, 234, 239, 240, 248, 251, 252, 253, 254, 256, 260, 262, 267, 269, 270, 276, 281,
    301, 302, 303, 304, 305, 307, 308, 309, 310, 312, 313, 314, 315, 316, 317, 318, 319, 320, 321,
    323, 325, 330, 334, 336, 337, 339, 347, 351, 352, 360, 361, 386, 401, 402, 404, 405, 406, 407,
    408, 409, 410, 412, 413, 414, 415, 417, 419, 423, 424, 425, 430, 432, 434, 435, 440, 443, 469,
    478, 479, 480, 484, 501, 502, 503, 504, 505, 507, 508, 509, 510, 512, 513, 515, 516, 517, 518,
    520, 530, 540, 541, 551, 559, 561, 562, 563, 567, 570, 571, 573, 574, 575, 580, 585, 586, 601,
    602, 603, 605, 606, 607, 608, 609, 610, 612, 614, 615, 616, 617, 618, 619, 620, 623, 626, 630,
    631, 636, 641, 646, 650, 651, 660, 661, 662, 678, 682, 701, 702, 703, 704, 706, 707, 708, 712,
    713, 714, 715, 716, 717, 718, 719, 720, 724, 727, 731, 732, 734, 740, 754, 757, 760, 763, 765,
    770, 772, 773, 774, 775, 781, 785, 786, 801, 802, 803, 804, 805, 806, 808, 810, 812, 813, 814,
    815, 816, 817, 818, 828, 830, 831, 832, 843, 845, 847, 848, 850, 856, 857, 858, 859, 860, 862,
    863, 864, 865, 870, 901, 903, 904, 906, 907, 908, 909, 910, 912, 913, 914, 915, 916, 917, 918,
    919, 920, 925, 928, 931, 936, 937, 940, 941, 949, 951, 952, 954, 956, 970, 971, 972, 973, 978,
    979, 980, 985, 989,
];

impl Generated {
    /// The channel whose topic the message goes to.
    pub fn channel(&self) -> &'static str {
        match self {
            Generated::Event { channel, .. } | Generated::Malformed { channel, .. } => channel,
        }
    }
}

pub struct Journeys {
    pub messages: Vec<Generated>,
    pub truth: Vec<PersonTruth>,
    /// Distinct events (excluding duplicates and garbage).
    pub events: usize,
    pub malformed: usize,
    pub duplicates: usize,
}

impl Journeys {
    /// Messages to send, without a truth or counts: a part of a generated run, or hand-made ones.
    pub fn of_messages(messages: Vec<Generated>) -> Self {
        Self {
            messages,
            truth: Vec::new(),
            events: 0,
            malformed: 0,
            duplicates: 0,
        }
    }
}

struct Person {
    idx: usize,
    /// Unique per person and seed: prefixes its identifiers and event ids.
    tag: String,
    cookies: Vec<String>,
    devices: Vec<String>,
    customer_id: Option<String>,
    email: Option<(String, String)>,
    phone: Option<(String, String)>,
    loyalty: Option<(String, String)>,
    social: Option<String>,
}

fn raw(kind: &str, value: &str) -> RawIdentifier {
    RawIdentifier {
        kind: kind.into(),
        value: value.into(),
    }
}

impl Person {
    fn new(idx: usize, seed: u64, rng: &mut SmallRng) -> Self {
        let tag = format!("{seed:x}{idx:07}");
        let cookies = (0..rng.gen_range(1..=3))
            .map(|i| format!("ck-{tag}-{i}"))
            .collect();
        let devices = (0..rng.gen_range(1..=2))
            .map(|i| format!("dv-{tag}-{i}"))
            .collect();
        let customer_id = rng.gen_bool(0.7).then(|| format!("C{tag}"));
        let email = rng.gen_bool(0.85).then(|| {
            let canonical = format!("person{idx}.s{seed}@example.org");
            let noisy = match rng.gen_range(0..3) {
                0 => canonical.clone(),
                1 => format!("  {}", canonical.to_uppercase()),
                _ => format!("Person{idx}.S{seed}@Example.ORG "),
            };
            (noisy, canonical)
        });
        let phone = rng.gen_bool(0.6).then(|| {
            let n = 2_000_000 + (idx as u64 * 7919 + seed * 104_729) % 7_000_000;
            // Area codes in service (phone numbers are validated against libphonenumber's metadata).
            let area = US_AREA_CODES
                [((idx as u64 / 7_000_000 + seed) % US_AREA_CODES.len() as u64) as usize];
            let canonical = format!("+1{area}{n:07}");
            let noisy = match rng.gen_range(0..3) {
                0 => format!("({area}) {}-{:04}", n / 10_000, n % 10_000),
                1 => format!("+1 {area} {n:07}"),
                _ => format!("1-{area}-{}-{:04}", n / 10_000, n % 10_000),
            };
            (noisy, canonical)
        });
        let loyalty = rng.gen_bool(0.5).then(|| {
            let canonical = format!("LC{tag}").to_uppercase();
            let noisy = format!("lc-{}", &tag).to_lowercase();
            (noisy, canonical)
        });
        let social = rng.gen_bool(0.3).then(|| format!("sc-{tag}"));
        Person {
            idx,
            tag,
            cookies,
            devices,
            customer_id,
            email,
            phone,
            loyalty,
            social,
        }
    }

    /// The identifier the person is best known by in logged-in contexts.
    fn login_id(&self) -> Option<RawIdentifier> {
        self.customer_id
            .as_ref()
            .map(|c| raw("customer_id", c))
            .or_else(|| self.email.as_ref().map(|(n, _)| raw("email", n)))
    }

    /// The canonical (type, value) of every identifier the events carry.
    fn canonical_ids_in(&self, events: &[(&str, ChannelEvent)]) -> BTreeSet<(String, String)> {
        let canonical = |kind: &str| -> Option<String> {
            match kind {
                "email" => self.email.as_ref().map(|(_, c)| c.clone()),
                "phone" => self.phone.as_ref().map(|(_, c)| c.clone()),
                "loyalty_id" => self.loyalty.as_ref().map(|(_, c)| c.clone()),
                "customer_id" => self.customer_id.clone(),
                "social_id" => self.social.clone(),
                _ => None,
            }
        };
        events
            .iter()
            .flat_map(|(_, e)| e.identifiers.iter())
            .map(|i| {
                let value = canonical(&i.kind).unwrap_or_else(|| i.value.clone());
                (i.kind.clone(), value)
            })
            .collect()
    }

    fn truth_ids(&self) -> Vec<(String, String)> {
        let mut ids: Vec<(String, String)> = Vec::new();
        ids.extend(
            self.cookies
                .iter()
                .map(|c| ("anonymous_id".to_string(), c.clone())),
        );
        ids.extend(
            self.devices
                .iter()
                .map(|d| ("device_id".to_string(), d.clone())),
        );
        ids.extend(
            self.customer_id
                .iter()
                .map(|c| ("customer_id".to_string(), c.clone())),
        );
        ids.extend(
            self.email
                .iter()
                .map(|(_, c)| ("email".to_string(), c.clone())),
        );
        ids.extend(
            self.phone
                .iter()
                .map(|(_, c)| ("phone".to_string(), c.clone())),
        );
        ids.extend(
            self.loyalty
                .iter()
                .map(|(_, c)| ("loyalty_id".to_string(), c.clone())),
        );
        ids.extend(
            self.social
                .iter()
                .map(|s| ("social_id".to_string(), s.clone())),
        );
        ids
    }

    fn normalised(&self, id: &RawIdentifier) -> (String, String) {
        let value = match id.kind.as_str() {
            "email" => self.email.as_ref().map(|(_, c)| c.clone()),
            "phone" => self.phone.as_ref().map(|(_, c)| c.clone()),
            "loyalty_id" => self.loyalty.as_ref().map(|(_, c)| c.clone()),
            _ => None,
        };
        (id.kind.clone(), value.unwrap_or_else(|| id.value.clone()))
    }
}

struct Builder<'a> {
    rng: &'a mut SmallRng,
    person: &'a Person,
    seq: usize,
    t: i64,
    events: Vec<(&'static str, ChannelEvent)>,
}

impl Builder<'_> {
    fn push(
        &mut self,
        channel: &'static str,
        event_type: &str,
        ids: Vec<RawIdentifier>,
    ) -> &mut ChannelEvent {
        self.t += self.rng.gen_range(1_000..3_600_000);
        self.seq += 1;
        let event = ChannelEvent {
            channel: Some(channel.to_string()),
            identifiers: ids,
            ..ChannelEvent::new(
                format!("ev-{}-{}", self.person.tag, self.seq),
                event_type,
                self.t,
                &[],
            )
        };
        let at = self.events.len();
        self.events.push((channel, event));
        &mut self.events[at].1
    }

    /// A contact with customer service `after_ms` after the previous event (no random draw, so the rest
    /// of a seed's stream stays as it was).
    fn contact(
        &mut self,
        channel: &'static str,
        ids: Vec<RawIdentifier>,
        (reason, status, after_ms): (&str, &str, i64),
    ) {
        self.t += after_ms;
        self.seq += 1;
        let mut event = ChannelEvent {
            channel: Some(channel.to_string()),
            identifiers: ids,
            ..ChannelEvent::new(
                format!("ev-{}-{}", self.person.tag, self.seq),
                "contact",
                self.t,
                &[],
            )
        };
        event.attributes = [("reason", reason), ("status", status)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.events.push((channel, event));
    }

    /// The category of the `seq`th thing the person looks at.
    fn category(&self) -> String {
        CATEGORIES[(self.person.idx * 7 + self.seq) % CATEGORIES.len()].to_string()
    }

    fn purchase(&mut self, channel: &'static str, ids: Vec<RawIdentifier>) {
        let cents: i64 = self.rng.gen_range(500..50_000);
        let order = format!("o-{}-{}", self.person.idx, self.seq + 1);
        let e = self.push(channel, "purchase", ids);
        e.amount = Some(cents as f64 / 100.0);
        e.currency = Some("USD".into());
        e.order_id = Some(order);
    }
}

fn journey(p: &Person, rng: &mut SmallRng, start: i64) -> Vec<(&'static str, ChannelEvent)> {
    let mut b = Builder {
        rng,
        person: p,
        seq: 0,
        t: start,
        events: Vec::new(),
    };
    for (i, cookie) in p.cookies.iter().enumerate() {
        for _ in 0..b.rng.gen_range(1..=4) {
            b.push("web", "page_view", vec![raw("anonymous_id", cookie)]);
            let category = b.category();
            if let Some((_, e)) = b.events.last_mut() {
                e.attributes.insert("category".into(), category);
            }
        }
        if b.rng.gen_bool(0.5) {
            let category = b.category();
            let e = b.push("web", "add_to_cart", vec![raw("anonymous_id", cookie)]);
            e.attributes.insert("category".into(), category);
            e.items = vec![Item {
                sku: format!("sku-{}", i + 1),
                quantity: 1,
                price: Some(19.99),
            }];
        }
        if let Some(login) = p.login_id() {
            b.push("web", "login", vec![raw("anonymous_id", cookie), login]);
        }
    }
    if let (Some(c), Some((e, _))) = (&p.customer_id, &p.email) {
        let stated = ["email", "sms", "phone"][p.idx % 3];
        b.push(
            "web",
            "profile_update",
            vec![raw("customer_id", c), raw("email", e)],
        )
        .attributes
        .insert("preference.contact_channel".into(), stated.into());
    }
    for device in &p.devices {
        b.push("app", "app_open", vec![raw("device_id", device)]);
        if let Some(login) = p.login_id() {
            b.push("app", "login", vec![raw("device_id", device), login]);
        }
    }
    if let Some((email, _)) = &p.email {
        for c in 0..b.rng.gen_range(0..4) {
            b.push("email", "email_open", vec![raw("email", email)]);
            if b.rng.gen_bool(0.5) {
                let e = b.push("email", "email_click", vec![raw("email", email)]);
                e.campaign_id = Some(format!("camp-{c}"));
            }
        }
    }
    if let Some((card, _)) = &p.loyalty {
        for _ in 0..b.rng.gen_range(1..=3) {
            b.purchase("pos", vec![raw("loyalty_id", card)]);
        }
        let mut link = vec![raw("loyalty_id", card)];
        link.extend(p.email.as_ref().map(|(e, _)| raw("email", e)));
        link.extend(p.phone.as_ref().map(|(n, _)| raw("phone", n)));
        link.extend(p.login_id());
        b.push("pos", "store_visit", link);
    }
    if b.rng.gen_bool(0.6) {
        if let Some(cookie) = p.cookies.last() {
            b.purchase("web", vec![raw("anonymous_id", cookie)]);
        }
    }
    if let Some((phone, _)) = &p.phone {
        let mut ids = vec![raw("phone", phone)];
        ids.extend(p.login_id());
        let e = b.push("callcenter", "call", ids);
        e.attributes = [
            ("reason", REASONS[p.idx % REASONS.len()]),
            ("status", "open"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    }
    if let Some(social) = &p.social {
        let mut ids = vec![raw("social_id", social)];
        ids.extend(
            p.login_id()
                .or_else(|| p.cookies.first().map(|c| raw("anonymous_id", c))),
        );
        b.push("social", "social_login", ids);
    }
    if b.rng.gen_bool(0.1) {
        if let Some(login) = p.login_id() {
            let e = b.push("web", "consent_change", vec![login]);
            e.consent = Some(ConsentChange {
                cross_channel: None,
                email_marketing: Some(false),
            });
        }
    }
    // Every third person with a social account and an email asks on social media, is sent to email
    // support and does not explain again: the errand is closed there.
    if let (Some(social), Some((email, _)), true) = (&p.social, &p.email, p.idx % 3 == 0) {
        let reason = REASONS[(p.idx / 3) % REASONS.len()];
        b.contact(
            "social",
            vec![raw("social_id", social)],
            (reason, "open", 600_000),
        );
        b.contact(
            "email",
            vec![raw("email", email)],
            (reason, "resolved", 1_800_000),
        );
    }
    connect(p, &mut b);
    b.events
}

/// Makes sure every identifier of the person is connected to the first one, adding login events where a
/// random journey left a piece apart (a person without account or email, say).
fn connect(p: &Person, b: &mut Builder<'_>) {
    let mut parent: HashMap<(String, String), (String, String)> = HashMap::new();
    fn find(
        parent: &mut HashMap<(String, String), (String, String)>,
        x: &(String, String),
    ) -> (String, String) {
        let mut cur = x.clone();
        while let Some(next) = parent.get(&cur).cloned() {
            if next == cur {
                break;
            }
            cur = next;
        }
        cur
    }
    let all = p.truth_ids();
    for id in &all {
        parent.insert(id.clone(), id.clone());
    }
    for (_, e) in &b.events {
        let ids: Vec<(String, String)> = e.identifiers.iter().map(|i| p.normalised(i)).collect();
        for w in ids.windows(2) {
            let (a, c) = (find(&mut parent, &w[0]), find(&mut parent, &w[1]));
            parent.insert(a, c);
        }
    }
    let root = find(&mut parent, &all[0]);
    let first = raw_of(p, &all[0]);
    for id in &all[1..] {
        if find(&mut parent, id) != root {
            let r = find(&mut parent, id);
            parent.insert(r, root.clone());
            b.push("web", "login", vec![first.clone(), raw_of(p, id)]);
        }
    }
}

fn raw_of(p: &Person, (kind, canonical): &(String, String)) -> RawIdentifier {
    let noisy = match kind.as_str() {
        "email" => p.email.as_ref().map(|(n, _)| n.clone()),
        "phone" => p.phone.as_ref().map(|(n, _)| n.clone()),
        "loyalty_id" => p.loyalty.as_ref().map(|(n, _)| n.clone()),
        _ => None,
    };
    raw(kind, &noisy.unwrap_or_else(|| canonical.clone()))
}

/// Generates the whole stream and its truth.
pub fn generate(cfg: &JourneyConfig) -> Journeys {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut timed: Vec<(i64, usize, &'static str, ChannelEvent)> = Vec::new();
    let mut truth = Vec::with_capacity(cfg.persons);
    let mut previous_phone: Option<(String, String)> = None;
    let mut shared_left = cfg.shared_device_persons;
    for idx in 0..cfg.persons {
        let mut person = Person::new(idx, cfg.seed, &mut rng);
        if cfg.household_rate > 0.0 && rng.gen_bool(cfg.household_rate.min(1.0)) {
            if let Some(phone) = &previous_phone {
                person.phone = Some(phone.clone());
            }
        }
        previous_phone = person.phone.clone();
        let start = cfg.start_ms + rng.gen_range(0..cfg.span_ms.max(1));
        let mut events = journey(&person, &mut rng, start);
        if shared_left > 0 {
            if let (Some((email, _)), Some((_, first))) = (&person.email, events.first()) {
                shared_left -= 1;
                let mut e = first.clone();
                e.event_id = format!("ev-{}-shared-device", person.tag);
                e.channel = Some("app".into());
                e.event_type = "login".into();
                e.timestamp += rng.gen_range(1..3_600_000);
                e.identifiers = vec![raw("device_id", SHARED_DEVICE), raw("email", email)];
                e.amount = None;
                e.order_id = None;
                e.currency = None;
                e.items.clear();
                e.campaign_id = None;
                e.consent = None;
                e.attributes.clear();
                events.push(("app", e));
            }
        }
        let mut identifiers: BTreeSet<(String, String)> = person.truth_ids().into_iter().collect();
        if !cfg.channels.is_empty() {
            events.retain(|(ch, _)| cfg.channels.iter().any(|c| c == ch));
            if events.is_empty() {
                continue;
            }
            let seen = person.canonical_ids_in(&events);
            identifiers.retain(|id| seen.contains(id));
        }
        let mut t = PersonTruth {
            person: idx,
            identifiers,
            events: events.len() as u64,
            purchases: BTreeMap::new(),
            channels: BTreeMap::new(),
            story: StoryTruth::of(&events),
        };
        for (channel, e) in &events {
            *t.channels.entry(channel.to_string()).or_insert(0) += 1;
            if let Some(amount) = e.amount {
                let venue = if *channel == "pos" { "store" } else { "online" };
                let slot = t.purchases.entry(format!("{venue}/USD")).or_insert((0, 0));
                slot.0 += 1;
                slot.1 += crate::model::to_minor_units(amount);
            }
        }
        truth.push(t);
        for (channel, e) in events {
            timed.push((e.timestamp, idx, channel, e));
        }
    }
    timed.sort_by_key(|t| (t.0, t.1));
    if cfg.shuffle_window > 1 {
        for chunk in timed.chunks_mut(cfg.shuffle_window) {
            chunk.shuffle(&mut rng);
        }
    }
    let events = timed.len();
    let (mut duplicates, mut malformed) = (0, 0);
    let mut messages = Vec::with_capacity(events + events / 50);
    for (i, (_, _, channel, mut e)) in timed.into_iter().enumerate() {
        if cfg.junk_rate > 0.0 && rng.gen_bool(cfg.junk_rate.min(1.0)) {
            let (kind, value) = JUNK[i % JUNK.len()];
            e.identifiers.push(raw(kind, value));
        }
        let key = e
            .identifiers
            .first()
            .map(|i| i.value.clone())
            .unwrap_or_default();
        if cfg.malformed_rate > 0.0 && rng.gen_bool(cfg.malformed_rate) {
            malformed += 1;
            let len = rng.gen_range(1..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            messages.push(Generated::Malformed {
                channel,
                key: key.clone(),
                bytes,
            });
        }
        let dup = cfg.duplicate_rate > 0.0 && rng.gen_bool(cfg.duplicate_rate);
        if dup {
            duplicates += 1;
            messages.push(Generated::Event {
                channel,
                key: key.clone(),
                event: e.clone(),
            });
        }
        messages.push(Generated::Event {
            channel,
            key,
            event: e,
        });
    }
    Journeys {
        messages,
        truth,
        events,
        malformed,
        duplicates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdentityConfig;
    use crate::normalize::Normalizer;
    use crate::stitch::{MemStore, Rules, Stitcher};

    /// Normalises and stitches every generated event in memory, default rules; `check` sees each channel.
    fn stitch_in_memory(j: &Journeys, check: impl Fn(&str)) -> MemStore {
        let n = Normalizer::new(&IdentityConfig {
            custom_types: vec!["social_id".into()],
            ..Default::default()
        })
        .unwrap();
        let s = Stitcher::new(Rules::new(&Default::default()));
        let mut store = MemStore::default();
        for m in &j.messages {
            if let Generated::Event { channel, event, .. } = m {
                check(channel);
                let ev = n
                    .event(event.clone(), channel, crate::model::now_millis(), |r| {
                        panic!("rejected {r:?}")
                    })
                    .unwrap();
                s.apply(&mut store, &ev).unwrap();
            }
        }
        store
    }

    #[test]
    fn generation_is_deterministic() {
        let cfg = JourneyConfig {
            persons: 50,
            duplicate_rate: 0.1,
            shuffle_window: 20,
            ..Default::default()
        };
        let (a, b) = (generate(&cfg), generate(&cfg));
        assert_eq!(a.truth, b.truth);
        assert_eq!(a.messages.len(), b.messages.len());
        assert!(a.duplicates > 0);
    }

    /// Stitching the generated stream in memory reproduces the truth exactly.
    #[test]
    fn stitching_recovers_the_truth() {
        let cfg = JourneyConfig {
            persons: 300,
            duplicate_rate: 0.05,
            shuffle_window: 100,
            ..Default::default()
        };
        let j = generate(&cfg);
        let store = stitch_in_memory(&j, |_| {});
        let mut got: Vec<(BTreeSet<(String, String)>, u64)> = store
            .profiles
            .values()
            .map(|p| {
                (
                    p.identifiers
                        .keys()
                        .map(|i| (i.kind.clone(), i.value.clone()))
                        .collect(),
                    p.events,
                )
            })
            .collect();
        let mut want: Vec<(BTreeSet<(String, String)>, u64)> = j
            .truth
            .iter()
            .map(|t| (t.identifiers.clone(), t.events))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    /// A channel mix drops the other channels; the truth then lists exactly the identifiers the emitted
    /// events carry, and every profile's identifiers belong to one person.
    #[test]
    fn channel_mix_keeps_truth_consistent() {
        let cfg = JourneyConfig {
            persons: 300,
            channels: vec!["web".into(), "pos".into()],
            ..Default::default()
        };
        let j = generate(&cfg);
        let store = stitch_in_memory(&j, |ch| assert!(ch == "web" || ch == "pos"));
        let mapping: std::collections::HashMap<(String, String), String> = store
            .profiles
            .values()
            .flat_map(|p| {
                let id = p.id().to_string();
                p.identifiers
                    .keys()
                    .map(move |i| ((i.kind.clone(), i.value.clone()), id.clone()))
            })
            .collect();
        let r = crate::quality::evaluate(&j.truth, &mapping);
        assert_eq!(r.identifiers_missing, 0);
        assert_eq!(
            r.identifiers,
            mapping.len(),
            "no identifier outside the truth"
        );
        assert_eq!(r.precision, 1.0);
        assert!(j.truth.iter().all(|t| !t.channels.contains_key("email")));
    }
}
