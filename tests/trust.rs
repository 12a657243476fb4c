//! Kept decisions off the exemplars' distribution: the novelty rule (fitted by calibration,
//! escalating rows far from their label), audit sampling (kept rows asked blind, realised
//! kept-accuracy estimated), guards (a segment the LLM disagrees with is escalated, across
//! `--resume`), and the drift report (`semtel monitor`, exit 3 on an alert). The LLM is the
//! loopback simulator; the model is the real one.

mod common;
use common::*;
use semtel::llm::simulator::{self, SimConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `semtel -q ARGS…` from the repository root (more arguments may follow).
fn semtel(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("-q").args(args).current_dir(repo());
    c
}

/// The JSON a successful run printed on stdout.
fn stdout_json(out: std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The bundled exemplars without `drop` labels, as a file in `dir`.
fn exemplars_without(dir: &Path, drop: &[&str]) -> PathBuf {
    let p = dir.join("exemplars.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(repo().join("data/exemplars.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            !drop.contains(&v["label"].as_str().unwrap())
        })
        .map(String::from)
        .collect();
    std::fs::write(&p, kept.join("\n") + "\n").unwrap();
    p
}

fn build(dir: &Path, exemplars: &Path) -> PathBuf {
    let idx = dir.join("idx");
    ok(semtel(&["index", "build", "--exemplars"])
        .arg(exemplars)
        .arg("--out")
        .arg(&idx)
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap());
    idx
}

fn manifest(idx: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(idx.join("manifest.json")).unwrap()).unwrap()
}

/// `copies` copies of the bundled conversations (unique ids, the same texts), in order.
fn stream(dir: &Path, copies: usize) -> PathBuf {
    let p = dir.join("stream.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(repo().join("data/conversations.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut out = String::new();
    for c in 0..copies {
        for l in &lines {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] = format!("{}-{c}", v["id"].as_str().unwrap()).into();
            out.push_str(&v.to_string());
            out.push('\n');
        }
    }
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn novelty_is_fitted_reported_and_escalates_rows_of_labels_the_index_lacks() {
    let dir = tmpdir("trust-novelty");
    let absent = ["cooking", "travel"];
    let idx = build(&dir, &exemplars_without(&dir, &absent));
    // index build fits the rule at the default rate.
    let m = manifest(&idx);
    let n = &m["decision"]["novelty"];
    assert_eq!(n["score"], "label_conformal", "{m}");
    assert_eq!(n["rate"], 0.01);
    assert_eq!(n["pooled"].as_array().unwrap().len(), 101);
    // calibrate refits it at the asked rate and checks it by leaving labels out.
    let out = semtel(&["calibrate", "--index"])
        .arg(&idx)
        .args(["--novelty-rate", "0.3", "--json", "--folds", "2"])
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = stdout_json(out);
    assert!(stderr.contains("leave-labels-out"), "{stderr}");
    let check = &report["novelty"]["check"];
    assert!(check["auroc"].as_f64().unwrap() > 0.5, "{report}");
    assert_eq!(manifest(&idx)["decision"]["novelty"]["rate"], 0.3);
    // Rows of the absent labels are farther from their voted label than the others.
    let out_path = dir.join("out.jsonl");
    ok(semtel(&["classify", "--index"])
        .arg(&idx)
        .args(["--input", "data/conversations.jsonl", "--output"])
        .arg(&out_path)
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap());
    let gold: HashMap<String, String> = read_jsonl(&repo().join("data/conversations.jsonl"))
        .into_iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().into(),
                v["label"].as_str().unwrap().into(),
            )
        })
        .collect();
    let (mut seen, mut unseen) = (Vec::new(), Vec::new());
    let mut novel_unseen = 0;
    for r in read_jsonl(&out_path) {
        let score = r["novelty"]
            .as_f64()
            .expect("every decided row has a novelty");
        assert!((0.0..=1.0).contains(&score));
        if absent.contains(&gold[r["id"].as_str().unwrap()].as_str()) {
            unseen.push(score);
            novel_unseen += usize::from(r["escalate_reason"] == "novel");
        } else {
            seen.push(score);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&unseen) > mean(&seen), "{unseen:?} vs {seen:?}");
    assert!(novel_unseen > 0, "no absent-label row escalated as novel");
    // --novelty off: no row escalates as novel.
    let off = dir.join("off.jsonl");
    ok(semtel(&["classify", "--index"])
        .arg(&idx)
        .args([
            "--input",
            "data/conversations.jsonl",
            "--novelty",
            "off",
            "--output",
        ])
        .arg(&off)
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap());
    assert!(read_jsonl(&off)
        .iter()
        .all(|r| r["escalate_reason"] != "novel"));
    // eval says what the rule did, on the rows of labels the index lacks too.
    let ev = semtel(&["eval", "--index"])
        .arg(&idx)
        .args([
            "--input",
            "data/conversations.jsonl",
            "--report-label",
            "cooking",
        ])
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap();
    let text = ok(ev);
    assert!(text.contains("escalated as novel"), "{text}");
    assert!(
        text.contains("rows of labels the index lacks: 10"),
        "{text}"
    );
}

