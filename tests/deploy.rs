//! The deployment kit must agree with the code: every metric the Grafana dashboard and the alert rules query
//! exists, every metric is documented in README.md, the Kubernetes config map holds a valid configuration, and
//! the Dockerfile builds what the repository has. (`promtool check rules` and the Kubernetes schema validation
//! run in scripts/test.sh; `promtool check metrics` runs on a live scrape in tests/e2e.rs.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `stitcher_*` names in a text, with histogram series suffixes folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("stitcher_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(family) = name.strip_suffix(suffix) {
                if family.ends_with("_seconds") || family.ends_with("_messages") {
                    name = family;
                }
            }
        }
        out.insert(name.to_string());
        rest = &tail[end..];
    }
    out
}

/// Every metric the service registers: the names defined in src/metrics.rs (each is defined once there).
fn defined() -> BTreeSet<String> {
    let src = read("src/metrics.rs");
    src.split('"')
        .filter(|s| s.starts_with("stitcher_") && !s.contains(' '))
        .map(str::to_string)
        .collect()
}

#[test]
fn dashboard_and_alerts_query_only_real_metrics() {
    let defined = defined();
    assert!(defined.len() >= 20, "found {defined:?}");
    let dashboard = read("deploy/grafana/stitcher-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for p in panels {
        assert!(
            !p["targets"].as_array().expect("targets").is_empty(),
            "panel {} queries something",
            p["title"]
        );
    }
    for (file, text) in [
        ("deploy/grafana/stitcher-dashboard.json", dashboard.as_str()),
        (
            "deploy/prometheus/alerts.yml",
            &read("deploy/prometheus/alerts.yml"),
        ),
    ] {
        let unknown: Vec<_> = metric_names(text).difference(&defined).cloned().collect();
        assert!(
            unknown.is_empty(),
            "{file} queries unknown metrics {unknown:?}"
        );
    }
    // The dashboard shows every metric there is.
    let missing: Vec<_> = defined
        .difference(&metric_names(&dashboard))
        .cloned()
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

#[test]
fn every_metric_is_documented() {
    let readme = read("README.md");
    let undocumented: Vec<_> = defined()
        .into_iter()
        .filter(|m| !readme.contains(&format!("`{m}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "README.md metrics table lacks {undocumented:?}"
    );
}

/// The `stitcher.toml` of the Kubernetes config map.
fn config_map_toml() -> String {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    // The block scalar after `stitcher.toml: |`, de-indented.
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("stitcher.toml: |"));
    lines.next().expect("a stitcher.toml key");
    let body: Vec<&str> = lines.collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .expect("a non-empty stitcher.toml");
    let toml_text: String = body
        .iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    toml_text
}

#[test]
fn kubernetes_config_map_holds_a_valid_configuration() {
    let toml_text = config_map_toml();
    let cfg: stitcher::config::Config = toml::from_str(&toml_text).expect("valid TOML config");
    cfg.validate().expect("a valid configuration");
    assert_eq!(cfg.inputs.len(), 6);
    assert_eq!(cfg.http.listen.port(), 9464);
    assert!(
        !cfg.kafka.common.contains_key("sasl.password"),
        "the password comes from a Secret, not the config map"
    );
    // The StatefulSet mounts the state where the config puts it, and the probes are the service's.
    let sts = read("deploy/kubernetes/statefulset.yaml");
    assert!(cfg.state.dir.starts_with("/var/lib/stitcher"));
    for needle in [
        "mountPath: /var/lib/stitcher",
        "path: /healthz",
        "path: /readyz",
        "STITCHER_INSTANCE_ID",
        "runAsNonRoot: true",
        "enableServiceLinks: false",
        // One instance per group until the graph is partitioned (tests/group.rs shows what two do).
        "replicas: 1",
    ] {
        assert!(sts.contains(needle), "statefulset.yaml lacks {needle:?}");
    }
    let grace: u64 = sts
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > cfg.processing.drain_timeout.as_secs(),
        "the pod must outlive the drain timeout"
    );
}

#[test]
fn dockerfile_builds_from_what_the_repository_has() {
    let docker = read("deploy/docker/Dockerfile");
    let stages = docker.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage");
    let mut copied = Vec::new();
    for line in docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        for src in line
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .expect("dest")
            .1
        {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
            assert!(
                path.exists(),
                "Dockerfile copies {src}, which does not exist"
            );
            copied.push(src.to_string());
        }
    }
    // The scripts the build runs, and those they run, are in the image's build stage.
    let is_copied = |path: &str| {
        copied
            .iter()
            .any(|c| path == c || path.starts_with(&format!("{}/", c.trim_end_matches('/'))))
    };
    let mut seen = BTreeSet::new();
    let mut texts = vec![("the Dockerfile".to_string(), docker.clone())];
    while let Some((from, text)) = texts.pop() {
        for script in scripts_named(&text) {
            assert!(
                is_copied(&script),
                "{from} runs {script}, which the Dockerfile does not copy"
            );
            if seen.insert(script.clone()) {
                texts.push((script.clone(), read(&script)));
            }
        }
    }
    assert!(
        seen.len() >= 2,
        "the build runs scripts/pgo-build.sh and what it runs"
    );
    let user = docker
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "runs as {user}"
    );
}

