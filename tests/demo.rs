//! `stitcher demo`, the first command a new user runs (README): the whole pipeline on librdkafka's mock
//! cluster. It must finish on its own, every generated message committed, and the erasure it shows must have
//! happened. (It once waited forever when its last batch was committed between two of its looks.)

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{finish_within, free_port, Finished};

/// The demo's bound: a small stream takes seconds; a hang is killed and fails the test.
const WITHIN: Duration = Duration::from_secs(180);

/// A number after `label` on the line of the summary that has it.
fn figure(summary: &str, label: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure for {label:?} in:\n{summary}"))
}

#[test]
fn the_demo_commits_every_message_and_erases_what_it_shows_erased() {
    let listen = format!("127.0.0.1:{}", free_port());
    // Seeds 7 and 2 hung in 3 of 3 runs of the old demo on this machine (in 5 of 9 runs over seeds 1 to 7).
    for seed in ["7", "2"] {
        let child = Command::new(env!("CARGO_BIN_EXE_stitcher"))
            .args(["demo", "--persons", "300", "--seed", seed])
            .args(["--http-listen", &listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("stitcher demo starts");
        let Finished {
            status,
            stdout: out,
            stderr: err,
            ..
        } = finish_within(child, WITHIN);
        let status = status.unwrap_or_else(|| {
            panic!(
                "seed {seed}: the demo did not finish within {} s:\n{out}\n{err}",
                WITHIN.as_secs()
            )
        });
        assert!(status.success(), "seed {seed}: {status}:\n{out}\n{err}");

        let generated = out
            .lines()
            .find_map(|l| l.split_once(" malformed ("))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no generated count in:\n{out}"));
        assert_eq!(
            figure(&out, "processed"),
            generated,
            "seed {seed}: every generated message taken:\n{out}"
        );
        let applied = figure(&out, "events applied");
        let duplicates = figure(&out, "duplicates skipped");
        let dead = figure(&out, "dead letters");
        assert_eq!(
            applied + duplicates + dead,
            generated,
            "seed {seed}: every message applied, skipped as a duplicate or dead-lettered:\n{out}"
        );
        let erasure = out
            .lines()
            .find(|l| l.trim_start().starts_with("erasure"))
            .unwrap_or_else(|| panic!("no erasure line in:\n{out}"));
        assert!(
            erasure.contains("gone from state"),
            "seed {seed}: {erasure}\n{out}\n{err}"
        );
        assert!(
            err.contains("control command") && err.contains("applied"),
            "seed {seed}: the erase command applied:\n{err}"
        );
        // Nothing at start-up waits for what the mock cluster cannot answer (the topics' limits: 10 s).
        assert!(
            !err.contains("max.message.bytes"),
            "seed {seed}: the start-up asked the mock cluster for the topics' limits:\n{err}"
        );
    }
}
