"""Rows/s of the same classification through Spark local[2] and through the CLI, same input,
same 2 cores, same run (the gap is Spark's overhead). Not run in CI.

Usage: .venv/bin/python benches/spark_vs_cli.py INDEX_DIR [N_ROWS]
Input: the first N_ROWS SGD dialogues (multi-turn) from ../shared, written once as Parquet.
"""
import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = pathlib.Path(__file__).resolve().parents[1]
index_dir = sys.argv[1]
n_rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
tmp = pathlib.Path(tempfile.mkdtemp(prefix="semtel-spark-bench-"))
rows = []
with gzip.open(REPO.parent / "shared/data/sgd/sgd_dialogues.jsonl.gz", "rt") as f:
    for line in f:
        r = json.loads(line)
        rows.append({"id": r["id"], "turns": r["turns"]})
        if len(rows) == n_rows:
            break
src = tmp / "dialogues.parquet"
pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=1000)
tokens = None

def cli():
    out = tmp / "cli.parquet"
    t = time.perf_counter()
    subprocess.run([str(REPO / "target/release/semtel"), "classify", "--index", index_dir, "--input", str(src),
                    "--output", str(out), "--overwrite", "--threads", "2", "-q"], check=True)
    return time.perf_counter() - t

os.environ["PYSPARK_PYTHON"] = sys.executable
from pyspark.sql import SparkSession  # noqa: E402

import semtel.spark  # noqa: E402

spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
         .config("spark.python.worker.reuse", "true").getOrCreate())

def via_spark():
    df = spark.read.parquet(str(src)).repartition(2)
    t = time.perf_counter()
    n = semtel.spark.classify(df, index_dir, threads=1).count()
    assert n == len(rows)
    return time.perf_counter() - t

results = {"cli": [], "spark": []}
via_spark()  # warm-up: JVM, Python workers, model load per worker
for _ in range(3):
    results["cli"].append(cli())
    results["spark"].append(via_spark())
spark.stop()
med = {k: sorted(v)[1] for k, v in results.items()}
print(json.dumps({"rows": len(rows), "seconds": results}))
print(f"CLI   {len(rows) / med['cli']:8.1f} rows/s (median of 3)")
print(f"Spark {len(rows) / med['spark']:8.1f} rows/s (median of 3, local[2], model loaded once per worker)")
print(f"Spark / CLI = {med['cli'] / med['spark']:.2f}")
