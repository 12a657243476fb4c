#!/usr/bin/env bash
# `semtel discover` measured (issue 31). Prints one line per measurement:
#   1. recovery of absent labels: Banking77 and CLINC150 indexes built with a seeded 10 labels
#      left out (seeds 7, 8, 9), the test split classified (no LLM: rows the index does not keep
#      escalate), discover on the escalated rows with the simulator as LLM. A label is recovered
#      when a cluster with purity >= 0.8 holds >= 50 % of that label's escalated rows and is
#      named with that label. Median over seeds.
#   1b. the same with volume: the absent labels' train rows join the traffic (a new topic
#      arriving with a hundred or more conversations, not the test split's 30-40).
#   2. from scratch: CLINC150 test (5,500 rows, gold intents incl. oos) clustered without an
#      index; NMI and ARI against the gold intents, for semtel and for BERTopic's clustering
#      (BERTopic 0.17 with its defaults on the same vectors: UMAP to 5 dimensions, HDBSCAN
#      min_cluster_size 10) in the same run.
#   3. scale: clustering 50k / 100k / 200k vectors (real conversations' vectors, repeated with
#      small jitter), against the time embedding as many rows takes here.
#   benches/discover.sh [WORKDIR]   (needs target/release/semtel, models/, and $PY: a python
#   with numpy, scikit-learn, pyarrow, umap-learn and bertopic; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/semtel-discover}"
mkdir -p "$W"
BIN=target/release/semtel
PY="${PY:-python3}"

for ds in banking77 clinc150; do
  grep '"split": "test"' "../shared/data/$ds/$ds.jsonl" > "$W/$ds-test.jsonl"
  [ -f "$W/$ds-test.parquet" ] || $BIN -q embed --input "$W/$ds-test.jsonl" --output "$W/$ds-test.parquet"
done

echo "## 1. recovery of 10 absent labels (min_conversations 20)"
$BIN llm simulate --truth ../shared/data/banking77/banking77.jsonl --port 0 --seed 1 > "$W/sim-b77.log" 2>&1 &
S1=$!
$BIN llm simulate --truth ../shared/data/clinc150/clinc150.jsonl --port 0 --seed 1 > "$W/sim-clinc.log" 2>&1 &
S2=$!
trap 'kill $S1 $S2 2>/dev/null || true' EXIT
for f in "$W/sim-b77.log" "$W/sim-clinc.log"; do
  for _ in $(seq 50); do grep -q listening "$f" && break; sleep 0.2; done
done
cfg() { printf 'cache = "off"\n[[endpoints]]\nname = "sim"\nurl = "%s"\nmodel = "sim-1"\nprice_in_per_1k = 0.00015\nprice_out_per_1k = 0.0006\n' "$(awk '/listening/ {print $3}' "$1")" > "$2"; }
cfg "$W/sim-b77.log" "$W/llm-banking77.toml"
cfg "$W/sim-clinc.log" "$W/llm-clinc150.toml"
for ds in banking77 clinc150; do
  for seed in 7 8 9; do
    D="$W/$ds-absent-$seed"; mkdir -p "$D"
    $PY - "../shared/data/$ds/$ds.jsonl" "$D" "$seed" <<'PY'
import json, random, sys
data, d, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(data)]
labels = sorted({r["label"] for r in rows} - {"oos"})
absent = set(random.Random(seed).sample(labels, 10))
json.dump(sorted(absent), open(f"{d}/absent.json", "w"))
with open(f"{d}/exemplars.jsonl", "w") as f:
    for r in rows:
        if r["split"] == "train" and r["label"] not in absent:
            f.write(json.dumps(r) + "\n")
PY
    [ -d "$D/idx" ] || $BIN -q index build --exemplars "$D/exemplars.jsonl" --out "$D/idx" > /dev/null 2>&1
    $BIN -q classify --index "$D/idx" --input "$W/$ds-test.jsonl" --output "$D/classified.jsonl" --overwrite > /dev/null 2>&1 || true
    $BIN -q discover --input "$W/$ds-test.jsonl" --vectors "$W/$ds-test.parquet" --index "$D/idx" \
      --escalated-from "$D/classified.jsonl" --llm "$W/llm-$ds.toml" --out "$D/found" --json > "$D/found.json" 2>/dev/null
    $PY benches/discover/recovery.py "$D" "$W/$ds-test.jsonl" "$ds" "$seed" found
  done
done

echo "## 1b. the same with volume: traffic = test split + the absent labels' train rows"
for ds in banking77 clinc150; do
  for seed in 7 8 9; do
    D="$W/$ds-absent-$seed"
    $PY - "../shared/data/$ds/$ds.jsonl" "$D" <<'PY'
import json, sys
data, d = sys.argv[1], sys.argv[2]
absent = set(json.load(open(f"{d}/absent.json")))
with open(f"{d}/traffic.jsonl", "w") as f:
    for l in open(data):
        r = json.loads(l)
        if r["split"] == "test" or (r["split"] == "train" and r["label"] in absent):
            f.write(json.dumps(r) + "\n")
