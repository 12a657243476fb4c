//! Evaluation jobs: classify a labelled file and score the decisions against its gold labels
//! (single-label: accuracy, macro-F1, coverage at kept-accuracy per signal; multi-label:
//! exact-set accuracy, micro/macro-F1).

use super::index::parse_label_set;
use crate::embed::Encoder;
use crate::eval::{report, EvalReport, Scored};
use crate::input::{self, InputOptions};
use crate::pipeline::Classifier;
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::Path;

/// Per-row evaluation results beside the aggregate report.
pub struct Evaluation {
    /// Report for the classifier's confidence signal.
    pub report: EvalReport,
    pub scored: Vec<Scored>,
    /// Row ids in the order of `scored`.
    pub ids: Vec<String>,
    /// The same rows scored with every kNN confidence signal.
    pub by_signal: Vec<(crate::decide::Signal, EvalReport)>,
    /// Per gold label, at the index's thresholds: [rows, escalated, kept right, kept wrong].
    pub by_gold: std::collections::BTreeMap<String, [usize; 4]>,
    /// How the novelty rule treated the rows (with an index that has one).
    pub novelty: Option<NoveltyEval>,
}

/// What the novelty rule did on a labelled file: the rows it escalated that the thresholds
/// alone would have kept, and the kept accuracy with and without it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NoveltyEval {
    pub rows: usize,
    /// Rows escalated as novel (the thresholds would have kept them).
    pub novel: usize,
    /// Of those, kNN's label would have been right / wrong; gold label unknown to the index.
    pub novel_would_be_right: usize,
    pub novel_would_be_wrong: usize,
    pub novel_unseen_gold: usize,
    /// Rows whose gold label the index does not know, and how many of them were kept anyway.
    pub unseen_gold_rows: usize,
    pub unseen_gold_kept: usize,
    /// Kept share and kept accuracy without and with the novelty rule.
    pub kept_without: f64,
    pub kept_accuracy_without: Option<f64>,
    pub kept_with: f64,
    pub kept_accuracy_with: Option<f64>,
}

/// The one "classify a labelled file and collect gold" loop (evaluation and held-out
/// calibration): classifies `path` chunk by chunk and calls `f` with each labelled row's result
/// and its gold label (unlabelled rows say nothing about accuracy and are skipped).
pub fn for_each_labelled(
    classifier: &Classifier,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
    mut f: impl FnMut(crate::pipeline::Classified, String),
) -> Result<()> {
    let mut reader = input::open(path, opts)?;
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let golds: Vec<Option<String>> = rows.iter().map(|r| r.label.clone()).collect();
        let (out, _panics) = classifier.classify_guarded(rows)?;
        for (c, gold) in out.into_iter().zip(golds) {
            if let Some(gold) = gold {
                f(c, gold);
            }
        }
    }
    Ok(())
}

