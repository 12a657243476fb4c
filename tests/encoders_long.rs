//! The long-context encoders agree with sentence-transformers and survive any input:
//! EmbeddingGemma-300M (Gemma 3 run bidirectionally, a sliding window of 512 tokens on five of
//! every six layers, 2,048 positions, a Dense 768→3072→768 head, the classification prompt) and
//! nomic-embed-text-v1.5 (NomicBERT: rotary positions, SwiGLU, 2,048 positions, the
//! `classification: ` prefix, English).
//!
//! Reference vectors: sentence-transformers 6.3 with transformers 5.25 (f32, CPU) on the same
//! folders (`tests/fixtures/make_encoder_reference.py models/<name> …`; transformers' own
//! `gemma3_text` and `nomic_bert` forwards): the texts of the other encoders' references plus
//! dialogues and mixed-script texts of 250 to 2,500 tokens, so rows on both sides of Gemma's
//! sliding-window edge and past both models' maximum are checked.

mod common;
use common::*;
use proptest::prelude::*;
use semtel::conversation::{Content, Role, Turn};
use semtel::embed::{Encoder, EncoderOptions, Engine};
use semtel::model::Family;
use std::path::PathBuf;
use std::sync::OnceLock;

const DIR: &str = "embeddinggemma-300m";
const PROMPT: &str = "task: classification | query: ";
const NOMIC: &str = "nomic-embed-text-v1.5";

fn model_named(dir: &str) -> PathBuf {
    let p = repo().join("models").join(dir);
    assert!(
        p.join("model.safetensors").is_file(),
        "{} is missing: run `scripts/fetch-model {dir}` (scripts/test does it for you)",
        p.display()
    );
    p
}

fn load(dir: &str, engine: Engine) -> Encoder {
    Encoder::load(&EncoderOptions {
        model: Some(model_named(dir).display().to_string()),
        engine,
        ..Default::default()
    })
    .unwrap()
}

/// EmbeddingGemma on candle (the f32 path), loaded once for every test of this file (1.2 GB of
/// weights; `auto` picks the bf16 kernels where the CPU has them).
fn encoder() -> &'static Encoder {
    static E: OnceLock<Encoder> = OnceLock::new();
    E.get_or_init(|| load(DIR, Engine::Candle))
}

/// NomicBERT on candle (the f32 path; `auto` picks the bf16 kernels where the CPU has them).
fn nomic() -> &'static Encoder {
    static E: OnceLock<Encoder> = OnceLock::new();
    E.get_or_init(|| load(NOMIC, Engine::Candle))
}

/// Checks `enc` against a reference file: token counts, and cosine ≥ `bar` on every row of at
/// most `upto` tokens. Returns how many of them are longer than `long` tokens.
fn agrees_with_reference(
    enc: &Encoder,
    reference: &str,
    long: usize,
    upto: usize,
    bar: f32,
) -> usize {
    let rows = read_reference(&repo().join(reference));
    assert!(rows.len() >= 40);
    let rows: Vec<_> = rows.into_iter().filter(|r| r.1 <= upto).collect();
    let texts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let got = enc.embed_texts(&texts).unwrap();
    let d = enc.dim();
    let mut past = 0;
    let mut worst = (1.0f32, String::new());
    for (i, (text, tokens, want)) in rows.iter().enumerate() {
        let short: String = text.chars().take(60).collect();
        assert_eq!(
            enc.renderer.count_tokens(text).unwrap() + 2,
            *tokens,
            "token count for {short:?}"
        );
        let c = cosine(&got[i * d..(i + 1) * d], want);
        past += usize::from(*tokens > long);
        if c < worst.0 {
            worst = (c, short.clone());
        }
        assert!(
            c >= bar,
            "{reference}: cosine {c} for a text of {tokens} tokens: {short:?}"
        );
    }
    eprintln!("{reference}: worst cosine {:.6} ({:?})", worst.0, worst.1);
    past
}

#[test]
fn the_folder_describes_a_bidirectional_gemma_with_its_classification_prompt() {
    let enc = encoder();
    let arch = semtel::model::Architecture::read(&enc.files.dir).unwrap();
    assert_eq!(arch.family, Family::Gemma);
    assert_eq!(enc.files.prompt.as_deref(), Some(PROMPT));
    assert_eq!(enc.files.max_tokens, 2048);
    assert_eq!(enc.dim(), 768);
    assert_eq!(enc.files.id, "google/embeddinggemma-300m");
    let cfg = semtel::embed::GemmaConfig::read(&enc.files.dir).unwrap();
    assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (3, 1, 256));
    assert_eq!(cfg.window_radius, 256);
    assert_eq!(cfg.sliding.iter().filter(|s| !**s).count(), 4);
    // `auto` runs it on candle: the bf16 kernels cover BERT and MPNet layers.
    assert!(
        enc.engine.describe().contains("gemma"),
        "{}",
        enc.engine.describe()
    );
    // The prompt's space goes with the text (Gemma's tokenizer keeps spaces on the next
    // token): the ids are those of the prompt and the text tokenized together.
    let tok = enc.renderer.tokenizer();
    let together = tok
        .encode_fast(format!("{PROMPT}where is my card"), true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(
        enc.renderer.encode_head("where is my card").unwrap(),
        together
    );
    // Fine-tuning refuses it with a reason, not a crash.
    let e = semtel::tune::TrainBert::load(
        &enc.files.weights,
        &enc.files.dir.join("config.json"),
        enc.files.pooling,
        &candle_core::Device::Cpu,
    )
    .err()
    .expect("tune refuses Gemma");
    assert!(e.to_string().contains("Gemma"), "{e}");
}

