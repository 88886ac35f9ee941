//! One bad message must never stop or corrupt the pipeline (issue 17), against the real broker: every class
//! of bad input found so far is sent between good events. The service must stay up and ready, dead-letter
//! each bad message exactly once with an error that says what was wrong, give every good person the
//! profile the truth says, and retry nothing forever.
#![cfg(feature = "kafka-it")]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::json;
use sha2::{Digest, Sha256};
use stitcher::codec::AvroCodec;
use stitcher::model::ChannelEvent;

const TIMEOUT: Duration = Duration::from_secs(180);

fn now() -> i64 {
    stitcher::model::now_millis()
}

fn event(id: &str, kind: &str, ids: &[(&str, &str)]) -> serde_json::Value {
    json!({
        "event_id": id,
        "event_type": kind,
        "timestamp": now() - 3_600_000,
        "identifiers": ids.iter().map(|(k, v)| json!({"type": k, "value": v})).collect::<Vec<_>>(),
    })
}

fn avro_event(id: &str, ids: &[(&str, &str)], ts: i64) -> Vec<u8> {
    let ev = ChannelEvent::new(id, "store_visit", ts, ids);
    AvroCodec::channel_event()
        .expect("schema")
        .encode(1, &ev)
        .expect("encode")
}

/// What a bad message is and what its dead letter's error must say.
struct Bad {
    class: &'static str,
    topic: String,
    bytes: Vec<u8>,
    error_mentions: &'static str,
}

