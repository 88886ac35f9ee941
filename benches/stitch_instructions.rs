//! The stitch step counted in instructions rather than timed. A count under callgrind is the same from run
//! to run, where a timing on a shared two-core machine moves by a tenth between runs, so a change of a few
//! per cent to the step shows in it. `scripts/instructions.sh` builds this, runs it under callgrind (which
//! counts only inside [`measured`], on the bench's own thread: not RocksDB's flushes and compactions) and
//! prints the instructions per event and the functions they went to.
//!
//! The workload of `benches/core`'s `stitch/rocksdb`, smaller: `STITCH_PERSONS` persons of ten identifiers
//! each preloaded (default 10,000), `STITCH_WARM` batches of the stream applied and not counted (default 5,
//! so that the store holds the stream's own records too), then `STITCH_BATCHES` batches counted (default 5;
//! batches of 2,000 events, made before they are counted).

mod common;
#[path = "common/instructions.rs"]
mod instructions;

use common::{apply_batch, preload, Stream, BATCH};
use instructions::{env_or, thread_cpu};
use stitcher::config::{GuardrailConfig, StateConfig};
use stitcher::model::Event;
use stitcher::stitch::{Rules, Stitcher};
use stitcher::store::{Store, TempStore};

/// The allocator the service runs with (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn batch(stream: &mut Stream) -> Vec<Event> {
    (0..BATCH).map(|_| stream.next_event()).collect()
}

/// What callgrind counts (`--toggle-collect`): the counted batches, each through the step and its write.
#[inline(never)]
fn measured(store: &Store, stitcher: &Stitcher, batches: &[Vec<Event>]) {
    for events in batches {
        apply_batch(store, stitcher, events);
    }
}

fn main() {
    let persons = env_or("STITCH_PERSONS", 10_000);
    let warm = env_or("STITCH_WARM", 5);
    let counted = env_or("STITCH_BATCHES", 5);
    let stitcher = Stitcher::new(Rules::new(&GuardrailConfig::default()));
    let temp =
        TempStore::with_block_cache(StateConfig::default().block_cache_mb).expect("temp store");
    preload(persons, |evs| apply_batch(&temp.store, &stitcher, evs));
    let mut stream = Stream::new(persons);
    for _ in 0..warm {
        apply_batch(&temp.store, &stitcher, &batch(&mut stream));
    }
    let batches: Vec<Vec<Event>> = (0..counted).map(|_| batch(&mut stream)).collect();
    let cpu = thread_cpu();
    measured(&temp.store, &stitcher, &batches);
    let cpu = thread_cpu() - cpu;
    let events = counted * BATCH as u64;
    println!(
        "stitch_instructions: {persons} persons preloaded, {warm} batches warm, {events} events counted"
    );
    // Natively (not under callgrind): the counted section's time on this thread's CPU, without RocksDB's
    // background threads, the preload, or the time other processes took the core.
    println!(
        "stitch_instructions: {:.1} ms of the bench thread's CPU, {:.2} µs per event",
        cpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / events as f64
    );
}
