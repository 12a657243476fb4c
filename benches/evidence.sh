#!/usr/bin/env bash
# Reproduces the accuracy evidence of the README (index from train, thresholds chosen without
# the test split, figures on the test split). Not run in CI: ~15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
S=../shared/data
B=target/release/semtel
mkdir -p idx out/reports
run() { echo; echo "\$ $*"; "$@"; }
# Banking77: cross-validated calibration over the exemplars.
run $B -q index build --exemplars $S/banking77/banking77.jsonl --split train --out idx/banking77 --overwrite
run $B -q calibrate --index idx/banking77
run $B eval --index idx/banking77 --input $S/banking77/banking77.jsonl --split test
# CLINC150 intents (with oos) and domains: calibrated on the validation split.
run $B -q index build --exemplars $S/clinc150/clinc150.jsonl --split train --out idx/clinc150 --overwrite
run $B -q calibrate --index idx/clinc150 --labelled $S/clinc150/clinc150.jsonl --split validation
run $B eval --index idx/clinc150 --input $S/clinc150/clinc150.jsonl --split test --report-label oos
run $B -q index build --exemplars $S/clinc150/clinc150.jsonl --split train --label-col domain --out idx/clinc150-domain --overwrite
run $B -q calibrate --index idx/clinc150-domain --labelled $S/clinc150/clinc150.jsonl --split validation --label-col domain
run $B eval --index idx/clinc150-domain --input $S/clinc150/clinc150.jsonl --split test --label-col domain --report-label oos
# SGD: dialogue domain (first domain) and all domains as multi-label.
run $B -q index build --exemplars $S/sgd/sgd_dialogues.jsonl.gz --split train --out idx/sgd --overwrite
run $B -q calibrate --index idx/sgd
run $B eval --index idx/sgd --input $S/sgd/sgd_dialogues.jsonl.gz --split test
run $B -q index build --exemplars $S/sgd/sgd_dialogues.jsonl.gz --split train --label-col domains --multi-label --out idx/sgd-domains --overwrite
run $B eval --index idx/sgd-domains --input $S/sgd/sgd_dialogues.jsonl.gz --split test --label-col domains
# Accuracy versus cost (oracle LLM at 95 %).
run $B -q bench accuracy-cost --index idx/banking77 --input $S/banking77/banking77.jsonl --split test --llm oracle:0.95 --out out/reports/banking77 --set "Banking77 test"
run $B -q bench accuracy-cost --index idx/clinc150 --input $S/clinc150/clinc150.jsonl --split test --llm oracle:0.95 --out out/reports/clinc150 --set "CLINC150 test (with oos)"
