//! Adversarial input against a real broker: one device id shared by 10,000 different people's emails, and
//! a junk identifier (test@test.com, undefined, ...) on half of all events. Profiles must stay as the
//! ground truth says, with the device set apart in a profile of its own, and the run must stay fast: its
//! events/s are compared with a run over the same journeys without the adversarial data.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use stitcher::codec::ProfileUpdate;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig, Journeys, SHARED_DEVICE};

const TIMEOUT: Duration = Duration::from_secs(600);

fn persons() -> usize {
    std::env::var("ADVERSARIAL_PERSONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12_000)
}

struct Run {
    messages: u64,
    secs: f64,
    view: std::collections::BTreeMap<String, Option<ProfileUpdate>>,
    metrics: String,
}

/// Sends everything first, then times the service from start to caught up.
fn run(test: &str, j: &Journeys) -> Run {
    let s = Setup::new(test, 3, "");
    let messages = generate::send(&brokers(), &s.routes, j, 0).expect("send");
    let started = Instant::now();
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let secs = started.elapsed().as_secs_f64();
    let (status, metrics) = s.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    assert!(s.dead_letters().is_empty());
    Run {
        messages,
        secs,
        view: s.output().view,
        metrics,
    }
}

#[test]
fn shared_device_and_junk_do_not_glue_people() {
    let base = JourneyConfig {
        persons: persons(),
        seed: 21,
        shuffle_window: 200,
        ..Default::default()
    };
    let sharers = (persons() * 10 / 12).max(10);
    let adversarial = JourneyConfig {
        shared_device_persons: sharers,
        junk_rate: 0.5,
        ..base.clone()
    };
    let (plain_j, adv_j) = (journeys::generate(&base), journeys::generate(&adversarial));

    let plain = run("plain", &plain_j);
    let got = live_summaries(&plain.view);
    let want = truth_summaries(&plain_j.truth);
    assert!(got == want, "plain run: {}", diff(&got, &want));

    let adv = run("adversarial", &adv_j);
    // The shared device lives alone in a profile marked shared; everything else is the truth.
    let shared: Vec<&ProfileUpdate> = adv
        .view
        .values()
        .flatten()
        .filter(|u| u.profile.as_ref().is_some_and(|p| p.shared))
        .collect();
    assert_eq!(shared.len(), 1, "one shared profile: {shared:?}");
    let ids = &shared[0].profile.as_ref().expect("profile").identifiers;
    assert_eq!(ids.len(), 1);
    assert_eq!(
        (ids[0].kind.as_str(), ids[0].value.as_str()),
        ("device_id", SHARED_DEVICE)
    );
    let mut people = adv.view.clone();
    people.retain(|_, v| {
        !v.as_ref()
            .is_some_and(|u| u.profile.as_ref().is_some_and(|p| p.shared))
    });
    let got = live_summaries(&people);
    let want = truth_summaries(&adv_j.truth);
    assert!(got == want, "adversarial run: {}", diff(&got, &want));

    let junk = metric(
        &adv.metrics,
        "stitcher_identifiers_rejected_total{reason=\"blocked\"}",
    );
    let sharers_seen = adv_j
        .messages
        .iter()
        .filter(|m| match m {
            journeys::Generated::Event { event, .. } => {
                event.identifiers.iter().any(|i| i.value == SHARED_DEVICE)
            }
            _ => false,
        })
        .count();
    assert!(
        junk as usize >= adv_j.events * 4 / 10,
        "about half of {} events carried junk, {junk} blocked",
        adv_j.events
    );
    let (plain_rate, adv_rate) = (
        plain.messages as f64 / plain.secs,
        adv.messages as f64 / adv.secs,
    );
    println!(
        "adversarial: {} persons; plain {} msgs in {:.1}s = {:.0}/s; adversarial {} msgs ({} sharing one device, \
         {junk} junk identifiers blocked, {} splits) in {:.1}s = {:.0}/s; ratio {:.2}",
        persons(),
        plain.messages,
        plain.secs,
        plain_rate,
        adv.messages,
        sharers_seen,
        metric(&adv.metrics, "stitcher_profile_splits_total"),
        adv.secs,
        adv_rate,
        adv_rate / plain_rate
    );
    assert_eq!(sharers_seen, sharers);
    assert!(
        adv_rate >= plain_rate * 0.5,
        "the adversarial run must stay fast: {adv_rate:.0}/s against {plain_rate:.0}/s"
    );
}
