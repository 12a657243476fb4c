//! Index jobs: build an exemplar index from labelled files, or add labelled rows to one. They
//! compose the stages (read, render, embed, index, auto-calibrate) and own no format or model
//! details of their own.

use crate::conversation::Row;
use crate::embed::Encoder;
use crate::index::{BuildInfo, Exemplar, ExemplarIndex, ModelInfo};
use crate::input::{self, InputOptions};
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
        let multi = index.manifest.build.multi_label;
        let embedded = encoder.embed_rows(&keep)?;
        let mut ex = Vec::new();
        let mut vectors = Vec::new();
        for (r, e) in keep.into_iter().zip(embedded) {
            match e {
                Ok(e) => {
                    let text = r.content.expect("kept rows are readable").flatten();
                    let label = r.label.expect("kept rows are labelled");
                    // A multi-label row becomes one exemplar per label (same vector, same id).
                    let labels = if multi {
                        parse_label_set(&label)
                    } else {
                        vec![label]
                    };
                    for l in labels {
                        vectors.extend_from_slice(&e.vector);
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
    build_index_with(
        encoder,
        sources,
        out,
        k,
        threshold,
        false,
        crate::center::CenterChoice::Auto,
        false,
        progress,
    )
}

/// [`build_index`] with the multi-label and per-language centring choices, and `overwrite`:
/// an index already at `out` is replaced. The new index is built beside it and swapped in
/// only when complete and checked ([`crate::index::IndexUpdate`]): a failure at any point
/// leaves the old index as it was.
#[allow(clippy::too_many_arguments)] // one per `index build` flag
pub fn build_index_with(
    encoder: &Encoder,
    sources: &[(std::path::PathBuf, InputOptions)],
    out: &Path,
    k: usize,
    threshold: Option<f32>,
    multi_label: bool,
    center: crate::center::CenterChoice,
    overwrite: bool,
    progress: &Progress,
) -> Result<(ExemplarIndex, AddSummary)> {
    let update = crate::index::IndexUpdate::create(out, overwrite)?;
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
    let mut index = ExemplarIndex::create(update.dir(), ModelInfo::of_encoder(encoder), build)?;
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
    if center.wanted(&encoder.files.languages) {
        index.center_languages()?;
    }
    match threshold {
        Some(t) => index.manifest.decision.threshold = t,
        None if multi_label => {
            crate::calibrate::auto_calibrate_multi(&mut index, crate::calibrate::DEFAULT_TARGET)?
        }
        None => crate::calibrate::auto_calibrate(&mut index, crate::calibrate::DEFAULT_TARGET)?,
    }
    index.save()?;
    crate::failpoint::hit("index-build-saved");
    update.commit()?;
    index.moved_to(out);
    total.total_exemplars = index.len();
    total.labels = index.labels().len();
    Ok((index, total))
}
