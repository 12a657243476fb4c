//! End-to-end runs of the `semtel` binary on the bundled sample: build, classify to JSONL and
//! Parquet, resume after a torn write, and every kind of bad input. (Kills at every crash
//! point are tests/kill_points.rs.)

mod common;
use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

fn semtel(args: &[&str]) -> Output {
    semtel_cmd(args)
        .arg("--model")
        .arg(model_dir())
        .output()
        .expect("run semtel")
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn ids_of_input(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn assert_exactly_once(output: &Path, want: &[String]) {
    let rows = semtel::output::read_ids_and_labels(output).unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (id, _, _) in &rows {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).collect();
    assert!(dups.is_empty(), "duplicated ids: {dups:?}");
    let missing: Vec<_> = want
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "missing ids: {} e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert_eq!(rows.len(), want.len());
}

#[test]
fn demo_runs_end_to_end() {
    let dir = tmpdir("demo");
    let out = ok(semtel(&["demo", "--out", dir.to_str().unwrap()]));
    assert!(out.contains("kNN kept"), "{out}");
    assert!(dir.join("labels.jsonl").is_file());
}

#[test]
fn classify_sample_to_parquet_and_jsonl() {
    let dir = tmpdir("classify-sample");
    let idx = sample_index(&dir);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(idx.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["count"], 100);
    assert_eq!(manifest["model"]["dims"], 384);
    assert_eq!(manifest["labels"].as_array().unwrap().len(), 10);
    let gold: HashMap<String, String> =
        std::fs::read_to_string(repo().join("data/conversations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["id"].as_str().unwrap().into(),
                    v["label"].as_str().unwrap().into(),
                )
            })
            .collect();
    for name in ["labels.parquet", "labels.jsonl", "labels-dataset"] {
        let out = dir.join(name);
        ok(semtel(&[
            "classify",
            "--index",
            idx.to_str().unwrap(),
            "--input",
            "data/conversations.jsonl",
            "--output",
            out.to_str().unwrap(),
            "--passthrough",
            "label",
        ]));
        let ids = ids_of_input(&repo().join("data/conversations.jsonl"));
        assert_exactly_once(&out, &ids);
        let rows = semtel::output::read_ids_and_labels(&out).unwrap();
        let knn: Vec<_> = rows.iter().filter(|r| r.2 == "knn").collect();
        assert!(knn.len() >= 15, "kNN kept only {}", knn.len());
        let right = knn
            .iter()
            .filter(|(id, label, _)| label.as_deref() == Some(gold[id].as_str()))
            .count();
        assert!(
            right as f64 >= 0.9 * knn.len() as f64,
            "{right}/{}",
            knn.len()
        );
        assert!(rows.iter().all(|r| r.2 == "knn" || r.2 == "escalate"));
    }
    // JSONL carries neighbours and the pass-through column.
    let line = std::fs::read_to_string(dir.join("labels.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["neighbors"].as_array().unwrap().len(), 10);
    assert!(v["label"].is_string() || v["decided_by"] == "escalate");
    assert!(
        gold.values()
            .any(|g| v["label"].as_str() == Some(g.as_str()))
            || v["label"].is_null()
    );
    // A second run without --resume refuses to clobber the output.
    let err = fails(semtel(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        "data/conversations.jsonl",
        "--output",
        dir.join("labels.jsonl").to_str().unwrap(),
    ]));
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
}

#[test]
fn bad_input_is_reported_per_row_and_the_run_continues() {
    let dir = tmpdir("bad-input");
    let idx = sample_index(&dir);
    let input = dir.join("bad.jsonl");
    let mut data = Vec::new();
    data.extend_from_slice(
        b"{\"id\": \"good\", \"text\": \"How do I reverse a list in Python?\"}\n",
    );
    data.extend_from_slice(b"{\"id\": \"broken\", \"text\": \"unterminated\n");
    data.extend_from_slice(b"{\"id\": \"empty\", \"text\": \"   \"}\n");
    data.extend_from_slice(b"{\"id\": \"nocol\", \"body\": \"no text column here\"}\n");
    data.extend_from_slice(b"[1, 2, 3]\n");
    data.extend_from_slice(b"\n");
    data.extend_from_slice(b"{\"id\": \"badutf8\", \"text\": \"caf\xff\xfe latte\"}\n");
    let big = "please help me plan a trip to Rome. ".repeat(150_000); // ~5 MB
    data.extend_from_slice(format!("{{\"id\": \"huge\", \"text\": \"{big}\"}}\n").as_bytes());
    data.extend_from_slice(
        b"{\"id\": \"turns-empty\", \"turns\": [{\"role\": \"user\", \"content\": \"\"}]}\n",
    );
    data.extend_from_slice(b"{\"id\": \"good2\", \"turns\": [{\"role\": \"user\", \"content\": \"my wifi keeps dropping\"}]}\n");
    std::fs::write(&input, data).unwrap();
    let out = dir.join("out.jsonl");
    let log = ok(semtel(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]));
    assert!(log.contains("errors 6"), "{log}");
    let rows: HashMap<String, serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(rows.len(), 9, "{:?}", rows.keys());
    let err = |id: &str| rows[id]["error"].as_str().unwrap_or("").to_string();
    // Broken lines get positional ids and name the file and line.
    assert!(
        err("bad:1").contains("line 2") && err("bad:1").contains("broken JSON"),
        "{}",
        err("bad:1")
    );
    assert!(err("empty").contains("empty text"));
    assert!(err("nocol").contains("--text-col"));
    assert!(err("bad:4").contains("not a JSON object"));
    // A line with invalid UTF-8 keeps its id (the rest of the line is readable).
    assert!(
        err("badutf8").contains("invalid UTF-8"),
        "{}",
        err("badutf8")
    );
    assert!(err("turns-empty").contains("empty conversation"));
    for id in ["good", "good2", "huge"] {
        assert!(rows[id]["error"].is_null(), "{id}: {}", rows[id]);
        assert_ne!(rows[id]["decided_by"], "error");
    }
    assert_eq!(rows["huge"]["knn_label"], "travel");
}

#[test]
fn wrong_columns_fail_fast_with_advice() {
    let dir = tmpdir("wrong-columns");
    let idx = sample_index(&dir);
    let input = dir.join("nocols.jsonl");
    std::fs::write(&input, "{\"body\": \"a\"}\n{\"body\": \"b\"}\n").unwrap();
    let err = fails(semtel(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        dir.join("o.jsonl").to_str().unwrap(),
    ]));
    assert!(
        err.contains("nocols.jsonl") && err.contains("--text-col"),
        "{err}"
    );
    // Naming the column fixes it.
    ok(semtel(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        dir.join("o2.jsonl").to_str().unwrap(),
        "--text-col",
        "body",
    ]));
}