/// A simulator whose truth is the bundled conversations' labels, except that every `finance`
/// conversation is said to be `career` (kNN keeps them as finance: the LLM disagrees).
fn disagreeing_sim() -> simulator::SimHandle {
    let (mut truth, _) = sample_truth();
    for v in truth.values_mut() {
        if v == "finance" {
            *v = "career".into();
        }
    }
    simulator::start(
        SimConfig {
            truth,
            ..Default::default()
        },
        0,
    )
    .unwrap()
}

#[test]
fn audits_estimate_kept_accuracy_and_guards_stop_keeping_a_segment_the_llm_disagrees_with() {
    let dir = tmpdir("trust-guards");
    let idx = build(&dir, &repo().join("data/exemplars.jsonl"));
    let sim = disagreeing_sim();
    let cfg = sim_llm_config(&dir.join("llm.toml"), &sim.url(), "");
    // 36 copies: the detector reads some of the bundled English texts as other languages,
    // whose rows start on probation and speak for their language only, so a label needs
    // this many to gather its 20 audited rows.
    let copies = 36;
    let input = stream(&dir, copies);
    let out_path = dir.join("out.jsonl");
    let run = |extra: &[&str]| {
        semtel(&["classify", "--index"])
            .arg(&idx)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out_path)
            .arg("--llm")
            .arg(&cfg)
            .args(["--chunk-rows", "25", "--json", "--audit-seed", "3"])
            .args(extra)
            .arg("--model")
            .arg(model_dir())
            .output()
            .unwrap()
    };
    // --audit-rate needs an LLM.
    let refused = semtel(&["classify", "--index"])
        .arg(&idx)
        .args([
            "--input",
            "data/conversations.jsonl",
            "--audit-rate",
            "0.5",
            "--output",
        ])
        .arg(dir.join("no-llm.jsonl"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--audit-rate needs --llm"));

    // 1,800 rows, 60 % of the kept ones audited.
    let summary = stdout_json(run(&["--audit-rate", "0.6", "--overwrite"]));
    let audit = &summary["audit"];
    assert!(audit["audited"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        audit["llm_accuracy_source"]
            .as_str()
            .unwrap()
            .starts_with("assumed 1.0"),
        "{audit}"
    );
    // The LLM disagrees on finance only: its segment's agreement is 0.
    let finance = &audit["by_label"]["finance"];
    assert_eq!(finance["agreed"], 0, "{audit}");
    assert!(finance["answered"].as_u64().unwrap() > 0);
    let rows = read_jsonl(&out_path);
    assert_eq!(rows.len(), copies * 50);
    for r in &rows {
        match r["audit"].as_str() {
            Some(v) => {
                assert_eq!(r["decided_by"], "knn", "only kept rows are audited: {r}");
                assert!(["agree", "disagree", "missing"].contains(&v));
                if v == "disagree" {
                    assert_ne!(r["audit_label"], r["label"]);
                }
            }
            None => assert!(r.get("audit_label").is_none()),
        }
    }
    // The guard on label:finance tripped during the run (evidence arrives as the LLM answers,
    // so how many rows it caught in this run depends on timing: all of them after resume).
    // English as a whole is not switched off for one bad label.
    let guards = &summary["guards"];
    assert!(guards["trips"].as_u64().unwrap() >= 1, "{guards}");
    assert!(
        guards["tripped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "label:finance"),
        "{guards}"
    );
    assert!(
        !guards["tripped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "lang:en"),
        "{guards}"
    );
    let guarded = rows
        .iter()
        .filter(|r| r["escalate_reason"] == "guard")
        .count();
    assert_eq!(
        summary["escalated_guard"].as_u64().unwrap() as usize,
        guarded
    );
    // Guarded rows belong to labels that tripped (the LLM also disagrees with some `writing`
    // rows of this small set: a real trip too).
    let tripped: Vec<String> = guards["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            e["segment"]
                .as_str()?
                .strip_prefix("label:")
                .map(String::from)
        })
        .collect();
    // Or to a language the exemplars do not cover (on probation, or with the threshold its
    // rows taught since): the bundled set is small, and the detector reads some of its short
    // English texts as other languages.
    let mut languages: Vec<String> = guards["probation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    languages.extend(
        guards["learned_language_thresholds"]
            .as_object()
            .unwrap()
            .keys()
            .cloned(),
    );
    for r in rows.iter().filter(|r| r["escalate_reason"] == "guard") {
        assert!(
            tripped.iter().any(|t| r["knn_label"] == t.as_str())
                || languages.iter().any(|l| r["lang"] == l.as_str()),
            "{r} not of {tripped:?} nor of {languages:?}"
        );
    }
    let state = dir.join("out.jsonl.guards.json");
    assert!(state.exists());

    // --resume keeps the guard: no finance row of the new part is kept.
    let more = stream(&dir, copies + 2);
    let resumed = semtel(&["classify", "--index"])
        .arg(&idx)
        .arg("--input")
        .arg(&more)
        .arg("--output")
        .arg(&out_path)
        .arg("--llm")
        .arg(&cfg)
        .args(["--resume", "--audit-rate", "0.6", "--json"])
        .arg("--model")
        .arg(model_dir())
        .output()
        .unwrap();
    ok(resumed);
    let rows = read_jsonl(&out_path);
    assert_eq!(rows.len(), (copies + 2) * 50);
    let mut caught = 0;
    for r in &rows[copies * 50..] {
        assert!(
            !(r["decided_by"] == "knn" && r["label"] == "finance"),
            "a guarded segment was kept: {r}"
        );
        caught += usize::from(r["escalate_reason"] == "guard");
    }
    assert!(
        caught > 0,
        "no finance row was escalated by the guard after resume"
    );

    // A foreign state file is refused, never silently reset.
    std::fs::write(&state, b"{\"not\": \"guards\"}").unwrap();
    let refused = run(&["--audit-rate", "0.6", "--resume"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a semtel guard state"));

    // The drift report: the audit alert and exit code 3, an HTML page, JSON.
    std::fs::remove_file(&state).unwrap();
    let html = dir.join("drift.html");
    let json = dir.join("drift.json");
    let out = semtel(&["monitor", "--input"])
        .arg(&out_path)
        .args(["--window", "500rows", "--min-rows", "50", "--html"])
        .arg(&html)
        .arg("--json")
        .arg(&json)
        .arg("--index")
        .arg(&idx)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["rows"], (copies + 2) * 50);
    assert_eq!(report["windows"].as_array().unwrap().len(), 4);
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
}

#[test]
fn monitor_reads_bad_lines_and_time_windows_and_stays_quiet_on_steady_traffic() {
    let dir = tmpdir("trust-monitor");
    let p = dir.join("out.jsonl");
    let mut s = String::new();
    for i in 0..600 {
        let label = ["a", "b", "c"][i % 3];
        s.push_str(&format!(
            "{{\"id\":\"r{i}\",\"label\":\"{label}\",\"decided_by\":\"knn\",\"lang\":\"en\",\"ts\":\"2026-12-05T{:02}:{:02}:00Z\"}}\n",
            i / 60,
            i % 60
        ));
        if i == 10 {
            s.push_str("{broken json\n\u{0}\u{0}\n");
        }
    }
    std::fs::write(&p, s).unwrap();
    let out = semtel(&["monitor", "--input"])
        .arg(&p)
        .args(["--window", "1h", "--time-col", "ts", "--json", "-"])
        .output()
        .unwrap();
    let report = stdout_json(out);
    assert_eq!(report["unreadable_lines"], 2);
    assert_eq!(report["windows"].as_array().unwrap().len(), 10);
    assert!(report["alerts"].as_array().unwrap().is_empty());
    // A time window without a time column is refused with what to do.
    let out = semtel(&["monitor", "--input"])
        .arg(&p)
        .args(["--window", "1h"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--time-col"));
}

/// xSID rows of `lang` and `split` (the bundled multilingual set).
fn xsid(lang: &str, split: &str) -> Vec<serde_json::Value> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(repo().join("data/xsid/xsid.jsonl.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["lang"] == lang && v["split"] == split)
        .collect()
}

#[test]
fn languages_the_exemplars_do_not_cover_go_to_the_llm_until_their_rows_teach_a_threshold() {
    let dir = tmpdir("trust-probation");
    let e5 = repo().join("models/multilingual-e5-small");
    // English exemplars only; the traffic: English and Lithuanian test rows, interleaved.
    let ex = dir.join("exemplars.jsonl");
    let lines: Vec<String> = xsid("en", "valid")
        .iter()
        .map(|v| {
            serde_json::json!({"id": v["id"], "text": v["text"], "label": v["label"]}).to_string()
        })
        .collect();
    std::fs::write(&ex, lines.join("\n") + "\n").unwrap();
    let (en, lt) = (xsid("en", "test"), xsid("lt", "test"));
    let mut stream = String::new();
    let mut truth = HashMap::new();
    for (i, v) in en.iter().zip(&lt).flat_map(|(a, b)| [a, b]).enumerate() {
        let text = v["text"].as_str().unwrap();
        stream.push_str(&serde_json::json!({"id": format!("r{i}"), "text": text, "label": v["label"], "lang": v["lang"]}).to_string());
        stream.push('\n');
        truth.insert(
            simulator::truth_key(text),
            v["label"].as_str().unwrap().to_string(),
        );
    }
    let input = dir.join("stream.jsonl");
    std::fs::write(&input, stream).unwrap();
    let idx = dir.join("idx");
    ok(semtel(&["index", "build", "--exemplars"])
        .arg(&ex)
        .arg("--out")
        .arg(&idx)
        .arg("--model")
        .arg(&e5)
        .output()
        .unwrap());
    let sim = simulator::start(
        SimConfig {
            truth,
            latency_ms: 5.0,
            jitter_ms: 1.0,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let cfg = sim_llm_config(&dir.join("llm.toml"), &sim.url(), "");
    let run = |name: &str, guards: &str| {
        let out = dir.join(name);
        let summary = stdout_json(
            semtel(&["classify", "--index"])
                .arg(&idx)
                .arg("--input")
                .arg(&input)
                .arg("--output")
                .arg(&out)
                .arg("--llm")
                .arg(&cfg)
                .args(["--passthrough", "label,lang", "--json", "--guards", guards])
                .output()
                .unwrap(),
        );
        (summary, read_jsonl(&out))
    };
    let kept_of = |rows: &[serde_json::Value], lang: &str| {
        let kept: Vec<&serde_json::Value> = rows
            .iter()
            .filter(|r| r["input_lang"] == lang && r["decided_by"] == "knn")
            .collect();
        let right = kept
            .iter()
            .filter(|r| r["label"] == r["input_label"])
            .count();
        (kept.len(), right)
    };
    // Guards off: Lithuanian rows are kept on the English calibration.
    let (_, off) = run("off.jsonl", "off");
    let (lt_kept_off, _) = kept_of(&off, "lt");
    assert!(lt_kept_off > 100, "{lt_kept_off}");
    // Guards on (the default with an LLM): English is covered and kept as before; Lithuanian
    // (as the detector reads it) starts on probation, its rows kNN would keep go to the LLM,
    // and a threshold is learned from the answers.
    let (summary, on) = run("on.jsonl", "on");
    // (English rows the detector reads as another language are held like that language.)
    let en_kept = |rows: &[serde_json::Value]| {
        rows.iter()
            .filter(|r| r["input_lang"] == "en" && r["lang"] == "en" && r["decided_by"] == "knn")
            .count()
    };
    let (en_on, en_off) = (en_kept(&on), en_kept(&off));
    assert!(en_on + 10 >= en_off, "{en_on} vs {en_off}");
    let first_lt: Vec<&serde_json::Value> = on
        .iter()
        .filter(|r| r["lang"] == "lt" && r["knn_label"].is_string())
        .take(40)
        .collect();
    assert!(
        first_lt.iter().all(|r| r["decided_by"] != "knn"),
        "the first rows of a language on probation are never kept"
    );
    assert!(first_lt
        .iter()
        .any(|r| r["escalate_reason"] == "guard" && r["decided_by"] == "llm"));
    let guards = &summary["guards"];
    assert!(
        guards["learned_language_thresholds"]
            .as_object()
            .unwrap()
            .contains_key("lt"),
        "{guards}"
    );
    let (lt_kept_on, lt_right_on) = kept_of(&on, "lt");
    assert!(lt_kept_on < lt_kept_off, "{lt_kept_on} vs {lt_kept_off}");
    // What Lithuanian rows are still kept are kept by its own threshold (or read as another
    // language); no label guard tripped for English because of them.
    assert!(guards["tripped"].as_array().unwrap().is_empty(), "{guards}");
    eprintln!("lt kept {lt_kept_on} ({lt_right_on} right); off {lt_kept_off}");
}
