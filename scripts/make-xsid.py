"""Builds data/xsid/xsid.jsonl.gz, the multilingual labelled set of `semtel bench encoders`,
from the xSID corpus (van der Goot et al., NAACL 2021; CC BY-SA 4.0).

Usage: python3 scripts/make-xsid.py GIT_DIR   (a clone of github.com/mainlp/xsid)

xSID translates the same English queries (valid 300, test 500) into many languages with one
intent label per query (16 intents: weather, alarms, reminders, music, restaurants, ...), so a
label means the same thing in every language. Rows: {"id", "text", "label", "split", "lang",
"text_en"}; ids are `<lang>:<split>:<n>` and the n-th row of a split is the same query in every
language. Only the standard languages of release 0.7 are kept (not the dialect sets).
"""
import gzip, json, subprocess, sys

COMMIT = "761d926c3f2e9f6bea13192d2f39cec1d04d9777"
LANGS = ["en", "ar", "da", "de", "id", "it", "ja", "kk", "lt", "nl", "sr", "tr", "zh"]
git = sys.argv[1]
out = "data/xsid/xsid.jsonl.gz"
n = 0
with gzip.GzipFile(out, "wb", mtime=0) as gz:
    for lang in LANGS:
        for split in ("valid", "test"):
            path = f"data/xSID-0.7/{lang}.{split}.conll"
            text = subprocess.run(["git", "-C", git, "show", f"{COMMIT}:{path}"], check=True,
                                  capture_output=True).stdout.decode("utf-8")
            for block in text.strip().split("\n\n"):
                meta = {}
                for line in block.splitlines():
                    if line.startswith("# ") and " = " in line:
                        k, v = line[2:].split(" = ", 1)
                        meta[k.strip()] = v.strip()
                if "text" not in meta or "intent" not in meta:
                    continue
                row = {"id": f"{lang}:{split}:{meta.get('id', n)}", "text": meta["text"],
                       "label": meta["intent"], "split": split, "lang": lang,
                       "text_en": meta.get("text-en")}
                gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
print(n, "rows ->", out)
