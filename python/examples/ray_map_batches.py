"""Ray Data example: classify a Parquet dataset with `map_batches` (not run in CI; needs ray).

    pip install "ray[data]" semtel
    python examples/ray_map_batches.py idx/banking77 conversations.parquet out/

Each Ray worker process builds the Classifier once (the class-based UDF below), and Ray hands
it Arrow batches (`batch_format="pyarrow"`), which cross into the Rust core without copies.
"""
import sys

import pyarrow as pa
import ray

import semtel


class Classify:
    def __init__(self, index_dir: str):
        self.clf = semtel.Classifier(index_dir, threads=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [self.clf.classify_batch(b) for b in batch.to_batches() if b.num_rows]
        return pa.Table.from_batches(out)


if __name__ == "__main__":
    index_dir, src, dst = sys.argv[1:4]
    ds = ray.data.read_parquet(src)
    ds.map_batches(Classify, fn_constructor_args=(index_dir,), batch_format="pyarrow", concurrency=2).write_parquet(dst)
