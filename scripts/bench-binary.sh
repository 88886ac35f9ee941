#!/usr/bin/env bash
# Builds a bench without running it and prints its executable (for the scripts that run one under a tool).
#
#   scripts/bench-binary.sh <bench name> [more `cargo bench` flags]
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,4p "$0"; exit 2; }
bench=$1
shift
cargo bench --bench "$bench" "$@" --no-run --message-format=json |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$bench"
