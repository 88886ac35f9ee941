//! Avro datums with the Confluent wire-format header: magic byte 0, schema id (u32 BE), Avro binary.

use std::collections::HashMap;
use std::sync::Mutex;

use apache_avro::schema::{ArraySchema, MapSchema, Name, Namespace, ResolvedSchema};
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

/// Splits the Confluent wire format's header (magic byte 0, the schema id) from the body.
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
    /// The schema's named types by full name, for [`check_bounds`].
    names: HashMap<Name, Schema>,
    /// apache-avro's single-object header: its fingerprint keeps logical types in the canonical form.
    header: [u8; 10],
    /// The fingerprint of the specification's canonical form, which Java writes, when built from text.
    parsing_fingerprint: Option<[u8; 8]>,
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
        let names = ResolvedSchema::try_from(&schema)
            .map_err(|e| SchemaError::Parse(e.to_string()))?
            .get_names()
            .iter()
            .map(|(name, named)| (name.clone(), (*named).clone()))
            .collect();
        Ok(Self {
            schema,
            names,
            header,
            parsing_fingerprint: None,
            reader,
            writer: Mutex::new(writer),
        })
    }

    /// A schema from its JSON text (a `schema_file`), which also gives the fingerprint Avro's
    /// specification defines for single-object encoding ([`parsing_fingerprint`]).
    pub fn from_text(text: &str) -> Result<Self, SchemaError> {
        let schema = Schema::parse_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        Ok(Self {
            parsing_fingerprint: Some(parsing_fingerprint(text)?),
            ..Self::new(schema)?
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

    /// The named type (record, enum, fixed) of the full name `name` in this schema.
    pub fn named(&self, name: &Name) -> Option<&Schema> {
        self.names.get(name)
    }

    /// The body of a datum in Avro's single-object encoding (`C3 01`, then the writer schema's 64-bit
    /// Rabin fingerprint, little-endian; Java's generated `toByteBuffer()` writes it), which must be
    /// this schema's: by the specification's fingerprint, or by apache-avro's (the same for a schema
    /// without logical types).
    pub fn single_object_body<'a>(&self, payload: &'a [u8]) -> Result<&'a [u8], DecodeError> {
        match payload.split_at_checked(self.header.len()) {
            Some((header, body))
                if header == self.header
                    || self.parsing_fingerprint.as_ref().map(|f| &f[..]) == Some(&header[2..]) =>
            {
                Ok(body)
            }
            Some((header, _)) => Err(DecodeError::UnknownFingerprint(
                header[2..].iter().map(|b| format!("{b:02x}")).collect(),
            )),
            None => Err(DecodeError::ShortHeader),
        }
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
        writer: &AvroCodec,
        body: &[u8],
    ) -> Result<T, DecodeError> {
        writer.check_bounds(body)?;
        let mut rest = body;
        let value = apache_avro::from_avro_datum(&writer.schema, &mut rest, Some(&self.schema));
        let value = whole_datum(value, rest)?;
        apache_avro::from_value(&value).map_err(|e| DecodeError::Avro(e.to_string()))
    }

    /// Decodes an Avro body written with this schema into a generic value.
    pub fn decode_value(&self, body: &[u8]) -> Result<apache_avro::types::Value, DecodeError> {
        self.check_bounds(body)?;
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

/// The 64-bit Rabin fingerprint (CRC-64-AVRO), little-endian, of the Parsing Canonical Form of the schema
/// `text`, as the Avro specification defines them and Java's `SchemaNormalization` computes them: only
/// names (in full), types, fields, symbols, items, values and sizes, in that order, without whitespace;
/// a logical type is its underlying type. apache-avro 0.17 keeps logical types in its canonical form, so
/// its fingerprint of such a schema is not the one Java writes in single-object encoding.
pub fn parsing_fingerprint(text: &str) -> Result<[u8; 8], SchemaError> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
    let mut form = String::new();
    canonical_form(&json, "", &mut form)?;
    // apache-avro's CRC-64-AVRO, the specification's Rabin fingerprint, over the specification's form.
    Ok(<apache_avro::rabin::Rabin as sha2::Digest>::digest(form.as_bytes()).into())
}

/// Appends the Parsing Canonical Form of `schema`, whose names resolve in `namespace`.
fn canonical_form(
    schema: &serde_json::Value,
    namespace: &str,
    out: &mut String,
) -> Result<(), SchemaError> {
    use serde_json::Value as J;
    const PRIMITIVES: [&str; 8] = [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ];
    let quoted = |s: &str| J::String(s.to_string()).to_string();
    let full = |name: &str, namespace: &str| match (name.contains('.'), namespace) {
        (false, ns) if !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    };
    let bad = |what: &str| SchemaError::Parse(format!("{what} in {schema}"));
    match schema {
        J::String(name) if PRIMITIVES.contains(&name.as_str()) => out.push_str(&quoted(name)),
        J::String(name) => out.push_str(&quoted(&full(name, namespace))),
        J::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_form(branch, namespace, out)?;
            }
            out.push(']');
        }
        J::Object(o) => match o.get("type") {
            Some(J::String(kind))
                if matches!(kind.as_str(), "record" | "error" | "enum" | "fixed") =>
            {
                let name = o
                    .get("name")
                    .and_then(J::as_str)
                    .ok_or_else(|| bad("a named type without a name"))?;
                let own = match name.rsplit_once('.') {
                    Some((ns, _)) => ns.to_string(),
                    None => match o.get("namespace") {
                        Some(J::String(ns)) => ns.clone(),
                        _ => namespace.to_string(),
                    },
                };
                let short = name.rsplit('.').next().unwrap_or(name);
                out.push_str(&format!(
                    "{{\"name\":{},\"type\":{}",
                    quoted(&full(short, &own)),
                    quoted(kind)
                ));
                match kind.as_str() {
                    "enum" => {
                        let symbols = o
                            .get("symbols")
                            .and_then(J::as_array)
                            .ok_or_else(|| bad("an enum without symbols"))?;
                        let symbols: Vec<String> =
                            symbols.iter().filter_map(J::as_str).map(quoted).collect();
                        out.push_str(&format!(",\"symbols\":[{}]", symbols.join(",")));
                    }
                    "fixed" => {
                        let size = o
                            .get("size")
                            .and_then(J::as_u64)
                            .ok_or_else(|| bad("a fixed without a size"))?;
                        out.push_str(&format!(",\"size\":{size}"));
                    }
                    _ => {
                        let fields = o
                            .get("fields")
                            .and_then(J::as_array)
                            .ok_or_else(|| bad("a record without fields"))?;
                        out.push_str(",\"fields\":[");
                        for (i, field) in fields.iter().enumerate() {
                            let field_name = field
                                .get("name")
                                .and_then(J::as_str)
                                .ok_or_else(|| bad("a field without a name"))?;
                            let field_type = field
                                .get("type")
                                .ok_or_else(|| bad("a field without a type"))?;
                            if i > 0 {
                                out.push(',');
                            }
                            out.push_str(&format!("{{\"name\":{},\"type\":", quoted(field_name)));
                            canonical_form(field_type, &own, out)?;
                            out.push('}');
                        }
                        out.push(']');
                    }
                }
                out.push('}');
            }
            Some(J::String(kind)) if kind == "array" || kind == "map" => {
                let key = if kind == "array" { "items" } else { "values" };
                let inner = o
                    .get(key)
                    .ok_or_else(|| bad("an array or map without its type"))?;
                out.push_str(&format!("{{\"type\":{},\"{key}\":", quoted(kind)));
                canonical_form(inner, namespace, out)?;
                out.push('}');
            }
            // A primitive (whatever logical type it carries), a named type's name, or a type written
            // inside "type".
            Some(inner) => canonical_form(inner, namespace, out)?,
            None => return Err(bad("an object without a type")),
        },
        _ => return Err(bad("not a schema")),
    }
    Ok(())
}

