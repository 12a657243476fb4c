#!/usr/bin/env bash
# `semtel discover` measured (issue 31). Three parts, each printing a table row or JSON:
#   1. agreement with scikit-learn's HDBSCAN on the same vectors (Banking77 test, 3,080 rows,
#      MiniLM): adjusted Rand index and both times;
#   2. discovery: Banking77 with a seeded 10 of its 77 labels left out of the index (the
#      drift benchmark's split), the whole test split classified with the simulated LLM, then
#      discover on the rows the run escalated: how many absent labels come back as `new`
#      clusters named after them, how many `new` clusters are not an absent label;
#   3. scale: clustering time at 50k, 100k and 200k rows (vectors of real conversations from
#      Banking77, CLINC150, HH-RLHF and SGD, repeated with small jitter to reach the count).
#   benches/discover.sh [WORKDIR]   (needs target/release/semtel, models/, and a venv with
#   numpy, scikit-learn and pyarrow as $PY, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/semtel-discover}"
mkdir -p "$W"
BIN=target/release/semtel
PY="${PY:-python3}"
B77=../shared/data/banking77/banking77.jsonl

echo "## 1. semtel vs scikit-learn HDBSCAN (Banking77 test, min_cluster_size 20, min_samples 20)"
grep '"split": "test"' "$B77" > "$W/b77-test.jsonl"
[ -f "$W/b77-test.parquet" ] || $BIN -q embed --input "$W/b77-test.jsonl" --output "$W/b77-test.parquet"
/usr/bin/time -f "semtel discover: %e s, %M KB max RSS" $BIN -q discover --input "$W/b77-test.jsonl" \
  --vectors "$W/b77-test.parquet" --out "$W/cmp" --min-conversations 20 --json > "$W/cmp.json"
$PY benches/discover/hdbscan_reference.py compare "$W/b77-test.parquet" "$W/cmp/clusters.parquet" \
  --min-cluster-size 20 --min-samples 20
$PY - "$W/cmp/clusters.parquet" "$W/b77-test.jsonl" <<'PY'
import json, sys
import pyarrow.parquet as pq
from sklearn.metrics import adjusted_rand_score
c = pq.read_table(sys.argv[1]).to_pydict()
gold = {json.loads(l)["id"]: json.loads(l)["label"] for l in open(sys.argv[2])}
pairs = [(gold[i], k) for i, k in zip(c["id"], c["cluster"]) if k >= 0]
print(f"semtel clusters vs the 77 gold labels on clustered rows: ARI {adjusted_rand_score([p[0] for p in pairs], [p[1] for p in pairs]):.3f} ({len(pairs)} rows)")
PY

echo "## 2. discovery of labels the index lacks (10 absent, seeded)"
$PY - "$B77" "$W" <<'PY'
import json, random, sys
data, w = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(data)]
labels = sorted({r["label"] for r in rows})
absent = set(random.Random(7).sample(labels, 10))
json.dump(sorted(absent), open(f"{w}/absent.json", "w"))
with open(f"{w}/exemplars.jsonl", "w") as f:
    for r in rows:
        if r["split"] == "train" and r["label"] not in absent:
            f.write(json.dumps(r) + "\n")
PY
[ -d "$W/idx" ] || $BIN -q index build --exemplars "$W/exemplars.jsonl" --out "$W/idx"
$BIN llm simulate --truth "$B77" --port 0 --error-rate 0.05 --seed 1 > "$W/sim.log" 2>&1 &
SIM=$!
trap 'kill $SIM 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q listening "$W/sim.log" && break; sleep 0.2; done
URL=$(awk '/listening/ {print $3}' "$W/sim.log")
printf 'cache = "off"\n[[endpoints]]\nname = "sim"\nurl = "%s"\nmodel = "sim-1"\nprice_in_per_1k = 0.00015\nprice_out_per_1k = 0.0006\n' "$URL" > "$W/llm.toml"
$BIN -q classify --index "$W/idx" --input "$W/b77-test.jsonl" --output "$W/classified.jsonl" \
  --overwrite > /dev/null 2>&1 || true
for floor in 10 20; do
  $BIN -q discover --input "$W/b77-test.jsonl" --vectors "$W/b77-test.parquet" --index "$W/idx" \
    --escalated-from "$W/classified.jsonl" --llm "$W/llm.toml" --out "$W/found-$floor" \
    --min-conversations $floor --json > "$W/found-$floor.json"
  $PY - "$W/found-$floor.json" "$W/absent.json" $floor <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); absent = set(json.load(open(sys.argv[2])))
new = [c for c in r["clusters"] if c["status"] == "new"]
hit = {c["name"] for c in new if c["name"] in absent}
print(f"floor {sys.argv[3]}: {r['rows_clustered']} escalated rows clustered, {len(r['clusters'])} clusters, "
      f"{100*r['noise_rows']/max(1,r['rows_clustered']):.1f}% noise; new clusters {len(new)}, "
      f"absent labels found {len(hit)}/10 ({sorted(hit)}); new clusters that are not an absent label "
      f"{sum(c['name'] not in absent for c in new)}; looks_like {sum(c['status']=='looks_like' for c in r['clusters'])}; "
      f"LLM calls {r['llm']['calls']}, ${r['llm']['cost_usd']:.4f}; {r['seconds']['total']:.1f} s")
PY
done

echo "## 3. scale: clustering time by rows (2 threads)"
if [ ! -f "$W/pool.parquet" ]; then
  $PY - "$W" <<'PY'
import json, sys, glob
w = sys.argv[1]
with open(f"{w}/pool.jsonl", "w") as f:
    n = 0
    for path in glob.glob("../shared/data/*/*.jsonl"):
        for l in open(path):
            v = json.loads(l)
            t = v.get("text")
            if t is None and "turns" in v:
                t = "\n".join(x.get("content", "") for x in v["turns"])[:2000]
            if t is None and "messages" in v:
                t = "\n".join(x.get("content", "") for x in v["messages"])[:2000]
            if not t:
                continue
            f.write(json.dumps({"id": f"p{n}", "text": t}) + "\n"); n += 1
print(n, "pool rows")
PY
  $BIN -q embed --input "$W/pool.jsonl" --output "$W/pool.parquet"
fi
for n in 50000 100000 200000; do
  $PY - "$W" $n <<'PY'
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
w, n = sys.argv[1], int(sys.argv[2])
t = pq.read_table(f"{w}/pool.parquet")
x = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
rng = np.random.default_rng(n)
idx = np.arange(n) % len(x)
y = x[idx] + rng.normal(0, 0.01, (n, x.shape[1])).astype(np.float32)
y /= np.linalg.norm(y, axis=1, keepdims=True)
ids = [f"r{i}" for i in range(n)]
pq.write_table(pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), x.shape[1])}), f"{w}/scale-{n}.parquet")
with open(f"{w}/scale-{n}.jsonl", "w") as f:
    for i in ids: f.write('{"id": "%s", "text": "row %s"}\n' % (i, i))
PY
  $BIN -q discover --input "$W/scale-$n.jsonl" --vectors "$W/scale-$n.parquet" --out "$W/scale-out-$n" \
    --min-conversations 20 --json > "$W/scale-$n.json"
  $PY -c "import json,sys; r=json.load(open('$W/scale-$n.json')); print(f\"{r['rows_clustered']} rows: cluster {r['seconds']['cluster']:.1f} s, total {r['seconds']['total']:.1f} s, {len(r['clusters'])} clusters, {100*r['noise_rows']/r['rows_clustered']:.1f}% noise\")"
done
