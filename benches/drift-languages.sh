#!/usr/bin/env bash
# Languages the exemplars never had (issue 35's second scenario): xSID, a multilingual-e5-small
# index of the 300 English `valid` rows, calibrated; the traffic is every language's `test`
# split (500 rows each, Japanese 250) in one seeded shuffle. Runs classify with the simulated
# LLM (5 % errors, --error-model confusable unless ERRORS=uniform) under: guards off (kept on
# the English calibration), guards on (languages the exemplars do not cover on probation), and
# guards on + audit 2 %; each also with --grow when GROW=1. Prints, per language, the share of
# rows kept and their accuracy, and the LLM rows spent.
#   benches/drift-languages.sh [WORKDIR]   (needs target/release/semtel and models/)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/semtel-drift-lang}"
mkdir -p "$W"
BIN=target/release/semtel
MODEL=models/multilingual-e5-small
ERRORS="${ERRORS:-confusable}"
zcat data/xsid/xsid.jsonl.gz > "$W/xsid.jsonl"
python3 - "$W" <<'PY'
import json, random, sys
w = sys.argv[1]
rows = [json.loads(l) for l in open(f"{w}/xsid.jsonl")]
with open(f"{w}/exemplars.jsonl", "w") as f:
    for r in rows:
        if r["lang"] == "en" and r["split"] == "valid":
            f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) + "\n")
test = [r for r in rows if r["split"] == "test"]
random.Random(21).shuffle(test)
with open(f"{w}/stream.jsonl", "w") as f:
    for r in test:
        f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"], "xlang": r["lang"]}) + "\n")
PY
[ -d "$W/idx" ] || $BIN -q --model "$MODEL" index build --exemplars "$W/exemplars.jsonl" --out "$W/idx"
$BIN -q calibrate --index "$W/idx" 2>&1 | grep -E "chosen|kept-accuracy" | head -3
. benches/sim.sh
start_sim --model "$MODEL" --truth "$W/xsid.jsonl" --port 0 --error-rate 0.05 \
  --error-model "$ERRORS" --latency-ms 20 --jitter-ms 5 --seed 1
run() {
  local name=$1; shift
  local idx="$W/idx"
  if [ -n "${GROW:-}" ]; then rm -rf "$W/idx-$name"; cp -r "$W/idx" "$W/idx-$name"; idx="$W/idx-$name"; fi
  $BIN -q classify --index "$idx" --input "$W/stream.jsonl" --output "$W/$name.jsonl" \
    --passthrough label --llm "$W/llm.toml" --overwrite ${GROW:+--grow} "$@" >/dev/null 2>"$W/$name.log"
  python3 - "$W" "$name" <<'PY'
import json, sys, collections
w, name = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{w}/{name}.jsonl")]
by = collections.defaultdict(list)
for r in rows:
    by[r["id"].split(":")[0]].append(r)
def line(tag, rs):
    kept = [r for r in rs if r["decided_by"] == "knn"]
    ok = sum(r["label"] == r["input_label"] for r in kept)
    llm = sum(r["decided_by"] == "llm" for r in rs) + sum(r.get("audit") is not None for r in rs)
    acc = 100 * ok / len(kept) if kept else float("nan")
    return f"{tag} {100*len(kept)/len(rs):.0f}% at {acc:.1f}% ({llm} LLM)"
worst = min(((sum(r["label"] == r["input_label"] for r in rs if r["decided_by"] == "knn") /
              sum(r["decided_by"] == "knn" for r in rs)), l) for l, rs in by.items()
            if any(r["decided_by"] == "knn" for r in rs))
thirds = []
for t in range(3):
    part = [r for r in rows[t * len(rows) // 3:(t + 1) * len(rows) // 3] if not r["id"].startswith("en:")]
    kept = [r for r in part if r["decided_by"] == "knn"]
    ok = sum(r["label"] == r["input_label"] for r in kept)
    thirds.append(f"{100*len(kept)/len(part):.0f}% at {100*ok/max(1,len(kept)):.1f}%")
print(f"| {name} | {line('all', rows)} | worst {worst[1]} {100*worst[0]:.1f}% | " +
      " → ".join(thirds) + " | " + " · ".join(line(l, by[l]) for l in sorted(by)) + " |")
PY
}
echo "| run | all traffic: kept at kept-accuracy (LLM rows) | worst language | non-English rows kept, by third of the stream | per language |"
echo "|---|---|---|---|---|"
run guards-off --guards off
run guards-on
run audit-2pct --audit-rate 0.02 --audit-seed 1
