//! Wire formats: Avro in the Confluent wire format (schemas/*.avsc embedded at build time) and JSON.

pub mod avro;
pub mod binary;
pub mod identity;
pub mod mapping;
pub mod update;

use std::collections::HashSet;

use crate::config::Format;
use crate::model::ChannelEvent;
use mapping::Mapping;

pub use avro::{AvroCodec, SchemaError};
pub use update::{ProfileUpdate, UpdateEncoder};

pub const CHANNEL_EVENT_AVSC: &str = include_str!("../../schemas/channel_event.avsc");
pub const PROFILE_UPDATE_AVSC: &str = include_str!("../../schemas/profile_update.avsc");

/// Why an input message could not be decoded. The message goes to the dead-letter topic with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("not Confluent wire format: magic byte {0:#04x}, expected 0x00")]
    BadMagic(u8),
    #[error("message shorter than its header (5 bytes in the Confluent wire format, 10 in Avro's single-object encoding)")]
    ShortHeader,
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    /// Avro's single-object encoding with the fingerprint (hex, as written) of another schema.
    #[error("single-object Avro of schema fingerprint {0}, not the fingerprint of the input's schema_file")]
    UnknownFingerprint(String),
    #[error("invalid avro: {0}")]
    Avro(String),
    #[error("invalid json: {0}")]
    Json(String),
    /// The message is valid JSON but its fields do not make an event (`[inputs.fields]`, presets).
    #[error("event fields: {0}")]
    Fields(String),
    /// Not the message's fault: its writer schema could not be fetched. The batch fails instead of
    /// dead-lettering the message.
    #[error("{0}")]
    RegistryUnavailable(String),
}

/// How one input's messages are read.
pub struct Layout {
    pub format: Format,
    /// `None`: the service's own schema.
    pub mapping: Option<Mapping>,
    /// For Avro read through `mapping`: where the writer schemas come from.
    pub writer: Option<Writer>,
}

/// The writer schemas of an Avro input in the team's own schema.
pub enum Writer {
    /// One schema from a file, and the schema ids written with it.
    File(Box<AvroCodec>, HashSet<u32>),
    /// Each message's id looked up in the registry.
    Registry(std::sync::Arc<crate::registry::Registry>),
}

impl Layout {
    /// The service's own schema in `format`.
    pub fn native(format: Format) -> Self {
        Self {
            format,
            mapping: None,
            writer: None,
        }
    }
}

/// Decodes channel events of either format.
pub struct EventDecoder {
    avro: AvroCodec,
    accepted_ids: HashSet<u32>,
    max_bytes: usize,
}

impl EventDecoder {
    pub fn new(accepted_ids: &[u32], max_bytes: usize) -> Result<Self, SchemaError> {
        // A string, array or map in a message cannot be longer than the message: without this bound a
        // 20-byte message announcing a 500 MB string makes apache-avro allocate that much before it finds
        // the message too short. The setting is process-wide and the first call wins.
        apache_avro::max_allocation_bytes(max_bytes.max(16 << 20));
        Ok(Self {
            avro: AvroCodec::channel_event()?,
            accepted_ids: accepted_ids.iter().copied().collect(),
            max_bytes,
        })
    }

    /// Decodes a message of an input in the service's own schema, or in another shape read through a
    /// field mapping: JSON, or Avro with the input's writer schema.
    pub fn decode(&self, layout: &Layout, payload: &[u8]) -> Result<ChannelEvent, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        if payload.len() > self.max_bytes {
            return Err(DecodeError::TooLarge(payload.len(), self.max_bytes));
        }
        if let Some(mapping) = &layout.mapping {
            let doc = match (layout.format, &layout.writer) {
                (Format::Avro, Some(Writer::File(writer, ids))) => {
                    let body = match payload {
                        // Avro's own framing: the schema's fingerprint instead of a registry's id.
                        [0xC3, 0x01, ..] => writer.single_object_body(payload)?,
                        _ => {
                            let (id, body) = avro::split_confluent(payload)?;
                            if !ids.contains(&id) {
                                return Err(DecodeError::UnknownSchemaId(id));
                            }
                            body
                        }
                    };
                    mapping::avro_to_json(writer.decode_value(body)?, writer)
                }
                (Format::Avro, Some(Writer::Registry(registry))) => {
                    let (id, body) = avro::split_confluent(payload)?;
                    let writer = registry.writer_of_message(id)?;
                    mapping::avro_to_json(writer.decode_value(body)?, &writer)
                }
                _ => read_json(payload)?,
            };
            return mapping.apply(&doc).map_err(DecodeError::Fields);
        }
        match layout.format {
            Format::Json => read_json(payload),
            Format::Avro => {
                let (id, body) = avro::split_confluent(payload)?;
                match &layout.writer {
                    // With a registry, ids mean what the registry says: another version of the service's
                    // own schema is read with Avro schema resolution (fields the writer added are
                    // skipped, fields it lacks take their defaults).
                    Some(Writer::Registry(registry)) => {
                        let writer = registry.writer_of_message(id)?;
                        if writer.same_schema(&self.avro) {
                            read_native(body)
                        } else {
                            self.avro.decode_resolved(&writer, body)
                        }
                    }
                    _ if self.accepted_ids.contains(&id) => read_native(body),
                    _ => Err(DecodeError::UnknownSchemaId(id)),
                }
            }
        }
    }
}

