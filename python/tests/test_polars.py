import polars as pl

import semtel.polars


def test_polars_dataframe_and_lazyframe(sample_index, conversations):
    df = pl.DataFrame([{"id": r["id"], "turns": r["turns"], "gold": r["label"]} for r in conversations])
    out = semtel.polars.classify(df, sample_index, passthrough=["gold"], batch_rows=16)
    assert out.height == len(conversations)
    assert out["id"].to_list() == df["id"].to_list()
    knn = out.filter(pl.col("decided_by") == "knn")
    assert (knn["label"] == knn["gold"]).mean() >= 0.9
    lazy = semtel.polars.classify(df.lazy().filter(pl.col("id") != "conv-001"), sample_index)
    assert lazy.height == len(conversations) - 1
