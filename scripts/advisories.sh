#!/usr/bin/env bash
# RustSec advisories for the locked dependencies, with cargo-deny, without network access to GitHub.
#
#   scripts/advisories.sh check              cargo deny check advisories against the snapshot (CI runs this)
#   scripts/advisories.sh refresh CLONE      take a new snapshot from a clone of github.com/rustsec/advisory-db
#
# The snapshot (scripts/advisory-db/) holds the advisories of every crate in Cargo.lock at the time of the
# refresh, the database commit it came from, and the list of crates it covered. `check` fails when
# Cargo.lock names a crate the snapshot did not cover (refresh after adding a dependency), and cargo-deny
# fails on a vulnerability, or on an unsound, unmaintained or yanked crate not accepted in deny.toml, where
# each accepted advisory is listed with its reason. The snapshot must be refreshed to learn of new
# advisories; deny.toml bounds its age (maximum-db-staleness).
set -euo pipefail
cd "$(dirname "$0")/.."
snapshot=scripts/advisory-db
deny_version=0.18.3

locked_crates() { sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u; }

case "${1:-}" in
refresh)
  clone="${2:?usage: scripts/advisories.sh refresh PATH-TO-advisory-db-CLONE}"
  if [ ! -d "$clone/crates" ]; then
    # A bare repository: take its HEAD's files.
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' EXIT
    git -C "$clone" archive HEAD crates | tar -x -C "$tree"
    commit=$(git -C "$clone" log -1 --format='%H %cI')
    clone_files="$tree"
  else
    commit=$(git -C "$clone" log -1 --format='%H %cI')
    clone_files="$clone"
  fi
  rm -rf "$snapshot"
  mkdir -p "$snapshot/crates"
  while read -r crate; do
    if [ -d "$clone_files/crates/$crate" ]; then cp -r "$clone_files/crates/$crate" "$snapshot/crates/"; fi
  done < <(locked_crates)
  locked_crates > "$snapshot/COVERED"
  echo "$commit" > "$snapshot/COMMIT"
  echo "snapshot of $(cat "$snapshot/COMMIT") for $(wc -l < "$snapshot/COVERED") crates: $(find "$snapshot/crates" -name '*.md' | wc -l) advisories"
  ;;
check)
  uncovered=$(comm -23 <(locked_crates) "$snapshot/COVERED")
  if [ -n "$uncovered" ]; then
    echo "[advisories] Cargo.lock has crates the advisory snapshot did not cover: $uncovered" >&2
    echo "[advisories] run scripts/advisories.sh refresh PATH-TO-advisory-db-CLONE" >&2
    exit 1
  fi
  if ! command -v cargo-deny >/dev/null 2>&1 || ! cargo-deny --version | grep -q "$deny_version"; then
    echo "[advisories] installing cargo-deny $deny_version from crates.io"
    cargo install --locked --quiet cargo-deny --version "$deny_version"
  fi
  # cargo-deny opens its databases as git repositories under db-path, in a directory named after the URL.
  dbs="${CARGO_TARGET_DIR:-target}/advisory-dbs"
  db="$dbs/advisory-db-3157b0e258782691"
  rm -rf "$db"
  mkdir -p "$db"
  cp -r "$snapshot/crates" "$db/"
  commit_date=$(cut -d' ' -f2 "$snapshot/COMMIT")
  (
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="$commit_date" GIT_COMMITTER_DATE="$commit_date" \
      git -c user.name=snapshot -c user.email=snapshot@localhost commit -q -m "advisory-db $(cut -d' ' -f1 "$OLDPWD/$snapshot/COMMIT")"
  )
  STITCHER_ADVISORY_DBS="$(cd "$dbs" && pwd)" cargo deny check --disable-fetch advisories
  ;;
*)
  sed -n '2,12p' "$0"
  exit 2
  ;;
esac
