//! The calibrate job: choose the confidence signal and thresholds (global and per label) for a
//! kept-accuracy target or an escalation budget, by cross-validation over the exemplars or on
//! held-out labelled rows; train the learned head; store everything with the index.

use crate::calibrate::{CalibrateOptions, CalibrationReport, MultiRow};
use crate::decide::Scores;
use crate::embed::Encoder;
use crate::index::{ExemplarIndex, MultiCalibrationReport};
use crate::input::InputOptions;
use crate::pipeline::{Classifier, ClassifierOptions};
use crate::progress::Progress;
use crate::Result;
use std::path::PathBuf;

/// A calibration to run.
#[derive(Debug, Clone)]
pub struct CalibrateJob {
    pub index: PathBuf,
    pub classifier: ClassifierOptions,
    /// Held-out labelled rows (a validation split) instead of cross-validation.
    pub labelled: Option<(PathBuf, InputOptions)>,
    pub options: CalibrateOptions,
}

/// What a calibration chose.
#[derive(Debug, Clone)]
pub struct CalibrateOutcome {
    pub report: Calibrated,
    /// The novelty rule fitted with it (single-label indexes), with its leave-labels-out check.
    pub novelty: Option<crate::novelty::NoveltyConfig>,
    /// The global threshold stored in the index.
    pub threshold: f32,
    pub seconds: f64,
}

/// A single-label index's calibration, or a multi-label one's.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Calibrated {
    Single(CalibrationReport),
    Multi(MultiCalibrationReport),
}

/// Runs the calibration and saves the head and the manifest into the index, as one swap of
/// the whole index ([`crate::index::update`]): a failure leaves it as it was.
pub fn run(job: &CalibrateJob) -> Result<CalibrateOutcome> {
    crate::index::update(&job.index, |stage| run_in(job, stage))
}

/// [`run`] on the index in `dir` (a stage the caller commits), in place.
pub fn run_in(job: &CalibrateJob, dir: &std::path::Path) -> Result<CalibrateOutcome> {
    let t = std::time::Instant::now();
    if ExemplarIndex::read_manifest(dir)?.build.multi_label {
        return run_multi(job, dir, t);
    }
    let mut classifier = Classifier::open(dir, &job.classifier)?;
    let held = |c: &Classifier| -> Result<Vec<(Scores, Option<u32>)>> {
        let (path, opts) = job
            .labelled
            .as_ref()
            .expect("only called with held-out rows");
        let mut out = Vec::new();
        super::eval::for_each_labelled(c, path, opts, &Progress::hidden(), |x, g| {
            if let Some(s) = x.scores {
                out.push((s, c.index.labels().binary_search(&g).ok().map(|i| i as u32)));
            }
        })?;
        Ok(out)
    };
    let report = if job.labelled.is_some() {
        crate::calibrate::calibrate(&mut classifier, Some(&held), &job.options)?
    } else {
        crate::calibrate::calibrate(&mut classifier, None, &job.options)?
    };
    if let Some(h) = &classifier.head {
        h.save(dir)?;
    }
    let rate = job
        .options
        .novelty_rate
        .or_else(|| {
            classifier
                .index
                .manifest
                .decision
                .novelty
                .as_ref()
                .map(|n| n.rate)
        })
        .unwrap_or(crate::novelty::DEFAULT_RATE)
        .clamp(0.0, 1.0);
    let novelty = crate::calibrate::fit_novelty(&classifier.index, rate, true)?;
    classifier.index.manifest.decision.novelty = Some(novelty.clone());
    crate::failpoint::hit("calibrate-head-saved");
    classifier.index.save_manifest()?;
    Ok(CalibrateOutcome {
        novelty: Some(novelty),
        report: Calibrated::Single(report),
        threshold: classifier.index.manifest.decision.threshold,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The multi-label calibration: the one-vs-rest head and per-label rules.
fn run_multi(
    job: &CalibrateJob,
    dir: &std::path::Path,
    t: std::time::Instant,
) -> Result<CalibrateOutcome> {
    let mut index = ExemplarIndex::open(dir, false)?;
    let mut enc = job.classifier.encoder.clone();
    if enc.model.is_none() {
        enc.model = Some(crate::index::default_model(dir, &index.manifest.model));
    }
    let encoder = Encoder::load(&enc)?;
    index.check_model(&encoder.files, encoder.dim())?;
    let held: Option<Vec<MultiRow>> = match &job.labelled {
        Some((path, opts)) => {
            let labels = index.labels().to_vec();
            let mut rows = Vec::new();
            super::eval::for_each_multi_labelled(
                &encoder,
                index.query_space().as_ref(),
                path,
                opts,
                &Progress::hidden(),
                |batch| {
                    for (e, gold) in batch {
                        rows.push(MultiRow {
                            vector: e.vector.clone(),
                            ids: encoder.content_ids(&e.ids).to_vec(),
                            // Labels the index does not know stay in the set as
                            // `UNKNOWN`: such a row can never be exactly right.
                            gold: crate::multilabel::indices_of(&labels, gold),
                        });
                    }
                    Ok(())
                },
            )?;
            if rows.is_empty() {
                return Err(crate::Error::input(
                    path,
                    "no readable, labelled rows to calibrate on (check --label-col and --split)",
                ));
            }
            Some(rows)
        }
        None => None,
    };
    let (head, report) = crate::calibrate::calibrate_multi(
        &mut index,
        &encoder.renderer,
        held.as_deref(),
        &job.options,
    )?;
    head.save(dir)?;
    index.save_manifest()?;
    Ok(CalibrateOutcome {
        novelty: None,
        report: Calibrated::Multi(report),
        threshold: index.manifest.decision.threshold,
        seconds: t.elapsed().as_secs_f64(),
    })
}
