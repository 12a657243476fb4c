//! Benchmarks that print figures (`semtel bench …`). Speed goals live here, never in tests.
//!
//! `embed`: a fixed, realistic text set (short queries and long multi-turn dialogues from the
//! shared data sets, ~100 tokens on average, some at the 256-token cap) embedded end to end
//! (tokenization included) by each engine, repeated, medians reported; optionally the same texts
//! through sentence-transformers (`benches/st_embed.py`) in the same invocation, as a ratio.
//! This module must never be used by the classification path.

use crate::embed::{embed_sequences, BatchOptions, Embedder, Encoder};
use crate::render::Renderer;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Builds the benchmark text set deterministically from `shared/data`: every n-th short query
/// (Banking77 and CLINC150 test) and every m-th dialogue (SGD and HH-RLHF), interleaved.
pub fn embed_text_set(shared: &Path, n_texts: usize) -> Result<Vec<String>> {
    let read = |p: PathBuf| -> Result<Vec<String>> {
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        Ok(std::io::BufReader::new(f)
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_string))
            .collect())
    };
    let data = shared.join("data");
    let mut short = read(data.join("banking77/banking77.jsonl"))?;
    short.extend(read(data.join("clinc150/clinc150.jsonl"))?);
    let mut long = read(data.join("hh_rlhf/hh_rlhf_harmless_base_test.jsonl"))?;
    long.extend(read_gz_texts(&data.join("sgd/sgd_dialogues.jsonl.gz"))?);
    // 55 % short queries, 45 % dialogues gives ~100 tokens per text on average.
    let n_short = n_texts * 55 / 100;
    let n_long = n_texts - n_short;
    let pick = |v: &[String], n: usize| -> Vec<String> {
        let step = (v.len() / n.max(1)).max(1);
        v.iter().step_by(step).take(n).cloned().collect()
    };
    let (s, l) = (pick(&short, n_short), pick(&long, n_long));
    let mut out = Vec::with_capacity(n_texts);
    let (mut i, mut j) = (0, 0);
    while i < s.len() || j < l.len() {
        if i < s.len() {
            out.push(s[i].clone());
            i += 1;
        }
        if j < l.len() && (j * s.len() <= i * l.len() || i >= s.len()) {
            out.push(l[j].clone());
            j += 1;
        }
    }
    Ok(out)
}

