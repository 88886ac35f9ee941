//! The profile-update record (schemas/profile_update.avsc) and its encoding.

use serde::{Deserialize, Serialize};

use super::avro::{AvroCodec, SchemaError};
use crate::model::{Millis, ProfileId};
use crate::profile::story::{Acc, Counts, TraitState};
use crate::profile::{Enrichment, Profile};
use crate::stitch::Refusal;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileUpdate {
    pub profile_id: String,
    pub redirect_to: Option<String>,
    pub merged_from: Vec<String>,
    pub trigger_event_id: Option<String>,
    pub trigger_channel: Option<String>,
    pub updated_at: Millis,
    pub refused_links: Vec<RefusedLink>,
    pub profile: Option<ProfileRecord>,
    pub split_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedLink {
    pub rule: String,
    pub id_type: String,
    pub other_profile_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub identifiers: Vec<IdentifierRecord>,
    pub first_seen: Millis,
    pub last_seen: Millis,
    pub events: i64,
    pub channels: Vec<ChannelRecord>,
    pub event_types: std::collections::BTreeMap<String, i64>,
    pub purchases: Vec<PurchaseRecord>,
    pub email: EmailRecord,
    pub cart: Vec<CartRecord>,
    pub consent: ConsentRecord,
    pub shared: bool,
    #[serde(default)]
    pub timeline: Vec<InteractionRecord>,
    #[serde(default)]
    pub switch_counts: Vec<SwitchCountRecord>,
    #[serde(default)]
    pub switchpoints: Vec<SwitchpointRecord>,
    #[serde(default)]
    pub errand: Option<ErrandRecord>,
    #[serde(default)]
    pub top_categories: Vec<Counted>,
    #[serde(default)]
    pub top_products: Vec<Counted>,
    #[serde(default)]
    pub preferences: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub traits: Vec<TraitRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InteractionRecord {
    pub at: Millis,
    pub channel: String,
    pub event_type: String,
    pub summary: String,
    pub event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SwitchCountRecord {
    pub from: String,
    pub to: String,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchpointRecord {
    pub from: String,
    pub to: String,
    pub at: Millis,
    pub before_event_type: String,
    pub before_at: Millis,
    pub before_event_id: String,
    pub after_event_type: String,
    pub after_event_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrandRecord {
    pub channel: String,
    pub reason: Option<String>,
    pub at: Millis,
    pub open: bool,
    pub event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    pub value: String,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitRecord {
    pub name: String,
    pub kind: String,
    pub count: Option<i64>,
    pub number: Option<f64>,
    pub text: Option<String>,
    pub values: Vec<Counted>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentifierRecord {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    pub first_seen: Millis,
    pub last_seen: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub channel: String,
    pub first_seen: Millis,
    pub last_seen: Millis,
    pub events: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseRecord {
    pub venue: String,
    pub currency: String,
    pub orders: i64,
    pub revenue_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailRecord {
    pub opens: i64,
    pub clicks: i64,
    pub last_open_at: Option<Millis>,
    pub last_click_at: Option<Millis>,
    pub last_campaign_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartRecord {
    pub sku: String,
    pub quantity: i32,
    pub price_minor: Option<i64>,
    pub channel: String,
    pub added_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentRecord {
    pub cross_channel: bool,
    pub email_marketing: Option<bool>,
    pub updated_at: Option<Millis>,
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn counted(top: Vec<(String, u64)>) -> Vec<Counted> {
    top.into_iter()
        .map(|(value, n)| Counted {
            value,
            count: count(n),
        })
        .collect()
}

/// A trait's value over its window, ending at the person's newest event.
fn trait_record(name: &str, state: &TraitState, newest: Millis) -> Option<TraitRecord> {
    let mut r = TraitRecord {
        name: name.to_string(),
        kind: String::new(),
        count: None,
        number: None,
        text: None,
        values: Vec::new(),
    };
    let number = |milli: i64| Some(milli as f64 / 1000.0);
    let shown = |c: &Counts, k: u32| counted(c.top(k as usize));
    match state.value(newest)? {
        Acc::Count(n) => (r.kind, r.count) = ("count".into(), Some(count(n))),
        Acc::Sum(m) => (r.kind, r.number) = ("sum".into(), number(m)),
        Acc::Min(m) => (r.kind, r.number) = ("min".into(), number(m)),
        Acc::Max(m) => (r.kind, r.number) = ("max".into(), number(m)),
        Acc::First(l) => (r.kind, r.text) = ("first".into(), Some(l.value)),
        Acc::Last(l) => (r.kind, r.text) = ("last".into(), Some(l.value)),
        // `top` keeps four times the values it shows.
        Acc::Top(c) => (r.kind, r.values) = ("top".into(), shown(&c, c.cap / 4)),
        Acc::Distinct(c) => {
            r.kind = "distinct".into();
            r.count = Some(count(c.counts.len() as u64));
            r.values = shown(&c, c.cap);
        }
    }
    Some(r)
}

impl ProfileRecord {
    /// The record of `p`; `cfg` says how much of the story to show.
    pub fn new(p: &Profile, cfg: &Enrichment) -> Self {
        let consent_at = [
            p.consent.cross_channel.as_ref().map(|l| l.at),
            p.consent.email_marketing.as_ref().map(|l| l.at),
        ]
        .into_iter()
        .flatten()
        .max();
        // A profile rebuilt from a split without events of its own: its identifiers' sightings.
        let seen = if p.has_events() {
            p.seen
        } else {
            p.identifiers.values().fold(p.seen, |mut acc, s| {
                acc.join(*s);
                acc
            })
        };
        let switches = p.story.switchpoints();
        ProfileRecord {
            identifiers: p
                .identifiers
                .iter()
                .map(|(id, seen)| IdentifierRecord {
                    kind: id.kind.clone(),
                    value: id.value.clone(),
                    first_seen: seen.first,
                    last_seen: seen.last,
                })
                .collect(),
            first_seen: seen.first,
            last_seen: seen.last,
            events: count(p.events),
            channels: p
                .channels
                .iter()
                .map(|(ch, a)| ChannelRecord {
                    channel: ch.clone(),
                    first_seen: a.seen.first,
                    last_seen: a.seen.last,
                    events: count(a.events),
                })
                .collect(),
            event_types: p
                .event_types
                .iter()
                .map(|(k, v)| (k.clone(), count(*v)))
                .collect(),
            purchases: p
                .purchases
                .iter()
                .map(|((venue, currency), t)| PurchaseRecord {
                    venue: venue.as_str().into(),
                    currency: currency.clone(),
                    orders: count(t.orders),
                    revenue_minor: t.revenue_minor,
                })
                .collect(),
            email: EmailRecord {
                opens: count(p.email.opens),
                clicks: count(p.email.clicks),
                last_open_at: p.email.last_open_at,
                last_click_at: p.email.last_click.as_ref().map(|c| c.at),
                last_campaign_id: p.email.last_click.as_ref().and_then(|c| c.value.clone()),
            },
            cart: p
                .cart
                .open_lines()
                .map(|l| CartRecord {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                    price_minor: l.price_minor,
                    channel: l.channel.clone(),
                    added_at: l.added_at,
                })
                .collect(),
            consent: ConsentRecord {
                cross_channel: !p.cross_channel_refused(),
                email_marketing: p.consent.email_marketing.as_ref().map(|l| l.value),
                updated_at: consent_at,
            },
            shared: p.shared,
            timeline: p
                .story
                .timeline
                .summarised()
                .iter()
                .map(|i| InteractionRecord {
                    at: i.at,
                    channel: i.channel.clone(),
                    event_type: i.event_type.clone(),
                    summary: i.summary.clone(),
                    event_id: i.event_id.clone(),
                })
                .collect(),
            switch_counts: {
                let mut pairs = std::collections::BTreeMap::new();
                for (a, b) in &switches {
                    *pairs
                        .entry((a.channel.clone(), b.channel.clone()))
                        .or_insert(0) += 1;
                }
                pairs
                    .into_iter()
                    .map(|((from, to), n)| SwitchCountRecord { from, to, count: n })
                    .collect()
            },
            switchpoints: switches
                .iter()
                .rev()
                .take(cfg.switchpoints)
                .map(|(a, b)| SwitchpointRecord {
                    from: a.channel.clone(),
                    to: b.channel.clone(),
                    at: b.at,
                    before_event_type: a.event_type.clone(),
                    before_at: a.at,
                    before_event_id: a.event_id.clone(),
                    after_event_type: b.event_type.clone(),
                    after_event_id: b.event_id.clone(),
                })
                .collect(),
            errand: p.story.errand.as_ref().map(|e| ErrandRecord {
                channel: e.value.channel.clone(),
                reason: e.value.reason.clone(),
                at: e.at,
                open: e.value.open,
                event_id: e.event_id.clone(),
            }),
            top_categories: counted(p.story.categories.top(cfg.interests_top)),
            top_products: counted(p.story.products.top(cfg.interests_top)),
            preferences: p
                .story
                .preferences
                .iter()
                .map(|(k, l)| (k.clone(), l.value.clone()))
                .collect(),
            traits: p
                .story
                .traits
                .iter()
                .filter_map(|(name, t)| trait_record(name, t, seen.last))
                .collect(),
        }
    }
}

impl From<&Refusal> for RefusedLink {
    fn from(r: &Refusal) -> Self {
        RefusedLink {
            rule: r.rule.name().into(),
            id_type: r.kind.clone(),
            other_profile_id: r.other.as_ref().map(|p| p.to_string()),
        }
    }
}

impl ProfileUpdate {
    /// The record saying that `from` now lives in `to`.
    pub fn redirect(from: &ProfileId, to: &ProfileId, now: Millis) -> Self {
        ProfileUpdate {
            profile_id: from.to_string(),
            redirect_to: Some(to.to_string()),
            merged_from: vec![],
            trigger_event_id: None,
            trigger_channel: None,
            updated_at: now,
            refused_links: vec![],
            profile: None,
            split_from: None,
        }
    }
}

/// Encodes profile updates as Confluent-framed Avro.
pub struct UpdateEncoder {
    avro: AvroCodec,
    schema_id: u32,
}

impl UpdateEncoder {
    pub fn new(schema_id: u32) -> Result<Self, SchemaError> {
        Ok(Self {
            avro: AvroCodec::profile_update()?,
            schema_id,
        })
    }

    /// Confluent framing (magic byte, schema id) and the datum, written straight from the record
    /// (`binary`: byte for byte what apache-avro writes, without its `Value` tree).
    pub fn encode(&self, update: &ProfileUpdate) -> Result<Vec<u8>, SchemaError> {
        let mut framed = Vec::with_capacity(2048);
        framed.push(0);
        framed.extend_from_slice(&self.schema_id.to_be_bytes());
        super::binary::write(update, &mut framed)
            .map_err(|e| SchemaError::Encode(e.to_string()))?;
        Ok(framed)
    }

    /// The codec, to read what was encoded.
    pub fn codec(&self) -> &AvroCodec {
        &self.avro
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, Identifier, Purchase, Venue};

    /// What apache-avro reads back from the direct encoding is the record, and apache-avro's own encoding
    /// (validated against the schema) has the same bytes but for the order of map entries (it iterates a
    /// hash map).
    fn same_as_apache_avro(enc: &UpdateEncoder, update: &ProfileUpdate) {
        let direct = enc.encode(update).unwrap();
        let (id, back): (u32, ProfileUpdate) = enc.codec().decode_confluent(&direct).unwrap();
        assert_eq!((id, &back), (7, update));
        let mut theirs = enc.codec().encode(7, update).unwrap();
        let mut ours = direct;
        theirs.sort_unstable();
        ours.sort_unstable();
        assert_eq!(ours, theirs, "{update:#?}");
    }

    /// Every shape of update (profiles with a story and every trait kind, redirects, refusals, splits).
    #[test]
    fn direct_encoding_equals_apache_avros() {
        use crate::journeys::{self, Generated, JourneyConfig};
        use crate::stitch::{MemStore, Rules, Stitcher};
        let cfg: crate::config::Config = toml::from_str(journeys::TRUTH_TRAITS).unwrap();
        let mut traits = cfg.enrichment.clone();
        for (name, kind, field) in [
            ("min_amount", "min", "amount"),
            ("max_amount", "max", "amount"),
            ("last_reason", "last", "attributes.reason"),
        ] {
            traits.traits.push(
                toml::from_str(&format!(
                    "name = {name:?}\nkind = {kind:?}\nfield = {field:?}"
                ))
                .unwrap(),
            );
        }
        let stitcher = Stitcher::new(Rules::unlimited()).with_enrichment(traits.clone().into());
        let norm = crate::normalize::Normalizer::new(&Default::default()).unwrap();
        let mut store = MemStore::default();
        let j = journeys::generate(&JourneyConfig {
            persons: 60,
            seed: 3,
            ..Default::default()
        });
        for m in j.messages {
            if let Generated::Event { channel, event, .. } = m {
                // Social-only events need the custom type this test does not configure.
                let Ok(ev) = norm.event(event, channel, crate::model::now_millis(), |_| {}) else {
                    continue;
                };
                stitcher.apply(&mut store, &ev).unwrap();
            }
        }
        let enc = UpdateEncoder::new(7).unwrap();
        let mut checked = 0;
        for (i, p) in store.by_public_id().values().enumerate() {
            let update = ProfileUpdate {
                profile_id: p.id().to_string(),
                redirect_to: None,
                merged_from: (0..i % 3).map(|n| format!("p-{n}")).collect(),
                trigger_event_id: (i % 2 == 0).then(|| "e".into()),
                trigger_channel: Some("web".into()),
                updated_at: i as i64 * 1_000_003,
                refused_links: (0..i % 2)
                    .map(|_| RefusedLink {
                        rule: "limit".into(),
                        id_type: "email".into(),
                        other_profile_id: Some("p-x".into()),
                    })
                    .collect(),
                profile: Some(ProfileRecord::new(p, &traits)),
                split_from: (i % 4 == 0).then(|| "p-s".into()),
            };
            same_as_apache_avro(&enc, &update);
            checked += 1;
        }
        let redirect =
            ProfileUpdate::redirect(&ProfileId("p-a".into()), &ProfileId("p-b".into()), 9);
        same_as_apache_avro(&enc, &redirect);
        assert!(checked > 30, "{checked} profiles");
    }

    #[test]
    fn update_round_trips_through_avro() {
        let ev = Event {
            purchase: Some(Purchase {
                amount_minor: 999,
                currency: "EUR".into(),
                venue: Venue::Store,
            }),
            ..Event::new(
                "e1",
                "pos",
                "purchase",
                1000,
                vec![Identifier::new("loyalty_id", "L1")],
            )
        };
        let cfg = Enrichment::default();
        let p = Profile::new(&ev, &cfg);
        let update = ProfileUpdate {
            profile_id: p.id().to_string(),
            redirect_to: None,
            merged_from: vec!["p-old".into()],
            trigger_event_id: Some("e1".into()),
            trigger_channel: Some("pos".into()),
            updated_at: 5,
            refused_links: vec![],
            profile: Some(ProfileRecord::new(&p, &cfg)),
            split_from: Some("p-before".into()),
        };
        let enc = UpdateEncoder::new(2).unwrap();
        let bytes = enc.encode(&update).unwrap();
        let (id, back): (u32, ProfileUpdate) = enc.codec().decode_confluent(&bytes).unwrap();
        assert_eq!(id, 2);
        assert_eq!(back, update);
        let redirect =
            ProfileUpdate::redirect(&p.id(), &crate::model::ProfileId("p-new".into()), 6);
        let bytes = enc.encode(&redirect).unwrap();
        let (_, back): (u32, ProfileUpdate) = enc.codec().decode_confluent(&bytes).unwrap();
        assert_eq!(back, redirect);
    }

    /// Every schema change must be both ways compatible: consumers on the new schema read records written
    /// with every older one, and consumers still on an older schema read ours (new fields have defaults
    /// and are appended).
    #[test]
    fn schema_changes_stay_compatible() {
        use apache_avro::schema_compatibility::SchemaCompatibility;
        let current = super::super::avro::profile_update_schema().unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/history");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().contains("profile_update") {
                continue;
            }
            let old =
                apache_avro::Schema::parse_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            SchemaCompatibility::can_read(&old, &current)
                .unwrap_or_else(|e| panic!("{path:?}: new schema cannot read old data: {e}"));
            SchemaCompatibility::can_read(&current, &old)
                .unwrap_or_else(|e| panic!("{path:?}: old schema cannot read new data: {e}"));
            checked += 1;
        }
        assert!(checked >= 1, "no schema history found");
    }
}
