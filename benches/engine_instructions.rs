//! The service's own work per message, without Kafka, counted in instructions. `stitcher bench` times the
//! whole service against a broker, and one binary's CPU per message moves by a third from run to run on a
//! shared machine, which hides any change of less than a tenth. Under callgrind a count is the same from
//! run to run. `BENCH=engine_instructions scripts/instructions.sh` builds this, runs it under callgrind (counting
//! only inside [`measured`], on this thread: not RocksDB's flushes and compactions) and prints the
//! instructions per message and the functions they went to.
//!
//! What is counted is what the service does for a batch besides talking to Kafka, on the input of
//! `stitcher bench` (the generated journeys of `ENGINE_PERSONS` persons, default 12,000, Avro and JSON by
//! channel, 1% duplicates): each message decoded as the decode thread does, taken into the batch by the
//! engine (dedup, the owner protocol, stitching, enrichment), the batch's records made (profile updates,
//! identity changes, dead letters), its changes encoded, sorted and made into changelog records, and
//! written to the local state, in batches of `processing.batch_max_events`. Not counted: librdkafka
//! (fetching, producing, compressing, the transaction), the broker, and the background threads.
//! `ENGINE_WARM` batches (default 40) go through first, uncounted, so that the state holds most persons;
//! then `ENGINE_BATCHES` (default 10) are counted.
//!
//! `ENGINE_RESTORE=1` (natively, not under callgrind) then times a restore of every batch's changelog
//! records into an empty store, as the pipeline's restore applies them (`Restore`: the node, index and
//! redirect-list records derived from the profiles and redirects), against writing the batches' changes
//! with those records as they are, which is what the restore did while the changelog carried them.

#[path = "common/instructions.rs"]
mod instructions;

use std::hint::black_box;

use instructions::{env_or, thread_cpu};
use stitcher::config::Config;
use stitcher::engine::{changelog_records, sorted_changes, Decoder, Engine, Work};
use stitcher::generate::{channel_codec, channel_routes, encoded};
use stitcher::journeys::{generate, JourneyConfig};
use stitcher::metrics::Metrics;
use stitcher::model::now_millis;
use stitcher::processor::{Batch, InMessage};
use stitcher::scaleout::state::{local_only, KvRead, Restore, ShardOverlay};
use stitcher::store::{Store, TempStore};

/// The allocator the service runs with (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A generated message as the consumer hands it over: topic, key, bytes.
type Message<'a> = (&'a str, &'a str, Vec<u8>);

fn main() {
    let persons = env_or("ENGINE_PERSONS", 12_000);
    let warm = env_or("ENGINE_WARM", 40);
    let counted = env_or("ENGINE_BATCHES", 10);
    // The input and its configuration as `stitcher bench` makes them (src/bench.rs).
    let journeys = generate(&JourneyConfig {
        persons,
        seed: 42,
        duplicate_rate: 0.01,
        shuffle_window: 100,
        ..Default::default()
    });
    let (routes, _) = channel_routes("engine");
    let mut cfg = Config::default();
    stitcher::bench::read_generated(&mut cfg, &routes);
    let codec = channel_codec().expect("the channel event schema");
    let messages: Vec<Message> = journeys
        .messages
        .iter()
        .map(|m| encoded(&routes, &codec, m).expect("encoded"))
        .collect();
    let batches: Vec<&[Message]> = messages.chunks(cfg.processing.batch_max_events).collect();
    assert!(
        batches.len() >= warm + counted,
        "{} batches of {persons} persons' messages, {warm} warm and {counted} counted asked for: more \
         ENGINE_PERSONS",
        batches.len()
    );

    let temp = TempStore::with_block_cache(cfg.state.block_cache_mb).expect("temp store");
    temp.store
        .put_shard_count(cfg.scaleout.shards)
        .expect("shard count");
    let mut engine = Engine::new(&cfg, Metrics::new().expect("metrics")).expect("engine");
    engine.hold_every_shard();
    let decoder = engine.decoder();
    let mut at = Position::default();
    let mut log = (env_or("ENGINE_RESTORE", 0) == 1).then(Log::default);
    for b in &batches[..warm] {
        run_batch(&mut engine, &decoder, &temp.store, b, &mut at, log.as_mut());
    }
    let measured_batches = &batches[warm..warm + counted];
    let n: usize = measured_batches.iter().map(|b| b.len()).sum();
    let cpu = thread_cpu();
    measured(
        &mut engine,
        &decoder,
        &temp.store,
        measured_batches,
        &mut at,
    );
    let cpu = thread_cpu() - cpu;
    println!("engine_instructions: {persons} persons, {warm} batches warm, {n} messages counted");
    // Natively (not under callgrind): the counted batches' time on this thread's CPU.
    println!(
        "engine_instructions: {:.1} ms of the bench thread's CPU, {:.2} µs per message",
        cpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / n as f64
    );
    if let Some(log) = log {
        let messages = warm * cfg.processing.batch_max_events;
        restore(&log, messages);
    }
}

