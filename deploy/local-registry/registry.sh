#!/usr/bin/env bash
# A real Confluent-compatible Schema Registry on loopback: Apicurio Registry (in-memory storage), its
# Confluent API at /apis/ccompat/v7, fetched from Maven Central (the app's `all` distribution).
#
#   deploy/local-registry/registry.sh fetch    download and unpack it (once; cached)
#   deploy/local-registry/registry.sh start    start it and wait until it answers
#   deploy/local-registry/registry.sh stop     stop it
#   deploy/local-registry/registry.sh url      print the base URL for [registry] url
#
# Environment:
#   REGISTRY_PORT   HTTP port on 127.0.0.1 (default 18081; management on the next port)
#   REGISTRY_HOME   where it is unpacked (default ~/.cache/stitcher/apicurio-<version>)
#   REGISTRY_DATA   log and pid file (default /tmp/stitcher-registry-<port>)
set -euo pipefail

version="2.6.13.Final"
port="${REGISTRY_PORT:-18081}"
home="${REGISTRY_HOME:-$HOME/.cache/stitcher/apicurio-$version}"
data="${REGISTRY_DATA:-/tmp/stitcher-registry-$port}"
pidfile="$data/registry.pid"
url="http://127.0.0.1:$port/apis/ccompat/v7"
runner="$home/apicurio-registry-app-$version-runner.jar"

log() { echo "[local-registry] $*" >&2; }

fetch() {
  if [ -f "$runner" ]; then return; fi
  log "fetching Apicurio Registry $version from Maven Central into $home"
  mkdir -p "$home"
  mvn -q -B -Dstyle.color=never dependency:copy -Dartifact="io.apicurio:apicurio-registry-app:$version:tar.gz:all" \
    -DoutputDirectory="$home"
  tar xzf "$home/apicurio-registry-app-$version-all.tar.gz" -C "$home"
  rm -f "$home/apicurio-registry-app-$version-all.tar.gz"
}

is_up() { curl -sf "$url/subjects" >/dev/null 2>&1; }

start() {
  fetch
  if is_up; then log "already up at $url"; return; fi
  mkdir -p "$data"
  # Loopback only (HTTP and management); BACKWARD compatibility for every subject, as Confluent's default.
  nohup java -Xmx384m -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port=$((port + 1)) \
    -Dregistry.rules.global.compatibility=BACKWARD \
    -jar "$runner" >"$data/registry.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 120); do
    if is_up; then log "Apicurio Registry $version up at $url"; return; fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      tail -20 "$data/registry.log" >&2
      log "the registry exited"
      exit 1
    fi
    sleep 0.5
  done
  tail -20 "$data/registry.log" >&2
  log "the registry did not answer within 60 s"
  exit 1
}

stop() {
  if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    log "registry stopped"
  fi
}

case "${1:-}" in
fetch) fetch ;;
start) start ;;
stop) stop ;;
url) echo "$url" ;;
*) sed -n '2,13p' "$0"; exit 2 ;;
esac
