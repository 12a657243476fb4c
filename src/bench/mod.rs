//! Benchmarks that print figures (`semtel bench …`). Speed goals live here, never in tests.
//!
//! `embed`: a fixed, realistic text set (short queries and long multi-turn dialogues from the
//! shared data sets, ~100 tokens on average, some at the 256-token cap) embedded end to end
//! (tokenization included) by each engine, repeated, medians reported; optionally the same texts
//! through sentence-transformers (`benches/st_embed.py`) in the same invocation, as a ratio.
//! This module must never be used by the classification path.

pub mod encoders;
pub mod guards;
pub mod redact;
pub mod scale;
pub mod serve;

use crate::embed::{embed_sequences, BatchOptions, Embedder, Encoder};
use crate::pipeline::Classifier;
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
    let v = embed_sequences(engine, &refs, batch, None)?;
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
    /// Lower bound on wall time that the endpoints' true limits set for the work they
    /// admitted (`None`: unknown limits).
    pub floor_seconds: Option<f64>,
    /// `seconds / floor_seconds`.
    pub ratio_to_floor: Option<f64>,
    pub calls: u64,
    pub http_429: u64,
    pub hedges: u64,
    /// Input rows with no output row.
    pub lost: usize,
    /// Input rows with more than one output row.
    pub duplicated: usize,
    /// Output rows whose label is not in the schema.
    pub out_of_schema: usize,
    pub labelled: usize,
    /// Rows that stayed `escalate` (with the reason) after their retries.
    pub unlabelled: usize,
    /// Why (the first few).
    pub unlabelled_reasons: Vec<String>,
    pub accuracy_vs_truth: f64,
    pub tokens_in_per_item: f64,
    pub tokens_out_per_item: f64,
    pub cost_per_1k_items_usd: f64,
    pub server_faults_injected: u64,
    pub endpoints: Vec<crate::llm::limiter::EndpointStats>,
}

/// Time the limits of `sims` need to admit what they admitted: for each dimension, the first
/// moment at which their summed capacity (the initial burst plus the rate while not in an
/// outage) covers the admitted total.
fn limits_floor(sims: &[(crate::llm::simulator::SimConfig, f64, f64)]) -> Option<f64> {
    let limited = sims.iter().any(|(c, _, _)| c.rpm > 0 || c.tpm > 0);
    if !limited {
        return None;
    }
    let mut floor = 0f64;
    for dim in 0..2 {
        let per_min = |c: &crate::llm::simulator::SimConfig| if dim == 0 { c.rpm } else { c.tpm };
        if sims.iter().any(|(c, _, _)| per_min(c) == 0) {
            continue;
        }
        let want: f64 = sims
            .iter()
            .map(|(_, r, t)| if dim == 0 { *r } else { *t })
            .sum();
        let mut have: f64 = sims
            .iter()
            .map(|(c, _, _)| per_min(c) as f64 / 60.0 * c.burst_s)
            .sum();
        let (dt, mut t) = (0.01, 0.0);
        while have < want && t < 1e6 {
            for (c, _, _) in sims {
                let down = c.outages.iter().any(|&(a, b)| t >= a && t < b);
                if !down {
                    have += per_min(c) as f64 / 60.0 * dt;
                }
                // A server's bucket refills while it is down: it comes back with its burst.
                if c.outages.iter().any(|&(_, b)| t < b && t + dt >= b) {
                    have += per_min(c) as f64 / 60.0 * c.burst_s;
                }
            }
            t += dt;
        }
        floor = floor.max(t);
    }
    Some(floor)
}

/// Runs escalated rows through an LLM tier against fresh simulators (one per endpoint of
/// `cfg`, in order) and checks the result.
#[allow(clippy::too_many_arguments)]
pub fn llm_scenario(
    name: &str,
    rows: &[crate::pipeline::Classified],
    gold: &std::collections::HashMap<String, String>,
    labels: &[String],
    sims: Vec<crate::llm::simulator::SimConfig>,
    mut cfg: crate::llm::LlmConfig,
    counter: crate::llm::tier::TokenCounter,
) -> Result<LlmRun> {
    if sims.len() != cfg.endpoints.len() {
        return Err(Error::Config("one simulator per endpoint".into()));
    }
    let handles = sims
        .iter()
        .map(|c| crate::llm::simulator::start(c.clone(), 0))
        .collect::<Result<Vec<_>>>()?;
    for (e, h) in cfg.endpoints.iter_mut().zip(&handles) {
        e.url = h.url();
    }
    use std::sync::atomic::Ordering::Relaxed;
    let mut run = llm_run(name, rows, gold, labels, cfg, counter)?;
    let mut per_sim = Vec::new();
    let (mut http_429, mut faults) = (0, 0);
    for (c, h) in sims.into_iter().zip(&handles) {
        let s = &h.state.stats;
        // Requests the limits admitted: every answered or failed one that was not a 429.
        let reqs = (s.requests.load(Relaxed)
            - s.rate_limited.load(Relaxed)
            - s.unauthorized.load(Relaxed)
            - s.outage_failures.load(Relaxed)) as f64;
        per_sim.push((c, reqs, s.admitted_tokens.load(Relaxed) as f64));
        http_429 += s.rate_limited.load(Relaxed);
        faults += s.server_errors.load(Relaxed)
            + s.hangs.load(Relaxed)
            + s.malformed.load(Relaxed)
            + s.out_of_schema.load(Relaxed)
            + s.truncated.load(Relaxed)
            + s.dropped_items.load(Relaxed)
            + s.trickled.load(Relaxed)
            + s.bad_requests.load(Relaxed)
            + s.html_pages.load(Relaxed)
            + s.outage_failures.load(Relaxed);
    }
    // The last call admitted still takes the server's answer time: the floor includes it.
    let tail = run
        .endpoints
        .iter()
        .filter_map(|e| e.latency_p50_ms)
        .fold(0.0f64, f64::max)
        / 1000.0;
    run.floor_seconds = limits_floor(&per_sim).map(|f| f + tail);
    run.ratio_to_floor = run.floor_seconds.map(|f| run.seconds / f.max(1e-9));
    run.http_429 = http_429;
    run.server_faults_injected = faults;
    Ok(run)
}

