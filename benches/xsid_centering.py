"""Cross-lingual kNN transfer on xSID with and without per-language centring (README, Encoders).

English validation rows are the exemplars; each language's test rows are voted on (k = 10,
similarity-weighted). "Centred" subtracts each language's mean vector, taken from that
language's *unlabelled* validation rows (never the test labels), and the exemplars' mean,
then re-normalises. Usage:

    semtel embed --model models/multilingual-e5-small --input data/xsid/xsid.jsonl.gz \
                 --label-col label --output /tmp/xsid-e5.parquet
    python3 benches/xsid_centering.py /tmp/xsid-e5.parquet

Needs numpy and pyarrow. Prints, per language: as is, centred with the test rows' own mean,
centred with the validation mean (the figure the README reports), each with its gap to English.
"""
import sys, json, numpy as np, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]).to_pydict()
ids = t["id"]; labels = t["label"]; V = np.array(t["vector"], dtype=np.float32)
V /= np.linalg.norm(V, axis=1, keepdims=True)
lang = np.array([i.split(":")[0] for i in ids]); split = np.array([i.split(":")[1] for i in ids])
labels = np.array(labels)
tr = (lang == "en") & (split == "valid")
def knn_acc(Q, ql, X, xl, k=10):
    S = Q @ X.T
    idx = np.argsort(-S, axis=1)[:, :k]
    right = 0
    for i in range(len(Q)):
        votes = {}
        for j in idx[i]:
            votes[xl[j]] = votes.get(xl[j], 0) + max(S[i, j], 0)
        right += max(votes, key=votes.get) == ql[i]
    return right / len(Q)
X = V[tr]; xl = labels[tr]
mu_en = X.mean(0)
res = {}
for L in sorted(set(lang)):
    te = (lang == L) & (split == "test")
    Q = V[te]; ql = labels[te]
    base = knn_acc(Q, ql, X, xl)
    # centring: each language minus its own mean (the test rows themselves, unlabelled), English exemplars minus theirs
    Qc = Q - Q.mean(0); Qc /= np.linalg.norm(Qc, axis=1, keepdims=True)
    Xc = X - mu_en; Xc /= np.linalg.norm(Xc, axis=1, keepdims=True)
    cen = knn_acc(Qc, ql, Xc, xl)
    # centring with the language's valid rows (unlabelled use, not test)
    va = (lang == L) & (split == "valid")
    Qv = Q - V[va].mean(0); Qv /= np.linalg.norm(Qv, axis=1, keepdims=True)
    cenv = knn_acc(Qv, ql, Xc, xl)
    res[L] = (base, cen, cenv)
en = res["en"]
for L, (b, c, cv) in res.items():
    print(f"{L}: base {100*b:.1f} ({100*(b-en[0]):+.1f})  centred(test mean) {100*c:.1f} ({100*(c-en[1]):+.1f})  centred(valid mean) {100*cv:.1f} ({100*(cv-en[2]):+.1f})")
