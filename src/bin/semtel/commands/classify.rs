//! `semtel classify`: resolve the flags into [`ClassifyOptions`], open the job, run it, print
//! the summary.

use crate::args::ClassifyArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::app::classify::{ClassifyJob, ClassifyOptions};
use semtel::output::Existing;
use semtel::pipeline::RunSummary;
use std::path::PathBuf;

/// The run's options from the flags and the configuration file.
fn options(ctx: &Ctx, a: &ClassifyArgs) -> Result<ClassifyOptions> {
    let mut input_options = ctx.input_options(&a.cols);
    input_options.batch_rows = a.chunk_rows.max(1);
    input_options.columns.passthrough = if a.passthrough.is_empty() {
        ctx.cfg.classify.passthrough.clone().unwrap_or_default()
    } else {
        a.passthrough.clone()
    };
    let also = super::parse_also(&a.also)?;
    let mut classifier = ctx.classifier_options(a.k, a.threshold, a.signal)?;
    classifier.audit = a.audit.plan()?;
    classifier.no_novelty = !a.audit.novelty_on()?;
    Ok(ClassifyOptions {
        index: a.index.clone(),
        input: a.input.clone(),
        output: a.output.clone(),
        classifier,
        also,
        input_options,
        part_rows: a.part_rows,
        existing: if a.resume {
            Existing::Resume
        } else if a.overwrite {
            Existing::Overwrite
        } else {
            Existing::Refuse
        },
        llm: a.llm.clone().or(ctx.cfg.llm.clone().map(PathBuf::from)),
        llm_overrides: a.send.overrides()?,
        grow_min_confidence: a.grow.then_some(a.grow_min_confidence),
        retry_escalated: a.retry_escalated,
        guards: a.audit.guards_on()?,
        segment_col: a.audit.segment_col.clone(),
    })
}

pub fn run(ctx: &Ctx, a: ClassifyArgs) -> Result<()> {
    let job = ClassifyJob::open(options(ctx, &a)?)?;
    if a.resume && job.resumed_rows() > 0 {
        eprintln!(
            "resuming: {} rows already in {}",
            job.resumed_rows(),
            a.output.display()
        );
    }
    let progress = ctx.progress(job.total_rows(), "classify");
    let report = job.run(&progress)?;
    progress.finish();
    let summary = &report.summary;
    if a.json {
        let mut v = serde_json::to_value(summary)?;
        if let Some(s) = &report.llm {
            v["llm"] = serde_json::to_value(s)?;
        }
        if let Some(r) = &report.retried {
            v["retried"] = serde_json::to_value(r)?;
        }
        println!("{v}");
    }
    eprintln!(
        "wrote {} rows to {} in {:.1}s ({:.0} rows/s): knn {}, escalate {}, llm {}, errors {}{}{}",
        summary.rows_written,
        a.output.display(),
        summary.seconds,
        summary.rows_per_second,
        summary.knn,
        summary.escalated,
        summary.llm,
        summary.errors,
        if summary.rows_skipped_resume > 0 {
            format!(", {} skipped (already done)", summary.rows_skipped_resume)
        } else {
            String::new()
        },
        crate::commands::redacted_note(&summary.redacted)
    );
    if let Some(s) = &report.llm {
        print_llm_summary(s, summary);
    }
    if let Some(r) = &report.retried {
        eprintln!(
            "retried {} rows left `escalate` ({} found in the input): {} now labelled by the LLM, {} still escalated",
            r.escalated,
            r.sent,
            r.labelled,
            r.sent - r.labelled
        );
        if let Some(s) = &r.llm {
            print_llm_summary(s, summary);
        }
    }
    print_trust(summary);
    if let Some(n) = report.grown {
        eprintln!("grew {} by {n} LLM-labelled exemplars", a.index.display());
    }
    if summary.errors > 0 {
        eprintln!("rows with decided_by=error carry the reason in their `error` column");
    }
    if summary.duplicate_ids > 0 {
        eprintln!(
            "warning: {} rows repeat an id of an earlier row; each was classified and written as its own row (check --id-col if ids should be unique)",
            summary.duplicate_ids
        );
    }
    if summary.internal_errors > 0 {
        return Err(super::RunHadErrors(format!(
            "{} rows hit an internal error (a semtel bug) and were written as error rows; every other row was classified",
            summary.internal_errors
        ))
        .into());
    }
    Ok(())
}

