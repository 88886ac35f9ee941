//! Events in a team's own shape: field paths from a decoded document (JSON) to what stitching needs
//! (`[inputs.fields]` in the configuration), and the Segment/RudderStack event spec as a preset
//! (`preset = "segment"`). README "Bring your own events" shows both.
//!
//! A path is dot-separated keys (`context.traits.email`); `[]` after a key takes every element of an
//! array (`properties.products[]`), `[n]` one element; `a|b` takes the first alternative that yields a
//! value. Paths are checked when the configuration loads, and an error names the input and the path.

use std::collections::BTreeMap;

use apache_avro::schema::{Namespace, Schema};
use apache_avro::types::Value as AvroValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::avro::{namespace_within, NO_NAMESPACE};
use super::AvroCodec;

use crate::model::{ChannelEvent, ConsentChange, Item, Millis, RawIdentifier};

/// Built-in layouts of an input's events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The service's own schema (schemas/channel_event.avsc, or the same fields in JSON).
    #[default]
    Stitcher,
    /// The Segment and RudderStack event spec: identify, track, page, screen, alias, group, and the
    /// e-commerce spec's events.
    Segment,
}

/// Where each part of an event is found (`[inputs.fields]`). Every value is a path (module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// A unique id per event (deduplication and the profile id depend on it).
    pub event_id: String,
    /// Epoch milliseconds or seconds (numbers or numeric strings; told apart by size), or ISO-8601.
    pub timestamp: String,
    /// The event's type; renamed by `event_types`.
    #[serde(default)]
    pub event_type: Option<String>,
    /// The type when `event_type` is not set or finds nothing.
    #[serde(default)]
    pub default_event_type: Option<String>,
    /// Renames of event types as sent (`"Order Completed" = "purchase"`).
    #[serde(default)]
    pub event_types: BTreeMap<String, String>,
    /// Types not in `event_types` are written in snake case (`Product Viewed` → `product_viewed`).
    #[serde(default)]
    pub snake_case_event_types: bool,
    /// The channel, when one topic carries several; the input's `channel` otherwise.
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub identifiers: Vec<IdentifierField>,
    #[serde(default)]
    pub order_id: Option<String>,
    /// A purchase's amount (with `currency`, on events whose type is `purchase`).
    #[serde(default)]
    pub amount: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub campaign_id: Option<String>,
    #[serde(default)]
    pub items: Vec<ItemsField>,
    /// Whether the person allows being recognised across channels (a boolean).
    #[serde(default)]
    pub consent_cross_channel: Option<String>,
    /// Whether the person accepts marketing email (a boolean).
    #[serde(default)]
    pub consent_email_marketing: Option<String>,
    /// Attributes by name, each from a path (`reason = "ticket.reason"`, `category =
    /// "properties.category"`): what the enrichment reads (README "What every channel sees").
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Identifiers of one type at a path (`type` and `path`), or typed identifiers in an array of objects
/// (`path` to the objects, `type_field` and `value_field` inside each).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierField {
    pub path: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub type_field: Option<String>,
    #[serde(default)]
    pub value_field: Option<String>,
    /// `path=value[,value...]`: skip this field on events where the path has one of the values.
    #[serde(default)]
    pub unless: Option<String>,
}

/// Line items: `path` to each item (usually with `[]`), the rest relative to an item. An element
/// without a SKU is not an item.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemsField {
    pub path: String,
    pub sku: String,
    #[serde(default)]
    pub quantity: Option<String>,
    #[serde(default)]
    pub price: Option<String>,
}

