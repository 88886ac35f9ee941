//! Security to Kafka against the real broker's SASL listeners (deploy/local-kafka/kafka.sh starts them):
//! SASL/SCRAM-SHA-512 in clear, and SASL/SCRAM over TLS with the broker's self-signed CA. The service runs the
//! whole pipeline through each, the password coming from the environment as a deployment passes a secret;
//! a wrong password must be refused with an error that says so.
#![cfg(feature = "kafka-it")]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use stitcher::generate;

const TIMEOUT: Duration = Duration::from_secs(120);
const PASSWORD: (&str, &str) = ("STITCHER_RDKAFKA__SASL_PASSWORD", "stitcher-secret");

fn plain_port() -> u16 {
    brokers()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("TEST_KAFKA_BROKERS ends with a port")
}

/// The CA of the broker's TLS listener (kafka.sh writes it next to the broker's data).
fn ca_pem() -> PathBuf {
    std::env::var("TEST_KAFKA_CA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(format!("/tmp/stitcher-kafka-{}/tls/ca.pem", plain_port()))
        })
}

fn security_toml(protocol: &str) -> String {
    let mut toml = format!(
        "[kafka.common]\n\"security.protocol\" = \"{protocol}\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"stitcher\"\n"
    );
    if protocol == "SASL_SSL" {
        toml.push_str(&format!(
            "\"ssl.ca.location\" = \"{}\"\n",
            ca_pem().display()
        ));
    }
    toml
}

#[test]
fn pipeline_runs_over_sasl_scram_and_tls() {
    for (protocol, port) in [
        ("SASL_PLAINTEXT", plain_port() + 2),
        ("SASL_SSL", plain_port() + 3),
    ] {
        let s = Setup::secured(
            "secure",
            2,
            &format!("127.0.0.1:{port}"),
            &security_toml(protocol),
        );
        // The events go through the secured listener too, with `stitcher generate` and the service's
        // configuration (the generator used only the brokers' addresses, so it could not reach a secured
        // cluster).
        let truth = s.dir.join("truth.jsonl");
        let out = s.cli_with_env(
            &[
                "generate",
                "--persons",
                "60",
                "--seed",
                "31",
                "--truth",
                truth.to_str().expect("utf-8 path"),
            ],
            &[PASSWORD],
        );
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let truth = generate::read_truth(&truth).expect("truth");
        let mut child = s.start_with_env(&[PASSWORD]);
        s.wait_caught_up(&mut child, TIMEOUT);
        assert!(sigterm(&mut child).success(), "{}", s.log_tail());
        let got = live_summaries(&s.output().view);
        let want = truth_summaries(&truth);
        assert!(got == want, "{protocol}: {}", diff(&got, &want));
        println!(
            "security: {protocol} on 127.0.0.1:{port}: {said}; {} profiles",
            got.len()
        );
    }
}

#[test]
fn a_wrong_password_is_refused_clearly() {
    let port = plain_port() + 2;
    let s = Setup::secured(
        "badpass",
        1,
        &format!("127.0.0.1:{port}"),
        &security_toml("SASL_PLAINTEXT"),
    );
    let mut child = s.start_with_env(&[(PASSWORD.0, "not-the-password")]);
    let start = Instant::now();
    let mut exited = None;
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            break;
        }
        if s.log().contains("kafka authentication failed") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = s.log();
    assert!(
        log.to_lowercase().contains("authentication"),
        "the log names the authentication failure:\n{}",
        s.log_tail()
    );
    if exited.is_none() {
        let (status, _) = s.http_get("/readyz");
        assert_ne!(status, 200, "not ready without a broker connection");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains(
            "kafka authentication failed: check sasl.mechanism, sasl.username and sasl.password"
        ),
        "the service says what to check:\n{}",
        s.log_tail()
    );
    println!(
        "security: wrong password: {}",
        log.lines()
            .find(|l| l.contains("kafka authentication failed"))
            .unwrap_or_default()
    );
}
