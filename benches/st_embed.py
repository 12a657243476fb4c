"""sentence-transformers side of `semtel bench embed --st`: embeds the same texts with PyTorch
in f32 and bf16 and prints one JSON object per setting.

Usage: python benches/st_embed.py TEXTS.jsonl MODEL_DIR [--threads N] [--repeats R] [--dtypes f32,bf16]
                                  [--device cpu|cuda] [--batch-size B]
Each line of TEXTS.jsonl is {"text": ...}. Not run in CI; `benches/setup-st.sh` makes its venv.
"""
import argparse, json, time, statistics, resource

ap = argparse.ArgumentParser()
ap.add_argument("texts"); ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--dtypes", default="f32,bf16", help="any of f32, bf16, f16")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--out", default=None, help="write the bf16/f32 vectors here (.npy prefix)")
ap.add_argument("--max-tokens", type=int, default=256, help="token budget (semtel passes the model's own)")
a = ap.parse_args()

import torch
torch.set_num_threads(a.threads)
from sentence_transformers import SentenceTransformer

texts = [json.loads(l)["text"] for l in open(a.texts)]
def sync():
    # GPU work is asynchronous: a timing must wait for it to finish.
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()

for dt in a.dtypes.split(","):
    m = SentenceTransformer(a.model, device=a.device)
    m.max_seq_length = a.max_tokens
    if dt == "f32":
        m = m.to(torch.float32)  # a half-precision folder may load in half precision
    elif dt == "bf16":
        m = m.to(torch.bfloat16)
    elif dt == "f16":
        m = m.to(torch.float16)
    tok = m.tokenizer
    # The model's default prompt (E5's "query: ") is prepended by encode(): count it too.
    prompt = m.prompts.get(m.default_prompt_name, "") if getattr(m, "default_prompt_name", None) else ""
    real = sum(min(len(tok(prompt + t, add_special_tokens=True)["input_ids"]), a.max_tokens) for t in texts)
    m.encode(texts[:256], batch_size=a.batch_size)  # warm-up
    sync()
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            v = m.encode(texts, batch_size=a.batch_size, normalize_embeddings=True, convert_to_numpy=False)
        sync()
        times.append(time.perf_counter() - t0)
    if a.out:
        import numpy as np
        np.save(f"{a.out}.{dt}.npy", torch.stack(v).float().numpy())
    med = statistics.median(times)
    print(json.dumps({"engine": f"sentence-transformers {dt}" + ("" if a.device == "cpu" else f" on {a.device}, batch {a.batch_size}"), "texts": len(texts), "real_tokens": real,
                      "seconds": med, "runs": times, "texts_per_s": len(texts) / med,
                      "tokens_per_s": real / med,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
