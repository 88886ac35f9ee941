//! Oracle check: with guardrails off, the identifier -> profile mapping the service exports must equal the
//! connected components networkx computes over the same events (scripts/oracle.py). Shared devices link
//! random persons so that components are not simply the generated persons.
#![cfg(feature = "kafka-it")]

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::*;
use stitcher::config::IdentityConfig;
use stitcher::generate;
use stitcher::journeys::{self, Generated, JourneyConfig};
use stitcher::model::RawIdentifier;
use stitcher::normalize::Normalizer;

const UNLIMITED: &str = r#"
[guardrails]
max_profile_identifiers = 1000000000
priority = []
"#;

#[test]
fn export_equals_networkx_components_with_guardrails_off() {
    let s = Setup::new("oracle", 3, &format!("{UNLIMITED}{NO_TYPE_LIMITS}"));
    let mut j = journeys::generate(&JourneyConfig {
        persons: 1500,
        seed: 41,
        duplicate_rate: 0.02,
        shuffle_window: 300,
        ..Default::default()
    });
    // Shared devices: 300 events, each tying a random person's email to one of 40 shop tablets.
    let mut rng = SmallRng::seed_from_u64(41);
    let template = j
        .messages
        .iter()
        .find_map(|m| match m {
            Generated::Event { event, .. } => Some(event.clone()),
            _ => None,
        })
        .expect("an event");
    let emails: Vec<String> = j
        .truth
        .iter()
        .flat_map(|t| t.identifiers.iter())
        .filter(|(k, _)| k == "email")
        .map(|(_, v)| v.clone())
        .collect();
    for n in 0..300 {
        let mut e = template.clone();
        e.event_id = format!("shared-{n}");
        e.identifiers = vec![
            RawIdentifier {
                kind: "device_id".into(),
                value: format!("shop-tablet-{}", rng.gen_range(0..40)),
            },
            RawIdentifier {
                kind: "email".into(),
                value: emails[rng.gen_range(0..emails.len())].clone(),
            },
        ];
        let at = rng.gen_range(0..j.messages.len());
        j.messages.insert(
            at,
            Generated::Event {
                channel: "pos",
                key: format!("shared-{n}"),
                event: e,
            },
        );
    }

    // The events as the service will see them, normalised with the same configuration.
    let identity = IdentityConfig {
        custom_types: vec!["social_id".into()],
        ..Default::default()
    };
    let norm = Normalizer::new(&identity).expect("normalizer");
    let events_path = s.dir.join("events.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&events_path).expect("events file"));
    for m in &j.messages {
        if let Generated::Event { channel, event, .. } = m {
            if let Ok(ev) = norm.event(
                event.clone(),
                channel,
                stitcher::model::now_millis(),
                |_| {},
            ) {
                let ids: Vec<(&str, &str)> = ev
                    .identifiers
                    .iter()
                    .map(|i| (i.kind.as_str(), i.value.as_str()))
                    .collect();
                serde_json::to_writer(&mut f, &ids).expect("write");
                f.write_all(b"\n").expect("write");
            }
        }
    }
    f.flush().expect("flush");
    drop(f);

    generate::send(&brokers(), &s.routes, &j, 0).expect("send");
    let mut child = s.start();
    s.wait_caught_up(&mut child, Duration::from_secs(300));
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());

    let export = Command::new(env!("CARGO_BIN_EXE_stitcher"))
        .args(["export", "--state-dir"])
        .arg(s.dir.join("state"))
        .output()
        .expect("run export");
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let export_path = s.dir.join("export.jsonl");
    std::fs::write(&export_path, &export.stdout).expect("write export");

    let oracle = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/oracle.py"))
        .arg(&events_path)
        .arg(&export_path)
        .output()
        .expect("run scripts/oracle.py (python3 with networkx)");
    let report = String::from_utf8_lossy(&oracle.stdout);
    println!("{report}{}", String::from_utf8_lossy(&oracle.stderr));
    assert!(oracle.status.success(), "stitcher and networkx disagree");
    // The shared tablets must have glued persons together, or the check proves little.
    let persons = j.truth.len();
    let profiles = report
        .split("stitcher ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("profile count in the oracle's report");
    assert!(
        profiles < persons * 9 / 10,
        "{profiles} profiles for {persons} persons"
    );
}
