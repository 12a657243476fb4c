"""Which novelty score separates rows of labels the index never saw? (issue: trust off the
exemplars' distribution; the choice is made again in the product by `semtel calibrate`.)

On `semtel embed` vectors of a labelled set with a train and a test split: a seeded random 10
labels are left out of the exemplars (train rows of the other labels), and every test row is
scored against them. Candidates (each "higher = more novel"):

- `top1`: 1 − cosine of the nearest exemplar;
- `label`: 1 − cosine of the nearest exemplar *of the voted label*;
- `meank`: 1 − mean cosine of the k = 10 nearest;
- `label_conformal`: `label`, turned into a p-value against that label's own exemplars
  (leave-one-out nearest same-label cosine), so tight and loose labels are compared fairly;
- `vote`: 1 − the vote share × top-1 cosine (the default confidence signal, for reference);
- `maha`: Mahalanobis distance to the voted label's mean (shared covariance, Ledoit-Wolf).

Printed per score: AUROC (absent-label rows against seen-label rows) and, at the threshold that
flags 5 % of *exemplars* in leave-labels-out cross-validation on the train split (what the
product can do without the test split), the share of seen and of absent test rows flagged.

    semtel embed --input ../shared/data/banking77/banking77.jsonl --label-col label \\
                 --output /tmp/b77.parquet
    python3 benches/novelty_scores.py /tmp/b77.parquet [--seed 7]

Needs numpy and pyarrow. Row ids must read `<set>-<split>-<n>` (the shared sets' ids).
"""
import sys
import numpy as np
import pyarrow.parquet as pq

K = 10
FEATS = ["top1", "label", "meank", "vote"]


