//! The embedder agrees with sentence-transformers on the same texts (cosine ≥ 0.999), counts
//! tokens like the model's tokenizer, and is deterministic across batch compositions.

mod common;
use common::*;
use semtel::embed::{Encoder, EncoderOptions, Engine};

fn encoder() -> Encoder {
    encoder_with(Engine::Auto)
}

fn encoder_with(engine: Engine) -> Encoder {
    Encoder::load(&EncoderOptions {
        model: Some(model_dir().display().to_string()),
        engine,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn matches_sentence_transformers_reference() {
    check_reference(&encoder());
}

/// The portable engine is checked whatever engine `auto` picks on this CPU.
#[test]
fn candle_engine_matches_sentence_transformers_reference() {
    let enc = encoder_with(Engine::Candle);
    assert!(enc.engine.describe().starts_with("candle-bert f32"));
    check_reference(&enc);
}

fn check_reference(enc: &Encoder) {
    let mut min_cos = f32::MAX;
    let mut n = 0;
    for (name, rows) in reference_sets() {
        let texts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let got = enc.embed_texts(&texts).unwrap();
        let d = enc.dim();
        for (i, (text, tokens, want)) in rows.iter().enumerate() {
            let c = cosine(&got[i * d..(i + 1) * d], want);
            assert!(
                c >= 0.999,
                "{name}: cosine {c} for {:?}",
                &text[..text.len().min(60)]
            );
            // Token counts include the model's [CLS] and [SEP].
            assert_eq!(
                enc.renderer.count_tokens(text).unwrap() + 2,
                *tokens,
                "{name}: token count for {:?}",
                &text[..text.len().min(60)]
            );
            min_cos = min_cos.min(c);
            n += 1;
        }
    }
    assert!(n >= 40);
    eprintln!("min cosine over {n} reference texts: {min_cos:.6}");
}

#[test]
fn batch_composition_does_not_change_vectors() {
    let enc = encoder();
    let texts = [
        "short",
        "a somewhat longer sentence about refunds and card payments",
        "k",
    ];
    let all = enc.embed_texts(&texts).unwrap();
    let d = enc.dim();
    for (i, t) in texts.iter().enumerate() {
        let one = enc.embed_texts(&[t]).unwrap();
        assert!(cosine(&one, &all[i * d..(i + 1) * d]) > 0.99999);
        let norm: f32 = one.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}

#[test]
fn refuses_tampered_default_model() {
    let dir = tmpdir("tampered-model");
    let src = model_dir();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // Flip one byte of the weights.
    let w = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let target = dir.parent().unwrap().join("all-MiniLM-L6-v2");
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&dir, &target).unwrap();
    let err = Encoder::load(&EncoderOptions {
        model: Some(target.display().to_string()),
        ..Default::default()
    })
    .err()
    .expect("tampered weights must be refused")
    .to_string();
    assert!(
        err.contains("sha256") && err.contains("fetch-model"),
        "{err}"
    );
}

#[test]
fn missing_model_says_how_to_get_it() {
    let err = Encoder::load(&EncoderOptions {
        model: Some("/nonexistent/all-MiniLM-L6-v2".into()),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("scripts/fetch-model"), "{err}");
}