/// The changes of the warm batches: as the changelog carries them, and as the local copy writes them.
#[derive(Default)]
struct Log {
    changelog: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    written: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Times a restore of `log` into an empty store, both ways, in chunks of 10,000 as the pipeline writes.
fn restore(log: &Log, messages: usize) {
    const CHUNK: usize = 10_000;
    let derived = TempStore::new().expect("temp store");
    let cpu = thread_cpu();
    let mut restore = Restore::default();
    for (k, v) in &log.changelog {
        restore
            .apply(&derived.store, k.clone(), v.clone())
            .expect("restore");
        if restore.held() >= CHUNK {
            derived
                .store
                .write_shard_changes(restore.take(), [])
                .expect("write");
        }
    }
    derived
        .store
        .write_shard_changes(restore.take(), [])
        .expect("write");
    let with_derived = thread_cpu() - cpu;
    let plain = TempStore::new().expect("temp store");
    let cpu = thread_cpu();
    for chunk in log.written.chunks(CHUNK) {
        plain
            .store
            .write_shard_changes(chunk.iter().cloned(), [])
            .expect("write");
    }
    let as_written = thread_cpu() - cpu;
    // Every key the batches wrote (the derived ones among them) holds the same in both.
    for (k, _) in &log.written {
        let value = |store: &Store| store.read_with(k, |v| v.map(<[u8]>::to_vec)).expect("read");
        assert_eq!(
            value(&derived.store),
            value(&plain.store),
            "the restore derived another state than the batches wrote"
        );
    }
    println!(
        "engine_instructions: restore of {messages} messages' changes: {} changelog records, derived \
         ones written too: {:.1} ms ({:.2} µs per message); the {} records with them written as they \
         are: {:.1} ms ({:.2} µs per message); {:.2}x",
        log.changelog.len(),
        with_derived.as_secs_f64() * 1e3,
        with_derived.as_secs_f64() * 1e6 / messages as f64,
        log.written.len(),
        as_written.as_secs_f64() * 1e3,
        as_written.as_secs_f64() * 1e6 / messages as f64,
        with_derived.as_secs_f64() / as_written.as_secs_f64(),
    );
}

/// What callgrind counts (`--toggle-collect`).
#[inline(never)]
fn measured(
    engine: &mut Engine,
    decoder: &Decoder,
    store: &Store,
    batches: &[&[Message]],
    at: &mut Position,
) {
    for b in batches {
        run_batch(engine, decoder, store, b, at, None);
    }
}

/// Where the input stands between batches, as the pipeline keeps it: the next offset, and how many keys
/// the last batch touched (its overlay's starting room).
#[derive(Default)]
struct Position {
    offset: i64,
    batch_keys: usize,
}

/// One batch as the service's decode, worker and commit threads handle it (src/pipeline.rs), without the
/// transaction: its records are made and dropped, its changes written with no changelog offsets.
fn run_batch(
    engine: &mut Engine,
    decoder: &Decoder,
    store: &Store,
    messages: &[Message],
    at: &mut Position,
    log: Option<&mut Log>,
) {
    let mut overlay = ShardOverlay::new(store).with_capacity(at.batch_keys);
    let mut batch = Batch::default();
    let mut work = Work::default();
    for (topic, key, bytes) in messages {
        let msg = InMessage {
            topic,
            partition: 0,
            offset: at.offset,
            key: Some(key.as_bytes()),
            payload: Some(bytes),
        };
        at.offset += 1;
        let ahead = decoder.decode(msg);
        engine
            .take_decoded(&mut overlay, &mut batch, &mut work, msg, ahead)
            .expect("take");
    }
    engine
        .sweep(&mut overlay, batch.messages, now_millis())
        .expect("sweep");
    let records = engine
        .output(&overlay, &mut batch, &mut work)
        .expect("output");
    at.batch_keys = overlay.keys();
    let changes = overlay.into_changes().expect("encode");
    let sorted = sorted_changes(&changes);
    black_box(changelog_records("engine-changelog", &sorted).count());
    black_box(records);
    if let Some(log) = log {
        for (k, v) in &sorted {
            let record = ((*k).clone(), (*v).clone());
            if !local_only(k) {
                log.changelog.push(record.clone());
            }
            log.written.push(record);
        }
    }
    store
        .write_shard_changes(sorted.iter().map(|(k, v)| (k, v.as_ref())), [])
        .expect("write");
}
