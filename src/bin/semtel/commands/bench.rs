//! `semtel bench embed|llm`: benchmarks that print figures.

use crate::args::ColumnArgs;
use crate::args_tools::{BenchEmbedArgs, BenchLlmArgs};
use crate::options::Ctx;
use anyhow::{bail, Context, Result};
use semtel::embed::Encoder;
use semtel::input;
use semtel::pipeline::Classifier;
use std::path::PathBuf;

pub fn embed(ctx: &Ctx, a: BenchEmbedArgs) -> Result<()> {
    use semtel::bench;
    let threads = rayon::current_num_threads();
    let texts = match &a.texts_file {
        Some(f) => bench::read_text_file(f)?,
        None => bench::embed_text_set(&a.shared, a.texts)?,
    };
    if let Some(f) = &a.save_texts {
        bench::write_text_file(f, &texts)?;
    }
    let peak = bench::f32_gemm_peak(threads);
    eprintln!(
        "{} texts, {threads} threads; measured f32 GEMM peak (gemm crate, {threads} threads): {peak:.0} GFLOP/s",
        texts.len()
    );
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut runs = Vec::new();
    let load = |engine| -> Result<Encoder> {
        let mut eo = ctx.encoder_options();
        eo.engine = engine;
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
    let first = load(a.engines[0])?;
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
    for (i, &engine) in a.engines.iter().enumerate() {
        let other;
        let enc = if i == 0 {
            &first
        } else {
            other = load(engine)?;
            &other
        };
        let r = bench::bench_encoder(enc, &texts, a.repeats, model_dims, peak)?;
        eprintln!(
            "{:<52} {:>7.1} texts/s {:>8.0} tokens/s (padded {:>8.0}/s) {:>6.1} GFLOP/s = {:>4.0}% of f32 GEMM peak, peak RSS {:.0} MB",
            r.engine,
            r.texts_per_s,
            r.tokens_per_s,
            r.padded_tokens_per_s,
            r.gflops,
            r.share_of_f32_gemm_peak * 100.0,
            r.peak_rss_mb
        );
        results.push(serde_json::to_value(&r)?);
        runs.push(r);
    }
    let mut st_best: Option<(String, f64)> = None;
    if let Some(py) = &a.st {
        let dir = std::env::temp_dir().join(format!("semtel-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let tf = dir.join("texts.jsonl");
        bench::write_text_file(&tf, &texts)?;
        let script = PathBuf::from("benches/st_embed.py");
        let out = std::process::Command::new(py)
            .arg(&script)
            .arg(&tf)
            .arg(&model_dir)
            .args([
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
            .with_context(|| format!("running {} {}", py.display(), script.display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        if !out.status.success() {
            bail!(
                "sentence-transformers run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let tps = v["tokens_per_s"].as_f64().unwrap_or(0.0);
            eprintln!(
                "{:<52} {:>7.1} texts/s {:>8.0} tokens/s",
                v["engine"].as_str().unwrap_or("?"),
                v["texts_per_s"].as_f64().unwrap_or(0.0),
                tps
            );
            if st_best.as_ref().is_none_or(|b| tps > b.1) {
                st_best = Some((v["engine"].as_str().unwrap_or("?").to_string(), tps));
            }
            results.push(v);
        }
        // Repeat semtel's first engine after the reference, so machine noise hits both sides.
        let again = bench::bench_encoder(&first, &texts, a.repeats, model_dims, peak)?;
        let mut all = runs[0].runs.clone();
        all.extend(again.runs.iter());
        let med = bench::median(&all);
        runs[0].seconds = med;
        runs[0].tokens_per_s = runs[0].real_tokens as f64 / med;
        eprintln!(
            "{:<52} {:>7.1} texts/s {:>8.0} tokens/s (median of {} runs before and after the reference)",
            runs[0].engine,
            texts.len() as f64 / med,
            runs[0].tokens_per_s,
            all.len()
        );
    }
    if let Some((name, tps)) = &st_best {
        eprintln!(
            "\nratio: {} / {name} = {:.2}x (tokens/s, same texts, same {threads} threads)",
            runs[0].engine,
            runs[0].tokens_per_s / tps
        );
    }
    if a.json {
        for r in results {
            println!("{r}");
        }
    }
    Ok(())
}

pub fn llm(ctx: &Ctx, a: BenchLlmArgs) -> Result<()> {
    use semtel::llm::{config::EndpointConfig, simulator, LlmConfig};
    let classifier = Classifier::open(
        &a.index,
        &ctx.classifier_options(None, Some(f32::INFINITY), None)?,
    )?;
    let mut opts = ctx.input_options(&ColumnArgs::default());
    opts.split = Some(a.split.clone());
    let mut rows = input::read_all(&a.truth, &opts)?;
    rows.truncate(a.items);
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
    let endpoint = |rpm: u64, tpm: u64, conc: usize| EndpointConfig {
        name: "sim".into(),
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
    let base_cfg = |n: usize, narrow: bool, ep: EndpointConfig| LlmConfig {
        items_per_call: n,
        narrow_above: if narrow { 20 } else { 0 },
        cache: Some("off".into()),
        endpoints: vec![ep],
        ..Default::default()
    };
    let mut runs = Vec::new();
    let print = |r: &semtel::bench::LlmRun| {
        eprintln!(
            "{:<34} N={:<2} narrow={:<5} {:>6.1}s (floor {:>6}) calls {:>4} 429s {:>4} lost {} dup {} out-of-schema {} acc {:.3} tokens/item in {:>6.1} out {:>4.1} ${:.4}/1k items",
            r.scenario,
            r.items_per_call,
            r.narrowing,
            r.seconds,
            r.floor_seconds.map_or("-".into(), |f| format!("{f:.1}s")),
            r.calls,
            r.http_429,
            r.lost,
            r.duplicated,
            r.out_of_schema,
            r.accuracy_vs_truth,
            r.tokens_in_per_item,
            r.tokens_out_per_item,
            r.cost_per_1k_items_usd
        );
    };
    let limited = |sim_latency: f64| simulator::SimConfig {
        rpm: 600,
        tpm: 200_000,
        latency_ms: sim_latency,
        jitter_ms: 75.0,
        truth: truth.clone(),
        ..Default::default()
    };
    if a.scenarios.iter().any(|s| s == "throughput") {
        let r = semtel::bench::llm_scenario(
            "throughput adaptive (600 RPM, 200k TPM)",
            &classified,
            &gold,
            &labels,
            limited(300.0),
            base_cfg(8, true, endpoint(600, 200_000, 64)),
            counter.clone(),
        )?;
        print(&r);
        runs.push(r);
        let mut fixed = base_cfg(8, true, endpoint(0, 0, 32));
        fixed.adaptive = false;
        fixed.max_attempts = 30;
        let r = semtel::bench::llm_scenario(
            "throughput fixed concurrency 32",
            &classified,
            &gold,
            &labels,
            limited(300.0),
            fixed,
            counter.clone(),
        )?;
        print(&r);
        runs.push(r);
    }
    if a.scenarios.iter().any(|s| s == "tokens") {
        for narrow in [false, true] {
            for n in [1, 4, 8, 16] {
                let r = semtel::bench::llm_scenario(
                    "tokens per item",
                    &classified,
                    &gold,
                    &labels,
                    simulator::SimConfig {
                        latency_ms: 5.0,
                        jitter_ms: 1.0,
                        truth: truth.clone(),
                        ..Default::default()
                    },
                    base_cfg(n, narrow, endpoint(0, 0, 16)),
                    counter.clone(),
                )?;
                print(&r);
                runs.push(r);
            }
        }
    }
    if a.scenarios.iter().any(|s| s == "faults") {
        let mut cfg = base_cfg(8, true, endpoint(0, 0, 32));
        cfg.timeout_base_s = 1.5;
        cfg.timeout_per_1k_tokens_s = 0.0;
        cfg.backoff_base_s = 0.1;
        cfg.backoff_max_s = 2.0;
        cfg.max_item_attempts = 8;
        cfg.max_attempts = 10;
        let r = semtel::bench::llm_scenario(
            "30% injected faults (all kinds)",
            &classified,
            &gold,
            &labels,
            simulator::SimConfig {
                latency_ms: 50.0,
                jitter_ms: 10.0,
                hang_s: 4.0,
                faults: simulator::Faults::spread(0.3, &[]).map_err(anyhow::Error::msg)?,
                truth: truth.clone(),
                ..Default::default()
            },
            cfg,
            counter.clone(),
        )?;
        print(&r);
        runs.push(r);
    }
    if a.json {
        for r in runs {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
