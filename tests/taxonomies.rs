//! Calibration with the learned head, several taxonomies from one embedding pass (one of them
//! multi-label), and the static-embedding tier, on the bundled sample.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn semtel(args: &[&str]) -> Output {
    semtel_cmd(args).output().expect("run semtel")
}

fn group_of(label: &str) -> &'static str {
    match label {
        "coding" | "math" | "tech_support" => "technical",
        "writing" | "language" | "career" => "communication",
        _ => "lifestyle",
    }
}

/// The sample files with a coarse `group` label and a multi-label `tags` list added.
fn derived(dir: &Path, name: &str) -> PathBuf {
    let mut out = String::new();
    for l in std::fs::read_to_string(repo().join("data").join(name))
        .unwrap()
        .lines()
    {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let label = v["label"].as_str().unwrap().to_string();
        v["group"] = group_of(&label).into();
        v["tags"] = serde_json::json!([label, group_of(&label)]);
        out.push_str(&v.to_string());
        out.push('\n');
    }
    let p = dir.join(name);
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn calibrate_trains_a_head_and_sets_per_label_thresholds() {
    let dir = tmpdir("calibrate");
    let idx = dir.join("idx");
    let m = model_dir();
    let (i, md) = (idx.to_str().unwrap(), m.to_str().unwrap());
    ok(semtel(&[
        "index",
        "build",
        "--exemplars",
        "data/exemplars.jsonl",
        "--out",
        i,
        "--model",
        md,
    ]));
    let rep = ok(semtel(&[
        "calibrate",
        "--index",
        i,
        "--target",
        "0.9",
        "--json",
        "--model",
        md,
    ]));
    let v: serde_json::Value = serde_json::from_str(rep.lines().next().unwrap()).unwrap();
    assert_eq!(v["rows"], 100);
    assert!(v["signals"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["signal"] == "head"));
    assert!(idx.join("head.safetensors").is_file());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(idx.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["decision"]["signal"], v["signal"]);
    assert!(manifest["decision"]["calibration"]["expected_coverage"]["lo"].is_number());
    // The calibrated index classifies, and eval reports what its thresholds keep.
    let e = ok(semtel(&[
        "eval",
        "--index",
        i,
        "--input",
        "data/conversations.jsonl",
        "--json",
        "--model",
        md,
    ]));
    let r: serde_json::Value = serde_json::from_str(e.lines().next().unwrap()).unwrap();
    assert!(r["accuracy"].as_f64().unwrap() > 0.8, "{r}");
    assert!(r["at_index_thresholds"]["coverage"].as_f64().unwrap() > 0.0);
    // Budget mode: at most 30 % escalated on the calibration rows.
    let rep = ok(semtel(&[
        "calibrate",
        "--index",
        i,
        "--budget",
        "0.3",
        "--json",
        "--model",
        md,
    ]));
    let v: serde_json::Value = serde_json::from_str(rep.lines().next().unwrap()).unwrap();
    assert!(
        v["expected_coverage"]["value"].as_f64().unwrap() >= 0.69,
        "{v}"
    );
}

#[test]
fn several_taxonomies_from_one_embedding_pass() {
    let dir = tmpdir("taxonomies");
    let m = model_dir();
    let md = m.to_str().unwrap();
    let ex = derived(&dir, "exemplars.jsonl");
    let conv = derived(&dir, "conversations.jsonl");
    let (task, group, tags) = (dir.join("task"), dir.join("group"), dir.join("tags"));
    let build = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "index",
            "build",
            "--exemplars",
            ex.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--model",
            md,
        ];
        args.extend_from_slice(extra);
        ok(semtel(&args))
    };
    build(&task, &[]);
    build(&group, &["--label-col", "group"]);
    build(&tags, &["--label-col", "tags", "--multi-label"]);
    let out = dir.join("out.jsonl");
    ok(semtel(&[
        "classify",
        "--index",
        task.to_str().unwrap(),
        "--input",
        conv.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--also",
        &format!("group={}", group.display()),
        "--also",
        &format!("tags={}", tags.display()),
        "--passthrough",
        "group,tags",
        "--model",
        md,
    ]));
    let rows = common::read_jsonl(&out);
    assert_eq!(rows.len(), 50);
    let mut group_right = 0;
    let mut tags_right = 0;
    for r in &rows {
        assert!(
            r["group_label"].is_string() && r["group_confidence"].is_number(),
            "{r}"
        );
        assert!(["knn", "escalate"].contains(&r["group_decided_by"].as_str().unwrap()));
        group_right += usize::from(r["group_label"] == r["group"]);
        let got: Vec<String> = serde_json::from_value(r["tags_labels"].clone()).unwrap();
        let mut want: Vec<String> = serde_json::from_value(r["tags"].clone()).unwrap();
        want.sort();
        tags_right += usize::from(got == want);
    }
    // Coarse groups are easier than tasks; the label set has to match exactly for tags.
    assert!(group_right >= 42, "group right {group_right}/50");
    assert!(tags_right >= 30, "tags right {tags_right}/50");
    // The same taxonomies reach a Parquet output with typed columns.
    let pq = dir.join("out.parquet");
    ok(semtel(&[
        "classify",
        "--index",
        task.to_str().unwrap(),
        "--input",
        conv.to_str().unwrap(),
        "--output",
        pq.to_str().unwrap(),
        "--also",
        &format!("tags={}", tags.display()),
        "--model",
        md,
    ]));
    // Multi-label evaluation.
    let eval_tags = || -> serde_json::Value {
        let e = ok(semtel(&[
            "eval",
            "--index",
            tags.to_str().unwrap(),
            "--input",
            conv.to_str().unwrap(),
            "--label-col",
            "tags",
            "--json",
            "--model",
            md,
        ]));
        serde_json::from_str(e.lines().next().unwrap()).unwrap()
    };
    let v = eval_tags();
    let vote_f1 = v["micro_f1"].as_f64().unwrap();
    assert!(vote_f1 > 0.8, "{v}");
    assert!(
        v["kept"].is_null(),
        "no per-label verdicts before calibration: {v}"
    );

    // Calibrating the multi-label index trains the one-vs-rest head and per-label rules
    // (cross-validated over the exemplar rows): it must not escalate everything or report 0.
    let c = ok(semtel(&[
        "calibrate",
        "--index",
        tags.to_str().unwrap(),
        "--json",
        "--model",
        md,
    ]));
    let r: serde_json::Value = serde_json::from_str(c.lines().next().unwrap()).unwrap();
    // Cross-validated on 100 rows (8 per task label in each fold's training): modest figures.
    assert!(r["head"]["micro_f1"].as_f64().unwrap() > 0.6, "{r}");
    assert!(r["vote"]["micro_f1"].as_f64().unwrap() > 0.5, "{r}");
    assert!(r["kept"]["verdicts_kept"].as_f64().unwrap() > 0.5, "{r}");
    // Held-out rows without the label column: a clear error, and the calibration stands.
    let bad = semtel(&[
        "calibrate",
        "--index",
        tags.to_str().unwrap(),
        "--labelled",
        conv.to_str().unwrap(),
        "--label-col",
        "no_such_column",
        "--model",
        md,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--label-col"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tags.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["decision"]["signal"], "multi_head");
    assert!(
        manifest["decision"]["label_rules"]
            .as_object()
            .unwrap()
            .len()
            >= 2
    );
    let v = eval_tags();
    assert!(v["micro_f1"].as_f64().unwrap() > 0.75, "{v}");
    let kept = &v["kept"];
    assert!(kept["verdicts_kept"].as_f64().unwrap() > 0.3, "{v}");
    // Classify: the head's label set plus the labels it escalated, per row.
    let out = dir.join("out-head.jsonl");
    ok(semtel(&[
        "classify",
        "--index",
        task.to_str().unwrap(),
        "--input",
        conv.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--also",
        &format!("tags={}", tags.display()),
        "--model",
        md,
    ]));
    for l in std::fs::read_to_string(&out).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        let labels = r["tags_labels"].as_array().expect("a label set");
        let uncertain = r["tags_uncertain"]
            .as_array()
            .expect("the escalated labels");
        assert!(!labels.is_empty(), "{r}");
        let by = r["tags_decided_by"].as_str().unwrap();
        assert_eq!(by == "knn", uncertain.is_empty(), "{r}");
    }
}