impl FieldMapping {
    /// The Segment/RudderStack spec. `userId` is a customer id, `anonymousId` (and an alias's
    /// `previousId`) an anonymous id; email and phone come from the traits of identify calls (or any
    /// call's `context.traits`), not from a group's traits, which describe the group.
    pub fn segment() -> Self {
        let id = |kind: &str, path: &str, unless: Option<&str>| IdentifierField {
            path: path.into(),
            kind: Some(kind.into()),
            unless: unless.map(Into::into),
            ..Default::default()
        };
        let product = |path: &str| ItemsField {
            path: path.into(),
            sku: "sku|product_id|productId".into(),
            quantity: Some("quantity".into()),
            price: Some("price".into()),
        };
        let renames = [
            ("page", "page_view"),
            ("screen", "screen_view"),
            ("Order Completed", "purchase"),
            ("Product Added", "add_to_cart"),
            ("Product Removed", "remove_from_cart"),
            ("Email Opened", "email_open"),
            ("Email Link Clicked", "email_click"),
            ("Signed In", "login"),
        ];
        Self {
            event_id: "messageId".into(),
            timestamp: "timestamp|originalTimestamp|sentAt|receivedAt".into(),
            event_type: Some("event|type".into()),
            event_types: renames
                .iter()
                .map(|(from, to)| (from.to_string(), to.to_string()))
                .collect(),
            snake_case_event_types: true,
            identifiers: vec![
                id("customer_id", "userId", None),
                id("anonymous_id", "anonymousId", None),
                id("anonymous_id", "previousId", None),
                id("email", "traits.email", Some("type=group")),
                id("email", "context.traits.email", None),
                id("phone", "traits.phone", Some("type=group")),
                id("phone", "context.traits.phone", None),
                id("device_id", "context.device.id", None),
            ],
            order_id: Some("properties.order_id|properties.orderId".into()),
            amount: Some("properties.total|properties.revenue".into()),
            currency: Some("properties.currency".into()),
            campaign_id: Some(
                "properties.campaign_id|context.campaign.name|properties.campaign_name".into(),
            ),
            items: vec![product("properties.products[]"), product("properties")],
            // Segment's spec names a product's category `category`; a support errand's reason and
            // status are not in the spec: `reason` and `status` properties by convention.
            attributes: [
                (
                    "category",
                    "properties.category|properties.products[0].category",
                ),
                ("reason", "properties.reason"),
                ("status", "properties.status"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }
}

/// A mapping whose paths are parsed: what the decoder runs per message.
#[derive(Debug, Clone)]
pub struct Mapping {
    event_id: Path,
    timestamp: Path,
    event_type: Option<Path>,
    default_event_type: Option<String>,
    event_types: BTreeMap<String, String>,
    snake_case: bool,
    channel: Option<Path>,
    identifiers: Vec<CompiledIdentifier>,
    order_id: Option<Path>,
    amount: Option<Path>,
    currency: Option<Path>,
    campaign_id: Option<Path>,
    items: Vec<CompiledItems>,
    consent_cross_channel: Option<Path>,
    consent_email_marketing: Option<Path>,
    attributes: Vec<(String, Path)>,
}

#[derive(Debug, Clone)]
struct CompiledIdentifier {
    path: Path,
    kind: IdentifierKind,
    unless: Option<(Path, Vec<String>)>,
}

#[derive(Debug, Clone)]
enum IdentifierKind {
    Fixed(String),
    Fields { kind: Path, value: Path },
}

#[derive(Debug, Clone)]
struct CompiledItems {
    path: Path,
    sku: Path,
    quantity: Option<Path>,
    price: Option<Path>,
}

impl Mapping {
    /// Parses every path; the error names the field and the path.
    pub fn compile(m: &FieldMapping) -> Result<Self, String> {
        let path = |field: &str, p: &str| Path::parse(p).map_err(|e| format!("{field} {p:?}: {e}"));
        let opt =
            |field: &str, p: &Option<String>| p.as_deref().map(|p| path(field, p)).transpose();
        if m.event_type.is_none() && m.default_event_type.is_none() {
            return Err("needs event_type (a path) or default_event_type".into());
        }
        let mut identifiers = Vec::new();
        for (i, f) in m.identifiers.iter().enumerate() {
            let field = format!("identifiers[{i}]");
            let kind = match (&f.kind, &f.type_field, &f.value_field) {
                (Some(k), None, None) if !k.trim().is_empty() => IdentifierKind::Fixed(k.clone()),
                (None, Some(t), Some(v)) => IdentifierKind::Fields {
                    kind: path(&format!("{field}.type_field"), t)?,
                    value: path(&format!("{field}.value_field"), v)?,
                },
                _ => {
                    return Err(format!(
                        "{field}: give either `type`, or both `type_field` and `value_field`"
                    ))
                }
            };
            let unless = match &f.unless {
                None => None,
                Some(u) => {
                    let (p, values) = u.split_once('=').ok_or_else(|| {
                        format!("{field}.unless {u:?}: expected path=value[,value]")
                    })?;
                    let values = values.split(',').map(|v| v.trim().to_string()).collect();
                    Some((path(&format!("{field}.unless"), p.trim())?, values))
                }
            };
            identifiers.push(CompiledIdentifier {
                path: path(&format!("{field}.path"), &f.path)?,
                kind,
                unless,
            });
        }
        let mut items = Vec::new();
        for (i, f) in m.items.iter().enumerate() {
            let field = format!("items[{i}]");
            items.push(CompiledItems {
                path: path(&format!("{field}.path"), &f.path)?,
                sku: path(&format!("{field}.sku"), &f.sku)?,
                quantity: opt(&format!("{field}.quantity"), &f.quantity)?,
                price: opt(&format!("{field}.price"), &f.price)?,
            });
        }
        Ok(Self {
            event_id: path("event_id", &m.event_id)?,
            timestamp: path("timestamp", &m.timestamp)?,
            event_type: opt("event_type", &m.event_type)?,
            default_event_type: m.default_event_type.clone(),
            event_types: m.event_types.clone(),
            snake_case: m.snake_case_event_types,
            channel: opt("channel", &m.channel)?,
            identifiers,
            order_id: opt("order_id", &m.order_id)?,
            amount: opt("amount", &m.amount)?,
            currency: opt("currency", &m.currency)?,
            campaign_id: opt("campaign_id", &m.campaign_id)?,
            items,
            consent_cross_channel: opt("consent_cross_channel", &m.consent_cross_channel)?,
            consent_email_marketing: opt("consent_email_marketing", &m.consent_email_marketing)?,
            attributes: m
                .attributes
                .iter()
                .map(|(name, p)| Ok((name.clone(), path(&format!("attributes.{name}"), p)?)))
                .collect::<Result<_, String>>()?,
        })
    }

    /// The event in `doc`. An error names the path that was missing or held the wrong kind of value.
    pub fn apply(&self, doc: &Value) -> Result<ChannelEvent, String> {
        let event_id = self
            .event_id
            .first(doc)
            .and_then(text)
            .ok_or_else(|| format!("no event id at {}", self.event_id))?;
        let timestamp = self
            .timestamp
            .first(doc)
            .ok_or_else(|| format!("no timestamp at {}", self.timestamp))
            .and_then(|v| millis(v).map_err(|e| format!("{} at {}", e, self.timestamp)))?;
        let sent_type = self
            .event_type
            .as_ref()
            .and_then(|p| p.first(doc))
            .and_then(text);
        let event_type = match sent_type {
            Some(t) => match self.event_types.get(&t) {
                Some(renamed) => renamed.clone(),
                None if self.snake_case => snake_case(&t),
                None => t,
            },
            None => self.default_event_type.clone().ok_or_else(|| {
                format!(
                    "no event type at {}",
                    self.event_type
                        .as_ref()
                        .map(Path::to_string)
                        .unwrap_or_default()
                )
            })?,
        };
        let mut identifiers = Vec::new();
        for f in &self.identifiers {
            if let Some((p, values)) = &f.unless {
                if p.first(doc)
                    .and_then(text)
                    .is_some_and(|v| values.contains(&v))
                {
                    continue;
                }
            }
            for v in f.path.values(doc) {
                let found = match &f.kind {
                    IdentifierKind::Fixed(kind) => text(v).map(|value| (kind.clone(), value)),
                    IdentifierKind::Fields { kind, value } => kind
                        .first(v)
                        .and_then(text)
                        .zip(value.first(v).and_then(text)),
                };
                if let Some((kind, value)) = found {
                    identifiers.push(RawIdentifier { kind, value });
                }
            }
        }
        let field = |p: &Option<Path>| p.as_ref().and_then(|p| p.first(doc)).and_then(text);
        let amount = match &self.amount {
            None => None,
            Some(p) => match p.first(doc) {
                None => None,
                Some(v) => Some(number(v).ok_or_else(|| format!("amount at {p} is not a number"))?),
            },
        };
        let mut items = Vec::new();
        for f in &self.items {
            for element in f.path.values(doc) {
                let Some(sku) = f.sku.first(element).and_then(text) else {
                    continue;
                };
                let quantity = match f.quantity.as_ref().and_then(|p| p.first(element)) {
                    None => 1,
                    Some(v) => number(v)
                        .filter(|q| {
                            q.fract() == 0.0 && *q >= i32::MIN as f64 && *q <= i32::MAX as f64
                        })
                        .map(|q| q as i32)
                        .ok_or_else(|| {
                            format!("quantity of item {sku} is not a whole number in range")
                        })?,
                };
                let price = f
                    .price
                    .as_ref()
                    .and_then(|p| p.first(element))
                    .and_then(number);
                items.push(Item {
                    sku,
                    quantity,
                    price,
                });
            }
        }
        let flag = |p: &Option<Path>| -> Result<Option<bool>, String> {
            match p.as_ref().and_then(|p| p.first(doc).map(|v| (p, v))) {
                None => Ok(None),
                Some((p, v)) => boolean(v)
                    .map(Some)
                    .ok_or_else(|| format!("consent at {p} is not a boolean")),
            }
        };
        let consent = ConsentChange {
            cross_channel: flag(&self.consent_cross_channel)?,
            email_marketing: flag(&self.consent_email_marketing)?,
        };
        Ok(ChannelEvent {
            event_id,
            channel: field(&self.channel).filter(|c| is_channel_name(c)),
            event_type,
            timestamp,
            identifiers,
            order_id: field(&self.order_id),
            amount,
            currency: field(&self.currency),
            items,
            campaign_id: field(&self.campaign_id),
            consent: (consent != ConsentChange::default()).then_some(consent),
            attributes: self
                .attributes
                .iter()
                .filter_map(|(name, p)| Some((name.clone(), p.first(doc).and_then(text)?)))
                .collect(),
        })
    }
}

/// An Avro datum as JSON, so that a path means the same for both: records and maps are objects, arrays
/// arrays, a union its branch, an enum its symbol, bytes and fixed their text (lossy UTF-8), a UUID its
/// text; dates become epoch milliseconds, times and timestamps stay numbers in their unit (which
/// [`millis`] tells apart by size); a `decimal` becomes its exact text (`"12.50"`, which amounts read as a
/// number), with the scale its writer schema (`writer`, which decoded it) gives.
pub fn avro_to_json(v: AvroValue, writer: &AvroCodec) -> Value {
    with_schema(v, writer.schema(), NO_NAMESPACE, writer)
}

/// [`avro_to_json`] of a datum of `schema`, whose names resolve in `namespace`.
fn with_schema(v: AvroValue, schema: &Schema, namespace: &Namespace, writer: &AvroCodec) -> Value {
    match (v, schema) {
        (v, Schema::Ref { name }) => match writer.named(&name.fully_qualified_name(namespace)) {
            Some(named) => with_schema(v, named, namespace_within(name, namespace), writer),
            None => without_schema(v),
        },
        (AvroValue::Decimal(d), Schema::Decimal(decimal)) => {
            decimal_text(&d, decimal.scale).map_or(Value::Null, Value::String)
        }
        (AvroValue::Union(i, inner), Schema::Union(union)) => {
            match union.variants().get(i as usize) {
                Some(variant) => with_schema(*inner, variant, namespace, writer),
                None => without_schema(*inner),
            }
        }
        (AvroValue::Array(items), Schema::Array(array)) => Value::Array(
            items
                .into_iter()
                .map(|item| with_schema(item, &array.items, namespace, writer))
                .collect(),
        ),
        (AvroValue::Map(m), Schema::Map(map)) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, with_schema(v, &map.types, namespace, writer)))
                .collect(),
        ),
        (AvroValue::Record(fields), Schema::Record(record)) => {
            // The decoder reads a record's fields in the schema's order.
            let inner = namespace_within(&record.name, namespace);
            Value::Object(
                fields
                    .into_iter()
                    .zip(&record.fields)
                    .map(|((k, v), field)| (k, with_schema(v, &field.schema, inner, writer)))
                    .collect(),
            )
        }
        (v, _) => without_schema(v),
    }
}

