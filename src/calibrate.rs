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
use crate::index::{Calibration, DecisionSignal, LeaveOneOut};
use crate::{Error, Result};

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

/// Leave-one-out for a multi-label index: each row (group of exemplars sharing an id) is
/// predicted from the other rows; correct means the exact label set.
pub fn leave_one_out_multi(index: &ExemplarIndex, k: usize) -> Result<Vec<Scored>> {
    let vectors = index.vectors()?;
    let label_of = index.label_indices();
    let ex = index.exemplars();
    // One query per row: its first exemplar.
    let mut first: Vec<usize> = Vec::new();
    let mut gold: std::collections::HashMap<&str, Vec<u32>> = Default::default();
    for (i, e) in ex.iter().enumerate() {
        let g = gold.entry(e.id.as_str()).or_default();
        if g.is_empty() {
            first.push(i);
        }
        g.push(label_of[i]);
    }
    let d = index.manifest.model.dims;
    let mut q = Vec::with_capacity(first.len() * d);
    for &i in &first {
        q.extend_from_slice(&vectors[i * d..(i + 1) * d]);
    }
    let hits = index.search_batch(&q, (k + 1) * 4)?;
    let group_of = |key: u64| -> u64 {
        let id = &ex[key as usize].id;
        crate::hash::group_key(id)
    };
    Ok(first
        .iter()
        .zip(hits)
        .map(|(&i, nb)| {
            let me = &ex[i].id;
            let labeled: Vec<(u64, u32, f32)> = nb
                .into_iter()
                .filter(|&(kk, _)| &ex[kk as usize].id != me)
                .map(|(kk, s)| (group_of(kk), label_of[kk as usize], s))
                .collect();
            let v = crate::decide::multi_vote(&labeled, k);
            let mut g = gold[me.as_str()].clone();
            g.sort_unstable();
            let ok = v.labels == g;
            Scored {
                pred: Some(0),
                gold: Some(if ok { 0 } else { 1 }),
                confidence: v.confidence,
            }
        })
        .collect())
}

/// [`auto_calibrate`] for multi-label indexes (exact-set accuracy).
pub fn auto_calibrate_multi(index: &mut ExemplarIndex, target: f64) -> Result<()> {
    let k = index.manifest.decision.k;
    if index.len() < 2 {
        return Ok(());
    }
    let scored = leave_one_out_multi(index, k)?;
    let t = coverage_at(&scored, target);
    let d = &mut index.manifest.decision;
    d.threshold = t.threshold.unwrap_or(1e9);
    d.signal = DecisionSignal::MultiVote;
    d.calibration = Some(Calibration::LeaveOneOut(LeaveOneOut {
        method: LeaveOneOut::MULTI.into(),
        signal: None,
        k,
        target_kept_accuracy: target,
        expected_coverage: t.coverage,
        rows: scored.len(),
    }));
    Ok(())
}

/// Sets the index's global threshold from leave-one-out at `target` kept-accuracy and records
/// how it was chosen in the manifest.
pub fn auto_calibrate(index: &mut ExemplarIndex, target: f64) -> Result<()> {
    let d = &index.manifest.decision;
    let signal: Signal = d.signal.single().unwrap_or_default();
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
    d.calibration = Some(Calibration::LeaveOneOut(LeaveOneOut {
        method: LeaveOneOut::SINGLE.into(),
        signal: Some(signal.name().into()),
        k,
        target_kept_accuracy: target,
        expected_coverage: t.coverage,
        rows: scored.len(),
    }));
    Ok(())
}

use crate::decide::{vote_distribution, Pick, Scores, ALL_SIGNALS};
use crate::head::{Head, HeadOptions};
use crate::pipeline::Classifier;
use rayon::prelude::*;

/// What `semtel calibrate` optimises.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Wanted accuracy on the rows kNN keeps…
    pub target: Option<f64>,
    /// …or the share of rows that may be escalated.
    pub budget: Option<f64>,
    /// Confidence signal; `None`: the one with the lowest risk–coverage area.
    pub signal: Option<Signal>,
    pub folds: usize,
    pub train_head: bool,
    pub head: HeadOptions,
    pub per_label: bool,
    /// Pseudo-count pulling a label's calibration curve towards the global one.
    pub shrink: f64,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        CalibrateOptions {
            target: Some(0.97),
            budget: None,
            signal: None,
            folds: 5,
            train_head: true,
            head: HeadOptions::default(),
            per_label: true,
            shrink: 50.0,
        }
    }
}

pub use crate::index::{CalibrationReport, Interval, SignalReport};

