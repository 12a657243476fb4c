#!/usr/bin/env bash
# Escalation rate across a long run with and without `classify --grow` (README, "Growing the
# index"). Banking77 (all splits): 10 exemplars per label form the index; the other rows, in a
# fixed random order (the file is sorted by label, which no production stream is), are
# classified in chunks of 1,000 with the loopback simulator as the LLM (true labels, no
# errors). Not run in CI: ~1 minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/semtel
W=out/growth; rm -rf "$W"; mkdir -p "$W"
python3 - "$W" <<'PY'
import json, sys, collections, random
w = sys.argv[1]
per = collections.Counter()
rest = []
with open(f"{w}/seed.jsonl", "w") as seed:
    for line in open("../shared/data/banking77/banking77.jsonl"):
        r = json.loads(line)
        row = json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) + "\n"
        if per[r["label"]] < 10:
            seed.write(row)
        else:
            rest.append(row)
        per[r["label"]] += 1
random.Random(0).shuffle(rest)
open(f"{w}/rest.jsonl", "w").writelines(rest)
PY
$B -q llm simulate --truth "$W/rest.jsonl" --port 0 --latency-ms 50 --jitter-ms 10 > "$W/sim.log" 2>&1 &
SIM=$!; trap 'kill $SIM' EXIT
for _ in $(seq 100); do grep -q listening "$W/sim.log" && break; sleep 0.2; done
URL=$(grep -o 'http://127.0.0.1:[0-9]*[^ ]*' "$W/sim.log" | head -1)
cat > "$W/llm.toml" <<TOML
cache = "off"
[[endpoints]]
name = "sim"
url = "$URL"
model = "simulated"
price_in_per_1k = 0.00015
price_out_per_1k = 0.0006
TOML
for mode in plain grow; do
  $B -q index build --exemplars "$W/seed.jsonl" --out "$W/idx-$mode" --overwrite
  extra=(); [ $mode = grow ] && extra=(--grow)
  echo "== $mode"
  $B -q classify --index "$W/idx-$mode" --input "$W/rest.jsonl" --output "$W/$mode.jsonl" \
    --llm "$W/llm.toml" --chunk-rows 1000 --json "${extra[@]}" \
    | python3 -c "import sys,json; s=json.loads(sys.stdin.read().strip().splitlines()[-1]); print('rows', s['rows_written'], 'llm-labelled', s['llm']['rows_labelled'], 'calls', s['llm']['calls'], 'escalation by chunk', [round(x, 2) for x in s['escalation_by_chunk']])"
done
