//! Fine-tuning: the differentiable encoder reproduces the reference embeddings, survives any
//! text, and `semtel tune` stores a tuned model that every command then loads by itself,
//! resumes from its checkpoint after a crash, and keeps the frozen encoder when there is too
//! little to learn from.

mod common;
use common::*;
use proptest::prelude::*;
use semtel::embed::{Encoder, EncoderOptions};
use semtel::index::ExemplarIndex;
use semtel::tune::TrainBert;
use std::path::{Path, PathBuf};

fn trainer() -> (TrainBert, Encoder) {
    let enc = Encoder::load(&EncoderOptions {
        model: Some(model_dir().display().to_string()),
        ..Default::default()
    })
    .unwrap();
    let m = TrainBert::load(
        &enc.files.weights,
        &enc.files.dir.join("config.json"),
        enc.files.pooling,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    (m, enc)
}

/// The training forward pass is the model: it agrees with sentence-transformers on the shared
/// reference texts (long dialogues, non-Latin scripts, emoji, code, one letter).
#[test]
fn training_forward_matches_reference() {
    let (m, enc) = trainer();
    let mut worst = f32::MAX;
    for (_, rows) in reference_sets() {
        let ids: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| enc.renderer.encode_head(&r.0).unwrap())
            .collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let got = m.embed(&refs, 4096).unwrap();
        for (i, r) in rows.iter().enumerate() {
            worst = worst.min(cosine(&got[i * 384..(i + 1) * 384], &r.2));
        }
    }
    assert!(worst >= 0.999, "worst cosine {worst}");
}

fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[\u{4e00}-\u{9fff}\u{0600}-\u{06ff}\u{0900}-\u{097f}\u{0400}-\u{04ff} ]{1,60}",
        "[a\u{0301}\u{0308}\u{200d}\u{1f468}\u{1f469}\u{1f3fd}\u{0000}]{1,40}",
        "x{500,3000}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Any text gives a finite unit vector through the training forward pass (and a finite
    /// contrastive loss gradient is built from such vectors).
    #[test]
    fn training_forward_is_finite_on_any_text(texts in prop::collection::vec(hostile(), 1..4)) {
        thread_local!(static M: (TrainBert, Encoder) = trainer());
        M.with(|(m, enc)| {
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| {
                enc.renderer
                    .render(&semtel::conversation::Content::Text(t.clone()))
                    .map(|r| r.ids)
                    .unwrap_or_else(|_| enc.renderer.encode_head("").unwrap())
            }).collect();
            let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            let v = m.embed(&refs, 4096).unwrap();
            for row in v.chunks(384) {
                let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                prop_assert!(row.iter().all(|x| x.is_finite()));
                prop_assert!((n - 1.0).abs() < 1e-3, "norm {n}");
            }
            Ok(())
        })?;
    }
}

/// 10 Banking77 intents × 14 training queries, plus hostile texts carrying a label.
fn labelled_file(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(shared().join("data/banking77/banking77.jsonl")).unwrap();
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    let mut out = String::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["split"] != "train" {
            continue;
        }
        let label = v["label"].as_str().unwrap().to_string();
        if per.len() >= 10 && !per.contains_key(&label) {
            continue;
        }
        let n = per.entry(label).or_default();
        if *n < 14 {
            *n += 1;
            out.push_str(l);
            out.push('\n');
        }
    }
    let hostile = [
        "我的卡还没到，已经两个星期了",
        "لم تصل بطاقتي بعد",
        "мою карту до сих пор не доставили",
        "मेरा कार्ड अभी तक नहीं आया",
        "👩🏽‍💻👨‍👩‍👧 card?? e\u{301}\u{308}",
        "nul\u{0}byte card",
    ];
    let label = per.keys().next().unwrap().clone();
    for (i, t) in hostile.iter().enumerate() {
        out.push_str(
            &serde_json::json!({"id": format!("hostile-{i}"), "text": t, "label": label})
                .to_string(),
        );
        out.push('\n');
    }
    let long = "x".repeat(20_000);
    out.push_str(&serde_json::json!({"id": "long", "text": long, "label": label}).to_string());
    out.push('\n');
    let p = dir.join("train.jsonl");
    std::fs::write(&p, out).unwrap();
    p
}

