//! Multi-label decisions: a one-vs-rest head's per-label probabilities become a label set and,
//! for every label, a keep-or-escalate verdict, so a row can be kept for the labels it is sure
//! of and escalated for the rest. Thresholds per label are chosen on out-of-fold (or held-out)
//! probabilities; the metrics (micro/macro-F1, exact-set accuracy, kept share) live here too.
//!
//! Pure arithmetic over given probabilities and label sets: this module must never embed,
//! search or read rows (the calibrate job feeds it).

use serde::{Deserialize, Serialize};

/// How one label is decided from its probability `p`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelRule {
    /// The label is in the set when `p >= cut` (chosen for the label's F1).
    pub cut: f32,
    /// An "in" verdict is kept when `p >= keep_in` (precision of such verdicts ≥ target);
    /// above 1 when no "in" verdict of this label is ever sure enough.
    pub keep_in: f32,
    /// An "out" verdict is kept when `p <= keep_out` (share of such verdicts that are right
    /// ≥ target); below 0 when none is.
    pub keep_out: f32,
}

impl Default for LabelRule {
    /// Undecided: in at 0.5, every verdict escalated.
    fn default() -> Self {
        LabelRule {
            cut: 0.5,
            keep_in: 2.0,
            keep_out: -1.0,
        }
    }
}

/// One row's multi-label decision (labels are indices into the index's label list).
#[derive(Debug, Clone, PartialEq)]
pub struct MultiDecision {
    /// The label set (never empty when there is at least one label: a labelled row of a
    /// multi-label index always has one, so the most probable label stands in).
    pub labels: Vec<u32>,
    /// Labels whose in/out verdict is not sure enough to keep (for the LLM or a person).
    pub uncertain: Vec<u32>,
    /// The least sure verdict: min over labels of p (in) or 1 − p (out).
    pub confidence: f32,
}

/// Decides one row from its per-label probabilities. NaN probabilities are uncertain.
pub fn decide(p: &[f32], rules: &[LabelRule]) -> MultiDecision {
    let rule = |l: usize| rules.get(l).copied().unwrap_or_default();
    let mut labels: Vec<u32> = (0..p.len())
        .filter(|&l| p[l] >= rule(l).cut)
        .map(|l| l as u32)
        .collect();
    if labels.is_empty() {
        let best = (0..p.len())
            .filter(|&l| !p[l].is_nan())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]));
        labels.extend(best.map(|l| l as u32));
    }
    let mut uncertain = Vec::new();
    let mut confidence = 1f32;
    for (l, &pl) in p.iter().enumerate() {
        let r = rule(l);
        let is_in = labels.contains(&(l as u32));
        let sure = if is_in {
            pl >= r.keep_in
        } else {
            pl <= r.keep_out
        };
        if !sure || pl.is_nan() {
            uncertain.push(l as u32);
        }
        let c = if is_in { pl } else { 1.0 - pl };
        confidence = confidence.min(if c.is_nan() { 0.0 } else { c });
    }
    MultiDecision {
        labels,
        uncertain,
        confidence,
    }
}

/// Labels with fewer gold rows than this take the pooled cut rather than one of their own.
pub const MIN_POSITIVES: usize = 5;

/// A label the index does not know, in a gold set: it can never be predicted, so it keeps the
/// set from matching exactly and counts towards no label's F1.
pub const UNKNOWN: u32 = u32::MAX;

/// Label names as sorted indices into `known` (sorted), unknown ones as [`UNKNOWN`].
pub fn indices_of(known: &[String], names: &[String]) -> Vec<u32> {
    let mut v: Vec<u32> = names
        .iter()
        .map(|x| known.binary_search(x).map_or(UNKNOWN, |i| i as u32))
        .collect();
    v.sort_unstable();
    v
}

