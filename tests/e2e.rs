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
    check_http(&s, &j.truth);
    assert!(
        sigterm(&mut child).success(),
        "clean exit on SIGTERM\n{}",
        s.log_tail()
    );

    let out = s.output();
    assert_identity_stream_matches(&s, &out);
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

    let out = s.output();
    assert_identity_stream_matches(&s, &out);
    let got = live_summaries(&out.view);
    let want = truth_summaries(&j.truth);
    assert!(got == want, "{}", diff(&got, &want));
}

/// A lookup that asks for the offset of the event just sent never answers with a state without it: the
/// new identifier is there, linked to the person, from the identifier sent and from the person's email.
/// A version the profile does not reach is a clear timeout; a malformed `after` is refused.
#[test]
fn read_your_writes_lookups_reflect_the_event_just_sent() {
    let s = Setup::new("ryw", 2, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 60,
        seed: 17,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let topic = s.json_topic();
    let emails: Vec<String> = j
        .truth
        .iter()
        .filter_map(|t| t.identifiers.iter().find(|(k, _)| k == "email"))
        .map(|(_, e)| e.clone())
        .take(15)
        .collect();
    let mut waited = Vec::new();
    for (i, email) in emails.iter().enumerate() {
        let cookie = format!("ryw-cookie-{i}");
        let event = serde_json::json!({
            "event_id": format!("ryw-{i}"),
            "event_type": "page_view",
            "timestamp": stitcher::model::now_millis(),
            "identifiers": [{"type": "email", "value": email}, {"type": "anonymous_id", "value": cookie}],
        });
        let (partition, offset) = send_one(&topic, event.to_string().as_bytes());
        let after = format!("after={topic}:{partition}:{offset}&wait_ms=20000");
        for path in [
            format!("/v1/identifiers/anonymous_id/{cookie}?{after}"),
            format!("/v1/identifiers/email/{email}?{after}"),
        ] {
            let started = std::time::Instant::now();
            let (status, body) = s.http_get(&path);
            waited.push(started.elapsed());
            assert_eq!(status, 200, "{path}: {body}");
            let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
            let reflected = answer["reflects"]["offsets"][format!("{topic}:{partition}")]
                .as_i64()
                .unwrap_or(-1);
            assert!(reflected >= offset, "{path}: reflects {reflected}: {body}");
            let values: Vec<&str> = answer["profile"]["identifiers"]
                .as_array()
                .expect("identifiers")
                .iter()
                .filter_map(|i| i["value"].as_str())
                .collect();
            assert!(
                values.contains(&cookie.as_str()) && values.contains(&email.as_str()),
                "{path}: the event just sent is in the answer: {body}"
            );
        }
    }
    let email = &emails[0];
    let (status, body) = s.http_get(&format!(
        "/v1/identifiers/email/{email}?min_version=1000000&wait_ms=300"
    ));
    assert_eq!(status, 504, "{body}");
    assert!(
        body.contains("version 1000000"),
        "says what is lacking: {body}"
    );
    let (status, body) = s.http_get(&format!("/v1/identifiers/email/{email}?after=web"));
    assert_eq!(status, 400, "{body}");
    // Every refusal is JSON with an `error`, also those of the query's and the path's parsing.
    for bad in [
        format!("/v1/identifiers/email/{email}?wait_ms=soon"),
        format!("/v1/identifiers/email/{email}?min_version=-1"),
        "/v1/profiles/p-0000000000000000000%C3".to_string(),
        "/v1/persons/1".to_string(),
    ] {
        let (status, body) = s.http_get(&bad);
        assert_eq!(
            status,
            if bad.contains("persons") { 404 } else { 400 },
            "{bad}: {body}"
        );
        let refusal: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{bad}: {e}: {body}"));
        assert!(refusal["error"].is_string(), "{bad}: {body}");
    }
    assert!(sigterm(&mut child).success());
    waited.sort();
    println!(
        "read-your-writes: {} lookups, waited p50 {:?}, max {:?}",
        waited.len(),
        waited[waited.len() / 2],
        waited.last().expect("lookups")
    );
}

/// A batch ends as soon as the batch before it committed, no message is waiting and it is
/// `batch_min_duration` old, not at the linger: with a linger of 20 s, a lone event is visible to a lookup
/// that waits for it within a few seconds.
#[test]
fn a_lone_event_is_committed_without_waiting_out_the_linger() {
    let s = Setup::new(
        "lone",
        1,
        "[processing]\nbatch_linger = \"20s\"\ndrain_timeout = \"30s\"\n",
    );
    let topic = s.json_topic();
    let event = |i: usize, cookie: &str| page_view(&format!("lone-{i}"), cookie);
    // Started, assigned and caught up with one event first.
    send_one(&topic, event(0, "lone-cookie-0").as_bytes());
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    for i in 1..4 {
        let cookie = format!("lone-cookie-{i}");
        let (partition, offset) = send_one(&topic, event(i, &cookie).as_bytes());
        let started = std::time::Instant::now();
        let (status, body) = s.http_get(&format!(
            "/v1/identifiers/anonymous_id/{cookie}?after={topic}:{partition}:{offset}&wait_ms=8000"
        ));
        assert_eq!(
            status, 200,
            "event {i} not visible within 8 s (its batch waits out the 20 s linger?): {body}"
        );
        println!("lone event {i} visible after {:?}", started.elapsed());
    }
    assert!(sigterm(&mut child).success());
}

/// A batch that is not full stays open `batch_min_duration`: events at a trickle commit in a few
/// transactions, not one each, and the last of them is still visible soon.
#[test]
fn batches_stay_open_for_their_minimum_duration_at_a_trickle() {
    let s = Setup::new(
        "floor",
        1,
        "[processing]\nbatch_linger = \"2s\"\nbatch_min_duration = \"500ms\"\ndrain_timeout = \"30s\"\n",
    );
    let topic = s.json_topic();
    let event = |i: usize| page_view(&format!("floor-{i}"), &format!("floor-cookie-{i}"));
    send_one(&topic, event(0).as_bytes());
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let committed = || {
        let (_, metrics) = s.http_get("/metrics");
        metric(
            &metrics,
            r#"stitcher_transactions_total{result="committed"}"#,
        )
    };
    let before = committed();
    // 40 events 50 ms apart: without the floor each commit (a few ms) would close a batch of one
    // (tried: 40 transactions in 5.2 s).
    let started = std::time::Instant::now();
    let mut last = (0, 0);
    for i in 1..=40 {
        last = send_one(&topic, event(i).as_bytes());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (partition, offset) = last;
    let (status, body) = s.http_get(&format!(
        "/v1/identifiers/anonymous_id/floor-cookie-40?after={topic}:{partition}:{offset}&wait_ms=8000"
    ));
    assert_eq!(status, 200, "the last event not visible within 8 s: {body}");
    let elapsed = started.elapsed().as_secs_f64();
    let transactions = committed() - before;
    // At most one batch per 500 ms, and one more for the batch open when the first event came.
    assert!(
        transactions <= (elapsed / 0.5).ceil() + 1.0,
        "{transactions} transactions in {elapsed:.1} s with batches of at least 500 ms"
    );
    assert!(transactions >= 2.0, "{transactions} transactions");
    assert!(sigterm(&mut child).success());
}

/// A JSON page view of one anonymous id, stamped now.
fn page_view(event_id: &str, cookie: &str) -> String {
    serde_json::json!({
        "event_id": event_id,
        "event_type": "page_view",
        "timestamp": stitcher::model::now_millis(),
        "identifiers": [{"type": "anonymous_id", "value": cookie}],
    })
    .to_string()
}

/// The identity change stream alone rebuilds the identifier-to-profile mapping of the live profiles; every
/// record names its trigger (an input record, or a control command's record).
fn assert_identity_stream_matches(s: &Setup, out: &Output) {
    let rebuilt = s.identity_mapping();
    let live = out.identity_mapping();
    assert!(!live.is_empty());
    let differ: Vec<_> = live
        .iter()
        .filter(|(i, p)| rebuilt.get(*i) != Some(*p))
        .chain(rebuilt.iter().filter(|(i, _)| !live.contains_key(*i)))
        .take(5)
        .collect();
    assert!(
        rebuilt == live,
        "identity stream mapping differs from the live profiles (first 5): {differ:?}"
    );
    let records = read_all(&s.identity_topic);
    let mut merges = 0;
    for r in &records {
        let c = stitcher::codec::identity::IdentityChange::decode(r.payload.as_deref().unwrap())
            .unwrap();
        let t = &c.trigger;
        assert!(
            t.topic
                .as_ref()
                .is_some_and(|topic| s.input_topics.contains(topic) || *topic == s.control_topic)
                && t.offset.is_some_and(|o| o >= 0),
            "trigger without its input record: {c:?}"
        );
        merges += usize::from(c.changes.iter().any(|k| k == "merge"));
    }
    println!(
        "identity stream: {} records for {} identifiers in {} profiles, {merges} merge records",
        records.len(),
        live.len(),
        out.live().len()
    );
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

/// The running service's HTTP surface: probes, metrics (valid exposition format, checked by promtool when
/// installed), and the lookup of a profile by a raw, unnormalised identifier.
fn check_http(s: &Setup, truth: &[journeys::PersonTruth]) {
    assert_eq!(s.http_get("/healthz").0, 200);
    assert_eq!(s.http_get("/readyz").0, 200);
    let (status, metrics) = s.http_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "stitcher_events_consumed_total",
        "stitcher_profiles_created_total",
        "stitcher_profile_merges_total",
        "stitcher_output_records_total",
        "stitcher_event_latency_seconds_bucket",
        "stitcher_transactions_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    // Every committed transaction timed each of its steps: `end` once per commit (one more may be
    // under way), the others at least that often (an attempt that failed later timed its first steps).
    let committed = metric(
        &metrics,
        "stitcher_transactions_total{result=\"committed\"}",
    );
    assert!(committed > 0.0, "no committed transaction in /metrics");
    for step in ["produce", "offsets", "deliveries", "end"] {
        let timed = metric(
            &metrics,
            &format!("stitcher_commit_step_seconds_count{{step=\"{step}\"}}"),
        );
        let most = if step == "end" {
            committed + 1.0
        } else {
            f64::MAX
        };
        assert!(
            (committed..=most).contains(&timed),
            "{timed} transactions timed their {step} step, {committed} committed"
        );
    }
    if let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(metrics.as_bytes())
            .expect("write to promtool");
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("promtool check metrics: ok");
    }
    // An email as a call-centre agent would type it: mixed case, spaces (URL-encoded).
    let person = truth
        .iter()
        .find(|t| t.identifiers.iter().any(|(k, _)| k == "email"))
        .expect("a person with an email");
    let email = &person
        .identifiers
        .iter()
        .find(|(k, _)| k == "email")
        .expect("email")
        .1;
    let (status, body) = s.http_get(&format!(
        "/v1/identifiers/email/%20{}%20",
        email.to_uppercase()
    ));
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    let ids = answer["profile"]["identifiers"]
        .as_array()
        .expect("identifiers");
    assert_eq!(ids.len(), person.identifiers.len(), "{body}");
    let profile_id = answer["profile_id"].as_str().expect("profile_id");
    assert_eq!(s.http_get(&format!("/v1/profiles/{profile_id}")).0, 200);
    // A call-centre screen asks for just the story: the timeline and the errand.
    let (status, body) = s.http_get(&format!("/v1/profiles/{profile_id}?fields=timeline,errand"));
    assert_eq!(status, 200, "{body}");
    let light: serde_json::Value = serde_json::from_str(&body).expect("json");
    let keys: Vec<&str> = light["profile"]
        .as_object()
        .expect("profile")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["errand", "timeline"], "{body}");
    assert_eq!(light["profile"]["timeline"], answer["profile"]["timeline"]);
    let (status, body) = s.http_get(&format!("/v1/profiles/{profile_id}?fields=timelines"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("timeline"), "names the known fields: {body}");
    assert_eq!(
        s.http_get("/v1/identifiers/email/nobody@example.org").0,
        404
    );
    assert_eq!(s.http_get("/v1/profiles/not-an-id").0, 400);

    // Lookup latency as a call-centre screen sees it: every person's email, one request each (a new TCP
    // connection per request, as http_get does), while the service is idle.
    let mut times: Vec<std::time::Duration> = Vec::new();
    for t in truth.iter().take(300) {
        if let Some((_, email)) = t.identifiers.iter().find(|(k, _)| k == "email") {
            let started = std::time::Instant::now();
            let (status, _) = s.http_get(&format!("/v1/identifiers/email/{email}"));
            times.push(started.elapsed());
            assert_eq!(status, 200);
        }
    }
    times.sort();
    let q = |f: f64| times[((times.len() as f64 * f) as usize).min(times.len() - 1)];
    println!(
        "lookup by email: {} requests, p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        times.len(),
        q(0.5),
        q(0.99),
        times[times.len() - 1]
    );
    assert!(
        q(0.99) < std::time::Duration::from_millis(50),
        "lookups answer from local state in milliseconds"
    );
}