/// Classifies a labelled file and scores the kNN decisions against the gold labels.
pub fn evaluate(
    classifier: &Classifier,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
) -> Result<Evaluation> {
    let labels = classifier.index.labels();
    let mut unseen = std::collections::BTreeSet::new();
    let mut scored = Vec::new();
    let mut all_scores = Vec::new();
    let mut by_gold: std::collections::BTreeMap<String, [usize; 4]> = Default::default();
    let mut ids = Vec::new();
    // Rows the language gate escalates whatever their score (`escalate_reason = language`),
    // and rows escalated as novel.
    let mut gated = Vec::new();
    let mut novel = Vec::new();
    for_each_labelled(classifier, path, opts, progress, |c, gold| {
        gated.push(c.out.escalate_reason == Some(crate::row::EscalateReason::Language));
        novel.push(c.out.escalate_reason == Some(crate::row::EscalateReason::Novel));
        let g = labels.binary_search(&gold).ok().map(|i| i as u32);
        let e = by_gold.entry(gold.clone()).or_default();
        e[0] += 1;
        match (c.out.decided_by, c.out.label.as_ref() == Some(&gold)) {
            (crate::row::DecidedBy::Knn, true) => e[2] += 1,
            (crate::row::DecidedBy::Knn, false) => e[3] += 1,
            _ => e[1] += 1,
        }
        if g.is_none() {
            unseen.insert(gold);
        }
        let pred = c
            .scores
            .as_ref()
            .and_then(|s| s.decision(classifier.thresholds.signal).0);
        scored.push(Scored {
            pred,
            gold: g,
            confidence: c.out.confidence.unwrap_or(f32::NEG_INFINITY),
        });
        all_scores.push(c.scores);
        ids.push(c.out.id);
    })?;
    if scored.is_empty() {
        return Err(Error::input(
            path,
            format!(
                "no labelled rows to evaluate (label column `{}`, split {:?})",
                opts.columns.label, opts.split
            ),
        ));
    }
    let signal = classifier.thresholds.signal.name().to_string();
    let unseen: Vec<String> = unseen.into_iter().collect();
    let mut report = report(&scored, labels.len(), &signal, unseen.clone());
    let novelty = classifier.novelty.as_ref().map(|_| {
        let mut e = NoveltyEval {
            rows: scored.len(),
            ..Default::default()
        };
        let (mut kw, mut kw_ok, mut k, mut k_ok) = (0usize, 0usize, 0usize, 0usize);
        for ((s, &g), &n) in scored.iter().zip(&gated).zip(&novel) {
            let would = !g && classifier.thresholds.keep(s.pred, s.confidence);
            if s.gold.is_none() {
                e.unseen_gold_rows += 1;
                e.unseen_gold_kept += usize::from(would && !n);
            }
            if would {
                kw += 1;
                kw_ok += usize::from(s.correct());
                if n {
                    e.novel += 1;
                    match (s.gold.is_some(), s.correct()) {
                        (false, _) => e.novel_unseen_gold += 1,
                        (true, true) => e.novel_would_be_right += 1,
                        (true, false) => e.novel_would_be_wrong += 1,
                    }
                } else {
                    k += 1;
                    k_ok += usize::from(s.correct());
                }
            }
        }
        let n = scored.len().max(1) as f64;
        e.kept_without = kw as f64 / n;
        e.kept_accuracy_without = (kw > 0).then(|| kw_ok as f64 / kw as f64);
        e.kept_with = k as f64 / n;
        e.kept_accuracy_with = (k > 0).then(|| k_ok as f64 / k as f64);
        e
    });
    let kept: Vec<&Scored> = scored
        .iter()
        .zip(gated.iter().zip(&novel))
        .filter(|(s, (gated, novel))| {
            !**gated && !**novel && classifier.thresholds.keep(s.pred, s.confidence)
        })
        .map(|(s, _)| s)
        .collect();
    let ok = kept.iter().filter(|s| s.correct()).count();
    report.at_index_thresholds = Some(crate::eval::CoveragePoint {
        threshold: classifier.thresholds.global,
        coverage: kept.len() as f64 / scored.len().max(1) as f64,
        kept_accuracy: (!kept.is_empty()).then(|| ok as f64 / kept.len() as f64),
        kept: kept.len(),
    });
    let by_signal = crate::decide::ALL_SIGNALS
        .into_iter()
        .filter(|s| !s.needs_head() || classifier.head.is_some())
        .map(|sig| {
            let rescored: Vec<Scored> = scored
                .iter()
                .zip(&all_scores)
                .map(|(s, v)| match v {
                    Some(v) => {
                        let (pred, confidence) = v.decision(sig);
                        Scored {
                            pred,
                            gold: s.gold,
                            confidence,
                        }
                    }
                    None => *s,
                })
                .collect();
            (
                sig,
                crate::eval::report(&rescored, labels.len(), sig.name(), unseen.clone()),
            )
        })
        .collect();
    Ok(Evaluation {
        report,
        scored,
        ids,
        by_signal,
        by_gold,
        novelty,
    })
}

/// Multi-label evaluation: exact-set accuracy, micro- and macro-F1 over labels, and how much
/// can be kept at a target exact-set accuracy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MultiReport {
    pub rows: usize,
    pub subset_accuracy: f64,
    pub micro_f1: f64,
    pub macro_f1: f64,
    pub at_target: Vec<crate::eval::TargetPoint>,
    pub at_index_threshold: crate::eval::CoveragePoint,
    /// With the one-vs-rest head: how many per-label verdicts its rules keep, and how right.
    pub kept: Option<crate::multilabel::KeptVerdicts>,
}

