#!/usr/bin/env bash
# The tests: installs build dependencies, fetches and starts a real single-node Apache Kafka and a real
# Confluent-compatible Schema Registry (Apicurio) on loopback,
# checks formatting and lints, runs unit, property and integration tests (the end-to-end ones against
# Apache Kafka 3.9 as well), stops the services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/stitcher/target}"
export KAFKA_PORT="${KAFKA_PORT:-19092}"
export TEST_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"

cargo fmt --all -- --check
promtool check rules deploy/prometheus/alerts.yml
"${STITCHER_VENV:-$HOME/.cache/stitcher/venv}/bin/kubernetes-validate" --strict --quiet -k 1.30.0 \
  deploy/kubernetes/configmap.yaml deploy/kubernetes/statefulset.yaml deploy/kubernetes/service.yaml \
  deploy/kubernetes/pdb.yaml deploy/kubernetes/secret.example.yaml
cargo clippy --all-targets --features kafka-it -- -D warnings
scripts/advisories.sh check

deploy/local-kafka/kafka.sh clean >/dev/null 2>&1 || true
deploy/local-kafka/kafka.sh start
trap 'deploy/local-kafka/kafka.sh stop || true; deploy/local-registry/registry.sh stop || true' EXIT
deploy/local-registry/registry.sh start
TEST_REGISTRY_URL="$(deploy/local-registry/registry.sh url)"
export TEST_REGISTRY_URL
set +e
cargo test --features kafka-it -- --nocapture "$@" 2>&1 | tee "${TEST_LOG:-/tmp/stitcher-test.log}"
status=${PIPESTATUS[0]}
set -e

# The broker above is Apache Kafka 4.x; the 3.9 line keeps working: the end-to-end tests against it too.
old_kafka=(env KAFKA_POM=pom-3.9.xml KAFKA_PORT=$((KAFKA_PORT + 100)))
"${old_kafka[@]}" deploy/local-kafka/kafka.sh clean >/dev/null 2>&1 || true
"${old_kafka[@]}" deploy/local-kafka/kafka.sh start
trap 'deploy/local-kafka/kafka.sh stop || true; deploy/local-registry/registry.sh stop || true; "${old_kafka[@]}" deploy/local-kafka/kafka.sh stop || true' EXIT
set +e
TEST_KAFKA_BROKERS="127.0.0.1:$((KAFKA_PORT + 100))" cargo test --features kafka-it --test e2e -- --nocapture "$@" \
  2>&1 | tee -a "${TEST_LOG:-/tmp/stitcher-test.log}"
status_39=${PIPESTATUS[0]}
set -e
[ "$status" -ne 0 ] || status=$status_39
# Counted from libtest's result lines only: a log line such as "Connect to 127.0.0.1:19092 failed" is not a test.
count() { grep -E '^test result: ' "${TEST_LOG:-/tmp/stitcher-test.log}" | grep -Eo "[0-9]+ $1" | awk '{s+=$1} END {print s+0}'; }
passed=$(count passed)
failed=$(count failed)
echo "summary: $passed passed, $failed failed"
exit "$status"
