//! The calibrate job: choose the confidence signal and thresholds (global and per label) for a
//! kept-accuracy target or an escalation budget, by cross-validation over the exemplars or on
//! held-out labelled rows; train the learned head; store everything with the index.

use crate::calibrate::{CalibrateOptions, CalibrationReport};
use crate::decide::Scores;
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
    pub report: CalibrationReport,
    /// The global threshold stored in the index.
    pub threshold: f32,
    pub seconds: f64,
}

/// Runs the calibration and saves the head and the manifest into the index.
pub fn run(job: &CalibrateJob) -> Result<CalibrateOutcome> {
    let t = std::time::Instant::now();
    let mut classifier = Classifier::open(&job.index, &job.classifier)?;
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
        h.save(&job.index)?;
    }
    classifier.index.save_manifest()?;
    Ok(CalibrateOutcome {
        report,
        threshold: classifier.index.manifest.decision.threshold,
        seconds: t.elapsed().as_secs_f64(),
    })
}
