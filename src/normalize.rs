//! Identifier and event normalisation: the only door from what channels send to what stitching sees.
//!
//! Emails are trimmed and lower-cased, phones brought to E.164 with a default country, ids trimmed, junk
//! values ('null', 'test@test.com', '0000000') refused, and chosen types replaced by their SHA-256 so raw PII
//! never reaches state or output.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use regex::RegexSet;
use sha2::Sha256;

use crate::config::{HashKey, IdentityConfig, LimitsConfig};
use crate::model::{
    to_minor_units, ChannelEvent, Event, Identifier, Item, Millis, Purchase, RawIdentifier, Venue,
};

/// Identifier types every deployment knows.
pub const BUILTIN_TYPES: &[&str] = &[
    "anonymous_id",
    "device_id",
    "email",
    "phone",
    "customer_id",
    "loyalty_id",
];

/// Values refused for every identifier type (compared after normalisation, case-insensitively).
const DEFAULT_JUNK: &[&str] = &[
    "",
    "null",
    "nil",
    "none",
    "undefined",
    "nan",
    "unknown",
    "n/a",
    "na",
    "-",
    "0",
    "-1",
    "test",
    "anonymous",
    "guest",
    "test@test.com",
    "test@example.com",
    "noemail@example.com",
    "no@email.com",
    "none@none.com",
    "email@email.com",
    "00000000-0000-0000-0000-000000000000",
];

/// Why an identifier was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    UnknownType,
    Invalid,
    Blocked,
    TooLong,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::UnknownType => "unknown_type",
            Rejection::Invalid => "invalid",
            Rejection::Blocked => "blocked",
            Rejection::TooLong => "too_long",
        }
    }
}

/// Why a whole event cannot be processed; such events go to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("event has no usable identifiers ({0} given, all rejected)")]
    NoIdentifiers(usize),
    #[error("event has {0} identifiers, more than the limit of {1}")]
    TooManyIdentifiers(usize, usize),
    #[error("field {0} is {1} bytes, more than the limit of {2}")]
    Oversize(&'static str, usize, usize),
    #[error("event_id is empty")]
    EmptyEventId,
    #[error("field {field} out of range: {reason}")]
    OutOfRange { field: String, reason: String },
}

fn out_of_range(field: impl Into<String>, reason: String) -> EventError {
    EventError::OutOfRange {
        field: field.into(),
        reason,
    }
}

/// Names looked up for every identifier (its type, its value among the junk values, its channel): a set
/// made once from the configuration, hashed with foldhash rather than SipHash.
type Names = HashSet<String, foldhash::fast::RandomState>;

/// Normalises identifiers and events according to [`IdentityConfig`].
#[derive(Debug, Clone)]
pub struct Normalizer {
    known_types: Names,
    hashed_types: Names,
    /// The HMAC key of `hashed_types` (set when there are any); its `Debug` hides it.
    hash_key: Option<HashKey>,
    blocked: Names,
    blocked_patterns: RegexSet,
    /// The country of national phone numbers (and of their international dialling prefix).
    country: phonenumber::country::Id,
    phones: PhoneCache,
    store_channels: Names,
    max_identifiers: usize,
    max_value_len: usize,
    limits: LimitsConfig,
}

/// Longest accepted event id, channel, event type or campaign id.
const MAX_FIELD_LEN: usize = crate::profile::story::MAX_TEXT;
/// Most accepted cart/order lines in one event.
const MAX_ITEMS: usize = 500;

