//! Identifier and event normalisation: the only door from what channels send to what stitching sees.
//!
//! Emails are trimmed and lower-cased, phones brought to E.164 with a default country, ids trimmed, junk
//! values ('null', 'test@test.com', '0000000') refused, and chosen types replaced by their SHA-256 so raw PII
//! never reaches state or output.

use std::collections::HashSet;

use regex::RegexSet;
use sha2::{Digest, Sha256};

use crate::config::IdentityConfig;
use crate::model::{
    to_minor_units, ChannelEvent, Event, Identifier, Purchase, RawIdentifier, Venue,
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
    #[error("amount {0} is not a finite number")]
    BadAmount(f64),
}

/// Country calling codes for the default-country rule of phone normalisation.
fn calling_code(country: &str) -> Option<&'static str> {
    Some(match country.to_ascii_uppercase().as_str() {
        "US" | "CA" => "1",
        "GB" | "UK" => "44",
        "DE" => "49",
        "FR" => "33",
        "NL" => "31",
        "BE" => "32",
        "ES" => "34",
        "IT" => "39",
        "PT" => "351",
        "IE" => "353",
        "SE" => "46",
        "NO" => "47",
        "DK" => "45",
        "FI" => "358",
        "PL" => "48",
        "CH" => "41",
        "AT" => "43",
        "AU" => "61",
        "NZ" => "64",
        "IN" => "91",
        "BR" => "55",
        "MX" => "52",
        "JP" => "81",
        "SG" => "65",
        "ZA" => "27",
        _ => return None,
    })
}

/// Normalises identifiers and events according to [`IdentityConfig`].
#[derive(Debug, Clone)]
pub struct Normalizer {
    known_types: HashSet<String>,
    hashed_types: HashSet<String>,
    blocked: HashSet<String>,
    blocked_patterns: RegexSet,
    calling_code: String,
    store_channels: HashSet<String>,
    max_identifiers: usize,
    max_value_len: usize,
}

/// Longest accepted event id, channel, event type or campaign id.
const MAX_FIELD_LEN: usize = 256;
/// Most accepted cart/order lines in one event.
const MAX_ITEMS: usize = 500;

impl Normalizer {
    pub fn new(cfg: &IdentityConfig) -> Result<Self, crate::config::ConfigError> {
        use crate::config::ConfigError;
        let calling_code = calling_code(&cfg.default_country).ok_or_else(|| {
            ConfigError::Invalid(format!("unknown default_country {:?}", cfg.default_country))
        })?;
        let blocked_patterns = RegexSet::new(&cfg.blocked_patterns)
            .map_err(|e| ConfigError::Invalid(format!("identity.blocked_patterns: {e}")))?;
        let mut known_types: HashSet<String> =
            BUILTIN_TYPES.iter().map(|s| s.to_string()).collect();
        known_types.extend(cfg.custom_types.iter().cloned());
        for t in &cfg.hashed_types {
            if !known_types.contains(t) {
                return Err(ConfigError::Invalid(format!(
                    "identity.hashed_types names unknown type {t:?}"
                )));
            }
        }
        let mut blocked: HashSet<String> = DEFAULT_JUNK.iter().map(|s| s.to_string()).collect();
        blocked.extend(cfg.blocked_values.iter().map(|v| v.trim().to_lowercase()));
        Ok(Self {
            known_types,
            hashed_types: cfg.hashed_types.iter().cloned().collect(),
            blocked,
            blocked_patterns,
            calling_code: calling_code.to_string(),
            store_channels: cfg.store_channels.iter().cloned().collect(),
            max_identifiers: cfg.max_identifiers_per_event,
            max_value_len: cfg.max_value_len,
        })
    }

