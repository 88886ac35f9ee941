#!/usr/bin/env python3
"""How long a Kafka transaction commit takes on a broker, by the number of partitions it touches.

  txn_probe.py [BROKERS]        default 127.0.0.1:19092 (deploy/local-kafka/kafka.sh start)

For retry.backoff.ms 100 (librdkafka's default) and 10, and for 1 and 24 partitions: 30 transactions of 200
small records each, one after the other; prints the median and the slowest commit_transaction. The service's
batches are such transactions (docs/BENCHMARKS.md, "Scale-out"). Needs confluent-kafka
(~/.cache/stitcher/venv, installed by scripts/setup.sh).
"""
import sys
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

TRANSACTIONS = 30
RECORDS = 200
PARTITIONS = 24


def main() -> None:
    brokers = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:19092"
    topic = f"txn-probe-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    time.sleep(1)
    try:
        for backoff in (100, 10):
            for partitions in (1, PARTITIONS):
                producer = Producer({
                    "bootstrap.servers": brokers,
                    "transactional.id": f"txn-probe-{uuid.uuid4().hex[:8]}",
                    "linger.ms": 5,
                    "retry.backoff.ms": backoff,
                })
                producer.init_transactions(30)
                took = []
                for _ in range(TRANSACTIONS):
                    producer.begin_transaction()
                    for k in range(RECORDS):
                        producer.produce(topic, b"x" * 100, partition=k % partitions)
                    started = time.monotonic()
                    producer.commit_transaction(30)
                    took.append((time.monotonic() - started) * 1000)
                took.sort()
                print(f"retry.backoff.ms {backoff:>3}, {partitions:>2} partition(s): commit p50 "
                      f"{took[len(took) // 2]:.0f} ms, max {took[-1]:.0f} ms")
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


if __name__ == "__main__":
    main()
