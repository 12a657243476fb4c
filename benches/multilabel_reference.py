"""The scikit-learn reference for semtel's multi-label head: one-vs-rest logistic regression
on the same frozen embeddings (`semtel embed` output), C chosen on the validation split.

    semtel embed --input sgd.jsonl --split train --label-col domains --output train.parquet
    (same for validation and test)
    python benches/multilabel_reference.py train.parquet validation.parquet test.parquet [--seen-only]

`--seen-only` scores only test rows all of whose labels occur in train (SGD's test split has
domains train never saw; no method can predict those).

Needs scikit-learn, numpy and pyarrow (not part of semtel's own set-up). Prints micro- and
macro-F1 and exact-set accuracy on the test split, as `semtel eval` reports them.
"""

import json
import sys

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import MultiLabelBinarizer


def load(path):
    t = pq.read_table(path).to_pydict()
    x = np.array(t["vector"], dtype=np.float32)
    labels = []
    for cell in t["label"]:
        cell = (cell or "").strip()
        if cell.startswith("["):
            labels.append(sorted(set(json.loads(cell))))
        else:
            labels.append(sorted({p.strip() for p in cell.split("|") if p.strip()}))
    return x, labels


def main():
    train, val, test = (load(p) for p in sys.argv[1:4])
    if "--seen-only" in sys.argv[4:]:
        seen = {l for ls in train[1] for l in ls}
        keep = [i for i, ls in enumerate(test[1]) if all(l in seen for l in ls)]
        test = (test[0][keep], [test[1][i] for i in keep])
    mlb = MultiLabelBinarizer()
    mlb.fit(train[1] + val[1] + test[1])
    ytr, yva, yte = (mlb.transform(s[1]) for s in (train, val, test))
    best = None
    for c in [0.1, 1.0, 10.0, 100.0, 1000.0]:
        m = OneVsRestClassifier(LogisticRegression(C=c, max_iter=3000), n_jobs=2)
        m.fit(train[0], ytr)
        f = f1_score(yva, m.predict(val[0]), average="micro", zero_division=0)
        print(f"C={c:<6} validation micro-F1 {f:.4f}", file=sys.stderr)
        if best is None or f > best[0]:
            best = (f, c, m)
    _, c, m = best
    pred = m.predict(test[0])
    exact = float(np.mean(np.all(pred == yte, axis=1)))
    print(
        json.dumps(
            {
                "reference": "sklearn OneVsRest(LogisticRegression), frozen embeddings",
                "seen_only": "--seen-only" in sys.argv[4:],
                "C": c,
                "rows": int(len(yte)),
                "micro_f1": round(f1_score(yte, pred, average="micro", zero_division=0), 4),
                "macro_f1": round(f1_score(yte, pred, average="macro", zero_division=0), 4),
                "subset_accuracy": round(exact, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
