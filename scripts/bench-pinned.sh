#!/usr/bin/env bash
# The end-to-end bench with the service on a core of its own: `stitcher bench --partitions 1` against the
# local broker (deploy/local-kafka), the broker and the bench (its passthroughs' client, sender and reader)
# on CPU 0 and the service the bench starts re-pinned to CPU 1, so that the service's rate is not the
# scheduler's. The broker's CPU is reported too (--broker-pid), and its affinity is given back at the end.
#
#   scripts/bench-pinned.sh <stitcher binary> <report file> [more `stitcher bench` flags]
#
# The bench first warms the broker up (`--warm-up-secs`, WARM_UP_SECS seconds at most, default 180; 0 for
# none): on a broker started minutes before, the passthrough ran at half its later rate while the broker's
# JVM compiled, which doubled the pipeline / passthrough ratio. A broker long in service is quiet after
# three rounds.
#
# Needs two CPUs. docs/BENCHMARKS.md calls it "pinned".
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,8p "$0"; exit 2; }
bin=$1 out=$2
shift 2
broker=$(pgrep -f kafka.Kafka | head -1) || { echo "no local broker running" >&2; exit 1; }
before=$(taskset -p -c "$broker" | awk '{print $NF}')
trap 'taskset -a -p -c "$before" "$broker" >/dev/null' EXIT
taskset -a -p -c 0 "$broker" >/dev/null
taskset -c 0 "$bin" bench --partitions 1 --broker-pid "$broker" --warm-up-secs "${WARM_UP_SECS:-180}" "$@" >"$out" 2>&1 &
bench=$!
pinned=" "
while kill -0 "$bench" 2>/dev/null; do
  for child in $(pgrep -P "$bench" || true); do
    case "$pinned" in *" $child "*) continue ;; esac
    # The service is the bench's `stitcher run` child (not the Kafka Streams baseline's JVM).
    if tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | grep -qw run; then
      taskset -a -p -c 1 "$child" >/dev/null && pinned="$pinned$child "
    fi
  done
  sleep 0.2
done
wait "$bench"
