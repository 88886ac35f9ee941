//! A real Confluent-compatible Schema Registry (Apicurio, deploy/local-registry; `TEST_REGISTRY_URL`)
//! with the real broker: a till writes Avro in its own schema and evolves it; the service reads every
//! message with the writer schema its id names, registers the output schema under `<output>-value` and
//! writes the id the registry gave in every record; an id the registry does not know is dead-lettered, as
//! is a datum of a recursive schema nested too deep to decode; a `registry.url` that does not lead to the
//! registry's API stops the start, saying so, as does an output schema the subject's compatibility level
//! refuses.
#![cfg(feature = "kafka-it")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use stitcher::config::RegistryConfig;
use stitcher::registry::Registry;

const TIMEOUT: Duration = Duration::from_secs(180);

/// V1 plus an optional currency: a backward-compatible change.
const SALE_V2: &str = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
    {"name": "receipt", "type": "string"},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "card", "type": "string"},
    {"name": "total", "type": "double"},
    {"name": "currency", "type": ["null", "string"], "default": null}]}"#;

/// V2 plus the sales it refunds: a recursive schema, as a tree of records is.
const SALE_V3: &str = r#"{"type": "record", "name": "Sale", "namespace": "till", "fields": [
    {"name": "receipt", "type": "string"},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "card", "type": "string"},
    {"name": "total", "type": "double"},
    {"name": "currency", "type": ["null", "string"], "default": null},
    {"name": "refunds", "type": {"type": "array", "items": "Sale"}, "default": []}]}"#;

/// A v3 sale whose refunds nest `depth` sales deep, written by hand (apache-avro's encoder recurses as
/// its decoder does): each level an empty receipt, time 0, empty card, total 0, no currency and one
/// refund; the innermost refunds nothing.
fn nested_refunds(id: u32, depth: usize) -> Vec<u8> {
    let level = [&[0u8, 0, 0][..], &[0; 8], &[0]].concat();
    let mut payload = [&[0u8][..], &id.to_be_bytes()].concat();
    for _ in 0..depth {
        payload.extend(&level);
        payload.push(2); // a block of one refund
    }
    payload.extend(&level);
    payload.push(0); // no refunds
    payload.extend(std::iter::repeat_n(0u8, depth)); // each block list ends
    payload
}

#[test]
fn writer_schemas_come_from_the_registry_and_the_output_schema_is_registered() {
    let name = unique("registry");
    let sales = format!("{name}-sales");
    create_topics(std::slice::from_ref(&sales), 1);
    let r = registry();
    let subject = format!("{sales}-value");
    let v1 = r.register(&subject, SALE_V1).expect("register v1");
    let v2 = r.register(&subject, SALE_V2).expect("register v2");
    assert_ne!(v1, v2);
    let v3 = r.register(&subject, SALE_V3).expect("register v3");

    let extra = registry_toml() + &till_input(&sales);
    let mut s = Setup::new("registry", 1, &extra);
    s.input_topics.push(sales.clone());

    use apache_avro::types::Value as A;
    let day = 1_767_225_600_000i64;
    let sale = |receipt: &str, at: i64, total: f64| {
        vec![
            ("receipt".to_string(), A::String(receipt.into())),
            ("at".to_string(), A::TimestampMillis(at)),
            ("card".to_string(), A::String("LC-5150".into())),
            ("total".to_string(), A::Double(total)),
        ]
    };
    let old = framed(v1, SALE_V1, A::Record(sale("r-1", day, 10.0)));
    let mut newer = sale("r-2", day + 1_000, 5.5);
    newer.push((
        "currency".into(),
        A::Union(1, Box::new(A::String("EUR".into()))),
    ));
    let newer_sale = newer.clone();
    let newer = framed(v2, SALE_V2, A::Record(newer));
    let unknown = framed(999_999, SALE_V1, A::Record(sale("r-3", day + 2_000, 1.0)));
    let mut refund = sale("r-4", day + 2_500, 2.0);
    refund.push(("currency".into(), A::Union(0, Box::new(A::Null))));
    let mut refunded = newer_sale;
    refunded.push(("refunds".into(), A::Array(vec![])));
    refund.push(("refunds".into(), A::Array(vec![A::Record(refunded)])));
    let refund = framed(v3, SALE_V3, A::Record(refund));
    // 10,000 refunds deep in 140 kB: this aborted the service (apache-avro's decoder overflowed the
    // stack), and again at every restart.
    let deep = nested_refunds(v3, 10_000);
    send_all(&sales, [&old, &newer, &unknown, &deep, &refund]);
    // A newer version of the service's own schema (a field added, with a default) on one of its Avro
    // inputs, known only to the registry.
    let (native_topic, _) = s
        .routes
        .values()
        .find(|(_, f)| *f == stitcher::config::Format::Avro)
        .expect("an Avro input")
        .clone();
    let mut evolved: serde_json::Value =
        serde_json::from_str(stitcher::codec::CHANNEL_EVENT_AVSC).expect("avsc");
    evolved["fields"]
        .as_array_mut()
        .expect("fields")
        .push(serde_json::json!({"name": "store_id", "type": "string", "default": ""}));
    let evolved = evolved.to_string();
    let evolved_id = r
        .register(&format!("{native_topic}-value"), &evolved)
        .expect("register the evolved schema");
    let ev = stitcher::model::ChannelEvent::new(
        "native-1",
        "store_visit",
        day + 3_000,
        &[("loyalty_id", "LC-5150")],
    );
    let A::Record(mut fields) = apache_avro::to_value(&ev).expect("value") else {
        panic!("a record")
    };
    fields.push(("store_id".into(), A::String("store-7".into())));
    let native = framed(evolved_id, &evolved, A::Record(fields));
    send_all(&native_topic, [native]);

    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);

    let output_subject = format!("{}-value", s.output_topic);
    let output_id = r
        .register(&output_subject, stitcher::codec::PROFILE_UPDATE_AVSC)
        .expect("the output schema is registered (registering it again gives its id)");
    let records = read_all(&s.output_topic);
    assert!(!records.is_empty());
    for rec in &records {
        let payload = rec.payload.as_ref().expect("no tombstones here");
        assert_eq!(
            u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]),
            output_id,
            "records carry the id the registry gave the output schema"
        );
    }
    let out = s.output();
    // The order of the two topics may rename the profile once (a redirect).
    let live = out.live();
    assert_eq!(live.len(), 1, "{live:#?}");
    let p = live[0].profile.as_ref().expect("profile");
    assert_eq!(
        p.events, 4,
        "the three versions of the till's schema, and the evolved own schema"
    );
    let letters = s.dead_letters();
    assert_eq!(letters.len(), 2);
    assert!(
        letters[0].headers["dlq.error"].contains("unknown schema id 999999"),
        "{:?}",
        letters[0].headers
    );
    assert!(
        letters[1].headers["dlq.error"].contains("nested deeper than 64 levels"),
        "{:?}",
        letters[1].headers
    );
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

