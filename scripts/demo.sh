#!/usr/bin/env bash
# The demo: installs build dependencies, builds, and runs the pipeline on librdkafka's in-process mock
# cluster (no broker needed). Extra arguments go to `stitcher demo` (try --persons 5000 or --serve).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/stitcher/target}"
cargo run --quiet -- demo "$@"