/// Runs escalated rows through an LLM tier configured by `cfg` (the simulator's or a real
/// endpoint's) and checks what came back: nothing lost, nothing twice, nothing outside the
/// schema.
pub fn llm_run(
    name: &str,
    rows: &[crate::pipeline::Classified],
    gold: &std::collections::HashMap<String, String>,
    labels: &[String],
    cfg: crate::llm::LlmConfig,
    counter: crate::llm::tier::TokenCounter,
) -> Result<LlmRun> {
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
    let items = rows.len();
    Ok(LlmRun {
        scenario: name.to_string(),
        items,
        items_per_call: n,
        narrowing,
        adaptive,
        seconds,
        floor_seconds: None,
        ratio_to_floor: None,
        calls: st.calls,
        http_429: st.rate_limited,
        hedges: st.hedges,
        lost,
        duplicated,
        out_of_schema,
        labelled: labelled.len(),
        unlabelled: out.len() - labelled.len(),
        unlabelled_reasons: out
            .iter()
            .filter(|r| r.decided_by != crate::row::DecidedBy::Llm)
            .filter_map(|r| r.error.clone())
            .take(3)
            .collect(),
        accuracy_vs_truth: right as f64 / labelled.len().max(1) as f64,
        tokens_in_per_item: st.tokens_in as f64 / items as f64,
        tokens_out_per_item: st.tokens_out as f64 / items as f64,
        cost_per_1k_items_usd: st.cost_usd / items as f64 * 1000.0,
        server_faults_injected: 0,
        endpoints: st.endpoints.clone(),
    })
}

/// Sends every row through an LLM tier (forced escalation) and returns the rows it produced.
pub fn llm_label_all(
    cfg: crate::llm::LlmConfig,
    labels: &[String],
    counter: crate::llm::tier::TokenCounter,
    rows: &[crate::pipeline::Classified],
) -> Result<(Vec<crate::row::OutputRow>, crate::llm::LlmStats)> {
    let mut tier = crate::llm::LlmTier::new(cfg, labels.to_vec(), counter)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<crate::row::OutputRow>>(1024);
    let collector = std::thread::spawn(move || rx.iter().flatten().collect::<Vec<_>>());
    let copies = rows.chunks(256).map(|chunk| {
        Ok(chunk
            .iter()
            .map(|c| crate::pipeline::Classified {
                vector: None,
                ..c.clone()
            })
            .collect())
    });
    tier.submit_all(copies, &tx)?;
    drop(tx);
    let out = collector.join().expect("collector");
    Ok((out, tier.stats.clone()))
}

/// What `semtel bench accuracy-cost` measures.
pub struct AccuracyCostOptions<'a> {
    pub classifier: &'a Classifier,
    pub input: std::path::PathBuf,
    pub input_options: crate::input::InputOptions,
    /// `oracle:<accuracy>` (simulated) or an LLM configuration file.
    pub llm: String,
    /// Prices per 1M tokens for the oracle's cost estimate.
    pub price_in: f64,
    pub price_out: f64,
    /// Name of the data set in the report.
    pub set: Option<String>,
}

