//! `semtel calibrate`: resolve the flags into a [`CalibrateJob`], run it, print the choice.

use crate::args::CalibrateArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::app::calibrate::{CalibrateJob, Calibrated};
use semtel::calibrate::CalibrateOptions;
use semtel::decide::Signal;

pub fn run(ctx: &Ctx, a: CalibrateArgs) -> Result<()> {
    let mut options = CalibrateOptions {
        target: Some(a.target),
        budget: a.budget,
        signal: a.signal,
        folds: a.folds,
        train_head: !a.no_head,
        per_label: !a.no_per_label,
        novelty_rate: a.novelty_rate,
        ..Default::default()
    };
    if let Some(r) = a.novelty_rate {
        anyhow::ensure!(
            (0.0..=1.0).contains(&r),
            "--novelty-rate is a share between 0 and 1, not {r}"
        );
    }
    if let Some(e) = a.head_epochs {
        options.head.epochs = e;
    }
    if let Some(l) = a.head_l2 {
        options.head.l2 = l;
    }
    if let Some(l) = a.head_lr {
        options.head.lr = l;
    }
    let job = CalibrateJob {
        index: a.index.clone(),
        classifier: ctx.classifier_options(None, None, Some(Signal::VoteSim))?,
        labelled: a.labelled.clone().map(|p| (p, ctx.input_options(&a.cols))),
        options,
    };
    let outcome = semtel::app::calibrate::run(&job)?;
    if a.json {
        let mut v = serde_json::to_value(&outcome.report)?;
        if let Some(n) = &outcome.novelty {
            v["novelty"] = serde_json::to_value(n)?;
        }
        println!("{v}");
    }
    print_outcome(&a.index, a.target, &outcome);
    if let Some(n) = &outcome.novelty {
        print_novelty(n);
    }
    Ok(())
}

/// What the novelty rule is and how it separated labels the index never saw.
pub fn print_novelty(n: &semtel::novelty::NoveltyConfig) {
    eprintln!(
        "novelty: rows farther from their label's exemplars than {:.1}% of them are escalated as `novel` (--novelty-rate {})",
        100.0 * (1.0 - n.rate),
        n.rate
    );
    if let Some(c) = &n.check {
        eprintln!(
            "  leave-labels-out ({} folds, {:.0}% of labels hidden each): AUROC {:.3}; flagged at this rate: {:.1}% of seen-label rows, {:.1}% of hidden-label rows",
            c.folds,
            100.0 * c.hidden_share,
            c.auroc,
            100.0 * c.seen_flagged,
            100.0 * c.hidden_flagged
        );
        let rates: Vec<String> = c
            .by_rate
            .iter()
            .map(|(r, s, h)| format!("{r}: {:.1}%/{:.1}%", 100.0 * s, 100.0 * h))
            .collect();
        eprintln!("  other rates (seen/hidden flagged): {}", rates.join("  "));
    }
}

/// The terminal summary of a calibration (also printed by `semtel tune`).
pub fn print_outcome(
    index: &std::path::Path,
    target: f64,
    outcome: &semtel::app::calibrate::CalibrateOutcome,
) {
    let report = match &outcome.report {
        Calibrated::Single(r) => r,
        Calibrated::Multi(r) => {
            eprintln!(
                "calibrated {} (multi-label, one-vs-rest head) on {} rows by {} ({:.1}s)",
                index.display(),
                r.rows,
                r.method,
                outcome.seconds
            );
            let m = |x: &semtel::multilabel::SetMetrics| {
                format!(
                    "micro-F1 {:.4}  macro-F1 {:.4}  exact-set {:.4}",
                    x.micro_f1, x.macro_f1, x.subset_accuracy
                )
            };
            eprintln!("kNN vote   {}", m(&r.vote));
            eprintln!("head       {}", m(&r.head));
            for v in &r.head_variants {
                eprintln!(
                    "  head {} word pieces: micro-F1 {:.4}",
                    if v.word_pieces { "with   " } else { "without" },
                    v.micro_f1
                );
            }
            eprintln!(
                "at {:.0}% per-verdict precision: {}",
                100.0 * r.target_precision,
                semtel::multilabel::describe_kept(&r.kept)
            );
            if !r.labels_default_cut.is_empty() {
                eprintln!(
                    "too few rows to tune a cut of their own (pooled cut): {}",
                    r.labels_default_cut.join(", ")
                );
            }
            if !r.labels_never_kept.is_empty() {
                eprintln!(
                    "never sure enough to keep as present (always escalated when predicted): {}",
                    r.labels_never_kept.join(", ")
                );
            }
            return;
        }
    };
    eprintln!(
        "calibrated {} on {} rows by {} ({:.1}s)",
        index.display(),
        report.rows,
        report.method,
        outcome.seconds
    );
    eprintln!(
        "signal      AURC    accuracy  kept at {:.0}% (one threshold)",
        target * 100.0
    );
    for s in &report.signals {
        eprintln!(
            "{:<11} {:.4}  {:.4}    {:.1}%",
            s.signal,
            s.aurc,
            s.accuracy,
            s.coverage_at_target * 100.0
        );
    }
    let ci = |i: &semtel::calibrate::Interval| {
        format!(
            "{:.1}% [{:.1}–{:.1}]",
            i.value * 100.0,
            i.lo * 100.0,
            i.hi * 100.0
        )
    };
    eprintln!(
        "chosen: {}; {} thresholds ({} labels stricter, {} looser than the global {:.3}); expected coverage {}, kept-accuracy {} (95% CI)",
        report.signal,
        if report.per_label { "per-label" } else { "one global" },
        report.stricter_labels,
        report.looser_labels,
        outcome.threshold,
        ci(&report.expected_coverage),
        ci(&report.expected_kept_accuracy)
    );
}
