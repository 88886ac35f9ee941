//! End to end against a real Apache Kafka broker (deploy/local-kafka/kafka.sh): generated journeys with a
//! known ground truth go in on six channel topics; the compacted output topic must match the truth exactly.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::Duration;

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

const TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn profiles_match_ground_truth() {
    let s = Setup::new("truth", 3, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 300,
        seed: 11,
        duplicate_rate: 0.03,
        shuffle_window: 100,
        ..Default::default()
    });
    let sent = generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    assert!(j.events >= 3000, "a few thousand events, got {}", j.events);
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(
        sigterm(&mut child).success(),
        "clean exit on SIGTERM\n{}",
        s.log_tail()
    );

    let out = s.output();
    let (view, records) = (out.view, out.records.len());
    let got = live_summaries(&view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
    assert!(s.dead_letters().is_empty());
    println!(
        "truth: {} messages ({} events, {} duplicates) -> {} profiles, {records} output records",
        sent,
        j.events,
        j.duplicates,
        got.len()
    );
}

#[test]
fn restart_half_way_loses_nothing() {
    let s = Setup::new("restart", 3, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 600,
        seed: 12,
        shuffle_window: 50,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start();
    // Stop once a good part, but not all, is committed.
    let (mut committed, total) = s.progress();
    let start = std::time::Instant::now();
    while committed < total / 3 && start.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
        committed = s.progress().0;
    }
    assert!(
        sigterm(&mut child).success(),
        "clean exit on SIGTERM\n{}",
        s.log_tail()
    );
    let (at_stop, total) = s.progress();
    println!("stopped at {at_stop}/{total}");
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success());

    let view = s.output().view;
    let got = live_summaries(&view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
}

#[test]
fn malformed_input_goes_to_dead_letters_and_nothing_else_is_lost() {
    let s = Setup::new("poison", 2, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 300,
        seed: 13,
        malformed_rate: 0.01,
        ..Default::default()
    });
    assert!(j.malformed > 10);
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success());

    let dead = s.dead_letters();
    assert_eq!(
        dead.len(),
        j.malformed,
        "every malformed message, once, in the dead-letter topic"
    );
    for d in &dead {
        for h in [
            "dlq.source.topic",
            "dlq.source.partition",
            "dlq.source.offset",
            "dlq.stage",
            "dlq.error",
        ] {
            assert!(
                d.headers.contains_key(h),
                "header {h} missing: {:?}",
                d.headers
            );
        }
        assert!(s.input_topics.contains(&d.headers["dlq.source.topic"]));
    }
    let view = s.output().view;
    let got = live_summaries(&view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
    println!(
        "poison: {} malformed of {} messages, all dead-lettered",
        j.malformed,
        j.messages.len()
    );
}
