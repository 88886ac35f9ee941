//! Rule back-testing against a real broker: a live run under lenient guardrails (no shared-identifier
//! limit: a device shared by many people glues them), then `stitcher backtest` with the default guardrails
//! over the same retained topics, then a fresh run under those guardrails. The back-test must report exactly
//! the splits and merges the fresh run shows against the live profiles, and leave the live group's offsets
//! and output topic untouched.
#![cfg(feature = "kafka-it")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

const TIMEOUT: Duration = Duration::from_secs(300);
const LENIENT: &str =
    "[guardrails]\nshared_limits = { device_id = 0, anonymous_id = 0, phone = 0 }\n";

/// Live profile -> the other run's profile ids its identifiers are in, where there are several.
fn splits(
    live: &BTreeMap<(String, String), String>,
    other: &BTreeMap<(String, String), String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut to: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, p) in live {
        if let Some(q) = other.get(id) {
            to.entry(p.clone()).or_default().insert(q.clone());
        }
    }
    to.retain(|_, v| v.len() > 1);
    to
}

#[test]
fn backtesting_stricter_rules_reports_the_splits_a_fresh_run_makes() {
    let j = journeys::generate(&JourneyConfig {
        persons: 400,
        seed: 31,
        shared_device_persons: 80,
        junk_rate: 0.2,
        ..Default::default()
    });
    let live = Setup::new("bt-live", 2, LENIENT);
    generate::send(&brokers(), &live.routes, &j, 0).expect("send");
    let mut child = live.start();
    live.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success(), "{}", live.log_tail());
    let live_out = live.output();
    let committed_before = live.progress();

    // The candidate: the live configuration with the default guardrails.
    live.edit_config(|text| text.replace(LENIENT, ""));
    let out = live.cli(&["backtest", "--sample", "100000"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report json");
    let reported = |kind: &str| -> BTreeMap<String, BTreeSet<String>> {
        serde_json::from_value(report["sample"][kind].clone()).expect("sample")
    };

    // A time range before every record replays nothing: every live identifier is then only live.
    let out = live.cli(&["backtest", "--until-ms", "1"]);
    let empty: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report json");
    assert_eq!(empty["messages"], 0, "{empty:#}");
    assert_eq!(
        empty["only_live"].as_u64(),
        Some(live_out.identity_mapping().len() as u64)
    );

    // Nothing live was touched: same committed offsets, same output records.
    assert_eq!(live.progress(), committed_before);
    assert_eq!(live.output().records.len(), live_out.records.len());

    let fresh = live.sibling("bt-fresh", "");
    let mut child = fresh.start();
    fresh.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success(), "{}", fresh.log_tail());
    let (live_map, fresh_map) = (
        live_out.identity_mapping(),
        fresh.output().identity_mapping(),
    );
    let want_splits = splits(&live_map, &fresh_map);
    let want_merges = splits(&fresh_map, &live_map);
    assert!(
        !want_splits.is_empty(),
        "the shared device glued people in the live run"
    );
    assert_eq!(reported("splits"), want_splits, "{report:#}");
    assert_eq!(reported("merges"), want_merges, "{report:#}");
    assert_eq!(report["splits"].as_u64(), Some(want_splits.len() as u64));
    assert!(
        report["refusals"]["shared_identifier"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{report:#}"
    );
    println!(
        "backtest: {} messages at {:.0} msg/s; {} live profiles, {} under the candidate rules, {} splits, \
         {} merges, {} renamed",
        report["messages"],
        report["messages_per_second"].as_f64().unwrap_or(0.0),
        report["live_profiles"],
        report["candidate_profiles"],
        report["splits"],
        report["merges"],
        report["renamed"]
    );
}
