//! Calibration: choosing the confidence thresholds that turn kNN decisions into keep-or-escalate
//! from labelled data instead of by guesswork.
//!
//! The built-in method needs no extra data: leave-one-out over the exemplars (each exemplar is
//! classified by its k nearest *other* exemplars), then the threshold is the lowest one whose
//! kept-accuracy reaches the target. It runs at `index build` / `index add` time.
//! This module must never embed text; it works on the index's stored vectors.

use crate::decide::{vote, Signal};
use crate::eval::{coverage_at, Scored};
use crate::index::ExemplarIndex;
use crate::Result;

/// Default kept-accuracy target for automatic calibration.
pub const DEFAULT_TARGET: f64 = 0.95;

/// Leave-one-out kNN predictions over the exemplars.
pub fn leave_one_out(index: &ExemplarIndex, k: usize, signal: Signal) -> Result<Vec<Scored>> {
    let vectors = index.vectors()?;
    let hits = index.search_batch(&vectors, k + 1)?;
    let label_of = index.label_indices();
    let mut scratch = vec![0f32; index.labels().len()];
    Ok(hits
        .into_iter()
        .enumerate()
        .map(|(key, nb)| {
            let others: Vec<(u64, f32)> = nb
                .into_iter()
                .filter(|&(kk, _)| kk != key as u64)
                .take(k)
                .collect();
            let v = vote(&others, label_of, &mut scratch);
            Scored {
                pred: v.label,
                gold: Some(label_of[key]),
                confidence: v.signal(signal),
            }
        })
        .collect())
}

/// Sets the index's global threshold from leave-one-out at `target` kept-accuracy and records
/// how it was chosen in the manifest.
pub fn auto_calibrate(index: &mut ExemplarIndex, target: f64) -> Result<()> {
    let d = &index.manifest.decision;
    let signal: Signal = d.signal.parse().unwrap_or_default();
    let k = d.k;
    if index.len() < 2 {
        return Ok(());
    }
    let scored = leave_one_out(index, k, signal)?;
    let t = coverage_at(&scored, target);
    // With no threshold reaching the target, escalate everything rather than guess.
    let threshold = t.threshold.unwrap_or(f32::INFINITY);
    let d = &mut index.manifest.decision;
    d.threshold = if threshold.is_finite() {
        threshold
    } else {
        1e9
    };
    d.calibration = Some(serde_json::json!({
        "method": "leave-one-out over exemplars",
        "signal": signal.name(),
        "k": k,
        "target_kept_accuracy": target,
        "expected_coverage": t.coverage,
        "rows": scored.len(),
    }));
    Ok(())
}