/// [`avro_to_json`] where the schema says nothing more than the datum: a `decimal` has no scale here and
/// becomes null.
fn without_schema(v: AvroValue) -> Value {
    use apache_avro::types::Value as A;
    match v {
        A::Null | A::Decimal(_) | A::Duration(_) => Value::Null,
        A::Boolean(b) => Value::Bool(b),
        A::Int(n) | A::TimeMillis(n) => Value::from(n),
        A::Long(n)
        | A::TimeMicros(n)
        | A::TimestampMillis(n)
        | A::TimestampMicros(n)
        | A::TimestampNanos(n)
        | A::LocalTimestampMillis(n)
        | A::LocalTimestampMicros(n)
        | A::LocalTimestampNanos(n) => Value::from(n),
        A::Date(days) => Value::from(i64::from(days) * 86_400_000),
        A::Float(f) => {
            serde_json::Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number)
        }
        A::Double(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        A::Bytes(b) | A::Fixed(_, b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        A::String(s) | A::Enum(_, s) => Value::String(s),
        A::Uuid(u) => Value::String(u.to_string()),
        A::BigDecimal(d) => Value::String(d.to_string()),
        A::Union(_, inner) => without_schema(*inner),
        A::Array(items) => Value::Array(items.into_iter().map(without_schema).collect()),
        A::Map(m) => Value::Object(m.into_iter().map(|(k, v)| (k, without_schema(v))).collect()),
        A::Record(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, without_schema(v)))
                .collect(),
        ),
    }
}

