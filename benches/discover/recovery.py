#!/usr/bin/env python3
"""Scores one `semtel discover` run for recovery of the labels an index lacks (benches/discover.sh).

  recovery.py RUN_DIR TRAFFIC.jsonl SET SEED OUT_NAME

RUN_DIR holds absent.json (the labels left out) and OUT_NAME.json (discover's --json summary)
beside OUT_NAME/clusters.parquet; TRAFFIC.jsonl is the input with gold labels. A label is
recovered when a cluster at least 80 % pure holds at least half of that label's clustered
(escalated) rows and is named with that label. Prints one JSON line.
"""
import collections
import json
import sys

import pyarrow.parquet as pq

d, traffic, ds, seed, name = sys.argv[1:6]
absent = set(json.load(open(f"{d}/absent.json")))
gold = {json.loads(l)["id"]: json.loads(l)["label"] for l in open(traffic)}
r = json.load(open(f"{d}/{name}.json"))
c = pq.read_table(f"{d}/{name}/clusters.parquet").to_pydict()
esc = collections.Counter(gold[i] for i in c["id"])
by = collections.defaultdict(collections.Counter)
for i, k in zip(c["id"], c["cluster"]):
    by[k][gold[i]] += 1
names = {x["cluster"]: x["name"] for x in r["clusters"]}
rec = set()
for k, cnt in by.items():
    if k < 0:
        continue
    lab, n = cnt.most_common(1)[0]
    if lab in absent and n / sum(cnt.values()) >= 0.8 and n >= 0.5 * esc[lab] and names.get(k) == lab:
        rec.add(lab)
new = [x for x in r["clusters"] if x["status"] == "new"]
print(json.dumps({
    "set": ds, "seed": int(seed), "escalated_rows": r["rows_clustered"],
    "absent_rows_escalated": sum(esc[a] for a in absent), "clusters": len(r["clusters"]),
    "noise_share": round(r["noise_rows"] / max(1, r["rows_clustered"]), 3),
    "recovered": len(rec),
    "absent_named_anywhere": len(absent & {x["name"] for x in r["clusters"]}),
    "new_clusters": len(new), "new_not_absent": sum(x["name"] not in absent for x in new),
    "llm_calls": r["llm"]["calls"] if r["llm"] else 0,
    "cost_usd": round(r["llm"]["cost_usd"], 4) if r["llm"] else 0.0,
    "seconds": round(r["seconds"]["total"], 1),
}))
