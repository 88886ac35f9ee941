#!/usr/bin/env bash
# Instructions per event of the stitch step (benches/stitch_instructions.rs), or with
# BENCH=engine_instructions per input message of the service's work without Kafka
# (benches/engine_instructions.rs), counted by callgrind: the same from run to run, so a change of a few
# per cent shows where a timing cannot. Prints the count per event (message) and the functions the
# instructions went to (inclusive, the largest first).
#
#   [BENCH=engine_instructions] scripts/instructions.sh [callgrind output file]
#                                                  (default target/<bench>.callgrind)
#
# STITCH_PERSONS, STITCH_WARM and STITCH_BATCHES, or ENGINE_PERSONS, ENGINE_WARM and ENGINE_BATCHES, size
# the workload (see the bench). Needs valgrind; takes about two minutes (the stitch step) or three (the
# engine) at the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${BENCH:-stitch_instructions}
out=${1:-${CARGO_TARGET_DIR:-target}/$bench.callgrind}
bin=$(scripts/bench-binary.sh "$bench" 2>/dev/null)
[ -n "$bin" ] || { echo "the bench did not build: cargo bench --bench $bench --no-run" >&2; exit 1; }
valgrind --tool=callgrind --collect-atstart=no --toggle-collect="*$bench::measured*" \
  --callgrind-out-file="$out" "$bin" 2>"$out.log" | tee "$out.txt"
unit=$(sed -n 's/.* [0-9]* \(event\|message\)s counted/\1/p' "$out.txt")
events=$(sed -n 's/.* \([0-9]*\) \(event\|message\)s counted/\1/p' "$out.txt")
total=$(sed -n 's/^==[0-9]*== Collected : \([0-9]*\)/\1/p' "$out.log")
[ -n "$events" ] && [ -n "$total" ] || { echo "no count: see $out.log" >&2; exit 1; }
echo "instructions per $unit: $((total / events)) ($total over $events ${unit}s)"
callgrind_annotate --inclusive=yes "$out" 2>/dev/null | sed -n '/^Ir/,$p' | head -45
