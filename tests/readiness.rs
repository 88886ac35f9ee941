//! Readiness means progress, and the lag gauge tells the truth (issue 17), against the real broker:
//! - a configured input topic that does not exist makes the instance not ready, naming the topic, while the
//!   other channels keep flowing; once created it is picked up without pausing anything, and no log line
//!   blames another instance;
//! - after a restart with a backlog, `stitcher_consumer_lag_messages` falls to 0 once the backlog is read;
//! - an instance stopped while it waits for unreachable brokers exits 0, never having reported ready;
//! - of two processes started with the same instance id, one exits saying so and the other goes on.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use stitcher::generate;
use stitcher::journeys::{self, JourneyConfig};

const TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn a_missing_input_topic_is_named_and_picked_up_once_created() {
    let s = Setup::new("missing", 1, "");
    let late = format!("{}-late", s.name);
    s.edit_config(|c| {
        c.replacen(
            "[[inputs]]",
            &format!("[[inputs]]\ntopic = \"{late}\"\nchannel = \"kiosk\"\nformat = \"json\"\n\n[[inputs]]"),
            1,
        )
    });
    let j = journeys::generate(&JourneyConfig {
        persons: 200,
        seed: 5,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start();
    // The other channels flow while the topic is missing...
    s.wait_caught_up(&mut child, TIMEOUT);
    // ...and the instance says why it is not ready.
    let (status, why) = s.http_get("/readyz");
    assert_eq!(status, 503, "{why}");
    assert!(why.contains(&late), "{why}");
    assert!(s.log().contains(&late), "the log names the missing topic");

    create_topics(std::slice::from_ref(&late), 2);
    let event = serde_json::json!({
        "event_id": "kiosk-1",
        "event_type": "page_view",
        "timestamp": stitcher::model::now_millis(),
        "identifiers": [{"type": "email", "value": "kiosk@x.io"}],
    });
    let mut routes = s.routes.clone();
    routes.insert(
        "kiosk".into(),
        (late.clone(), stitcher::config::Format::Json),
    );
    let taken = s.wait_for(
        "ready once the topic exists",
        Duration::from_secs(60),
        || s.http_get("/readyz").0 == 200,
    );
    generate::send(
        &brokers(),
        &routes,
        &journeys::Journeys::of_messages(vec![journeys::Generated::Malformed {
            channel: "kiosk",
            key: "k".into(),
            bytes: serde_json::to_vec(&event).expect("json"),
        }]),
        0,
    )
    .expect("send");
    let picked = s.wait_for(
        "the new topic's event applied",
        Duration::from_secs(60),
        || s.http_get("/v1/identifiers/email/kiosk@x.io").0 == 200,
    );
    // A topic deleted while the instance runs is named as soon as the consumer misses it (the metadata
    // was read again only after a minute).
    delete_topics(std::slice::from_ref(&late));
    let gone = s.wait_for(
        "not ready once the topic is deleted",
        Duration::from_secs(20),
        || {
            let (status, why) = s.http_get("/readyz");
            status == 503 && why.contains(&late)
        },
    );
    println!(
        "missing topic: ready {taken:.1?} after creation, its first event visible {picked:.1?} later, \
         not ready {gone:.1?} after its deletion"
    );
    let log = s.log();
    assert!(
        !log.contains("another instance"),
        "no second instance to blame:\n{}",
        s.log_tail()
    );
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

#[test]
fn the_lag_gauge_is_right_after_a_restart_with_a_backlog() {
    let s = Setup::new("lag", 2, "");
    let j = journeys::generate(&JourneyConfig {
        persons: 1500,
        seed: 9,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    // A backlog while it is down: the offsets committed before the restart are far behind the end.
    let more = journeys::generate(&JourneyConfig {
        persons: 1500,
        seed: 10,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &more, 0).expect("send");
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    // librdkafka publishes statistics every 5 s; the gauge must read 0 at the next one.
    let lag = || {
        let (_, metrics) = s.http_get("/metrics");
        metrics
            .lines()
            .filter(|l| l.starts_with("stitcher_consumer_lag_messages{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum::<i64>()
    };
    let took = s.wait_for("lag gauge at 0", Duration::from_secs(20), || lag() == 0);
    println!(
        "lag gauge: 0 {took:.1?} after catching up a backlog of {} messages",
        more.messages.len()
    );
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

#[test]
fn a_stop_while_kafka_is_unreachable_exits_0() {
    let s = Setup::new("unreachable", 1, "");
    // Nothing listens on port 1 of the loopback interface.
    s.edit_config(|c| {
        c.replacen(
            &format!("brokers = \"{}\"", brokers()),
            "brokers = \"127.0.0.1:1\"",
            1,
        )
    });
    let mut child = s.start();
    s.wait_for("the first failed attempt", Duration::from_secs(60), || {
        s.log().contains("cannot reach kafka")
    });
    let (status, why) = s.http_get("/readyz");
    assert_eq!(status, 503, "{why}");
    let asked = Instant::now();
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    let stopped = asked.elapsed();
    // A connection attempt under way looks for the stop every second (it waited its whole 10 s before).
    assert!(
        stopped < Duration::from_secs(5),
        "stopped after {stopped:?}"
    );
    assert!(
        s.log().contains("stopped before the pipeline started"),
        "{}",
        s.log_tail()
    );
    println!("unreachable: stopped {stopped:.1?} after SIGTERM");
}

/// `stitcher generate` for channel topics the broker does not have (it does not create topics on first
/// use) fails at once, naming them, and writes no ground truth. It used to wait 30 s for their metadata,
/// drop every record and say they were sent.
#[test]
fn generate_refuses_topics_that_do_not_exist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stitcher.toml");
    let topic = unique("absent-web");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[[inputs]]\ntopic = \"{topic}\"\nchannel = \"web\"\nformat = \"json\"\n",
            brokers()
        ),
    )
    .expect("config");
    let truth = dir.path().join("truth.jsonl");
    let (err, took) = failed_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
            .args([
                "generate",
                "--persons",
                "5",
                "--channels",
                "web",
                "--config",
            ])
            .arg(&config)
            .arg("--truth")
            .arg(&truth)
            .env_remove("STITCHER_BROKERS"),
        Duration::from_secs(90),
    );
    assert!(
        err.contains(&topic) && err.contains("do not exist"),
        "{err}"
    );
    assert!(!truth.exists(), "no ground truth written");
    assert!(took < Duration::from_secs(20), "{took:?}");
    println!("absent topics: generate refused them after {took:.1?}");
}

/// Two processes with the same `kafka.instance_id` (a copied deployment, a second `stitcher run` by hand)
/// fenced each other's consumers back and forth for ever, each ready now and then and neither saying why.
/// One must give way within a minute, exiting non-zero with an error naming `kafka.instance_id`, and the
/// other must go on: ready, and applying events.
/// A transaction timeout longer than the broker allows (`transaction.max.timeout.ms`, 15 minutes) stops
/// the start with an error that names the setting; librdkafka's own words name only the broker's.
#[test]
fn a_transaction_timeout_the_broker_refuses_names_the_setting() {
    let s = Setup::new(
        "txn-timeout",
        1,
        "[processing]\ntransaction_timeout = \"20m\"\n",
    );
    let mut child = s.start();
    let status = exit_within(&mut child, TIMEOUT).expect("exits");
    assert!(!status.success(), "{}", s.log_tail());
    assert!(
        s.log()
            .contains("processing.transaction_timeout is longer than the broker's"),
        "{}",
        s.log_tail()
    );
}

#[test]
fn a_second_process_with_the_same_instance_id_is_told_so_and_one_goes_on() {
    let s = Setup::new("twins", 1, "");
    let mut first = s.start();
    s.wait_for("the first ready", TIMEOUT, || is_ready(s.http_port));
    let twin_port = free_port();
    let twin_state = s.dir.join("twin-state");
    let twin_listen = format!("127.0.0.1:{twin_port}");
    let mut twin = s.start_with_env(&[
        (
            "STITCHER_STATE_DIR",
            twin_state.to_str().expect("utf-8 path"),
        ),
        ("STITCHER_HTTP_LISTEN", twin_listen.as_str()),
    ]);
    let started = Instant::now();
    let (gone, mut survivor, port) = loop {
        if let Some(status) = first.try_wait().expect("wait") {
            break (status, twin, twin_port);
        }
        if let Some(status) = twin.try_wait().expect("wait") {
            break (status, first, s.http_port);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "both still running after 60 s:\n{}",
            s.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    assert!(!gone.success(), "{}", s.log_tail());
    assert!(
        s.log().contains("is in use by another process") && s.log().contains("kafka.instance_id"),
        "{}",
        s.log_tail()
    );
    let j = journeys::generate(&JourneyConfig {
        persons: 20,
        seed: 12,
        ..Default::default()
    });
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let (_, email) = j
        .truth
        .iter()
        .flat_map(|t| &t.identifiers)
        .find(|(kind, _)| kind == "email")
        .expect("an email")
        .clone();
    s.wait_for("the survivor applies events", TIMEOUT, || {
        is_ready(port) && http_get(port, &format!("/v1/identifiers/email/{email}")).0 == 200
    });
    assert!(
        survivor.try_wait().expect("wait").is_none(),
        "{}",
        s.log_tail()
    );
    assert!(sigterm(&mut survivor).success(), "{}", s.log_tail());
    println!("twins: one exited {took:.1?} after the second started; the other went on");
}
