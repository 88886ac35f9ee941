//! A transactional call that never returns (librdkafka#5456, seen in CI after a broker restart): the
//! service leaves it behind with its producer and goes on in the same process, losing and duplicating
//! nothing, whether the call's transaction committed or not. The hang is caused on demand
//! (`STITCHER_TEST_HANG`, test builds only); everything after it is the real path against the broker.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::Duration;

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

const TIMEOUT: Duration = Duration::from_secs(300);

/// Runs a journey with the `n`-th `call` of the service hanging once librdkafka returned from it.
fn hang_after(name: &str, call: &str, n: usize, seed: u64) {
    let rewound = hang_after_faults(name, call, n, &[], seed);
    assert_eq!(
        rewound, 0,
        "a restore rewound a shard that held no aborted change"
    );
}

/// [`hang_after`] with more faults in the environment; how many shards a restore rewound
/// (`stitcher_state_rewound_total`).
fn hang_after_faults(name: &str, call: &str, n: usize, faults: &[(&str, &str)], seed: u64) -> u64 {
    let s = Setup::new(name, 3, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 1500,
        seed,
        duplicate_rate: 0.01,
        shuffle_window: 100,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let hang = format!("{call}:{n}");
    let mut env = vec![
        ("STITCHER_TEST_HANG", hang.as_str()),
        ("STITCHER_TEST_CALL_BOUND_MS", "2000"),
    ];
    env.extend_from_slice(faults);
    let mut child = s.start_with_env(&env);
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the service died\n{}",
        s.log_tail()
    );
    let (_, metrics) = s.http_get("/metrics");
    let hung = metrics
        .lines()
        .find(|l| l.starts_with("stitcher_errors_total{stage=\"hung\"}"))
        .unwrap_or_default()
        .to_string();
    let rewound = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stitcher_state_rewound_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("stitcher_state_rewound_total");
    let (live, _) = s.http_get("/healthz");
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());

    let out = s.output();
    let verdict = verdict(&out, &j);
    let Verdict {
        duplicates,
        ref got,
        ref want,
        lost,
    } = verdict;
    let log = s.log();
    println!(
        "hung {call} #{n}: {hung}; {rewound} shards rewound; /healthz {live}; {} events, {duplicates} duplicate output records, {lost} \
         events lost, {} profiles for {} persons",
        j.events,
        got.len(),
        want.len()
    );
    assert_eq!(
        hung,
        "stitcher_errors_total{stage=\"hung\"} 1",
        "{}",
        s.log_tail()
    );
    assert!(log.contains("never returned"), "{}", s.log_tail());
    assert_eq!(
        live, 200,
        "one producer left behind is no reason to restart"
    );
    verdict.assert_exactly_once();
    rewound
}

/// The transaction committed, but the caller never heard: its batch must not be applied twice, and its
/// state changes come back from the changelog.
#[test]
fn a_commit_that_committed_but_never_returned_loses_and_duplicates_nothing() {
    hang_after("hung-commit", "commit_transaction", 4, 41);
}

/// The offsets are in the transaction, which the producer taking over aborts: the batch is read again.
#[test]
fn an_offsets_call_that_never_returned_loses_and_duplicates_nothing() {
    hang_after("hung-offsets", "send_offsets_to_transaction", 4, 43);
}

/// A commit reported done whose transaction was aborted afterwards: Kafka's coordinator completed a commit
/// without writing its markers while the broker shut down, and the next transaction's abort took the batch's
/// records and offsets with it (CI, Kafka 4.4.0; docs/DESIGN.md, "Restore"). On demand: the 4th commit
/// aborts its transaction and reports it committed, the 5th transaction's offsets call hangs. The local
/// copy, written after the "commit", must be rewound, or the batch's events are dropped as duplicates when
/// they are read again and its merges never reach the output.
#[test]
fn a_commit_aborted_after_it_was_reported_loses_and_duplicates_nothing() {
    let rewound = hang_after_faults(
        "aborted-commit",
        "send_offsets_to_transaction",
        5,
        &[("STITCHER_TEST_ABORT_AS_COMMIT", "4")],
        47,
    );
    assert_eq!(
        rewound, 1,
        "the shard holding the aborted batch is restored from the start"
    );
}
