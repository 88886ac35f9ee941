//! Erasure and unmerge against a real broker: an identifier that bridges two people is erased with the
//! `stitcher erase` command (through the control topic); the output topic must show the split, with
//! `split_from`, and a tombstone for the profile id that no longer exists. Then a whole profile is erased,
//! and `stitcher inspect` explains what is left.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::Duration;

use common::*;
use stitcher::codec::ProfileUpdate;
use stitcher::generate;
use stitcher::journeys::{Generated, Journeys};
use stitcher::model::{ChannelEvent, ProfileId};

const TIMEOUT: Duration = Duration::from_secs(120);

fn event(id: &str, ts: i64, ids: &[(&str, &str)]) -> Generated {
    Generated::Event {
        channel: "web",
        key: id.to_string(),
        event: ChannelEvent::new(id, "page_view", 1_767_225_600_000 + ts, ids),
    }
}

fn send(s: &Setup, messages: Vec<Generated>) {
    let n = messages.len();
    let j = Journeys {
        messages,
        truth: vec![],
        events: n,
        malformed: 0,
        duplicates: 0,
    };
    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
}

fn live(view: &std::collections::BTreeMap<String, Option<ProfileUpdate>>) -> Vec<&ProfileUpdate> {
    view.values()
        .flatten()
        .filter(|u| u.redirect_to.is_none())
        .collect()
}

fn values(u: &ProfileUpdate) -> Vec<String> {
    let mut v: Vec<String> = u
        .profile
        .iter()
        .flat_map(|p| &p.identifiers)
        .map(|i| format!("{}:{}", i.kind, i.value))
        .collect();
    v.sort();
    v
}

