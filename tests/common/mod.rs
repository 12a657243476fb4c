//! Shared helpers for integration tests: the real model folder and the shared data sets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `semtel` binary with `args` and `-q`, run from the repository root.
pub fn semtel_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).arg("-q").current_dir(repo());
    c
}

/// Asserts that a run succeeded; returns its stdout followed by its stderr.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "semtel failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

pub fn model_dir() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    assert!(
        p.join("model.safetensors").is_file(),
        "the default model is missing: run scripts/fetch-model (scripts/test does it for you)"
    );
    p
}

pub fn shared() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        p.join("data").is_dir(),
        "../shared (data sets beside the project) is missing"
    );
    p
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_semtel"))
}

pub fn tmpdir(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// One reference row: text, token count, reference embedding.
pub type Reference = (String, usize, Vec<f32>);

/// Reads a reference file: one `{"text", "tokens_untruncated", "embedding"}` object per line.
pub fn read_reference(path: &Path) -> Vec<Reference> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                v["tokens_untruncated"].as_u64().unwrap() as usize,
                v["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            )
        })
        .collect()
}

/// Reference texts and sentence-transformers embeddings: our own fixture plus the shared one.
pub fn reference_sets() -> Vec<(String, Vec<Reference>)> {
    let mut sets = Vec::new();
    for path in [
        repo().join("tests/fixtures/minilm_reference.jsonl"),
        shared().join("reference/all-MiniLM-L6-v2.sentence-transformers.jsonl"),
    ] {
        let rows = read_reference(&path);
        sets.push((path.display().to_string(), rows));
    }
    sets
}

/// An index of the bundled exemplars (`data/exemplars.jsonl`) in `dir/idx`, built by the CLI
/// with the test model.
pub fn sample_index(dir: &Path) -> PathBuf {
    let idx = dir.join("idx");
    ok(semtel_cmd(&[
        "index",
        "build",
        "--exemplars",
        "data/exemplars.jsonl",
        "--out",
        idx.to_str().unwrap(),
    ])
    .arg("--model")
    .arg(model_dir())
    .output()
    .expect("run semtel"));
    idx
}

/// Rows per id in a classify output (JSONL, Parquet file or dataset).
pub fn id_counts(out: &Path) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for (id, _, _) in semtel::output::read_ids_and_labels(out).unwrap() {
        *m.entry(id).or_insert(0) += 1;
    }
    m
}

/// Gold label by simulator key, and (id, text, label) rows.
pub type Truth = (
    std::collections::HashMap<String, String>,
    Vec<(String, String, String)>,
);

/// Gold labels of the bundled conversations, keyed the way the simulator looks them up.
pub fn sample_truth() -> Truth {
    let mut truth = std::collections::HashMap::new();
    let mut rows = Vec::new();
    for l in std::fs::read_to_string(repo().join("data/conversations.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let text = if let Some(t) = v["text"].as_str() {
            t.to_string()
        } else {
            v["turns"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["role"] != "system")
                .map(|t| {
                    format!(
                        "{}: {}",
                        t["role"].as_str().unwrap(),
                        t["content"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let label = v["label"].as_str().unwrap().to_string();
        truth.insert(semtel::llm::simulator::truth_key(&text), label.clone());
        rows.push((v["id"].as_str().unwrap().to_string(), text, label));
    }
    (truth, rows)
}

/// An LLM config file at `path` for one simulator endpoint at `url` (no cache, known prices),
/// with `extra` top-level lines before the endpoint table.
pub fn sim_llm_config(path: &Path, url: &str, extra: &str) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "cache = \"off\"\n{extra}\n[[endpoints]]\nname = \"sim\"\nurl = \"{url}\"\nmodel = \"sim-1\"\nprice_in_per_1k = 0.001\nprice_out_per_1k = 0.002\n"
        ),
    )
    .unwrap();
    path.to_path_buf()
}

/// Every line of a JSON Lines file, parsed (a test's own output: any bad line fails the test).
pub fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