#[test]
fn an_incompatible_output_schema_stops_the_start_with_a_clear_error() {
    let s = Setup::new("registry-incompatible", 1, &registry_toml());
    let subject = format!("{}-value", s.output_topic);
    let r = registry();
    r.register(
        &subject,
        r#"{"type": "record", "name": "Other", "fields": [{"name": "a", "type": "string"}]}"#,
    )
    .expect("register another schema");
    let agent = ureq::agent();
    agent
        .put(&format!("{}/config/{subject}", registry_url()))
        .send_json(serde_json::json!({"compatibility": "BACKWARD"}))
        .expect("set the subject's compatibility level");

    let mut child = s.start();
    let status = exit_within(&mut child, TIMEOUT)
        .unwrap_or_else(|| panic!("still running: {}", s.log_tail()));
    assert!(!status.success());
    let log = s.log();
    assert!(
        log.contains("incompatible") && log.contains(&subject),
        "{}",
        s.log_tail()
    );
}

/// `registry.url` without Apicurio's `/apis/ccompat/v7`: the server answers a bare 404 to the start's
/// registration of the output schema, and the start stops saying what to check (a bare 404 was an
/// unknown schema id, so, with the registration passed, every Avro message would have been
/// dead-lettered).
#[test]
fn a_registry_url_without_the_apis_path_stops_the_start_saying_so() {
    let url = registry_url();
    let origin = url
        .strip_suffix("/apis/ccompat/v7")
        .unwrap_or_else(|| panic!("TEST_REGISTRY_URL {url} ends in /apis/ccompat/v7"));
    let s = Setup::new(
        "registry-wrong-path",
        1,
        &format!("\n[registry]\nurl = \"{origin}\"\n"),
    );
    let mut child = s.start();
    let status = exit_within(&mut child, TIMEOUT)
        .unwrap_or_else(|| panic!("still running: {}", s.log_tail()));
    assert!(!status.success());
    assert!(
        s.log()
            .contains("does registry.url lead to the Confluent-compatible API"),
        "{}",
        s.log_tail()
    );
}

/// A registry of its own on a free port (HTTPS with a self-signed certificate if `tls`), stopped when
/// dropped (also when the test panics).
struct OwnRegistry {
    port: u16,
    tls: bool,
}

