//! `semtel bench accuracy-cost`: the curve from kNN-only to LLM-only, with plots and a report.

use crate::args_tools::BenchAccArgs;
use crate::options::Ctx;
use anyhow::{bail, Context, Result};
use semtel::input;
use semtel::pipeline::Classifier;
use std::path::Path;

pub fn run(ctx: &Ctx, a: BenchAccArgs) -> Result<()> {
    use semtel::llm::{tier::PromptBuilder, LlmConfig};
    let classifier = Classifier::open(&a.index, &ctx.classifier_options(None, None, None)?)?;
    let opts = ctx.input_options(&a.cols);
    let mut reader = input::open(&a.input, &opts)?;
    let labels = classifier.index.labels().to_vec();
    let mut classified = Vec::new();
    let mut gold = Vec::new();
    while let Some(rows) = reader.next_batch()? {
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.label.is_some() && r.content.is_ok())
            .collect();
        gold.extend(rows.iter().map(|r| r.label.clone().unwrap()));
        classified.extend(classifier.classify(rows)?);
    }
    if classified.is_empty() {
        bail!("no labelled rows in {}", a.input.display());
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
    let (llm_ok, cost_per_row, llm_name, basis): (Vec<bool>, f64, String, String) = if let Some(
        acc,
    ) =
        a.llm.strip_prefix("oracle:")
    {
        let acc: f64 = acc.parse().context("oracle:<accuracy>, e.g. oracle:0.95")?;
        let ok: Vec<bool> = classified
            .iter()
            .map(|c| {
                let h = semtel::llm::cache::text_hash(&c.out.id);
                let u = u64::from_str_radix(&h[..12], 16).unwrap_or(0) as f64 / (1u64 << 48) as f64;
                u < acc
            })
            .collect();
        // Cost estimate: the prompts semtel would send (default settings: 8 rows per call,
        // candidate narrowing, few-shot examples), counted with the tokenizer.
        let pb = PromptBuilder::new(LlmConfig::default(), labels.clone(), counter.clone())?;
        let items: Vec<semtel::llm::tier::PromptItem> = classified
            .iter()
            .map(|c| {
                let candidates = pb.candidates(c.out.neighbors.iter().map(|x| x.label.as_str()));
                semtel::llm::tier::PromptItem {
                    text: semtel::llm::tier::head_tail_chars(
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
            let refs: Vec<&semtel::llm::tier::PromptItem> = chunk.iter().collect();
            let (req, est) = pb.request(&refs);
            tin += est * 1.3; // WordPiece undercounts BPE tokens by ~30 % on this text
            tout += chunk.len() as f64 * 8.0;
            let _ = req;
        }
        let cost = (tin * a.price_in + tout * a.price_out) / 1e6 / n as f64;
        (
                ok,
                cost,
                format!("oracle:{acc} (simulated LLM: gold label, wrong at {:.0}%)", (1.0 - acc) * 100.0),
                format!(
                    "estimated from prompt token counts (8 rows per call, narrowing, few-shot) at ${}/1M input and ${}/1M output tokens",
                    a.price_in, a.price_out
                ),
            )
    } else {
        let cfg = LlmConfig::load(Path::new(&a.llm))?;
        let name = cfg
            .endpoints
            .iter()
            .map(|e| e.model.clone())
            .collect::<Vec<_>>()
            .join("+");
        let (out, stats) = semtel::bench::llm_label_all(cfg, &labels, counter, &classified)?;
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
    let curve = semtel::report::curve(&knn_ok, &llm_ok, &conf, cost_per_row, 40);
    let op_right = (0..n)
        .filter(|&i| if keep[i] { knn_ok[i] } else { llm_ok[i] })
        .count();
    let op_esc = keep.iter().filter(|k| !**k).count();
    let report = semtel::report::AccuracyCost {
        set: a.set.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                a.input
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                a.cols
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
        llm_only: curve.last().unwrap().clone(),
        operating_point: semtel::report::CurvePoint {
            escalated: op_esc as f64 / n as f64,
            accuracy: op_right as f64 / n as f64,
            cost_per_1k_usd: op_esc as f64 * cost_per_row / n as f64 * 1000.0,
        },
        curve,
    };
    semtel::report::write(&a.out, &report)?;
    eprintln!("share to LLM  accuracy  cost/1k conversations");
    for p in report.curve.iter().step_by(4) {
        eprintln!(
            "   {:>5.1}%    {:>6.2}%   ${:.4}",
            p.escalated * 100.0,
            p.accuracy * 100.0,
            p.cost_per_1k_usd
        );
    }
    eprintln!(
        "kNN only {:.2}%; LLM only {:.2}% (${:.4}/1k); calibrated thresholds: {:.1}% to the LLM, {:.2}% accuracy, ${:.4}/1k; report in {}",
        report.knn_only.accuracy * 100.0,
        report.llm_only.accuracy * 100.0,
        report.llm_only.cost_per_1k_usd,
        report.operating_point.escalated * 100.0,
        report.operating_point.accuracy * 100.0,
        report.operating_point.cost_per_1k_usd,
        a.out.join("report.html").display()
    );
    Ok(())
}
