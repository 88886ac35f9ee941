//! Crash safety against the real broker: the service is killed with SIGKILL at random moments spread over
//! its progress while it works through 200k+ events and restarted each time. A second service over the
//! same input runs without crashes; at the end both compacted output topics must hold the same profiles,
//! which must match the ground truth (story and computed traits included), with no committed record
//! duplicated and no event missing.
//!
//! The soak form (issue 13), run by hand: `CRASH_PERSONS=65000 CRASH_KILLS=20 cargo test --release
//! --features kafka-it --test crash -- --nocapture` (about 1M events, 20 kills).
#![cfg(feature = "kafka-it")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::*;
use stitcher::codec::update::ProfileRecord;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Live profiles by id: what must be identical between a crashed and an uncrashed run.
fn live_profiles(out: &Output) -> BTreeMap<String, ProfileRecord> {
    out.view
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_ref()?.profile.clone()?)))
        .collect()
}

#[test]
fn kill9_at_random_moments_loses_and_duplicates_nothing() {
    let persons = env_or("CRASH_PERSONS", 12_500usize);
    let wanted_kills = env_or("CRASH_KILLS", 6usize);
    let seed = env_or(
        "CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
    );
    println!("crash: seed {seed} (CRASH_SEED={seed} repeats the kill times)");
    let crashed = Setup::new("crash", 3, "");
    let reference = crashed.sibling("crash-ref", "");
    let j = journeys::generate(&JourneyConfig {
        persons,
        seed: 21,
        duplicate_rate: 0.01,
        shuffle_window: 200,
        ..Default::default()
    });
    assert!(
        persons < 12_500 || j.events >= 200_000,
        "at least 200k events, got {}",
        j.events
    );
    let t = Instant::now();
    let sent = generate::send(&brokers(), &crashed.routes, &j, 0).expect("send");
    println!("crash: sent {sent} messages in {:.1?}", t.elapsed());

    let started = Instant::now();
    let mut reference_child = reference.start();
    let mut child = crashed.start();
    let mut rng = SmallRng::seed_from_u64(seed);
    // Kill points spread over the whole input, whatever its speed: each kill waits until the committed
    // offsets pass a random share of the input, then a random moment more (points close together kill
    // a service that is still starting or recovering).
    let mut shares: Vec<f64> = (0..wanted_kills)
        .map(|_| rng.gen_range(0.0..0.95))
        .collect();
    shares.sort_by(f64::total_cmp);
    let mut kills = 0;
    let mut kill_points = Vec::new();
    let topics = crashed.progress_topics();
    for share in shares {
        let (committed, total) = crashed.wait_for_share(&topics, share, &mut [&mut child], TIMEOUT);
        if committed >= total {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        let (committed, total) = crashed.progress();
        kill9(&mut child);
        kills += 1;
        kill_points.push(format!("{committed}/{total}"));
        child = crashed.start();
    }
    println!(
        "crash: killed at committed offsets {}",
        kill_points.join(", ")
    );
    assert!(
        kills >= wanted_kills.min(5),
        "only {kills} kills before the run finished; the run is too short to test anything"
    );
    crashed.wait_caught_up(&mut child, TIMEOUT);
    let crashed_secs = started.elapsed().as_secs_f64();
    reference.wait_caught_up(&mut reference_child, TIMEOUT);
    assert!(sigterm(&mut child).success(), "{}", crashed.log_tail());
    assert!(sigterm(&mut reference_child).success());

    let out = crashed.output();
    let reference_out = reference.output();
    let verdict = verdict(&out, &j);
    let Verdict {
        duplicates,
        ref got,
        ref want,
        lost,
    } = verdict;
    let same_as_reference = live_profiles(&out) == live_profiles(&reference_out);
    // Restores that found aborted changes in the local copy (docs/DESIGN.md, "Restore"): a kill aborts
    // only what was never reported committed, so any such find is a false alarm of the check.
    let rewound = crashed.rewound();
    println!(
        "crash: {} events ({sent} messages, {} duplicates in input), {kills} kills, {duplicates} duplicate \
         output records found, {lost} events lost, {rewound} shards rewound, {} profiles for {} persons, {} output records, \
         identical to the run without crashes: {same_as_reference}; crashed run took {crashed_secs:.1}s",
        j.events,
        j.duplicates,
        got.len(),
        want.len(),
        out.records.len(),
    );
    verdict.assert_exactly_once();
    assert_eq!(
        rewound, 0,
        "a restore rewound a shard that held no aborted change"
    );
    assert_eq!(reference_out.duplicates(), 0);
    assert!(
        same_as_reference,
        "the crashed run's profiles differ from the run without crashes"
    );
}