#[test]
fn erasing_a_bridge_splits_the_profile_and_tombstones_its_id() {
    let s = Setup::new("erase", 1, "");
    // A shared cookie seen first on its own, then with two people's emails: one profile, anchored on the
    // cookie's first event.
    send(
        &s,
        vec![
            event("e0", 0, &[("anonymous_id", "bridge")]),
            event("e1", 1, &[("anonymous_id", "bridge"), ("email", "A@x.io")]),
            event("e2", 2, &[("anonymous_id", "bridge"), ("email", "b@x.io")]),
            event(
                "e3",
                3,
                &[("email", "a@x.io"), ("anonymous_id", "cookie-a")],
            ),
        ],
    );
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let merged = ProfileId::from_anchor("e0").to_string();
    let before = s.output();
    let profiles = live(&before.view);
    assert_eq!(profiles.len(), 1, "one glued profile: {profiles:?}");
    assert_eq!(profiles[0].profile_id, merged);
    assert_eq!(values(profiles[0]).len(), 4);

    let out = s.cli(&["erase", "--identifier", "anonymous_id:bridge"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("erase_identifier sent"));
    s.wait_caught_up(&mut child, TIMEOUT);

    let after = s.output();
    let new_records = after.since(&before);
    let (a_id, b_id) = (
        ProfileId::from_anchor("e1").to_string(),
        ProfileId::from_anchor("e2").to_string(),
    );
    assert!(
        new_records.iter().any(|(k, v)| *k == merged && v.is_none()),
        "a tombstone for {merged}: {new_records:?}"
    );
    for (id, want) in [
        (&a_id, vec!["anonymous_id:cookie-a", "email:a@x.io"]),
        (&b_id, vec!["email:b@x.io"]),
    ] {
        let u = new_records
            .iter()
            .rev()
            .find_map(|(k, v)| v.as_ref().filter(|_| k == id))
            .unwrap_or_else(|| panic!("an update for {id}: {new_records:?}"));
        assert_eq!(u.split_from.as_deref(), Some(merged.as_str()));
        assert_eq!(values(u), want);
        // The trigger names where the command came from, never the erased identifier.
        let trigger = u.trigger_event_id.as_deref().unwrap_or_default();
        assert!(trigger.starts_with("control:"), "{trigger}");
        assert!(!trigger.contains("bridge"), "{trigger}");
    }
    let profiles = live(&after.view);
    assert_eq!(profiles.len(), 2);
    assert!(after.view[&merged].is_none());
    assert!(profiles
        .iter()
        .all(|u| !values(u).iter().any(|v| v.contains("bridge"))));

    // Erase a whole profile by id.
    s.cli(&["erase", "--profile", &b_id]);
    s.wait_caught_up(&mut child, TIMEOUT);
    let last = s.output();
    assert!(
        last.view[&b_id].is_none(),
        "tombstone for the erased profile"
    );
    assert_eq!(live(&last.view).len(), 1);

    // The call-centre view of what is left, over HTTP while the service runs.
    let (status, body) = s.http_get("/v1/identifiers/email/A@x.io/explain");
    assert_eq!(status, 200, "{body}");
    let explained: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(explained["profile_id"], a_id.as_str());
    let cookie = explained["identifiers"]
        .as_array()
        .expect("identifiers")
        .iter()
        .find(|i| i["type"] == "anonymous_id")
        .expect("the cookie");
    assert_eq!(cookie["links"][0]["value"], "a@x.io");
    assert_eq!(cookie["links"][0]["first_event_id"], "e3");
    assert_eq!(
        s.http_get("/v1/identifiers/anonymous_id/bridge/explain").0,
        404,
        "the erased identifier is gone"
    );
    let (status, body) = s.http_get(&format!("/v1/profiles/{a_id}/explain"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("cookie-a"), "{body}");
    assert_eq!(s.http_get(&format!("/v1/profiles/{merged}/explain")).0, 404);
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    assert!(s.dead_letters().is_empty());

    // What is left, explained by `inspect` (the service is stopped: RocksDB is one process at a time).
    let out = s.cli(&[
        "inspect",
        "--state-dir",
        &s.dir.join("state").to_string_lossy(),
        "--identifier",
        "email: A@X.io",
    ]);
    let inspection: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(inspection["profile_id"], a_id.as_str());
    let ids = inspection["identifiers"].as_array().expect("identifiers");
    assert_eq!(ids.len(), 2);
    let email = ids.iter().find(|i| i["type"] == "email").expect("email");
    assert_eq!(email["links"][0]["value"], "cookie-a");
    assert_eq!(email["links"][0]["first_event_id"], "e3");
    assert_eq!(email["links"][0]["events"], 1);
    // `inspect ... | head`: a reader that goes away early ends the command quietly, not with a panic.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
        .args(["inspect", "--state-dir"])
        .arg(s.dir.join("state"))
        .args(["--identifier", "email:a@x.io"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run inspect");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("inspect");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
    println!(
        "erasure: {} records before, {} after the erase, split {merged} into {a_id} and {b_id}",
        before.records.len(),
        after.records.len()
    );
}

/// Unlinking two identifiers that stay connected through a third removes the link without a split and is
/// reported as applied; an unlink that does split gives every piece, the one keeping the id included,
/// `split_from`.
#[test]
fn unlink_is_applied_without_a_split_and_every_piece_names_its_origin() {
    let s = Setup::new("unlink", 1, "");
    send(
        &s,
        vec![
            event("u1", 1, &[("email", "x@x.io"), ("device_id", "d1")]),
            event("u2", 2, &[("email", "x@x.io"), ("anonymous_id", "c1")]),
            event("u3", 3, &[("device_id", "d1"), ("anonymous_id", "c1")]),
        ],
    );
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let old = ProfileId::from_anchor("u1").to_string();
    assert_eq!(live(&s.output().view).len(), 1);
    let applied = |s: &Setup| {
        let (_, metrics) = s.http_get("/metrics");
        metrics
            .lines()
            .find(|l| {
                l.starts_with("stitcher_control_commands_total")
                    && l.contains("op=\"unlink\"")
                    && l.contains("result=\"applied\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };

    s.cli(&["unlink", "--a", "email:x@x.io", "--b", "device_id:d1"]);
    s.wait_caught_up(&mut child, TIMEOUT);
    assert_eq!(
        applied(&s),
        1,
        "an unlink that splits nothing is still applied"
    );
    assert_eq!(
        live(&s.output().view).len(),
        1,
        "d1 is still linked through c1"
    );

    let before = s.output();
    s.cli(&["unlink", "--a", "device_id:d1", "--b", "anonymous_id:c1"]);
    s.wait_caught_up(&mut child, TIMEOUT);
    assert_eq!(applied(&s), 2);
    let after = s.output();
    let new_records = after.since(&before);
    let pieces: Vec<&ProfileUpdate> = new_records
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .filter(|u| u.redirect_to.is_none())
        .collect();
    assert_eq!(pieces.len(), 2, "{pieces:?}");
    assert!(
        pieces.iter().any(|u| u.profile_id == old),
        "one piece keeps the id: {pieces:?}"
    );
    for u in &pieces {
        assert_eq!(
            u.split_from.as_deref(),
            Some(old.as_str()),
            "every piece, the keeper included, names the split profile: {u:?}"
        );
    }
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

/// With email hashed (HMAC under STITCHER_HASH_KEY), a lookup finds the profile by the clear value and by
/// the hash consumers see on the output, and `stitcher erase` sends the hash, never the clear value, over
/// the control topic.
#[test]
fn hashed_identifiers_are_looked_up_and_erased_by_hash() {
    const KEY: &str = "a-test-key-of-at-least-16-bytes";
    let s = Setup::new("hashed", 1, "");
    s.edit_config(|c| {
        c.replacen(
            "custom_types = [\"social_id\"]",
            "custom_types = [\"social_id\"]\nhashed_types = [\"email\"]",
            1,
        )
    });
    send(
        &s,
        vec![event(
            "h1",
            1,
            &[("email", "Secret@X.io"), ("anonymous_id", "ck-h")],
        )],
    );
    let mut child = s.start_with_env(&[("STITCHER_HASH_KEY", KEY)]);
    s.wait_caught_up(&mut child, TIMEOUT);
    let out = s.output();
    let profile = live(&out.view)[0].clone();
    let hashed = values(&profile)
        .into_iter()
        .find_map(|v| v.strip_prefix("email:").map(str::to_string))
        .expect("a hashed email");
    assert_eq!(hashed.len(), 64);
    assert!(!hashed.contains("secret"));
    for path in [
        "/v1/identifiers/email/secret@x.io".to_string(),
        format!("/v1/identifiers/email/{hashed}"),
    ] {
        let (status, body) = s.http_get(&path);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains(&profile.profile_id), "{path}: {body}");
    }

    let erase = std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
        .args(["erase", "--identifier", "email:Secret@X.io", "--config"])
        .arg(&s.config_path)
        .env("STITCHER_HASH_KEY", KEY)
        .output()
        .expect("run erase");
    assert!(
        erase.status.success(),
        "{}",
        String::from_utf8_lossy(&erase.stderr)
    );
    s.wait_caught_up(&mut child, TIMEOUT);
    let commands = read_all(&s.control_topic);
    assert_eq!(commands.len(), 1);
    let command =
        String::from_utf8_lossy(commands[0].payload.as_deref().unwrap_or_default()).into_owned();
    assert!(command.contains(&hashed), "{command}");
    assert!(!command.to_lowercase().contains("secret"), "{command}");
    assert_eq!(s.http_get("/v1/identifiers/email/secret@x.io").0, 404);
    assert_eq!(s.http_get("/v1/identifiers/anonymous_id/ck-h").0, 200);
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

/// An erasure with `--suppress` stays erased: later events carrying the identifier are stripped of it
/// (counted, never linked; an event with nothing else is dropped), across a restart and a restore of the
/// state from the changelog (the local state deleted), until `stitcher unsuppress`. The erasure's receipt
/// is on the identity change stream, which never carries the identifier while it is suppressed.
#[test]
fn suppressed_identifiers_stay_erased_across_restart_and_restore() {
    let s = Setup::new("suppress", 1, "");
    let salt = [("STITCHER_SUPPRESSION_SALT", "a-secret-of-at-least-16-bytes")];
    send(
        &s,
        vec![
            event("s1", 1, &[("email", "gone@x.io"), ("anonymous_id", "c1")]),
            event("s2", 2, &[("email", "gone@x.io"), ("anonymous_id", "c2")]),
        ],
    );
    let mut child = s.start_with_env(&salt);
    s.wait_caught_up(&mut child, TIMEOUT);
    assert_eq!(s.http_get("/v1/identifiers/email/gone@x.io").0, 200);

    let out = s.cli(&["erase", "--identifier", "email:gone@x.io", "--suppress"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.wait_caught_up(&mut child, TIMEOUT);
    let receipt = identity_records(&s)
        .into_iter()
        .find(|c| c.changes.iter().any(|k| k == "erase"))
        .expect("an erase record on the identity change stream");
    assert!(receipt
        .trigger
        .command
        .as_deref()
        .is_some_and(|c| c.starts_with("control:")));

    let stripped = |s: &Setup, child: &mut std::process::Child, n: &str| {
        send(
            s,
            vec![
                event(
                    &format!("{n}-a"),
                    10,
                    &[("email", "Gone@x.io"), ("anonymous_id", n)],
                ),
                event(&format!("{n}-b"), 11, &[("email", "gone@x.io")]),
            ],
        );
        s.wait_caught_up(child, TIMEOUT);
        assert_eq!(
            s.http_get("/v1/identifiers/email/gone@x.io").0,
            404,
            "{n}: the suppressed email is in no profile"
        );
        let (status, body) = s.http_get(&format!("/v1/identifiers/anonymous_id/{n}"));
        assert_eq!(status, 200, "{n}: the rest of the event is applied: {body}");
        assert!(!body.contains("gone@x.io"), "{body}");
    };
    stripped(&s, &mut child, "c3");
    let (_, metrics) = s.http_get("/metrics");
    assert!(
        metrics.contains(r#"stitcher_suppressed_total{what="identifier"} 2"#)
            && metrics.contains(r#"stitcher_suppressed_total{what="event"} 1"#),
        "{metrics}"
    );
    // A restart, then a restore of the whole state from the changelog.
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    let mut child = s.start_with_env(&salt);
    stripped(&s, &mut child, "c4");
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    std::fs::remove_dir_all(s.dir.join("state")).expect("delete the local state");
    let mut child = s.start_with_env(&salt);
    stripped(&s, &mut child, "c5");
    // The records of the events handled while it was suppressed (c3-a, c3-b, c4-a, ...).
    let during: Vec<_> = identity_records(&s)
        .into_iter()
        .filter(|c| {
            c.trigger
                .event_id
                .as_deref()
                .is_some_and(|e| e.starts_with('c'))
        })
        .collect();
    assert!(!during.is_empty());
    for c in during {
        assert!(
            !c.identifiers.iter().any(|i| i.value == "gone@x.io"),
            "a suppressed identifier on the identity change stream: {c:?}"
        );
    }

    // The person consents again.
    let out = s.cli(&["unsuppress", "--identifier", "email:gone@x.io"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.wait_caught_up(&mut child, TIMEOUT);
    send(
        &s,
        vec![event(
            "s9",
            20,
            &[("email", "gone@x.io"), ("anonymous_id", "c9")],
        )],
    );
    s.wait_caught_up(&mut child, TIMEOUT);
    let (status, body) = s.http_get("/v1/identifiers/email/gone@x.io");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("c9"), "{body}");
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    assert!(s.dead_letters().is_empty());
    assert!(s.identity_mapping() == s.output().identity_mapping());
}

/// Commands the service cannot apply are dead letters that say why: an erasure with `--suppress` on a
/// service without a salt, and an erase of a malformed profile id (which `stitcher erase` refuses before
/// sending: it sent `p-123`, and the service looked for it in every shard and found nothing, silently).
/// A command it can apply is logged as read, whatever it then finds.
#[test]
fn commands_that_cannot_be_applied_are_refused_clearly() {
    let s = Setup::new("nosalt", 1, "");
    send(&s, vec![event("n1", 1, &[("email", "x@x.io")])]);
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    s.cli(&["erase", "--identifier", "email:x@x.io", "--suppress"]);
    send_all(
        &s.control_topic,
        [r#"{"op":"erase_profile","profile_id":"p-123"}"#],
    );
    s.cli(&["erase", "--identifier", "email:nobody@x.io"]);
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(sigterm(&mut child).success());
    let dead = s.dead_letters();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead[0].headers["dlq.error"].contains("STITCHER_SUPPRESSION_SALT"),
        "{:?}",
        dead[0].headers
    );
    assert!(
        dead[1].headers["dlq.error"].contains("malformed profile id"),
        "{:?}",
        dead[1].headers
    );
    assert!(dead.iter().all(|d| d.headers["dlq.stage"] == "control"));
    let log = s.log();
    let read = log
        .lines()
        .filter(|l| l.contains("control command read") && l.contains("erase_identifier"))
        .count();
    assert_eq!(
        read, 1,
        "the erase of an absent identifier is logged as read"
    );

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
        .args(["erase", "--profile", "p-123", "--config"])
        .arg(&s.config_path)
        .output()
        .expect("run erase");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("--profile \"p-123\": malformed profile id"),
        "{err}"
    );
}

/// A command for brokers that do not answer fails within the connection check, naming them. (It waited
/// for librdkafka's message timeout, five minutes, with the operator at the prompt.)
#[test]
fn a_command_for_unreachable_brokers_fails_at_once_naming_them() {
    // Nothing listens on port 1 of the loopback interface.
    let (err, took) = failed_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
            .args([
                "erase",
                "--identifier",
                "email:x@x.io",
                "--brokers",
                "127.0.0.1:1",
            ])
            .arg("--config")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/config/stitcher.toml"
            )),
        Duration::from_secs(60),
    );
    assert!(
        err.contains("cannot reach the brokers at 127.0.0.1:1"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    println!("unreachable brokers: erase failed after {took:.1?}");
}

fn identity_records(s: &Setup) -> Vec<stitcher::codec::identity::IdentityChange> {
    read_all(&s.identity_topic)
        .into_iter()
        .map(|r| {
            stitcher::codec::identity::IdentityChange::decode(&r.payload.expect("payload"))
                .expect("identity change")
        })
        .collect()
}