PY
    $BIN -q classify --index "$D/idx" --input "$D/traffic.jsonl" --output "$D/traffic-out.jsonl" --overwrite > /dev/null 2>&1 || true
    $BIN -q discover --input "$D/traffic.jsonl" --vectors "$W/$ds-test.parquet" --index "$D/idx" \
      --escalated-from "$D/traffic-out.jsonl" --llm "$W/llm-$ds.toml" --out "$D/vol" --json > "$D/vol.json" 2>/dev/null
    $PY benches/discover/recovery.py "$D" "$D/traffic.jsonl" "$ds" "$seed" vol
  done
done

echo "## 2. from scratch: CLINC150 test, semtel vs BERTopic's clustering on the same vectors"
/usr/bin/time -f "semtel discover: %e s wall, %M KB max RSS" $BIN -q discover --input "$W/clinc150-test.jsonl" \
  --vectors "$W/clinc150-test.parquet" --out "$W/scratch" --min-conversations 10 --json > "$W/scratch.json"
$PY - "$W" <<'PY'
import json, sys, time
import numpy as np, pyarrow.parquet as pq
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
w = sys.argv[1]
t = pq.read_table(f"{w}/clinc150-test.parquet")
ids = t.column("id").to_pylist()
x = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
rows = [json.loads(l) for l in open(f"{w}/clinc150-test.jsonl")]
gold_by = {v["id"]: v["label"] for v in rows}
text_by = {v["id"]: v["text"] for v in rows}
gold = [gold_by[i] for i in ids]
c = pq.read_table(f"{w}/scratch/clusters.parquet").to_pydict()
ours_by = dict(zip(c["id"], c["cluster"]))
ours = [ours_by[i] for i in ids]
r = json.load(open(f"{w}/scratch.json"))
def score(name, labels, secs):
    lab = np.array(labels)
    print(json.dumps({"method": name, "clusters": int(lab.max() + 1), "noise_share": round(float((lab < 0).mean()), 3),
        "nmi": round(normalized_mutual_info_score(gold, lab), 4), "ari": round(adjusted_rand_score(gold, lab), 4),
        "nmi_clustered_rows": round(normalized_mutual_info_score([g for g, l in zip(gold, lab) if l >= 0], lab[lab >= 0]), 4),
        "seconds": round(secs, 2)}))
score("semtel discover (min_cluster_size 10)", ours, r["seconds"]["cluster"])
from bertopic import BERTopic
t0 = time.perf_counter()
topics, _ = BERTopic(embedding_model=None, calculate_probabilities=False).fit_transform(
    [text_by[i] for i in ids], embeddings=x)
score("BERTopic defaults (UMAP 5-d + HDBSCAN mcs 10, on the same vectors)", topics, time.perf_counter() - t0)
PY

echo "## 3. scale"
if [ ! -f "$W/pool.parquet" ]; then
  $PY - "$W" <<'PY'
import json, sys, glob
w = sys.argv[1]
n = 0
with open(f"{w}/pool.jsonl", "w") as f:
    for path in sorted(glob.glob("../shared/data/*/*.jsonl")):
        for l in open(path):
            v = json.loads(l)
            t = v.get("text")
            if t is None:
                turns = v.get("turns") or v.get("messages") or []
                t = "\n".join(f"{x.get('role','')}: {x.get('content','')}" for x in turns if isinstance(x, dict))
            if t:
                f.write(json.dumps({"id": f"p{n}", "text": t}) + "\n"); n += 1
PY
  /usr/bin/time -f "embedding the pool: %e s" $BIN -q embed --input "$W/pool.jsonl" --output "$W/pool.parquet"
fi
for n in 50000 100000 200000; do
  [ -f "$W/scale-$n.parquet" ] || $PY - "$W" $n <<'PY'
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
w, n = sys.argv[1], int(sys.argv[2])
t = pq.read_table(f"{w}/pool.parquet")
x = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
rng = np.random.default_rng(n)
y = x[np.arange(n) % len(x)] + rng.normal(0, 0.02, (n, x.shape[1])).astype(np.float32)
y /= np.linalg.norm(y, axis=1, keepdims=True)
ids = [f"r{i}" for i in range(n)]
pq.write_table(pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), x.shape[1])}), f"{w}/scale-{n}.parquet")
with open(f"{w}/scale-{n}.jsonl", "w") as f:
    for i in ids: f.write('{"id": "%s", "text": "row %s"}\n' % (i, i))
PY
  /usr/bin/time -f "  $n rows: %e s wall, %M KB max RSS" $BIN -q discover --input "$W/scale-$n.jsonl" --vectors "$W/scale-$n.parquet" \
    --out "$W/scale-out-$n" --json > "$W/scale-$n.json"
  $PY -c "import json; r=json.load(open('$W/scale-$n.json')); print(f\"  {r['rows_clustered']} rows: clustering {r['seconds']['cluster']:.1f} s (read {r['seconds']['read_and_embed']:.1f} s), {len(r['clusters'])} clusters, {100*r['noise_rows']/r['rows_clustered']:.1f} % noise\")"
done