fn build(dir: &Path, file: &Path) -> PathBuf {
    let idx = dir.join("idx");
    ok(
        semtel_cmd(&["index", "build", "--out", idx.to_str().unwrap()])
            .arg("--exemplars")
            .arg(file)
            .arg("--model")
            .arg(model_dir())
            .output()
            .unwrap(),
    );
    idx
}

fn tune_cmd(idx: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = semtel_cmd(&["tune", "--index", idx.to_str().unwrap()]);
    c.args(extra).env_remove("SEMTEL_ABORT_AT");
    c
}

/// A crash mid-run loses nothing: the index is untouched, and the next run continues from the
/// checkpoint. The tuned model is then stored in the index, named by the manifest with its
/// digest, and loaded without being named by classify, eval and the fast engine.
#[test]
fn tune_resumes_after_a_crash_and_every_command_loads_the_tuned_model() {
    let dir = tmpdir("tune-e2e");
    let file = labelled_file(&dir);
    let idx = build(&dir, &file);
    let frozen = ExemplarIndex::open(&idx, true).unwrap().vectors().unwrap();
    let args = [
        "--epochs",
        "2",
        "--lr",
        "5e-5",
        "--batch-rows",
        "16",
        "--checkpoint-every",
        "0",
        "--json",
    ];
    let crashed = tune_cmd(&idx, &args)
        .env("SEMTEL_ABORT_AT", "tune-checkpoint:3")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the abort point was not reached");
    let m = ExemplarIndex::read_manifest(&idx).unwrap();
    assert!(
        m.model.tuned.is_none(),
        "a crashed tune must leave the index as it was"
    );
    assert!(idx.join(".tune/checkpoint/meta.json").is_file());

    let out = tune_cmd(&idx, &args).output().unwrap();
    let text = ok(out);
    let json: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap()).expect("--json line");
    assert_eq!(json["report"]["resumed_steps"], 3, "{text}");
    assert!(json["report"]["final_steps"].as_u64().unwrap() > 3);

    let m = ExemplarIndex::read_manifest(&idx).unwrap();
    let t = m.model.tuned.clone().expect("tuned model recorded");
    let folder = idx.join(&t.dir);
    assert_eq!(
        semtel::fsio::sha256_file(&folder.join("model.safetensors")).unwrap(),
        m.model.weights_sha256
    );
    assert_eq!(t.base_weights_sha256.len(), 64);
    assert_ne!(t.base_weights_sha256, m.model.weights_sha256);
    assert!(!idx.join(".tune").exists(), "the work area is removed");
    assert!(
        idx.join(semtel::head::HEAD_FILE).is_file(),
        "the head is retrained"
    );

    // The exemplars were re-embedded by the tuned model.
    let tuned = ExemplarIndex::open(&idx, true).unwrap().vectors().unwrap();
    let moved = frozen
        .chunks(384)
        .zip(tuned.chunks(384))
        .filter(|(a, b)| cosine(a, b) < 0.9999)
        .count();
    assert!(moved * 2 > frozen.len() / 384, "{moved} vectors moved");

    // Every engine runs the tuned folder and agrees on it.
    let folder_s = folder.display().to_string();
    let candle = Encoder::load(&EncoderOptions {
        model: Some(folder_s.clone()),
        engine: semtel::embed::Engine::Candle,
        ..Default::default()
    })
    .unwrap();
    let auto = Encoder::load(&EncoderOptions {
        model: Some(folder_s),
        ..Default::default()
    })
    .unwrap();
    let texts = ["my card has not arrived yet", "我的卡还没到", "x"];
    let a = candle.embed_texts(&texts).unwrap();
    let b = auto.embed_texts(&texts).unwrap();
    for (x, y) in a.chunks(384).zip(b.chunks(384)) {
        assert!(cosine(x, y) > 0.99, "{}", auto.engine.describe());
    }

    // classify and eval find the tuned model by themselves (no --model).
    let out_file = dir.join("labels.jsonl");
    ok(semtel_cmd(&["classify", "--index", idx.to_str().unwrap()])
        .arg("--input")
        .arg(&file)
        .arg("--output")
        .arg(&out_file)
        .output()
        .unwrap());
    let rows = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(rows.lines().count(), 147);
    let eval = ok(semtel_cmd(&["eval", "--index", idx.to_str().unwrap()])
        .arg("--input")
        .arg(&file)
        .output()
        .unwrap());
    assert!(eval.contains("accuracy"), "{eval}");
}

