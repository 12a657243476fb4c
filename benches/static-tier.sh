#!/usr/bin/env bash
# The static-embedding tier beside the transformer (README, "Static tier"): distil, index and
# evaluate Banking77 and CLINC150, then embedding speed of both. Not run in CI: ~3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
S=../shared/data; B=target/release/semtel; M=models/minilm-static-256
run() { echo; echo "\$ $*"; "$@"; }
run $B -q static distill --out $M --dims 256 --corpus $S/banking77/banking77.jsonl --corpus $S/clinc150/clinc150.jsonl --split train
for set in banking77 clinc150; do
  run $B -q index build --model $M --exemplars $S/$set/$set.jsonl --split train --out idx/$set-static --overwrite
  run $B eval --model $M --index idx/$set-static --input $S/$set/$set.jsonl --split test | head -9
done
run $B bench embed --model $M --engines fast --repeats 3
run $B bench embed --engines fast --repeats 3