/// A JSON document, bare or framed as Confluent's JSON Schema serializer frames it: magic byte 0 and a
/// 4-byte schema id first, which no JSON text begins with. The id is not looked up: JSON is read by its
/// fields, whatever schema it was checked against. A UTF-8 byte-order mark before the document (some
/// .NET and Windows writers put one) is skipped, as RFC 8259 allows a parser to.
fn read_json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let body = match payload {
        [0, ..] => avro::split_confluent(payload)?.1,
        _ => payload,
    };
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))
}

/// An event written with the service's own schema, read straight into the event (`binary`: what
/// apache-avro reads, without its `Value` tree).
fn read_native(body: &[u8]) -> Result<ChannelEvent, DecodeError> {
    binary::read(body).map_err(|e| DecodeError::Avro(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RawIdentifier;

    fn sample() -> ChannelEvent {
        ChannelEvent {
            event_id: "e-1".into(),
            channel: Some("web".into()),
            event_type: "add_to_cart".into(),
            timestamp: 1_700_000_000_123,
            identifiers: vec![RawIdentifier {
                kind: "email".into(),
                value: "A@B.io".into(),
            }],
            order_id: None,
            amount: Some(12.5),
            currency: Some("EUR".into()),
            items: vec![crate::model::Item {
                sku: "sku-1".into(),
                quantity: 2,
                price: Some(3.0),
            }],
            campaign_id: None,
            consent: Some(crate::model::ConsentChange {
                cross_channel: Some(false),
                email_marketing: None,
            }),
            attributes: [("page".to_string(), "/cart".to_string())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn avro_round_trip_in_confluent_format() {
        let bytes = AvroCodec::channel_event()
            .unwrap()
            .encode(1, &sample())
            .unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        let d = EventDecoder::new(&[1], 1 << 20).unwrap();
        assert_eq!(
            d.decode(&Layout::native(Format::Avro), &bytes).unwrap(),
            sample()
        );
    }

    #[test]
    fn json_decodes_same_shape_with_defaults() {
        let d = EventDecoder::new(&[1], 1 << 20).unwrap();
        let json = br#"{"event_id":"e","event_type":"page_view","timestamp":5,"identifiers":[{"type":"anonymous_id","value":"c"}]}"#;
        let ev = d.decode(&Layout::native(Format::Json), json).unwrap();
        assert_eq!(ev.identifiers.len(), 1);
        assert!(ev.items.is_empty());
    }

    /// JSON from Confluent's JSON Schema serializer carries the wire format's 5-byte header: it reads as
    /// the bare document, in the service's own shape and through a mapping (each such message was a
    /// dead letter, `invalid json`), as does a document after a byte-order mark. A header with nothing
    /// after it is still refused.
    #[test]
    fn json_framed_by_the_json_schema_serializer_reads_as_json() {
        let d = EventDecoder::new(&[1], 1 << 20).unwrap();
        let json = br#"{"event_id":"e","event_type":"page_view","timestamp":5,"identifiers":[{"type":"anonymous_id","value":"c"}]}"#;
        let framed = [&[0u8, 0, 0, 0, 42][..], json].concat();
        assert_eq!(
            d.decode(&Layout::native(Format::Json), &framed).unwrap(),
            d.decode(&Layout::native(Format::Json), json).unwrap()
        );
        let segment = Layout {
            format: Format::Json,
            mapping: Some(Mapping::compile(&mapping::FieldMapping::segment()).unwrap()),
            writer: None,
        };
        let track = br#"{"type":"track","event":"Signed Up","messageId":"m-1","anonymousId":"a-1","timestamp":"2026-11-30T12:00:00Z"}"#;
        let framed = [&[0u8, 0, 0, 1, 7][..], track].concat();
        assert_eq!(
            d.decode(&segment, &framed).unwrap(),
            d.decode(&segment, track).unwrap()
        );
        assert!(matches!(
            d.decode(&Layout::native(Format::Json), &[0, 0, 0, 0, 42]),
            Err(DecodeError::Json(_))
        ));
        // A byte-order mark, bare or framed.
        let marked = [&b"\xEF\xBB\xBF"[..], json].concat();
        let framed_marked = [&[0u8, 0, 0, 0, 42][..], &marked].concat();
        for payload in [&marked, &framed_marked] {
            assert_eq!(
                d.decode(&Layout::native(Format::Json), payload).unwrap(),
                d.decode(&Layout::native(Format::Json), json).unwrap()
            );
        }
        assert_eq!(
            d.decode(&Layout::native(Format::Json), &[0, 0, 1]),
            Err(DecodeError::ShortHeader)
        );
    }

    /// Avro in a team's own schema is read with its writer schema and the same paths as JSON; ids not
    /// written with that schema are refused.
    #[test]
    fn avro_in_another_schema_goes_through_the_mapping() {
        let schema = apache_avro::Schema::parse_str(
            r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
                {"name": "receipt", "type": "string"},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                {"name": "card", "type": ["null", "string"], "default": null},
                {"name": "total", "type": "double"},
                {"name": "currency", "type": {"type": "enum", "name": "Currency", "symbols": ["EUR", "USD"]}},
                {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line",
                    "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}}}
            ]}"#,
        )
        .unwrap();
        let writer = AvroCodec::new(schema.clone()).unwrap();
        use apache_avro::types::Value as A;
        let sale = A::Record(vec![
            ("receipt".into(), A::String("r-1".into())),
            ("at".into(), A::TimestampMicros(1_764_504_000_123_000)),
            (
                "card".into(),
                A::Union(1, Box::new(A::String("LC-1".into()))),
            ),
            ("total".into(), A::Double(12.5)),
            ("currency".into(), A::Enum(0, "EUR".into())),
            (
                "lines".into(),
                A::Array(vec![A::Record(vec![
                    ("sku".into(), A::String("S-1".into())),
                    ("qty".into(), A::Int(2)),
                ])]),
            ),
        ]);
        let mut payload = vec![0, 0, 0, 0, 7];
        payload.extend(apache_avro::to_avro_datum(&schema, sale.clone()).unwrap());
        let fields: mapping::FieldMapping = toml::from_str(
            r#"
            event_id = "receipt"
            timestamp = "at"
            default_event_type = "purchase"
            amount = "total"
            currency = "currency"
            identifiers = [{ type = "loyalty_id", path = "card" }]
            items = [{ path = "lines[]", sku = "sku", quantity = "qty" }]
            "#,
        )
        .unwrap();
        let layout = Layout {
            format: Format::Avro,
            mapping: Some(Mapping::compile(&fields).unwrap()),
            writer: Some(Writer::File(Box::new(writer), [7].into_iter().collect())),
        };
        let d = EventDecoder::new(&[1], 1 << 20).unwrap();
        let ev = d.decode(&layout, &payload).unwrap();
        assert_eq!(ev.event_id, "r-1");
        assert_eq!(ev.timestamp, 1_764_504_000_123);
        assert_eq!(ev.amount, Some(12.5));
        assert_eq!(ev.currency.as_deref(), Some("EUR"));
        assert_eq!(ev.identifiers[0].value, "LC-1");
        assert_eq!(ev.items[0].sku, "S-1");
        assert_eq!(ev.items[0].quantity, 2);
        payload[4] = 8;
        assert_eq!(
            d.decode(&layout, &payload),
            Err(DecodeError::UnknownSchemaId(8))
        );

        // Avro's single-object encoding of the same sale, as apache-avro's own writer frames it: read by
        // the schema's fingerprint, whatever the ids.
        let mut framed = Vec::new();
        apache_avro::GenericSingleObjectWriter::new_with_capacity(&schema, 64)
            .unwrap()
            .write_value_ref(&sale, &mut framed)
            .unwrap();
        assert_eq!(&framed[..2], &[0xC3, 0x01]);
        assert_eq!(d.decode(&layout, &framed).unwrap().event_id, "r-1");
        framed[9] ^= 1;
        assert!(matches!(
            d.decode(&layout, &framed),
            Err(DecodeError::UnknownFingerprint(_))
        ));
        assert_eq!(
            d.decode(&layout, &framed[..6]),
            Err(DecodeError::ShortHeader)
        );
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let d = EventDecoder::new(&[1], 64).unwrap();
        assert_eq!(
            d.decode(&Layout::native(Format::Avro), b""),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            d.decode(&Layout::native(Format::Avro), b"{\"x\":1}"),
            Err(DecodeError::BadMagic(b'{'))
        );
        assert_eq!(
            d.decode(&Layout::native(Format::Avro), &[0, 0, 0]),
            Err(DecodeError::ShortHeader)
        );
        assert_eq!(
            d.decode(&Layout::native(Format::Avro), &[0, 0, 0, 0, 9, 1]),
            Err(DecodeError::UnknownSchemaId(9))
        );
        assert!(matches!(
            d.decode(&Layout::native(Format::Avro), &[0, 0, 0, 0, 1, 0xff, 0xff]),
            Err(DecodeError::Avro(_))
        ));
        assert!(matches!(
            d.decode(&Layout::native(Format::Json), b"not json"),
            Err(DecodeError::Json(_))
        ));
        assert_eq!(
            d.decode(&Layout::native(Format::Json), &[b' '; 65]),
            Err(DecodeError::TooLarge(65, 64))
        );
    }
}
