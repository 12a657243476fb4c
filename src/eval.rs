//! Evaluation on a labelled split: accuracy, macro-F1, and how much kNN can keep at a given
//! kept-accuracy (the coverage/accuracy trade-off that decides the LLM bill).
//! Pure arithmetic over (prediction, gold, confidence); it must never embed or read files.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct CoveragePoint {
    pub threshold: f32,
    /// Share of rows whose confidence ≥ threshold (kept by kNN).
    pub coverage: f64,
    /// Accuracy on the kept rows (null when none is kept).
    pub kept_accuracy: Option<f64>,
    pub kept: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetPoint {
    /// Wanted accuracy on the kept rows.
    pub target: f64,
    /// Largest share that can be kept at that accuracy (on this split).
    pub coverage: f64,
    /// The confidence threshold that achieves it (rows ≥ threshold kept).
    pub threshold: Option<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub rows: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub signal: String,
    pub coverage: Vec<CoveragePoint>,
    pub at_target: Vec<TargetPoint>,
    /// Rows that could not be classified (counted as wrong above).
    pub errors: usize,
    /// Gold labels absent from the index (their rows can never be right).
    pub unseen_gold_labels: Vec<String>,
    /// Area under the risk–coverage curve (lower is better).
    pub aurc: f64,
    /// What the index's own (calibrated) thresholds keep: share of rows and their accuracy.
    pub at_index_thresholds: Option<CoveragePoint>,
}

/// One evaluated row: predicted label index (None: error), gold label index (None: unseen),
/// confidence.
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    pub pred: Option<u32>,
    pub gold: Option<u32>,
    pub confidence: f32,
}

impl Scored {
    pub fn correct(&self) -> bool {
        self.pred.is_some() && self.pred == self.gold
    }
}

pub fn macro_f1(rows: &[Scored], n_labels: usize) -> f64 {
    let mut tp = vec![0usize; n_labels];
    let mut fp = vec![0usize; n_labels];
    let mut fnn = vec![0usize; n_labels];
    for r in rows {
        match (r.pred, r.gold) {
            (Some(p), Some(g)) if p == g => tp[p as usize] += 1,
            (p, g) => {
                if let Some(p) = p {
                    fp[p as usize] += 1;
                }
                if let Some(g) = g {
                    fnn[g as usize] += 1;
                }
            }
        }
    }
    // Average over labels that occur in gold or predictions (sklearn's convention).
    let mut sum = 0.0;
    let mut n = 0;
    for l in 0..n_labels {
        if tp[l] + fp[l] + fnn[l] == 0 {
            continue;
        }
        let f1 = 2.0 * tp[l] as f64 / (2 * tp[l] + fp[l] + fnn[l]) as f64;
        sum += f1;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Rows sorted by confidence, most confident first (errors last).
fn sorted(rows: &[Scored]) -> Vec<Scored> {
    let mut v = rows.to_vec();
    v.sort_by(|a, b| {
        b.confidence
            .partial_cmp(&a.confidence)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v
}

/// Largest coverage whose kept accuracy reaches `target`, cutting only between distinct
/// confidence values (a threshold cannot split ties).
pub fn coverage_at(rows: &[Scored], target: f64) -> TargetPoint {
    let v = sorted(rows);
    let n = v.len();
    let mut correct = 0usize;
    let mut best = (0usize, None);
    for i in 0..n {
        if v[i].correct() {
            correct += 1;
        }
        let boundary = i + 1 == n || v[i + 1].confidence < v[i].confidence;
        if boundary && v[i].pred.is_some() && correct as f64 >= target * (i + 1) as f64 {
            best = (i + 1, Some(v[i].confidence));
        }
    }
    TargetPoint {
        target,
        coverage: if n == 0 {
            0.0
        } else {
            best.0 as f64 / n as f64
        },
        threshold: best.1,
    }
}

/// Area under the risk–coverage curve: mean over k of the error rate of the k most confident.
pub fn aurc(rows: &[Scored]) -> f64 {
    let v = sorted(rows);
    let mut wrong = 0usize;
    let mut sum = 0.0;
    for (i, r) in v.iter().enumerate() {
        if !r.correct() {
            wrong += 1;
        }
        sum += wrong as f64 / (i + 1) as f64;
    }
    if v.is_empty() {
        0.0
    } else {
        sum / v.len() as f64
    }
}

pub fn coverage_table(rows: &[Scored], thresholds: &[f32]) -> Vec<CoveragePoint> {
    let n = rows.len().max(1);
    thresholds
        .iter()
        .map(|&t| {
            let kept: Vec<&Scored> = rows
                .iter()
                .filter(|r| r.pred.is_some() && r.confidence >= t)
                .collect();
            let ok = kept.iter().filter(|r| r.correct()).count();
            CoveragePoint {
                threshold: t,
                coverage: kept.len() as f64 / n as f64,
                kept_accuracy: (!kept.is_empty()).then(|| ok as f64 / kept.len() as f64),
                kept: kept.len(),
            }
        })
        .collect()
}

pub fn report(
    rows: &[Scored],
    n_labels: usize,
    signal: &str,
    unseen_gold_labels: Vec<String>,
) -> EvalReport {
    let n = rows.len();
    let correct = rows.iter().filter(|r| r.correct()).count();
    let thresholds: Vec<f32> = (0..=20).map(|i| i as f32 * 0.05).collect();
    EvalReport {
        rows: n,
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        macro_f1: macro_f1(rows, n_labels),
        signal: signal.to_string(),
        coverage: coverage_table(rows, &thresholds),
        at_target: [0.90, 0.95, 0.97, 0.98, 0.99]
            .iter()
            .map(|&t| coverage_at(rows, t))
            .collect(),
        errors: rows.iter().filter(|r| r.pred.is_none()).count(),
        unseen_gold_labels,
        aurc: aurc(rows),
        at_index_thresholds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pred: u32, gold: u32, c: f32) -> Scored {
        Scored {
            pred: Some(pred),
            gold: Some(gold),
            confidence: c,
        }
    }

    #[test]
    fn coverage_cuts_at_distinct_confidences() {
        let rows = [s(0, 0, 0.9), s(1, 1, 0.8), s(0, 1, 0.7), s(1, 1, 0.6)];
        let t = coverage_at(&rows, 1.0);
        assert_eq!(t.coverage, 0.5);
        assert_eq!(t.threshold, Some(0.8));
        let t = coverage_at(&rows, 0.75);
        assert_eq!(t.coverage, 1.0);
        // a tie that mixes right and wrong cannot be split
        let rows = [s(0, 0, 0.9), s(0, 1, 0.9)];
        assert_eq!(coverage_at(&rows, 1.0).coverage, 0.0);
    }

    #[test]
    fn macro_f1_matches_hand_computation() {
        // label0: tp1 fp1 fn0 → f1 = 2/3; label1: tp1 fp0 fn1 → 2/3
        let rows = [s(0, 0, 1.0), s(0, 1, 1.0), s(1, 1, 1.0)];
        assert!((macro_f1(&rows, 2) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn aurc_is_zero_when_all_right() {
        let rows = [s(0, 0, 0.9), s(1, 1, 0.8)];
        assert_eq!(aurc(&rows), 0.0);
    }
}