def auroc(neg, pos):
    allv = np.concatenate([neg, pos])
    ranks = allv.argsort().argsort() + 1
    rp = ranks[len(neg):].sum()
    return (rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def knn(q, x, k=K):
    s = q @ x.T
    idx = np.argpartition(-s, k, axis=1)[:, :k]
    sims = np.take_along_axis(s, idx, 1)
    order = np.argsort(-sims, 1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(sims, order, 1), s


def scores(q, x, y, n_labels, loo=None):
    """Every candidate score of queries q against exemplars (x, y)."""
    idx, sims, full = knn(q, x)
    if loo is not None:  # queries are the exemplars themselves: drop self-matches
        full[np.arange(len(q)), loo] = -2
        idx, sims, _ = knn(q, x, K + 1)
        keep = idx != loo[:, None]
        idx = np.array([r[k][:K] for r, k in zip(idx, keep)])
        sims = np.array([r[k][:K] for r, k in zip(sims, keep)])
    votes = np.zeros((len(q), n_labels))
    for j in range(K):
        np.add.at(votes, (np.arange(len(q)), y[idx[:, j]]), np.maximum(sims[:, j], 0))
    lab = votes.argmax(1)
    share = votes.max(1) / np.maximum(votes.sum(1), 1e-9)
    same = np.where(y[None, :] == lab[:, None], full, -2).max(1)
    return {
        "top1": 1 - sims[:, 0],
        "label": 1 - same,
        "meank": 1 - sims.mean(1),
        "vote": 1 - share * np.maximum(sims[:, 0], 0),
    }, lab, same


def main():
    path = sys.argv[1]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 7
    t = pq.read_table(path).to_pydict()
    ids = t["id"]
    vec = np.array(t["vector"], dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    labels = t["label"]
    names = sorted(set(labels))
    y_all = np.array([names.index(l) for l in labels])
    split = np.array([i.split("-")[1] for i in ids])
    rng = np.random.default_rng(seed)
    absent = set(rng.choice(len(names), 10, replace=False).tolist())
    seen = np.array([c not in absent for c in y_all])
    tr = (split == "train") & seen
    te = split == "test"
    x, y = vec[tr], y_all[tr]
    n = len(names)
    sc, lab, same = scores(vec[te], x, y, n)
    is_absent = ~seen[te]
    # Per-label conformal calibration: leave-one-out nearest same-label cosine of exemplars.
    _, _, full = knn(x, x)
    np.fill_diagonal(full, -2)
    loo_same = np.where(y[None, :] == y[:, None], full, -2).max(1)
    per_label = {c: np.sort(1 - loo_same[y == c]) for c in range(n) if (y == c).any()}
    # Share of the voted label's exemplars that are nearer their own label than this row is.
    sc["label_conformal"] = np.array([
        np.searchsorted(per_label[c], s, side="left") / len(per_label[c]) if c in per_label else 0.5
        for c, s in zip(lab, sc["label"])
    ])
    # Mahalanobis to the voted label's mean.
    means = np.stack([x[y == c].mean(0) if (y == c).any() else np.zeros(x.shape[1]) for c in range(n)])
    r = x - means[y]
    cov = r.T @ r / len(r)
    mu = np.trace(cov) / cov.shape[0]
    shrink = 0.1
    prec = np.linalg.inv((1 - shrink) * cov + shrink * mu * np.eye(cov.shape[0]))
    dq = vec[te] - means[lab]
    sc["maha"] = np.einsum("ij,jk,ik->i", dq, prec, dq)
    # Leave-labels-out thresholds on the exemplars: hide 20 % of the seen labels per fold.
    seen_labels = sorted(set(y.tolist()))
    folds = 5
    perm = rng.permutation(seen_labels)
    cv = {k: [] for k in sc}
    feats_cv, nov_cv = [], []
    for f in range(folds):
        hide = set(perm[f::folds].tolist())
        known = ~np.isin(y, list(hide))
        # Seen-label queries: a hash-chosen fifth of the known exemplars, left out of x.
        q_seen = known & (np.arange(len(y)) % 5 == f)
        base = known & ~q_seen
        s2, lab2, _ = scores(x[q_seen], x[base], y[base], n)
        for k in s2:
            cv[k].extend(s2[k].tolist())
        s3, _, _ = scores(x[~known], x[base], y[base], n)
        feats_cv.append(np.stack([s2[k] for k in FEATS], 1))
        nov_cv.append(np.zeros(len(s2["top1"])))
        feats_cv.append(np.stack([s3[k] for k in FEATS], 1))
        nov_cv.append(np.ones(len(s3["top1"])))
    # A logistic model of novelty on the kNN features, learned from the hidden labels' rows.
    F = np.concatenate(feats_cv)
    Y = np.concatenate(nov_cv)
    mu_f, sd_f = F.mean(0), F.std(0) + 1e-9
    Z = (F - mu_f) / sd_f
    w = np.zeros(Z.shape[1])
    b = 0.0
    for _ in range(2000):
        p_ = 1 / (1 + np.exp(-(Z @ w + b)))
        g = p_ - Y
        w -= 0.1 * (Z.T @ g / len(Y) + 1e-3 * w)
        b -= 0.1 * g.mean()
    Zt = (np.stack([sc[k] for k in FEATS], 1) - mu_f) / sd_f
    sc["learned"] = Zt @ w + b
    cv["learned"] = (Z[Y == 0] @ w + b).tolist()
    print(f"{path}: {len(names)} labels, absent {sorted(names[a] for a in absent)}")
    print(f"test rows: {te.sum()} ({is_absent.mean():.1%} of absent labels)")
    print("| score | AUROC | threshold (5 % of exemplars in CV) | seen test rows flagged | absent test rows flagged |")
    print("|---|---|---|---|---|")
    for k, v in sc.items():
        a = auroc(v[~is_absent], v[is_absent])
        if k in cv and cv[k]:
            thr = np.quantile(cv[k], 0.95)
            print(f"| {k} | {a:.3f} | {thr:.3f} | {(v[~is_absent] > thr).mean():.1%} | {(v[is_absent] > thr).mean():.1%} |")
        else:
            thr = np.quantile(v[~is_absent], 0.95)
            print(f"| {k} | {a:.3f} | (test 95 %) | 5.0% | {(v[is_absent] > thr).mean():.1%} |")


    # Together with the confidence rule: the vote_sim threshold that keeps 97 % right in
    # leave-one-out over the exemplars, then each novelty cut from the CV scores.
    _, lab_loo, _ = scores(x, x, y, n, loo=np.arange(len(x)))
    conf_loo = 1 - scores(x, x, y, n, loo=np.arange(len(x)))[0]["vote"]
    order = np.argsort(-conf_loo)
    acc = np.cumsum((lab_loo == y)[order]) / np.arange(1, len(y) + 1)
    ok = np.where(acc >= 0.97)[0]
    cthr = conf_loo[order][ok.max()] if len(ok) else np.inf
    conf = 1 - sc["vote"]
    right = lab == y_all[te]
    print(f"\nconfidence threshold (vote_sim, 97 % in leave-one-out): {cthr:.3f}")
    print("| novelty score | share of exemplars flagged in CV | seen rows kept | absent rows kept | kept accuracy, all traffic |")
    print("|---|---|---|---|---|")
    for k in ["top1", "label", "learned"]:
        for a in [0.0, 0.02, 0.05, 0.1, 0.2]:
            thr = np.quantile(cv[k], 1 - a) if a > 0 else np.inf
            kept = (conf >= cthr) & (sc[k] <= thr)
            print(f"| {k} | {a:.0%} | {kept[~is_absent].mean():.1%} | {kept[is_absent].mean():.1%} | {right[kept].mean():.1%} |")


if __name__ == "__main__":
    main()
