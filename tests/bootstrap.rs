//! Cold start and model alignment against the loopback simulator: `semtel bootstrap` from a
//! taxonomy and unlabelled conversations (budget, rounds, report, resume after a kill without
//! paying twice), and `semtel llm compare`.

mod common;
use common::*;
use semtel::llm::simulator::{self, SimConfig, SimHandle};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

const LABELS: [&str; 10] = [
    "career",
    "coding",
    "cooking",
    "finance",
    "health",
    "language",
    "math",
    "tech_support",
    "travel",
    "writing",
];

fn taxonomy(dir: &Path) -> PathBuf {
    let mut t = String::from("[labels]\n");
    for l in LABELS {
        t.push_str(&format!(
            "{l} = \"conversations about {}\"\n",
            l.replace('_', " ")
        ));
    }
    t.push_str("[examples]\ncooking = [\"how long do I boil an egg\"]\n");
    let p = dir.join("taxonomy.toml");
    std::fs::write(&p, t).unwrap();
    p
}

fn sim(error_rate: f64, seed: u64) -> SimHandle {
    let opts = semtel::input::InputOptions::default();
    let mut truth =
        simulator::truth_from_file(&repo().join("data/conversations.jsonl"), &opts).unwrap();
    truth.extend(simulator::truth_from_file(&repo().join("data/exemplars.jsonl"), &opts).unwrap());
    simulator::start(
        SimConfig {
            truth,
            latency_ms: 5.0,
            jitter_ms: 1.0,
            error_rate,
            seed,
            ..Default::default()
        },
        0,
    )
    .unwrap()
}

fn llm_config(dir: &Path, name: &str, h: &SimHandle) -> PathBuf {
    common::sim_llm_config(&dir.join(name), &h.url(), "narrow_above = 0")
}

fn bootstrap(
    dir: &Path,
    cfg: &Path,
    extra: &[&str],
    abort_at: Option<&str>,
) -> std::process::Output {
    let mut c = semtel_cmd(&["bootstrap"]);
    c.args(["--input", "data/conversations.jsonl", "--labels"])
        .arg(taxonomy(dir))
        .arg("--llm")
        .arg(cfg)
        .arg("--out")
        .arg(dir.join("idx"))
        .arg("--model")
        .arg(model_dir())
        .args(["--json"])
        .args(extra);
    match abort_at {
        Some(a) => c.env("SEMTEL_ABORT_AT", a),
        None => c.env_remove("SEMTEL_ABORT_AT"),
    };
    c.output().unwrap()
}

#[test]
fn bootstrap_builds_a_calibrated_index_from_llm_labels_and_resumes_without_paying_twice() {
    let dir = tmpdir("bootstrap");
    let h = sim(0.0, 7);
    let cfg = llm_config(&dir, "llm.toml", &h);
    let args = ["--budget-rows", "30", "--rounds", "3", "--holdout", "0.2"];
    // Killed at its third LLM answer…
    let o = bootstrap(&dir, &cfg, &args, Some("llm-reply:3"));
    assert!(!o.status.success());
    let first = h.state.stats.items_answered.load(Relaxed);
    // …and run again: it continues where it stopped.
    let out = ok(bootstrap(&dir, &cfg, &args, None));
    let report: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let total = h.state.stats.items_answered.load(Relaxed);
    assert_eq!(report["labelled_rows"], 30, "{report}");
    // Paid at most once per row, plus the calls in flight when it was killed.
    assert!(
        total <= 30 + 4 * 8,
        "{first} + {} items asked for 30 rows",
        total - first
    );
    // Every labelled row once in the work folder; the index holds the LLM's labels.
    let work = dir.join("idx.bootstrap");
    let lines = std::fs::read_to_string(work.join("labelled.jsonl")).unwrap();
    let ids: Vec<String> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 30);
    let html = std::fs::read_to_string(work.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("round"), "{html}");
    let index = semtel::index::ExemplarIndex::open(&dir.join("idx"), true).unwrap();
    assert_eq!(index.len(), 30, "held-back rows join the final index");
    for e in index.exemplars() {
        assert_eq!(e.source, "llm");
        assert_eq!(e.llm_model.as_deref(), Some("sim-1"));
        assert!(e.prompt_version.is_some());
        assert!(unique.contains(&e.id));
    }
    drop(index);
    let rounds = report["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty() && rounds.len() <= 3);
    assert!(
        report["hybrid_per_million_usd"].as_f64().unwrap()
            <= report["llm_only_per_million_usd"].as_f64().unwrap()
    );
    // The bootstrapped index classifies (with the simulator answering what it escalates).
    let labels_out = dir.join("labels.jsonl");
    ok(semtel_cmd(&["classify"])
        .args(["--input", "data/conversations.jsonl", "--index"])
        .arg(dir.join("idx"))
        .arg("--output")
        .arg(&labels_out)
        .arg("--llm")
        .arg(&cfg)
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap());
    let rows = std::fs::read_to_string(&labels_out).unwrap();
    assert_eq!(rows.lines().count(), 50);
    // An index already at --out is not replaced unless asked.
    let o = bootstrap(&dir, &cfg, &args, None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
}

/// (With the labels taken from a Prompty file's front matter.)
#[test]
fn random_sampling_and_a_dollar_budget_work_too() {
    let dir = tmpdir("bootstrap-random");
    let h = sim(0.0, 7);
    let cfg = llm_config(&dir, "llm.toml", &h);
    let out = ok(bootstrap(
        &dir,
        &cfg,
        &[
            "--budget-usd",
            "0.05",
            "--sampling",
            "random",
            "--rounds",
            "1",
        ],
        None,
    ));
    let report: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(
        report["spent_usd"].as_f64().unwrap() <= 0.05 * 1.2,
        "{report}"
    );
    assert!(report["labelled_rows"].as_u64().unwrap() >= 10, "{report}");
    assert!(report["labels_unused"].as_array().unwrap().len() < LABELS.len());
}

#[test]
fn llm_compare_reports_agreement_and_kappa() {
    let dir = tmpdir("llm-compare");
    let idx = sample_index(&dir);
    let good = sim(0.0, 1);
    let same = sim(0.0, 2);
    let wrong = sim(1.0, 3);
    let (a, b, c) = (
        llm_config(&dir, "a.toml", &good),
        llm_config(&dir, "b.toml", &same),
        llm_config(&dir, "c.toml", &wrong),
    );
    let compare = |x: &Path, y: &Path| -> serde_json::Value {
        let out = ok(semtel_cmd(&["llm", "compare"])
            .args(["--input", "data/conversations.jsonl", "--json", "--index"])
            .arg(&idx)
            .arg("--a")
            .arg(x)
            .arg("--b")
            .arg(y)
            .arg("--model")
            .arg(model_dir())
            .output()
            .unwrap());
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    };
    // Two LLMs that answer the truth agree on everything, and no exemplar changes.
    let r = compare(&a, &b);
    assert_eq!(r["compared"], 50, "{r}");
    assert_eq!(r["agreement"], 1.0);
    assert!((r["kappa"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(r["exemplars_changed"].as_array().unwrap().len(), 0);
    // One always wrong: no agreement, kappa at or below chance, every exemplar would change.
    let r = compare(&a, &c);
    assert_eq!(r["agreement"], 0.0, "{r}");
    assert!(r["kappa"].as_f64().unwrap() <= 0.0);
    assert!(!r["confusions"].as_array().unwrap().is_empty());
    assert_eq!(
        r["exemplars_changed"].as_array().unwrap().len() as u64,
        r["exemplars_checked"].as_u64().unwrap()
    );
}
