"""The project's multilingual and messy fixture (tests/fixtures/multilingual.jsonl: 12 scripts,
long texts past the token budget, 20 KB words, emoji, combining marks, NUL, RTL marks, long
dialogues) through the binding and through Spark: one output row per input row, no exception,
no error rows."""
import json

import pyarrow as pa
import pytest

import semtel

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "multilingual.jsonl"


def _rows():
    rows = []
    for line in open(FIXTURE, encoding="utf-8"):
        r = json.loads(line)
        # One shape for Arrow: every row as turns.
        turns = r.get("turns") or [{"role": "user", "content": r["text"]}]
        rows.append({"id": r["id"], "turns": turns, "gold": r["label"]})
    return rows


def test_binding_classifies_every_multilingual_row(sample_index):
    rows = _rows()
    clf = semtel.Classifier(sample_index, passthrough=["gold"])
    out = clf.classify_batch(pa.RecordBatch.from_pylist(rows))
    d = out.to_pydict()
    assert d["id"] == [r["id"] for r in rows]
    assert "error" not in set(d["decided_by"]), [e for e in d["error"] if e]


def test_spark_classifies_every_multilingual_row(sample_index, tmp_path):
    pytest.importorskip("pyspark")
    import os
    import sys

    import pyarrow.parquet as pq
    from pyspark.sql import SparkSession

    import semtel.spark

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("semtel-multilingual")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    try:
        rows = _rows()
        path = tmp_path / "ml.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=40)
        df = spark.read.parquet(str(path)).repartition(4)
        res = semtel.spark.classify(df, sample_index, turns_col="turns", threads=1).select("id", "decided_by").collect()
        assert sorted(r["id"] for r in res) == sorted(r["id"] for r in rows)
        assert all(r["decided_by"] != "error" for r in res)
    finally:
        spark.stop()