pub fn print_llm_summary(s: &semtel::llm::LlmStats, run: &RunSummary) {
    eprintln!(
        "LLM tier: {} rows escalated → {} labelled, {} still escalated after retries; {} calls ({} items sent), {} cache hits, {} duplicates shared",
        s.rows_in, s.rows_labelled, s.rows_failed, s.calls, s.items_sent, s.cache_hits, s.deduplicated
    );
    eprintln!(
        "          tokens in {} / out {}, cost ${:.4}; 429s {}, server errors {}, timeouts {}, flawed replies {}, items retried {}",
        s.tokens_in, s.tokens_out, s.cost_usd, s.rate_limited, s.server_errors, s.timeouts, s.bad_replies, s.retried_items
    );
    if s.hedges > 0 || s.refused > 0 || s.endpoints.len() > 1 {
        eprintln!(
            "          hedged calls {}, requests refused {}",
            s.hedges, s.refused
        );
    }
    for e in &s.endpoints {
        if s.endpoints.len() > 1 || e.disabled.is_some() || e.breaker_opened > 0 {
            eprintln!("          {}", super::bench::endpoint_line(e));
        }
    }
    let paid_items = s
        .rows_labelled
        .saturating_sub(s.cache_hits + s.deduplicated)
        .max(1);
    if s.cost_usd > 0.0 {
        let per_item = s.cost_usd / paid_items as f64;
        let classified = run.rows_written.saturating_sub(run.errors);
        let llm_only = per_item * classified as f64;
        eprintln!(
            "          cost per LLM-labelled row ${:.6}; LLM-only for all {} rows ≈ ${:.4}; saved ≈ ${:.4} ({:.0}%)",
            per_item,
            classified,
            llm_only,
            llm_only - s.cost_usd,
            100.0 * (1.0 - s.cost_usd / llm_only.max(1e-12))
        );
    }
}

/// Novelty, audit and guard lines of a run summary.
pub fn print_trust(summary: &RunSummary) {
    if summary.escalated_novel + summary.escalated_guard > 0 {
        eprintln!(
            "escalated instead of kept: {} novel (far from every exemplar of their label), {} by a guard",
            summary.escalated_novel, summary.escalated_guard
        );
    }
    if let Some(a) = &summary.audit {
        let pct = |i: &semtel::calibrate::Interval| {
            format!(
                "{:.1}% [{:.1}–{:.1}]",
                100.0 * i.value,
                100.0 * i.lo,
                100.0 * i.hi
            )
        };
        eprintln!(
            "audit: {} kept rows asked blind ({} answered): agreement {}; estimated kept-accuracy {} (LLM accuracy {})",
            a.audited,
            a.answered,
            pct(&a.agreement),
            pct(&a.estimated_kept_accuracy),
            a.llm_accuracy_source
        );
        let mut worst: Vec<(&String, &semtel::guard::AuditSegment)> = a
            .by_label
            .iter()
            .chain(a.by_language.iter())
            .filter(|(_, s)| s.answered >= 20)
            .collect();
        worst.sort_by(|x, y| x.1.agreement.value.total_cmp(&y.1.agreement.value));
        for (name, s) in worst.iter().take(3) {
            eprintln!(
                "  lowest: {name}: {} ({} audited)",
                pct(&s.agreement),
                s.answered
            );
        }
    }
    if let Some(g) = &summary.guards {
        if !g.tripped.is_empty() || g.trips > 0 {
            eprintln!(
                "guards: {} tripped now ({}); {} trips, {} releases in all (required agreement {:.3})",
                g.tripped.len(),
                g.tripped.join(", "),
                g.trips,
                g.releases,
                g.required_agreement
            );
        }
        if !g.probation.is_empty() {
            eprintln!(
                "languages on probation (not in the exemplars; their rows kNN would keep go to the LLM until a threshold is learned): {}",
                g.probation.join(", ")
            );
        }
        if !g.learned_language_thresholds.is_empty() {
            let t: Vec<String> = g
                .learned_language_thresholds
                .iter()
                .map(|(l, t)| {
                    if *t < semtel::guard::KEEP_NONE {
                        format!("{l} {t:.3}")
                    } else {
                        format!("{l} (none kept)")
                    }
                })
                .collect();
            eprintln!("learned language thresholds: {}", t.join(", "));
        }
    }
}
