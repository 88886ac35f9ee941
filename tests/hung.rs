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
    let mut child = s.start_with_env(&[
        ("STITCHER_TEST_HANG", &hang),
        ("STITCHER_TEST_CALL_BOUND_MS", "2000"),
    ]);
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
        "hung {call} #{n}: {hung}; /healthz {live}; {} events, {duplicates} duplicate output records, {lost} \
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
