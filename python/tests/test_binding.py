import pyarrow as pa
import pytest

import semtel


def _batch(rows):
    return pa.RecordBatch.from_pylist(
        [{"id": r["id"], "turns": r["turns"], "gold": r["label"]} for r in rows]
    )


def test_classify_batch_keeps_every_row_in_order(sample_index, conversations, schema_labels):
    clf = semtel.Classifier(sample_index, passthrough=["gold"])
    out = clf.classify_batch(_batch(conversations))
    assert isinstance(out, pa.RecordBatch)
    d = out.to_pydict()
    assert d["id"] == [r["id"] for r in conversations]
    assert set(d["decided_by"]) <= {"knn", "escalate"}
    kept = [(l, g) for l, g, by in zip(d["label"], d["gold"], d["decided_by"]) if by == "knn"]
    assert len(kept) >= 15
    assert sum(l == g for l, g in kept) >= 0.9 * len(kept)
    assert all(l in schema_labels for l in d["knn_label"])
    assert out.schema.field("neighbor_scores").type == pa.list_(pa.float32())
    assert sorted(clf.labels) == schema_labels


def test_stream_matches_batches(sample_index, conversations):
    clf = semtel.Classifier(sample_index)
    table = pa.Table.from_batches([_batch(conversations)]).drop_columns(["gold"])
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7))
    streamed = clf.classify_stream(reader).read_all()
    whole = clf.classify_batch(table.to_batches()[0])
    assert streamed.column("id").to_pylist() == whole.column("id").to_pylist()
    assert streamed.column("knn_label").to_pylist() == whole.column("knn_label").to_pylist()


def test_model_loads_once_per_process(sample_index):
    before = semtel.model_loads()
    a = semtel.Classifier(sample_index)
    b = semtel.Classifier(sample_index, passthrough=["x"])  # same heavy state, other columns
    assert semtel.model_loads() - before <= 1
    assert a.engine == b.engine


def test_plain_text_column_and_clear_errors(sample_index):
    clf = semtel.Classifier(sample_index, text_col="body")
    out = clf.classify_batch(pa.record_batch({"id": ["x"], "body": ["how do I make pancakes without eggs"]}))
    assert out.column("knn_label").to_pylist() == ["cooking"]
    with pytest.raises(ValueError, match="text-col"):
        clf.classify_batch(pa.record_batch({"id": ["x"], "other": ["?"]}))
    with pytest.raises(RuntimeError, match="manifest"):
        semtel.Classifier("/nonexistent/index")


def test_a_panicking_row_costs_one_row_not_the_batch(sample_index, conversations):
    # SEMTEL_PANIC_ON_ROW makes the core panic on that row (a stand-in for a bug); it is read
    # once per process, so the check runs in a fresh interpreter.
    import json
    import os
    import subprocess
    import sys

    script = f"""
import json, pyarrow as pa, semtel
rows = json.loads({json.dumps(json.dumps(conversations))})
batch = pa.RecordBatch.from_pylist([{{"id": r["id"], "turns": r["turns"]}} for r in rows])
out = semtel.Classifier({sample_index!r}).classify_batch(batch).to_pydict()
print(json.dumps({{"ids": out["id"], "by": out["decided_by"], "err": out["error"]}}))
"""
    env = dict(os.environ, SEMTEL_PANIC_ON_ROW="conv-003")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ids"] == [r["id"] for r in conversations]
    errors = [(i, e) for i, b, e in zip(out["ids"], out["by"], out["err"]) if b == "error"]
    assert len(errors) == 1 and errors[0][0] == "conv-003", errors
    assert "injected panic" in errors[0][1]


def test_audit_rate_sends_kept_rows_blind_and_needs_an_llm(sample_index, conversations, tmp_path):
    import subprocess

    from conftest import BIN, REPO

    with pytest.raises(ValueError, match="llm_config"):
        semtel.Classifier(sample_index, audit_rate=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        semtel.Classifier(sample_index, audit_rate=1.5)
    sim = subprocess.Popen(
        [str(BIN), "llm", "simulate", "--truth", str(REPO / "data/conversations.jsonl"), "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = sim.stdout.readline().split()[2]
        cfg = tmp_path / "llm.toml"
        cfg.write_text(f'cache = "off"\n[[endpoints]]\nname = "sim"\nurl = "{url}"\nmodel = "sim-1"\n')
        import json

        # Plain-text rows: the simulator knows their true labels by their text.
        rows = [json.loads(l) for l in open(REPO / "data/conversations.jsonl")]
        rows = [r for r in rows if "text" in r]
        batch = pa.record_batch({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
        clf = semtel.Classifier(
            sample_index, text_col="text", llm_config=str(cfg), audit_rate=1.0, audit_seed=1
        )
        d = clf.classify_batch(batch).to_pydict()
    finally:
        sim.kill()
    kept = [i for i, by in enumerate(d["decided_by"]) if by == "knn"]
    assert kept, d["decided_by"]
    # Every kept row was audited (rate 1.0) and keeps its kNN label; the simulator answers
    # with the true labels, so agreement is what kNN got right.
    assert all(d["audit"][i] in ("agree", "disagree", "missing") for i in kept)
    assert all(d["audit"][i] is None for i, by in enumerate(d["decided_by"]) if by != "knn")
    agreed = [i for i in kept if d["audit"][i] == "agree"]
    assert len(agreed) >= 0.8 * len(kept), list(zip(d["label"], d["audit_label"]))
    assert all(d["audit_label"][i] == d["label"][i] for i in agreed)
    assert all(d["audit_label"][i] != d["label"][i] for i in kept if d["audit"][i] == "disagree")
