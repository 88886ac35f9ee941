//! A merge storm against a real broker: under guardrails that let it through (no limits), a till starts
//! sending one loyalty card with every customer's email. The breaker must trip within a bounded number of
//! merges and hold the rest of the storm in the quarantine topic; once the card is erased and suppressed (the
//! fix), `stitcher release --replay` produces the held events again and the profiles are the no-storm
//! result: every person whole and apart, the card nowhere, every held storm event applied to its person.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::Duration;

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, Generated, JourneyConfig, Journeys};
use stitcher::model::ChannelEvent;

const TIMEOUT: Duration = Duration::from_secs(300);
const STORM: usize = 150;
const MIN_MERGES: u64 = 30;

#[test]
fn a_storm_trips_the_breaker_and_release_restores_the_no_storm_result() {
    let quarantine = unique("storm-quarantine");
    let extra = format!(
        "[guardrails]\n{NO_TYPE_LIMITS}max_profile_identifiers = 100000\n\n\
         [breaker]\nmultiple = 5.0\nmin_merges = {MIN_MERGES}\nbaseline_minutes = 10\n\
         quarantine_topic = \"{quarantine}\"\n"
    );
    let s = Setup::new("storm", 1, &extra);
    let salt = [("STITCHER_SUPPRESSION_SALT", "a-secret-of-at-least-16-bytes")];
    let j = journeys::generate(&JourneyConfig {
        persons: 250,
        seed: 41,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start_with_env(&salt);
    s.wait_caught_up(&mut child, TIMEOUT);
    let (_, metrics) = s.http_get("/metrics");
    assert_eq!(
        metric(&metrics, "stitcher_breaker_tripped"),
        0.0,
        "no storm yet"
    );

    // The storm: one card with every customer's email, all in one minute, after the journeys.
    let at = j
        .messages
        .iter()
        .filter_map(|m| match m {
            Generated::Event { event, .. } => Some(event.timestamp),
            _ => None,
        })
        .max()
        .expect("events")
        + 86_400_000;
    let emails: Vec<(usize, String)> = j
        .truth
        .iter()
        .filter_map(|t| {
            let e = t.identifiers.iter().find(|(k, _)| k == "email")?;
            Some((t.person, e.1.clone()))
        })
        .take(STORM)
        .collect();
    assert_eq!(emails.len(), STORM);
    let storm: Vec<Generated> = emails
        .iter()
        .enumerate()
        .map(|(i, (_, email))| Generated::Event {
            channel: "pos",
            key: format!("storm-{i}"),
            event: ChannelEvent::new(
                format!("storm-{i}"),
                "store_visit",
                at + i as i64,
                &[("email", email), ("loyalty_id", "CARD-STORM")],
            ),
        })
        .collect();
    generate::send(
        &brokers(),
        &s.routes,
        &Journeys {
            messages: storm,
            truth: vec![],
            events: STORM,
            malformed: 0,
            duplicates: 0,
        },
        0,
    )
    .expect("send the storm");
    s.wait_caught_up(&mut child, TIMEOUT);
    let (_, metrics) = s.http_get("/metrics");
    let held = metric(&metrics, "stitcher_quarantined_total");
    let merges = metric(&metrics, "stitcher_profile_merges_total");
    assert!(
        metric(&metrics, "stitcher_breaker_tripped") >= 1.0,
        "tripped: {metrics}"
    );
    // Tripped within a bounded number of merges; everything after it held.
    let before_trip = STORM as f64 - held;
    assert!(
        before_trip <= (MIN_MERGES + 2) as f64 && held > 0.0,
        "{held} of {STORM} storm events held, {merges} merges in all"
    );
    assert_eq!(read_all(&quarantine).len() as f64, held);

    // The fix: the card erased and suppressed (the glue it made before the trip comes apart); then release.
    s.cli(&[
        "erase",
        "--identifier",
        "loyalty_id:CARD-STORM",
        "--suppress",
    ]);
    s.wait_caught_up(&mut child, TIMEOUT);
    let out = s.cli(&["release", "--replay"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{held} events produced")), "{said}");
    s.wait_caught_up(&mut child, TIMEOUT);
    let (_, metrics) = s.http_get("/metrics");
    assert_eq!(
        metric(&metrics, "stitcher_breaker_tripped"),
        0.0,
        "released"
    );
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());

    // The no-storm result: each person's identifiers exactly, and the storm events applied to them.
    let view = s.output().view;
    let got = live_summaries(&view);
    let mut got_ids: Vec<_> = got.iter().map(|g| g.identifiers.clone()).collect();
    let mut want_ids: Vec<_> = j.truth.iter().map(|t| t.identifiers.clone()).collect();
    got_ids.sort();
    want_ids.sort();
    assert!(
        got_ids == want_ids,
        "identities differ from the no-storm truth"
    );
    // The held storm events are applied once each; those applied before the trip were anchored on the card
    // (the most trusted of their identifiers) and went with its erasure.
    let events: u64 = got.iter().map(|g| g.events).sum();
    let want: u64 = j.truth.iter().map(|t| t.events).sum::<u64>() + held as u64;
    assert_eq!(events, want, "every held storm event applied once");
    println!(
        "storm: tripped after {before_trip} of {STORM} storm events ({MIN_MERGES} merges the floor), {held} \
         held and replayed after the card was erased and suppressed"
    );
}
