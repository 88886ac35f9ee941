//! Avro datums with the Confluent wire-format header: magic byte 0, schema id (u32 BE), Avro binary.

use std::sync::Mutex;

use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema};
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

/// A datum read from a body that must hold nothing else: `rest` is what the read left.
fn whole_datum(
    value: apache_avro::AvroResult<apache_avro::types::Value>,
    rest: &[u8],
) -> Result<apache_avro::types::Value, DecodeError> {
    let value = value.map_err(|e| DecodeError::Avro(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Avro(format!(
            "{} trailing bytes after the record",
            rest.len()
        )));
    }
    Ok(value)
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

/// One schema, resolved once, to encode and decode datums with.
///
/// apache-avro's datum functions (`to_avro_datum`, `from_avro_datum`) resolve the schema's named types on
/// every call, twice when encoding (validate, then write): a sixth of the pipeline's CPU in `perf` (docs/
/// BENCHMARKS.md, "Where the CPU went"). Its single-object reader and writer keep the resolution and
/// differ from a plain datum only by a 10-byte header (`C3 01` and the schema's fingerprint), which this
/// adds before decoding and strips after encoding.
pub struct AvroCodec {
    schema: Schema,
    header: [u8; 10],
    reader: GenericSingleObjectReader,
    /// The writer keeps its buffer between calls; behind a lock so that the codec can be shared.
    writer: Mutex<GenericSingleObjectWriter>,
}

impl AvroCodec {
    pub fn new(schema: Schema) -> Result<Self, SchemaError> {
        let fingerprint = schema.fingerprint::<apache_avro::rabin::Rabin>();
        let mut header = [0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        header[2..].copy_from_slice(&fingerprint.bytes);
        let writer = Self::writer(&schema)?;
        let reader = GenericSingleObjectReader::new(schema.clone())
            .map_err(|e| SchemaError::Parse(e.to_string()))?;
        Ok(Self {
            schema,
            header,
            reader,
            writer: Mutex::new(writer),
        })
    }

    fn writer(schema: &Schema) -> Result<GenericSingleObjectWriter, SchemaError> {
        GenericSingleObjectWriter::new_with_capacity(schema, 4096)
            .map_err(|e| SchemaError::Parse(e.to_string()))
    }

    /// The service's own input schema (`schemas/channel_event.avsc`).
    pub fn channel_event() -> Result<Self, SchemaError> {
        Self::new(channel_event_schema()?)
    }

    /// The output schema (`schemas/profile_update.avsc`).
    pub fn profile_update() -> Result<Self, SchemaError> {
        Self::new(profile_update_schema()?)
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Whether both schemas have the same canonical form (Rabin fingerprint).
    pub fn same_schema(&self, other: &AvroCodec) -> bool {
        self.header == other.header
    }

    /// Decodes a Confluent-framed message, whatever its schema id, with this schema.
    pub fn decode_confluent<T: DeserializeOwned>(
        &self,
        payload: &[u8],
    ) -> Result<(u32, T), DecodeError> {
        let (id, body) = split_confluent(payload)?;
        Ok((id, self.decode(body)?))
    }

    /// Decodes an Avro body written with this schema.
    pub fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, DecodeError> {
        let value = self.decode_value(body)?;
        apache_avro::from_value(&value).map_err(|e| DecodeError::Avro(e.to_string()))
    }

    /// Decodes an Avro body written with `writer`, resolved to this schema (Avro schema resolution).
    pub fn decode_resolved<T: DeserializeOwned>(
        &self,
        writer: &Schema,
        body: &[u8],
    ) -> Result<T, DecodeError> {
        let mut rest = body;
        let value = apache_avro::from_avro_datum(writer, &mut rest, Some(&self.schema));
        let value = whole_datum(value, rest)?;
        apache_avro::from_value(&value).map_err(|e| DecodeError::Avro(e.to_string()))
    }

    /// Decodes an Avro body written with this schema into a generic value.
    pub fn decode_value(&self, body: &[u8]) -> Result<apache_avro::types::Value, DecodeError> {
        let mut rest = body;
        let value = self
            .reader
            .read_value(&mut std::io::Read::chain(&self.header[..], &mut rest));
        whole_datum(value, rest)
    }

    /// Encodes `value`, framed with schema id `id` (Confluent wire format).
    pub fn encode<T: Serialize>(&self, id: u32, value: &T) -> Result<Vec<u8>, SchemaError> {
        // No `Value::resolve`: serde already produces the shapes our schemas use (records by field name,
        // options as ["null", T] unions), and the writer validates against the schema before writing.
        let v = apache_avro::to_value(value).map_err(|e| SchemaError::Encode(e.to_string()))?;
        let mut framed = Vec::with_capacity(1024);
        framed.push(0);
        framed.extend_from_slice(&id.to_be_bytes());
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| SchemaError::Encode("avro writer poisoned".into()))?;
        if let Err(e) = writer.write_value_ref(&v, &mut framed) {
            // A failed write can leave part of a datum in the writer's buffer: start afresh.
            *writer = Self::writer(&self.schema)?;
            return Err(SchemaError::Encode(e.to_string()));
        }
        // The writer wrote its 10-byte single-object header where the datum starts: drop it.
        framed.drain(5..15);
        Ok(framed)
    }
}
