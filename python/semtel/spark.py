"""PySpark integration: classify a DataFrame of conversations with `mapInArrow`.

Each Python worker loads the model and the index once (process-wide cache in the Rust core; the
index is memory-mapped, so workers on one machine share its pages) and classifies Arrow batches
without copying them.

Escalation inside Spark, default: escalated rows come back with ``decided_by = "escalate"`` and
are labelled afterwards by one `semtel llm` pass (``semtel llm export-batch`` for the OpenAI
Batch API, or ``semtel classify --llm`` over the escalated rows). Why: Spark retries and
speculatively re-runs tasks, so an LLM call made inside a task can be paid for twice, and
executors cannot see each other's rate-limit state. Passing ``llm_config`` calls the LLM tier
from the executors anyway; then give each executor its share of the limits
(``llm_share = 1 / number of executors``) — the rpm/tpm in the config are scaled by it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Optional, Sequence

import pyarrow as pa


def _scaled_llm_config(path: str, share: float) -> str:
    """Writes a copy of an LLM config whose rpm/tpm are scaled by `share`."""
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    lines = []
    for k, v in cfg.items():
        if k in ("endpoints", "labels"):
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    if "labels" in cfg:
        lines.append("[labels]")
        lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in cfg["labels"].items()]
    for e in cfg.get("endpoints", []):
        lines.append("[[endpoints]]")
        for k, v in e.items():
            if k in ("rpm", "tpm"):
                v = max(1, int(v * share))
            lines.append(f"{k} = {_toml_value(v)}")
    fd, out = tempfile.mkstemp(suffix=".toml", prefix="semtel-llm-")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def classify(
    df,
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
    llm_share: Optional[float] = None,
    audit_rate: Optional[float] = None,
    audit_seed: int = 0,
):
    """Returns a DataFrame with one labelled row per input row (see semtel's output columns).

    `audit_rate` (with `llm_config`): that share of kept rows also goes to the LLM, blind; the
    `audit` (agree / disagree / missing) and `audit_label` columns carry its answers, so the
    realised kept-accuracy is ``mean(audit == "agree")`` over rows with an answer, per any
    segment (label, language, partition).

    `threads`: worker threads per Python worker (default: ``spark.task.cpus``, so executors do
    not oversubscribe their cores). A missing `id_col` is filled with
    ``monotonically_increasing_id()`` so ids stay unique across partitions.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    import semtel

    if id_col not in df.columns:
        df = df.withColumn(id_col, F.monotonically_increasing_id().cast("string"))
    if threads is None:
        threads = int(df.sparkSession.conf.get("spark.task.cpus", "1"))
    if llm_config is not None and llm_share is not None:
        llm_config = _scaled_llm_config(llm_config, llm_share)
    kwargs = dict(
        model=model,
        text_col=text_col,
        turns_col=turns_col,
        id_col=id_col,
        passthrough=list(passthrough),
        threads=threads,
        threshold=threshold,
        llm_config=llm_config,
        audit_rate=audit_rate,
        audit_seed=audit_seed,
    )
    in_schema = to_arrow_schema(df.schema)
    # The driver computes the output schema (loading the index once there too).
    out_schema = semtel.Classifier(index_dir, **kwargs).output_schema(in_schema)
    spark_schema = from_arrow_schema(out_schema)

    def run(batches: Iterable[pa.RecordBatch]):
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        import semtel as _s

        clf = _s.Classifier(index_dir, **kwargs)
        for b in batches:
            if b.num_rows:
                yield clf.classify_batch(b)

    return df.mapInArrow(run, spark_schema)
