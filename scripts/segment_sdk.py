#!/usr/bin/env python3
"""Segment-spec events as a real analytics SDK writes them, for tests/byo.rs.

  segment_sdk.py BROKERS TOPIC PERSONS

Runs Segment's own Python SDK (segment-analytics-python from PyPI) against a local HTTP endpoint on
127.0.0.1 that captures its batch calls (`POST /v1/batch`), then writes every captured message, unchanged, as
one JSON record to TOPIC. Per person p: anonymous browsing (`page`, `Product Added`) as anon-p, `identify`
as user-p with an email and anon-p, a page on a second device as anon2-p, `alias` of anon2-p to user-p, and an
`Order Completed` as user-p. Prints {"captured": N, "types": {...}}.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import segment.analytics as analytics
from confluent_kafka import Producer

captured = []


class Capture(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the standard library's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        captured.extend(json.loads(body)["batch"])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def main(brokers, topic, persons):
    server = HTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    analytics.write_key = "stitcher-test"
    analytics.host = f"http://127.0.0.1:{server.server_port}"
    analytics.sync_mode = True
    failures = []
    analytics.on_error = lambda error, items: failures.append(str(error))
    for p in range(persons):
        anon, anon2, user = f"anon-{p}", f"anon2-{p}", f"user-{p}"
        analytics.page(anonymous_id=anon, name="Home", properties={"path": "/"})
        analytics.track(anonymous_id=anon, event="Product Added",
                        properties={"sku": f"SKU-{p}", "quantity": 1, "price": 9.5})
        analytics.identify(user_id=user, anonymous_id=anon,
                           traits={"email": f"Person{p}@Example.com", "name": f"Person {p}"})
        analytics.page(anonymous_id=anon2, name="Home", properties={"path": "/"})
        analytics.alias(previous_id=anon2, user_id=user)
        analytics.track(user_id=user, event="Order Completed",
                        properties={"order_id": f"o-{p}", "total": 9.5, "currency": "USD",
                                    "products": [{"sku": f"SKU-{p}", "quantity": 1, "price": 9.5}]})
    analytics.flush()
    server.shutdown()
    if failures:
        raise SystemExit(f"the SDK reported errors: {failures[:3]}")
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    for message in captured:
        producer.produce(topic, key=message.get("userId") or message.get("anonymousId"),
                         value=json.dumps(message).encode())
    if producer.flush(30) > 0:
        raise SystemExit("delivery failed")
    types = {}
    for m in captured:
        types[m["type"]] = types.get(m["type"], 0) + 1
    print(json.dumps({"captured": len(captured), "types": types}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
