//! Avro datums with the Confluent wire-format header: magic byte 0, schema id (u32 BE), Avro binary.

use apache_avro::{from_avro_datum, to_avro_datum, Schema};
use serde::{de::DeserializeOwned, Serialize};

use super::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("invalid embedded schema: {0}")]
    Parse(String),
    #[error("cannot encode avro: {0}")]
    Encode(String),
}

pub fn channel_event_schema() -> Result<Schema, SchemaError> {
    Schema::parse_str(super::CHANNEL_EVENT_AVSC).map_err(|e| SchemaError::Parse(e.to_string()))
}

pub fn profile_update_schema() -> Result<Schema, SchemaError> {
    Schema::parse_str(super::PROFILE_UPDATE_AVSC).map_err(|e| SchemaError::Parse(e.to_string()))
}

/// Splits the Confluent header from the Avro body.
pub fn split_confluent(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match payload {
        [0, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [0, ..] => Err(DecodeError::ShortHeader),
        [magic, ..] => Err(DecodeError::BadMagic(*magic)),
        [] => Err(DecodeError::Empty),
    }
}

/// Decodes an Avro body written with `schema`.
pub fn decode_datum<T: DeserializeOwned>(
    schema: &Schema,
    mut body: &[u8],
) -> Result<T, DecodeError> {
    let value =
        from_avro_datum(schema, &mut body, None).map_err(|e| DecodeError::Avro(e.to_string()))?;
    if !body.is_empty() {
        return Err(DecodeError::Avro(format!(
            "{} trailing bytes after the record",
            body.len()
        )));
    }
    apache_avro::from_value(&value).map_err(|e| DecodeError::Avro(e.to_string()))
}

/// Decodes a Confluent-framed message, whatever its schema id, with `schema`.
pub fn decode_confluent<T: DeserializeOwned>(
    schema: &Schema,
    payload: &[u8],
) -> Result<(u32, T), DecodeError> {
    let (id, body) = split_confluent(payload)?;
    Ok((id, decode_datum(schema, body)?))
}

/// Encodes `value` with `schema`, framed with schema id `id`.
pub fn encode_confluent<T: Serialize>(
    schema: &Schema,
    id: u32,
    value: &T,
) -> Result<Vec<u8>, SchemaError> {
    // No `Value::resolve`: serde already produces the shapes our schemas use (records by field name,
    // options as ["null", T] unions), and `to_avro_datum` validates against the schema before writing.
    let v = apache_avro::to_value(value).map_err(|e| SchemaError::Encode(e.to_string()))?;
    let body = to_avro_datum(schema, v).map_err(|e| SchemaError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}
