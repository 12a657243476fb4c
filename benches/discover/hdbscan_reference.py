#!/usr/bin/env python3
"""Reference labels for semtel's HDBSCAN (src/cluster.rs) from scikit-learn on the same vectors.

Two uses:
  * `hdbscan_reference.py fixture OUT_DIR`: writes a seeded set of blobs (varying sizes and
    widths, plus uniform noise) and scikit-learn's labels for it; tests/discover.rs reads them.
  * `hdbscan_reference.py compare VECTORS.parquet LABELS.parquet [--min-cluster-size N]
    [--min-samples M]`: scikit-learn on `semtel embed` vectors, timed, and the adjusted Rand
    index against semtel's `clusters.parquet` (benches/discover.sh).

Needs numpy, scikit-learn >= 1.3 (and pyarrow for `compare`).
"""
import json
import sys
import time

import numpy as np
from sklearn.cluster import HDBSCAN
from sklearn.metrics import adjusted_rand_score


def fixture(out):
    rng = np.random.default_rng(20261207)
    dims = 16
    sizes = [420, 330, 260, 220, 180, 120, 70]
    widths = [0.6, 0.9, 0.5, 1.1, 0.7, 0.8, 0.4]
    rows = []
    for s, w in zip(sizes, widths):
        c = rng.uniform(-10, 10, dims)
        rows.append(c + rng.normal(0, w, (s, dims)))
    rows.append(rng.uniform(-12, 12, (200, dims)))
    x = np.concatenate(rows).astype(np.float32)
    x = x[rng.permutation(len(x))]
    mcs, ms = 20, 10
    labels = HDBSCAN(min_cluster_size=mcs, min_samples=ms).fit_predict(x)
    x.tofile(f"{out}/vectors.f32")
    with open(f"{out}/reference.json", "w") as f:
        json.dump({"dims": dims, "min_cluster_size": mcs, "min_samples": ms,
                   "tool": "scikit-learn HDBSCAN", "labels": labels.tolist()}, f)
    print(f"{len(x)} rows, {labels.max() + 1} clusters, {(labels < 0).sum()} noise")


def compare(vectors, labels, mcs, ms):
    import pyarrow.parquet as pq
    t = pq.read_table(vectors)
    x = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    ids = t.column("id").to_pylist()
    c = pq.read_table(labels)
    ours = dict(zip(c.column("id").to_pylist(), c.column("cluster").to_pylist()))
    t0 = time.perf_counter()
    ref = HDBSCAN(min_cluster_size=mcs, min_samples=ms).fit_predict(x)
    secs = time.perf_counter() - t0
    mine = np.array([ours.get(i, -1) if ours.get(i) is not None else -1 for i in ids])
    print(json.dumps({
        "rows": len(ids), "sklearn_seconds": round(secs, 2),
        "sklearn_clusters": int(ref.max() + 1), "sklearn_noise_share": float((ref < 0).mean()),
        "semtel_clusters": int(mine.max() + 1), "semtel_noise_share": float((mine < 0).mean()),
        "ari": float(adjusted_rand_score(ref, mine)),
        "ari_clustered_both": float(adjusted_rand_score(ref[(ref >= 0) & (mine >= 0)],
                                                        mine[(ref >= 0) & (mine >= 0)])),
    }, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "fixture":
        fixture(sys.argv[2])
    else:
        a = sys.argv[2:]
        mcs = int(a[a.index("--min-cluster-size") + 1]) if "--min-cluster-size" in a else 20
        ms = int(a[a.index("--min-samples") + 1]) if "--min-samples" in a else 10
        compare(a[0], a[1], mcs, ms)