/// Reads a labelled multi-label file in batches and embeds it: `f` gets each batch's
/// (embedding, sorted gold label set) pairs, the vectors moved into `space` (the index's
/// per-language centring) when there is one. Unreadable, unlabelled and unembeddable rows are
/// skipped (evaluation and calibration score only what has a gold set).
pub fn for_each_multi_labelled(
    encoder: &Encoder,
    space: Option<&crate::center::QuerySpace>,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
    mut f: impl FnMut(&[(crate::embed::Embedded, Vec<String>)]) -> Result<()>,
) -> Result<()> {
    let mut reader = input::open(path, opts)?;
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.content.is_ok() && r.label.is_some())
            .collect();
        let mut embedded = encoder.embed_rows(&rows)?;
        if let Some(space) = space {
            let ok: Vec<usize> = (0..rows.len()).filter(|&i| embedded[i].is_ok()).collect();
            let raw: Vec<f32> = ok
                .iter()
                .flat_map(|&i| embedded[i].as_ref().map_or(&[][..], |e| &e.vector[..]))
                .copied()
                .collect();
            let langs: Vec<Option<&str>> = ok
                .iter()
                .map(|&i| {
                    rows[i]
                        .content
                        .as_ref()
                        .ok()
                        .and_then(crate::lang::detect)
                        .map(|l| l.code)
                })
                .collect();
            let placed = space.place(&raw, &langs);
            let d = encoder.dim();
            for (j, &i) in ok.iter().enumerate() {
                if let Ok(e) = &mut embedded[i] {
                    e.vector.copy_from_slice(&placed[j * d..(j + 1) * d]);
                }
            }
        }
        let batch: Vec<(crate::embed::Embedded, Vec<String>)> = embedded
            .into_iter()
            .zip(&rows)
            .filter_map(|(e, r)| {
                let gold = parse_label_set(r.label.as_deref()?);
                e.ok().map(|e| (e, gold))
            })
            .collect();
        f(&batch)?;
    }
    Ok(())
}

pub fn evaluate_multi(
    encoder: &Encoder,
    tax: &crate::pipeline::Taxonomy,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
) -> Result<MultiReport> {
    use crate::multilabel::{indices_of, MultiDecision};
    let labels = tax.index.labels();
    let mut scored = Vec::new();
    let mut scratch = vec![0f32; labels.len()];
    let (mut preds, mut golds) = (Vec::new(), Vec::new());
    let (mut decisions, mut decided_golds) = (Vec::new(), Vec::new());
    for_each_multi_labelled(encoder, tax.space.as_ref(), path, opts, progress, |batch| {
        let vecs: Vec<f32> = batch
            .iter()
            .flat_map(|(e, _)| e.vector.iter().copied())
            .collect();
        let hits = tax.index.search_batch(&vecs, tax.k * 4)?;
        for ((e, gold), h) in batch.iter().zip(&hits) {
            let out = tax.decide(h, &e.vector, encoder.content_ids(&e.ids), &mut scratch);
            let pred = indices_of(labels, out.labels.as_deref().unwrap_or_default());
            let gold = indices_of(labels, gold);
            scored.push(Scored {
                pred: Some(0),
                gold: Some(if pred == gold { 0 } else { 1 }),
                confidence: out.confidence.unwrap_or(0.0),
            });
            if let Some(u) = &out.uncertain {
                decisions.push(MultiDecision {
                    labels: pred.clone(),
                    uncertain: indices_of(labels, u),
                    confidence: out.confidence.unwrap_or(0.0),
                });
                decided_golds.push(gold.clone());
            }
            preds.push(pred);
            golds.push(gold);
        }
        Ok(())
    })?;
    let n = scored.len();
    if n == 0 {
        return Err(Error::input(path, "no labelled rows to evaluate"));
    }
    let m = crate::multilabel::set_metrics(&preds, &golds, labels.len());
    let kept: Vec<&Scored> = scored
        .iter()
        .filter(|s| s.confidence >= tax.thresholds.global)
        .collect();
    let kept_ok = kept.iter().filter(|s| s.correct()).count();
    Ok(MultiReport {
        rows: n,
        subset_accuracy: m.subset_accuracy,
        micro_f1: m.micro_f1,
        macro_f1: m.macro_f1,
        at_target: [0.90, 0.95, 0.97, 0.98]
            .iter()
            .map(|&t| crate::eval::coverage_at(&scored, t))
            .collect(),
        at_index_threshold: crate::eval::CoveragePoint {
            threshold: tax.thresholds.global,
            coverage: kept.len() as f64 / n as f64,
            kept_accuracy: (!kept.is_empty()).then(|| kept_ok as f64 / kept.len() as f64),
            kept: kept.len(),
        },
        kept: (!decisions.is_empty())
            .then(|| crate::multilabel::kept_verdicts(&decisions, &decided_golds, labels.len())),
    })
}
