import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pyspark = pytest.importorskip("pyspark")

import semtel  # noqa: E402
import semtel.spark  # noqa: E402

from conftest import BIN, MODEL  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    import sys

    from pyspark.sql import SparkSession

    # Workers must run the interpreter that has semtel installed.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    s = (
        SparkSession.builder.master("local[2]")
        .appName("semtel-test")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.python.worker.reuse", "true")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    yield s
    s.stop()


def test_spark_local2_end_to_end(spark, sample_index, conversations, tmp_path):
    # A Parquet file of multi-turn conversations, repeated to fill several partitions.
    rows = []
    for k in range(8):
        for r in conversations:
            rows.append({"conv_id": f"{r['id']}-{k}", "messages": r["turns"], "gold": r["label"]})
    path = tmp_path / "convs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
    df = spark.read.parquet(str(path)).repartition(8)
    out = semtel.spark.classify(
        df, sample_index, turns_col="messages", id_col="conv_id", passthrough=["gold"], threads=1
    )
    res = out.select("id", "label", "knn_label", "decided_by", "gold").collect()
    ids = [r["id"] for r in res]
    assert len(ids) == len(rows) == len(set(ids))
    knn = [r for r in res if r["decided_by"] == "knn"]
    assert len(knn) >= 0.3 * len(rows)
    assert sum(r["label"] == r["gold"] for r in knn) >= 0.9 * len(knn)

    # The same rows through the CLI give the same kNN labels (one core, two front ends).
    cli_out = tmp_path / "cli.jsonl"
    pq.write_table(pa.Table.from_pylist([{"id": r["conv_id"], "turns": r["messages"]} for r in rows]), tmp_path / "cli.parquet")
    subprocess.run(
        [str(BIN), "classify", "--index", sample_index, "--input", str(tmp_path / "cli.parquet"),
         "--output", str(cli_out), "--model", str(MODEL), "-q"],
        check=True,
    )
    import json

    cli = {j["id"]: j["knn_label"] for j in map(json.loads, open(cli_out))}
    assert {r["id"]: r["knn_label"] for r in res} == cli

    # Model and index loaded once per Python worker, however many partitions it served.
    def probe(batches):
        import os as _os

        import semtel as _s

        for _ in batches:
            pass
        yield pa.record_batch({"pid": [_os.getpid()], "loads": [_s.model_loads()]})

    loads = spark.range(0, 64, numPartitions=16).mapInArrow(probe, "pid long, loads long").collect()
    per_pid = {}
    for r in loads:
        per_pid[r["pid"]] = max(per_pid.get(r["pid"], 0), r["loads"])
    assert per_pid and all(v <= 1 for v in per_pid.values()), per_pid
    assert any(v == 1 for v in per_pid.values()), per_pid