#[test]
fn index_from_another_model_is_refused() {
    let dir = tmpdir("other-model");
    let idx = sample_index(&dir);
    let mpath = idx.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["model"]["weights_sha256"] =
        "0000000000000000000000000000000000000000000000000000000000000000".into();
    m["model"]["id"] = "BAAI/bge-small-en-v1.5".into();
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let err = fails(semtel(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        "data/conversations.jsonl",
        "--output",
        dir.join("o.jsonl").to_str().unwrap(),
    ]));
    assert!(
        err.contains("bge-small") && err.contains("rebuild the index"),
        "{err}"
    );
    assert!(
        !dir.join("o.jsonl").exists()
            || std::fs::read_to_string(dir.join("o.jsonl"))
                .unwrap()
                .is_empty()
    );
}

#[test]
fn resume_after_a_torn_jsonl_write() {
    let dir = tmpdir("torn");
    let idx = sample_index(&dir);
    let out = dir.join("labels.jsonl");
    let args = |extra: &'static str| {
        let mut v = vec![
            "classify".to_string(),
            "--index".into(),
            idx.display().to_string(),
            "--input".into(),
            "data/conversations.jsonl".into(),
            "--output".into(),
            out.display().to_string(),
        ];
        if !extra.is_empty() {
            v.push(extra.into());
        }
        v
    };
    let a: Vec<String> = args("");
    ok(semtel(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    // Keep 20 whole lines and half of the 21st, as a kill in the middle of a write would.
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut torn = lines[..20].join("\n");
    torn.push('\n');
    torn.push_str(&lines[20][..lines[20].len() / 2]);
    std::fs::write(&out, torn).unwrap();
    let a = args("--resume");
    let log = ok(semtel(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(log.contains("20 skipped"), "{log}");
    assert_exactly_once(
        &out,
        &ids_of_input(&repo().join("data/conversations.jsonl")),
    );
}

#[test]
fn index_add_extends_without_duplicates() {
    let dir = tmpdir("index-add");
    let all = std::fs::read_to_string(repo().join("data/exemplars.jsonl")).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    std::fs::write(&a, lines[..60].join("\n")).unwrap();
    std::fs::write(&b, lines[60..].join("\n")).unwrap();
    let idx = dir.join("idx");
    ok(semtel(&[
        "index",
        "build",
        "--exemplars",
        a.to_str().unwrap(),
        "--out",
        idx.to_str().unwrap(),
    ]));
    ok(semtel(&[
        "index",
        "add",
        "--index",
        idx.to_str().unwrap(),
        "--exemplars",
        b.to_str().unwrap(),
    ]));
    ok(semtel(&[
        "index",
        "add",
        "--index",
        idx.to_str().unwrap(),
        "--exemplars",
        b.to_str().unwrap(),
    ]));
    let info = ok(semtel(&["index", "info", "--index", idx.to_str().unwrap()]));
    let m: serde_json::Value = serde_json::from_str(&info[..info.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(m["count"], 100);
    assert_eq!(m["labels"].as_array().unwrap().len(), 10);
}

#[test]
fn eval_json_report() {
    let dir = tmpdir("eval-json");
    let idx = sample_index(&dir);
    let out = ok(semtel(&[
        "eval",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        "data/conversations.jsonl",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(v["accuracy"].as_f64().unwrap() > 0.8);
    assert!(v["macro_f1"].as_f64().unwrap() > 0.8);
    assert_eq!(v["coverage"].as_array().unwrap().len(), 21);
    assert_eq!(v["rows"], 50);
}