/// How deeply a datum may nest, in calls of apache-avro's recursive decoder: one for each record, field,
/// union branch, array item, map value, decimal and named reference on the way down (an optional record
/// inside a record is two). Event schemas take a dozen; a recursive schema (a tree, a linked list) lets a
/// datum nest as deep as its bytes go, and a message of such a schema overflowed the decode thread's stack,
/// which aborts the process: every restart read the same message and aborted again.
pub const MAX_NESTING: usize = 64;

/// The stack of a thread that decodes Avro in a team's schema (the pipeline's decode thread). A call of
/// the decoder took 14 to 22 KB through the reader of a team's schema (2 MiB overflowed between 91 and
/// 151 calls) and 63 KB through `from_avro_datum`, which reads another version of the service's own
/// schema (measured in the test build, dependencies optimised): [`MAX_NESTING`] calls of the larger four
/// times over. Pages never touched cost nothing.
pub const DECODE_STACK: usize = 16 << 20;

/// Runs `f` on a thread of [`DECODE_STACK`] bytes, as the pipeline's decode thread is, for tests that
/// decode Avro in a team's schema (a test's thread has 2 MiB).
#[cfg(test)]
pub(crate) fn on_decode_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(DECODE_STACK)
            .spawn_scoped(scope, f)
            .expect("a decode thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The namespace that names inside a type called `name` resolve in, where the names around it resolve in
/// `enclosing`: apache-avro's `Name::fully_qualified_name(enclosing).namespace`, without making a name.
pub fn namespace_within<'s>(name: &'s Name, enclosing: &'s Namespace) -> &'s Namespace {
    if name.namespace.is_some() {
        &name.namespace
    } else if enclosing.as_deref().is_some_and(|ns| !ns.is_empty()) {
        enclosing
    } else {
        NO_NAMESPACE
    }
}

/// Where a schema's top-level names resolve.
pub const NO_NAMESPACE: &Namespace = &None;

/// What [`AvroCodec::check_bounds`] has yet to walk.
enum Pending<'s> {
    /// A value of the schema, in the namespace its names are resolved in, at its nesting depth.
    Value(&'s Schema, &'s Namespace, usize),
    /// The items left in the current block of an array, or of a map (whose items each begin with a
    /// string key); 0: the next block's count is read.
    Items {
        item: &'s Schema,
        namespace: &'s Namespace,
        depth: usize,
        left: usize,
        map: bool,
    },
}

