//! The per-message fuzz target: decode, normalise, stitch, enrich and encode, for JSON and Avro inputs and
//! control commands, driven by proptest (cargo-fuzz needs a nightly toolchain and libFuzzer, which this
//! project's machines do not have).
//!
//! Inputs are a seed corpus of known bad-input classes (below), random mutations of it (bytes flipped,
//! cut, repeated, spliced), and random bytes. Every message must end either applied or dead-lettered,
//! never as a panic or a state error; every record produced must fit `output.max_record_bytes`; every
//! update must decode with the profile schema; no profile id may derive from an empty anchor.
//!
//! CI runs `FUZZ_CASES` (default 64) batches of up to 24 messages; soak with
//! `FUZZ_CASES=20000 cargo test --release --lib fuzz`. proptest keeps every failure it finds in
//! `proptest-regressions/fuzz.txt` and replays it first on the next run: each becomes a regression test.

use proptest::prelude::*;

use crate::codec::avro::on_decode_stack;
use crate::codec::{AvroCodec, ProfileUpdate};
use crate::config::{Config, Format, InputConfig};
use crate::engine::{Engine, Work};
use crate::kafka::dead_letters;
use crate::metrics::Metrics;
use crate::model::{now_millis, ChannelEvent, ConsentChange, Item, ProfileId, RawIdentifier};
use crate::processor::{Batch, InMessage};
use crate::scaleout::state::ShardOverlay;
use crate::store::{OutRecord, TempStore};

/// An engine holding every shard, as one instance alone does.
fn engine() -> Engine {
    let cfg = config();
    let mut engine = Engine::new(&cfg, Metrics::new().expect("metrics")).expect("engine");
    engine.hold_every_shard();
    engine
}

const JSON_TOPIC: &str = "web-json";
const AVRO_TOPIC: &str = "pos-avro";
const CONTROL_TOPIC: &str = "ctl";
/// Segment/RudderStack JSON, read through the preset's field paths.
const SEGMENT_TOPIC: &str = "site-segment";
/// Avro in a till's own schema, read through a field mapping with its writer schema from a file: a
/// recursive schema (a sale holds the sales it refunds) with a decimal amount.
const TILL_TOPIC: &str = "till-avro";
const TILL_SCHEMA: &str = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
    {"name": "receipt", "type": "string"},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "card", "type": "string"},
    {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
    {"name": "currency", "type": ["null", "string"]},
    {"name": "refunds", "type": {"type": "array", "items": "Sale"}}]}"#;
const TILL_FIELDS: &str = r#"
    event_id = "receipt"
    timestamp = "at"
    default_event_type = "purchase"
    amount = "total"
    currency = "currency"
    identifiers = [{ type = "loyalty_id", path = "card" }, { type = "loyalty_id", path = "refunds[].card" }]
"#;
/// Small, so that the record-size limit is reached by inputs a test can afford.
const MAX_RECORD_BYTES: usize = 64 * 1024;

fn config() -> Config {
    let mut cfg = Config {
        inputs: vec![
            InputConfig::new(JSON_TOPIC, "web", Format::Json),
            InputConfig::new(AVRO_TOPIC, "pos", Format::Avro),
            InputConfig {
                preset: crate::codec::mapping::Preset::Segment,
                format: None,
                ..InputConfig::new(SEGMENT_TOPIC, "app", Format::Json)
            },
            InputConfig {
                fields: Some(toml::from_str(TILL_FIELDS).expect("till fields")),
                schema_file: Some(till_schema_file()),
                schema_ids: vec![TILL_SCHEMA_ID],
                ..InputConfig::new(TILL_TOPIC, "pos", Format::Avro)
            },
        ],
        ..Config::default()
    };
    cfg.control.topic = CONTROL_TOPIC.into();
    cfg.output.max_record_bytes = MAX_RECORD_BYTES;
    cfg.processing.max_message_bytes = 4 * MAX_RECORD_BYTES;
    // A story that fits half of the small records (`Enrichment::validate`).
    cfg.enrichment.timeline = 5;
    cfg.enrichment.journey = 8;
    cfg.enrichment.interests_kept = 8;
    cfg.enrichment.preferences = 4;
    cfg
}

const TILL_SCHEMA_ID: u32 = 21;

/// The till's writer schema in a file, as `schema_file` takes it.
fn till_schema_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("stitcher-fuzz-till-{}.avsc", std::process::id()));
    std::fs::write(&path, TILL_SCHEMA).expect("write the till's schema");
    path
}

