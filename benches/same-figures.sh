#!/usr/bin/env bash
# Checks that two semtel builds give the same figures: builds and calibrates Banking77 and
# CLINC150 indexes with each binary and diffs `eval --json` on the test splits (thresholds from
# cross-validation for Banking77, from the validation split for CLINC150).
#   benches/same-figures.sh OLD_BINARY NEW_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
S=../shared/data
old=$1 new=$2
out=out/same-figures
mkdir -p $out
for tag in old new; do
  B=${!tag}
  $B -q index build --exemplars $S/banking77/banking77.jsonl --split train --out $out/b77-$tag --overwrite
  $B -q calibrate --index $out/b77-$tag
  $B -q eval --index $out/b77-$tag --input $S/banking77/banking77.jsonl --split test --json > $out/b77-$tag.json
  $B -q index build --exemplars $S/clinc150/clinc150.jsonl --split train --out $out/clinc-$tag --overwrite
  $B -q calibrate --index $out/clinc-$tag --labelled $S/clinc150/clinc150.jsonl --split validation
  $B -q eval --index $out/clinc-$tag --input $S/clinc150/clinc150.jsonl --split test --report-label oos --json > $out/clinc-$tag.json
done
for set in b77 clinc; do
  python3 - "$out/$set-old.json" "$out/$set-new.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def at(r, t): return next(x["coverage"] for x in r["at_target"] if abs(x["target"] - t) < 1e-9)
print(f"{sys.argv[1]}: accuracy {a['accuracy']:.4f} → {b['accuracy']:.4f}; kept at 97 %: {at(a, 0.97):.4f} → {at(b, 0.97):.4f}; "
      f"index thresholds keep {a['at_index_thresholds']['coverage']:.4f} → {b['at_index_thresholds']['coverage']:.4f}; identical JSON: {a == b}")
PY
done
