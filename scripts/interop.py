#!/usr/bin/env python3
"""Interoperability with Confluent's own Python client (confluent-kafka from PyPI), used by tests/interop.rs.

  interop.py produce BROKERS TOPIC PERSONS [REGISTRY]   channel events written with confluent-kafka's
                                             AvroSerializer
  interop.py produce-json BROKERS TOPIC PERSONS  the same events in the service's JSON shape, written with
                                             confluent-kafka's JSONSerializer (JSON Schema, in-process
                                             registry): the wire format's header before each document
  interop.py consume BROKERS TOPIC [REGISTRY]  the profile topic read with confluent-kafka's AvroDeserializer,
                                             one JSON line per record: {"key", "schema_id", "profile_id",
                                             "redirect_to", "split_from", "identifiers": [[type, value], ...]}
                                             or {"key", "tombstone": true}

Without REGISTRY both sides use the client's in-process schema registry (url mock://): it hands out ids from
1 in registration order, so registering schemas/channel_event.avsc first and schemas/profile_update.avsc
second gives the ids the service uses by default (processing.avro_schema_ids = [1], output.schema_id = 2),
as a shared registry would. With REGISTRY (a real registry's URL), the producer registers the schema itself
for the first half of the persons and an evolved v2 (a new optional field) for the second half, and the
consumer reads every record with the writer schema its id names.
"""
import json
import pathlib
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

SCHEMAS = pathlib.Path(__file__).resolve().parent.parent / "schemas"


def registry(event_subject, update_subject):
    """Subjects follow the client's default TopicNameStrategy: `<topic>-value`."""
    client = SchemaRegistryClient.new_client({"url": "mock://stitcher-interop"})
    event_schema = (SCHEMAS / "channel_event.avsc").read_text()
    update_schema = (SCHEMAS / "profile_update.avsc").read_text()
    ids = (
        client.register_schema(event_subject, Schema(event_schema, "AVRO")),
        client.register_schema(update_subject, Schema(update_schema, "AVRO")),
    )
    assert ids == (1, 2), f"mock registry handed out ids {ids}"
    return client, event_schema, update_schema


def evolved(schema_text):
    """The channel event schema with a new optional field: a backward-compatible v2."""
    schema = json.loads(schema_text)
    schema["fields"].append({"name": "source_app", "type": ["null", "string"], "default": None})
    return json.dumps(schema)


def events(persons):
    """(key, event) for each person: a cookie visit, then a login with email and cookie, then a store
    purchase with email and loyalty card that is older than both (delivered late): the profile's id changes,
    the old id gets a redirect."""
    for p in range(persons):
        kinds = [
            ("page_view", [("anonymous_id", f"py-ck-{p}")], None),
            ("login", [("anonymous_id", f"py-ck-{p}"), ("email", f" Py.Person{p}@Example.org ")], None),
            ("purchase", [("email", f"py.person{p}@example.org"), ("loyalty_id", f"py-lc-{p}")], 12.5),
        ]
        for i, (kind, ids, amount) in enumerate(kinds):
            yield p, f"py-{p}", {
                "event_id": f"py-{p}-{i}",
                "channel": None,
                "event_type": kind,
                "timestamp": 1_767_225_600_000 + p * 1000 + (i if kind != "purchase" else -500),
                "identifiers": [{"type": t, "value": v} for t, v in ids],
                "order_id": f"py-o-{p}" if amount else None,
                "amount": amount,
                "currency": "USD" if amount else None,
                "items": [],
                "campaign_id": None,
                "consent": None,
                "attributes": {"source": "confluent-kafka-python"},
            }


def send(brokers, topic, records):
    """Produces (key, value bytes) records; returns how many, or exits on a failed delivery."""
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    failed = []

    def delivered(err, _msg):
        if err is not None:
            failed.append(str(err))

    sent = 0
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
        sent += 1
    if producer.flush(30) > 0 or failed:
        raise SystemExit(f"delivery failed: {failed[:3]}")
    return sent