/// A till sale refunding a chain of `depth` sales, each refunding the next, written by hand (apache-avro's
/// writer recurses as its reader does).
fn till_sale(depth: usize) -> Vec<u8> {
    fn text(out: &mut Vec<u8>, s: &str) {
        varint(out, s.len() as i64);
        out.extend_from_slice(s.as_bytes());
    }
    fn sale(out: &mut Vec<u8>, i: usize) {
        text(out, &format!("t-{i}")); // receipt
        varint(out, now_millis() - 60_000); // at
        text(out, &format!("LC-{}", i % 3)); // card
        out.extend_from_slice(&[4, 0x04, 0xd2]); // total: the two bytes of 1234, 12.34
        out.extend_from_slice(&[2, 6, b'E', b'U', b'R']); // currency: the string branch
    }
    let mut out = vec![0, 0, 0, 0, TILL_SCHEMA_ID as u8];
    for i in 0..depth {
        sale(&mut out, i);
        out.push(2); // a block of one refund
    }
    sale(&mut out, depth);
    out.push(0); // refunds nothing
    out.extend(std::iter::repeat_n(0u8, depth)); // each block list ends
    out
}

/// A till sale in Avro's single-object encoding instead of the Confluent wire format.
fn single_object(confluent: &[u8]) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(TILL_SCHEMA).expect("the till's schema");
    let fingerprint = schema.fingerprint::<apache_avro::rabin::Rabin>().bytes;
    [&[0xC3, 0x01][..], &fingerprint, &confluent[5..]].concat()
}

fn good_event(id: &str, ids: &[(&str, &str)]) -> ChannelEvent {
    ChannelEvent {
        order_id: Some("o-1".into()),
        amount: Some(19.99),
        currency: Some("EUR".into()),
        items: vec![Item {
            sku: "sku-1".into(),
            quantity: 2,
            price: Some(9.99),
        }],
        consent: Some(ConsentChange {
            cross_channel: Some(true),
            email_marketing: None,
        }),
        ..ChannelEvent::new(id, "purchase", now_millis() - 60_000, ids)
    }
}

fn json(ev: &ChannelEvent) -> Vec<u8> {
    serde_json::to_vec(ev).unwrap_or_default()
}

fn avro(ev: &ChannelEvent) -> Vec<u8> {
    AvroCodec::channel_event()
        .expect("schema")
        .encode(1, ev)
        .expect("encode")
}

/// Appends a zig-zag varint, as Avro writes lengths and longs.
fn varint(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    loop {
        if z < 0x80 {
            out.push(z as u8);
            return;
        }
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
}

/// An Avro message with a Confluent header whose body is `body`.
fn raw_avro(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, 1];
    out.extend_from_slice(body);
    out
}