/// Wilson score interval (95 %) for k successes in n trials.
pub fn wilson(k: usize, n: usize) -> Interval {
    if n == 0 {
        return Interval {
            value: 0.0,
            lo: 0.0,
            hi: 1.0,
        };
    }
    let (k, n) = (k as f64, n as f64);
    let z = 1.96f64;
    let p = k / n;
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / d;
    Interval {
        value: p,
        lo: (c - h).max(0.0),
        hi: (c + h).min(1.0),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Fits P(correct) = σ(a·c + b) by Newton's method with a small ridge (stable on separable
/// or tiny sets).
fn platt(xs: &[(f64, bool)]) -> (f64, f64) {
    let (mut a, mut b) = (1.0f64, 0.0f64);
    let ridge = 1e-3;
    for _ in 0..50 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (ridge * a, ridge * b, ridge, 0.0, ridge);
        for &(c, y) in xs {
            let p = sigmoid(a * c + b);
            let e = p - f64::from(u8::from(y));
            let w = (p * (1.0 - p)).max(1e-9);
            ga += e * c;
            gb += e;
            haa += w * c * c;
            hab += w * c;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-12 {
            break;
        }
        let da = (hbb * ga - hab * gb) / det;
        let db = (haa * gb - hab * ga) / det;
        a -= da.clamp(-10.0, 10.0);
        b -= db.clamp(-10.0, 10.0);
        if da.abs() + db.abs() < 1e-9 {
            break;
        }
    }
    (a, b)
}

/// Per-label calibration curves blended with the global one.
struct Curves {
    global: (f64, f64),
    per_label: Vec<Option<((f64, f64), f64)>>,
}

impl Curves {
    fn fit(items: &[(u32, f32, bool)], n_labels: usize, per_label: bool, shrink: f64) -> Curves {
        let all: Vec<(f64, bool)> = items.iter().map(|&(_, c, y)| (c as f64, y)).collect();
        let global = platt(&all);
        let mut by: Vec<Vec<(f64, bool)>> = vec![Vec::new(); n_labels];
        for &(l, c, y) in items {
            by[l as usize].push((c as f64, y));
        }
        let per_label = by
            .iter()
            .map(|v| {
                if !per_label || v.len() < 5 {
                    return None;
                }
                let (a, b) = platt(v);
                // A curve that does not rise with confidence says nothing about thresholds.
                (a > 0.0).then_some(((a, b), v.len() as f64 / (v.len() as f64 + shrink)))
            })
            .collect();
        Curves { global, per_label }
    }

    fn score(&self, label: u32, c: f32) -> f64 {
        let g = sigmoid(self.global.0 * c as f64 + self.global.1);
        match self.per_label.get(label as usize).copied().flatten() {
            Some(((a, b), w)) => w * sigmoid(a * c as f64 + b) + (1.0 - w) * g,
            None => g,
        }
    }

    /// Smallest raw confidence whose calibrated score reaches `t` (bisection; the blend is
    /// monotone when every slope is positive).
    fn raw_threshold(&self, label: u32, t: f64, lo: f32, hi: f32) -> f32 {
        if self.score(label, hi) < t {
            return 1e9; // never reaches the target: always escalate this label
        }
        if self.score(label, lo) >= t {
            return lo;
        }
        let (mut a, mut b) = (lo, hi);
        for _ in 0..60 {
            let m = 0.5 * (a + b);
            if self.score(label, m) >= t {
                b = m;
            } else {
                a = m;
            }
        }
        b
    }
}

/// Out-of-fold scores of every exemplar: leave-one-out kNN, K-fold head.
fn out_of_fold(
    c: &Classifier,
    vectors: &[f32],
    ids: &[Vec<u32>],
    opts: &CalibrateOptions,
) -> Result<Vec<Scores>> {
    let index = &c.index;
    let label_of = index.label_indices();
    let n_labels = index.labels().len();
    let d = index.manifest.model.dims;
    let hits = index.search_batch(vectors, c.k + 1)?;
    let neighbors: Vec<Vec<(u64, f32)>> = hits
        .into_iter()
        .enumerate()
        .map(|(key, nb)| {
            nb.into_iter()
                .filter(|&(kk, _)| kk != key as u64)
                .take(c.k)
                .collect()
        })
        .collect();
    let n = neighbors.len();
    let mut head_probs: Vec<Option<Vec<f32>>> = vec![None; n];
    if opts.train_head && opts.folds >= 2 {
        let mut order: Vec<usize> = (0..n).collect();
        fastrand::Rng::with_seed(opts.head.seed).shuffle(&mut order);
        let fold_of: Vec<usize> = {
            let mut f = vec![0; n];
            for (r, &i) in order.iter().enumerate() {
                f[i] = r % opts.folds;
            }
            f
        };
        let results: Vec<Result<FoldScores>> = (0..opts.folds)
            .into_par_iter()
            .map(|fold| {
                let train: Vec<usize> = (0..n).filter(|&i| fold_of[i] != fold).collect();
                let mut x = Vec::with_capacity(train.len() * d);
                for &i in &train {
                    x.extend_from_slice(&vectors[i * d..(i + 1) * d]);
                }
                let tid: Vec<&[u32]> = train.iter().map(|&i| ids[i].as_slice()).collect();
                let y: Vec<u32> = train.iter().map(|&i| label_of[i]).collect();
                let h = Head::train(&x, d, &tid, &y, n_labels, &opts.head)?;
                Ok((0..n)
                    .filter(|&i| fold_of[i] == fold)
                    .map(|i| (i, h.predict(&vectors[i * d..(i + 1) * d], &ids[i])))
                    .collect())
            })
            .collect();
        for r in results {
            for (i, p) in r? {
                head_probs[i] = Some(p);
            }
        }
    }
    let mut scratch = vec![0f32; n_labels];
    Ok((0..n)
        .map(|i| {
            let v = vote(&neighbors[i], label_of, &mut scratch);
            let (head, mix) = match &head_probs[i] {
                Some(p) => {
                    let labeled: Vec<(u32, f32)> = neighbors[i]
                        .iter()
                        .map(|&(k, s)| (label_of[k as usize], s))
                        .collect();
                    let dist = vote_distribution(&labeled, n_labels);
                    let m: Vec<f32> = p.iter().zip(&dist).map(|(a, b)| 0.5 * (a + b)).collect();
                    (Pick::of(p), Pick::of(&m))
                }
                None => (None, None),
            };
            Scores { vote: v, head, mix }
        })
        .collect())
}

/// Out-of-fold head probabilities: (row, probabilities) for one fold.
type FoldScores = Vec<(usize, Vec<f32>)>;
/// Scores a held-out labelled split with the final classifier: (scores, gold label).
pub type HeldOutScorer<'a> = dyn Fn(&Classifier) -> Result<Vec<(Scores, Option<u32>)>> + 'a;

/// Chooses the signal and thresholds, trains the head, and records everything in the index
/// (saved by the caller). `held_out`: scores and gold labels of a separate labelled split to
/// calibrate on (computed by the caller with the final head); otherwise cross-validation.
pub fn calibrate(
    c: &mut Classifier,
    held_out: Option<&HeldOutScorer<'_>>,
    opts: &CalibrateOptions,
) -> Result<CalibrationReport> {
    let vectors = c.index.vectors()?;
    let renderer = &c.encoder.renderer;
    let ids: Vec<Vec<u32>> = c
        .index
        .exemplars()
        .par_iter()
        .map(|e| {
            renderer
                .render(&crate::conversation::Content::Text(e.text.clone()))
                .map(|r| renderer.content_ids(&r.ids).to_vec())
                .unwrap_or_default()
        })
        .collect();
    let oof = out_of_fold(c, &vectors, &ids, opts)?;
    let gold: Vec<Option<u32>> = c.index.label_indices().iter().map(|&l| Some(l)).collect();
    let target = opts.target.unwrap_or(0.97);
    let signal_reports = |scores: &[Scores], gold: &[Option<u32>]| -> Vec<(Signal, SignalReport)> {
        ALL_SIGNALS
            .iter()
            .filter(|s| !s.needs_head() || scores.first().is_some_and(|x| x.head.is_some()))
            .map(|&s| {
                let scored: Vec<Scored> = scores
                    .iter()
                    .zip(gold)
                    .map(|(x, g)| {
                        let (pred, confidence) = x.decision(s);
                        Scored {
                            pred,
                            gold: *g,
                            confidence,
                        }
                    })
                    .collect();
                let ok = scored.iter().filter(|x| x.correct()).count();
                (
                    s,
                    SignalReport {
                        signal: s.name().into(),
                        aurc: crate::eval::aurc(&scored),
                        accuracy: ok as f64 / scored.len().max(1) as f64,
                        coverage_at_target: coverage_at(&scored, target).coverage,
                    },
                )
            })
            .collect()
    };
    // The final head, trained on every exemplar.
    let head = if opts.train_head {
        let y = c.index.label_indices().to_vec();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        Some(Head::train(
            &vectors,
            c.index.manifest.model.dims,
            &refs,
            &y,
            c.index.labels().len(),
            &opts.head,
        )?)
    } else {
        None
    };
    let keep_signal = c.thresholds.signal;
    // Score with a kNN signal while the head is being attached (any signal works for that).
    c.thresholds.signal = Signal::VoteSim;
    c.set_head(head)?;
    c.thresholds.signal = keep_signal;
    // Calibrate on held-out rows when given (they reflect deployment better), else on the
    // out-of-fold scores of the exemplars; the signal is chosen on the same rows.
    let (method, cal_scores, cal_gold) = match held_out {
        Some(f) => {
            let rows = f(c)?;
            let (s, g): (Vec<Scores>, Vec<Option<u32>>) = rows.into_iter().unzip();
            ("held-out labelled rows".to_string(), s, g)
        }
        None => (
            format!(
                "cross-validation over the exemplars (leave-one-out kNN, {}-fold head)",
                opts.folds
            ),
            oof,
            gold,
        ),
    };
    let reports = signal_reports(&cal_scores, &cal_gold);
    let signal = match opts.signal {
        Some(s) => s,
        None => reports
            .iter()
            .min_by(|a, b| a.1.aurc.partial_cmp(&b.1.aurc).unwrap())
            .map(|r| r.0)
            .unwrap_or_default(),
    };
    if signal.needs_head() && c.head.is_none() {
        return Err(Error::Config(format!(
            "signal `{}` needs the head; drop --no-head",
            signal.name()
        )));
    }
    c.thresholds.signal = signal;
    let n_labels = c.index.labels().len();
    let items: Vec<(u32, f32, bool)> = cal_scores
        .iter()
        .zip(&cal_gold)
        .filter_map(|(s, g)| {
            let (p, conf) = s.decision(signal);
            p.map(|p| (p, conf, Some(p) == *g))
        })
        .collect();
    let curves = Curves::fit(&items, n_labels, opts.per_label, opts.shrink);
    let calibrated: Vec<Scored> = items
        .iter()
        .map(|&(l, conf, ok)| Scored {
            pred: Some(l),
            gold: if ok { Some(l) } else { None },
            confidence: curves.score(l, conf) as f32,
        })
        .collect();
    let total = cal_scores.len();
    let t_star: f64 = match opts.budget {
        Some(b) => {
            let mut s: Vec<f32> = calibrated.iter().map(|x| x.confidence).collect();
            s.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let keep = ((1.0 - b) * total as f64).floor() as usize;
            if keep == 0 {
                2.0
            } else {
                s[(keep - 1).min(s.len() - 1)] as f64
            }
        }
        None => coverage_at(&calibrated, target)
            .threshold
            .map_or(2.0, |t| t as f64),
    };
    let kept: Vec<&Scored> = calibrated
        .iter()
        .filter(|x| x.confidence as f64 >= t_star)
        .collect();
    let kept_ok = kept.iter().filter(|x| x.correct()).count();
    let (lo, hi) = items
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
            (a.min(x.1), b.max(x.1))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo - 1e-4, hi + 1e-4)
    } else {
        (0.0, 1.0)
    };
    let global_raw = {
        let g = Curves {
            global: curves.global,
            per_label: vec![],
        };
        g.raw_threshold(0, t_star, lo, hi)
    };
    let d = &mut c.index.manifest.decision;
    d.signal = DecisionSignal::Single(signal);
    d.threshold = global_raw;
    d.per_label.clear();
    let (mut stricter, mut looser) = (0, 0);
    if opts.per_label {
        for (l, name) in c.index.manifest.labels.iter().enumerate() {
            if curves.per_label[l].is_none() {
                continue;
            }
            let t = curves.raw_threshold(l as u32, t_star, lo, hi);
            if t > global_raw + 1e-6 {
                stricter += 1;
            } else if t < global_raw - 1e-6 {
                looser += 1;
            }
            d.per_label.insert(name.clone(), t);
        }
    }
    let report = CalibrationReport {
        method,
        rows: total,
        signal: signal.name().into(),
        signals: reports.into_iter().map(|r| r.1).collect(),
        target_kept_accuracy: opts.budget.is_none().then_some(target),
        budget: opts.budget,
        per_label: opts.per_label,
        calibrated_threshold: t_star,
        expected_coverage: wilson(kept.len(), total),
        expected_kept_accuracy: wilson(kept_ok, kept.len()),
        stricter_labels: stricter,
        looser_labels: looser,
    };
    d.calibration = Some(Calibration::Calibrated(report.clone()));
    // Thresholds live in the manifest; mirror them into the running classifier.
    let mut th = crate::decide::Thresholds::global(signal, global_raw, n_labels);
    for (name, t) in &d.per_label {
        if let Ok(i) = c.index.manifest.labels.binary_search(name) {
            th.per_label[i] = *t;
        }
    }
    c.thresholds = th;
    Ok(report)
}