impl AvroCodec {
    /// Walks `body` as apache-avro's decoder will, without recursing, and refuses what that decoder does
    /// not bound itself: a datum nested deeper than [`MAX_NESTING`], or an array or map block that
    /// announces more items than bytes are left (it reserves room for them all at once, and reads a
    /// union or boolean past the end as null, so that 20 bytes could make it build millions of values).
    /// Whatever else is wrong (a truncated datum, a union index out of range) is left for the decoder to
    /// report: the walk stops there.
    fn check_bounds(&self, body: &[u8]) -> Result<(), DecodeError> {
        let mut input = body;
        let mut pending = vec![Pending::Value(&self.schema, NO_NAMESPACE, 0)];
        while let Some(next) = pending.pop() {
            let (schema, namespace, depth) = match next {
                Pending::Value(schema, namespace, depth) => (schema, namespace, depth),
                Pending::Items {
                    item,
                    namespace,
                    depth,
                    left,
                    map,
                } => {
                    let left = match left {
                        0 => match block(&mut input)? {
                            Some(0) => continue,
                            Some(count) => count,
                            None => return Ok(()),
                        },
                        left => left,
                    };
                    pending.push(Pending::Items {
                        item,
                        namespace,
                        depth,
                        left: left - 1,
                        map,
                    });
                    if map && skip_sized(&mut input).is_none() {
                        return Ok(());
                    }
                    (item, namespace, depth)
                }
            };
            if depth > MAX_NESTING {
                return Err(DecodeError::Avro(format!(
                    "a datum nested deeper than {MAX_NESTING} levels"
                )));
            }
            let read = match schema {
                Schema::Null => Some(()),
                Schema::Boolean => skip(&mut input, 1),
                Schema::Int
                | Schema::Long
                | Schema::Enum(_)
                | Schema::Date
                | Schema::TimeMillis
                | Schema::TimeMicros
                | Schema::TimestampMillis
                | Schema::TimestampMicros
                | Schema::TimestampNanos
                | Schema::LocalTimestampMillis
                | Schema::LocalTimestampMicros
                | Schema::LocalTimestampNanos => varint(&mut input).map(drop),
                Schema::Float => skip(&mut input, 4),
                Schema::Double => skip(&mut input, 8),
                Schema::Duration => skip(&mut input, 12),
                Schema::Fixed(fixed) => skip(&mut input, fixed.size),
                Schema::Bytes | Schema::String | Schema::BigDecimal | Schema::Uuid => {
                    skip_sized(&mut input)
                }
                Schema::Decimal(decimal) => {
                    pending.push(Pending::Value(&decimal.inner, namespace, depth + 1));
                    Some(())
                }
                Schema::Union(union) => varint(&mut input)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| union.variants().get(i))
                    .map(|variant| pending.push(Pending::Value(variant, namespace, depth + 1))),
                Schema::Record(record) => {
                    let inner = namespace_within(&record.name, namespace);
                    for field in record.fields.iter().rev() {
                        pending.push(Pending::Value(&field.schema, inner, depth + 1));
                    }
                    Some(())
                }
                Schema::Array(ArraySchema { items: item, .. })
                | Schema::Map(MapSchema { types: item, .. }) => {
                    pending.push(Pending::Items {
                        item,
                        namespace,
                        depth: depth + 1,
                        left: 0,
                        map: matches!(schema, Schema::Map(_)),
                    });
                    Some(())
                }
                Schema::Ref { name } => {
                    self.names
                        .get(&name.fully_qualified_name(namespace))
                        .map(|named| {
                            let inner = namespace_within(name, namespace);
                            pending.push(Pending::Value(named, inner, depth + 1));
                        })
                }
            };
            if read.is_none() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// A zig-zag varint, or `None` where the input ends inside one or it runs past ten bytes.
fn varint(input: &mut &[u8]) -> Option<i64> {
    let mut z = 0u64;
    for shift in (0..70).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    None
}

fn skip(input: &mut &[u8], n: usize) -> Option<()> {
    *input = input.get(n..)?;
    Some(())
}

/// Skips a length and that many bytes (a string, bytes).
fn skip_sized(input: &mut &[u8]) -> Option<()> {
    let n = usize::try_from(varint(input)?).ok()?;
    skip(input, n)
}

/// The item count of the next block of an array or map (a negative count is followed by the block's
/// size in bytes), refused when more items are announced than bytes are left; `None` where the input
/// ends.
fn block(input: &mut &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(n) = varint(input) else {
        return Ok(None);
    };
    if n < 0 && varint(input).is_none() {
        return Ok(None);
    }
    let count = n.unsigned_abs();
    if count > input.len() as u64 {
        return Err(DecodeError::Avro(format!(
            "a block of {count} items in {} bytes",
            input.len()
        )));
    }
    Ok(Some(count as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    fn codec(schema: &str) -> AvroCodec {
        AvroCodec::new(Schema::parse_str(schema).expect("schema")).expect("codec")
    }

    /// A linked list: a node holds a label and, or not, the next node.
    const LIST: &str = r#"{"type": "record", "name": "Node", "namespace": "t", "fields": [
        {"name": "label", "type": "string"},
        {"name": "next", "type": ["null", "Node"]}]}"#;

    /// `links` nodes that have a next one, then the last: each an empty label and the union's branch.
    fn list(links: usize) -> Vec<u8> {
        let mut body = [0x00, 0x02].repeat(links);
        body.extend([0x00, 0x00]);
        body
    }

    fn zigzag(n: i64, out: &mut Vec<u8>) {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    #[test]
    fn a_datum_nested_past_the_bound_is_refused_before_it_is_decoded() {
        let codec = codec(LIST);
        // 200 kB. Without the check apache-avro's decoder recursed through it and overflowed the stack.
        let err = codec.decode_value(&list(100_000)).unwrap_err();
        assert!(
            err.to_string().contains("nested deeper than 64 levels"),
            "{err}"
        );

        let deepest = (0..1_000)
            .take_while(|&links| codec.check_bounds(&list(links)).is_ok())
            .last()
            .expect("a list of one node");
        assert!(deepest >= 20, "a node is three levels: {deepest} links");
        // The deepest datum accepted decodes, converts and drops within the decode thread's stack.
        let links = on_decode_stack(|| {
            let value = codec
                .decode_value(&list(deepest))
                .expect("the deepest list");
            let json = crate::codec::mapping::avro_to_json(value, &codec);
            let mut json = &json;
            let mut links = 0;
            while let Some(next) = json.get("next").filter(|next| !next.is_null()) {
                json = next;
                links += 1;
            }
            links
        });
        assert_eq!(links, deepest);
        assert!(codec.decode_value(&list(deepest + 1)).is_err());
    }

    /// The fingerprint in the single-object header Java's `BinaryMessageEncoder` (Avro 1.12.2) wrote for
    /// this schema, with a logical type in it; apache-avro's differs, and a schema without logical types
    /// gets the same from both.
    #[test]
    fn the_parsing_fingerprint_is_the_one_java_writes() {
        let sale = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
            {"name": "receipt", "type": "string"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "card", "type": "string"},
            {"name": "total", "type": "double"}]}"#;
        let java = [0xe8, 0x9e, 0x55, 0xbd, 0x29, 0xa2, 0xbd, 0x47];
        assert_eq!(parsing_fingerprint(sale).unwrap(), java);
        let sales = AvroCodec::from_text(sale).unwrap();
        assert_ne!(sales.header[2..], java);
        let mut java_framed = vec![0xC3, 0x01];
        java_framed.extend(java);
        java_framed.push(0);
        assert_eq!(sales.single_object_body(&java_framed).unwrap(), [0]);
        // The specification's own example values: the empty string's fingerprint, and a schema without
        // logical types, where both fingerprints agree.
        assert_eq!(
            <apache_avro::rabin::Rabin as sha2::Digest>::digest(b"")[..],
            0xc15d_213a_a4d7_a795u64.to_le_bytes()
        );
        let plain = codec(LIST);
        assert_eq!(parsing_fingerprint(LIST).unwrap(), plain.header[2..]);
    }

    #[test]
    fn a_block_announcing_more_items_than_bytes_is_refused() {
        // apache-avro reads a union past the end as null: 10 million of them from four bytes.
        let unions = codec(r#"{"type": "array", "items": ["null", "string"]}"#);
        let mut body = Vec::new();
        zigzag(10_000_000, &mut body);
        let err = unions.decode_value(&body).unwrap_err();
        assert!(
            err.to_string()
                .contains("a block of 10000000 items in 0 bytes"),
            "{err}"
        );
        // A negative count carries the block's size; its items count all the same.
        let nulls = codec(r#"{"type": "map", "values": "null"}"#);
        let mut body = Vec::new();
        zigzag(-3, &mut body);
        zigzag(6, &mut body);
        body.extend([0x02, b'a', 0x02, b'b']);
        assert!(nulls.decode_value(&body).is_err());
        body.extend([0x02, b'c', 0x00]);
        let Value::Map(map) = nulls.decode_value(&body).expect("three entries") else {
            panic!("a map");
        };
        assert_eq!(map.len(), 3);
    }

    const TREE: &str = r#"{"type": "record", "name": "Tree", "namespace": "t", "fields": [
        {"name": "label", "type": "string"},
        {"name": "tags", "type": {"type": "map", "values": "long"}},
        {"name": "children", "type": {"type": "array", "items": "Tree"}},
        {"name": "when", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
        {"name": "code", "type": {"type": "fixed", "name": "Code", "size": 2}},
        {"name": "weight", "type": "double"},
        {"name": "open", "type": "boolean"}]}"#;

    fn tree() -> impl Strategy<Value = Value> {
        let leaf = Just(Vec::<Value>::new());
        let children =
            leaf.prop_recursive(5, 40, 4, |inner| prop::collection::vec(node(inner), 0..4));
        node(children.boxed())
    }

    fn node(children: BoxedStrategy<Vec<Value>>) -> impl Strategy<Value = Value> {
        (
            "[a-z]{0,6}",
            prop::collection::hash_map("[a-z]{1,3}", any::<i64>(), 0..3),
            children,
            prop::option::of(any::<i64>()),
            any::<bool>(),
            any::<[u8; 2]>(),
            any::<i32>(),
        )
            .prop_map(|(label, tags, children, when, kind, code, weight)| {
                Value::Record(vec![
                    ("label".into(), Value::String(label)),
                    (
                        "tags".into(),
                        Value::Map(tags.into_iter().map(|(k, v)| (k, Value::Long(v))).collect()),
                    ),
                    ("children".into(), Value::Array(children)),
                    (
                        "when".into(),
                        match when {
                            Some(t) => Value::Union(1, Box::new(Value::TimestampMillis(t))),
                            None => Value::Union(0, Box::new(Value::Null)),
                        },
                    ),
                    (
                        "kind".into(),
                        Value::Enum(u32::from(kind), if kind { "B" } else { "A" }.into()),
                    ),
                    ("code".into(), Value::Fixed(2, code.to_vec())),
                    ("weight".into(), Value::Double(f64::from(weight))),
                    ("open".into(), Value::Boolean(kind)),
                ])
            })
    }

    proptest! {
        /// The check refuses nothing apache-avro writes within the bound: every kind of value, blocks,
        /// named references and namespaces walked as the decoder walks them.
        #[test]
        fn every_datum_within_the_bound_passes_and_decodes(value in tree()) {
            let codec = codec(TREE);
            let body = apache_avro::to_avro_datum(codec.schema(), value.clone()).expect("write");
            prop_assert!(codec.check_bounds(&body).is_ok());
            prop_assert_eq!(codec.decode_value(&body).expect("read"), value);
        }
    }
}