#[test]
fn static_tier_distils_and_classifies() {
    let dir = tmpdir("static");
    let m = model_dir();
    let st = dir.join("minilm-static");
    ok(semtel(&[
        "static",
        "distill",
        "--out",
        st.to_str().unwrap(),
        "--dims",
        "128",
        "--corpus",
        "data/exemplars.jsonl",
        "--model",
        m.to_str().unwrap(),
    ]));
    assert!(st.join("static.safetensors").is_file());
    let idx = dir.join("idx");
    ok(semtel(&[
        "index",
        "build",
        "--exemplars",
        "data/exemplars.jsonl",
        "--out",
        idx.to_str().unwrap(),
        "--model",
        st.to_str().unwrap(),
    ]));
    let e = ok(semtel(&[
        "eval",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        "data/conversations.jsonl",
        "--json",
        "--model",
        st.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(e.lines().next().unwrap()).unwrap();
    // A bag of distilled token vectors is weaker than the transformer but far above chance (10 %).
    assert!(v["accuracy"].as_f64().unwrap() > 0.5, "{v}");
    // An index built with the static model refuses the transformer.
    let o = Command::new(bin())
        .args([
            "eval",
            "--index",
            idx.to_str().unwrap(),
            "--input",
            "data/conversations.jsonl",
            "--model",
        ])
        .arg(&m)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!o.status.success());
}
