#!/usr/bin/env python3
"""Oracle check of the stitching: connected components computed by networkx over the same events must equal
the identifier -> profile mapping exported by `stitcher export` (run with guardrails off).

usage: oracle.py EVENTS.jsonl EXPORT.jsonl
  EVENTS.jsonl  one event per line: a JSON list of [type, value] pairs, normalised as the service does
  EXPORT.jsonl  `stitcher export --state-dir DIR`: {"type", "value", "profile_id"} per line
Exit status 0 when the two partitions of the identifiers are identical, 1 otherwise.
"""
import json
import sys

import networkx as nx


def main(events_path, export_path):
    g = nx.Graph()
    events = 0
    with open(events_path) as f:
        for line in f:
            ids = [tuple(x) for x in json.loads(line)]
            if not ids:
                continue
            events += 1
            g.add_nodes_from(ids)
            g.add_edges_from(zip(ids, ids[1:]))
    truth = {frozenset(c) for c in nx.connected_components(g)}

    profiles = {}
    with open(export_path) as f:
        for line in f:
            r = json.loads(line)
            profiles.setdefault(r["profile_id"], set()).add((r["type"], r["value"]))
    ours = {frozenset(c) for c in profiles.values()}

    only_nx = truth - ours
    only_ours = ours - truth
    print(f"oracle: {events} events, {g.number_of_nodes()} identifiers; networkx {len(truth)} components, "
          f"stitcher {len(ours)} profiles; differing: {len(only_nx)} vs {len(only_ours)}")
    for c in list(only_nx)[:3]:
        print("  only in networkx:", sorted(c)[:8])
    for c in list(only_ours)[:3]:
        print("  only in stitcher:", sorted(c)[:8])
    return 0 if not only_nx and not only_ours else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
