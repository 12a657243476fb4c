"""Polars integration: classify a DataFrame or LazyFrame of conversations.

Polars frames are Arrow underneath, so batches cross into the Rust core without copying.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa


def classify(
    frame,
    index_dir: str,
    *,
    model: Optional[str] = None,
    text_col: str = "text",
    turns_col: Optional[str] = None,
    id_col: str = "id",
    passthrough: Sequence[str] = (),
    threads: Optional[int] = None,
    threshold: Optional[float] = None,
    llm_config: Optional[str] = None,
    batch_rows: int = 4096,
):
    """Returns a polars DataFrame of results (a LazyFrame is collected first, streaming)."""
    import polars as pl

    import semtel

    clf = semtel.Classifier(
        index_dir,
        model=model,
        text_col=text_col,
        turns_col=turns_col,
        id_col=id_col,
        passthrough=list(passthrough),
        threads=threads,
        threshold=threshold,
        llm_config=llm_config,
    )
    if isinstance(frame, pl.LazyFrame):
        frame = frame.collect(engine="streaming")
    table = frame.to_arrow()
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=batch_rows))
    out = clf.classify_stream(reader).read_all()
    return pl.from_arrow(out)