#[test]
fn bad_messages_are_dead_lettered_once_and_the_rest_flows() {
    let s = Setup::new("poison", 1, "");
    let topic = |ch: &str| s.routes[ch].0.clone();
    let (json_topic, avro_topic) = (topic("app"), topic("web"));
    let j = |v: serde_json::Value| serde_json::to_vec(&v).expect("json");
    let with = |mut v: serde_json::Value, key: &str, value: serde_json::Value| {
        v[key] = value;
        v
    };
    let bad_base = event("bad", "purchase", &[("email", "bad@x.io")]);
    let bad = vec![
        Bad {
            class: "amount that overflowed a sum",
            topic: json_topic.clone(),
            bytes: j(with(
                with(bad_base.clone(), "event_id", json!("bad-amount")),
                "amount",
                json!(100000000000000000u64),
            )),
            error_mentions: "field amount",
        },
        Bad {
            class: "malformed JSON of 1,040,019 bytes",
            topic: json_topic.clone(),
            bytes: {
                let mut b =
                    br#"{"event_id":"huge","identifiers":[{"type":"email","value":""#.to_vec();
                b.resize(1_040_019, b'x');
                b
            },
            error_mentions: "invalid json",
        },
        Bad {
            class: "timestamp i64::MAX",
            topic: json_topic.clone(),
            bytes: j(with(
                with(bad_base.clone(), "event_id", json!("bad-ts-max")),
                "timestamp",
                json!(i64::MAX),
            )),
            error_mentions: "field timestamp",
        },
        Bad {
            class: "negative timestamp",
            topic: json_topic.clone(),
            bytes: j(with(
                with(bad_base.clone(), "event_id", json!("bad-ts-neg")),
                "timestamp",
                json!(-5),
            )),
            error_mentions: "field timestamp",
        },
        Bad {
            class: "timestamp in seconds",
            topic: json_topic.clone(),
            bytes: j(with(
                with(bad_base.clone(), "event_id", json!("bad-ts-s")),
                "timestamp",
                json!(now() / 1000),
            )),
            error_mentions: "field timestamp",
        },
        Bad {
            class: "timestamp in the year 3000",
            topic: avro_topic.clone(),
            bytes: avro_event("bad-ts-3000", &[("email", "bad@x.io")], 32_503_680_000_000),
            error_mentions: "field timestamp",
        },
        Bad {
            class: "quantity out of range",
            topic: json_topic.clone(),
            bytes: j(with(
                with(bad_base.clone(), "event_id", json!("bad-qty")),
                "items",
                json!([{"sku": "s", "quantity": -3}]),
            )),
            error_mentions: "field items[0].quantity",
        },
        Bad {
            class: "invalid UTF-8",
            topic: json_topic.clone(),
            bytes: [b"{\"event_id\":\"".as_slice(), &[0xff, 0xfe], b"\"}"].concat(),
            error_mentions: "invalid json",
        },
        Bad {
            class: "deeply nested JSON",
            topic: json_topic.clone(),
            bytes: format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)).into_bytes(),
            error_mentions: "invalid json",
        },
        Bad {
            class: "too many identifiers",
            topic: json_topic.clone(),
            bytes: j(event(
                "bad-many",
                "login",
                &(0..1000)
                    .map(|i| {
                        (
                            "anonymous_id",
                            Box::leak(format!("c{i}").into_boxed_str()) as &str,
                        )
                    })
                    .collect::<Vec<_>>(),
            )),
            error_mentions: "identifiers",
        },
        Bad {
            class: "huge Avro string length",
            topic: avro_topic.clone(),
            bytes: vec![
                0, 0, 0, 0, 1, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
            error_mentions: "invalid avro",
        },
    ];

    // Good events: three people, one of whom fills a cart with 6,000 lines over twelve events.
    let mut good: Vec<(String, Vec<u8>)> = vec![
        (
            json_topic.clone(),
            j(event(
                "g1",
                "page_view",
                &[("email", "p1@x.io"), ("anonymous_id", "c-p1")],
            )),
        ),
        (
            avro_topic.clone(),
            avro_event(
                "g2",
                &[("email", "P1@x.io"), ("loyalty_id", "lp-1")],
                now() - 60_000,
            ),
        ),
        (
            json_topic.clone(),
            j(event(
                "g3",
                "call",
                &[("customer_id", "C-3"), ("phone", "(212) 555-0123")],
            )),
        ),
    ];
    for n in 0..12 {
        let items: Vec<_> = (0..500)
            .map(|i| json!({"sku": format!("sku-{n}-{i}-{}", "s".repeat(120)), "quantity": 1, "price": 2.5}))
            .collect();
        good.push((
            json_topic.clone(),
            j(with(
                event(
                    &format!("cart-{n}"),
                    "add_to_cart",
                    &[("email", "cart@x.io")],
                ),
                "items",
                json!(items),
            )),
        ));
    }

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    let mut sent = 0;
    let mut goods = good.iter();
    for b in &bad {
        for (topic, bytes) in goods.by_ref().take(2) {
            producer
                .send(BaseRecord::<[u8], [u8]>::to(topic).payload(bytes.as_slice()))
                .map_err(|(e, _)| e)
                .expect("send good");
            sent += 1;
        }
        producer
            .send(BaseRecord::<[u8], [u8]>::to(&b.topic).payload(b.bytes.as_slice()))
            .map_err(|(e, _)| e)
            .unwrap_or_else(|e| panic!("send {}: {e}", b.class));
        sent += 1;
    }
    for (topic, bytes) in goods {
        producer
            .send(BaseRecord::<[u8], [u8]>::to(topic).payload(bytes.as_slice()))
            .map_err(|(e, _)| e)
            .expect("send good");
        sent += 1;
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let (status, why) = s.http_get("/readyz");
    assert_eq!(
        status,
        200,
        "ready after the bad messages: {why}\n{}",
        s.log_tail()
    );

    let letters = s.dead_letters();
    assert_eq!(
        letters.len(),
        bad.len(),
        "one dead letter per bad message ({sent} sent)"
    );
    for b in &bad {
        // The dead letter of this message: its bytes, or for a truncated one their SHA-256.
        let sha = hex::encode(Sha256::digest(&b.bytes));
        let mine: Vec<_> = letters
            .iter()
            .filter(|d| {
                d.payload.as_deref() == Some(b.bytes.as_slice())
                    || d.headers.get("dlq.payload.sha256") == Some(&sha)
            })
            .collect();
        assert_eq!(mine.len(), 1, "{}: dead-lettered exactly once", b.class);
        let error = &mine[0].headers["dlq.error"];
        assert!(
            error.contains(b.error_mentions),
            "{}: the error should mention {:?}: {error}",
            b.class,
            b.error_mentions
        );
        println!("{:40} -> dead letter: {error:.150}", b.class);
    }
    let huge = letters
        .iter()
        .find(|d| d.headers.get("dlq.payload.size").map(String::as_str) == Some("1040019"))
        .expect("the 1 MB message's dead letter says its size");
    assert_eq!(
        huge.headers
            .get("dlq.payload.truncated")
            .map(String::as_str),
        Some("true")
    );
    assert!(huge.headers.contains_key("dlq.payload.sha256"));
    assert!(huge.payload.as_ref().is_some_and(|p| p.len() < 1_000_000));

    // The good people are exactly what the truth says.
    let out = s.output();
    let mut got: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    for u in out
        .view
        .values()
        .flatten()
        .filter(|u| u.redirect_to.is_none())
    {
        let p = u.profile.as_ref().expect("profile");
        got.insert(
            p.identifiers
                .iter()
                .map(|i| format!("{}:{}", i.kind, i.value))
                .collect(),
        );
        assert!(p.cart.len() <= stitcher::profile::bounds::CART_LINES);
    }
    let want: BTreeSet<BTreeSet<String>> = [
        vec!["anonymous_id:c-p1", "email:p1@x.io", "loyalty_id:LP1"],
        vec!["customer_id:C-3", "phone:+12125550123"],
        vec!["email:cart@x.io"],
    ]
    .into_iter()
    .map(|ids| ids.into_iter().map(str::to_string).collect())
    .collect();
    assert_eq!(got, want);
    assert_eq!(out.duplicates(), 0);
    let log = s.log();
    assert!(!log.contains("panicked"), "{}", s.log_tail());
    assert!(
        !log.contains("commit failed, retrying"),
        "nothing retried: {}",
        s.log_tail()
    );
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}
