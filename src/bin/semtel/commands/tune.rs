//! `semtel tune`: resolve the flags into a [`TuneJob`], run it with a step bar, print what it
//! chose and the new calibration.

use crate::args::TuneArgs;
use crate::options::Ctx;
use anyhow::{bail, Result};
use semtel::app::tune::TuneJob;
use semtel::calibrate::CalibrateOptions;
use semtel::tune::TuneOptions;
use std::time::Duration;

/// `90s`, `20m`, `1h`, `1.5h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("`{s}` is not a duration (use 90s, 20m or 1h)"))?;
    let secs = match unit {
        "s" | "sec" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => bail!("`{s}`: unknown unit `{unit}` (s, m or h)"),
    };
    if !(secs.is_finite() && secs > 0.0) {
        bail!("`{s}`: the time budget must be positive");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `semtel tune --index DIR` with every default (what `index build --tune` runs).
pub fn defaults(index: std::path::PathBuf) -> TuneArgs {
    TuneArgs {
        index,
        time_budget: None,
        loss: "supcon".into(),
        epochs: None,
        lr: None,
        lrs: TuneOptions::default().lrs,
        max_epochs: TuneOptions::default().max_epochs,
        batch_rows: TuneOptions::default().batch_rows,
        labelled: None,
        cols: Default::default(),
        target: 0.97,
        checkpoint_every: 60.0,
        json: false,
    }
}

pub fn run(ctx: &Ctx, a: TuneArgs) -> Result<()> {
    let mut options = TuneOptions {
        loss: a.loss.parse().map_err(anyhow::Error::msg)?,
        lrs: a.lrs.clone(),
        max_epochs: a.max_epochs.max(1),
        batch_rows: a.batch_rows.max(8),
        checkpoint_every: Duration::from_secs_f64(a.checkpoint_every.max(0.0)),
        ..Default::default()
    };
    if let (Some(e), Some(lr)) = (a.epochs, a.lr) {
        options.fixed = Some((e.max(1), lr));
    }
    if let Some(b) = &a.time_budget {
        options.time_budget = Some(parse_duration(b)?);
    }
    let job = TuneJob {
        index: a.index.clone(),
        encoder: ctx.encoder_options(),
        options,
        labelled: a.labelled.clone().map(|p| (p, ctx.input_options(&a.cols))),
        calibrate: CalibrateOptions {
            target: Some(a.target),
            ..Default::default()
        },
    };
    let bar = semtel::progress::Progress::steps("tune", ctx.global.quiet);
    let outcome = semtel::app::tune::run(&job, &mut |e| {
        bar.set_step(
            &e.phase,
            e.step as u64,
            e.total as u64,
            format!("loss {:.4}", e.loss),
        )
    })?;
    bar.finish();
    if a.json {
        println!("{}", serde_json::to_string(&outcome)?);
    }
    let r = &outcome.report;
    let outcome_multi = semtel::index::ExemplarIndex::read_manifest(&a.index)
        .map(|m| m.build.multi_label)
        .unwrap_or(false);
    eprintln!(
        "{} texts in {} labels, loss {:?}",
        r.texts, r.labels, r.loss
    );
    if let Some(f) = r.frozen_accuracy {
        eprintln!(
            "held-out accuracy ({}), frozen encoder: {:.2}%",
            if outcome_multi { "kNN vote" } else { "head" },
            f * 100.0
        );
    }
    for c in &r.candidates {
        let accs: Vec<String> = c
            .accuracy_by_epoch
            .iter()
            .enumerate()
            .map(|(i, x)| format!("epoch {}: {:.2}%", i + 1, x * 100.0))
            .collect();
        eprintln!(
            "  lr {:.0e}  {}  ({:.0}s)",
            c.lr,
            accs.join("  "),
            c.seconds
        );
    }
    if r.resumed_steps > 0 {
        eprintln!(
            "resumed the final run at step {} from its checkpoint",
            r.resumed_steps
        );
    }
    match (&r.chosen, &outcome.encoder_dir) {
        (Some((epochs, lr)), Some(dir)) => {
            eprintln!(
                "tuned: {epochs} epoch(s) at lr {lr:.0e}, {} steps, final loss {:.4}; model in {} (sha256 {}…); tuning {:.0}s, re-embedding {:.1}s, total {:.0}s",
                r.final_steps,
                r.final_loss.unwrap_or(f64::NAN),
                dir.display(),
                outcome.weights_sha256.as_deref().map(|s| &s[..12]).unwrap_or(""),
                r.seconds,
                outcome.reembed_seconds,
                outcome.seconds
            );
            if let Some(c) = &outcome.calibration {
                super::calibrate::print_outcome(&a.index, a.target, c);
            }
        }
        _ => eprintln!(
            "kept the frozen encoder: {}",
            r.kept_frozen.as_deref().unwrap_or("tuning did not finish")
        ),
    }
    Ok(())
}
