#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, no ZooKeeper) on loopback, fetched from Maven Central.
#
#   deploy/local-kafka/kafka.sh fetch     download the broker jars (once; cached)
#   deploy/local-kafka/kafka.sh start     format storage, start the broker, wait until it answers
#   deploy/local-kafka/kafka.sh stop      stop it cleanly (SIGTERM, then wait)
#   deploy/local-kafka/kafka.sh restart   stop then start, keeping the data (for outage tests)
#   deploy/local-kafka/kafka.sh status    exit 0 when the broker is up
#
# Listeners, all on 127.0.0.1 (KAFKA_PORT = P):
#   P       PLAINTEXT
#   P+1     the KRaft controller
#   P+2     SASL_PLAINTEXT, SCRAM-SHA-512
#   P+3     SASL_SSL, SCRAM-SHA-512, a self-signed certificate for 127.0.0.1/localhost whose CA is written to
#           $KAFKA_DATA/tls/ca.pem (for ssl.ca.location)
# SCRAM user: KAFKA_SCRAM_USER / KAFKA_SCRAM_PASSWORD (default stitcher / stitcher-secret), created at start.
#
# Environment:
#   KAFKA_PORT      client listener port on 127.0.0.1 (default 19092)
#   KAFKA_POM       which broker: pom.xml (Apache Kafka 4.x, the default) or pom-3.9.xml (3.9)
#   KAFKA_HOME      where the jars live (default ~/.cache/stitcher/kafka-<version>)
#   KAFKA_DATA      log dirs, config and pid file (default /tmp/stitcher-kafka-<port>)
#   KAFKA_HEAP      JVM heap (default 1g)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/${KAFKA_POM:-pom.xml}"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
port="${KAFKA_PORT:-19092}"
controller_port=$((port + 1))
sasl_port=$((port + 2))
ssl_port=$((port + 3))
scram_user="${KAFKA_SCRAM_USER:-stitcher}"
scram_password="${KAFKA_SCRAM_PASSWORD:-stitcher-secret}"
home="${KAFKA_HOME:-$HOME/.cache/stitcher/kafka-$version}"
data="${KAFKA_DATA:-/tmp/stitcher-kafka-$port}"
pidfile="$data/kafka.pid"

log() { echo "[local-kafka] $*" >&2; }

fetch() {
  if [ -f "$home/libs/kafka_2.13-$version.jar" ]; then return; fi
  log "fetching Apache Kafka $version from Maven Central into $home/libs"
  mkdir -p "$home"
  mvn -q -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies -DoutputDirectory="$home/libs" -DincludeScope=runtime
}

java_run() {
  java -Xmx"${KAFKA_HEAP:-1g}" -Xms256m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$data/log4j.properties" -Dlog4j2.configurationFile="$data/log4j2.properties" \
    -cp "$home/libs/*" "$@"
}

is_up() {
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || return 1
  grep -q "Kafka Server started" "$data/server.log" 2>/dev/null || grep -q "\[KafkaRaftServer nodeId=1\] Kafka Server started" "$data/kafka.out" 2>/dev/null
}

write_config() {
  mkdir -p "$data/logs"
  cat > "$data/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port,SASL_PLAINTEXT://127.0.0.1:$sasl_port,SASL_SSL://127.0.0.1:$ssl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$sasl_port,SASL_SSL://127.0.0.1:$ssl_port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$data/tls/broker.p12
ssl.keystore.password=changeit
ssl.key.password=changeit
log.dirs=$data/logs
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.segment.bytes=67108864
log.cleaner.dedupe.buffer.size=16777216
transaction.max.timeout.ms=900000
PROPS
  cat > "$data/log4j.properties" <<PROPS
log4j.rootLogger=WARN, file
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.Kafka=INFO
log4j.logger.kafka.coordinator.transaction=INFO
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$data/server.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
PROPS
  # Kafka 4 logs through log4j2.
  cat > "$data/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $data/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = info
logger.server.name = kafka.server.KafkaServer
logger.server.level = info
logger.kafka.name = kafka.Kafka
logger.kafka.level = info
# The transaction coordinator says at info when it gives up on a partition's marker (CI once saw a commit
# completed without markers while the broker shut down; docs/DESIGN.md, "Restore").
logger.txn.name = kafka.coordinator.transaction
logger.txn.level = info
logger.txn2.name = org.apache.kafka.coordinator.transaction
logger.txn2.level = info
PROPS
}

# A self-signed certificate for the SASL_SSL listener, valid for 127.0.0.1 and localhost.
make_tls() {
  [ -f "$data/tls/broker.p12" ] && return
  mkdir -p "$data/tls"
  keytool -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity 3650 \
    -dname "CN=localhost" -ext "SAN=ip:127.0.0.1,dns:localhost" \
    -keystore "$data/tls/broker.p12" -storetype PKCS12 -storepass changeit -keypass changeit >/dev/null 2>&1
  keytool -exportcert -rfc -alias broker -keystore "$data/tls/broker.p12" -storepass changeit \
    -file "$data/tls/ca.pem" >/dev/null 2>&1
}

# SCRAM credentials live in the cluster metadata; (re)setting them is idempotent.
add_scram_user() {
  local command=org.apache.kafka.tools.ConfigCommand
  case "$version" in 3.*) command=kafka.admin.ConfigCommand ;; esac
  java_run "$command" --bootstrap-server "127.0.0.1:$port" --alter \
    --add-config "SCRAM-SHA-512=[iterations=4096,password=$scram_password]" \
    --entity-type users --entity-name "$scram_user" >/dev/null
}

start() {
  fetch
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    log "already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; return
  fi
  write_config
  make_tls
  if [ ! -f "$data/logs/meta.properties" ]; then
    java_run kafka.tools.StorageTool format -t "$(java_run kafka.tools.StorageTool random-uuid)" \
      -c "$data/server.properties" --ignore-formatted >/dev/null
  fi
  # A restart keeps the log of the run before (the outage test's restart: what the broker did while it
  # shut down), one generation back.
  if [ -s "$data/server.log" ]; then mv "$data/server.log" "$data/server.log.1"; fi
  if [ -s "$data/kafka.out" ]; then mv "$data/kafka.out" "$data/kafka.out.1"; fi
  : > "$data/server.log"
  nohup java -Xmx"${KAFKA_HEAP:-1g}" -Xms256m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$data/log4j.properties" -Dlog4j2.configurationFile="$data/log4j2.properties" \
    -cp "$home/libs/*" kafka.Kafka "$data/server.properties" > "$data/kafka.out" 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 1 120); do
    if is_up; then
      add_scram_user
      log "broker $version up on 127.0.0.1:$port (SASL/SCRAM on $sasl_port, SASL_SSL on $ssl_port; data $data)"
      return
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      log "broker exited during start:"; tail -30 "$data/kafka.out" "$data/server.log" >&2; exit 1
    fi
    sleep 0.5
  done
  log "broker did not come up within 60s"; tail -30 "$data/server.log" >&2; exit 1
}

stop() {
  [ -f "$pidfile" ] || return 0
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "broker did not stop in 30s, killing"; kill -KILL "$pid"; }
  fi
  rm -f "$pidfile"
  log "broker stopped"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) is_up ;;
  clean) stop; rm -rf "$data" ;;
  *) echo "usage: $0 fetch|start|stop|restart|status|clean" >&2; exit 2 ;;
esac
