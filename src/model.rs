//! The nouns of the pipeline: identifiers, events as they arrive, events once normalised, profile ids.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// A typed identifier after normalisation (`email`, `alice@example.com`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl Identifier {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// The same identifier confined to one channel (`email@web`): how identifiers of a person who refused
    /// cross-channel identification are kept apart per channel (see docs/DESIGN.md, "Consent").
    pub fn scoped(&self, channel: &str) -> Self {
        let base = self.base_kind();
        let mut kind =
            String::with_capacity(base.len() + SCOPE_SEPARATOR.len_utf8() + channel.len());
        kind.push_str(base);
        kind.push(SCOPE_SEPARATOR);
        kind.push_str(channel);
        Self {
            kind,
            value: self.value.clone(),
        }
    }

    /// The type without a channel scope: `email` for both `email` and `email@web`.
    pub fn base_kind(&self) -> &str {
        base_kind(&self.kind)
    }

    /// The channel a scoped identifier is confined to.
    pub fn scope(&self) -> Option<&str> {
        scope_at(&self.kind).map(|at| &self.kind[at + 1..])
    }
}

/// Separates an identifier type from the channel it is scoped to; identifier types cannot contain it.
pub const SCOPE_SEPARATOR: char = '@';

/// The type without a channel scope.
pub fn base_kind(kind: &str) -> &str {
    scope_at(kind).map_or(kind, |at| &kind[..at])
}

