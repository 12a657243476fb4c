"""`semtel serve` through the official OpenAI Python client: /v1/embeddings with the client's
default (base64) and float encodings, batched input in several scripts, and classification
over plain HTTP."""
import json
import math
import subprocess
import time
import urllib.request

import pytest

from conftest import BIN, MODEL

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(sample_index):
    p = subprocess.Popen(
        [str(BIN), "serve", "--index", sample_index, "--addr", "127.0.0.1:0", "--model", str(MODEL), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = p.stdout.readline()
    assert line.startswith("listening on "), line
    base = line.split()[-1]
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
                break
        except Exception:
            time.sleep(0.1)
    yield base
    p.terminate()
    assert p.wait(timeout=60) == 0


def test_embeddings_with_the_openai_client(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    texts = ["How do I reverse a list in Python?", "我的信用卡被扣了两次", "مرحبا بالعالم", "🙂"]
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    assert len(default.data) == len(floats.data) == len(texts)
    for a, b in zip(default.data, floats.data):
        assert len(a.embedding) == 384
        assert abs(math.sqrt(sum(x * x for x in a.embedding)) - 1.0) < 1e-3
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
    assert default.usage.prompt_tokens > len(texts)
    one = client.embeddings.create(model="x", input="How do I reverse a list in Python?")
    assert max(abs(x - y) for x, y in zip(one.data[0].embedding, floats.data[0].embedding)) < 1e-4


def test_classify_over_http(server, conversations, schema_labels):
    items = [{"id": r["id"], "messages": r["turns"]} for r in conversations[:8]]
    req = urllib.request.Request(server + "/v1/classify?escalate=off", data=json.dumps(items).encode(),
                                 headers={"content-type": "application/json"})
    out = json.load(urllib.request.urlopen(req))["results"]
    assert [r["id"] for r in out] == [r["id"] for r in items]
    for r in out:
        assert r["knn_label"] in schema_labels
        assert r["decided_by"] in ("knn", "escalate")
