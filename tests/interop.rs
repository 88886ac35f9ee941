//! Interoperability with Confluent's Python client (confluent-kafka from PyPI, scripts/interop.py): channel
//! events written by its AvroSerializer are read by the service, and every record the service writes to the
//! profile topic is read by its AvroDeserializer into the same profiles the service's own decoder sees:
//! with the client's in-process registry and fixed ids, and with a real Schema Registry (Apicurio,
//! `TEST_REGISTRY_URL`), where the producer evolves its schema half-way and the service's output carries
//! the id the registry gave it. Events written by its JSONSerializer (JSON Schema: the wire format's header
//! before each JSON document) are read by a JSON input.
#![cfg(feature = "kafka-it")]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

fn interop(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("scripts/interop.py"))
        .args(args)
        .output()
        .expect("run scripts/interop.py (scripts/setup.sh installs its venv)");
    assert!(
        out.status.success(),
        "interop.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn confluent_python_client_reads_and_writes_our_records() {
    round_trip(None);
}

#[test]
fn confluent_python_client_with_a_real_schema_registry() {
    let url = std::env::var("TEST_REGISTRY_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18081/apis/ccompat/v7".into());
    round_trip(Some(&url));
}

/// Runs `scripts/interop.py` with `args`, which sends three events for each of `persons`.
fn produce(args: &[&str], persons: usize) {
    let sent = interop(args);
    assert!(
        sent.contains(&format!("\"sent\": {}", persons * 3)),
        "{sent}"
    );
}

/// Runs the service until it has caught up with what was sent, stops it, and requires that it decoded
/// every record the Python serializer wrote.
fn run_over_all(s: &Setup) {
    let mut child = s.start();
    s.wait_caught_up(&mut child, Duration::from_secs(120));
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    assert!(s.dead_letters().is_empty(), "{:?}", s.dead_letters());
}

/// Confluent's JSONSerializer frames each document as the Avro serializer does (magic byte 0, the schema
/// id): every such event was a dead letter (`invalid json`) before JSON inputs read the frame.
#[test]
fn confluent_json_schema_serializer_events_are_read() {
    let s = Setup::new("interop-json", 1, "");
    let topic = s.json_topic();
    let persons = 20;
    produce(
        &["produce-json", &brokers(), &topic, &persons.to_string()],
        persons,
    );
    run_over_all(&s);
    let out = s.output();
    let live = out.live();
    assert_eq!(live.len(), persons, "one profile per person");
    for u in live {
        let p = u.profile.as_ref().expect("profile");
        assert_eq!((p.events, p.identifiers.len()), (3, 3), "{p:?}");
    }
}

fn round_trip(registry: Option<&str>) {
    let extra = registry.map_or(String::new(), |url| {
        format!("[registry]\nurl = \"{url}\"\n")
    });
    let s = Setup::new("interop", 2, &extra);
    let (topic, format) = &s.routes["web"];
    assert_eq!(*format, stitcher::config::Format::Avro);
    let persons = 40;
    let mut args = vec![
        "produce".to_string(),
        brokers(),
        topic.clone(),
        persons.to_string(),
    ];
    args.extend(registry.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    produce(&args, persons);
    run_over_all(&s);

    // Ours, decoded by the service's own Avro reader.
    let ours = s.output();
    let mut want: BTreeMap<String, Option<Vec<(String, String)>>> = BTreeMap::new();
    for (key, value) in &ours.records {
        let ids = value.as_ref().and_then(|u| {
            u.profile.as_ref().map(|p| {
                let mut v: Vec<(String, String)> = p
                    .identifiers
                    .iter()
                    .map(|i| (i.kind.clone(), i.value.clone()))
                    .collect();
                v.sort();
                v
            })
        });
        want.insert(key.clone(), ids);
    }
    // Theirs, decoded by confluent-kafka's AvroDeserializer.
    let mut args = vec!["consume".to_string(), brokers(), s.output_topic.clone()];
    args.extend(registry.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines = interop(&args);
    let mut schema_ids = std::collections::BTreeSet::new();
    let mut got: BTreeMap<String, Option<Vec<(String, String)>>> = BTreeMap::new();
    let mut records = 0;
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        records += 1;
        let key = v["key"].as_str().expect("key").to_string();
        if v["tombstone"] == true {
            got.insert(key, None);
            continue;
        }
        assert_eq!(v["profile_id"].as_str(), Some(key.as_str()));
        schema_ids.insert(v["schema_id"].as_u64().expect("schema id"));
        let ids = v["identifiers"].as_array().map(|a| {
            a.iter()
                .map(|pair| {
                    (
                        pair[0].as_str().expect("type").to_string(),
                        pair[1].as_str().expect("value").to_string(),
                    )
                })
                .collect()
        });
        got.insert(key, ids);
    }
    assert_eq!(records, ours.records.len(), "every record decoded");
    if let Some(url) = registry {
        // The id the registry gave the output schema (registering it again returns it).
        let r = stitcher::registry::Registry::new(&stitcher::config::RegistryConfig {
            url: url.into(),
            ..Default::default()
        })
        .expect("registry client");
        let id = r
            .register(
                &format!("{}-value", s.output_topic),
                stitcher::codec::PROFILE_UPDATE_AVSC,
            )
            .expect("output subject");
        assert_eq!(schema_ids.into_iter().collect::<Vec<_>>(), [u64::from(id)]);
    } else {
        assert_eq!(schema_ids.into_iter().collect::<Vec<_>>(), [2]);
    }
    assert_eq!(got, want);
    let live = want.values().flatten().count();
    assert_eq!(live, persons, "one profile per person");
    let redirects = ours
        .records
        .iter()
        .filter(|(_, u)| u.as_ref().is_some_and(|u| u.redirect_to.is_some()))
        .count();
    assert_eq!(redirects, persons, "each late purchase renamed its profile");
    assert!(want
        .values()
        .flatten()
        .all(|ids| ids.len() == 3 && ids.iter().any(|(t, _)| t == "email")));
    println!(
        "interop: {} events from confluent-kafka's AvroSerializer; {records} profile records ({redirects} \
         redirects) read back by its AvroDeserializer, identical to ours; {live} profiles",
        persons * 3
    );
}
