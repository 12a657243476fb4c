//! Deterministic crash tests: `SEMTEL_ABORT_AT` aborts a run at a named point (see
//! `src/failpoint.rs`), then `--resume` must finish it with every input id exactly once — for
//! every point × output format × mode (kNN only, with the LLM tier, with `--grow`). An index
//! save killed half-way must leave an index that opens and holds every exemplar.

mod common;
use common::*;
use semtel::llm::simulator::{self, SimConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The bundled conversations twice over under fresh ids (100 rows).
fn input(dir: &Path) -> (PathBuf, Vec<String>) {
    let base = std::fs::read_to_string(repo().join("data/conversations.jsonl")).unwrap();
    let (mut text, mut ids) = (String::new(), Vec::new());
    for rep in 0..2 {
        for l in base.lines() {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = format!("{}-{rep}", v["id"].as_str().unwrap());
            v["id"] = id.clone().into();
            ids.push(id);
            text.push_str(&v.to_string());
            text.push('\n');
        }
    }
    let p = dir.join("in.jsonl");
    std::fs::write(&p, text).unwrap();
    (p, ids)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Knn,
    Llm,
    Grow,
}

fn run(
    idx: &Path,
    input: &Path,
    out: &Path,
    llm: Option<&Path>,
    mode: Mode,
    abort: Option<&str>,
    resume: bool,
) -> Output {
    let mut c = Command::new(bin());
    c.args(["classify", "--index"])
        .arg(idx)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(out)
        .args(["--chunk-rows", "8", "--part-rows", "16", "-q", "--model"])
        .arg(model_dir())
        .current_dir(repo())
        .env_remove("SEMTEL_ABORT_AT");
    if let Some(cfg) = llm {
        // Escalate about half of the rows.
        c.arg("--llm").arg(cfg).args(["--threshold", "0.55"]);
    }
    if mode == Mode::Grow {
        c.arg("--grow");
    }
    if resume {
        c.arg("--resume");
    }
    if let Some(a) = abort {
        c.env("SEMTEL_ABORT_AT", a);
    }
    c.output().unwrap()
}

/// The bundled exemplars' index, built once; each case works on its own copy (`--grow`
/// writes into it).
fn template_index() -> &'static Path {
    static T: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    T.get_or_init(|| sample_index(&tmpdir("kill-template")))
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// One crash-and-resume case; returns (lost, duplicated) ids.
fn case(mode: Mode, out_name: &str, point: &str) -> (usize, usize) {
    let tag = format!(
        "kill-{mode:?}-{}-{}",
        out_name.replace('.', "_"),
        point.replace(':', "_")
    );
    let dir = tmpdir(&tag);
    let idx = dir.join("idx");
    copy_tree(template_index(), &idx);
    let (input, ids) = input(&dir);
    let (truth, _) = truth();
    let sim = (mode != Mode::Knn).then(|| {
        simulator::start(
            SimConfig {
                truth,
                ..Default::default()
            },
            0,
        )
        .unwrap()
    });
    let cfg = sim.as_ref().map(|h| {
        let p = dir.join("llm.toml");
        std::fs::write(
            &p,
            format!(
                "cache = \"{}\"\nitems_per_call = 4\n[[endpoints]]\nname = \"sim\"\nurl = \"{}\"\nmodel = \"sim-1\"\n",
                dir.join("cache").display(),
                h.url()
            ),
        )
        .unwrap();
        p
    });
    let out = dir.join(out_name);
    let first = run(&idx, &input, &out, cfg.as_deref(), mode, Some(point), false);
    assert!(
        !first.status.success() && first.status.code().is_none(),
        "{tag}: the run was not aborted at {point} (status {:?}): {}",
        first.status,
        String::from_utf8_lossy(&first.stderr)
    );
    let second = run(&idx, &input, &out, cfg.as_deref(), mode, None, true);
    assert!(
        second.status.success(),
        "{tag}: resume failed: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    let got = id_counts(&out);
    let lost = ids.iter().filter(|id| !got.contains_key(*id)).count();
    let dup = got.values().filter(|&&c| c > 1).count();
    if out_name.ends_with(".parquet") {
        assert!(
            !PathBuf::from(format!("{}.parts", out.display())).exists(),
            "{tag}: parts left behind"
        );
    }
    if mode == Mode::Grow {
        // The index opens (an interrupted save is rolled forward) and is consistent.
        let info = ok(
            semtel_cmd(&["index", "info", "--index", idx.to_str().unwrap()])
                .output()
                .unwrap(),
        );
        assert!(info.contains("\"count\""), "{tag}: {info}");
    }
    (lost, dup)
}

fn truth() -> (HashMap<String, String>, ()) {
    let mut truth = HashMap::new();
    for l in std::fs::read_to_string(repo().join("data/conversations.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if let Some(t) = v["text"].as_str() {
            truth.insert(
                simulator::truth_key(t),
                v["label"].as_str().unwrap().to_string(),
            );
        }
    }
    (truth, ())
}

/// Every point that a given format and mode passes through.
fn points(mode: Mode, out_name: &str) -> Vec<&'static str> {
    let mut p = vec!["batch-written:2"];
    if !out_name.ends_with(".jsonl") {
        p.push("part-closed:1");
    }
    if out_name.ends_with(".parquet") {
        p.extend(["before-final-commit", "final-commit"]);
    }
    if mode != Mode::Knn {
        p.push("llm-reply:2");
    }
    if mode == Mode::Grow {
        p.extend(["index-save:1", "index-save:2"]);
    }
    p
}

#[test]
fn every_kill_point_resumes_exactly_once() {
    let mut table = Vec::new();
    let mut bad = Vec::new();
    // Every point × format × mode with SEMTEL_FULL_TESTS=1; otherwise the LLM and --grow
    // modes on the Parquet file only (the format whose points are a superset but for the
    // dataset's part closes, which kNN mode covers).
    let full = std::env::var_os("SEMTEL_FULL_TESTS").is_some_and(|v| v != "0");
    for mode in [Mode::Knn, Mode::Llm, Mode::Grow] {
        for out_name in ["labels.jsonl", "labels.parquet", "labels_dir"] {
            if !full && mode != Mode::Knn && out_name != "labels.parquet" {
                continue;
            }
            for point in points(mode, out_name) {
                let (lost, dup) = case(mode, out_name, point);
                table.push(format!(
                    "| {point} | {out_name} | {mode:?} | {lost} | {dup} |"
                ));
                if lost + dup > 0 {
                    bad.push(table.last().unwrap().clone());
                }
            }
        }
    }
    eprintln!(
        "| kill point | output | mode | ids lost | ids duplicated |\n|---|---|---|---|---|\n{}",
        table.join("\n")
    );
    assert!(
        bad.is_empty(),
        "lost or duplicated ids:\n{}",
        bad.join("\n")
    );
}

/// The exemplar count of the index at `idx` (it must open).
fn count(idx: &Path) -> u64 {
    let info = ok(
        semtel_cmd(&["index", "info", "--index", idx.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    let v: serde_json::Value = serde_json::from_str(&info[..info.rfind('}').unwrap() + 1]).unwrap();
    v["count"].as_u64().unwrap()
}

/// The first `n` bundled exemplars under new ids.
fn exemplars(dir: &Path, n: usize, tag: &str) -> PathBuf {
    let text: String = std::fs::read_to_string(repo().join("data/exemplars.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] = format!("{tag}-{}", v["id"].as_str().unwrap()).into();
            v.to_string() + "\n"
        })
        .collect();
    let p = dir.join(format!("{tag}.jsonl"));
    std::fs::write(&p, text).unwrap();
    p
}

/// Every command that rewrites an index leaves the old index or the new one, whatever stops
/// it: an error (a model that is not there) or a kill at any point of the rewrite.
#[test]
fn index_rewrites_leave_the_old_or_the_new_index() {
    let dir = tmpdir("index-rewrites");
    let idx = sample_index(&dir);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    assert_eq!(count(&idx), 100);
    let sixty = exemplars(&dir, 60, "new");
    // A failed rebuild keeps the old index: a model that is not there …
    let out = semtel_cmd(&[
        "index",
        "build",
        "--exemplars",
        &s(&sixty),
        "--out",
        &s(&idx),
        "--overwrite",
        "--model",
        "/nonexistent",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert_eq!(count(&idx), 100);
    // … or the default model, not found from another working directory.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = Command::new(bin())
        .args([
            "index",
            "build",
            "--exemplars",
            &s(&sixty),
            "--out",
            &s(&idx),
            "--overwrite",
            "-q",
        ])
        .current_dir(&elsewhere)
        .env_remove("SEMTEL_MODEL")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&idx), 100);
    // Killed at each point of a rebuild: the old index or the new, never neither.
    for point in [
        "index-save:1",
        "index-save:2",
        "index-save:3",
        "index-build-saved",
        "index-swap",
    ] {
        let out = semtel_cmd(&[
            "index",
            "build",
            "--exemplars",
            &s(&sixty),
            "--out",
            &s(&idx),
            "--overwrite",
        ])
        .arg("--model")
        .arg(model_dir())
        .env("SEMTEL_ABORT_AT", point)
        .output()
        .unwrap();
        assert!(out.status.code().is_none(), "{point}: not aborted");
        assert_eq!(count(&idx), 100, "{point}");
    }
    // An addition killed mid-save, a calibration killed between head and manifest.
    let extra = exemplars(&dir, 10, "extra");
    for point in ["index-save:2", "index-swap"] {
        let out = semtel_cmd(&[
            "index",
            "add",
            "--index",
            &s(&idx),
            "--exemplars",
            &s(&extra),
        ])
        .arg("--model")
        .arg(model_dir())
        .env("SEMTEL_ABORT_AT", point)
        .output()
        .unwrap();
        assert!(out.status.code().is_none(), "add {point}: not aborted");
        assert_eq!(count(&idx), 100, "add {point}");
    }
    let out = semtel_cmd(&["calibrate", "--index", &s(&idx)])
        .arg("--model")
        .arg(model_dir())
        .env("SEMTEL_ABORT_AT", "calibrate-head-saved")
        .output()
        .unwrap();
    assert!(out.status.code().is_none(), "calibrate: not aborted");
    assert_eq!(count(&idx), 100);
    // Then each finishes, and nothing of the killed runs is left beside the index.
    ok(semtel_cmd(&[
        "index",
        "add",
        "--index",
        &s(&idx),
        "--exemplars",
        &s(&extra),
    ])
    .arg("--model")
    .arg(model_dir())
    .output()
    .unwrap());
    assert_eq!(count(&idx), 110);
    ok(semtel_cmd(&[
        "index",
        "build",
        "--exemplars",
        &s(&sixty),
        "--out",
        &s(&idx),
        "--overwrite",
    ])
    .arg("--model")
    .arg(model_dir())
    .output()
    .unwrap());
    assert_eq!(count(&idx), 60);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("staging") || n.contains("previous"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
