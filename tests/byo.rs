//! Bring your own events (issue 14), against the real broker: a web tracker writing the Segment spec, a
//! call-centre tool writing its own JSON read through `[inputs.fields]`, a till on the service's own
//! schema and another till writing Avro in its own schema (writer schema from a file; in the Confluent wire
//! format and in Avro's single-object encoding), all for one
//! person, end in one profile that every channel's events reach; a message whose fields do not make an
//! event is dead-lettered with the path that failed, and nothing else is lost.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use stitcher::codec::AvroCodec;
use stitcher::model::ChannelEvent;

const TIMEOUT: Duration = Duration::from_secs(180);

/// A web tracker writing the Segment spec.
fn segment_input(topic: &str) -> String {
    format!("\n[[inputs]]\ntopic = \"{topic}\"\nchannel = \"web\"\npreset = \"segment\"\n")
}

/// A call-centre tool's own JSON: tickets with the caller's number and typed ids.
fn tickets_input(topic: &str) -> String {
    format!(
        r#"
[[inputs]]
topic = "{topic}"
channel = "callcenter"
[inputs.fields]
event_id = "ticket.id"
timestamp = "ticket.opened_at"
default_event_type = "call"
campaign_id = "ticket.reason"
identifiers = [
    {{ type = "phone", path = "caller.number" }},
    {{ path = "caller.ids[]", type_field = "kind", value_field = "id" }},
]
"#
    )
}

fn produce(topic: &str, messages: &[serde_json::Value]) {
    send_all(
        topic,
        messages
            .iter()
            .map(|m| serde_json::to_vec(m).expect("json")),
    );
}