    /// Normalises one identifier: the stored form, or why it was refused.
    pub fn identifier(&self, kind: &str, value: &str) -> Result<Identifier, Rejection> {
        let kind = kind.trim().to_ascii_lowercase();
        let kind = match kind.as_str() {
            "cookie" | "cookie_id" | "anonymous" => "anonymous_id".to_string(),
            "loyalty" | "loyalty_card" => "loyalty_id".to_string(),
            _ => kind,
        };
        if !self.known_types.contains(&kind) {
            return Err(Rejection::UnknownType);
        }
        if value.len() > self.max_value_len {
            return Err(Rejection::TooLong);
        }
        let normal = match kind.as_str() {
            "email" => normalize_email(value)?,
            "phone" => normalize_phone(value, &self.calling_code)?,
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
        let value = if self.hashed_types.contains(&kind) {
            hex::encode(Sha256::digest(normal.as_bytes()))
        } else {
            normal
        };
        Ok(Identifier { kind, value })
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
    pub fn event(
        &self,
        raw: ChannelEvent,
        channel: &str,
        mut on_reject: impl FnMut(Rejection),
    ) -> Result<Event, EventError> {
        if raw.event_id.trim().is_empty() {
            return Err(EventError::EmptyEventId);
        }
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
        if raw.items.len() > MAX_ITEMS {
            return Err(EventError::Oversize("items", raw.items.len(), MAX_ITEMS));
        }
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
                if !amount.is_finite() {
                    return Err(EventError::BadAmount(amount));
                }
                let venue =
                    if self.store_channels.contains(&channel) || event_type == "store_purchase" {
                        Venue::Store
                    } else {
                        Venue::Online
                    };
                Some(Purchase {
                    amount_minor: to_minor_units(amount),
                    currency: raw
                        .currency
                        .as_deref()
                        .unwrap_or("XXX")
                        .trim()
                        .to_ascii_uppercase(),
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
        })
    }
}

fn check_len(field: &'static str, value: &str) -> Result<(), EventError> {
    if value.len() > MAX_FIELD_LEN {
        return Err(EventError::Oversize(field, value.len(), MAX_FIELD_LEN));
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

/// Brings a phone number to E.164 (`+447700900123`), using `calling_code` for national numbers.
pub fn normalize_phone(value: &str, calling_code: &str) -> Result<String, Rejection> {
    let trimmed = value.trim();
    let mut digits = String::with_capacity(16);
    for c in trimmed.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' | '+' => {}
            _ => return Err(Rejection::Invalid),
        }
    }
    let international = if trimmed.starts_with('+') {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_string()
    } else if let Some(rest) = digits.strip_prefix('0') {
        // National number with a trunk prefix (07700 900123 in the UK).
        format!("{calling_code}{rest}")
    } else if calling_code == "1" && digits.len() == 11 && digits.starts_with('1') {
        digits
    } else {
        format!("{calling_code}{digits}")
    };
    if !(8..=15).contains(&international.len()) || international.starts_with('0') {
        return Err(Rejection::Invalid);
    }
    Ok(format!("+{international}"))
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
        assert_eq!(
            normalize_phone("07700 900123", "44").unwrap(),
            "+447700900123"
        );
        assert_eq!(
            normalize_phone("+44 7700-900-123", "44").unwrap(),
            "+447700900123"
        );
        assert_eq!(
            normalize_phone("0044 7700 900123", "44").unwrap(),
            "+447700900123"
        );
        assert_eq!(
            normalize_phone("(555) 123-4567", "1").unwrap(),
            "+15551234567"
        );
        assert_eq!(
            normalize_phone("1-555-123-4567", "1").unwrap(),
            "+15551234567"
        );
        assert_eq!(normalize_phone("12", "44"), Err(Rejection::Invalid));
        assert_eq!(normalize_phone("call me", "44"), Err(Rejection::Invalid));
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
            ("phone", "+1 111-111-1111"),
        ] {
            assert_eq!(
                n.identifier(kind, value),
                Err(Rejection::Blocked),
                "{kind}={value}"
            );
        }
        assert!(n.identifier("customer_id", "C-1001").is_ok());
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
        let n = Normalizer::new(&IdentityConfig {
            hashed_types: vec!["email".into()],
            ..IdentityConfig::default()
        })
        .unwrap();
        let id = n.identifier("email", " Bob@Example.com").unwrap();
        assert_eq!(id.value.len(), 64);
        assert_eq!(id, n.identifier("email", "bob@example.com").unwrap());
        assert!(!id.value.contains("bob"));
    }

    fn raw(ids: &[(&str, &str)]) -> ChannelEvent {
        ChannelEvent {
            event_id: "e1".into(),
            channel: None,
            event_type: "Purchase".into(),
            timestamp: 1_700_000_000_000,
            identifiers: ids
                .iter()
                .map(|(k, v)| RawIdentifier {
                    kind: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            order_id: Some("o1".into()),
            amount: Some(19.99),
            currency: Some("eur".into()),
            items: vec![],
            campaign_id: None,
            consent: None,
            attributes: Default::default(),
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
            n.event(raw(&[("email", "null")]), "web", |_| {}),
            Err(EventError::NoIdentifiers(1))
        );
        let many: Vec<(String, String)> = (0..100)
            .map(|i| ("anonymous_id".into(), format!("c{i}")))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert!(matches!(
            n.event(raw(&many), "web", |_| {}),
            Err(EventError::TooManyIdentifiers(100, _))
        ));
    }
}
