//! Avro binary encoding straight from and into serde, without apache-avro's intermediate `Value` tree: for
//! our own records, whose serde shape follows their schema. Structs are records with their fields in
//! schema order, `Option<T>` is the union `["null", T]`, sequences are arrays, string-keyed maps are maps,
//! `i32`/`i64` are `int`/`long`, `f64` is `double`.
//!
//! Nothing here reads the schema, so nothing here checks against it: the tests encode every shape of
//! profile update both ways (src/codec/update.rs), read ours back with apache-avro against
//! schemas/profile_update.avsc, and compare the bytes with apache-avro's own encoding (the same bytes, in
//! another order where a map iterates differently); and they read channel events that apache-avro wrote
//! against schemas/channel_event.avsc, and random bytes, both ways (below). A field added in one place and
//! not the other fails them.

use serde::de::{self, Deserialize, DeserializeSeed, Visitor};
use serde::ser::{self, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("avro binary: {0}")]
pub struct Error(String);

impl ser::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Appends the Avro binary encoding of `value` to `out`.
pub fn write<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), Error> {
    value.serialize(&mut Writer { out })
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    /// A zig-zag varint: Avro's `int` and `long`.
    fn long(&mut self, n: i64) {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        while z >= 0x80 {
            self.out.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.out.push(z as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.out.extend_from_slice(b);
    }

    /// The start of an array or map: one block of `len` items (none: only the end marker follows).
    fn block(&mut self, len: Option<usize>) -> Result<(), Error> {
        match len {
            Some(0) => Ok(()),
            Some(n) => {
                self.long(n as i64);
                Ok(())
            }
            None => Err(Error("a sequence without a known length".into())),
        }
    }
}

/// A serde shape our schemas do not use (enums; in reading, anything that needs the data to say its type).
fn unsupported<T>(what: &str) -> Result<T, Error> {
    Err(Error(format!("{what} has no Avro shape here")))
}

impl<'a> ser::Serializer for &mut Writer<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = ser::Impossible<(), Error>;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = ser::Impossible<(), Error>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.long(v.into());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.long(v.into());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.long(v.into());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.long(v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.long(v.into());
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.long(v.into());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.long(v.into());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        match i64::try_from(v) {
            Ok(n) => {
                self.long(n);
                Ok(())
            }
            Err(_) => Err(Error(format!("{v} does not fit an Avro long"))),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.bytes(v.encode_utf8(&mut [0; 4]).as_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.bytes(v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        self.bytes(v);
        Ok(())
    }
    /// The `null` branch of `["null", T]`.
    fn serialize_none(self) -> Result<(), Error> {
        self.long(0);
        Ok(())
    }
    /// The second branch of `["null", T]`.
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        self.long(1);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Error> {
        unsupported("an enum")
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Error> {
        unsupported("an enum")
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, Error> {
        self.block(len)?;
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        unsupported("an enum")
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, Error> {
        self.block(len)?;
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Error> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        unsupported("an enum")
    }
}

impl ser::SerializeSeq for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    /// The end of the block list.
    fn end(self) -> Result<(), Error> {
        self.out.push(0);
        Ok(())
    }
}

impl ser::SerializeMap for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        self.out.push(0);
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

/// A record: its fields one after another, in declaration order (the schema's order).
impl ser::SerializeStruct for &mut Writer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), Error> {
        Ok(())
    }
}

/// Reads a `T` from `bytes`, which hold its Avro binary encoding and nothing else. Strings are borrowed
/// from `bytes` where `T` can keep them borrowed.
pub fn read<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, Error> {
    let mut reader = Reader { input: bytes };
    let value = T::deserialize(&mut reader)?;
    match reader.input.len() {
        0 => Ok(value),
        n => Err(Error(format!("{n} trailing bytes after the record"))),
    }
}

struct Reader<'de> {
    input: &'de [u8],
}

impl<'de> Reader<'de> {
    fn take(&mut self, n: usize) -> Result<&'de [u8], Error> {
        if n > self.input.len() {
            return Err(Error(format!(
                "{n} bytes wanted, {} left",
                self.input.len()
            )));
        }
        let (taken, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(taken)
    }

    /// A zig-zag varint of at most ten bytes (Avro's `int` and `long`), read as apache-avro reads it: bits
    /// past the 64th are dropped.
    fn long(&mut self) -> Result<i64, Error> {
        let mut z = 0u64;
        for shift in (0..70).step_by(7) {
            let (&b, rest) = self
                .input
                .split_first()
                .ok_or_else(|| Error("the input ends inside a number".into()))?;
            self.input = rest;
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(Error("a varint longer than ten bytes".into()))
    }

    fn int(&mut self) -> Result<i32, Error> {
        let n = self.long()?;
        i32::try_from(n).map_err(|_| Error(format!("{n} does not fit an Avro int")))
    }

    fn bytes(&mut self) -> Result<&'de [u8], Error> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| Error(format!("a length of {n}")))?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'de str, Error> {
        std::str::from_utf8(self.bytes()?).map_err(|e| Error(format!("a string: {e}")))
    }

    /// The item count of the next block of an array or map; 0 ends the list. A block that says its
    /// size in bytes too (a negative count) is read item by item all the same. Every item takes at least
    /// a byte, so a count beyond the bytes left is refused before anything is read for it.
    fn block(&mut self) -> Result<usize, Error> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        let count = usize::try_from(n.unsigned_abs())
            .ok()
            .filter(|&count| count <= self.input.len())
            .ok_or_else(|| {
                Error(format!(
                    "a block of {n} items in {} bytes",
                    self.input.len()
                ))
            })?;
        Ok(count)
    }
}

impl<'de> de::Deserializer<'de> for &mut Reader<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        unsupported("a value of any type")
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.take(1)? {
            [0] => visitor.visit_bool(false),
            [1] => visitor.visit_bool(true),
            b => Err(Error(format!("a boolean of {b:?}"))),
        }
    }
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(self.int()?)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(self.int()?)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(self.int()?)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(self.long()?)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(self.int()?)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i32(self.int()?)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(self.long()?)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(self.long()?)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let b = self.take(4)?;
        visitor.visit_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        visitor.visit_f64(f64::from_le_bytes(b))
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.str()?)
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.str()?)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.str()?)
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_bytes(self.bytes()?)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_bytes(self.bytes()?)
    }
    /// The union `["null", T]`.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.long()? {
            0 => visitor.visit_none(),
            1 => visitor.visit_some(self),
            n => Err(Error(format!("branch {n} of a union [\"null\", T]"))),
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(Blocks::new(self)?)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(Fields {
            reader: self,
            left: len,
        })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_seq(Fields {
            reader: self,
            left: len,
        })
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(Blocks::new(self)?)
    }
    /// A record: its fields one after another, in declaration order (the schema's order).
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_seq(Fields {
            reader: self,
            left: fields.len(),
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Error> {
        unsupported("an enum")
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        unsupported("a field name")
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        unsupported("a value to skip")
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The fields of a record (or a tuple): a fixed number of values.
struct Fields<'a, 'de> {
    reader: &'a mut Reader<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Fields<'_, 'de> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.reader).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

/// The items of an array, or the entries of a map: blocks of a count and that many items, until a
/// count of 0.
struct Blocks<'a, 'de> {
    reader: &'a mut Reader<'de>,
    /// Items left in the current block.
    left: usize,
    ended: bool,
}

impl<'a, 'de> Blocks<'a, 'de> {
    /// Reads the first block's count, so that the size hint is that block's.
    fn new(reader: &'a mut Reader<'de>) -> Result<Self, Error> {
        let left = reader.block()?;
        Ok(Self {
            reader,
            left,
            ended: left == 0,
        })
    }

    /// Whether another item follows, reading the next block's count where the current one is done.
    fn another(&mut self) -> Result<bool, Error> {
        while self.left == 0 {
            if self.ended {
                return Ok(false);
            }
            self.left = self.reader.block()?;
            self.ended = self.left == 0;
        }
        self.left -= 1;
        Ok(true)
    }

    /// The next item (an array's element or a map's key), if another follows.
    fn next<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, Error> {
        if !self.another()? {
            return Ok(None);
        }
        seed.deserialize(&mut *self.reader).map(Some)
    }
}

impl<'de> de::SeqAccess<'de> for Blocks<'_, 'de> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.next(seed)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Blocks<'_, 'de> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        self.next(seed)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(&mut *self.reader)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_are_zigzag_varints() {
        for (n, want) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (
                i64::MAX,
                vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            write(&n, &mut out).unwrap();
            assert_eq!(out, want, "{n}");
        }
    }
}

/// Channel events read both ways: straight from the bytes (`read`), and through apache-avro's `Value`
/// against schemas/channel_event.avsc.
#[cfg(test)]
mod channel_event_tests {
    use proptest::prelude::*;

    use crate::codec::AvroCodec;
    use crate::model::{ChannelEvent, ConsentChange, Item, RawIdentifier};

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z0-9@._-]{0,12}", any::<String>(), Just(String::new())]
    }

    fn event() -> impl Strategy<Value = ChannelEvent> {
        let identifiers = prop::collection::vec(
            (text(), text()).prop_map(|(kind, value)| RawIdentifier { kind, value }),
            0..4,
        );
        let items = prop::collection::vec(
            (text(), any::<i32>(), prop::option::of(-1e9f64..1e9)).prop_map(
                |(sku, quantity, price)| Item {
                    sku,
                    quantity,
                    price,
                },
            ),
            0..3,
        );
        let consent = prop::option::of(
            (
                prop::option::of(any::<bool>()),
                prop::option::of(any::<bool>()),
            )
                .prop_map(|(cross_channel, email_marketing)| ConsentChange {
                    cross_channel,
                    email_marketing,
                }),
        );
        (
            (text(), prop::option::of(text()), text(), any::<i64>()),
            identifiers,
            (
                prop::option::of(text()),
                prop::option::of(-1e12f64..1e12),
                prop::option::of(text()),
            ),
            items,
            (prop::option::of(text()), consent),
            prop::collection::btree_map(text(), text(), 0..3),
        )
            .prop_map(
                |(
                    (event_id, channel, event_type, timestamp),
                    identifiers,
                    (order_id, amount, currency),
                    items,
                    (campaign_id, consent),
                    attributes,
                )| ChannelEvent {
                    event_id,
                    channel,
                    event_type,
                    timestamp,
                    identifiers,
                    order_id,
                    amount,
                    currency,
                    items,
                    campaign_id,
                    consent,
                    attributes,
                },
            )
    }

    /// An event as apache-avro writes it, without the Confluent header.
    fn body(codec: &AvroCodec, event: &ChannelEvent) -> Vec<u8> {
        codec.encode(1, event).unwrap()[5..].to_vec()
    }

    /// What each reader makes of `bytes`, as text: a damaged double can be NaN, which `==` never equals.
    fn read_both(codec: &AvroCodec, bytes: &[u8]) -> (String, String) {
        // As the service sets it: apache-avro allocates what a string's length says before reading it.
        apache_avro::max_allocation_bytes(16 << 20);
        (
            format!("{:?}", super::read::<ChannelEvent>(bytes).ok()),
            format!("{:?}", codec.decode::<ChannelEvent>(bytes).ok()),
        )
    }

    proptest! {
        #[test]
        fn an_event_apache_avro_wrote_reads_as_it_reads_it(event in event()) {
            let codec = AvroCodec::channel_event().unwrap();
            let bytes = body(&codec, &event);
            let direct: ChannelEvent = super::read(&bytes).unwrap();
            prop_assert_eq!(&direct, &event);
            prop_assert_eq!(codec.decode::<ChannelEvent>(&bytes).unwrap(), direct);
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Damaged bytes (cut, a byte changed, a byte added): either both readers refuse them or both read
        /// the same event. Small bytes are union branches, booleans and lengths.
        #[test]
        fn damaged_bytes_read_as_apache_avro_reads_them(
            event in event(),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![0..4u8, any::<u8>()],
            damage in 0..3u8,
        ) {
            let codec = AvroCodec::channel_event().unwrap();
            let mut bytes = body(&codec, &event);
            let i = at.index(bytes.len() + 1);
            match damage {
                0 => bytes.truncate(i),
                1 if i < bytes.len() => bytes[i] = byte,
                _ => bytes.insert(i, byte),
            }
            let (direct, apache) = read_both(&codec, &bytes);
            prop_assert_eq!(direct, apache);
        }

        #[test]
        fn random_bytes_read_as_apache_avro_reads_them(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let codec = AvroCodec::channel_event().unwrap();
            let (direct, apache) = read_both(&codec, &bytes);
            prop_assert_eq!(direct, apache);
        }
    }

    /// What we write, we read.
    #[test]
    fn an_event_reads_back_from_its_direct_encoding() {
        let event = ChannelEvent::new("e-1", "purchase", 1_700_000_000_000, &[("email", "a@b.io")]);
        let mut bytes = Vec::new();
        super::write(&event, &mut bytes).unwrap();
        assert_eq!(super::read::<ChannelEvent>(&bytes).unwrap(), event);
        bytes.push(0);
        assert_eq!(
            super::read::<ChannelEvent>(&bytes).unwrap_err().to_string(),
            "avro binary: 1 trailing bytes after the record"
        );
    }
}
