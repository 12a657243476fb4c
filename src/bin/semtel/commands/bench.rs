//! `semtel bench embed|llm`: benchmarks that print figures.

use crate::args::ColumnArgs;
use crate::args_tools::{
    BenchBootstrapArgs, BenchBuildArgs, BenchEmbedArgs, BenchGuardsArgs, BenchLlmArgs,
    BenchRedactArgs, BenchServeArgs,
};
use crate::options::Ctx;
use anyhow::Result;
use semtel::pipeline::Classifier;

pub fn embed(ctx: &Ctx, a: BenchEmbedArgs) -> Result<()> {
    let results = semtel::bench::embed_benchmark(
        &semtel::bench::EmbedBenchOptions {
            encoder_options: ctx.encoder_options(),
            engines: a.engines.clone(),
            precisions: a.precisions.clone(),
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
    for why in &r.unlabelled_reasons {
        eprintln!("    unlabelled: {why}");
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

pub fn bootstrap(ctx: &Ctx, a: BenchBootstrapArgs) -> Result<()> {
    let sets = a
        .sets
        .iter()
        .map(|s| match s.as_str() {
            "banking77" => Ok((
                s.clone(),
                a.shared.join("data/banking77/banking77.jsonl"),
                vec!["train".to_string(), "test".to_string()],
            )),
            "clinc150" => Ok((
                s.clone(),
                a.shared.join("data/clinc150/clinc150.jsonl"),
                vec!["train".to_string(), "test".to_string()],
            )),
            other => Err(anyhow::anyhow!(
                "unknown set `{other}` (banking77, clinc150)"
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let runs = semtel::bench::bootstrap_benchmark(
        &semtel::bench::BootstrapBenchOptions {
            sets,
            budget_share: a.budget_share,
            error_rate: a.error_rate,
            error_models: a.error_models.clone(),
            encoder: ctx.encoder_options(),
            work: a.work.clone(),
            variants: a.variants.clone(),
            target: a.target,
            repeats: a.repeats,
            seed: a.seed,
        },
        &mut |r| {
            eprintln!(
                "{} {} errors {} (seed {}): {} rows; accuracy vs gold {:.2} % (LLM-only {:.2} %); LLM labelled {:.1} % of rows ({} bootstrap + {} escalated), {} left unlabelled; {:.0} s",
                r.set,
                r.variant,
                r.error_model,
                r.seed,
                r.rows,
                100.0 * r.accuracy,
                100.0 * r.llm_only_accuracy,
                100.0 * r.llm_share,
                r.bootstrap_labelled,
                r.classify_llm_new,
                r.unlabelled,
                r.seconds
            );
            for x in &r.rounds {
                eprintln!(
                    "    round {}: +{} rows ({} in all), agreement with the LLM on kept rows {:.1} % [{:.1}, {:.1}], projected escalation {:.1} %",
                    x.round,
                    x.labelled,
                    x.labelled_total,
                    100.0 * x.agreement.value,
                    100.0 * x.agreement.lo,
                    100.0 * x.agreement.hi,
                    100.0 * x.escalated_share
                );
            }
            eprintln!(
                "    stopped: {}; LLM self-agreement {} (on kept rows {}), target {:.3}",
                r.stopped_because,
                r.llm_self_agreement
                    .map_or("-".into(), |a| format!("{a:.3}")),
                r.llm_self_agreement_kept
                    .map_or("-".into(), |a| format!("{a:.3}")),
                r.target
            );
        },
    )?;
    if a.repeats > 1 {
        let mut groups: Vec<(&str, &str, &str)> = runs
            .iter()
            .map(|r| (r.set.as_str(), r.error_model.as_str(), r.variant.as_str()))
            .collect();
        groups.dedup();
        for (set, errors, variant) in groups {
            let mine = |r: &&semtel::bench::BootstrapRun| {
                r.set == set && r.variant == variant && r.error_model == errors
            };
            let of = |f: &dyn Fn(&semtel::bench::BootstrapRun) -> f64| -> (f64, f64, f64) {
                let mut v: Vec<f64> = runs.iter().filter(mine).map(f).collect();
                v.sort_by(f64::total_cmp);
                (v[0], v[v.len() / 2], v[v.len() - 1])
            };
            let (alo, amed, ahi) = of(&|r| 100.0 * r.accuracy);
            let (slo, smed, shi) = of(&|r| 100.0 * r.llm_share);
            let llm_only = runs
                .iter()
                .find(mine)
                .map_or(0.0, |r| 100.0 * r.llm_only_accuracy);
            eprintln!(
                "{set} {variant} errors {errors}, {} runs: accuracy median {amed:.2} % (range {alo:.2}–{ahi:.2}; LLM-only {llm_only:.2} %), rows sent to the LLM median {smed:.1} % (range {slo:.1}–{shi:.1})",
                a.repeats
            );
        }
    }
    if a.json {
        for r in runs {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

pub fn encoders(ctx: &Ctx, a: crate::args_tools::BenchEncodersArgs) -> Result<()> {
    if a.replot {
        let rows = semtel::bench::encoders::replot(&a.out)?;
        eprintln!(
            "rewrote the reports of {} results in {}",
            rows.len(),
            a.out.display()
        );
        return Ok(());
    }
    let models = if a.models.is_empty() {
        semtel::model::KNOWN_MODELS
            .iter()
            .map(|k| format!("models/{}", k.name))
            .filter(|d| std::path::Path::new(d).join("model.safetensors").is_file())
            .collect()
    } else {
        a.models.clone()
    };
    eprintln!(
        "{} threads; target {:.0} % kept-accuracy",
        rayon::current_num_threads(),
        a.target * 100.0
    );
    eprintln!(
        "{:<22} {:<9} {:<4} {:<9} {:>5} {:>7} {:>7} {:<9} {:>8} {:>8} {:>8} {:>9} {:>6}",
        "model",
        "set",
        "lang",
        "trained",
        "rows",
        "kNN",
        "head",
        "signal",
        "kept",
        "kept acc",
        "ceiling",
        "tokens/s",
        "s"
    );
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0));
    let rows = semtel::bench::encoders::encoder_benchmark(
        &semtel::bench::encoders::EncoderBenchOptions {
            models,
            sets: a.sets.clone(),
            shared: a.shared.clone(),
            xsid: a.xsid.clone(),
            xsid_indexes: a.xsid_indexes.clone(),
            out: a.out.clone(),
            target: a.target,
            encoder: ctx.encoder_options(),
        },
        &mut |r| {
            eprintln!(
                "{:<22} {:<9} {:<4} {:<9} {:>5} {:>7} {:>7} {:<9} {:>8} {:>8} {:>8} {:>9.0} {:>6.0}",
                r.model,
                r.set,
                r.lang.as_deref().unwrap_or("-"),
                r.trained_on,
                r.test_rows,
                pct(Some(r.knn_accuracy)),
                pct(r.head_accuracy),
                r.signal,
                pct(Some(r.kept_share)),
                pct(r.kept_accuracy),
                pct(r.kept_share_ceiling),
                r.tokens_per_s,
                r.seconds
            )
        },
    )?;
    eprintln!(
        "{} results; reports in {} (encoders.json, encoders.csv, encoders.svg)",
        rows.len(),
        a.out.display()
    );
    Ok(())
}

pub fn build(ctx: &Ctx, a: BenchBuildArgs) -> Result<()> {
    let kinds = a
        .kinds
        .iter()
        .map(|k| match k.as_str() {
            "single" => Ok(false),
            "multi" => Ok(true),
            other => Err(anyhow::anyhow!("unknown kind `{other}` (single, multi)")),
        })
        .collect::<Result<Vec<bool>>>()?;
    eprintln!(
        "kind    rows     exemplars labels  embed (est.)  insert  auto-cal  save  calibrate  after/embed  peak RSS"
    );
    let runs = semtel::bench::scale::scale_benchmark(
        &semtel::bench::scale::ScaleOptions {
            shared: a.shared.clone(),
            sizes: a.sizes.clone(),
            kinds,
            sample: a.sample,
            encoder: ctx.encoder_options(),
            work: a.work.clone(),
            seed: 7,
        },
        &mut |r| {
            eprintln!(
                "{:<7} {:<8} {:<9} {:<7} {:>9.0} s  {:>5.1} s {:>6.1} s {:>4.1} s {:>7.1} s  {:>9.1} %  {:>6.0} MB",
                if r.multi_label { "multi" } else { "single" },
                r.rows,
                r.exemplars,
                r.labels,
                r.embed_s,
                r.insert_s,
                r.auto_calibrate_s,
                r.save_s,
                r.calibrate_s,
                100.0 * r.after_embedding_share,
                r.peak_rss_mb
            );
        },
    )?;
    if a.json {
        for r in runs {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

pub fn serve(ctx: &Ctx, a: BenchServeArgs) -> Result<()> {
    let g = &ctx.global;
    let mut global_args = Vec::new();
    if let Some(t) = g.threads {
        global_args.extend(["--threads".to_string(), t.to_string()]);
    }
    if let Some(m) = &g.model {
        global_args.extend(["--model".to_string(), m.clone()]);
    }
    if let Some(e) = g.engine {
        let name = match e {
            semtel::embed::Engine::Auto => "auto",
            semtel::embed::Engine::Fast => "fast",
            semtel::embed::Engine::Candle => "candle",
        };
        global_args.extend(["--engine".to_string(), name.to_string()]);
    }
    let (input, split) = match &a.input {
        Some(p) => (p.clone(), a.split.clone()),
        None => (
            std::path::PathBuf::from("../shared/data/banking77/banking77.jsonl"),
            Some(a.split.clone().unwrap_or_else(|| "test".into())),
        ),
    };
    let o = semtel::bench::serve::ServeBenchOptions {
        exe: std::env::current_exe()?,
        server_exe: a.server_exe.clone(),
        index: a.index.clone(),
        input,
        split,
        rows: a.rows,
        clients: a.clients.clone(),
        batch: a.batch.clone(),
        repeats: a.repeats,
        max_seconds: a.max_seconds,
        soak_s: a.soak,
        global_args,
        work: a.work.clone(),
        slow_clients: a.slow_clients.clone(),
        heavy_clients: a.heavy_clients.clone(),
        contention_s: a.contention_seconds,
        only_contention: a.only_contention,
    };
    let r = semtel::bench::serve::serve_benchmark(&o, &mut |l| eprintln!("{l}"))?;
    eprintln!(
        "\nbatch path: {:.1} rows/s (median of {:?})",
        r.batch_rows_per_s, r.batch_runs
    );
    eprintln!("| clients | rows/request | rows/s | vs batch | p50 ms | p95 ms | p99 ms | rows/micro-batch | errors |");
    eprintln!("|---|---|---|---|---|---|---|---|---|");
    for l in &r.levels {
        eprintln!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            l.clients,
            l.rows_per_request,
            l.rows_per_s,
            l.vs_batch,
            l.p50_ms,
            l.p95_ms,
            l.p99_ms,
            l.mean_batch_rows,
            l.errors
        );
    }
    eprintln!("saturation: {:.2} × the batch path", r.saturation_vs_batch);
    if !r.contention.is_empty() {
        eprintln!("\n| slow connections | heavy clients | one-row requests | p50 ms | p99 ms | max ms | errors | heavy rows through |");
        eprintln!("|---|---|---|---|---|---|---|---|");
        for c in &r.contention {
            eprintln!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} |",
                c.slow_connections,
                c.heavy_clients,
                c.requests,
                c.p50_ms,
                c.p99_ms,
                c.max_ms,
                c.errors,
                c.heavy_rows
            );
        }
    }
    if let Some(s) = &r.soak {
        eprintln!(
            "soak: {:.0} s, {} requests ({:.1} rows/s, {} errors); server RSS {:.1} → {:.1} MB (max {:.1}), slope over the second half {:+.2} MB/min",
            s.seconds, s.requests, s.rows_per_s, s.errors, s.rss_first_mb, s.rss_last_mb, s.rss_max_mb, s.rss_slope_mb_per_min
        );
    }
    let json = serde_json::to_string_pretty(&r)?;
    let path = a.work.join("serve.json");
    std::fs::write(&path, &json)?;
    eprintln!("wrote {}", path.display());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn redact(ctx: &Ctx, a: BenchRedactArgs) -> Result<()> {
    let o = semtel::bench::redact::RedactBenchOptions {
        set: a.set.clone(),
        level: a.level.parse().map_err(anyhow::Error::msg)?,
        rules: semtel::pii::Rules::default(),
        repeats: a.repeats,
        presidio: a.presidio.clone(),
        presidio_modes: a.presidio_modes.clone(),
        encoder: (!a.no_embedding).then(|| ctx.encoder_options()),
        work: a.work.clone(),
    };
    let r = semtel::bench::redact::redact_benchmark(&o, &mut |l| eprintln!("{l}"))?;
    eprintln!("\n{} rows, {} characters", r.rows, r.chars);
    let types: std::collections::BTreeSet<&String> =
        r.runs.iter().flat_map(|run| run.by_type.keys()).collect();
    let mut head = String::from("| type | gold |");
    let mut rule = String::from("|---|---|");
    for run in &r.runs {
        head.push_str(&format!(" {} P | R |", run.tool));
        rule.push_str("---|---|");
    }
    eprintln!("{head}\n{rule}");
    for t in types {
        let gold = r
            .runs
            .iter()
            .find_map(|run| run.by_type.get(t).map(|s| s.gold))
            .unwrap_or(0);
        let mut line = format!("| {t} | {gold} |");
        for run in &r.runs {
            match run.by_type.get(t) {
                Some(s) => line.push_str(&format!(" {} | {} |", pct(s.precision), pct(s.recall))),
                None => line.push_str(" – | – |"),
            }
        }
        eprintln!("{line}");
    }
    let cats: std::collections::BTreeSet<&String> = r
        .runs
        .iter()
        .flat_map(|run| run.by_category.keys())
        .collect();
    if !cats.is_empty() {
        let mut head = String::from("\n| category | rows | gold |");
        let mut rule = String::from("|---|---|---|");
        for run in &r.runs {
            head.push_str(&format!(" {} recall | alarms |", run.tool));
            rule.push_str("---|---|");
        }
        eprintln!("{head}\n{rule}");
        for c in cats {
            let first = r.runs.iter().find_map(|run| run.by_category.get(c));
            let (rows, gold) = first.map_or((0, 0), |s| (s.rows, s.gold));
            let mut line = format!("| {c} | {rows} | {gold} |");
            for run in &r.runs {
                match run.by_category.get(c) {
                    Some(s) => line.push_str(&format!(" {} | {} |", pct(s.recall), s.false_alarms)),
                    None => line.push_str(" – | – |"),
                }
            }
            eprintln!("{line}");
        }
    }
    for run in &r.runs {
        eprintln!(
            "{}: {:.0} chars/s, {:.0} texts/s; {} alarms on near-miss rows; {} predictions of other types",
            run.tool, run.chars_per_s, run.texts_per_s, run.false_alarms_on_clean_rows, run.other_predictions
        );
    }
    if let Some(s) = r.runs.first() {
        for p in r.runs.iter().skip(1) {
            eprintln!(
                "throughput: semtel {:.1}× {}",
                s.chars_per_s / p.chars_per_s.max(1e-9),
                p.tool
            );
        }
    }
    eprintln!(
        "gold values still in semtel's output, by type: {:?}",
        r.semtel_leaked
    );
    std::fs::create_dir_all(&a.work)?;
    let path = a.work.join("redact.json");
    std::fs::write(&path, serde_json::to_string_pretty(&r)?)?;
    eprintln!("wrote {}", path.display());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{:.1}", 100.0 * x)
    }
}

pub fn guards(a: BenchGuardsArgs) -> Result<()> {
    for (name, x) in [
        ("base", a.base),
        ("fall", a.fall),
        ("llm-accuracy", a.llm_accuracy),
    ] {
        anyhow::ensure!((0.0..=1.0).contains(&x), "--{name} is a share, not {x}");
    }
    let results =
        semtel::bench::guards::guard_benchmark(&semtel::bench::guards::GuardBenchOptions {
            audit_rates: a.audit_rates.clone(),
            base: a.base,
            fall: a.fall,
            llm_accuracy: a.llm_accuracy,
            before: a.before,
            max_after: a.max_after,
            runs: a.runs.max(1),
            seed: a.seed,
        });
    eprintln!(
        "segment kept-accuracy {:.1}% falling by {:.1} points; LLM accuracy {:.1}% (stated to the guards); {} runs",
        100.0 * a.base,
        100.0 * a.fall,
        100.0 * a.llm_accuracy,
        a.runs
    );
    eprintln!("| audit rate | detected | delay p50 / p90 (rows of the segment) | within 3,000 rows | audited rows to detect (p50) | false trips per 10k rows |");
    eprintln!("|---|---|---|---|---|---|");
    for r in &results {
        eprintln!(
            "| {:.1}% | {}/{} | {:.0} / {:.0} | {:.0}% | {:.0} | {:.2} |",
            100.0 * r.audit_rate,
            r.detected,
            r.runs,
            r.delay_rows_p50,
            r.delay_rows_p90,
            100.0 * r.detected_within_3000,
            r.audited_rows_p50,
            r.false_trips_per_10k
        );
        if a.json {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    Ok(())
}
