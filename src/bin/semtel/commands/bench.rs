//! `semtel bench embed|llm`: benchmarks that print figures.

use crate::args::ColumnArgs;
use crate::args_tools::{BenchEmbedArgs, BenchLlmArgs};
use crate::options::Ctx;
use anyhow::Result;
use semtel::pipeline::Classifier;

pub fn embed(ctx: &Ctx, a: BenchEmbedArgs) -> Result<()> {
    let results = semtel::bench::embed_benchmark(
        &semtel::bench::EmbedBenchOptions {
            encoder_options: ctx.encoder_options(),
            engines: a.engines.clone(),
            shared: a.shared.clone(),
            texts: a.texts,
            texts_file: a.texts_file.clone(),
            save_texts: a.save_texts.clone(),
            repeats: a.repeats,
            batch_tokens: a.batch_tokens,
            batch_rows: a.batch_rows,
            st: a.st.clone(),
            st_dtypes: a.st_dtypes.clone(),
            st_batch_size: a.st_batch_size,
        },
        &mut |line| eprintln!("{line}"),
    )?;
    if a.json {
        for r in results {
            println!("{r}");
        }
    }
    Ok(())
}

pub fn llm(ctx: &Ctx, a: BenchLlmArgs) -> Result<()> {
    let classifier = Classifier::open(
        &a.index,
        &ctx.classifier_options(None, Some(f32::INFINITY), None)?,
    )?;
    let mut input_options = ctx.input_options(&ColumnArgs::default());
    input_options.split = Some(a.split.clone());
    let external = a
        .llm
        .as_deref()
        .map(semtel::llm::LlmConfig::load)
        .transpose()?;
    let mut scenarios = a.scenarios.clone();
    if external.is_some() && !scenarios.iter().any(|s| s == "external") {
        scenarios.push("external".into());
    }
    let runs = semtel::bench::llm_benchmark(
        semtel::bench::LlmBenchOptions {
            classifier: &classifier,
            truth: a.truth.clone(),
            input_options,
            items: a.items,
            scenarios,
            external,
            external_limits: match (a.true_rpm, a.true_tpm) {
                (None, None) => None,
                (r, t) => Some((r.unwrap_or(0), t.unwrap_or(0))),
            },
        },
        &mut print_run,
    )?;
    if a.json {
        for r in runs {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

fn print_run(r: &semtel::bench::LlmRun) {
    eprintln!(
            "{:<46} N={:<2} narrow={:<5} {:>6.1}s floor {:>7} ratio {:>5} calls {:>4} 429s {:>4} hedges {:>3} lost {} dup {} out-of-schema {} unlabelled {} acc {:.3} tokens/item in {:>6.1} out {:>4.1} ${:.4}/1k items",
            r.scenario,
            r.items_per_call,
            r.narrowing,
            r.seconds,
            r.floor_seconds.map_or("-".into(), |f| format!("{f:.1}s")),
            r.ratio_to_floor.map_or("-".into(), |f| format!("{f:.3}")),
            r.calls,
            r.http_429,
            r.hedges,
            r.lost,
            r.duplicated,
            r.out_of_schema,
            r.unlabelled,
            r.accuracy_vs_truth,
            r.tokens_in_per_item,
            r.tokens_out_per_item,
            r.cost_per_1k_items_usd
        );
    for e in &r.endpoints {
        eprintln!("    {}", endpoint_line(e));
    }
}

/// One endpoint's figures, as the run summary and the benchmark print them.
pub fn endpoint_line(e: &semtel::llm::limiter::EndpointStats) -> String {
    let per_min = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}"));
    format!(
        "endpoint {}: {} calls, {} ok, 429s {}, 5xx {}, timeouts {}, hedges {}, breaker opened {}x, learned RPM {} TPM {}, latency p50 {} p95 {} ms{}",
        e.name,
        e.calls,
        e.ok,
        e.rate_limited,
        e.server_errors,
        e.timeouts,
        e.hedges,
        e.breaker_opened,
        per_min(e.learned_rpm),
        per_min(e.learned_tpm),
        per_min(e.latency_p50_ms),
        per_min(e.latency_p95_ms),
        e.disabled
            .as_ref()
            .map_or(String::new(), |d| format!("; disabled: {d}"))
    )
}