/// The accuracy-versus-cost curve from kNN-only to LLM-only, escalating the least confident
/// rows first, with the calibrated thresholds' operating point.
pub fn accuracy_cost(o: AccuracyCostOptions<'_>) -> Result<crate::report::AccuracyCost> {
    use crate::llm::{tier::PromptBuilder, LlmConfig};
    let classifier = o.classifier;
    let mut reader = crate::input::open(&o.input, &o.input_options)?;
    let labels = classifier.index.labels().to_vec();
    let mut classified = Vec::new();
    let mut gold = Vec::new();
    let mut row_texts: Vec<String> = Vec::new();
    while let Some(rows) = reader.next_batch()? {
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.label.is_some() && r.content.is_ok())
            .collect();
        gold.extend(rows.iter().map(|r| r.label.clone().unwrap()));
        row_texts.extend(
            rows.iter()
                .map(|r| r.content.as_ref().map(|c| c.flatten()).unwrap_or_default()),
        );
        classified.extend(classifier.classify(rows)?);
    }
    if classified.is_empty() {
        return Err(Error::input(&o.input, "no labelled rows"));
    }
    let signal = classifier.thresholds.signal;
    let mut knn_ok = Vec::new();
    let mut conf = Vec::new();
    let mut keep = Vec::new();
    for (c, g) in classified.iter().zip(&gold) {
        let (p, cf) = c
            .scores
            .as_ref()
            .map_or((None, f32::NEG_INFINITY), |s| s.decision(signal));
        knn_ok.push(p.map(|p| &labels[p as usize]) == Some(g));
        conf.push(cf);
        keep.push(classifier.thresholds.keep(p, cf));
    }
    let counter = classifier.encoder.token_counter();
    let n = classified.len();
    // `oracle:<acc>`: right with probability acc, wrong uniformly; `oracle-confusable:<acc>`:
    // the same overall accuracy, the errors on the ambiguous rows (see
    // `simulator::confusable_errors`), as a real LLM errs where a kNN vote is unsure.
    let oracle = o
        .llm
        .strip_prefix("oracle:")
        .map(|a| (a, false))
        .or_else(|| o.llm.strip_prefix("oracle-confusable:").map(|a| (a, true)));
    let (llm_ok, cost_per_row, llm_name, basis): (Vec<bool>, f64, String, String) = if let Some((
        acc,
        confusable,
    )) = oracle
    {
        let acc: f64 = acc.parse().map_err(|_| {
            Error::Config(
                "--llm oracle:<accuracy> or oracle-confusable:<accuracy>, e.g. oracle:0.95".into(),
            )
        })?;
        let p_wrong: Vec<f64> = if confusable {
            let texts: Vec<(String, String)> = row_texts
                .iter()
                .zip(&gold)
                .map(|(t, g)| (t.clone(), g.clone()))
                .collect();
            let m =
                crate::llm::simulator::embed_confusable(&texts, &classifier.encoder, 1.0 - acc)?;
            texts
                .iter()
                .map(|(t, _)| {
                    m.get(&crate::llm::simulator::truth_key(t))
                        .map_or(1.0 - acc, |h| h.p_wrong)
                })
                .collect()
        } else {
            vec![1.0 - acc; classified.len()]
        };
        let ok: Vec<bool> = classified
            .iter()
            .zip(&p_wrong)
            .map(|(c, &pw)| {
                let h = crate::llm::cache::text_hash(&c.out.id);
                let u = u64::from_str_radix(&h[..12], 16).unwrap_or(0) as f64 / (1u64 << 48) as f64;
                u >= pw
            })
            .collect();
        // Cost estimate: the prompts semtel would send (default settings: 8 rows per call,
        // candidate narrowing, few-shot examples), counted with the tokenizer.
        let pb = PromptBuilder::new(LlmConfig::default(), labels.clone(), counter.clone())?;
        let items: Vec<crate::llm::tier::PromptItem> = classified
            .iter()
            .map(|c| {
                let candidates = pb.candidates(c.out.neighbors.iter().map(|x| x.label.as_str()));
                crate::llm::tier::PromptItem {
                    text: crate::llm::tier::head_tail_chars(
                        &c.content.as_ref().map(|x| x.flatten()).unwrap_or_default(),
                        pb.cfg.max_item_chars,
                    ),
                    full_schema: candidates.is_empty(),
                    candidates,
                    examples: c.examples.clone(),
                }
            })
            .collect();
        let (mut tin, mut tout) = (0f64, 0f64);
        for chunk in items.chunks(pb.cfg.items_per_call) {
            let refs: Vec<&crate::llm::tier::PromptItem> = chunk.iter().collect();
            let (req, est) = pb.request(&refs);
            tin += est * 1.3; // WordPiece undercounts BPE tokens by ~30 % on this text
            tout += chunk.len() as f64 * 8.0;
            let _ = req;
        }
        let cost = (tin * o.price_in + tout * o.price_out) / 1e6 / n as f64;
        (
                ok,
                cost,
                format!(
                    "{}:{acc} (simulated LLM: gold label, wrong at {:.0}%{})",
                    if confusable { "oracle-confusable" } else { "oracle" },
                    (1.0 - acc) * 100.0,
                    if confusable { ", on the ambiguous rows" } else { ", uniformly" }
                ),
                format!(
                    "estimated from prompt token counts (8 rows per call, narrowing, few-shot) at ${}/1M input and ${}/1M output tokens",
                    o.price_in, o.price_out
                ),
            )
    } else {
        let cfg = LlmConfig::load(Path::new(&o.llm))?;
        let name = cfg
            .endpoints
            .iter()
            .map(|e| e.model.clone())
            .collect::<Vec<_>>()
            .join("+");
        let (out, stats) = crate::bench::llm_label_all(cfg, &labels, counter, &classified)?;
        let by_id: std::collections::HashMap<&str, Option<&String>> = out
            .iter()
            .map(|r| (r.id.as_str(), r.label.as_ref()))
            .collect();
        let ok = classified
            .iter()
            .zip(&gold)
            .map(|(c, g)| by_id.get(c.out.id.as_str()).copied().flatten() == Some(g))
            .collect();
        (
            ok,
            stats.cost_usd / n as f64,
            format!("endpoint {name}"),
            format!(
                "measured: {} calls, {} input and {} output tokens at the configured prices",
                stats.calls, stats.tokens_in, stats.tokens_out
            ),
        )
    };
    let curve = crate::report::curve(&knn_ok, &llm_ok, &conf, cost_per_row, 40);
    let op_right = (0..n)
        .filter(|&i| if keep[i] { knn_ok[i] } else { llm_ok[i] })
        .count();
    let op_esc = keep.iter().filter(|k| !**k).count();
    let report = crate::report::AccuracyCost {
        set: o.set.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                o.input
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                o.input_options
                    .split
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            )
        }),
        rows: n,
        llm: llm_name,
        signal: signal.name().into(),
        cost_basis: basis,
        llm_cost_per_row_usd: cost_per_row,
        knn_only: curve[0].clone(),
        llm_only: curve.last().cloned().unwrap_or_else(|| curve[0].clone()),
        operating_point: crate::report::CurvePoint {
            escalated: op_esc as f64 / n as f64,
            accuracy: op_right as f64 / n as f64,
            cost_per_1k_usd: op_esc as f64 * cost_per_row / n as f64 * 1000.0,
        },
        curve,
    };
    Ok(report)
}