impl Normalizer {
    pub fn new(cfg: &IdentityConfig) -> Result<Self, crate::config::ConfigError> {
        use crate::config::ConfigError;
        let country: phonenumber::country::Id = cfg
            .default_country
            .trim()
            .to_ascii_uppercase()
            .parse()
            .map_err(|_| {
                ConfigError::Invalid(format!(
                    "identity.default_country {:?} is not an ISO 3166 country code",
                    cfg.default_country
                ))
            })?;
        let blocked_patterns = RegexSet::new(&cfg.blocked_patterns)
            .map_err(|e| ConfigError::Invalid(format!("identity.blocked_patterns: {e}")))?;
        let mut known_types: Names = BUILTIN_TYPES.iter().map(|s| s.to_string()).collect();
        known_types.extend(cfg.custom_types.iter().cloned());
        for t in &cfg.hashed_types {
            if !known_types.contains(t) {
                return Err(ConfigError::Invalid(format!(
                    "identity.hashed_types names unknown type {t:?}"
                )));
            }
        }
        let hash_key = match (&cfg.hash_key, cfg.hashed_types.is_empty()) {
            (_, true) => None,
            (Some(key), false) if key.0.len() >= MIN_HASH_KEY_LEN => Some(key.clone()),
            (Some(_), false) => {
                return Err(ConfigError::Invalid(format!(
                    "STITCHER_HASH_KEY must be at least {MIN_HASH_KEY_LEN} bytes"
                )))
            }
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "identity.hashed_types is set: give the secret key of the keyed hash in \
                     STITCHER_HASH_KEY (README \"Personal data\")"
                        .into(),
                ))
            }
        };
        let mut blocked: Names = DEFAULT_JUNK.iter().map(|s| s.to_string()).collect();
        blocked.extend(cfg.blocked_values.iter().map(|v| v.trim().to_lowercase()));
        Ok(Self {
            phones: PhoneCache::default(),
            known_types,
            hashed_types: cfg.hashed_types.iter().cloned().collect(),
            hash_key,
            blocked,
            blocked_patterns,
            country,
            store_channels: cfg.store_channels.iter().cloned().collect(),
            max_identifiers: cfg.max_identifiers_per_event,
            max_value_len: cfg.max_value_len,
            limits: LimitsConfig::default(),
        })
    }

    /// The same normaliser with these plausible ranges for event values (defaults otherwise).
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.limits = limits.clone();
        self
    }

    /// Refuses an event time outside `[limits.min_event_time, now + limits.max_future]`.
    fn check_timestamp(&self, ts: Millis, now: Millis) -> Result<(), EventError> {
        let min = self.limits.min_event_millis();
        let future = i64::try_from(self.limits.max_future.as_millis()).unwrap_or(i64::MAX);
        let max = now.saturating_add(future);
        if ts < min {
            return Err(out_of_range(
                "timestamp",
                format!("{ts} is before limits.min_event_time ({min} ms since the epoch); timestamps are epoch milliseconds"),
            ));
        }
        if ts > max {
            return Err(out_of_range(
                "timestamp",
                format!(
                    "{ts} is more than limits.max_future ahead of now ({now} ms since the epoch)"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a non-finite amount or one larger than `limits.max_amount` in absolute value.
    fn check_amount(&self, field: impl Into<String>, amount: f64) -> Result<(), EventError> {
        if !amount.is_finite() || amount.abs() > self.limits.max_amount {
            return Err(out_of_range(
                field,
                format!(
                    "{amount} is not a number within ±limits.max_amount ({})",
                    self.limits.max_amount
                ),
            ));
        }
        Ok(())
    }

    /// Refuses cart or order lines with an empty or oversized sku, a quantity outside
    /// `1..=limits.max_quantity`, or a negative or implausible price.
    fn check_items(&self, items: &[Item]) -> Result<(), EventError> {
        for (i, item) in items.iter().enumerate() {
            check_len_named(|| format!("items[{i}].sku"), &item.sku)?;
            if !(1..=self.limits.max_quantity).contains(&item.quantity) {
                return Err(out_of_range(
                    format!("items[{i}].quantity"),
                    format!(
                        "{} is not within 1..={}",
                        item.quantity, self.limits.max_quantity
                    ),
                ));
            }
            if let Some(price) = item.price {
                self.check_amount(format!("items[{i}].price"), price)?;
                if price < 0.0 {
                    return Err(out_of_range(
                        format!("items[{i}].price"),
                        format!("{price} is negative"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Normalises one identifier: the stored form, or why it was refused.
    pub fn identifier(&self, kind: &str, value: &str) -> Result<Identifier, Rejection> {
        let kind = canonical_kind(kind);
        if !self.known_types.contains(&kind) {
            return Err(Rejection::UnknownType);
        }
        if value.len() > self.max_value_len {
            return Err(Rejection::TooLong);
        }
        let normal = match kind.as_str() {
            "email" => normalize_email(value)?,
            "phone" => self.phones.normalize(value, self.country)?,
            "loyalty_id" => value
                .chars()
                .filter(|c| !c.is_whitespace() && *c != '-')
                .collect::<String>()
                .to_ascii_uppercase(),
            _ => value.trim().to_string(),
        };
        if self.is_blocked(&normal) {
            return Err(Rejection::Blocked);
        }
        let value = match self.key_of(&kind) {
            Some(key) => keyed_hash(key, &normal),
            None => normal,
        };
        Ok(Identifier { kind, value })
    }

    /// The HMAC key if `kind` is a hashed type.
    fn key_of(&self, kind: &str) -> Option<&[u8]> {
        self.hash_key
            .as_ref()
            .map(|k| k.0.as_slice())
            .filter(|_| self.hashed_types.contains(kind))
    }

    /// An identifier given in its hashed form, as consumers see it on the output topic (64 hex digits):
    /// accepted for a hashed type only.
    pub fn hashed_identifier(&self, kind: &str, hash: &str) -> Result<Identifier, Rejection> {
        let kind = canonical_kind(kind);
        if !self.known_types.contains(&kind) {
            return Err(Rejection::UnknownType);
        }
        let hash = hash.trim().to_ascii_lowercase();
        if self.key_of(&kind).is_none()
            || hash.len() != 64
            || !hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Rejection::Invalid);
        }
        Ok(Identifier { kind, value: hash })
    }

    /// What a lookup by `kind`/`value` may mean: the value normalised (and hashed) as in stitching and,
    /// for a hashed type, the value taken as the hash itself. Empty when neither is valid.
    pub fn lookup_candidates(&self, kind: &str, value: &str) -> Result<Vec<Identifier>, Rejection> {
        let normal = self.identifier(kind, value);
        let hashed = self.hashed_identifier(kind, value).ok();
        match (normal, hashed) {
            (Ok(a), Some(b)) => Ok(vec![a, b]),
            (Ok(a), None) => Ok(vec![a]),
            (Err(_), Some(b)) => Ok(vec![b]),
            (Err(e), None) => Err(e),
        }
    }

    fn is_blocked(&self, value: &str) -> bool {
        let lower = value.to_lowercase();
        if self.blocked.contains(&lower) || self.blocked_patterns.is_match(value) {
            return true;
        }
        // A run of one repeated character (0000000, xxxxxx, +1111111111) is never a person.
        let mut chars = lower.trim_start_matches('+').chars();
        match chars.next() {
            Some(first) => lower.len() > 3 && chars.all(|c| c == first),
            None => true,
        }
    }

    /// Normalises a decoded event; `channel` is the channel configured for the topic it came from.
    /// Rejected identifiers are reported through `on_reject` (for metrics) and dropped.
    /// `now` is this machine's clock, for the plausible range of the event time.
    pub fn event(
        &self,
        raw: ChannelEvent,
        channel: &str,
        now: Millis,
        mut on_reject: impl FnMut(Rejection),
    ) -> Result<Event, EventError> {
        if raw.event_id.trim().is_empty() {
            return Err(EventError::EmptyEventId);
        }
        self.check_timestamp(raw.timestamp, now)?;
        check_len("event_id", &raw.event_id)?;
        check_len("event_type", &raw.event_type)?;
        if let Some(c) = &raw.campaign_id {
            check_len("campaign_id", c)?;
        }
        if raw.identifiers.len() > self.max_identifiers {
            return Err(EventError::TooManyIdentifiers(
                raw.identifiers.len(),
                self.max_identifiers,
            ));
        }
        if raw.attributes.len() > crate::profile::story::MAX_ATTRIBUTES {
            return Err(EventError::Oversize(
                "attributes",
                raw.attributes.len(),
                crate::profile::story::MAX_ATTRIBUTES,
            ));
        }
        for (k, v) in &raw.attributes {
            check_len_named(|| format!("attributes key {k:?}"), k)?;
            check_len("attributes", v)?;
        }
        if raw.items.len() > MAX_ITEMS {
            return Err(EventError::Oversize("items", raw.items.len(), MAX_ITEMS));
        }
        self.check_items(&raw.items)?;
        let given = raw.identifiers.len();
        let mut identifiers: Vec<Identifier> = raw
            .identifiers
            .iter()
            .filter_map(
                |RawIdentifier { kind, value }| match self.identifier(kind, value) {
                    Ok(id) => Some(id),
                    Err(r) => {
                        on_reject(r);
                        None
                    }
                },
            )
            .collect();
        identifiers.sort();
        identifiers.dedup();
        if identifiers.is_empty() {
            return Err(EventError::NoIdentifiers(given));
        }
        // The topic decides the channel: a producer cannot claim to be another channel.
        let channel = channel.to_string();
        let event_type = raw.event_type.trim().to_ascii_lowercase();
        let purchase = match (event_type.as_str(), raw.amount) {
            ("purchase" | "order" | "store_purchase", Some(amount)) => {
                self.check_amount("amount", amount)?;
                let currency = raw
                    .currency
                    .as_deref()
                    .unwrap_or("XXX")
                    .trim()
                    .to_ascii_uppercase();
                if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(out_of_range(
                        "currency",
                        format!("{currency:?} is not a three-letter ISO 4217 code"),
                    ));
                }
                let venue =
                    if self.store_channels.contains(&channel) || event_type == "store_purchase" {
                        Venue::Store
                    } else {
                        Venue::Online
                    };
                Some(Purchase {
                    amount_minor: to_minor_units(amount),
                    currency,
                    venue,
                })
            }
            _ => None,
        };
        Ok(Event {
            event_id: raw.event_id,
            channel,
            event_type,
            timestamp: raw.timestamp,
            identifiers,
            purchase,
            items: raw.items,
            campaign_id: raw.campaign_id,
            consent: raw.consent,
            attributes: raw.attributes,
            origin: None,
        })
    }
}

/// The type name after aliases (`cookie` is `anonymous_id`, `loyalty_card` is `loyalty_id`).
fn canonical_kind(kind: &str) -> String {
    let kind = kind.trim().to_ascii_lowercase();
    match kind.as_str() {
        "cookie" | "cookie_id" | "anonymous" => "anonymous_id".to_string(),
        "loyalty" | "loyalty_card" => "loyalty_id".to_string(),
        _ => kind,
    }
}

/// Shortest accepted `STITCHER_HASH_KEY`.
const MIN_HASH_KEY_LEN: usize = 16;

/// Hex HMAC-SHA-256 of `value` under `key`: without the key, a hashed phone number cannot be recovered
/// by hashing every possible number.
pub fn keyed_hash(key: &[u8], value: &str) -> String {
    hex::encode(hmac_sha256(key, value.as_bytes()))
}

/// HMAC-SHA-256 of `data` under `key`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{Mac, SimpleHmac};
    // HMAC takes keys of any length.
    let mut mac = SimpleHmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn check_len(field: &'static str, value: &str) -> Result<(), EventError> {
    if value.len() > MAX_FIELD_LEN {
        return Err(EventError::Oversize(field, value.len(), MAX_FIELD_LEN));
    }
    Ok(())
}

/// Like [`check_len`] for a field inside a list, named only when refused; also refuses an empty value.
fn check_len_named(field: impl FnOnce() -> String, value: &str) -> Result<(), EventError> {
    if value.is_empty() || value.len() > MAX_FIELD_LEN {
        return Err(out_of_range(
            field(),
            format!("{} bytes, not within 1..={MAX_FIELD_LEN}", value.len()),
        ));
    }
    Ok(())
}

/// Trims and lower-cases an email; refuses anything without exactly one '@' and a dotted domain.
pub fn normalize_email(value: &str) -> Result<String, Rejection> {
    let email = value.trim().to_lowercase();
    let (local, domain) = email.split_once('@').ok_or(Rejection::Invalid)?;
    if local.is_empty()
        || domain.len() < 3
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || email.chars().any(char::is_whitespace)
    {
        return Err(Rejection::Invalid);
    }
    Ok(email)
}

/// Phone numbers seen recently and their normal form: parsing with libphonenumber's metadata costs about
/// 10 µs, 30 times an email, and a returning customer's number comes again and again. Bounded: emptied
/// when full; shared by the clones of a normaliser. Its `Debug` shows only its size (the keys are phone
/// numbers).
#[derive(Default, Clone)]
struct PhoneCache(Arc<Mutex<HashMap<String, Result<String, Rejection>>>>);

const PHONE_CACHE_ENTRIES: usize = 1 << 16;

impl PhoneCache {
    fn normalize(
        &self,
        value: &str,
        country: phonenumber::country::Id,
    ) -> Result<String, Rejection> {
        let known = self.0.lock().ok().and_then(|m| m.get(value).cloned());
        if let Some(known) = known {
            return known;
        }
        let normal = normalize_phone(value, country);
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= PHONE_CACHE_ENTRIES {
                m.clear();
            }
            m.insert(value.to_string(), normal.clone());
        }
        normal
    }
}

impl std::fmt::Debug for PhoneCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "PhoneCache({n} numbers)")
    }
}

/// Brings a phone number to E.164 (`+447700900123`) with libphonenumber's metadata (the `phonenumber`
/// crate): national numbers complete with `country`, its international dialling prefix is understood
/// (`011 46 70 123 45 67` dialled from the US is `+46701234567`), numbers invalid for their country are
/// refused, and an extension is kept as `;ext=` (`+15551234567;ext=9`, RFC 3966).
pub fn normalize_phone(
    value: &str,
    country: phonenumber::country::Id,
) -> Result<String, Rejection> {
    let number = phonenumber::parse(Some(country), value.trim()).map_err(|_| Rejection::Invalid)?;
    if !number.is_valid() {
        return Err(Rejection::Invalid);
    }
    let e164 = number.format().mode(phonenumber::Mode::E164).to_string();
    Ok(match number.extension() {
        Some(ext) if !ext.is_empty() => format!("{e164};ext={}", &**ext),
        _ => e164,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdentityConfig;

    fn normalizer() -> Normalizer {
        Normalizer::new(&IdentityConfig {
            default_country: "GB".into(),
            ..IdentityConfig::default()
        })
        .expect("valid config")
    }

    #[test]
    fn a_phone_number_seen_again_normalises_the_same() {
        let n = normalizer();
        for raw in [
            "07700 900123",
            "+44 7700 900123",
            "12",
            "07700 900123",
            "12",
        ] {
            let first = n.identifier("phone", raw);
            assert_eq!(n.identifier("phone", raw), first, "{raw}");
            assert_eq!(
                first.map(|i| i.value),
                normalize_phone(raw, phonenumber::country::Id::GB),
                "{raw}"
            );
        }
        // A clone shares what was learned.
        assert_eq!(
            n.clone().identifier("phone", "07700 900123"),
            n.identifier("phone", "07700 900123")
        );
    }

    #[test]
    fn emails_are_trimmed_and_lowercased() {
        let n = normalizer();
        assert_eq!(
            n.identifier("email", "  Alice.Smith@Example.COM ")
                .unwrap()
                .value,
            "alice.smith@example.com"
        );
        assert_eq!(n.identifier("email", "no-at-sign"), Err(Rejection::Invalid));
        assert_eq!(n.identifier("email", "a@b"), Err(Rejection::Invalid));
    }

    #[test]
    fn phones_become_e164() {
        use phonenumber::country::Id::{GB, SE, US};
        for (given, country, want) in [
            ("07400 123456", GB, "+447400123456"),
            ("+44 7400-123-456", GB, "+447400123456"),
            ("0044 7400 123456", GB, "+447400123456"),
            ("(212) 555-0123", US, "+12125550123"),
            ("1-212-555-0123", US, "+12125550123"),
            ("+1 212 555 0123", US, "+12125550123"),
            // An international dialling prefix, from the US and from Sweden.
            ("011 46 70 123 45 67", US, "+46701234567"),
            ("00 1 212 555 0123", SE, "+12125550123"),
            ("070-123 45 67", SE, "+46701234567"),
            // Extensions are kept.
            ("+1 212 555 0123 ext 9", US, "+12125550123;ext=9"),
            ("(212) 555-0123 x9", US, "+12125550123;ext=9"),
        ] {
            assert_eq!(
                normalize_phone(given, country).as_deref(),
                Ok(want),
                "{given}"
            );
        }
        // Invalid for their country: too short, not a number, an unassigned area code, Ofcom's drama range.
        for junk in [
            "12",
            "call me",
            "+1 000 000 0000",
            "+44 1234",
            "07700 900123",
        ] {
            assert_eq!(normalize_phone(junk, GB), Err(Rejection::Invalid), "{junk}");
        }
    }

    #[test]
    fn junk_values_are_blocked() {
        let n = normalizer();
        for (kind, value) in [
            ("anonymous_id", "null"),
            ("anonymous_id", "undefined"),
            ("email", "TEST@test.com"),
            ("email", "noemail@example.com"),
            ("device_id", "00000000-0000-0000-0000-000000000000"),
            ("customer_id", "0000000"),
        ] {
            assert_eq!(
                n.identifier(kind, value),
                Err(Rejection::Blocked),
                "{kind}={value}"
            );
        }
        assert!(n.identifier("customer_id", "C-1001").is_ok());
        // A run of one digit is not a number libphonenumber accepts in the first place.
        assert_eq!(
            n.identifier("phone", "+1 111-111-1111"),
            Err(Rejection::Invalid)
        );
    }

    #[test]
    fn configured_blocks_and_patterns_apply() {
        let n = Normalizer::new(&IdentityConfig {
            blocked_values: vec!["Shop-Till-01".into()],
            blocked_patterns: vec!["^agent-.*$".into()],
            ..IdentityConfig::default()
        })
        .unwrap();
        assert_eq!(
            n.identifier("device_id", "shop-till-01"),
            Err(Rejection::Blocked)
        );
        assert_eq!(
            n.identifier("device_id", "agent-7"),
            Err(Rejection::Blocked)
        );
        assert!(n.identifier("device_id", "d-7").is_ok());
    }

    #[test]
    fn unknown_and_aliased_types() {
        let n = normalizer();
        assert_eq!(n.identifier("shoe_size", "42"), Err(Rejection::UnknownType));
        assert_eq!(n.identifier("cookie", "abc").unwrap().kind, "anonymous_id");
        assert_eq!(
            n.identifier("loyalty", "ab 12-34").unwrap(),
            Identifier::new("loyalty_id", "AB1234")
        );
    }

    #[test]
    fn hashed_types_never_keep_the_raw_value() {
        let keyed = |key: &str| {
            Normalizer::new(&IdentityConfig {
                hashed_types: vec!["email".into()],
                hash_key: Some(crate::config::HashKey(key.as_bytes().to_vec())),
                ..IdentityConfig::default()
            })
            .unwrap()
        };
        let n = keyed("a-secret-of-32-bytes-for-testing");
        let id = n.identifier("email", " Bob@Example.com").unwrap();
        assert_eq!(id.value.len(), 64);
        assert_eq!(id, n.identifier("email", "bob@example.com").unwrap());
        assert!(!id.value.contains("bob"));
        // Keyed: not the plain SHA-256 an attacker could compute, and another key gives another hash.
        use sha2::Digest;
        assert_ne!(id.value, hex::encode(Sha256::digest(b"bob@example.com")));
        assert_ne!(
            id,
            keyed("another-secret-of-32-bytes-here!")
                .identifier("email", "bob@example.com")
                .unwrap()
        );
        // RFC 4231 test case 2.
        assert_eq!(
            keyed_hash(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A lookup or an erasure may give the hash consumers see instead of the clear value.
        assert_eq!(
            n.hashed_identifier("email", &id.value.to_uppercase()),
            Ok(id.clone())
        );
        assert_eq!(
            n.lookup_candidates("email", &id.value).unwrap(),
            vec![id.clone()]
        );
        assert_eq!(
            n.hashed_identifier("phone", &id.value),
            Err(Rejection::Invalid),
            "phone is not hashed"
        );
        // Without a key, hashed types are refused at start-up.
        assert!(Normalizer::new(&IdentityConfig {
            hashed_types: vec!["email".into()],
            ..IdentityConfig::default()
        })
        .is_err());
    }

    const NOW: Millis = 1_700_000_100_000;

    fn raw(ids: &[(&str, &str)]) -> ChannelEvent {
        ChannelEvent {
            order_id: Some("o1".into()),
            amount: Some(19.99),
            currency: Some("eur".into()),
            ..ChannelEvent::new("e1", "Purchase", 1_700_000_000_000, ids)
        }
    }

    #[test]
    fn events_are_normalised_and_junk_reported() {
        let n = normalizer();
        let mut rejected = vec![];
        let ev = n
            .event(
                raw(&[
                    ("email", "A@x.io"),
                    ("email", "a@x.io"),
                    ("anonymous_id", "null"),
                ]),
                "pos",
                NOW,
                |r| rejected.push(r),
            )
            .unwrap();
        assert_eq!(ev.identifiers, vec![Identifier::new("email", "a@x.io")]);
        assert_eq!(rejected, vec![Rejection::Blocked]);
        let p = ev.purchase.unwrap();
        assert_eq!(
            (p.amount_minor, p.currency.as_str(), p.venue),
            (1999, "EUR", Venue::Store)
        );
        assert_eq!(ev.event_type, "purchase");
    }

    #[test]
    fn events_without_usable_identifiers_are_errors() {
        let n = normalizer();
        assert_eq!(
            n.event(raw(&[("email", "null")]), "web", NOW, |_| {}),
            Err(EventError::NoIdentifiers(1))
        );
        let many: Vec<(String, String)> = (0..100)
            .map(|i| ("anonymous_id".into(), format!("c{i}")))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert!(matches!(
            n.event(raw(&many), "web", NOW, |_| {}),
            Err(EventError::TooManyIdentifiers(100, _))
        ));
    }

    #[test]
    fn values_out_of_range_name_their_field() {
        let n = normalizer();
        let field = |r: Result<Event, EventError>| match r {
            Err(EventError::OutOfRange { field, .. }) => field,
            other => panic!("expected out of range, got {other:?}"),
        };
        let base = raw(&[("email", "a@x.io")]);
        let with = |f: &dyn Fn(&mut ChannelEvent)| {
            let mut r = base.clone();
            f(&mut r);
            n.event(r, "web", NOW, |_| {})
        };
        assert_eq!(field(with(&|r| r.amount = Some(1e17))), "amount");
        assert_eq!(field(with(&|r| r.amount = Some(f64::NAN))), "amount");
        assert_eq!(
            field(with(&|r| r.currency = Some("euros".into()))),
            "currency"
        );
        for ts in [i64::MAX, i64::MIN, -1, 0, 1_700_000_000, 32_503_680_000_000] {
            assert_eq!(field(with(&|r| r.timestamp = ts)), "timestamp", "{ts}");
        }
        let item = |quantity, price| Item {
            sku: "s".into(),
            quantity,
            price,
        };
        assert_eq!(
            field(with(&|r| r.items = vec![item(1, None), item(0, None)])),
            "items[1].quantity"
        );
        assert_eq!(
            field(with(&|r| r.items = vec![item(i32::MAX, None)])),
            "items[0].quantity"
        );
        assert_eq!(
            field(with(&|r| r.items = vec![item(1, Some(-1.0))])),
            "items[0].price"
        );
        assert_eq!(
            field(with(&|r| r.items = vec![item(1, Some(f64::INFINITY))])),
            "items[0].price"
        );
        let long = Item {
            sku: "x".repeat(300),
            quantity: 1,
            price: None,
        };
        assert_eq!(
            field(with(&|r| r.items = vec![long.clone()])),
            "items[0].sku"
        );
        assert!(
            with(&|r| r.amount = Some(-25.0)).is_ok(),
            "a refund is a negative amount"
        );
        assert!(with(&|r| r.timestamp = NOW + 3_600_000).is_ok());
    }

    proptest::proptest! {
        /// libphonenumber's parser once panicked on crafted RFC 3966 input (RUSTSEC-2023-0082): whatever
        /// a channel sends as a phone number is refused or normalised, never a panic.
        #[test]
        fn phone_parsing_never_panics(
            s in "(tel:)?[+]?[0-9 ()./-]{0,24}(;ext=[0-9]{0,6})?(;phone-context=[+a-z0-9.-]{0,12})?(;isub=[0-9]{0,4})?",
            junk in ".{0,40}",
        ) {
            let _ = normalize_phone(&s, phonenumber::country::Id::US);
            let _ = normalize_phone(&junk, phonenumber::country::Id::GB);
            let _ = normalize_phone(&format!("{s}{junk}"), phonenumber::country::Id::SE);
        }
    }
}