/// Where the scope separator is in a type. A byte scan: types are a few bytes long, where a `char`
/// pattern's search costs more to set up than the scan (a step of every identifier's guardrail check).
fn scope_at(kind: &str) -> Option<usize> {
    const SEPARATOR: u8 = {
        assert!(SCOPE_SEPARATOR.is_ascii());
        SCOPE_SEPARATOR as u8
    };
    kind.bytes().position(|b| b == SEPARATOR)
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The public, stable id of a profile: derived from the profile's earliest event, so that the same input
/// yields the same ids whatever the order in which partitions were read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProfileId(pub String);

impl ProfileId {
    /// The id of a profile anchored on `event_id`.
    pub fn from_anchor(event_id: &str) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(event_id.as_bytes());
        // `p-` and the first 10 bytes of the digest in lower-case hex, written into one string.
        let mut id = String::with_capacity(22);
        id.push_str("p-");
        for b in &digest[..10] {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        ProfileId(id)
    }

    /// A profile id as written (`p-` and 20 lower- or upper-case hex digits); `None` if it is not one.
    pub fn parse(id: &str) -> Option<Self> {
        let digits = id.strip_prefix("p-")?;
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ProfileId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What [`ProfileId::parse`] refuses, said the same way everywhere.
pub const MALFORMED_PROFILE_ID: &str = "malformed profile id: expected p- and 20 hex digits";

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Internal, never-exposed key of a profile in state. Stable while the profile lives; the union-by-size
/// merge keeps the node of the larger side so only the smaller side's identifiers are relabelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// An identifier as the channel sent it, before normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawIdentifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

/// A line item of a cart or an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    #[serde(default = "one")]
    pub quantity: i32,
    #[serde(default)]
    pub price: Option<f64>,
}

fn one() -> i32 {
    1
}

/// Consent carried by an event; `None` fields leave the stored choice unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsentChange {
    #[serde(default)]
    pub cross_channel: Option<bool>,
    #[serde(default)]
    pub email_marketing: Option<bool>,
}

/// An event exactly as decoded from a channel topic (schemas/channel_event.avsc, or the same shape in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelEvent {
    pub event_id: String,
    #[serde(default)]
    pub channel: Option<String>,
    pub event_type: String,
    pub timestamp: Millis,
    pub identifiers: Vec<RawIdentifier>,
    #[serde(default)]
    pub order_id: Option<String>,
    #[serde(default)]
    pub amount: Option<f64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub items: Vec<Item>,
    #[serde(default)]
    pub campaign_id: Option<String>,
    #[serde(default)]
    pub consent: Option<ConsentChange>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl ChannelEvent {
    /// An event with these identifiers (`(type, value)`) and nothing else.
    pub fn new(
        event_id: impl Into<String>,
        event_type: impl Into<String>,
        timestamp: Millis,
        identifiers: &[(&str, &str)],
    ) -> Self {
        Self {
            event_id: event_id.into(),
            channel: None,
            event_type: event_type.into(),
            timestamp,
            identifiers: identifiers
                .iter()
                .map(|(k, v)| RawIdentifier {
                    kind: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            order_id: None,
            amount: None,
            currency: None,
            items: vec![],
            campaign_id: None,
            consent: None,
            attributes: BTreeMap::new(),
        }
    }
}

/// A purchase in minor units, so that sums are exact and independent of order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub amount_minor: i64,
    pub currency: String,
    pub venue: Venue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Venue {
    Online,
    Store,
}

impl Venue {
    pub fn as_str(self) -> &'static str {
        match self {
            Venue::Online => "online",
            Venue::Store => "store",
        }
    }
}

/// A normalised event, ready for stitching and enrichment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub channel: String,
    pub event_type: String,
    pub timestamp: Millis,
    /// Normalised, deduplicated, sorted identifiers; never empty.
    pub identifiers: Vec<Identifier>,
    pub purchase: Option<Purchase>,
    pub items: Vec<Item>,
    pub campaign_id: Option<String>,
    pub consent: Option<ConsentChange>,
    /// The event's attributes (at most `profile::story::MAX_ATTRIBUTES`): the contact reason, the
    /// category, stated preferences, whatever computed traits read.
    pub attributes: BTreeMap<String, String>,
    /// The input record it came from (the identity change stream names it).
    pub origin: Option<Origin>,
}

impl Event {
    /// An event with these identifiers (sorted and deduplicated here) and nothing else: no purchase,
    /// items, campaign, consent change, attributes or origin.
    pub fn new(
        event_id: impl Into<String>,
        channel: impl Into<String>,
        event_type: impl Into<String>,
        timestamp: Millis,
        mut identifiers: Vec<Identifier>,
    ) -> Self {
        identifiers.sort();
        identifiers.dedup();
        Self {
            event_id: event_id.into(),
            channel: channel.into(),
            event_type: event_type.into(),
            timestamp,
            identifiers,
            purchase: None,
            items: vec![],
            campaign_id: None,
            consent: None,
            attributes: Default::default(),
            origin: None,
        }
    }
}

/// Where a message was read: an input topic, its partition and offset. Written `topic:partition:offset`
/// (Kafka topic names hold no colon).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Origin {
    /// `topic:partition:offset`, as [`Display`](std::fmt::Display) writes it.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.rsplitn(3, ':');
        let offset = parts.next()?.parse().ok()?;
        let partition = parts.next()?.parse().ok()?;
        let topic = parts.next().filter(|t| !t.is_empty())?;
        Some(Self {
            topic: topic.to_string(),
            partition,
            offset,
        })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

#[cfg(test)]
thread_local! {
    /// A test's stopped clock: [`now_millis`] on this thread returns it while set.
    pub(crate) static STOPPED_CLOCK: std::cell::Cell<Option<Millis>> = const { std::cell::Cell::new(None) };
}

/// Wall-clock time in milliseconds since the epoch (0 if the clock is before 1970).
pub fn now_millis() -> Millis {
    #[cfg(test)]
    if let Some(stopped) = STOPPED_CLOCK.with(std::cell::Cell::get) {
        return stopped;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Converts an amount in major units to minor units (cents), rounding half away from zero.
pub fn to_minor_units(amount: f64) -> i64 {
    (amount * 100.0).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scoped_type_splits_at_its_first_separator() {
        let email = Identifier::new("email", "a@example.org");
        assert_eq!((email.base_kind(), email.scope()), ("email", None));
        let scoped = email.scoped("café");
        assert_eq!(scoped.kind, "email@café");
        assert_eq!(
            (scoped.base_kind(), scoped.scope()),
            ("email", Some("café"))
        );
        assert_eq!(scoped.scoped("web").kind, "email@web");
        let odd = Identifier::new("é@x@y", "v");
        assert_eq!((odd.base_kind(), odd.scope()), ("é", Some("x@y")));
        assert_eq!(base_kind(""), "");
    }

    #[test]
    fn origins_are_written_and_read_back() {
        let o = Origin {
            topic: "web-events".into(),
            partition: 2,
            offset: 18231,
        };
        assert_eq!(o.to_string(), "web-events:2:18231");
        assert_eq!(Origin::parse(&o.to_string()), Some(o));
        for bad in ["web", "web:2", ":2:3", "web:x:3", "web:2:"] {
            assert_eq!(Origin::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn profile_id_is_deterministic_and_short() {
        let a = ProfileId::from_anchor("evt-1");
        assert_eq!(a, ProfileId::from_anchor("evt-1"));
        assert_ne!(a, ProfileId::from_anchor("evt-2"));
        assert_eq!(a.as_str().len(), 22);
        // `p-` and the first 10 bytes of SHA-256 in lower-case hex: ids written before stay the same.
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            ProfileId::from_anchor("").as_str(),
            format!("p-{}", &empty[..20])
        );
        assert_eq!(ProfileId::parse(a.as_str()), Some(a));
        for bad in [
            "p-123",
            "p-",
            "q-e3b0c44298fc1c149afb",
            "p-e3b0c44298fc1c149afz",
            "p-ü3b0c44298fc1c149af",
        ] {
            assert_eq!(ProfileId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn minor_units_round() {
        assert_eq!(to_minor_units(19.99), 1999);
        assert_eq!(to_minor_units(0.1 + 0.2), 30);
        assert_eq!(to_minor_units(-1.005), -100);
    }
}