/// Too little to learn from: the frozen encoder stays and the index is unchanged.
#[test]
fn tune_keeps_the_frozen_encoder_when_there_is_too_little_data() {
    let dir = tmpdir("tune-small");
    let file = dir.join("few.jsonl");
    let mut s = String::new();
    for i in 0..12 {
        s.push_str(
            &serde_json::json!({"id": i, "text": format!("question number {i}"), "label": if i % 2 == 0 { "a" } else { "b" }})
                .to_string(),
        );
        s.push('\n');
    }
    std::fs::write(&file, s).unwrap();
    let idx = build(&dir, &file);
    let before = std::fs::read(idx.join("manifest.json")).unwrap();
    let text = ok(tune_cmd(&idx, &[]).arg("--json").output().unwrap());
    assert!(text.contains("kept the frozen encoder"), "{text}");
    assert_eq!(std::fs::read(idx.join("manifest.json")).unwrap(), before);
    assert!(!idx.join(".tune").exists());
}

/// A multi-label index tunes on label sets (positives share any label) and is re-calibrated
/// with the one-vs-rest head on the calibration fold the final run never saw.
#[test]
fn tune_handles_a_multi_label_index() {
    let dir = tmpdir("tune-multi");
    let single = labelled_file(&dir);
    let mut out = String::new();
    let mut kinds: Vec<String> = Vec::new();
    for l in std::fs::read_to_string(&single).unwrap().lines() {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let label = v["label"].as_str().unwrap().to_string();
        if !kinds.contains(&label) {
            kinds.push(label.clone());
        }
        let group = if kinds.iter().position(|k| *k == label).unwrap() % 2 == 0 {
            "even"
        } else {
            "odd"
        };
        v["label"] = serde_json::json!([label, group]);
        out.push_str(&v.to_string());
        out.push('\n');
    }
    let file = dir.join("multi.jsonl");
    std::fs::write(&file, out).unwrap();
    let idx = dir.join("idx");
    ok(semtel_cmd(&[
        "index",
        "build",
        "--multi-label",
        "--out",
        idx.to_str().unwrap(),
    ])
    .arg("--exemplars")
    .arg(&file)
    .arg("--model")
    .arg(model_dir())
    .output()
    .unwrap());
    let text = ok(tune_cmd(
        &idx,
        &["--epochs", "1", "--lr", "5e-5", "--batch-rows", "16"],
    )
    .output()
    .unwrap());
    assert!(text.contains("calibration fold"), "{text}");
    let m = ExemplarIndex::read_manifest(&idx).unwrap();
    let t = m.model.tuned.expect("tuned model recorded");
    assert!(t.calibration_share > 0.0);
    assert_eq!(m.decision.signal.name(), "multi_head");
    let eval = ok(semtel_cmd(&["eval", "--index", idx.to_str().unwrap()])
        .arg("--input")
        .arg(&file)
        .output()
        .unwrap());
    assert!(eval.contains("micro-F1"), "{eval}");
}