/// The `scripts/…` paths a text names.
fn scripts_named(text: &str) -> BTreeSet<String> {
    text.match_indices("scripts/")
        .filter(|(i, _)| {
            !text[..*i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '/' || c == '_')
        })
        .map(|(i, _)| {
            let tail = &text[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
                .unwrap_or(tail.len());
            tail[..end].trim_end_matches('.').to_string()
        })
        .filter(|path| !path.ends_with('/'))
        .collect()
}

/// The environment the StatefulSet gives its container: literal values, secrets from
/// `secret.example.yaml`, the pod name for `metadata.name`.
fn pod_environment() -> Vec<(String, String)> {
    let secrets = read("deploy/kubernetes/secret.example.yaml");
    let secret = |key: &str| {
        secrets
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("secret.example.yaml lacks {key}"))
    };
    let sts = read("deploy/kubernetes/statefulset.yaml");
    let mut env = Vec::new();
    let mut lines = sts.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("- name: STITCHER_") else {
            continue;
        };
        let name = format!("STITCHER_{name}");
        let mut value = None;
        while let Some(next) = lines.peek() {
            if next.starts_with("- ") || next.ends_with("ports:") {
                break;
            }
            if let Some(v) = next.strip_prefix("value:") {
                value = Some(v.trim().trim_matches('"').to_string());
            } else if next.starts_with("fieldPath: metadata.name") {
                value = Some("stitcher-0".to_string());
            } else if let Some(k) = next.strip_prefix("key:") {
                value = Some(secret(k.trim()));
            }
            lines.next();
        }
        env.push((
            name.clone(),
            value.unwrap_or_else(|| panic!("no value for {name}")),
        ));
    }
    assert!(env.len() >= 3, "the StatefulSet's env: {env:?}");
    env
}

/// The pod's environment, plus the service links Kubernetes would inject for the shipped Service
/// `stitcher` if `enableServiceLinks` were on (it was, and pods exited 1), starts the service: it
/// answers /healthz while it looks for its brokers.
#[test]
fn the_pods_environment_starts_the_service() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("stitcher.toml");
    std::fs::write(&config, config_map_toml()).expect("write config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut env = pod_environment();
    for (k, v) in [
        ("STITCHER_PORT", "tcp://10.96.0.7:9464"),
        ("STITCHER_PORT_9464_TCP", "tcp://10.96.0.7:9464"),
        ("STITCHER_PORT_9464_TCP_PROTO", "tcp"),
        ("STITCHER_PORT_9464_TCP_PORT", "9464"),
        ("STITCHER_PORT_9464_TCP_ADDR", "10.96.0.7"),
        ("STITCHER_SERVICE_HOST", "10.96.0.7"),
        ("STITCHER_SERVICE_PORT", "9464"),
        ("STITCHER_SERVICE_PORT_HTTP", "9464"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        // Nothing listens there: the service must still start and serve its probes.
        .args(["--brokers", "127.0.0.1:9"])
        .env_clear()
        .envs(env)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start stitcher");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut healthy = false;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("stitcher exited with {status} in the pod's environment: {err}");
        }
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = write!(stream, "GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            if response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200") {
                healthy = true;
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(healthy, "stitcher did not answer /healthz within 30 s");
}

/// Every example event in the README is accepted as it is written: decoded from JSON and normalised.
#[test]
fn the_readme_example_events_are_valid() {
    let readme = read("README.md");
    let section = readme
        .split("### Example events")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("an Example events section");
    let decoder = stitcher::codec::EventDecoder::new(&[1], 1 << 20).expect("decoder");
    let normalizer =
        stitcher::normalize::Normalizer::new(&stitcher::config::IdentityConfig::default())
            .expect("normalizer");
    let mut kinds = Vec::new();
    for json in section
        .split('`')
        .filter(|s| s.starts_with("{\"event_id\""))
    {
        let raw = decoder
            .decode(
                &stitcher::codec::Layout::native(stitcher::config::Format::Json),
                json.as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        let ev = normalizer
            .event(raw, "web", stitcher::model::now_millis(), |r| {
                panic!("{json}: identifier refused: {}", r.as_str())
            })
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        kinds.push(ev.event_type);
    }
    for kind in [
        "page_view",
        "login",
        "add_to_cart",
        "purchase",
        "email_open",
        "email_click",
        "call",
        "consent_change",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no {kind} example: {kinds:?}"
        );
    }
}

/// The "Bring your own events" example configuration loads, and each example event there becomes a valid
/// event through the mapping of the input it names.
#[test]
fn the_readme_mapping_examples_are_valid() {
    let readme = read("README.md");
    let section = readme
        .split("### Bring your own events")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("a Bring your own events section");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a toml example");
    let cfg: stitcher::config::Config = toml::from_str(toml).expect("example config");
    cfg.validate().expect("example config is valid");
    let decoder = stitcher::codec::EventDecoder::new(&[1], 1 << 20).expect("decoder");
    let normalizer =
        stitcher::normalize::Normalizer::new(&stitcher::config::IdentityConfig::default())
            .expect("normalizer");
    let mut decoded = 0;
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('`').collect();
        let (topic, json) = (cells[1], cells[3]);
        let input = cfg
            .input(topic)
            .unwrap_or_else(|| panic!("no input {topic}"));
        let layout = input.layout(None).expect("layout");
        let raw = decoder
            .decode(&layout, json.as_bytes())
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        normalizer
            .event(raw, &input.channel, 1_796_030_000_000, |r| {
                panic!("{json}: identifier refused: {}", r.as_str())
            })
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        decoded += 1;
    }
    assert_eq!(decoded, 3);
}

/// `stitcher.toml` in `dir`, holding `text`.
fn config_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let config = dir.join("stitcher.toml");
    std::fs::write(&config, text).expect("config");
    config
}

