#!/usr/bin/env python3
"""How long each transactional call of the service took, from librdkafka's own log of them.

  txn_log.py SERVICE_LOG

SERVICE_LOG is the service's text log with librdkafka's transaction debugging on, for example from

  stitcher bench --service-log svc.log --service-log-level warn,librdkafka=debug --producer debug=eos ...

For begin_transaction, send_offsets_to_transaction and commit_transaction (from the call to its return):
how many, their median, p90, p99 and slowest, and when the slowest were called (a slow
send_offsets_to_transaction split into its two round trips: AddOffsetsToTxn to the transaction coordinator,
then TxnOffsetCommit to the group coordinator); then how many requests the transaction coordinator answered
CONCURRENT_TRANSACTIONS, by request (each one a retry after a backoff, docs/DESIGN.md, "Overlapped
commits").
"""
import re
import sys
from collections import Counter
from datetime import datetime

CALLS = ("begin_transaction", "send_offsets_to_transaction", "commit_transaction")


def when(line):
    return datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def main(path):
    called = {}
    took = {c: [] for c in CALLS}
    # When the current send_offsets_to_transaction's AddOffsetsToTxn was answered.
    added = None
    concurrent = Counter()
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if "librdkafka" not in line:
                continue
            m = re.search(r"Transactional API called: (\w+)", line)
            if m:
                called[m.group(1)] = (when(line), line[11:23])
                added = None
                continue
            if "AddOffsetsToTxn response" in line and "NO_ERROR" in line:
                added = when(line)
            m = re.search(r"Transactional API (\w+) return at", line)
            if m and m.group(1) in took and m.group(1) in called:
                start, at = called.pop(m.group(1))
                parts = ""
                if m.group(1) == "send_offsets_to_transaction" and added is not None:
                    parts = (f": AddOffsetsToTxn {(added - start) * 1000:.0f}, "
                             f"TxnOffsetCommit {(when(line) - added) * 1000:.0f}")
                took[m.group(1)].append((when(line) - start, at, parts))
                continue
            m = re.search(r"(\w+) response from TxnCoordinator\S*: CONCURRENT_TRANSACTIONS", line)
            if m:
                concurrent[m.group(1)] += 1
    if not any(took.values()):
        sys.exit(f"no transactional calls in {path}: was it logged with librdkafka=debug and debug=eos?")
    for call in CALLS:
        spans = sorted(took[call], reverse=True)
        if not spans:
            continue
        ms = sorted(s * 1000 for s, _, _ in spans)

        def q(p):
            return ms[min(len(ms) - 1, round(p * (len(ms) - 1)))]

        slowest = ", ".join(f"{at} ({s * 1000:.0f} ms{parts})" for s, at, parts in spans[:4])
        print(f"{call}: {len(ms)} calls, p50 {q(0.5):.1f} ms, p90 {q(0.9):.1f}, p99 {q(0.99):.1f}, "
              f"slowest {ms[-1]:.1f}; the slowest called at {slowest}")
    answered = ", ".join(f"{req} {n}" for req, n in concurrent.most_common()) or "none"
    print(f"answered CONCURRENT_TRANSACTIONS: {answered}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