#[test]
fn segment_custom_json_and_native_events_stitch_into_one_profile() {
    let name = unique("byo");
    let (segment_topic, tickets_topic) = (format!("{name}-segment"), format!("{name}-tickets"));
    let sales_topic = format!("{name}-sales");
    create_topics(
        &[
            segment_topic.clone(),
            tickets_topic.clone(),
            sales_topic.clone(),
        ],
        1,
    );
    let sale_schema = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
        {"name": "receipt", "type": "string"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "card", "type": ["null", "string"], "default": null},
        {"name": "total", "type": "double"},
        {"name": "currency", "type": "string"}]}"#;
    let schema_file = std::env::temp_dir().join(format!("{name}-sale.avsc"));
    std::fs::write(&schema_file, sale_schema).expect("schema file");
    let extra = format!(
        r#"{segment}{tickets}
[[inputs]]
topic = "{sales_topic}"
channel = "pos"
format = "avro"
schema_file = "{schema_file}"
schema_ids = [7]
{fields}"#,
        fields = TILL_FIELDS,
        segment = segment_input(&segment_topic),
        tickets = tickets_input(&tickets_topic),
        schema_file = schema_file.display()
    );
    let mut s = Setup::new("byo", 1, &extra);
    s.input_topics.push(segment_topic.clone());
    s.input_topics.push(tickets_topic.clone());
    s.input_topics.push(sales_topic.clone());

    let day = 1_767_225_600_000i64; // 2026-01-01
    produce(
        &segment_topic,
        &[
            json!({"type": "page", "messageId": "seg-1", "anonymousId": "anon-9",
                   "timestamp": "2026-01-01T00:00:01Z", "properties": {"path": "/shoes"}}),
            json!({"type": "track", "event": "Product Added", "messageId": "seg-2",
                   "anonymousId": "anon-9", "timestamp": "2026-01-01T00:00:02.500Z",
                   "properties": {"sku": "SHOE-42", "quantity": 1, "price": 79.9}}),
            json!({"type": "identify", "messageId": "seg-3", "anonymousId": "anon-9",
                   "userId": "cust-77", "timestamp": "2026-01-01T01:00:03+01:00",
                   "traits": {"email": "Ann.Lee@Example.com", "phone": "+1 212 555 0199"}}),
            json!({"type": "track", "event": "Order Completed", "messageId": "seg-4",
                   "userId": "cust-77", "timestamp": day / 1000 + 4,
                   "properties": {"order_id": "o-1", "total": 79.9, "currency": "USD",
                                  "products": [{"sku": "SHOE-42", "quantity": 1, "price": 79.9}]}}),
            // Valid JSON whose fields do not make an event: no message id.
            json!({"type": "page", "anonymousId": "anon-9", "timestamp": "2026-01-01T00:00:05Z"}),
        ],
    );
    produce(
        &tickets_topic,
        &[
            json!({"ticket": {"id": 5001, "opened_at": day + 6_000, "reason": "late-delivery"},
                 "caller": {"number": "(212) 555-0199",
                            "ids": [{"kind": "loyalty_id", "id": "lc-88 01"}]}}),
        ],
    );
    // The till, on the service's own schema: a store purchase with the loyalty card.
    let (till_topic, till_format) = s.routes["pos"].clone();
    let mut till = ChannelEvent::new(
        "till-1",
        "purchase",
        day + 7_000,
        &[("loyalty_id", "LC-8801")],
    );
    till.amount = Some(20.0);
    till.currency = Some("EUR".into());
    let till = match till_format {
        stitcher::config::Format::Avro => AvroCodec::channel_event()
            .expect("schema")
            .encode(1, &till)
            .expect("encode"),
        stitcher::config::Format::Json => serde_json::to_vec(&till).expect("json"),
    };
    send_all(&till_topic, [till]);
    // The other till: Avro in its own schema, id 7; the same sale again under id 8 is not readable.
    use apache_avro::types::Value as A;
    let sale = A::Record(vec![
        ("receipt".into(), A::String("r-1".into())),
        ("at".into(), A::TimestampMicros((day + 8_000) * 1000)),
        (
            "card".into(),
            A::Union(1, Box::new(A::String("lc 8801".into()))),
        ),
        ("total".into(), A::Double(12.5)),
        ("currency".into(), A::String("EUR".into())),
    ]);
    send_all(
        &sales_topic,
        [7, 8].map(|id| framed(id, sale_schema, sale.clone())),
    );
    // The same till writing Avro's single-object encoding (`C3 01` and the schema's fingerprint, as
    // Java's generated `toByteBuffer()` writes it): another sale; then one whose fingerprint is another
    // schema's.
    let A::Record(mut second) = sale else {
        panic!("a record")
    };
    second[0].1 = A::String("r-2".into());
    let schema = apache_avro::Schema::parse_str(sale_schema).expect("schema");
    let fingerprint = schema.fingerprint::<apache_avro::rabin::Rabin>().bytes;
    let body = apache_avro::to_avro_datum(&schema, A::Record(second)).expect("avro");
    let single_object = [&[0xC3u8, 0x01][..], &fingerprint, &body].concat();
    let mut other_schema = single_object.clone();
    other_schema[2] ^= 0xff;
    send_all(&sales_topic, [single_object, other_schema]);

    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let out = s.output();
    let live = out.live();
    assert_eq!(live.len(), 1, "one person, one profile: {live:#?}");
    let p = live[0].profile.as_ref().expect("profile");
    let ids: Vec<(String, String)> = p
        .identifiers
        .iter()
        .map(|i| (i.kind.clone(), i.value.clone()))
        .collect();
    for want in [
        ("anonymous_id", "anon-9"),
        ("customer_id", "cust-77"),
        ("email", "ann.lee@example.com"),
        ("phone", "+12125550199"),
        ("loyalty_id", "LC8801"),
    ] {
        assert!(
            ids.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {ids:?}"
        );
    }
    assert_eq!(p.events, 8);
    assert_eq!(p.first_seen, day + 1_000, "ISO-8601 with Z");
    let types: Vec<&str> = p.event_types.keys().map(String::as_str).collect();
    assert_eq!(
        types,
        ["add_to_cart", "call", "identify", "page_view", "purchase"]
    );
    let mut purchases: Vec<_> = p
        .purchases
        .iter()
        .map(|x| {
            (
                x.venue.as_str(),
                x.currency.as_str(),
                x.orders,
                x.revenue_minor,
            )
        })
        .collect();
    purchases.sort();
    assert_eq!(
        purchases,
        [("online", "USD", 1, 7990), ("store", "EUR", 3, 4500)]
    );
    let channels: Vec<&str> = p.channels.iter().map(|c| c.channel.as_str()).collect();
    assert_eq!(channels, ["callcenter", "pos", "web"]);

    let mut errors: Vec<String> = s
        .dead_letters()
        .iter()
        .map(|l| l.headers["dlq.error"].clone())
        .collect();
    errors.sort();
    assert_eq!(
        errors.len(),
        3,
        "no message id; unknown schema id; unknown fingerprint: {errors:?}"
    );
    assert!(errors[0].contains("messageId"), "{errors:?}");
    assert!(
        errors[1].contains("single-object Avro of schema fingerprint"),
        "{errors:?}"
    );
    assert!(errors[2].contains("unknown schema id 8"), "{errors:?}");
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