def produce(brokers, topic, persons, registry_url=None):
    # The serializer registers the schema itself (its default); in the mock registry the first: id 1.
    client = SchemaRegistryClient.new_client({"url": registry_url or "mock://stitcher-interop"})
    event_schema = (SCHEMAS / "channel_event.avsc").read_text()
    serializer = AvroSerializer(client, event_schema)
    serializer_v2 = AvroSerializer(client, evolved(event_schema)) if registry_url else serializer
    ctx = SerializationContext(topic, MessageField.VALUE)

    def records():
        for p, key, value in events(persons):
            use = serializer
            if registry_url and p >= persons // 2:
                use = serializer_v2
                value["source_app"] = "interop-v2"
            yield key, use(value, ctx)

    sent = send(brokers, topic, records())
    registered = client.get_latest_version(f"{topic}-value")
    if not registry_url:
        assert registered.schema_id == 1, f"registered as id {registered.schema_id}"
    print(json.dumps({"sent": sent, "latest_id": registered.schema_id}))


# The events' JSON shape as a JSON Schema, which the serializer registers and validates each event against.
EVENT_JSON_SCHEMA = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "ChannelEvent",
    "type": "object",
    "properties": {
        "event_id": {"type": "string"},
        "event_type": {"type": "string"},
        "timestamp": {"type": "integer"},
        "identifiers": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"type": "string"}, "value": {"type": "string"}},
                "required": ["type", "value"],
            },
        },
        "amount": {"type": ["number", "null"]},
        "currency": {"type": ["string", "null"]},
    },
    "required": ["event_id", "event_type", "timestamp", "identifiers"],
})


def produce_json(brokers, topic, persons):
    client = SchemaRegistryClient.new_client({"url": "mock://stitcher-interop-json"})
    serializer = JSONSerializer(EVENT_JSON_SCHEMA, client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    framed = [(key, serializer(value, ctx)) for _, key, value in events(persons)]
    assert all(v[0] == 0 for _, v in framed), "the serializer frames each document"
    print(json.dumps({"sent": send(brokers, topic, framed)}))


def consume(brokers, topic, registry_url=None):
    if registry_url:
        # The writer schema by the id in each record.
        deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
    else:
        client, _, update_schema = registry("channel-events-value", f"{topic}-value")
        deserializer = AvroDeserializer(client, update_schema)
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"interop-{time.time_ns()}",
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    md = consumer.list_topics(topic, timeout=10)
    partitions = [TopicPartition(topic, p, 0) for p in md.topics[topic].partitions]
    ends = {}
    for tp in partitions:
        _, high = consumer.get_watermark_offsets(tp, timeout=10)
        ends[tp.partition] = high
    consumer.assign(partitions)
    done = {p for p, high in ends.items() if high == 0}
    deadline = time.time() + 60
    while len(done) < len(partitions) and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            # The end offset may be a transaction marker that is never delivered.
            for tp in consumer.position(partitions):
                if tp.offset >= ends[tp.partition]:
                    done.add(tp.partition)
            continue
        if msg.error():
            raise SystemExit(f"consume error: {msg.error()}")
        key = msg.key().decode()
        if msg.value() is None:
            print(json.dumps({"key": key, "tombstone": True}))
        else:
            ctx = SerializationContext(topic, MessageField.VALUE)
            u = deserializer(msg.value(), ctx)
            profile = u.get("profile")
            print(json.dumps({
                "key": key,
                "schema_id": int.from_bytes(msg.value()[1:5], "big"),
                "profile_id": u["profile_id"],
                "redirect_to": u.get("redirect_to"),
                "split_from": u.get("split_from"),
                "identifiers": sorted([i["type"], i["value"]] for i in profile["identifiers"]) if profile else None,
            }))
        if msg.offset() + 1 >= ends[msg.partition()]:
            done.add(msg.partition())
    consumer.close()
    if len(done) < len(partitions):
        raise SystemExit("timed out reading the profile topic")


if __name__ == "__main__":
    cmd, brokers, topic = sys.argv[1], sys.argv[2], sys.argv[3]
    if cmd == "produce":
        produce(brokers, topic, int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    elif cmd == "produce-json":
        produce_json(brokers, topic, int(sys.argv[4]))
    elif cmd == "consume":
        consume(brokers, topic, sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        raise SystemExit(__doc__)
