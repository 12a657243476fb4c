#!/usr/bin/env bash
# GPU benchmark, run from the repo root on the GPU machine with `gpu/` carried:
#   gpu/semtel.xz (benches/gpu/build-cuda.sh), gpu/minilm-f16/ (the default model with f16
#   weights), gpu/texts.jsonl (`semtel bench embed --save-texts gpu/texts.jsonl` on the CPU box:
#   the same 2,000 texts) and gpu/banking77/banking77.jsonl. Needs python3 with torch and
#   sentence-transformers there. Not run in CI.
set -x
libs=$(for l in libcublas.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  find /opt /usr -name "$l" 2>/dev/null | head -1; done | xargs -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
xz -dkf gpu/semtel.xz && chmod +x gpu/semtel
B=gpu/semtel; M="--model gpu/minilm-f16 --device cuda"
# semtel f16 (default on CUDA) against sentence-transformers in one invocation, then f32.
$B $M bench embed --texts-file gpu/texts.jsonl --engines candle --repeats 7 \
  --st python3 --st-dtypes f32,f16 --st-batch-size 512
$B $M --gpu-f32 bench embed --texts-file gpu/texts.jsonl --engines candle --repeats 7
# sentence-transformers at other batch sizes (its best setting varies run to run).
for bs in 128 256 1024; do
  python3 benches/st_embed.py gpu/texts.jsonl gpu/minilm-f16 --device cuda --repeats 7 --batch-size $bs --dtypes f16,f32
done
# Agreement of f16 with f32 on the GPU, and Banking77 accuracy through the GPU path.
$B $M -q embed --input gpu/texts.jsonl --output /tmp/v16.parquet
$B $M --gpu-f32 -q embed --input gpu/texts.jsonl --output /tmp/v32.parquet
python3 - <<'PY'
import pyarrow.parquet as pq, numpy as np
a, b = pq.read_table("/tmp/v16.parquet"), pq.read_table("/tmp/v32.parquet")
va = np.stack(a["vector"].to_numpy(zero_copy_only=False)); vb = np.stack(b["vector"].to_numpy(zero_copy_only=False))
c = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
print(f"f16 vs f32 on CUDA, {len(c)} texts: min cosine {c.min():.6f}, NaN {np.isnan(va).sum()}")
PY
$B $M -q index build --exemplars gpu/banking77/banking77.jsonl --split train --out /tmp/idx --overwrite
$B $M eval --index /tmp/idx --input gpu/banking77/banking77.jsonl --split test | head -8