/// A profile as the truth describes it: identifiers, events, revenue in minor units.
type Person = (Vec<(String, String)>, i64, i64);

/// Segment's own SDK on one topic (captured from its batch calls, scripts/segment_sdk.py), a call-centre
/// tool's JSON and a till's Avro read through the Schema Registry on two others, together: anonymous
/// browsing followed by identify stitches, alias merges a second device, a call and a store sale join the
/// same person, and the profiles equal the ground truth of the scenario.
#[test]
fn segment_sdk_a_call_centre_and_a_till_stitch_as_the_truth_says() {
    let name = unique("sdk");
    let topic = format!("{name}-segment");
    let (tickets, sales) = (format!("{name}-tickets"), format!("{name}-sales"));
    create_topics(&[topic.clone(), tickets.clone(), sales.clone()], 2);
    let sale_id = registry()
        .register(&format!("{sales}-value"), SALE_V1)
        .expect("register the till's schema");
    let extra = format!(
        "{}{}{}{}",
        registry_toml(),
        segment_input(&topic),
        tickets_input(&tickets),
        till_input(&sales)
    );
    let mut s = Setup::new("sdk", 1, &extra);
    s.input_topics
        .extend([topic.clone(), tickets.clone(), sales.clone()]);
    let persons: i64 = 20;
    let out = std::process::Command::new(python())
        .arg(repo_root().join("scripts/segment_sdk.py"))
        .args([&brokers(), &topic, &persons.to_string()])
        .output()
        .expect("run scripts/segment_sdk.py (scripts/setup.sh installs its venv)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        summary.contains(&format!("\"captured\": {}", persons * 6)),
        "{summary}"
    );
    // Each person also calls (number, email and loyalty card on the ticket) and buys in the store with
    // the card.
    let day = 1_767_225_600_000i64;
    let calls: Vec<serde_json::Value> = (0..persons)
        .map(|p| {
            json!({"ticket": {"id": format!("t-{p}"), "opened_at": day + p, "reason": "late-delivery"},
                   "caller": {"number": format!("+1 212 555 01{p:02}"),
                              "ids": [{"kind": "email", "id": format!("person{p}@example.com")},
                                      {"kind": "loyalty_id", "id": format!("LC-{p}")}]}})
        })
        .collect();
    produce(&tickets, &calls);
    send_all(
        &sales,
        (0..persons).map(|p| {
            let sold = sale(&format!("r-{p}"), day + 10_000 + p, &format!("LC-{p}"));
            framed(sale_id, SALE_V1, sold)
        }),
    );

    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    assert!(s.dead_letters().is_empty(), "every SDK message is an event");
    let out = s.output();
    let mut got: Vec<Person> = out
        .live()
        .into_iter()
        .map(|u| {
            let p = u.profile.as_ref().expect("profile");
            let mut ids: Vec<(String, String)> = p
                .identifiers
                .iter()
                .map(|i| (i.kind.clone(), i.value.clone()))
                .collect();
            ids.sort();
            let revenue = p.purchases.iter().map(|x| x.revenue_minor).sum();
            (ids, p.events, revenue)
        })
        .collect();
    got.sort();
    let mut want: Vec<Person> = (0..persons)
        .map(|p| {
            let mut ids = vec![
                ("anonymous_id".to_string(), format!("anon-{p}")),
                ("anonymous_id".to_string(), format!("anon2-{p}")),
                ("customer_id".to_string(), format!("user-{p}")),
                ("email".to_string(), format!("person{p}@example.com")),
                ("phone".to_string(), format!("+121255501{p:02}")),
                ("loyalty_id".to_string(), format!("LC{p}")),
            ];
            ids.sort();
            (ids, 8, 950 + 300)
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
    println!("sdk: {summary}");
}
