#!/usr/bin/env bash
# Instructions per event of the stitch step, counted by callgrind (benches/stitch_instructions.rs): the
# same from run to run, so a change of a few per cent to the step shows where a timing cannot. Prints the
# count per event and the functions the instructions went to (inclusive, the largest first).
#
#   scripts/instructions.sh [callgrind output file]      (default target/stitch.callgrind)
#
# STITCH_PERSONS, STITCH_WARM and STITCH_BATCHES size the workload (see the bench). Needs valgrind; takes
# about two minutes at the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${CARGO_TARGET_DIR:-target}/stitch.callgrind}
bin=$(cargo bench --bench stitch_instructions --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "stitch_instructions":
        print(m["executable"])')
[ -n "$bin" ] || { echo "the bench did not build: cargo bench --bench stitch_instructions --no-run" >&2; exit 1; }
valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*stitch_instructions::measured*' \
  --callgrind-out-file="$out" "$bin" 2>"$out.log" | tee "$out.txt"
events=$(sed -n 's/.* \([0-9]*\) events counted/\1/p' "$out.txt")
total=$(sed -n 's/^==[0-9]*== Collected : \([0-9]*\)/\1/p' "$out.log")
[ -n "$events" ] && [ -n "$total" ] || { echo "no count: see $out.log" >&2; exit 1; }
echo "instructions per event: $((total / events)) ($total over $events events)"
callgrind_annotate --inclusive=yes "$out" 2>/dev/null | sed -n '/^Ir/,$p' | head -45