/// What `semtel bench llm` runs: the LLM tier against the loopback simulator.
pub struct LlmBenchOptions<'a> {
    /// Classifies the items first (its thresholds should escalate every row).
    pub classifier: &'a Classifier,
    /// Labelled file: the items and the simulator's truth.
    pub truth: std::path::PathBuf,
    pub input_options: crate::input::InputOptions,
    pub items: usize,
    /// `limits`, `faults`, `failover`, `drift`, `tokens` (see [`LLM_SCENARIOS`]), and
    /// `external` with `external`.
    pub scenarios: Vec<String>,
    /// An LLM configuration to run the items through as they are (a real endpoint).
    pub external: Option<crate::llm::LlmConfig>,
    /// The external endpoint's true limits, when known: (RPM, TPM), for its floor.
    pub external_limits: Option<(u64, u64)>,
}

/// Scenario groups of `semtel bench llm`.
pub const LLM_SCENARIOS: [&str; 5] = ["limits", "faults", "failover", "drift", "tokens"];

/// Runs the scenarios; `report` sees each result as soon as it is measured.
pub fn llm_benchmark(
    o: LlmBenchOptions<'_>,
    report: &mut dyn FnMut(&LlmRun),
) -> Result<Vec<LlmRun>> {
    use crate::llm::simulator::{self, Faults, HeaderMode, OutageMode, SimConfig};
    use crate::llm::{config::EndpointConfig, LlmConfig};
    for s in &o.scenarios {
        if !LLM_SCENARIOS.contains(&s.as_str()) && s != "external" {
            return Err(Error::Config(format!(
                "unknown scenario `{s}` (use {} or external)",
                LLM_SCENARIOS.join(", ")
            )));
        }
    }
    let mut rows = crate::input::read_all(&o.truth, &o.input_options)?;
    rows.truncate(o.items);
    let classifier = o.classifier;
    let mut gold = std::collections::HashMap::new();
    let mut truth = std::collections::HashMap::new();
    for r in &rows {
        if let (Ok(c), Some(l)) = (&r.content, &r.label) {
            gold.insert(r.id.clone(), l.clone());
            truth.insert(simulator::truth_key(&c.flatten()), l.clone());
        }
    }
    let classified = classifier.classify(rows)?;
    let labels = classifier.index.labels().to_vec();
    let counter = classifier.encoder.token_counter();
    let endpoint = |name: &str, rpm: u64, tpm: u64, conc: usize| EndpointConfig {
        name: name.into(),
        kind: Default::default(),
        url: String::new(),
        model: "sim-1".into(),
        deployment: None,
        api_version: "2024-10-21".into(),
        api_key_env: None,
        weight: 1.0,
        rpm,
        tpm,
        price_in_per_1k: 0.00015,
        price_out_per_1k: 0.0006,
        max_concurrency: conc,
    };
    let cfg_with = |n: usize, narrow: bool, eps: Vec<EndpointConfig>| LlmConfig {
        items_per_call: n,
        narrow_above: if narrow { 20 } else { 0 },
        cache: Some("off".into()),
        endpoints: eps,
        ..Default::default()
    };
    // The endpoint as the issue measured it: 600 RPM / 200k TPM, 300 ± 75 ms.
    let sim = |headers: HeaderMode| SimConfig {
        rpm: 600,
        tpm: 200_000,
        latency_ms: 300.0,
        jitter_ms: 75.0,
        headers,
        truth: truth.clone(),
        ..Default::default()
    };
    let mut runs = Vec::new();
    let mut go = |name: &str, sims: Vec<SimConfig>, cfg: LlmConfig| -> Result<()> {
        let r = llm_scenario(
            name,
            &classified,
            &gold,
            &labels,
            sims,
            cfg,
            counter.clone(),
        )?;
        report(&r);
        runs.push(r);
        Ok(())
    };
    let has = |s: &str| o.scenarios.iter().any(|x| x == s);
    if has("limits") {
        let one = |rpm, tpm| cfg_with(8, true, vec![endpoint("sim", rpm, tpm, 64)]);
        go(
            "configured right (600/200k)",
            vec![sim(HeaderMode::Remaining)],
            one(600, 200_000),
        )?;
        for (h, what) in [
            (HeaderMode::Remaining, "remaining-* headers"),
            (HeaderMode::Full, "limit-* headers"),
            (HeaderMode::None, "429 timing only"),
        ] {
            go(
                &format!("nothing configured, {what}"),
                vec![sim(h)],
                one(0, 0),
            )?;
        }
        go(
            "configured 2x too high",
            vec![sim(HeaderMode::Remaining)],
            one(1200, 400_000),
        )?;
        let mut fixed = cfg_with(8, true, vec![endpoint("sim", 0, 0, 32)]);
        fixed.adaptive = false;
        fixed.max_attempts = 30;
        go(
            "naive: fixed concurrency 32",
            vec![sim(HeaderMode::Remaining)],
            fixed,
        )?;
    }
    if has("faults") {
        let mut s = sim(HeaderMode::Remaining);
        s.faults = Faults::spread(0.25, &[]).map_err(Error::Config)?;
        s.hang_s = 30.0;
        go(
            "25% faults incl. 30-s hangs, nothing configured",
            vec![s],
            cfg_with(8, true, vec![endpoint("sim", 0, 0, 64)]),
        )?;
    }
    if has("failover") {
        // Two endpoints of half the capacity each; the second is down from 20 s to 80 s.
        let half = |outages: Vec<(f64, f64)>| SimConfig {
            rpm: 300,
            tpm: 100_000,
            outages,
            outage_mode: OutageMode::Unavailable,
            seed: 11,
            ..sim(HeaderMode::Remaining)
        };
        go(
            "2 endpoints, one down 20-80 s (503)",
            vec![half(vec![]), half(vec![(20.0, 80.0)])],
            cfg_with(
                8,
                true,
                vec![endpoint("a", 0, 0, 64), endpoint("b", 0, 0, 64)],
            ),
        )?;
        let hang = SimConfig {
            outage_mode: OutageMode::Hang,
            hang_s: 30.0,
            ..half(vec![(20.0, 80.0)])
        };
        go(
            "2 endpoints, one hangs 20-80 s",
            vec![half(vec![]), hang],
            cfg_with(
                8,
                true,
                vec![endpoint("a", 0, 0, 64), endpoint("b", 0, 0, 64)],
            ),
        )?;
    }
    if has("drift") {
        let s = SimConfig {
            drift_to_ms: Some(3000.0),
            drift_s: 60.0,
            ..sim(HeaderMode::Remaining)
        };
        go(
            "latency drifting 300 ms -> 3 s",
            vec![s],
            cfg_with(8, true, vec![endpoint("sim", 0, 0, 64)]),
        )?;
    }
    if has("tokens") {
        for narrow in [false, true] {
            for n in [1, 4, 8, 16] {
                go(
                    "tokens per item",
                    vec![SimConfig {
                        latency_ms: 5.0,
                        jitter_ms: 1.0,
                        truth: truth.clone(),
                        ..Default::default()
                    }],
                    cfg_with(n, narrow, vec![endpoint("sim", 0, 0, 16)]),
                )?;
            }
        }
    }
    if has("external") {
        let cfg = o.external.clone().ok_or_else(|| {
            Error::Config("the external scenario needs an LLM configuration (--llm)".into())
        })?;
        let mut r = llm_run(
            "external endpoint",
            &classified,
            &gold,
            &labels,
            cfg,
            counter,
        )?;
        if let Some((rpm, tpm)) = o.external_limits {
            let c = SimConfig {
                rpm,
                tpm,
                burst_s: 0.0,
                ..Default::default()
            };
            let tokens = (r.tokens_in_per_item + r.tokens_out_per_item) * r.items as f64;
            r.floor_seconds = limits_floor(&[(c, r.calls as f64, tokens)]);
            r.ratio_to_floor = r.floor_seconds.map(|f| r.seconds / f.max(1e-9));
        }
        report(&r);
        runs.push(r);
    }
    Ok(runs)
}

