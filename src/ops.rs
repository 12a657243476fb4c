//! The user-level operations behind the CLI and the Python binding: build or extend an
//! exemplar index from labelled files, evaluate on a labelled split. They compose the stage
//! modules and own no format or model details of their own.

use crate::conversation::Row;
use crate::embed::Encoder;
use crate::eval::{report, EvalReport, Scored};
use crate::index::{BuildInfo, Exemplar, ExemplarIndex, ModelInfo};
use crate::input::{self, InputOptions};
use crate::pipeline::Classifier;
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::Path;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AddSummary {
    pub added: usize,
    pub skipped_unlabelled: usize,
    /// First few row problems (file and line), for the user to fix.
    pub problems: Vec<String>,
    pub skipped_errors: usize,
    pub total_exemplars: usize,
    pub labels: usize,
    pub seconds: f64,
}

/// Embeds the labelled rows of `path` and adds them to `index` (not saved).
pub fn add_exemplars(
    encoder: &Encoder,
    index: &mut ExemplarIndex,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
) -> Result<AddSummary> {
    let start = std::time::Instant::now();
    let mut reader = input::open(path, opts)?;
    let mut s = AddSummary::default();
    let existing: std::collections::HashSet<String> =
        index.exemplars().iter().map(|e| e.id.clone()).collect();
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let mut keep: Vec<Row> = Vec::with_capacity(rows.len());
        for r in rows {
            match (&r.content, &r.label) {
                (Err(e), _) => {
                    s.skipped_errors += 1;
                    if s.problems.len() < 10 {
                        s.problems.push(e.clone());
                    }
                }
                (Ok(_), None) => {
                    s.skipped_unlabelled += 1;
                    if s.problems.len() < 10 {
                        s.problems.push(format!(
                            "{} row {}: no label (column `{}`)",
                            path.display(),
                            r.index,
                            opts.columns.label
                        ));
                    }
                }
                (Ok(_), Some(_)) if existing.contains(&r.id) => {
                    // Re-adding the same file must not duplicate exemplars.
                }
                _ => keep.push(r),
            }
        }
        let rendered: Vec<_> = {
            use rayon::prelude::*;
            keep.par_iter()
                .map(|r| encoder.renderer.render(r.content.as_ref().unwrap()))
                .collect()
        };
        let multi = index.manifest.build.multi_label;
        let mut ids = Vec::new();
        let mut ex = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (r, rd) in keep.into_iter().zip(rendered) {
            match rd {
                Ok(rd) => {
                    let text = r.content.unwrap().flatten();
                    let label = r.label.unwrap();
                    // A multi-label row becomes one exemplar per label (same vector, same id).
                    let labels = if multi {
                        parse_label_set(&label)
                    } else {
                        vec![label]
                    };
                    // Embedded once; the vector is repeated per label below.
                    ids.push(rd.ids);
                    for l in labels {
                        owner.push(ids.len() - 1);
                        ex.push(Exemplar {
                            id: r.id.clone(),
                            label: l,
                            source: "gold".into(),
                            llm_model: None,
                            prompt_version: None,
                            text: text.clone(),
                        });
                    }
                }
                Err(e) => {
                    s.skipped_errors += 1;
                    if s.problems.len() < 10 {
                        s.problems
                            .push(format!("{} row {}: {e}", path.display(), r.index));
                    }
                }
            }
        }
        if ex.is_empty() {
            continue;
        }
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let unique = encoder.embed_ids(&refs)?;
        let d = encoder.dim();
        let mut vectors = Vec::with_capacity(owner.len() * d);
        for &o in &owner {
            vectors.extend_from_slice(&unique[o * d..(o + 1) * d]);
        }
        s.added += ex.len();
        index.add(&vectors, ex)?;
    }
    s.total_exemplars = index.len();
    s.labels = index.labels().len();
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

/// The labels of a multi-label cell: a JSON list (`["a", "b"]`) or `a|b`.
pub fn parse_label_set(s: &str) -> Vec<String> {
    let t = s.trim();
    let mut v: Vec<String> = if t.starts_with('[') {
        serde_json::from_str::<Vec<serde_json::Value>>(t)
            .map(|a| {
                a.iter()
                    .filter_map(|x| match x {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Null => None,
                        other => Some(other.to_string()),
                    })
                    .collect()
            })
            .unwrap_or_else(|_| vec![t.to_string()])
    } else {
        t.split('|').map(|x| x.trim().to_string()).collect()
    };
    v.retain(|x| !x.is_empty());
    v.sort();
    v.dedup();
    v
}