/// Chooses every label's rule from probabilities `probs[row][label]` and gold label sets, for
/// kept verdicts right at least `target` of the time. A label with fewer than `MIN_POSITIVES`
/// gold rows takes the cut that is best for all labels pooled (an F1 optimum over two rows is
/// noise).
pub fn fit_rules(
    probs: &[Vec<f32>],
    gold: &[Vec<u32>],
    n_labels: usize,
    target: f64,
) -> Vec<LabelRule> {
    let pooled: Vec<(f32, bool)> = probs
        .iter()
        .zip(gold)
        .flat_map(|(p, g)| {
            p.iter()
                .enumerate()
                .filter(|x| !x.1.is_nan())
                .map(move |(l, &x)| (x, g.contains(&(l as u32))))
        })
        .collect();
    let global = best_f1_cut(&pooled, pooled.iter().filter(|x| x.1).count());
    (0..n_labels)
        .map(|l| {
            let ys: Vec<(f32, bool)> = probs
                .iter()
                .zip(gold)
                .filter_map(|(p, g)| {
                    let x = *p.get(l)?;
                    (!x.is_nan()).then(|| (x, g.contains(&(l as u32))))
                })
                .collect();
            let pos = ys.iter().filter(|x| x.1).count();
            let cut = if pos >= MIN_POSITIVES {
                best_f1_cut(&ys, pos)
            } else {
                global
            };
            // "In" verdicts: the lowest probability at which those at or above it are right
            // `target` of the time (scanning from the most probable down).
            let mut ins: Vec<(f32, bool)> = ys.iter().copied().filter(|x| x.0 >= cut).collect();
            ins.sort_by(|a, b| b.0.total_cmp(&a.0));
            let keep_in = sure_prefix(&ins, target, |x| x.1).map_or(2.0, |p| p.max(cut));
            // "Out" verdicts, from the least probable up.
            let mut outs: Vec<(f32, bool)> = ys.iter().copied().filter(|x| x.0 < cut).collect();
            outs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let keep_out = sure_prefix(&outs, target, |x| !x.1).unwrap_or(-1.0);
            LabelRule {
                cut,
                keep_in,
                keep_out,
            }
        })
        .collect()
}

/// The probability at the end of the longest prefix of `sorted` (cut only between distinct
/// probabilities) whose verdicts are right at least `target` of the time.
fn sure_prefix(
    sorted: &[(f32, bool)],
    target: f64,
    right: impl Fn(&(f32, bool)) -> bool,
) -> Option<f32> {
    let mut ok = 0usize;
    let mut best = None;
    for (i, x) in sorted.iter().enumerate() {
        ok += usize::from(right(x));
        let boundary = sorted.get(i + 1).is_none_or(|n| n.0 != x.0);
        if boundary && ok as f64 >= target * (i + 1) as f64 {
            best = Some(x.0);
        }
    }
    best
}

/// The cut on a grid of 0.05 … 0.95 with the best F1 (ties go to the cut nearest 0.5).
fn best_f1_cut(ys: &[(f32, bool)], pos: usize) -> f32 {
    let mut best = (f64::NEG_INFINITY, 0.5f32);
    for step in 1..20 {
        let c = step as f32 * 0.05;
        let (mut tp, mut fp) = (0usize, 0usize);
        for &(p, y) in ys {
            if p >= c {
                if y {
                    tp += 1
                } else {
                    fp += 1
                }
            }
        }
        let f1 = 2.0 * tp as f64 / (tp + fp + pos).max(1) as f64;
        let nearer = (c - 0.5).abs() < (best.1 - 0.5).abs();
        if f1 > best.0 + 1e-12 || ((f1 - best.0).abs() <= 1e-12 && nearer) {
            best = (f1, c);
        }
    }
    best.1
}

/// Set-prediction quality against gold sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SetMetrics {
    pub rows: usize,
    pub micro_f1: f64,
    pub macro_f1: f64,
    /// Share of rows whose predicted set is exactly the gold set.
    pub subset_accuracy: f64,
}

