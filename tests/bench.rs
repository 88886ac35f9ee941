//! `stitcher bench` against the real broker, small: every phase runs and its report adds up. The figures
//! of docs/BENCHMARKS.md come from this command, so a phase that silently measured nothing (a traffic
//! phase writing no records, a pipeline rate read off no commits) would mislead every later session.
#![cfg(feature = "kafka-it")]

mod common;

use std::process::Command;

use serde_json::Value;

use common::*;

#[test]
fn every_phase_runs_and_the_traffic_phase_writes_what_the_pipeline_wrote() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let service_log = dir.path().join("service.log");
    let out = Command::new(env!("CARGO_BIN_EXE_stitcher"))
        .args(["bench", "--brokers", &brokers()])
        .args(["--persons", "3000", "--partitions", "1", "--traffic"])
        // Transactions of 500: a phase of 50k messages commits often enough for its progress to be read
        // before it is half done, however fast this machine's passthrough is.
        .args(["--batch-max-events", "500"])
        .args(["--latency-rate", "300", "--latency-secs", "2"])
        .args(["--timeout-secs", "180", "--json"])
        .arg(&json)
        .arg("--service-log")
        .arg(&service_log)
        .args(["--service-log-level", "info"])
        // One round of warming up (a second's budget is spent by the first round).
        .args(["--warm-up-secs", "1"])
        .output()
        .expect("stitcher bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stitcher bench failed:\n{stderr}");
    // The service's log is kept where asked, at the level asked.
    let log = std::fs::read_to_string(&service_log).expect("the service's log is kept");
    assert!(log.contains("partitions assigned"), "service log:\n{log}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).expect("JSON");
    let num = |path: &str| {
        report
            .pointer(path)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{path} in {report:#}"))
    };

    // The warm-up ran one unmeasured passthrough over the input.
    let rounds = report["warm_up"]["rounds"]
        .as_array()
        .expect("warm-up rounds");
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert!(num("/warm_up/rounds/0/0") > 0.0);
    let messages = num("/messages");
    assert!(messages > 40_000.0, "{messages} messages");
    for rate in [
        "/passthrough_msgs_per_sec",
        "/pipeline_msgs_per_sec",
        "/traffic/msgs_per_sec",
    ] {
        assert!(num(rate) > 0.0, "{rate} = {}", num(rate));
    }
    // Every live event is timed, not only those an update names; at most the partition's tail is not.
    let (timed, untimed) = (num("/latency_samples"), num("/latency_untimed"));
    assert!(
        timed > 300.0 && untimed < timed / 10.0,
        "{timed} events timed, {untimed} not"
    );
    // The stretches of the phase the slowest 1% were sent in: at least one, at most all.
    let hit = report
        .pointer("/latency_tail_stretches/0")
        .and_then(Value::as_array)
        .map_or(0, Vec::len) as f64;
    let stretches = num("/latency_tail_stretches/1");
    assert!(
        hit >= 1.0 && hit <= stretches,
        "the slowest 1% in {hit} of {stretches} stretches"
    );
    assert!(num("/latency_cpu/transactions_per_sec") > 0.0);
    // Each step of the phase's commits, timed by the service.
    for step in ["produce", "offsets", "deliveries", "end"] {
        let ms = num(&format!("/latency_cpu/commit_steps_ms/{step}"));
        assert!(ms > 0.0 && ms < 60_000.0, "{step}: {ms} ms");
    }
    // The phase's slow batches, counted from the service's histogram (none is fine, but a count).
    // At most the phase's transactions (its stretches are 100 ms of sending; doubled for the drain).
    let transactions = num("/latency_cpu/transactions_per_sec") * stretches / 10.0 * 2.0;
    let slow = num("/latency_cpu/slow_batches");
    assert!(
        slow >= 0.0 && slow <= transactions + 1.0,
        "{slow} slow batches of about {transactions}"
    );
    assert!(num("/quality/f1") > 0.95, "F1 {}", num("/quality/f1"));

    // The traffic phase writes the changelog's records, the output's and the identity topic's: at least
    // every changelog record per message (the offsets also count commit markers, one per transaction),
    // and at most those plus an output and an identity record for each message.
    let kinds = report["changelog_kinds"].as_array().expect("kinds");
    let changelog: f64 = kinds
        .iter()
        .map(|k| k["records"].as_f64().unwrap_or_default())
        .sum::<f64>()
        / messages;
    let written = num("/traffic/records_per_message");
    assert!(changelog > 1.0, "{changelog} changelog records per message");
    assert!(
        written > changelog + 0.3 && written <= changelog + 2.0,
        "traffic {written} records per message against the changelog's {changelog}"
    );
    assert!(num("/traffic/value_bytes_per_message") > 100.0);
    let share = num("/traffic/pipeline_share");
    let expected = num("/pipeline_msgs_per_sec") / num("/traffic/msgs_per_sec");
    assert!(
        (share - expected).abs() < 1e-9,
        "{share} against {expected}"
    );
}
