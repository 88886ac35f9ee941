//! A second instance started by mistake in the same consumer group must not split the identity graph: the
//! identity graph is not partitioned across instances, so an instance that holds only part of the input
//! partitions would stitch those identifiers apart. Both pause and report not ready; once the second is
//! killed, the first gets everything back, rewinds to its own positions and ends exactly at the truth.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

const PAUSED: &str = "assigned only part of the input partitions";

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_second_instance_in_the_group_pauses_instead_of_splitting_the_graph() {
    let s = Setup::new("group", 4, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 2000,
        seed: 41,
        shuffle_window: 100,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut first = s.start();
    wait_for(
        "the first instance to commit",
        Duration::from_secs(60),
        || s.progress().0 > 0,
    );

    // The same group, another instance name, its own state directory and HTTP port.
    let port = free_port();
    let second_state = s.dir.join("second-state");
    let mut second = s.start_with_env(&[
        ("STITCHER_INSTANCE_ID", "second"),
        ("STITCHER_STATE_DIR", &second_state.to_string_lossy()),
        ("STITCHER_HTTP_LISTEN", &format!("127.0.0.1:{port}")),
    ]);
    wait_for("both instances to pause", Duration::from_secs(60), || {
        s.log().matches(PAUSED).count() >= 2
    });
    assert_ne!(s.http_get("/readyz").0, 200, "paused means not ready");
    let stalled = s.progress().0;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.progress().0, stalled, "nothing is committed while paused");

    kill9(&mut second);
    wait_for(
        "the first instance to resume",
        Duration::from_secs(60),
        || s.log().contains("all input partitions assigned again"),
    );
    s.wait_caught_up(&mut first, Duration::from_secs(180));
    assert!(sigterm(&mut first).success(), "{}", s.log_tail());

    let out = s.output();
    let got = live_summaries(&out.view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
    assert_eq!(out.duplicates(), 0);
    println!(
        "group: second instance joined at {stalled}/{} committed; both paused; after it was killed the first \
         resumed and ended at the truth ({} profiles, 0 duplicates)",
        s.progress().1,
        got.len()
    );
}
