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
#   REGISTRY_TLS    1: HTTPS only, with a certificate for 127.0.0.1 signed by a private CA whose PEM is
#                   $REGISTRY_DATA/tls/ca.pem (for registry.ca_file)
set -euo pipefail

version="2.6.13.Final"
port="${REGISTRY_PORT:-18081}"
home="${REGISTRY_HOME:-$HOME/.cache/stitcher/apicurio-$version}"
data="${REGISTRY_DATA:-/tmp/stitcher-registry-$port}"
pidfile="$data/registry.pid"
tls="${REGISTRY_TLS:-0}"
cert="$data/tls/cert.pem"
ca="$data/tls/ca.pem"
scheme=http
[ "$tls" = 1 ] && scheme=https
url="$scheme://127.0.0.1:$port/apis/ccompat/v7"
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

is_up() { curl -sf --cacert "$ca" "$url/subjects" >/dev/null 2>&1 || curl -sf "$url/subjects" >/dev/null 2>&1; }

# A private CA and a server certificate it signs (a CA certificate cannot serve as the server's own).
make_tls() {
  [ -f "$cert" ] && return
  mkdir -p "$data/tls"
  local d="$data/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=stitcher test CA" \
    -keyout "$d/ca-key.pem" -out "$ca" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$d/key.pem" -out "$d/server.csr" \
    >/dev/null 2>&1
  printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$ca" -CAkey "$d/ca-key.pem" -CAcreateserial -days 30 \
    -extfile "$d/server.ext" -out "$cert" >/dev/null 2>&1
}

start() {
  fetch
  if is_up; then log "already up at $url"; return; fi
  mkdir -p "$data"
  local listen=(-Dquarkus.http.port="$port")
  if [ "$tls" = 1 ]; then
    make_tls
    listen=(-Dquarkus.http.ssl-port="$port" -Dquarkus.http.port=$((port + 2))
      -Dquarkus.http.insecure-requests=disabled
      -Dquarkus.http.ssl.certificate.files="$cert" -Dquarkus.http.ssl.certificate.key-files="$data/tls/key.pem")
  fi
  # Loopback only (HTTP and management); BACKWARD compatibility for every subject, as Confluent's default.
  nohup java -Xmx384m -Dquarkus.http.host=127.0.0.1 "${listen[@]}" \
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