impl OwnRegistry {
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    fn data(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("stitcher-registry-test-{}", self.port))
    }

    fn run(&self, action: &str) {
        let status = std::process::Command::new("bash")
            .arg(repo_root().join("deploy/local-registry/registry.sh"))
            .arg(action)
            .env("REGISTRY_PORT", self.port.to_string())
            .env("REGISTRY_DATA", self.data())
            .env("REGISTRY_TLS", if self.tls { "1" } else { "0" })
            .status()
            .expect("deploy/local-registry/registry.sh");
        assert!(status.success(), "registry.sh {action}");
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        self.run("stop");
    }
}

/// A registry down at start-up keeps the instance not ready (and alive) while the start retries; once the
/// registry is up, the output schema is registered and events flow; when it goes down again, messages
/// whose schema ids are known keep flowing.
#[test]
fn a_registry_down_at_start_up_and_later() {
    let own = OwnRegistry {
        port: free_port(),
        tls: false,
    };
    let name = unique("registry-down");
    let sales = format!("{name}-sales");
    create_topics(std::slice::from_ref(&sales), 1);
    let extra = format!(
        "\n[registry]\nurl = \"{}\"\ntimeout = \"2s\"\n{}",
        own.url(),
        till_input(&sales)
    );
    let mut s = Setup::new("registry-down", 1, &extra);
    s.input_topics.push(sales.clone());

    let mut child = s.start();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the service waits for the registry: {}",
            s.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, body) = s.http_get("/readyz");
    assert_eq!(status, 503, "not ready while the registry is down: {body}");

    own.run("start");
    let r = Registry::new(&RegistryConfig {
        url: own.url(),
        ..Default::default()
    })
    .expect("registry client");
    let id = r
        .register(&format!("{sales}-value"), SALE_V1)
        .expect("register the till's schema");
    let day = 1_767_225_600_000i64;
    send_all(&sales, [framed(id, SALE_V1, sale("r-1", day, "LC-77"))]);
    s.wait_caught_up(&mut child, TIMEOUT);
    let (status, _) = s.http_get("/readyz");
    assert_eq!(status, 200, "{}", s.log_tail());

    own.run("stop");
    send_all(
        &sales,
        [framed(id, SALE_V1, sale("r-2", day + 1_000, "LC-77"))],
    );
    s.wait_caught_up(&mut child, TIMEOUT);
    let out = s.output();
    // The order of the two topics may rename the profile once (a redirect).
    let live = out.live();
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].profile.as_ref().map(|p| p.events),
        Some(2),
        "the known id kept working with the registry down"
    );
    assert!(s.dead_letters().is_empty());
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}

/// An `https://` registry behind a private CA is trusted with `registry.ca_file`: the output schema is
/// registered and Avro read through it; without the file the public roots refuse its certificate.
#[test]
fn a_registry_behind_a_private_ca() {
    let own = OwnRegistry {
        port: free_port(),
        tls: true,
    };
    own.run("start");
    let ca = own.data().join("tls/ca.pem");
    let trusting = |ca_file: Option<std::path::PathBuf>| {
        Registry::new(&RegistryConfig {
            url: own.url(),
            ca_file,
            ..Default::default()
        })
        .expect("registry client")
    };
    let name = unique("registry-tls");
    let sales = format!("{name}-sales");
    create_topics(std::slice::from_ref(&sales), 1);
    let err = trusting(None)
        .register(&format!("{sales}-value"), SALE_V1)
        .expect_err("a self-signed certificate is not trusted by the public roots");
    assert!(err.to_string().contains("ertificate"), "{err}");
    let id = trusting(Some(ca.clone()))
        .register(&format!("{sales}-value"), SALE_V1)
        .expect("register over TLS");

    let extra = format!(
        "\n[registry]\nurl = \"{}\"\nca_file = \"{}\"\n{}",
        own.url(),
        ca.display(),
        till_input(&sales)
    );
    let mut s = Setup::new("registry-tls", 1, &extra);
    s.input_topics.push(sales.clone());
    send_all(
        &sales,
        [framed(id, SALE_V1, sale("r-1", 1_767_225_600_000, "LC-77"))],
    );
    let mut child = s.start();
    s.wait_caught_up(&mut child, TIMEOUT);
    let out = s.output();
    let live = out.live();
    assert_eq!(live.len(), 1, "{}", s.log_tail());
    let output_id = trusting(Some(ca))
        .register(
            &format!("{}-value", s.output_topic),
            stitcher::codec::PROFILE_UPDATE_AVSC,
        )
        .expect("the output subject");
    for rec in read_all(&s.output_topic) {
        let payload = rec.payload.expect("a record");
        assert_eq!(
            u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]),
            output_id
        );
    }
    assert!(sigterm(&mut child).success(), "{}", s.log_tail());
}