/// What `semtel bench embed` runs.
#[derive(Debug, Clone)]
pub struct EmbedBenchOptions {
    pub encoder_options: crate::embed::EncoderOptions,
    pub engines: Vec<crate::embed::Engine>,
    /// The fast engine's precisions, a row each (the first is the one compared with the
    /// reference; engines without precisions run once).
    pub precisions: Vec<crate::embed::Precision>,
    /// The shared data sets the text set is drawn from, or a JSONL file of texts.
    pub shared: PathBuf,
    pub texts: usize,
    pub texts_file: Option<PathBuf>,
    pub save_texts: Option<PathBuf>,
    pub repeats: usize,
    pub batch_tokens: Option<usize>,
    pub batch_rows: Option<usize>,
    /// A Python interpreter with sentence-transformers to compare with, and its settings.
    pub st: Option<PathBuf>,
    pub st_dtypes: String,
    pub st_batch_size: usize,
}

/// Embeds one text set with every engine (and sentence-transformers when asked), reporting a
/// line per result as it is measured; returns every result as JSON.
pub fn embed_benchmark(
    a: &EmbedBenchOptions,
    report: &mut dyn FnMut(&str),
) -> Result<Vec<serde_json::Value>> {
    let threads = rayon::current_num_threads();
    let texts = match &a.texts_file {
        Some(f) => crate::bench::read_text_file(f)?,
        None => crate::bench::embed_text_set(&a.shared, a.texts)?,
    };
    if let Some(f) = &a.save_texts {
        crate::bench::write_text_file(f, &texts)?;
    }
    let peak = crate::bench::f32_gemm_peak(threads);
    report(&format!(
        "{} texts, {threads} threads; measured f32 GEMM peak (gemm crate, {threads} threads): {peak:.0} GFLOP/s",
        texts.len()
    ));
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut runs = Vec::new();
    let precisions = if a.precisions.is_empty() {
        vec![a.encoder_options.precision.unwrap_or_default()]
    } else {
        a.precisions.clone()
    };
    // (engine, precision) pairs: each precision for the engines that have them.
    let mut plan = Vec::new();
    for &engine in &a.engines {
        for (j, &p) in precisions.iter().enumerate() {
            if j == 0 || engine != crate::embed::Engine::Candle {
                plan.push((engine, p));
            }
        }
    }
    let load = |(engine, precision)| -> Result<Encoder> {
        let mut eo = a.encoder_options.clone();
        eo.engine = engine;
        eo.precision = Some(precision);
        let mut enc = Encoder::load(&eo)?;
        if let Some(b) = a.batch_tokens {
            enc.batch.max_batch_tokens = b;
        }
        if let Some(r) = a.batch_rows {
            enc.batch.max_batch_rows = r;
        }
        Ok(enc)
    };
    // The first engine is kept loaded: it runs again after the reference.
    let Some(&first_run) = plan.first() else {
        return Err(Error::Config("no engine to run: pass --engines".into()));
    };
    let first = load(first_run)?;
    let model_dir = first.files.dir.clone();
    // FLOP counts need the transformer's shape (a static table has none: zeros).
    let cfg: serde_json::Value = std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let dims = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let model_dims = (
        dims("hidden_size"),
        dims("intermediate_size"),
        dims("num_hidden_layers"),
    );
    for (i, &what) in plan.iter().enumerate() {
        let other;
        let enc = if i == 0 {
            &first
        } else {
            other = load(what)?;
            &other
        };
        let r = crate::bench::bench_encoder(enc, &texts, a.repeats, model_dims, peak)?;
        report(&format!(
            "{:<52} {:>7.1} texts/s {:>8.0} tokens/s (padded {:>8.0}/s) {:>6.1} GFLOP/s = {:>4.0}% of f32 GEMM peak, peak RSS {:.0} MB",
            r.engine,
            r.texts_per_s,
            r.tokens_per_s,
            r.padded_tokens_per_s,
            r.gflops,
            r.share_of_f32_gemm_peak * 100.0,
            r.peak_rss_mb
        ));
        results.push(serde_json::to_value(&r).unwrap_or_default());
        runs.push(r);
    }
    let mut st_best: Option<(String, f64)> = None;
    if let Some(py) = &a.st {
        let dir = std::env::temp_dir().join(format!("semtel-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tf = dir.join("texts.jsonl");
        crate::bench::write_text_file(&tf, &texts)?;
        let script = PathBuf::from("benches/st_embed.py");
        let out = std::process::Command::new(py)
            .arg(&script)
            .arg(&tf)
            .arg(&model_dir)
            .args([
                "--max-tokens",
                &first.files.max_tokens.to_string(),
                "--threads",
                &threads.to_string(),
                "--repeats",
                &a.repeats.to_string(),
                "--dtypes",
                &a.st_dtypes,
                "--batch-size",
                &a.st_batch_size.to_string(),
                "--device",
                // The reference runs where semtel's first engine runs.
                if first.engine.on_gpu() { "cuda" } else { "cpu" },
            ])
            .env("TOKENIZERS_PARALLELISM", "true")
            .output()
            .map_err(|e| Error::io(py, e))?;
        let _ = std::fs::remove_dir_all(&dir);
        if !out.status.success() {
            return Err(Error::Config(format!(
                "sentence-transformers run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let tps = v["tokens_per_s"].as_f64().unwrap_or(0.0);
            report(&format!(
                "{:<52} {:>7.1} texts/s {:>8.0} tokens/s",
                v["engine"].as_str().unwrap_or("?"),
                v["texts_per_s"].as_f64().unwrap_or(0.0),
                tps
            ));
            if st_best.as_ref().is_none_or(|b| tps > b.1) {
                st_best = Some((v["engine"].as_str().unwrap_or("?").to_string(), tps));
            }
            results.push(v);
        }
        // Repeat semtel's first engine after the reference, so machine noise hits both sides.
        let again = crate::bench::bench_encoder(&first, &texts, a.repeats, model_dims, peak)?;
        let mut all = runs[0].runs.clone();
        all.extend(again.runs.iter());
        let med = crate::bench::median(&all);
        runs[0].seconds = med;
        runs[0].tokens_per_s = runs[0].real_tokens as f64 / med;
        report(&format!(
            "{:<52} {:>7.1} texts/s {:>8.0} tokens/s (median of {} runs before and after the reference)",
            runs[0].engine,
            texts.len() as f64 / med,
            runs[0].tokens_per_s,
            all.len()
        ));
    }
    if let Some((name, tps)) = &st_best {
        report("");
        for r in &runs {
            report(&format!(
                "ratio: {} / {name} = {:.2}x (tokens/s, same texts, same {threads} threads)",
                r.engine,
                r.tokens_per_s / tps
            ));
        }
    }
    Ok(results)
}

/// What `semtel bench bootstrap` runs: cold start on labelled sets treated as unlabelled
/// streams, with the simulator (answering from the gold labels with `error_rate` wrong
/// answers) standing in for the LLM. semtel itself never sees a gold label: the stream it
/// reads has none, and the taxonomy is the label names.
pub struct BootstrapBenchOptions {
    /// (name, labelled file, splits that make the stream).
    pub sets: Vec<(String, PathBuf, Vec<String>)>,
    /// Rows the bootstrap may have labelled, as a share of the stream.
    pub budget_share: f64,
    pub error_rate: f64,
    /// The simulator's error models to run under: `uniform`, `confusable` (see
    /// [`crate::llm::simulator::ErrorModel`]).
    pub error_models: Vec<String>,
    pub encoder: crate::embed::EncoderOptions,
    pub work: PathBuf,
    /// Variants: `active` (representative sampling + active rounds), `random` (random
    /// sampling, one round).
    pub variants: Vec<String>,
    /// Agreement target (`None`: the bootstrap's automatic one).
    pub target: Option<f64>,
    /// Runs of each (set, variant); run `r` uses seed `seed + r` for the bootstrap's sampling
    /// and the simulator's mistakes. One run says little: which rows the LLM gets wrong, the
    /// ~300 rows thresholds are calibrated on and the order answers arrive in during
    /// `classify --grow` all move the figures by a point or more.
    pub repeats: usize,
    pub seed: u64,
}

/// One (set, variant, seed) of `semtel bench bootstrap`.
#[derive(Debug, Clone, Serialize)]
pub struct BootstrapRun {
    pub set: String,
    pub variant: String,
    /// The simulator's error model (`uniform` or `confusable`).
    pub error_model: String,
    pub seed: u64,
    pub rows: usize,
    pub bootstrap_labelled: usize,
    /// Rows the classify pass sent to the LLM that it had not labelled before.
    pub classify_llm_new: usize,
    /// Rows the LLM labelled in all (bootstrap + escalations), as a share of the stream.
    pub llm_share: f64,
    /// Accuracy of the whole run's labels against gold (rows left unlabelled count as wrong).
    pub accuracy: f64,
    /// Every row sent to the (same) LLM.
    pub llm_only_accuracy: f64,
    pub unlabelled: usize,
    pub rounds: Vec<crate::app::bootstrap::RoundReport>,
    pub stopped_because: String,
    pub llm_self_agreement: Option<f64>,
    pub llm_self_agreement_kept: Option<f64>,
    pub target: f64,
    pub seconds: f64,
}

pub fn bootstrap_benchmark(
    o: &BootstrapBenchOptions,
    report: &mut dyn FnMut(&BootstrapRun),
) -> Result<Vec<BootstrapRun>> {
    use crate::app::bootstrap::{self, BootstrapOptions, Sampling};
    use crate::llm::{config::EndpointConfig, simulator};
    let mut runs = Vec::new();
    for (name, file, splits) in &o.sets {
        let dir = o.work.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // The stream without labels, and the gold kept aside.
        let mut gold: std::collections::HashMap<String, String> = Default::default();
        let mut truth: std::collections::HashMap<String, String> = Default::default();
        let stream = dir.join("stream.jsonl");
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&stream).map_err(|e| Error::io(&stream, e))?,
        );
        for split in splits {
            let opts = crate::input::InputOptions {
                split: Some(split.clone()),
                ..Default::default()
            };
            for r in crate::input::read_all(file, &opts)? {
                let (Ok(c), Some(l)) = (r.content, r.label) else {
                    continue;
                };
                let text = c.flatten();
                truth.insert(simulator::truth_key(&text), l.clone());
                gold.insert(r.id.clone(), l);
                use std::io::Write;
                writeln!(w, "{}", serde_json::json!({"id": r.id, "text": text}))
                    .map_err(|e| Error::io(&stream, e))?;
            }
        }
        drop(w);
        let mut labels: Vec<&String> = gold.values().collect();
        labels.sort();
        labels.dedup();
        let tax = dir.join("taxonomy.toml");
        let mut t = String::from("[labels]\n");
        for l in &labels {
            t.push_str(&format!("{:?} = {:?}\n", l, l.replace('_', " ")));
        }
        std::fs::write(&tax, t).map_err(|e| Error::io(&tax, e))?;
        let n = gold.len();
        let mut error_models = Vec::new();
        for em in &o.error_models {
            error_models.push(match em.as_str() {
                "uniform" => simulator::ErrorModel::Uniform,
                "confusable" => {
                    let encoder = crate::embed::Encoder::load(&o.encoder)?;
                    simulator::confusable_from_file(
                        &stream_labelled(file, splits)?,
                        &encoder,
                        o.error_rate,
                    )?
                }
                other => {
                    return Err(Error::Config(format!(
                        "unknown error model `{other}` (uniform, confusable)"
                    )))
                }
            });
        }
        for errors in error_models {
            let sim_cfg = simulator::SimConfig {
                latency_ms: 5.0,
                jitter_ms: 1.0,
                error_rate: o.error_rate,
                errors: errors.clone(),
                truth: truth.clone(),
                ..Default::default()
            };
            let endpoint = |url: String| EndpointConfig {
                name: "sim".into(),
                kind: Default::default(),
                url,
                model: "sim-1".into(),
                deployment: None,
                api_version: "2024-10-21".into(),
                api_key_env: None,
                weight: 1.0,
                rpm: 0,
                tpm: 0,
                price_in_per_1k: 0.00015,
                price_out_per_1k: 0.0006,
                max_concurrency: 32,
            };
            // LLM-only: every row of the stream through the same simulated LLM.
            let llm_only_accuracy = {
                let h = simulator::start(sim_cfg.clone(), 0)?;
                let cfg = crate::llm::LlmConfig {
                    cache: Some("off".into()),
                    endpoints: vec![endpoint(h.url())],
                    ..Default::default()
                };
                let encoder = crate::embed::Encoder::load(&o.encoder)?;
                let rows: Vec<crate::pipeline::Classified> =
                    crate::input::read_all(&stream, &Default::default())?
                        .into_iter()
                        .map(|r| crate::pipeline::Classified {
                            out: crate::row::OutputRow {
                                decided_by: crate::row::DecidedBy::Escalate,
                                error: None,
                                ..crate::row::OutputRow::error(r.id, String::new(), Vec::new())
                            },
                            content: r.content.ok(),
                            vector: None,
                            scores: None,
                            examples: Vec::new(),
                            audit: false,
                        })
                        .collect();
                let all: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
                let (out, _) = llm_label_all(cfg, &all, encoder.token_counter(), &rows)?;
                out.iter()
                    .filter(|r| r.label.as_ref() == gold.get(&r.id))
                    .count() as f64
                    / n as f64
            };
            for (variant, seed) in o
                .variants
                .iter()
                .flat_map(|v| (0..o.repeats.max(1) as u64).map(move |r| (v, o.seed + r)))
            {
                let t = Instant::now();
                let vdir = dir.join(format!("{}-{variant}-{seed}", errors.name()));
                std::fs::create_dir_all(&vdir).map_err(|e| Error::io(&vdir, e))?;
                let h = simulator::start(
                    simulator::SimConfig {
                        seed,
                        ..sim_cfg.clone()
                    },
                    0,
                )?;
                let cache = vdir.join("llm-cache.jsonl");
                let cfg = crate::llm::LlmConfig {
                    cache: Some(cache.display().to_string()),
                    endpoints: vec![endpoint(h.url())],
                    ..Default::default()
                };
                let idx = vdir.join("idx");
                let mut bo = BootstrapOptions::new(
                    stream.clone(),
                    tax.clone(),
                    cfg.clone(),
                    idx.clone(),
                    o.encoder.clone(),
                );
                bo.budget_rows = Some((o.budget_share * n as f64).round() as usize);
                bo.target = o.target;
                bo.seed = seed;
                match variant.as_str() {
                    "active" => {}
                    "random" => {
                        bo.sampling = Sampling::Random;
                        bo.rounds = 1;
                    }
                    other => {
                        return Err(Error::Config(format!(
                            "unknown variant `{other}` (active, random)"
                        )))
                    }
                }
                let b = bootstrap::run(&bo, &crate::progress::Progress::hidden())?;
                let llm_path = vdir.join("llm.toml");
                let toml = format!(
                "cache = {:?}\n[[endpoints]]\nname = \"sim\"\nurl = {:?}\nmodel = \"sim-1\"\nprice_in_per_1k = 0.00015\nprice_out_per_1k = 0.0006\nmax_concurrency = 32\n",
                cache.display().to_string(),
                h.url()
            );
                std::fs::write(&llm_path, toml).map_err(|e| Error::io(&llm_path, e))?;
                let out_path = vdir.join("labels.jsonl");
                let job = crate::app::classify::ClassifyJob::open(
                    crate::app::classify::ClassifyOptions {
                        index: idx.clone(),
                        input: stream.clone(),
                        output: out_path.clone(),
                        classifier: crate::pipeline::ClassifierOptions {
                            encoder: o.encoder.clone(),
                            k: None,
                            threshold: None,
                            signal: None,
                            writable: false,
                            ..Default::default()
                        },
                        also: Vec::new(),
                        input_options: Default::default(),
                        part_rows: 100_000,
                        existing: crate::output::Existing::Overwrite,
                        llm: Some(llm_path),
                        llm_overrides: Default::default(),
                        grow_min_confidence: Some(0.0),
                        retry_escalated: false,
                        guards: true,
                        segment_col: None,
                    },
                )?;
                let rep = job.run(&crate::progress::Progress::hidden())?;
                let st = rep.llm.clone().unwrap_or_default();
                let classify_llm_new = st
                    .rows_labelled
                    .saturating_sub(st.cache_hits + st.deduplicated)
                    as usize;
                let out = crate::output::read_stored_rows(&out_path)?;
                let _ = out;
                let mut right = 0usize;
                let mut unlabelled = 0usize;
                for line in std::fs::read_to_string(&out_path)
                    .map_err(|e| Error::io(&out_path, e))?
                    .lines()
                {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .map_err(|e| Error::output(&out_path, e.to_string()))?;
                    let id = v["id"].as_str().unwrap_or_default();
                    match v["label"].as_str() {
                        Some(l) if v["decided_by"] != "escalate" => {
                            right += usize::from(gold.get(id).map(String::as_str) == Some(l))
                        }
                        _ => unlabelled += 1,
                    }
                }
                let r = BootstrapRun {
                    set: name.clone(),
                    variant: variant.clone(),
                    error_model: errors.name().to_string(),
                    seed,
                    rows: n,
                    bootstrap_labelled: b.labelled_rows,
                    classify_llm_new,
                    // Rows asked twice to measure the LLM's self-agreement are paid for too.
                    llm_share: (b.labelled_rows + b.llm_retest_rows + classify_llm_new) as f64
                        / n as f64,
                    accuracy: right as f64 / n as f64,
                    llm_only_accuracy,
                    unlabelled,
                    rounds: b.rounds.clone(),
                    stopped_because: b.stopped_because.clone(),
                    llm_self_agreement: b.llm_self_agreement,
                    llm_self_agreement_kept: b.llm_self_agreement_kept,
                    target: b.target,
                    seconds: t.elapsed().as_secs_f64(),
                };
                report(&r);
                runs.push(r);
            }
        }
    }
    Ok(runs)
}

/// The labelled rows of `splits` of `file`, as `(flattened text, label)`.
fn stream_labelled(file: &Path, splits: &[String]) -> Result<Vec<(String, String)>> {
    let mut items = Vec::new();
    for split in splits {
        let opts = crate::input::InputOptions {
            split: Some(split.clone()),
            ..Default::default()
        };
        for r in crate::input::read_all(file, &opts)? {
            if let (Ok(c), Some(l)) = (r.content, r.label) {
                items.push((c.flatten(), l));
            }
        }
    }
    Ok(items)
}