#[test]
fn candle_forward_matches_sentence_transformers_across_the_sliding_window() {
    // candle's f32 forward takes seconds per 1,000-token row on two cores: rows up to 600
    // tokens here (both sides of the window's edge); the bf16 test below checks every row.
    let enc = encoder();
    let past = agrees_with_reference(enc, "tests/fixtures/gemma_reference.jsonl", 300, 600, 0.999);
    assert!(past >= 4, "{past} rows past the window's edge");
}

/// EmbeddingGemma on the bf16 kernels (grouped-query attention with the sliding window as a key
/// mask, RMSNorm and RoPE in f32, GeGLU): the bf16 bar against the f32 reference, across the
/// window's edge and past the maximum length.
#[test]
fn gemma_on_the_fast_engine_matches_the_reference() {
    if !semtel::embed::fast::kernels::supported() {
        eprintln!("skipped: this CPU lacks AVX512-BF16 (the fast engine cannot run here)");
        return;
    }
    let enc = load(DIR, Engine::Fast);
    assert!(
        enc.engine.describe().contains("gemma"),
        "{}",
        enc.engine.describe()
    );
    let past = agrees_with_reference(
        &enc,
        "tests/fixtures/gemma_reference.jsonl",
        300,
        4096,
        0.995,
    );
    assert!(past >= 8);
}

