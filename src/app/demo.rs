//! The bundled end-to-end run: index `data/exemplars.jsonl`, classify
//! `data/conversations.jsonl` into `<out>/labels.jsonl`, and score it against the sample's gold
//! labels. Returns what happened; the CLI prints it.

use crate::embed::{Encoder, EncoderOptions};
use crate::input::{self, InputOptions};
use crate::output::{Existing, OutputSpec, OutputWriter};
use crate::pipeline::{self, Classifier, ClassifierOptions, NoEscalation, RunSummary};
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What the demo did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Model id, dims, pooling, token limit and engine, for the first line.
    pub model: String,
    pub index: PathBuf,
    pub exemplars: usize,
    pub labels: usize,
    pub index_seconds: f64,
    pub conversations: PathBuf,
    pub output: PathBuf,
    pub run: RunSummary,
    /// kNN accuracy on all rows of the sample.
    pub accuracy: f64,
    pub threshold: f32,
    /// (share kept, accuracy of the kept rows) at the index's threshold.
    pub kept: (f64, Option<f64>),
    /// The first output rows: (id, label, decided_by).
    pub first_rows: Vec<(String, Option<String>, String)>,
}

/// Runs the demo from `root` (the repository root) into `out`.
pub fn run(root: &Path, out: &Path, encoder: &EncoderOptions) -> Result<DemoReport> {
    let exemplars = root.join("data/exemplars.jsonl");
    let conversations = root.join("data/conversations.jsonl");
    if !exemplars.exists() || !conversations.exists() {
        return Err(Error::Config(
            "run the demo from the semtel repository root (data/exemplars.jsonl and data/conversations.jsonl are needed)".into(),
        ));
    }
    let idx = out.join("index");
    let labels = out.join("labels.jsonl");
    if idx.exists() {
        std::fs::remove_dir_all(&idx).map_err(|e| Error::io(&idx, e))?;
    }
    let encoder = Encoder::load(encoder)?;
    let model = format!(
        "{} ({} dims, {:?} pooling, {} tokens), engine: {}",
        encoder.files.id,
        encoder.dim(),
        encoder.pooling(),
        encoder.files.max_tokens,
        encoder.engine.describe()
    );
    let opts = InputOptions::default();
    let (index, s) = super::index::build_index(
        &encoder,
        &[(exemplars, opts.clone())],
        &idx,
        10,
        None,
        &Progress::hidden(),
    )?;
    let (n_exemplars, n_labels) = (index.len(), index.labels().len());
    let classifier = Classifier::new(encoder, index, &ClassifierOptions::default())?;
    let reader = input::open(&conversations, &opts)?;
    let (writer, done) = OutputWriter::open(&labels, OutputSpec::new(vec![]), Existing::Overwrite)?;
    let run = pipeline::run(
        &classifier,
        reader,
        Box::new(writer),
        done,
        &mut NoEscalation,
        &Progress::hidden(),
    )?;
    let ev = super::eval::evaluate(&classifier, &conversations, &opts, &Progress::hidden())?;
    let t = classifier.thresholds.global;
    let kept_rows: Vec<_> = ev
        .scored
        .iter()
        .filter(|x| x.pred.is_some() && x.confidence >= t)
        .collect();
    let kept = (
        kept_rows.len() as f64 / ev.scored.len().max(1) as f64,
        (!kept_rows.is_empty()).then(|| {
            kept_rows.iter().filter(|x| x.correct()).count() as f64 / kept_rows.len() as f64
        }),
    );
    let first_rows = crate::output::read_ids_and_labels(&labels)?
        .into_iter()
        .take(8)
        .collect();
    Ok(DemoReport {
        model,
        index: idx,
        exemplars: n_exemplars,
        labels: n_labels,
        index_seconds: s.seconds,
        conversations,
        output: labels,
        run,
        accuracy: ev.report.accuracy,
        threshold: t,
        kept,
        first_rows,
    })
}
