//! `semtel index build|add|info`, `semtel embed`, `semtel static distill`: call the library's
//! index jobs and print what they did.

use crate::args::ColumnArgs;
use crate::options::Ctx;
use anyhow::{bail, Result};
use semtel::embed::Encoder;
use semtel::index::ExemplarIndex;
use semtel::input::{self, InputOptions};
use std::path::{Path, PathBuf};

#[allow(clippy::too_many_arguments)] // mirrors the CLI flags one to one
pub fn build(
    ctx: &Ctx,
    files: &[PathBuf],
    out: &Path,
    cols: &ColumnArgs,
    k: usize,
    threshold: Option<f32>,
    overwrite: bool,
    multi_label: bool,
    center: semtel::center::CenterChoice,
) -> Result<()> {
    // Refused before the model loads; the old index is replaced only when the new one is
    // complete (build_index_with), so a failure never loses it.
    if out.join(semtel::index::MANIFEST).exists() && !overwrite {
        bail!(
            "{} already holds an index; pass --overwrite to replace it or use `semtel index add`",
            out.display()
        );
    }
    let encoder = Encoder::load(&ctx.encoder_options())?;
    let opts = ctx.input_options(cols);
    let sources: Vec<(PathBuf, InputOptions)> =
        files.iter().map(|f| (f.clone(), opts.clone())).collect();
    let total = files
        .iter()
        .filter_map(|f| input::open(f, &opts).ok().and_then(|r| r.total_rows()))
        .sum();
    let progress = ctx.progress(Some(total), "index");
    let (index, s) = semtel::app::index::build_index_with(
        &encoder,
        &sources,
        out,
        k,
        threshold,
        multi_label,
        center,
        overwrite,
        &progress,
    )?;
    progress.finish();
    eprintln!(
        "built {}: {} exemplars, {} labels, model {} ({:.1}s, {:.0} exemplars/s); threshold {:.3} ({})",
        out.display(),
        index.len(),
        index.labels().len(),
        index.manifest.model.id,
        s.seconds,
        s.added as f64 / s.seconds.max(1e-9),
        index.manifest.decision.threshold,
        if threshold.is_some() { "given" } else { "leave-one-out, 95% kept-accuracy" }
    );
    report_skips(&s);
    if let Some(c) = &index.manifest.centering {
        eprintln!(
            "vectors centred per language ({}; other languages: a running mean over the traffic)",
            centering_languages(c)
        );
    }
    if index.manifest.decision.threshold >= 1e8 {
        eprintln!(
            "warning: no threshold reaches 95% kept-accuracy in leave-one-out, so every row will be escalated; {}",
            if index.manifest.build.multi_label {
                "run `semtel calibrate` (the multi-label head keeps per-label verdicts it is sure of)"
            } else {
                "add exemplars, or run `semtel calibrate` with a lower --target"
            }
        );
    }
    Ok(())
}

pub fn report_skips(s: &semtel::app::index::AddSummary) {
    if s.skipped_errors + s.skipped_unlabelled > 0 {
        eprintln!(
            "skipped {} unreadable and {} unlabelled rows; first problems:",
            s.skipped_errors, s.skipped_unlabelled
        );
        for p in s.problems.iter().take(5) {
            eprintln!("  {p}");
        }
    }
}

pub fn add(ctx: &Ctx, dir: &Path, files: &[PathBuf], cols: &ColumnArgs) -> Result<()> {
    // The additions are made in a staged copy and swapped in whole (`index::update`).
    let update = semtel::index::IndexUpdate::begin(dir)?;
    let mut index = ExemplarIndex::open(update.dir(), false)?;
    let mut eo = ctx.encoder_options();
    if eo.model.is_none() {
        eo.model = Some(semtel::index::default_model(dir, &index.manifest.model));
    }
    let encoder = Encoder::load(&eo)?;
    index.check_model(&encoder.files, encoder.dim())?;
    let opts = ctx.input_options(cols);
    let mut added = 0;
    for f in files {
        let progress = ctx.progress(input::open(f, &opts)?.total_rows(), "add");
        let s = semtel::app::index::add_exemplars(&encoder, &mut index, f, &opts, &progress)?;
        progress.finish();
        report_skips(&s);
        added += s.added;
    }
    if index
        .manifest
        .decision
        .calibration
        .as_ref()
        .is_some_and(|c| c.is_automatic_single_label())
    {
        semtel::calibrate::auto_calibrate(&mut index, semtel::calibrate::DEFAULT_TARGET)?;
    }
    index.save()?;
    let (total, labels) = (index.len(), index.labels().len());
    drop(index);
    update.commit()?;
    eprintln!(
        "added {added} exemplars to {}: now {total} exemplars, {labels} labels",
        dir.display(),
    );
    Ok(())
}

pub fn info(index: &Path) -> Result<()> {
    let idx = ExemplarIndex::open(index, true)?;
    let mut m = serde_json::to_value(&idx.manifest)?;
    // The mean vectors are for the machine; a person wants the languages and their rows.
    if let (Some(c), Some(slot)) = (&idx.manifest.centering, m.get_mut("centering")) {
        *slot = serde_json::json!({
            "languages": c.languages.iter().map(|(l, m)| (l.clone(), m.rows)).collect::<std::collections::BTreeMap<_, _>>(),
            "other_languages": format!("running traffic mean, {} pseudo-rows of the all-exemplar mean", c.prior_rows),
        });
    }
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

/// `en 12,000 rows, de 300 rows` for a centred index.
fn centering_languages(c: &semtel::center::Centering) -> String {
    if c.languages.is_empty() {
        return "no language has enough exemplars for its own mean".into();
    }
    c.languages
        .iter()
        .map(|(l, m)| format!("{l} {} rows", m.rows))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn embed(ctx: &Ctx, input: &Path, output: &Path, cols: &ColumnArgs) -> Result<()> {
    let encoder = Encoder::load(&ctx.encoder_options())?;
    let opts = ctx.input_options(cols);
    let progress = ctx.progress(input::open(input, &opts)?.total_rows(), "embed");
    let s = semtel::app::embed::embed_file(&encoder, input, &opts, output, &progress)?;
    progress.finish();
    eprintln!(
        "embedded {} rows into {} ({:.1}s, {:.0} rows/s)",
        s.added,
        output.display(),
        s.seconds,
        s.added as f64 / s.seconds.max(1e-9)
    );
    report_skips(&s);
    Ok(())
}

pub fn distill(
    ctx: &Ctx,
    out: &Path,
    dims: usize,
    corpus: &[PathBuf],
    cols: &ColumnArgs,
) -> Result<()> {
    let encoder = Encoder::load(&ctx.encoder_options())?;
    let opts = ctx.input_options(cols);
    let s = semtel::embed::static_model::distill_files(&encoder, out, dims, corpus, &opts)?;
    eprintln!(
        "distilled {} tokens × {} dims into {} ({:.0}% of the variance kept; weights: {}; {:.1}s)",
        s.vocab,
        s.dims,
        out.display(),
        s.explained_variance * 100.0,
        s.weighting,
        s.seconds
    );
    Ok(())
}