/// `generate` with channels the configuration has no input for fails before sending anything, and writes
/// no ground truth.
#[test]
fn generate_refuses_channels_without_an_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(
        dir.path(),
        "[kafka]\nbrokers = \"127.0.0.1:9\"\n[[inputs]]\ntopic = \"w\"\nchannel = \"web\"\nformat = \"json\"\n",
    );
    let truth = dir.path().join("truth.jsonl");
    // `stitcher generate` for `channels`, writing the truth to `truth`: it must fail; its error.
    let refused = |channels: &str, truth: &Path| -> String {
        common::failed_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
                .args(["generate", "--persons", "20", "--channels", channels])
                .arg("--config")
                .arg(&config)
                .arg("--truth")
                .arg(truth)
                .env_remove("STITCHER_BROKERS"),
            std::time::Duration::from_secs(60),
        )
        .0
    };
    for channels in ["web,email", "web,kiosk"] {
        let err = refused(channels, &truth);
        let named = channels.split(',').nth(1).expect("second channel");
        assert!(
            err.contains(named),
            "{channels}: the error names {named}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!truth.exists(), "{channels}: no ground truth written");
    }
    // A truth file in a directory that does not exist is refused before anything is sent (the truth is
    // written after the run, so the run's truth was lost).
    let err = refused("web", &dir.path().join("no-such-dir").join("truth.jsonl"));
    assert!(err.contains("no-such-dir does not exist"), "{err}");
}

/// `inspect`, `export` and `quality` read a stopped instance's state: a path that holds none (a typo, say)
/// is refused by name, and no empty state is created there.
#[test]
fn the_state_tools_refuse_a_path_without_state_and_create_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let absent = dir.path().join("no-state");
    let truth = dir.path().join("truth.jsonl");
    std::fs::write(&truth, "").expect("truth");
    let absent_arg = absent.to_str().expect("utf-8 path");
    let truth_arg = truth.to_str().expect("utf-8 path");
    for args in [
        vec![
            "inspect",
            "--state-dir",
            absent_arg,
            "--identifier",
            "email:a@b.io",
        ],
        vec!["export", "--state-dir", absent_arg],
        vec!["quality", "--truth", truth_arg, "--state-dir", absent_arg],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
            .args(&args)
            .output()
            .expect("run the tool");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains("holds no state"), "{args:?}: {err}");
        assert!(!absent.exists(), "{args:?} created {}", absent.display());
    }
}

/// The service's start-up errors name the setting to change: an HTTP address already in use names
/// `http.listen`, and a state directory another process holds says so (RocksDB's own words were
/// `While lock file: <dir>/LOCK: Resource temporarily unavailable`). Both come before any broker is asked.
#[test]
fn start_up_errors_name_the_setting_to_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(
        dir.path(),
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[[inputs]]\ntopic = \"web\"\nchannel = \"web\"\n",
    );
    // Fails within the bound (a start that got past these steps would wait for the absent brokers).
    let fails = |state: &Path, listen: &str| -> String {
        common::failed_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_stitcher"))
                .args(["run", "--config", config.to_str().expect("utf-8 path")])
                .args(["--state-dir", state.to_str().expect("utf-8 path")])
                .args(["--http-listen", listen]),
            std::time::Duration::from_secs(20),
        )
        .0
    };

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("address").to_string();
    let err = fails(&dir.path().join("state-a"), &addr);
    assert!(
        err.contains(&format!("cannot listen on {addr} (http.listen)")),
        "{err}"
    );

    let held = dir.path().join("state-b");
    let _holder = stitcher::store::Store::open(&held, 8).expect("open the state");
    let err = fails(&held, "127.0.0.1:0");
    assert!(
        err.contains(&format!(
            "cannot open the state at {} (state.dir): another process holds it",
            held.display()
        )),
        "{err}"
    );
}
