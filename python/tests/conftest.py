import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "all-MiniLM-L6-v2"
BIN = REPO / "target" / "release" / "semtel"


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory):
    """An index built by the CLI from the bundled exemplars (the same core as the binding)."""
    assert MODEL.joinpath("model.safetensors").is_file(), "run scripts/fetch-model first"
    assert BIN.is_file(), "build the CLI first (cargo build --release)"
    out = tmp_path_factory.mktemp("idx") / "sample"
    subprocess.run(
        [str(BIN), "index", "build", "--exemplars", str(REPO / "data/exemplars.jsonl"), "--out", str(out),
         "--model", str(MODEL), "-q"],
        check=True,
    )
    return str(out)


@pytest.fixture(scope="session")
def conversations():
    rows = [json.loads(l) for l in open(REPO / "data/conversations.jsonl")]
    for r in rows:
        # Every row as turns (multi-turn where the sample has them), as logs usually are.
        if "turns" not in r:
            r["turns"] = [{"role": "user", "content": r.pop("text")}]
    return rows


@pytest.fixture(scope="session")
def schema_labels():
    return sorted({json.loads(l)["label"] for l in open(REPO / "data/exemplars.jsonl")})