/// A decimal's exact text: its unscaled value (big-endian two's complement) with `scale` digits after
/// the point. `None` beyond 38 digits (a 128-bit integer), which no amount needs.
fn decimal_text(d: &apache_avro::Decimal, scale: usize) -> Option<String> {
    let bytes = Vec::<u8>::try_from(d).ok()?;
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let sign = if negative { 0xff } else { 0 };
    // Sign extension beyond 16 bytes (a wide `fixed`) says nothing.
    let skip = bytes.len().saturating_sub(16);
    if bytes[..skip].iter().any(|&b| b != sign) || scale > 38 {
        return None;
    }
    let mut wide = [sign; 16];
    wide[16 - (bytes.len() - skip)..].copy_from_slice(&bytes[skip..]);
    let unscaled = i128::from_be_bytes(wide);
    let digits = format!("{:0>width$}", unscaled.unsigned_abs(), width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    let sign = if negative { "-" } else { "" };
    Some(match scale {
        0 => format!("{sign}{whole}"),
        _ => format!("{sign}{whole}.{fraction}"),
    })
}

/// A channel name taken from an event: short, lower case letters, digits, `_` and `-`.
fn is_channel_name(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 32
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Each,
    Index(usize),
}

/// A parsed path: alternatives, each a list of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    text: String,
    alternatives: Vec<Vec<Step>>,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Path {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut alternatives = Vec::new();
        for alternative in text.split('|') {
            let alternative = alternative.trim();
            if alternative.is_empty() {
                return Err("empty path".into());
            }
            let mut steps = Vec::new();
            for segment in alternative.split('.') {
                let (key, mut rest) = match segment.find('[') {
                    Some(i) => (&segment[..i], &segment[i..]),
                    None => (segment, ""),
                };
                if key.is_empty() && (steps.is_empty() || rest.is_empty()) {
                    return Err(format!("empty key in {alternative:?}"));
                }
                if !key.is_empty() {
                    steps.push(Step::Key(key.to_string()));
                }
                while !rest.is_empty() {
                    let close = rest
                        .find(']')
                        .ok_or_else(|| format!("unclosed [ in {alternative:?}"))?;
                    let inner = &rest[1..close];
                    steps.push(if inner.is_empty() {
                        Step::Each
                    } else {
                        Step::Index(
                            inner
                                .parse()
                                .map_err(|_| format!("[{inner}] is not an index or []"))?,
                        )
                    });
                    rest = &rest[close + 1..];
                    if !rest.is_empty() && !rest.starts_with('[') {
                        return Err(format!("unexpected {rest:?} after ] in {alternative:?}"));
                    }
                }
            }
            alternatives.push(steps);
        }
        Ok(Self {
            text: text.to_string(),
            alternatives,
        })
    }

    /// The values of the first alternative that finds any (nulls are not values).
    fn values<'a>(&self, doc: &'a Value) -> Vec<&'a Value> {
        for steps in &self.alternatives {
            let mut current = vec![doc];
            for step in steps {
                current = current
                    .into_iter()
                    .flat_map(|v| -> Vec<&'a Value> {
                        match (step, v) {
                            (Step::Key(k), Value::Object(o)) => o.get(k).into_iter().collect(),
                            (Step::Each, Value::Array(a)) => a.iter().collect(),
                            (Step::Index(i), Value::Array(a)) => a.get(*i).into_iter().collect(),
                            _ => Vec::new(),
                        }
                    })
                    .collect();
            }
            current.retain(|v| !v.is_null());
            if !current.is_empty() {
                return current;
            }
        }
        Vec::new()
    }

    fn first<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        self.values(doc).into_iter().next()
    }
}