/// Micro-F1, macro-F1 (over labels that occur in gold or prediction) and exact-set accuracy.
pub fn set_metrics(pred: &[Vec<u32>], gold: &[Vec<u32>], n_labels: usize) -> SetMetrics {
    let (mut tp, mut fp, mut fn_) = (
        vec![0usize; n_labels],
        vec![0usize; n_labels],
        vec![0usize; n_labels],
    );
    let mut exact = 0;
    for (p, g) in pred.iter().zip(gold) {
        for &l in p {
            if let Some(x) = tp.get_mut(l as usize) {
                if g.contains(&l) {
                    *x += 1
                } else {
                    fp[l as usize] += 1
                }
            }
        }
        for &l in g {
            if !p.contains(&l) && (l as usize) < n_labels {
                fn_[l as usize] += 1;
            }
        }
        let (mut a, mut b) = (p.clone(), g.clone());
        a.sort_unstable();
        b.sort_unstable();
        exact += usize::from(a == b);
    }
    let (stp, sfp, sfn): (usize, usize, usize) =
        (tp.iter().sum(), fp.iter().sum(), fn_.iter().sum());
    let per: Vec<f64> = (0..n_labels)
        .filter(|&l| tp[l] + fp[l] + fn_[l] > 0)
        .map(|l| 2.0 * tp[l] as f64 / (2 * tp[l] + fp[l] + fn_[l]) as f64)
        .collect();
    let n = pred.len().min(gold.len());
    SetMetrics {
        rows: n,
        micro_f1: 2.0 * stp as f64 / (2 * stp + sfp + sfn).max(1) as f64,
        macro_f1: per.iter().sum::<f64>() / per.len().max(1) as f64,
        subset_accuracy: exact as f64 / n.max(1) as f64,
    }
}

/// How much of the per-label verdicts the rules keep, and how right the kept ones are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeptVerdicts {
    /// Share of all (row, label) verdicts kept.
    pub verdicts_kept: f64,
    /// Share of kept verdicts that are right.
    pub verdicts_kept_right: f64,
    /// Share of the asserted labels ("in" verdicts) kept, and their precision.
    pub labels_kept: f64,
    pub labels_kept_precision: f64,
    /// Share of rows with no uncertain label, and how often their whole set is right.
    pub rows_fully_kept: f64,
    pub rows_fully_kept_exact: f64,
}

/// Tallies `decisions` against gold sets.
pub fn kept_verdicts(
    decisions: &[MultiDecision],
    gold: &[Vec<u32>],
    n_labels: usize,
) -> KeptVerdicts {
    let (mut verdicts, mut kept, mut kept_right) = (0usize, 0usize, 0usize);
    let (mut asserted, mut asserted_kept, mut asserted_kept_right) = (0usize, 0usize, 0usize);
    let (mut full, mut full_exact) = (0usize, 0usize);
    for (d, g) in decisions.iter().zip(gold) {
        for l in 0..n_labels as u32 {
            let is_in = d.labels.contains(&l);
            let right = is_in == g.contains(&l);
            let sure = !d.uncertain.contains(&l);
            verdicts += 1;
            kept += usize::from(sure);
            kept_right += usize::from(sure && right);
            if is_in {
                asserted += 1;
                asserted_kept += usize::from(sure);
                asserted_kept_right += usize::from(sure && right);
            }
        }
        if d.uncertain.is_empty() {
            full += 1;
            let (mut a, mut b) = (d.labels.clone(), g.clone());
            a.sort_unstable();
            b.sort_unstable();
            full_exact += usize::from(a == b);
        }
    }
    let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    KeptVerdicts {
        verdicts_kept: div(kept, verdicts),
        verdicts_kept_right: div(kept_right, kept),
        labels_kept: div(asserted_kept, asserted),
        labels_kept_precision: div(asserted_kept_right, asserted_kept),
        rows_fully_kept: div(full, decisions.len()),
        rows_fully_kept_exact: div(full_exact, full),
    }
}

