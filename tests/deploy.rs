//! The deployment kit must agree with the code: every metric the Grafana dashboard and the alert rules query
//! exists, every metric is documented in README.md, the Kubernetes config map holds a valid configuration, and
//! the Dockerfile builds what the repository has. (`promtool check rules` and the Kubernetes schema validation
//! run in scripts/test.sh; `promtool check metrics` runs on a live scrape in tests/e2e.rs.)

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

#[test]
fn kubernetes_config_map_holds_a_valid_configuration() {
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
        }
    }
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