#[test]
fn nomic_is_described_by_its_folder_and_matches_the_reference() {
    let enc = nomic();
    let arch = semtel::model::Architecture::read(&enc.files.dir).unwrap();
    assert_eq!(arch.family, Family::Nomic);
    assert_eq!(enc.files.prompt.as_deref(), Some("classification: "));
    assert_eq!(enc.files.max_tokens, 2048);
    assert_eq!(enc.dim(), 768);
    assert!(enc.files.languages.covers("en") && !enc.files.languages.covers("zh"));
    // The tokenizer written from the GGUF's vocabulary gives BERT uncased's ids (MiniLM's
    // tokenizer.json is bert-base-uncased's) on every script.
    let bert =
        semtel::render::Renderer::from_file(&model_dir().join("tokenizer.json"), 512).unwrap();
    let texts: Vec<String> =
        std::fs::read_to_string(repo().join("tests/fixtures/multilingual.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_string))
            .collect();
    assert!(texts.len() > 100);
    for t in &texts {
        let a = enc
            .renderer
            .tokenizer()
            .encode_fast(t.as_str(), true)
            .unwrap();
        let b = bert.tokenizer().encode_fast(t.as_str(), true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{t:?}");
    }
    let long = agrees_with_reference(enc, "tests/fixtures/nomic_reference.jsonl", 512, 600, 0.999);
    assert!(long >= 4, "{long} rows past 512 tokens");
}

/// NomicBERT on the bf16 kernels (rotary positions on the QKV product, SwiGLU): the bf16 bar
/// against the f32 reference, and a batch split across threads equals the whole batch.
#[test]
fn nomic_on_the_fast_engine_matches_the_reference() {
    if !semtel::embed::fast::kernels::supported() {
        eprintln!("skipped: this CPU lacks AVX512-BF16 (the fast engine cannot run here)");
        return;
    }
    let enc = load(NOMIC, Engine::Fast);
    assert!(
        enc.engine.describe().contains("nomic"),
        "{}",
        enc.engine.describe()
    );
    let long = agrees_with_reference(
        &enc,
        "tests/fixtures/nomic_reference.jsonl",
        512,
        4096,
        0.995,
    );
    assert!(long >= 8, "{long} rows past 512 tokens");
    let rows = read_reference(&repo().join("tests/fixtures/nomic_reference.jsonl"));
    let seqs: Vec<Vec<u32>> = rows
        .iter()
        .take(12)
        .map(|r| enc.renderer.encode_head(&r.0).unwrap())
        .collect();
    let mut ids = Vec::new();
    let mut cu = vec![0];
    for s in &seqs {
        ids.extend_from_slice(s);
        cu.push(ids.len());
    }
    let whole = enc.engine.embed(&ids, &cu).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let split = pool.install(|| enc.engine.embed_split(&ids, &cu, 3, None).unwrap());
    assert!(whole
        .iter()
        .zip(&split)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// The multilingual fixture (every script, emoji, NUL, a 20 KB word, empty rows, dialogues)
/// through `index build` and `classify` on `auto` (the bf16 kernels where the CPU has them):
/// nomic with every second row, Gemma (about three times the work per token) every third. Exit 0 and one output row per input row;
/// the multilingual Gemma escalates no row for its language, the English nomic every
/// foreign-script one.
#[test]
fn multilingual_fixture_classifies_every_row() {
    let input = repo().join("tests/fixtures/multilingual.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    for (dir, step, multilingual) in [(DIR, 3, true), (NOMIC, 2, false)] {
        let tmp = tmpdir(&format!("long-fixture-{dir}"));
        let picked: Vec<&String> = lines.iter().step_by(step).collect();
        let subset = tmp.join("subset.jsonl");
        std::fs::write(
            &subset,
            picked.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let idx = tmp.join("idx");
        ok(semtel_cmd(&["index", "build"])
            .args(["--exemplars", "data/exemplars.jsonl", "--out"])
            .arg(&idx)
            .arg("--model")
            .arg(model_named(dir))
            .output()
            .unwrap());
        let out = tmp.join("out.jsonl");
        let printed = ok(semtel_cmd(&["classify", "--json"])
            .arg("--index")
            .arg(&idx)
            .arg("--input")
            .arg(&subset)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap());
        let got = read_jsonl(&out);
        assert_eq!(got.len(), picked.len(), "{dir}");
        assert!(got.iter().any(|r| r["decided_by"] != "error"), "{dir}");
        let summary: serde_json::Value =
            serde_json::from_str(printed.lines().next().unwrap()).unwrap();
        let gated = got
            .iter()
            .filter(|r| r["escalate_reason"] == "language")
            .count();
        if multilingual {
            assert_eq!(gated, 0, "{dir}: {summary}");
        } else {
            let foreign = got
                .iter()
                .filter(|r| {
                    ["zh", "ar", "ru", "ja", "ko", "hi"].contains(&r["lang"].as_str().unwrap_or(""))
                })
                .count();
            assert!(
                foreign > 10 && gated >= foreign,
                "{dir}: {gated} gated, {foreign} foreign"
            );
        }
    }
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            "我们今天讨论一下模型的训练", "Пожалуйста, объясните ", "من فضلك اشرح ",
            "कृपया विस्तार से ", "👩‍👩‍👧‍👦", "Z̷̢̛̖̝a̴̡̰̓", "\u{0}", "\u{feff}", " ", "\n",
            "xxxxxxxxxxxxxxxx", "<bos>", "<eos>", "<start_of_turn>",
        ])
        .prop_map(str::to_string),
        1 => any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec((piece(), 1usize..600), 0..6).prop_map(|runs| {
        runs.into_iter()
            .map(|(p, n)| p.repeat(n))
            .collect::<String>()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any text or dialogue renders within the model's 2,048 tokens with the prompt in front
    /// and the special tokens around it, or is refused with a reason; never a panic.
    #[test]
    fn any_input_renders_within_the_budget(
        t in text(),
        turns in proptest::collection::vec(text(), 0..4),
    ) {
        let enc = encoder();
        // <bos> and the prompt's ids, then the content, then <eos>.
        let mut prefix = enc.renderer.tokenizer().encode_fast(PROMPT.trim_end(), true).unwrap().get_ids().to_vec();
        let eos = prefix.pop();
        for c in [
            Content::Text(t.clone()),
            Content::Turns(turns.iter().enumerate().map(|(i, t)| Turn {
                role: if i % 2 == 0 { Role::User } else { Role::Assistant },
                content: t.clone(),
            }).collect()),
        ] {
            if let Ok(r) = enc.renderer.render(&c) {
                prop_assert!(r.ids.len() <= 2048);
                prop_assert_eq!(&r.ids[..prefix.len()], &prefix[..]);
                prop_assert_eq!(r.ids.last().copied(), eos);
            }
        }
    }
}

/// Hostile rows of every length, embedded together in one batch (padding, window masks of
/// rows shorter and longer than the window): finite unit vectors, and each the same as when
/// embedded alone.
#[test]
fn hostile_rows_embed_to_unit_vectors_batched_or_alone() {
    // On `auto`: the engine a user gets (candle is exercised on long rows above).
    let (gemma, nomic) = (load(DIR, Engine::Auto), load(NOMIC, Engine::Auto));
    let texts = [
        "\u{0}\u{0}\u{0}".to_string(),
        "👩‍👩‍👧‍👦".repeat(300),
        "x".repeat(20_000),
        "Z̷̢̛̖̝a̴̡̰̓ ".repeat(200),
        "<bos><eos><start_of_turn>user".to_string(),
        "من فضلك اشرح ".repeat(150),
    ];
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for enc in [&gemma, &nomic] {
        let d = enc.dim();
        let batch = enc.embed_texts(&refs).unwrap();
        for (i, t) in refs.iter().enumerate() {
            let v = &batch[i * d..(i + 1) * d];
            assert!(v.iter().all(|x| x.is_finite()));
            let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-3, "norm {n}");
            if i % 2 == 0 {
                // Alone (no padding, one mask) for half the rows: the rest cost seconds each.
                let alone = enc.embed_texts(&[t]).unwrap();
                let c = cosine(v, &alone);
                assert!(
                    c > 0.9999,
                    "{}: row {i}: cosine {c} batched vs alone",
                    enc.files.id
                );
            }
        }
    }
}
