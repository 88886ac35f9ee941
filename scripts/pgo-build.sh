#!/usr/bin/env bash
# A `stitcher` binary optimised with the profile of the service's own work (profile-guided optimisation):
# the engine bench (benches/engine_instructions.rs: decoding, dedup, the owner protocol, stitching,
# enrichment, the records and the local state, without Kafka) is built instrumented and run, and the
# profile it writes guides the release build of the service. docs/BENCHMARKS.md (forty-eighth session)
# measures what it gives, natively and end to end.
#
#   scripts/pgo-build.sh [output binary]        (default $CARGO_TARGET_DIR/pgo/stitcher)
#
# Needs the toolchain's llvm-profdata (`rustup component add llvm-tools`) and python3. Builds twice, in
# $CARGO_TARGET_DIR/pgo/gen and $CARGO_TARGET_DIR/pgo/use (target/ by default), each about as long as a
# release build, with Cargo.lock as it is (--locked). RocksDB's C++ library (not profile-guided either way)
# is compiled at most once: linked from an earlier release build when there is one, else from the first of
# the two builds; ROCKSDB_LIB_DIR (with ROCKSDB_STATIC=1 for a static library) names another. The
# container image (deploy/docker/Dockerfile) is built this way.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
work=$target/pgo
out=${1:-$work/stitcher}
triple=$(rustc -vV | sed -n 's/^host: //p')
profdata=$(rustc --print sysroot)/lib/rustlib/$triple/bin/llvm-profdata
[ -x "$profdata" ] || { echo "no $profdata: rustup component add llvm-tools" >&2; exit 1; }
# The newest librocksdb.a under a build directory, exported for the builds after it.
link_rocksdb_from() {
  [ -z "${ROCKSDB_LIB_DIR:-}" ] || return 0
  local lib
  lib=$(ls -t "$1"/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1 || true)
  [ -z "$lib" ] || export ROCKSDB_LIB_DIR=${lib%/*} ROCKSDB_STATIC=1
}
link_rocksdb_from "$target/release"

# 1. The engine bench, instrumented (RUSTFLAGS with --target: the build scripts are left alone), run once.
rm -rf "$work/raw"
bench=$(CARGO_TARGET_DIR=$work/gen RUSTFLAGS="-Cprofile-generate=$work/raw" \
  scripts/bench-binary.sh engine_instructions --locked --target "$triple")
[ -n "$bench" ] || { echo "the instrumented bench did not build" >&2; exit 1; }
"$bench"
"$profdata" merge -o "$work/stitcher.profdata" "$work/raw"
link_rocksdb_from "$work/gen/$triple/release"

# 2. The service, built with that profile.
CARGO_TARGET_DIR=$work/use RUSTFLAGS="-Cprofile-use=$work/stitcher.profdata" \
  cargo build --release --locked --target "$triple" --bin stitcher
mkdir -p "$(dirname "$out")"
cp "$work/use/$triple/release/stitcher" "$out"
echo "profile-guided binary: $out (profile $work/stitcher.profdata)"