/// One line for people: what the per-label rules kept and how right it was.
pub fn describe_kept(k: &KeptVerdicts) -> String {
    format!(
        "per-label verdicts kept {:.1}% ({:.1}% right); asserted labels kept {:.1}% at {:.1}% precision; rows with no uncertain label {:.1}% ({:.1}% exactly right)",
        100.0 * k.verdicts_kept,
        100.0 * k.verdicts_kept_right,
        100.0 * k.labels_kept,
        100.0 * k.labels_kept_precision,
        100.0 * k.rows_fully_kept,
        100.0 * k.rows_fully_kept_exact
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_sure_labels_and_escalates_the_rest() {
        let rules = vec![
            LabelRule {
                cut: 0.5,
                keep_in: 0.9,
                keep_out: 0.1,
            },
            LabelRule {
                cut: 0.5,
                keep_in: 0.9,
                keep_out: 0.1,
            },
            LabelRule {
                cut: 0.3,
                keep_in: 0.8,
                keep_out: 0.05,
            },
        ];
        let d = decide(&[0.95, 0.4, 0.02], &rules);
        assert_eq!(d.labels, vec![0]);
        assert_eq!(
            d.uncertain,
            vec![1],
            "label 1 at 0.4 is neither surely in nor out"
        );
        let d = decide(&[0.1, 0.05, 0.2], &rules);
        assert_eq!(
            d.labels,
            vec![2],
            "the most probable label stands in for an empty set"
        );
        assert_eq!(
            d.uncertain,
            vec![2],
            "a stand-in below its keep-in is not sure"
        );
    }

    #[test]
    fn rules_meet_the_target_on_the_rows_they_were_fit_on() {
        // Label 0: p separates well above 0.7 and below 0.2, mixed between.
        let mut probs = Vec::new();
        let mut gold = Vec::new();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..2000 {
            let p = rng.f32();
            let y = if p > 0.7 {
                rng.f32() < 0.99
            } else if p < 0.2 {
                rng.f32() < 0.01
            } else {
                rng.bool()
            };
            probs.push(vec![p]);
            gold.push(if y { vec![0] } else { vec![] });
        }
        let r = fit_rules(&probs, &gold, 1, 0.97)[0];
        assert!(r.keep_in >= r.cut && r.keep_out < r.cut, "{r:?}");
        assert!(r.keep_in > 0.5 && r.keep_out < 0.4, "{r:?}");
        let ds: Vec<MultiDecision> = probs.iter().map(|p| decide(p, &[r])).collect();
        let k = kept_verdicts(&ds, &gold, 1);
        assert!(k.verdicts_kept_right >= 0.97, "{k:?}");
        assert!(k.verdicts_kept > 0.3 && k.verdicts_kept < 0.95, "{k:?}");
    }

    #[test]
    fn metrics_of_a_known_prediction() {
        let m = set_metrics(&[vec![0, 1], vec![1]], &[vec![0], vec![1]], 2);
        // tp 2, fp 1, fn 0: micro 4/5; label 0 F1 1, label 1 F1 2/3.
        assert!((m.micro_f1 - 0.8).abs() < 1e-9);
        assert!((m.macro_f1 - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-9);
        assert!((m.subset_accuracy - 0.5).abs() < 1e-9);
    }

    proptest! {
        #[test]
        fn decide_never_panics_and_stays_in_range(
            p in proptest::collection::vec(prop_oneof![Just(f32::NAN), 0f32..=1.0, Just(f32::INFINITY)], 0..12),
            cut in 0f32..1.0,
        ) {
            let rules = vec![LabelRule { cut, keep_in: 0.9, keep_out: 0.1 }; 5];
            let d = decide(&p, &rules);
            prop_assert!(d.labels.iter().all(|&l| (l as usize) < p.len()));
            prop_assert!(d.uncertain.iter().all(|&l| (l as usize) < p.len()));
            prop_assert!(!d.confidence.is_nan());
        }
    }
}
