//! A second instance started in the same consumer group (by mistake, or to scale out) shares the work and
//! never splits the identity graph: with the default single shard, one instance holds the shard and the
//! other hands its input partitions' events to it through the shard topic. The second is killed with
//! SIGKILL half way; the first takes everything over and ends exactly at the truth.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_second_instance_in_the_group_shares_the_work_without_splitting_the_graph() {
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
    let joined = s.progress().0;
    wait_for(
        "both instances to commit after the second joined",
        Duration::from_secs(90),
        || s.progress().0 > joined && s.log().matches("partitions assigned").count() >= 2,
    );
    let shared = s.progress().0;
    kill9(&mut second);
    s.wait_caught_up(&mut first, Duration::from_secs(180));
    assert!(sigterm(&mut first).success(), "{}", s.log_tail());

    let out = s.output();
    let got = live_summaries(&out.view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
    assert_eq!(out.duplicates(), 0);
    println!(
        "group: second instance joined at {joined}/{total} committed, killed at {shared}/{total}; the first \
         took over and ended at the truth ({} profiles, 0 duplicates)",
        got.len(),
        total = s.progress().1,
    );
}