/// A scalar as text: strings (not blank), numbers and booleans.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_i64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Epoch time in milliseconds from a number or a string: seconds below 10^11 (until the year 5138),
/// milliseconds below 10^14, microseconds below 10^17, nanoseconds above; or an ISO-8601 / RFC 3339
/// date-time (`2026-11-30T12:00:00.123Z`, `2026-11-30 13:00:00+01:00`).
pub fn millis(v: &Value) -> Result<Millis, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(n) => Some(n),
            Err(_) => return iso8601(s.trim()),
        },
        _ => None,
    }
    .filter(|n| n.is_finite())
    .ok_or_else(|| format!("timestamp {v} is neither a number nor a date-time"))?;
    let ms = match n.abs() {
        a if a < 1e11 => n * 1e3,
        a if a < 1e14 => n,
        a if a < 1e17 => n / 1e3,
        _ => n / 1e6,
    };
    Ok(ms.round() as Millis)
}

/// An RFC 3339 date-time with `Z`, an offset, or neither (UTC).
fn iso8601(s: &str) -> Result<Millis, String> {
    let bad = || format!("timestamp {s:?} is not an ISO-8601 date-time");
    // The offset, if any, follows the time: a sign after the `T` (or space), or `Z`.
    let (local, offset_minutes) = match s.strip_suffix(['Z', 'z']) {
        Some(rest) => (rest, 0),
        None => {
            let time_start = s.find(['T', 't', ' ']).ok_or_else(bad)?;
            match s[time_start..].rfind(['+', '-']) {
                Some(i) => {
                    let (local, offset) = s.split_at(time_start + i);
                    let sign = if offset.starts_with('-') { -1 } else { 1 };
                    let digits: String = offset[1..].chars().filter(|c| *c != ':').collect();
                    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad());
                    }
                    let hours: i64 = digits[..2].parse().map_err(|_| bad())?;
                    let minutes: i64 = digits[2..].parse().map_err(|_| bad())?;
                    (local, sign * (hours * 60 + minutes))
                }
                None => (s, 0),
            }
        }
    };
    let at = humantime::parse_rfc3339_weak(local).map_err(|_| bad())?;
    let ms = match at.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).map_err(|_| bad())?,
        Err(e) => -i64::try_from(e.duration().as_millis()).map_err(|_| bad())?,
    };
    Ok(ms - offset_minutes * 60_000)
}

