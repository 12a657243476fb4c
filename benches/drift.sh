#!/usr/bin/env bash
# New topics arriving part-way (issue 35's first scenario): Banking77 with a seeded 10 of its 77
# labels left out of the index, the whole test split as traffic in a seeded order in which the
# absent labels' rows only start after the first third. Runs classify with the simulated LLM
# (5 % uniform errors) under: novelty off; novelty on (the default rate); novelty on + audit
# 2 % with guards. Prints kept share / kept-accuracy over all traffic, of seen-label rows, and
# the share of absent-label rows kept, plus LLM rows spent (escalations + audits).
#   benches/drift.sh [WORKDIR]        (needs target/release/semtel and models/)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/semtel-drift}"
mkdir -p "$W"
BIN=target/release/semtel
DATA=../shared/data/banking77/banking77.jsonl
python3 - "$DATA" "$W" <<'PY'
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
test = [r for r in rows if r["split"] == "test"]
random.Random(11).shuffle(test)
seen = [r for r in test if r["label"] not in absent]
new = [r for r in test if r["label"] in absent]
third = len(seen) // 3
rest = seen[third:] + new
random.Random(12).shuffle(rest)
with open(f"{w}/stream.jsonl", "w") as f:
    for r in seen[:third] + rest:
        f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) + "\n")
PY
[ -d "$W/idx" ] || $BIN -q index build --exemplars "$W/exemplars.jsonl" --out "$W/idx"
$BIN -q calibrate --index "$W/idx" 2>&1 | grep -E "chosen|novelty|leave-labels|other rates"
. benches/sim.sh
start_sim --truth "$DATA" --port 0 --error-rate 0.05 --seed 1
run() {
  local name=$1; shift
  $BIN -q classify --index "$W/idx" --input "$W/stream.jsonl" --output "$W/$name.jsonl" \
    --passthrough label --llm "$W/llm.toml" --overwrite "$@" >/dev/null 2>&1
  python3 - "$W" "$name" <<'PY'
import json, sys
w, name = sys.argv[1], sys.argv[2]
absent = set(json.load(open(f"{w}/absent.json")))
rows = [json.loads(l) for l in open(f"{w}/{name}.jsonl")]
kept = [r for r in rows if r["decided_by"] == "knn"]
ok = lambda rs: sum(r["label"] == r["input_label"] for r in rs)
seen = [r for r in rows if r["input_label"] not in absent]
seen_kept = [r for r in kept if r["input_label"] not in absent]
new = [r for r in rows if r["input_label"] in absent]
new_kept = [r for r in kept if r["input_label"] in absent]
llm = sum(r["decided_by"] == "llm" for r in rows) + sum(r.get("audit") is not None for r in rows)
novel = sum(r["escalate_reason"] == "novel" for r in rows)
guard = sum(r["escalate_reason"] == "guard" for r in rows)
print(f"| {name} | {100*len(kept)/len(rows):.1f}% | {100*ok(kept)/max(1,len(kept)):.1f}% | "
      f"{100*len(seen_kept)/len(seen):.1f}% at {100*ok(seen_kept)/max(1,len(seen_kept)):.1f}% | "
      f"{100*len(new_kept)/len(new):.1f}% | {novel} | {guard} | {llm} |")
PY
}
echo "| run | kept | kept-accuracy | seen-label rows kept | absent-label rows kept | novel | guard | LLM rows |"
echo "|---|---|---|---|---|---|---|---|"
[ -n "${ONLY_AUDIT:-}" ] || run novelty-off --novelty off
[ -n "${ONLY_AUDIT:-}" ] || run novelty-on
run audit-2pct --audit-rate 0.02 --audit-seed 1
run audit-5pct --audit-rate 0.05 --audit-seed 1
