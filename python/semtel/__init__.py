"""semtel: label human–AI conversations embedding-first, from Python.

The heavy lifting is the Rust core (the same code as the `semtel` command): this package only
converts Arrow data. A `Classifier` takes and returns `pyarrow.RecordBatch`es zero-copy; model
and index load once per process and are shared by every Classifier with the same settings.

    import pyarrow as pa, semtel
    clf = semtel.Classifier("idx/banking77")
    out = clf.classify_batch(pa.record_batch({"id": ["1"], "text": ["my card has not arrived"]}))

Helpers: `semtel.spark.classify(df, ...)` (mapInArrow), `semtel.polars.classify(frame, ...)`.
"""
from ._semtel import Classifier, model_loads, version

__all__ = ["Classifier", "model_loads", "version"]
__version__ = version()
