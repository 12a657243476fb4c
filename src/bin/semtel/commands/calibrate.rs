//! `semtel calibrate`: resolve the flags into a [`CalibrateJob`], run it, print the choice.

use crate::args::CalibrateArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::app::calibrate::CalibrateJob;
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
        ..Default::default()
    };
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
    let report = &outcome.report;
    if a.json {
        println!("{}", serde_json::to_string(report)?);
    }
    eprintln!(
        "calibrated {} on {} rows by {} ({:.1}s)",
        a.index.display(),
        report.rows,
        report.method,
        outcome.seconds
    );
    eprintln!(
        "signal      AURC    accuracy  kept at {:.0}% (one threshold)",
        a.target * 100.0
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
    Ok(())
}