/// The `text` field of every line of a JSONL file (a saved benchmark text set).
pub fn read_text_file(p: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut out = Vec::new();
    for (i, l) in std::io::BufReader::new(f).lines().enumerate() {
        let l = l.map_err(|e| Error::io(p, e))?;
        let v: serde_json::Value = serde_json::from_str(&l)
            .map_err(|e| Error::input(p, format!("line {}: {e}", i + 1)))?;
        match v["text"].as_str() {
            Some(t) => out.push(t.to_string()),
            None => {
                return Err(Error::input(
                    p,
                    format!("line {}: no string field `text`", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// Writes texts as JSONL (`{"text": ...}` per line), the format `read_text_file` reads.
pub fn write_text_file(p: &Path, texts: &[String]) -> Result<()> {
    let mut body = String::new();
    for t in texts {
        body.push_str(&serde_json::json!({ "text": t }).to_string());
        body.push('\n');
    }
    std::fs::write(p, body).map_err(|e| Error::io(p, e))
}

fn read_gz_texts(p: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut s = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut s)
        .map_err(|e| Error::io(p, e))?;
    Ok(s.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbedRun {
    pub engine: String,
    pub texts: usize,
    pub real_tokens: usize,
    pub padded_tokens: usize,
    pub seconds: f64,
    pub runs: Vec<f64>,
    pub texts_per_s: f64,
    pub tokens_per_s: f64,
    pub padded_tokens_per_s: f64,
    /// Model FLOPs per second achieved (linear layers + attention, real tokens only).
    pub gflops: f64,
    /// `gflops` over the machine's measured f32 GEMM peak on the same threads.
    pub share_of_f32_gemm_peak: f64,
    pub peak_rss_mb: f64,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn peak_rss_mb() -> f64 {
    // VmHWM in /proc/self/status: the resident-set high-water mark.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Model FLOPs of a BERT forward over sequences of the given lengths.
pub fn bert_flops(lens: &[usize], hidden: usize, inter: usize, layers: usize) -> f64 {
    let per_token_linear = 2.0 * (4 * hidden * hidden + 2 * hidden * inter) as f64;
    let mut f = 0.0;
    for &l in lens {
        let l = l as f64;
        f += l * per_token_linear + 4.0 * l * l * hidden as f64; // QKᵀ and PV
    }
    f * layers as f64
}

/// Measures the f32 GEMM peak of `threads` threads with the `gemm` crate (one large product per
/// thread, as the engines use them), in GFLOP/s.
pub fn f32_gemm_peak(threads: usize) -> f64 {
    let (m, n, k) = (512usize, 512usize, 512usize);
    let a = vec![1.0f32; m * k];
    let b = vec![0.5f32; k * n];
    let run = || {
        let mut c = vec![0f32; m * n];
        for _ in 0..8 {
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        c[0]
    };
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = (0..threads).into_par_iter().map(|_| run()).sum();
        let e = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(threads as f64 * 8.0 * 2.0 * (m * n * k) as f64 / e / 1e9);
    }
    best
}

/// Tokenizes and embeds `texts` once, returning (seconds, real tokens, padded tokens).
pub fn embed_once(
    renderer: &Renderer,
    engine: &dyn Embedder,
    texts: &[String],
    batch: BatchOptions,
) -> Result<(f64, usize, usize)> {
    let t = Instant::now();
    let ids: Vec<Vec<u32>> = texts
        .par_iter()
        .map(|s| renderer.encode_head(s).map_err(Error::Tokenizer))
        .collect::<Result<_>>()?;
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let v = embed_sequences(engine, &refs, batch)?;
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(v);
    let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let real = lens.iter().sum();
    let padded = if engine.pads() {
        crate::embed::plan_batches(&lens, batch)
            .iter()
            .map(|b| b.len() * b.iter().map(|&i| lens[i]).max().unwrap_or(0))
            .sum()
    } else {
        real
    };
    Ok((secs, real, padded))
}

/// Runs `repeats` timed passes of an encoder over `texts`.
pub fn bench_encoder(
    enc: &Encoder,
    texts: &[String],
    repeats: usize,
    model_dims: (usize, usize, usize),
    f32_peak: f64,
) -> Result<EmbedRun> {
    // Warm-up (page in weights, grow scratch buffers).
    let warm: Vec<String> = texts.iter().take(64).cloned().collect();
    embed_once(&enc.renderer, enc.engine.as_ref(), &warm, enc.batch)?;
    let mut runs = Vec::new();
    let (mut real, mut padded) = (0, 0);
    for _ in 0..repeats {
        let (s, r, p) = embed_once(&enc.renderer, enc.engine.as_ref(), texts, enc.batch)?;
        runs.push(s);
        real = r;
        padded = p;
    }
    let secs = median(&runs);
    let lens: Vec<usize> = texts
        .iter()
        .map(|t| enc.renderer.encode_head(t).map(|v| v.len()).unwrap_or(0))
        .collect();
    let (h, i, l) = model_dims;
    let gflops = bert_flops(&lens, h, i, l) / secs / 1e9;
    Ok(EmbedRun {
        engine: enc.engine.describe(),
        texts: texts.len(),
        real_tokens: real,
        padded_tokens: padded,
        seconds: secs,
        runs,
        texts_per_s: texts.len() as f64 / secs,
        tokens_per_s: real as f64 / secs,
        padded_tokens_per_s: padded as f64 / secs,
        gflops,
        share_of_f32_gemm_peak: gflops / f32_peak,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// One scenario of `semtel bench llm`.
#[derive(Debug, Clone, Serialize)]
pub struct LlmRun {
    pub scenario: String,
    pub items: usize,
    pub items_per_call: usize,
    pub narrowing: bool,
    pub adaptive: bool,
    pub seconds: f64,
    /// Lower bound on wall time imposed by the rate limits for the work actually admitted.
    pub floor_seconds: Option<f64>,
    pub calls: u64,
    pub http_429: u64,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_schema: usize,
    pub labelled: usize,
    pub accuracy_vs_truth: f64,
    pub tokens_in_per_item: f64,
    pub tokens_out_per_item: f64,
    pub cost_per_1k_items_usd: f64,
    pub server_faults_injected: u64,
}

/// Runs escalated rows through an LLM tier against a fresh simulator and checks the result.
#[allow(clippy::too_many_arguments)]
pub fn llm_scenario(
    name: &str,
    rows: &[crate::pipeline::Classified],
    gold: &std::collections::HashMap<String, String>,
    labels: &[String],
    sim_cfg: crate::llm::simulator::SimConfig,
    mut cfg: crate::llm::LlmConfig,
    counter: crate::llm::tier::TokenCounter,
) -> Result<LlmRun> {
    let (rpm, tpm) = (sim_cfg.rpm, sim_cfg.tpm);
    let h = crate::llm::simulator::start(sim_cfg, 0)?;
    for e in &mut cfg.endpoints {
        e.url = h.url();
    }
    let (n, narrowing, adaptive) = (cfg.items_per_call, cfg.narrow_above > 0, cfg.adaptive);
    let t = Instant::now();
    let (out, st) = llm_label_all(cfg, labels, counter, rows)?;
    let seconds = t.elapsed().as_secs_f64();
    let schema: std::collections::HashSet<&String> = labels.iter().collect();
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for r in &out {
        *seen.entry(r.id.as_str()).or_default() += 1;
    }
    let lost = rows
        .iter()
        .filter(|c| !seen.contains_key(c.out.id.as_str()))
        .count();
    let duplicated = seen.values().filter(|&&c| c > 1).count();
    let out_of_schema = out
        .iter()
        .filter(|r| r.label.as_ref().is_some_and(|l| !schema.contains(l)))
        .count();
    let labelled: Vec<_> = out
        .iter()
        .filter(|r| r.decided_by == crate::row::DecidedBy::Llm)
        .collect();
    let right = labelled
        .iter()
        .filter(|r| gold.get(&r.id) == r.label.as_ref())
        .count();
    let sim = &h.state.stats;
    use std::sync::atomic::Ordering::Relaxed;
    let admitted_tokens = sim.admitted_tokens.load(Relaxed) as f64;
    let ok = sim.ok.load(Relaxed) + sim.server_errors.load(Relaxed) + sim.malformed.load(Relaxed);
    let floor = (rpm > 0 || tpm > 0).then(|| {
        let by_req = if rpm > 0 {
            ok as f64 / (rpm as f64 / 60.0)
        } else {
            0.0
        };
        let by_tok = if tpm > 0 {
            admitted_tokens / (tpm as f64 / 60.0)
        } else {
            0.0
        };
        // The server lets 5 s of traffic through at once before its limits bite.
        (by_req.max(by_tok) - 5.0).max(0.0)
    });
    let items = rows.len();
    Ok(LlmRun {
        scenario: name.to_string(),
        items,
        items_per_call: n,
        narrowing,
        adaptive,
        seconds,
        floor_seconds: floor,
        calls: st.calls,
        http_429: sim.rate_limited.load(Relaxed),
        lost,
        duplicated,
        out_of_schema,
        labelled: labelled.len(),
        accuracy_vs_truth: right as f64 / labelled.len().max(1) as f64,
        tokens_in_per_item: st.tokens_in as f64 / items as f64,
        tokens_out_per_item: st.tokens_out as f64 / items as f64,
        cost_per_1k_items_usd: st.cost_usd / items as f64 * 1000.0,
        server_faults_injected: sim.server_errors.load(Relaxed)
            + sim.hangs.load(Relaxed)
            + sim.malformed.load(Relaxed)
            + sim.out_of_schema.load(Relaxed)
            + sim.truncated.load(Relaxed)
            + sim.dropped_items.load(Relaxed),
    })
}

/// Sends every row through an LLM tier (forced escalation) and returns the rows it produced.
pub fn llm_label_all(
    cfg: crate::llm::LlmConfig,
    labels: &[String],
    counter: crate::llm::tier::TokenCounter,
    rows: &[crate::pipeline::Classified],
) -> Result<(Vec<crate::row::OutputRow>, crate::llm::LlmStats)> {
    use crate::pipeline::Escalation;
    let mut tier = crate::llm::LlmTier::new(cfg, labels.to_vec(), counter)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<crate::row::OutputRow>>(1024);
    let collector = std::thread::spawn(move || rx.iter().flatten().collect::<Vec<_>>());
    for chunk in rows.chunks(256) {
        let part = chunk
            .iter()
            .map(|c| crate::pipeline::Classified {
                out: c.out.clone(),
                content: c.content.clone(),
                vector: None,
                scores: c.scores.clone(),
                examples: c.examples.clone(),
            })
            .collect();
        tier.submit(part, &tx)?;
    }
    tier.finish(&tx)?;
    drop(tx);
    let out = collector.join().expect("collector");
    Ok((out, tier.stats.clone()))
}