/// `Product Viewed` → `product_viewed`, `productViewed` → `product_viewed`.
fn snake_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut prev_lower = false;
    for c in s.trim().chars() {
        if c.is_alphanumeric() {
            if c.is_uppercase() && prev_lower {
                out.push('_');
            }
            out.extend(c.to_lowercase());
            prev_lower = c.is_lowercase() || c.is_ascii_digit();
        } else {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            prev_lower = false;
        }
    }
    out.trim_end_matches('_').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn segment() -> Mapping {
        Mapping::compile(&FieldMapping::segment()).unwrap()
    }

    fn ids(ev: &ChannelEvent) -> Vec<(String, String)> {
        ev.identifiers
            .iter()
            .map(|i| (i.kind.clone(), i.value.clone()))
            .collect()
    }

    #[test]
    fn paths_parse_and_refuse_with_a_reason() {
        let p = Path::parse("properties.products[].sku|sku").unwrap();
        assert_eq!(p.alternatives.len(), 2);
        assert_eq!(
            p.alternatives[0],
            vec![
                Step::Key("properties".into()),
                Step::Key("products".into()),
                Step::Each,
                Step::Key("sku".into())
            ]
        );
        assert_eq!(
            Path::parse("a[2][]").unwrap().alternatives[0],
            vec![Step::Key("a".into()), Step::Index(2), Step::Each]
        );
        for bad in ["", "a..b", "a|", "a[", "a[x]", "a[]b", ".a"] {
            assert!(Path::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timestamps_in_seconds_millis_micros_and_iso8601() {
        let want = 1_764_504_000_123; // 2025-11-30T12:00:00.123Z
        for v in [
            json!(1_764_504_000.123),
            json!(1_764_504_000_123i64),
            json!(1_764_504_000_123_000i64),
            json!("1764504000123"),
            json!("2025-11-30T12:00:00.123Z"),
            json!("2025-11-30T13:00:00.123+01:00"),
            json!("2025-11-30T07:30:00.123-0430"),
            json!("2025-11-30 12:00:00.123"),
        ] {
            assert_eq!(millis(&v), Ok(want), "{v}");
        }
        assert!(millis(&json!("yesterday")).is_err());
        assert!(millis(&json!(true)).is_err());
        assert!(millis(&json!("2025-11-30T12:00:00+1")).is_err());
    }

    #[test]
    fn event_names_in_snake_case() {
        assert_eq!(snake_case("Product Viewed"), "product_viewed");
        assert_eq!(snake_case("productViewed"), "product_viewed");
        assert_eq!(snake_case("  Cart -- Viewed! "), "cart_viewed");
        assert_eq!(snake_case("login"), "login");
    }

    #[test]
    fn segment_identify_links_user_anonymous_email_and_phone() {
        let ev = segment()
            .apply(&json!({
                "type": "identify",
                "messageId": "m-1",
                "timestamp": "2025-11-30T12:00:00Z",
                "userId": "u-42",
                "anonymousId": "a-7",
                "traits": {"email": "Ann@Example.com", "phone": "+1 212 555 0123"},
                "context": {"device": {"id": "dev-1"}}
            }))
            .unwrap();
        assert_eq!(ev.event_id, "m-1");
        assert_eq!(ev.event_type, "identify");
        assert_eq!(ev.timestamp, 1_764_504_000_000);
        assert_eq!(
            ids(&ev),
            vec![
                ("customer_id".into(), "u-42".into()),
                ("anonymous_id".into(), "a-7".into()),
                ("email".into(), "Ann@Example.com".into()),
                ("phone".into(), "+1 212 555 0123".into()),
                ("device_id".into(), "dev-1".into()),
            ]
        );
    }

    #[test]
    fn segment_alias_links_previous_and_user_id() {
        let ev = segment()
            .apply(&json!({
                "type": "alias", "messageId": "m-2", "timestamp": 1_764_504_000_000i64,
                "previousId": "a-7", "userId": "u-42"
            }))
            .unwrap();
        assert_eq!(ev.event_type, "alias");
        assert_eq!(
            ids(&ev),
            vec![
                ("customer_id".into(), "u-42".into()),
                ("anonymous_id".into(), "a-7".into())
            ]
        );
    }

    #[test]
    fn segment_group_traits_are_not_the_persons() {
        let ev = segment()
            .apply(&json!({
                "type": "group", "messageId": "m-3", "timestamp": "2025-11-30T12:00:00Z",
                "userId": "u-42", "groupId": "acme", "traits": {"email": "office@acme.com"}
            }))
            .unwrap();
        assert_eq!(ids(&ev), vec![("customer_id".into(), "u-42".into())]);
    }

    #[test]
    fn segment_ecommerce_events() {
        let m = segment();
        let order = m
            .apply(&json!({
                "type": "track", "event": "Order Completed", "messageId": "m-4",
                "timestamp": "2025-11-30T12:00:00Z", "userId": "u-42",
                "properties": {"order_id": "o-1", "total": 27.5, "revenue": 25, "currency": "EUR",
                    "products": [{"product_id": "p-1", "sku": "SKU-1", "quantity": 2, "price": 10},
                                 {"product_id": "p-2", "price": 5}]}
            }))
            .unwrap();
        assert_eq!(order.event_type, "purchase");
        assert_eq!(order.amount, Some(27.5));
        assert_eq!(order.currency.as_deref(), Some("EUR"));
        assert_eq!(order.order_id.as_deref(), Some("o-1"));
        assert_eq!(
            order.items,
            vec![
                Item {
                    sku: "SKU-1".into(),
                    quantity: 2,
                    price: Some(10.0)
                },
                Item {
                    sku: "p-2".into(),
                    quantity: 1,
                    price: Some(5.0)
                },
            ]
        );
        let added = m
            .apply(&json!({
                "type": "track", "event": "Product Added", "messageId": "m-5",
                "timestamp": "2025-11-30T12:00:00Z", "anonymousId": "a-7",
                "properties": {"product_id": "p-9", "sku": "SKU-9", "quantity": 1, "price": 3.5}
            }))
            .unwrap();
        assert_eq!(added.event_type, "add_to_cart");
        assert_eq!(
            added.items,
            vec![Item {
                sku: "SKU-9".into(),
                quantity: 1,
                price: Some(3.5)
            }]
        );
        let viewed = m
            .apply(
                &json!({"type": "page", "messageId": "m-6", "timestamp": "2025-11-30T12:00:00Z",
                "anonymousId": "a-7", "context": {"traits": {"email": "ann@example.com"}}}),
            )
            .unwrap();
        assert_eq!(viewed.event_type, "page_view");
        assert_eq!(ids(&viewed)[1], ("email".into(), "ann@example.com".into()));
        let other = m
            .apply(
                &json!({"type": "track", "event": "Checkout Started", "messageId": "m-7",
                "timestamp": "2025-11-30T12:00:00Z", "userId": "u-42"}),
            )
            .unwrap();
        assert_eq!(other.event_type, "checkout_started");
    }

    #[test]
    fn segment_errors_name_the_path() {
        let m = segment();
        let e = m
            .apply(&json!({"type": "page", "timestamp": 1}))
            .unwrap_err();
        assert!(e.contains("messageId"), "{e}");
        let e = m
            .apply(&json!({"type": "page", "messageId": "m"}))
            .unwrap_err();
        assert!(e.contains("timestamp|originalTimestamp"), "{e}");
        let e = m
            .apply(
                &json!({"type": "track", "event": "Order Completed", "messageId": "m",
                "timestamp": 1, "properties": {"total": "lots"}}),
            )
            .unwrap_err();
        assert!(e.contains("properties.total"), "{e}");
    }

    #[test]
    fn a_custom_mapping_with_typed_identifier_arrays_consent_and_a_default_type() {
        let toml = r#"
            event_id = "ticket.id"
            timestamp = "ticket.opened"
            default_event_type = "call"
            channel = "ticket.via"
            campaign_id = "ticket.reason"
            consent_cross_channel = "customer.recognise_me"
            identifiers = [
                { type = "email", path = "customer.emails[]" },
                { path = "customer.ids[]", type_field = "kind", value_field = "id" },
            ]
            attributes = { reason = "ticket.reason", status = "ticket.state|ticket.status", tier = "customer.tier" }
        "#;
        let fields: FieldMapping = toml::from_str(toml).unwrap();
        let m = Mapping::compile(&fields).unwrap();
        let ev = m
            .apply(&json!({
                "ticket": {"id": 991, "opened": 1_764_504_000, "via": "callcenter", "reason": "refund"},
                "customer": {"emails": ["a@x.io", null, "b@x.io"], "recognise_me": "no",
                    "ids": [{"kind": "loyalty_id", "id": "LC-1"}, {"kind": "phone"}]}
            }))
            .unwrap();
        assert_eq!(ev.event_id, "991");
        assert_eq!(ev.timestamp, 1_764_504_000_000);
        assert_eq!(ev.event_type, "call");
        assert_eq!(ev.channel.as_deref(), Some("callcenter"));
        assert_eq!(ev.campaign_id.as_deref(), Some("refund"));
        // Attributes by name; one whose path has no value is absent.
        assert_eq!(
            ev.attributes,
            BTreeMap::from([("reason".to_string(), "refund".to_string())])
        );
        assert_eq!(
            ids(&ev),
            vec![
                ("email".into(), "a@x.io".into()),
                ("email".into(), "b@x.io".into()),
                ("loyalty_id".into(), "LC-1".into())
            ]
        );
        assert_eq!(ev.consent.and_then(|c| c.cross_channel), Some(false));
    }

    /// A till's amounts as Avro decimals (money is rarely a double in a till's database, and Debezium
    /// writes a NUMERIC column so): read exactly, with the scale of the writer schema, wherever the decimal
    /// sits (a union, a wide fixed, an array, a named record used again). They were null, so purchases lost
    /// their amounts without a word.
    #[test]
    fn avro_decimals_are_read_with_their_writer_schemas_scale() {
        use apache_avro::types::Value as A;
        let schema = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
            {"name": "receipt", "type": "string"},
            {"name": "at", "type": "long"},
            {"name": "card", "type": "string"},
            {"name": "total", "type": {"type": "bytes", "logicalType": "decimal",
                "precision": 10, "scale": 2}},
            {"name": "tax", "type": ["null", {"type": "fixed", "name": "Money", "size": 20,
                "logicalType": "decimal", "precision": 40, "scale": 4}]},
            {"name": "refunds", "type": {"type": "array", "items": {"type": "record", "name": "Refund",
                "fields": [{"name": "amount", "type": {"type": "bytes", "logicalType": "decimal",
                    "precision": 40, "scale": 4}}]}}},
            {"name": "last_refund", "type": ["null", "Refund"]},
            {"name": "units", "type": {"type": "bytes", "logicalType": "decimal",
                "precision": 4, "scale": 0}}]}"#;
        let codec = AvroCodec::new(apache_avro::Schema::parse_str(schema).unwrap()).unwrap();
        let decimal = |n: i128, width: usize| {
            let bytes = n.to_be_bytes();
            let mut b = vec![if n < 0 { 0xff } else { 0 }; width.saturating_sub(16)];
            b.extend(&bytes[16 - width.min(16)..]);
            A::Decimal(apache_avro::Decimal::from(b))
        };
        let refund = |n: i128| A::Record(vec![("amount".into(), decimal(n, 16))]);
        let sale = A::Record(vec![
            ("receipt".into(), A::String("r-1".into())),
            ("at".into(), A::Long(1_764_504_000_000)),
            ("card".into(), A::String("LC-1".into())),
            ("total".into(), decimal(1250, 4)),
            ("tax".into(), A::Union(1, Box::new(decimal(-5, 20)))),
            (
                "refunds".into(),
                A::Array(vec![refund(123_456), refund(i128::MIN)]),
            ),
            ("last_refund".into(), A::Union(1, Box::new(refund(-70)))),
            ("units".into(), decimal(7, 1)),
        ]);
        let body = apache_avro::to_avro_datum(codec.schema(), sale).unwrap();
        let doc = avro_to_json(codec.decode_value(&body).unwrap(), &codec);
        assert_eq!(doc["total"], json!("12.50"));
        assert_eq!(doc["tax"], json!("-0.0005"));
        assert_eq!(
            doc["refunds"],
            json!([{"amount": "12.3456"}, {"amount": "-17014118346046923173168730371588410.5728"}])
        );
        assert_eq!(doc["last_refund"], json!({"amount": "-0.0070"}));
        assert_eq!(doc["units"], json!("7"));

        let fields: FieldMapping = toml::from_str(
            r#"
            event_id = "receipt"
            timestamp = "at"
            default_event_type = "purchase"
            amount = "total"
            identifiers = [{ type = "loyalty_id", path = "card" }]
            "#,
        )
        .unwrap();
        let ev = Mapping::compile(&fields).unwrap().apply(&doc).unwrap();
        assert_eq!(ev.amount, Some(12.5));

        // Wider than 128 bits: no amount rather than a wrong one.
        let wide = apache_avro::Decimal::from([&[1u8][..], &[0; 16]].concat());
        assert_eq!(decimal_text(&wide, 2), None);
        assert_eq!(
            decimal_text(&apache_avro::Decimal::from([0xff; 20]), 2),
            Some("-0.01".into())
        );
    }

    #[test]
    fn a_mapping_that_cannot_work_is_refused_at_compile_time() {
        let base = FieldMapping {
            event_id: "id".into(),
            timestamp: "ts".into(),
            default_event_type: Some("call".into()),
            ..Default::default()
        };
        assert!(Mapping::compile(&base).is_ok());
        let e = Mapping::compile(&FieldMapping {
            default_event_type: None,
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.contains("event_type"), "{e}");
        let e = Mapping::compile(&FieldMapping {
            identifiers: vec![IdentifierField {
                path: "a..b".into(),
                kind: Some("email".into()),
                ..Default::default()
            }],
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.starts_with("identifiers[0].path \"a..b\""), "{e}");
        let e = Mapping::compile(&FieldMapping {
            identifiers: vec![IdentifierField {
                path: "ids[]".into(),
                type_field: Some("kind".into()),
                ..Default::default()
            }],
            ..base
        })
        .unwrap_err();
        assert!(e.contains("type_field"), "{e}");
    }
}