/// Builds a new index in `out` from labelled files.
pub fn build_index(
    encoder: &Encoder,
    sources: &[(std::path::PathBuf, InputOptions)],
    out: &Path,
    k: usize,
    threshold: Option<f32>,
    progress: &Progress,
) -> Result<(ExemplarIndex, AddSummary)> {
    build_index_with(encoder, sources, out, k, threshold, false, progress)
}

/// [`build_index`] with the multi-label choice.
pub fn build_index_with(
    encoder: &Encoder,
    sources: &[(std::path::PathBuf, InputOptions)],
    out: &Path,
    k: usize,
    threshold: Option<f32>,
    multi_label: bool,
    progress: &Progress,
) -> Result<(ExemplarIndex, AddSummary)> {
    let build = BuildInfo {
        sources: sources
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect(),
        split: sources.first().and_then(|(_, o)| o.split.clone()),
        include_system_turns: false,
        multi_label,
        ..Default::default()
    };
    let mut index =
        ExemplarIndex::create(out, ModelInfo::of(&encoder.files, encoder.dim()), build)?;
    index.manifest.decision.k = k;
    let mut total = AddSummary::default();
    for (p, o) in sources {
        let s = add_exemplars(encoder, &mut index, p, o, progress)?;
        total.added += s.added;
        total.skipped_errors += s.skipped_errors;
        total.skipped_unlabelled += s.skipped_unlabelled;
        total.problems.extend(s.problems);
        total.seconds += s.seconds;
    }
    if index.is_empty() {
        return Err(Error::input(
            &sources[0].0,
            format!(
                "no labelled rows to index (check --label-col and --split); first problems: {}",
                total.problems.join("; ")
            ),
        ));
    }
    match threshold {
        Some(t) => index.manifest.decision.threshold = t,
        None if multi_label => {
            crate::calibrate::auto_calibrate_multi(&mut index, crate::calibrate::DEFAULT_TARGET)?
        }
        None => crate::calibrate::auto_calibrate(&mut index, crate::calibrate::DEFAULT_TARGET)?,
    }
    index.save()?;
    total.total_exemplars = index.len();
    total.labels = index.labels().len();
    Ok((index, total))
}

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
}

/// Classifies a labelled file and scores the kNN decisions against the gold labels.
pub fn evaluate(
    classifier: &Classifier,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
) -> Result<Evaluation> {
    let mut reader = input::open(path, opts)?;
    let labels = classifier.index.labels();
    let mut unseen = std::collections::BTreeSet::new();
    let mut scored = Vec::new();
    let mut all_scores = Vec::new();
    let mut by_gold: std::collections::BTreeMap<String, [usize; 4]> = Default::default();
    let mut ids = Vec::new();
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let golds: Vec<Option<String>> = rows.iter().map(|r| r.label.clone()).collect();
        let out = classifier.classify(rows)?;
        for (c, gold) in out.into_iter().zip(golds) {
            let Some(gold) = gold else {
                continue; // unlabelled rows say nothing about accuracy
            };
            let g = labels.binary_search(&gold).ok().map(|i| i as u32);
            let e = by_gold.entry(gold.clone()).or_default();
            e[0] += 1;
            match (c.out.decided_by, c.out.label.as_ref() == Some(&gold)) {
                (crate::output::DecidedBy::Knn, true) => e[2] += 1,
                (crate::output::DecidedBy::Knn, false) => e[3] += 1,
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
        }
    }
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
    let kept: Vec<&Scored> = scored
        .iter()
        .filter(|s| classifier.thresholds.keep(s.pred, s.confidence))
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
    })
}