/// Seeds that are valid: they must be applied, not dead-lettered.
fn good_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let base = good_event("seed-good", &[("email", "a@x.io"), ("device_id", "d-1")]);
    vec![
        (JSON_TOPIC, json(&base)),
        (AVRO_TOPIC, avro(&base)),
        (SEGMENT_TOPIC, br#"{"type":"identify","messageId":"seg-1","timestamp":"2026-01-01T00:00:00Z","anonymousId":"d-1","userId":"u-1","traits":{"email":"a@x.io"}}"#.to_vec()),
        (SEGMENT_TOPIC, br#"{"type":"track","event":"Order Completed","messageId":"seg-2","timestamp":1767225600,"userId":"u-1","properties":{"total":"12.5","currency":"EUR","products":[{"sku":"s-1","quantity":2,"price":5}]}}"#.to_vec()),
        // JSON framed by Confluent's JSON Schema serializer.
        (SEGMENT_TOPIC, [&[0u8, 0, 0, 0, 3][..], br#"{"type":"page","messageId":"seg-3","timestamp":1767225600,"anonymousId":"d-1"}"#].concat()),
        (TILL_TOPIC, till_sale(0)),
        (TILL_TOPIC, till_sale(3)),
        (TILL_TOPIC, single_object(&till_sale(2))),
        (CONTROL_TOPIC, br#"{"op":"erase_identifier","type":"email","value":"a@x.io"}"#.to_vec()),
        (CONTROL_TOPIC, br#"{"op":"erase_profile","profile_id":"p-e3b0c44298fc1c149afb"}"#.to_vec()),
        (CONTROL_TOPIC, br#"{"op":"unlink","a":{"type":"email","value":"a@x.io"},"b":{"type":"device_id","value":"d-1"}}"#.to_vec()),
        // The most lines an event may carry.
        (JSON_TOPIC, json(&{
            let mut e = base.clone();
            e.event_type = "add_to_cart".into();
            e.items = (0..500).map(|i| Item { sku: format!("sku-{i:03}-{}", "x".repeat(100)), quantity: 1, price: Some(1.0) }).collect();
            e
        })),
    ]
}

/// The good seeds, then the classes of bad input that stopped or corrupted the service once (issue 17) and
/// their relatives.
pub fn seed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = good_seeds();
    seeds.extend(bad_seeds());
    seeds
}

fn bad_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let now = now_millis();
    let base = good_event("seed-good", &[("email", "a@x.io"), ("device_id", "d-1")]);
    let with = |f: &dyn Fn(&mut ChannelEvent)| {
        let mut e = base.clone();
        f(&mut e);
        e
    };
    let mut seeds: Vec<(&'static str, Vec<u8>)> = vec![
        // Amounts that overflowed a sum, or are not numbers.
        (JSON_TOPIC, br#"{"event_id":"big","event_type":"purchase","timestamp":1767225600000,"identifiers":[{"type":"email","value":"a@x.io"}],"amount":100000000000000000}"#.to_vec()),
        (JSON_TOPIC, json(&with(&|e| e.amount = Some(1e300)))),
        (JSON_TOPIC, json(&with(&|e| e.amount = Some(-1e300)))),
        (AVRO_TOPIC, avro(&with(&|e| e.amount = Some(f64::NAN)))),
        (AVRO_TOPIC, avro(&with(&|e| e.amount = Some(f64::INFINITY)))),
        // Timestamps: the largest, negative, in seconds, year 3000, as a string and as a float.
        (JSON_TOPIC, json(&with(&|e| e.timestamp = i64::MAX))),
        (AVRO_TOPIC, avro(&with(&|e| e.timestamp = i64::MAX))),
        (JSON_TOPIC, json(&with(&|e| e.timestamp = i64::MIN))),
        (JSON_TOPIC, json(&with(&|e| e.timestamp = -1))),
        (JSON_TOPIC, json(&with(&|e| e.timestamp = now / 1000))),
        (JSON_TOPIC, json(&with(&|e| e.timestamp = 32_503_680_000_000))),
        (JSON_TOPIC, br#"{"event_id":"s","event_type":"login","timestamp":"2026-01-01T00:00:00Z","identifiers":[{"type":"email","value":"a@x.io"}]}"#.to_vec()),
        (JSON_TOPIC, br#"{"event_id":"f","event_type":"login","timestamp":1.767225600e12,"identifiers":[{"type":"email","value":"a@x.io"}]}"#.to_vec()),
        // Quantities and prices out of range, long skus, many lines.
        (JSON_TOPIC, json(&with(&|e| e.items[0].quantity = i32::MAX))),
        (JSON_TOPIC, json(&with(&|e| e.items[0].quantity = i32::MIN))),
        (AVRO_TOPIC, avro(&with(&|e| e.items[0].price = Some(-1e20)))),
        (JSON_TOPIC, json(&with(&|e| e.items[0].sku = "s".repeat(100_000)))),
        // Many identifiers, very long values, empty event ids, degenerate anchors.
        (JSON_TOPIC, json(&with(&|e| e.identifiers = (0..10_000).map(|i| RawIdentifier { kind: "anonymous_id".into(), value: format!("c{i}") }).collect()))),
        (JSON_TOPIC, json(&with(&|e| e.identifiers = vec![RawIdentifier { kind: "email".into(), value: "v".repeat(200_000) }]))),
        (JSON_TOPIC, json(&with(&|e| e.event_id = String::new()))),
        (JSON_TOPIC, json(&with(&|e| e.event_id = " ".into()))),
        (JSON_TOPIC, json(&with(&|e| e.event_type = "t".repeat(10_000)))),
        (JSON_TOPIC, json(&with(&|e| e.currency = Some("€".repeat(100))))),
        // Deeply nested JSON, invalid UTF-8, a large malformed message.
        (JSON_TOPIC, format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
        (JSON_TOPIC, format!(r#"{{"event_id":"n","attributes":{}{}}}"#, "{\"a\":".repeat(20_000), "1".to_string() + &"}".repeat(20_000)).into_bytes()),
        (JSON_TOPIC, [b"{\"event_id\":\"".as_slice(), &[0xff, 0xfe, 0xc3], b"\"}"].concat()),
        (JSON_TOPIC, vec![b'{'; 3 * MAX_RECORD_BYTES]),
        (JSON_TOPIC, vec![b'x'; 5 * MAX_RECORD_BYTES]),
        (JSON_TOPIC, Vec::new()),
        // Control commands: malformed, unknown, hashed without hashing, huge.
        (CONTROL_TOPIC, br#"{"op":"erase_identifier","type":"email","hash":"zz"}"#.to_vec()),
        (CONTROL_TOPIC, br#"{"op":"erase_identifier","type":"email"}"#.to_vec()),
        (CONTROL_TOPIC, br#"{"op":"unlink","a":{"type":"email","value":"null"},"b":{"type":"device_id","value":"d-1"}}"#.to_vec()),
        (CONTROL_TOPIC, br#"{"op":"forget_everything"}"#.to_vec()),
        (CONTROL_TOPIC, vec![b'"'; 2 * MAX_RECORD_BYTES]),
    ];
    // Avro: huge string, array and map lengths; an out-of-range union index; a negative length.
    for len in [i64::MAX / 2, 400 << 20] {
        let mut huge_string = Vec::new();
        varint(&mut huge_string, len);
        seeds.push((AVRO_TOPIC, raw_avro(&huge_string)));
    }
    let mut huge_array = Vec::new();
    for s in ["e", "login"] {
        varint(&mut huge_array, s.len() as i64);
        huge_array.extend_from_slice(s.as_bytes());
    }
    huge_array.splice(1..1, [0u8]); // channel: union branch 0 (null)
    varint(&mut huge_array, now);
    let prefix = huge_array.clone();
    varint(&mut huge_array, i64::MAX / 4);
    seeds.push((AVRO_TOPIC, raw_avro(&huge_array)));
    let mut negative = prefix.clone();
    varint(&mut negative, -(1 << 40));
    seeds.push((AVRO_TOPIC, raw_avro(&negative)));
    let mut bad_union = vec![2, b'e'];
    varint(&mut bad_union, 77); // channel: union index 77 of 2
    seeds.push((AVRO_TOPIC, raw_avro(&bad_union)));
    let mut huge_map = avro(&base);
    huge_map.truncate(huge_map.len() - 1); // drop the empty attributes map
    varint(&mut huge_map, i64::MAX / 8);
    seeds.push((AVRO_TOPIC, huge_map));
    seeds.push((AVRO_TOPIC, vec![0, 0, 0, 0, 9, 1, 2, 3]));
    seeds.push((AVRO_TOPIC, vec![7; 40]));
    // A till sale nested past the bound (apache-avro's reader overflowed the stack on it), and one whose
    // refunds announce more sales than it has bytes.
    seeds.push((TILL_TOPIC, till_sale(5_000)));
    let mut announced = till_sale(0);
    announced.truncate(announced.len() - 1);
    varint(&mut announced, 1 << 30);
    seeds.push((TILL_TOPIC, announced));
    let mut other_schema = single_object(&till_sale(1));
    other_schema[5] ^= 0x40;
    seeds.push((TILL_TOPIC, other_schema));
    // Segment events whose fields do not make an event, or whose values are out of range.
    for bad in [
        r#"{"type":"page","timestamp":"2026-01-01T00:00:00Z","anonymousId":"d-1"}"#,
        r#"{"type":"page","messageId":"s","timestamp":"yesterday","anonymousId":"d-1"}"#,
        r#"{"type":"page","messageId":"s","timestamp":"2026-01-01T00:00:00+99","anonymousId":"d-1"}"#,
        r#"{"type":"page","messageId":"s","timestamp":9223372036854775807,"anonymousId":"d-1"}"#,
        r#"{"type":"page","messageId":"s","timestamp":-1e308,"anonymousId":"d-1"}"#,
        r#"{"type":"track","event":"Order Completed","messageId":"s","timestamp":1767225600,"userId":"u","properties":{"total":"lots"}}"#,
        r#"{"type":"track","event":"Product Added","messageId":"s","timestamp":1767225600,"userId":"u","properties":{"sku":"x","quantity":1e300}}"#,
        r#"{"type":"track","event":"Order Completed","messageId":"s","timestamp":1767225600,"userId":"u","properties":{"total":1e300,"currency":"EUR"}}"#,
        r#"{"type":"identify","messageId":"s","timestamp":1767225600}"#,
        r#"[1,2,3]"#,
    ] {
        seeds.push((SEGMENT_TOPIC, bad.as_bytes().to_vec()));
    }
    seeds
}

/// A message: a seed, a mutation of one, or random bytes, on one of the topics.
fn message() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let seeds = seed_corpus();
    let n = seeds.len();
    let topic = prop_oneof![
        Just(JSON_TOPIC),
        Just(AVRO_TOPIC),
        Just(CONTROL_TOPIC),
        Just(SEGMENT_TOPIC),
        Just(TILL_TOPIC)
    ];
    prop_oneof![
        3 => (0..n).prop_map(move |i| seeds[i].clone()),
        4 => (0..n, proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..5), 1..8))
            .prop_map({
                let seeds = seed_corpus();
                move |(i, edits)| {
                    let (topic, mut bytes) = seeds[i].clone();
                    for (at, byte, op) in edits {
                        let at = if bytes.is_empty() { 0 } else { at as usize % bytes.len() };
                        match op {
                            0 if !bytes.is_empty() => bytes[at] = byte,
                            1 => bytes.insert(at, byte),
                            2 => bytes.truncate(at),
                            3 => {
                                let tail = bytes[at..].to_vec();
                                bytes.extend_from_slice(&tail[..tail.len().min(64)]);
                            }
                            _ => bytes.retain(|b| *b != byte),
                        }
                    }
                    (topic, bytes)
                }
            }),
        1 => (topic, proptest::collection::vec(any::<u8>(), 0..256)),
    ]
}

fn cases() -> u32 {
    crate::env_or("FUZZ_CASES", 64)
}

/// Runs one batch of messages through the processor; checks the invariants; returns the dead letters.
fn run_batch(engine: &Engine, store: &TempStore, messages: &[(&str, Vec<u8>)]) -> Vec<OutRecord> {
    let mut overlay = ShardOverlay::new(&store.store);
    let mut batch = Batch::default();
    let mut work = Work::default();
    for (offset, (topic, bytes)) in messages.iter().enumerate() {
        let before = (batch.messages, batch.dead_letters.len());
        engine
            .take(
                &mut overlay,
                &mut batch,
                &mut work,
                InMessage {
                    topic,
                    partition: 0,
                    offset: offset as i64,
                    key: Some(b"k"),
                    payload: Some(bytes),
                },
            )
            .expect("only state errors fail a message");
        assert_eq!(batch.messages, before.0 + 1);
        assert!(
            batch.dead_letters.len() <= before.1 + 1,
            "dead-lettered at most once"
        );
    }
    let records = engine
        .output(&overlay, &mut batch, &mut work)
        .expect("output");
    let codec = AvroCodec::profile_update().expect("schema");
    let degenerate = ProfileId::from_anchor("").to_string();
    for r in &records {
        assert!(
            dead_letters::fits(r.borrowed(), MAX_RECORD_BYTES),
            "record of {} bytes for {}",
            dead_letters::record_bytes(r.borrowed()),
            r.topic
        );
        assert_ne!(
            r.key.as_deref(),
            Some(degenerate.as_bytes()),
            "empty anchor"
        );
        if let (true, Some(payload)) = (r.topic == "profile-updates", &r.payload) {
            let (_, u): (u32, ProfileUpdate) =
                codec.decode_confluent(payload).expect("updates decode");
            assert_ne!(u.profile_id, degenerate);
        }
    }
    store
        .store
        .write_shard_changes(overlay.into_changes().expect("encode"), [])
        .expect("write");
    records
        .into_iter()
        .filter(|r| r.topic == "stitcher-dead-letters")
        .collect()
}

/// A record without a value on an input (a compacted topic's tombstone: a key deleted upstream) is
/// skipped and counted by channel. It was dead-lettered as an empty message, so a table's topic filled the
/// dead-letter topic with every deletion. An empty value is still a dead letter.
#[test]
fn a_tombstone_on_an_input_is_skipped_and_counted() {
    let metrics = Metrics::new().expect("metrics");
    let mut engine = Engine::new(&config(), metrics.clone()).expect("engine");
    engine.hold_every_shard();
    let store = TempStore::new().expect("store");
    let mut overlay = ShardOverlay::new(&store.store);
    let mut batch = Batch::default();
    let mut work = Work::default();
    for (offset, (topic, payload)) in [
        (JSON_TOPIC, None),
        (TILL_TOPIC, None),
        (JSON_TOPIC, Some(&b""[..])),
    ]
    .into_iter()
    .enumerate()
    {
        let msg = InMessage {
            topic,
            partition: 0,
            offset: offset as i64,
            key: Some(b"k"),
            payload,
        };
        engine
            .take(&mut overlay, &mut batch, &mut work, msg)
            .expect("take");
    }
    assert_eq!(batch.messages, 3);
    assert_eq!(batch.dead_letters.len(), 1, "only the empty value");
    for channel in ["web", "pos"] {
        assert_eq!(
            metrics.input_tombstones.with_label_values(&[channel]).get(),
            1
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_message_is_applied_or_dead_lettered(
        messages in proptest::collection::vec(message(), 1..24)
    ) {
        // On a thread with the decode thread's stack, as the service decodes.
        on_decode_stack(move || {
            let engine = engine();
            let store = TempStore::new().expect("store");
            run_batch(&engine, &store, &messages);
        });
    }
}

/// Every seed, one batch each: the good ones applied, every bad one dead-lettered once, with what it gets.
#[test]
fn every_seed_is_handled() {
    on_decode_stack(every_seed_is_handled_here)
}

fn every_seed_is_handled_here() {
    let engine = engine();
    let store = TempStore::new().expect("store");
    let good = good_seeds().len();
    for (i, seed) in seed_corpus().into_iter().enumerate() {
        let letters = run_batch(&engine, &store, std::slice::from_ref(&seed));
        let outcome = letters
            .first()
            .and_then(|d| {
                d.headers
                    .iter()
                    .find(|(k, _)| k == dead_letters::HEADER_ERROR)
            })
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        println!(
            "seed {i:2} on {:8}: {:.150}",
            seed.0,
            outcome.as_deref().unwrap_or("applied")
        );
        assert_eq!(
            letters.len(),
            usize::from(i >= good),
            "seed {i}: {outcome:?}"
        );
    }
}

/// Twelve carts of 500 lines each once grew one profile's update past a megabyte: the profile bounds
/// (cart lines, event types, purchase totals) keep it small whatever arrives.
#[test]
fn a_profile_stays_within_its_bounds() {
    let engine = engine();
    let store = TempStore::new().expect("store");
    let event = |n: usize, f: &dyn Fn(&mut ChannelEvent)| {
        let mut e = good_event(&format!("bounds-{n}"), &[("email", "cart@x.io")]);
        f(&mut e);
        (JSON_TOPIC, json(&e))
    };
    let mut events = Vec::new();
    for n in 0..12 {
        events.push(event(n, &|e| {
            e.event_type = "add_to_cart".into();
            // After the purchases below, which clear the cart.
            e.timestamp = now_millis() - 1000;
            e.amount = None;
            e.items = (0..500)
                .map(|i| Item {
                    sku: format!("sku-{n}-{i}-{}", "s".repeat(200)),
                    quantity: 1,
                    price: Some(1.0),
                })
                .collect();
        }));
    }
    for n in 0..200 {
        events.push(event(100 + n, &|e| {
            e.event_type = format!("custom_{n:03}_{}", "t".repeat(200));
            e.items.clear();
        }));
        events.push(event(1000 + n, &|e| {
            let letter = |k: usize| char::from(b'A' + (k % 26) as u8);
            e.currency = Some(format!("Q{}{}", letter(n), letter(n / 26)));
            e.items.clear();
        }));
    }
    for e in &events {
        let letters = run_batch(&engine, &store, std::slice::from_ref(e));
        assert!(letters.is_empty(), "{:?}", letters[0].headers);
    }
    use crate::scaleout::lookup::{lookup, HeldShards, Lookup, Step};
    let held = HeldShards::new(config().scaleout.shards);
    held.publish(&engine.owned);
    let id = crate::model::Identifier::new("email", "cart@x.io");
    let Lookup::Found { shard, node } =
        lookup(&store.store, &held, &id, Step::Home).expect("state")
    else {
        panic!("no profile for the cart's email");
    };
    let read = crate::scaleout::state::ShardRead {
        kv: &store.store,
        shard,
    };
    let p = read.profile(node).expect("state").expect("a profile");
    use crate::profile::bounds;
    assert_eq!(p.cart.lines.len(), bounds::CART_LINES);
    assert_eq!(p.event_types.len(), bounds::EVENT_TYPES + 1);
    assert_eq!(p.event_types.values().sum::<u64>(), events.len() as u64);
    assert_eq!(p.purchases.len(), bounds::PURCHASE_TOTALS);
}
