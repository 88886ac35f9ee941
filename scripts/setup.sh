#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine (idempotent).
set -euo pipefail
need=()
for pkg in libclang-dev cmake libcurl4-openssl-dev libsasl2-dev libssl-dev libzstd-dev liblz4-dev pkg-config build-essential maven openjdk-17-jre-headless prometheus; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then :; else
  # Java and Maven may come from elsewhere than Debian (a JDK install); do not pull Debian's then.
  need=("${need[@]/maven}"); need=("${need[@]/openjdk-17-jre-headless}")
fi
pkgs=()
for p in "${need[@]}"; do [ -n "$p" ] && pkgs+=("$p"); done
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "[setup] installing ${pkgs[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "[setup] Rust (cargo) is required: https://rustup.rs" >&2; exit 1; }
# networkx for the oracle check (tests/oracle.rs).
if ! python3 -c "import networkx" >/dev/null 2>&1; then
  echo "[setup] installing networkx from PyPI"
  python3 -m pip install --quiet networkx 2>/dev/null || python3 -m pip install --quiet --user --break-system-packages networkx
fi
# Python tools for the deployment checks (Kubernetes schema validation), in a venv outside the clone.
venv="${STITCHER_VENV:-$HOME/.cache/stitcher/venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "[setup] installing kubernetes-validate from PyPI into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kubernetes-validate
fi
# confluent-kafka (Confluent's Python client, with its Avro and JSON Schema serializers) for tests/interop.rs.
if ! "$venv/bin/python" -c "import confluent_kafka.schema_registry.avro, confluent_kafka.schema_registry.json_schema, fastavro, jsonschema" >/dev/null 2>&1; then
  echo "[setup] installing confluent-kafka[avro,json] from PyPI into $venv"
  "$venv/bin/pip" install --quiet "confluent-kafka[avro,json]"
fi
# Segment's own analytics SDK, whose batch calls tests/byo.rs captures (scripts/segment_sdk.py).
if ! "$venv/bin/python" -c "import segment.analytics" >/dev/null 2>&1; then
  echo "[setup] installing segment-analytics-python from PyPI into $venv"
  "$venv/bin/pip" install --quiet segment-analytics-python
fi