/// Embeds every readable row of `path` into a Parquet file of `id`, `label`, `vector`
/// (fixed-size list of f32). Rows that cannot be read or rendered are listed in the summary.
pub fn embed_file(
    encoder: &Encoder,
    path: &Path,
    opts: &InputOptions,
    out: &Path,
    progress: &Progress,
) -> Result<AddSummary> {
    use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let start = std::time::Instant::now();
    let d = encoder.dim();
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new(
            "vector",
            DataType::FixedSizeList(item.clone(), d as i32),
            false,
        ),
    ]));
    let f = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema.clone(), None)
        .map_err(|e| Error::output(out, e.to_string()))?;
    let mut reader = input::open(path, opts)?;
    let mut s = AddSummary::default();
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let rendered: Vec<_> = {
            use rayon::prelude::*;
            rows.par_iter()
                .map(|r| match &r.content {
                    Ok(c) => encoder.renderer.render(c),
                    Err(e) => Err(e.clone()),
                })
                .collect()
        };
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        let mut seqs = Vec::new();
        for (r, rd) in rows.iter().zip(rendered) {
            match rd {
                Ok(rd) => {
                    ids.push(r.id.clone());
                    labels.push(r.label.clone());
                    seqs.push(rd.ids);
                }
                Err(e) => {
                    s.skipped_errors += 1;
                    if s.problems.len() < 10 {
                        s.problems.push(e);
                    }
                }
            }
        }
        if seqs.is_empty() {
            continue;
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let v = encoder.embed_ids(&refs)?;
        s.added += ids.len();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(ids)),
            Arc::new(StringArray::from_iter(labels)),
            Arc::new(
                FixedSizeListArray::try_new(
                    item.clone(),
                    d as i32,
                    Arc::new(Float32Array::from(v)),
                    None,
                )
                .map_err(|e| Error::output(out, e.to_string()))?,
            ),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| Error::output(out, e.to_string()))?;
        w.write(&batch)
            .map_err(|e| Error::output(out, e.to_string()))?;
    }
    w.close().map_err(|e| Error::output(out, e.to_string()))?;
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
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
}

pub fn evaluate_multi(
    encoder: &Encoder,
    tax: &crate::pipeline::Taxonomy,
    path: &Path,
    opts: &InputOptions,
    progress: &Progress,
) -> Result<MultiReport> {
    use rayon::prelude::*;
    let labels = tax.index.labels();
    let mut reader = input::open(path, opts)?;
    let mut scored = Vec::new();
    let (mut tp, mut fp, mut fnn) = (
        vec![0usize; labels.len()],
        vec![0usize; labels.len()],
        vec![0usize; labels.len()],
    );
    let mut exact = 0usize;
    let mut n = 0usize;
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.content.is_ok() && r.label.is_some())
            .collect();
        let rendered: Vec<_> = rows
            .par_iter()
            .map(|r| encoder.renderer.render(r.content.as_ref().unwrap()))
            .collect();
        let ok: Vec<(usize, Vec<u32>)> = rendered
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| r.ok().map(|r| (i, r.ids)))
            .collect();
        let refs: Vec<&[u32]> = ok.iter().map(|(_, v)| v.as_slice()).collect();
        let vecs = encoder.embed_ids(&refs)?;
        let hits = tax.index.search_batch(&vecs, tax.k * 4)?;
        let d = encoder.dim();
        let mut scratch = vec![0f32; labels.len()];
        for (j, ((i, ids), h)) in ok.iter().zip(hits).enumerate() {
            let out = tax.decide(
                &h,
                &vecs[j * d..(j + 1) * d],
                encoder.renderer.content_ids(ids),
                &mut scratch,
            );
            let pred: Vec<String> = out.labels.unwrap_or_default();
            let gold = parse_label_set(rows[*i].label.as_ref().unwrap());
            for (l, name) in labels.iter().enumerate() {
                match (pred.contains(name), gold.contains(name)) {
                    (true, true) => tp[l] += 1,
                    (true, false) => fp[l] += 1,
                    (false, true) => fnn[l] += 1,
                    _ => {}
                }
            }
            let right = pred == gold;
            exact += usize::from(right);
            n += 1;
            scored.push(Scored {
                pred: Some(0),
                gold: Some(if right { 0 } else { 1 }),
                confidence: out.confidence.unwrap_or(0.0),
            });
        }
    }
    if n == 0 {
        return Err(Error::input(path, "no labelled rows to evaluate"));
    }
    let (stp, sfp, sfn): (usize, usize, usize) =
        (tp.iter().sum(), fp.iter().sum(), fnn.iter().sum());
    let micro = 2.0 * stp as f64 / (2 * stp + sfp + sfn).max(1) as f64;
    let per: Vec<f64> = (0..labels.len())
        .filter(|&l| tp[l] + fp[l] + fnn[l] > 0)
        .map(|l| 2.0 * tp[l] as f64 / (2 * tp[l] + fp[l] + fnn[l]) as f64)
        .collect();
    let kept: Vec<&Scored> = scored
        .iter()
        .filter(|s| s.confidence >= tax.thresholds.global)
        .collect();
    let kept_ok = kept.iter().filter(|s| s.correct()).count();
    Ok(MultiReport {
        rows: n,
        subset_accuracy: exact as f64 / n as f64,
        micro_f1: micro,
        macro_f1: per.iter().sum::<f64>() / per.len().max(1) as f64,
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
    })
}
