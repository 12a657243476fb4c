"""Would a Gaussian (shared-covariance, Mahalanobis) head keep more rows at 97 %? (README, Encoders)

A class-conditional Gaussian with one shared covariance (linear discriminant analysis) is the
textbook out-of-distribution detector on sentence embeddings: a row far from every label's mean
in the covariance's metric is unlike any exemplar. CLINC150's `oos` rows are where semtel's
kept share is lost, so this compares, on the same `semtel embed` vectors (train split as
exemplars, test split scored):

- a softmax regression on the embedding alone (the product's head also sees word pieces, so its
  figures are higher; the comparison here is between heads on the same inputs),
- LDA: label means, within-label covariance with Ledoit-Wolf shrinkage to a scaled identity (no
  tuned constant), posterior softmax(-d²/2T) for temperatures T = 1, 3, 10 (the ceiling takes
  the best, which favours LDA),
- the kNN vote (k = 10, similarity-weighted),

each with and without removing the exemplars' mean vector (then re-normalising). Printed: accuracy,
the Mahalanobis distance's AUROC for `oos` rows (when the set has them) and the "ceiling": the
largest share of test rows that a threshold on the confidence, chosen on test itself, keeps at
97 % accuracy. Usage:

    semtel embed --model models/all-mpnet-base-v2 --input ../shared/data/clinc150/clinc150.jsonl \
                 --label-col label --output /tmp/clinc-mpnet.parquet
    python3 benches/gaussian_head.py /tmp/clinc-mpnet.parquet

Needs numpy and pyarrow. Row ids must read `<set>-<split>-<n>` (the shared sets' ids).
"""
import sys
import numpy as np
import pyarrow.parquet as pq


def softmax(z):
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def ceiling(conf, correct, target=0.97):
    order = np.argsort(-conf)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.where(running >= target)[0]
    return (ok.max() + 1) / len(order) if len(ok) else 0.0


def softmax_regression(x, y, n_labels, epochs=300, rate=0.5, decay=1e-4, scale=20.0):
    w = np.zeros((x.shape[1], n_labels))
    b = np.zeros(n_labels)
    onehot = np.eye(n_labels)[y]
    for _ in range(epochs):
        g = (softmax(scale * x @ w + b) - onehot) / len(x)
        w -= rate * (scale * x.T @ g + decay * w)
        b -= rate * g.sum(0)
    return lambda q: softmax(scale * q @ w + b)


def lda(x, y, n_labels):
    means = np.stack([x[y == c].mean(0) for c in range(n_labels)])
    r = x - means[y]
    n, d = r.shape
    s = r.T @ r / n
    mu = np.trace(s) / d
    # Ledoit-Wolf: the shrinkage that minimises the expected Frobenius error.
    d2 = ((s - mu * np.eye(d)) ** 2).sum()
    norms = (r ** 2).sum(1)
    b2 = (norms ** 2).sum() - 2 * np.einsum("ij,jk,ik->", r, s, r) + n * (s ** 2).sum()
    shrink = min(b2 / n ** 2, d2) / d2
    cov = (1 - shrink) * s + shrink * mu * np.eye(d)
    whiten = np.linalg.inv(np.linalg.cholesky(cov))
    m = means @ whiten.T

    def distances(q):
        z = q @ whiten.T
        return (z ** 2).sum(1)[:, None] - 2 * z @ m.T + (m ** 2).sum(1)[None]

    return distances, shrink


def knn(q, x, y, n_labels, k=10):
    sim = q @ x.T
    nn = np.argsort(-sim, 1)[:, :k]
    votes = np.zeros((len(q), n_labels))
    rows = np.arange(len(q))
    for j in range(k):
        np.add.at(votes, (rows, y[nn[:, j]]), np.maximum(sim[rows, nn[:, j]], 0))
    return votes / np.maximum(votes.sum(1, keepdims=True), 1e-12)


def main(path):
    t = pq.read_table(path).to_pydict()
    ids = t["id"]
    split = np.array([i.split("-")[1].replace("oos_", "") for i in ids])
    gold = np.array(t["label"])
    vectors = np.array(t["vector"], dtype=np.float64)
    train, test = split == "train", split == "test"
    names = sorted(set(gold[train]))
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index.get(g, -1) for g in gold])
    yt = y[test]
    oos = (gold[test] == "oos") if "oos" in index else None
    print(f"{path}: {train.sum()} exemplars, {test.sum()} test rows, {len(names)} labels")
    for centred in (False, True):
        x = vectors.copy()
        if centred:
            x -= x[train].mean(0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        head = softmax_regression(x[train], y[train], len(names))(x[test])
        vote = knn(x[test], x[train], y[train], len(names))
        distances, shrink = lda(x[train], y[train], len(names))
        d = distances(x[test])
        tag = "mean removed" if centred else "as is"
        for name, p in (("softmax head", head), ("kNN vote", vote)):
            pred = p.argmax(1)
            print(f"  {tag:12} {name:13} accuracy {(pred == yt).mean():.3f}  "
                  f"ceiling@97 {ceiling(p.max(1), pred == yt):.3f}")
        pred = d.argmin(1)
        best = max(ceiling(softmax(-d / (2 * T)).max(1), pred == yt) for T in (1, 3, 10))
        line = (f"  {tag:12} {'LDA':13} accuracy {(pred == yt).mean():.3f}  "
                f"ceiling@97 {best:.3f}  (shrinkage {shrink:.3f})")
        if oos is not None:
            dmin = np.delete(d, index["oos"], axis=1).min(1)
            ranks = np.argsort(np.argsort(dmin))
            auroc = (ranks[oos].mean() - (oos.sum() - 1) / 2) / (~oos).sum()
            line += f"  oos: AUROC {auroc:.3f}, recall {(pred == yt)[oos].mean():.3f}"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
