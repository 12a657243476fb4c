//! The classify job: options → classifier (+ `--also` taxonomies) → reader → sink → optional
//! LLM tier and growth → run → save the grown index. The CLI, the Python binding's file path
//! and a future server all call this; none of them assembles the job itself.

use crate::grow::Growth;
use crate::index::{Exemplar, ExemplarIndex};
use crate::input::{self, InputOptions, RowReader};
use crate::llm::{LlmStats, LlmTier};
use crate::output::{Done, Existing, OutputSpec, OutputWriter};
use crate::pipeline::{self, Classifier, ClassifierOptions, NoEscalation, RunSummary, Taxonomy};
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;

/// Everything a classify run needs, resolved (flags and config file already merged).
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    pub index: PathBuf,
    pub input: PathBuf,
    /// `*.jsonl`, `*.parquet`, or a directory for a Parquet dataset.
    pub output: PathBuf,
    pub classifier: ClassifierOptions,
    /// Additional taxonomies: (name, index directory).
    pub also: Vec<(String, PathBuf)>,
    /// Columns (with pass-through columns), split, chunk size (`batch_rows`), line limit.
    pub input_options: InputOptions,
    /// Close a Parquet part after this many rows.
    pub part_rows: usize,
    pub existing: Existing,
    /// LLM tier configuration file; escalated rows stay `escalate` without one.
    pub llm: Option<PathBuf>,
    /// `--grow`: add LLM-labelled rows whose kNN confidence is at least this to the index.
    pub grow_min_confidence: Option<f32>,
}

/// What a finished classify run reports.
#[derive(Debug, Clone)]
pub struct ClassifyReport {
    pub summary: RunSummary,
    pub llm: Option<LlmStats>,
    /// Exemplars the run added to the index (`--grow`).
    pub grown: Option<usize>,
}

/// An opened classify job: the expensive parts are loaded, the output is locked, and what an
/// earlier run wrote is known; [`run`](ClassifyJob::run) does the work.
pub struct ClassifyJob {
    opts: ClassifyOptions,
    classifier: Classifier,
    reader: Box<dyn RowReader>,
    writer: OutputWriter,
    done: Done,
    tier: Option<LlmTier>,
    growth: Option<Arc<Growth>>,
}

impl ClassifyJob {
    pub fn open(opts: ClassifyOptions) -> Result<ClassifyJob> {
        let mut classifier = Classifier::open(&opts.index, &opts.classifier)?;
        for (name, dir) in &opts.also {
            let t = Taxonomy::open(name, dir, &classifier.encoder)?;
            classifier.extra.push(t);
        }
        let growth = match opts.grow_min_confidence {
            Some(min) if opts.llm.is_some() => {
                let g = Arc::new(Growth::new(classifier.encoder.dim(), min)?);
                classifier.growth = Some(g.clone());
                Some(g)
            }
            Some(_) => {
                return Err(Error::Config(
                    "--grow needs --llm: only LLM-labelled rows grow the index".into(),
                ))
            }
            None => None,
        };
        let reader = input::open(&opts.input, &opts.input_options)?;
        let mut spec = OutputSpec::new(
            opts.input_options
                .columns
                .passthrough
                .iter()
                .cloned()
                .zip(reader.passthrough_types())
                .collect(),
        );
        spec.part_rows = opts.part_rows.max(1);
        spec.taxonomies = classifier.taxonomy_columns();
        // The LLM tier first: a bad configuration or a missing key must stop the run before
        // the output is created or locked.
        let mut tier = match &opts.llm {
            Some(p) => Some(llm_tier(&classifier, p)?),
            None => None,
        };
        let (writer, done) = OutputWriter::open(&opts.output, spec, opts.existing)?;
        if let (Some(t), Some(g)) = (tier.as_mut(), &growth) {
            attach_growth(t, g.clone(), classifier.index.labels().to_vec());
        }
        Ok(ClassifyJob {
            opts,
            classifier,
            reader,
            writer,
            done,
            tier,
            growth,
        })
    }

    /// Rows an earlier run already wrote into the output (`--resume`).
    pub fn resumed_rows(&self) -> u64 {
        self.done.len()
    }

    /// Rows in the input before filtering, when cheap to know (for progress bars).
    pub fn total_rows(&self) -> Option<u64> {
        self.reader.total_rows()
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Streams the input through the classifier (and the LLM tier) into the output, then
    /// saves what `--grow` learned into the index.
    pub fn run(self, progress: &Progress) -> Result<ClassifyReport> {
        let ClassifyJob {
            opts,
            classifier,
            reader,
            writer,
            done,
            mut tier,
            growth,
        } = self;
        let sink = Box::new(writer);
        let summary = match tier.as_mut() {
            Some(t) => pipeline::run(&classifier, reader, sink, done, t, progress)?,
            None => pipeline::run(&classifier, reader, sink, done, &mut NoEscalation, progress)?,
        };
        let llm = tier.as_ref().map(|t| t.stats.clone());
        drop(tier);
        let grown = match growth {
            Some(g) => {
                // The classifier maps the index read-only; release it before writing.
                drop(classifier);
                Some(save_growth(&opts.index, &g)?)
            }
            None => None,
        };
        Ok(ClassifyReport {
            summary,
            llm,
            grown,
        })
    }
}

/// The LLM tier for a classifier's label set from a configuration file.
pub fn llm_tier(classifier: &Classifier, config: &std::path::Path) -> Result<LlmTier> {
    llm_tier_from(classifier, crate::llm::LlmConfig::load(config)?)
}

/// The LLM tier for a classifier's label set, counting tokens with its tokenizer (the CLI and
/// the Python binding both build it here).
pub fn llm_tier_from(classifier: &Classifier, cfg: crate::llm::LlmConfig) -> Result<LlmTier> {
    let tier = LlmTier::new(
        cfg,
        classifier.index.labels().to_vec(),
        classifier.encoder.token_counter(),
    )?;
    Ok(tier.with_system_turns(classifier.encoder.include_system_turns()))
}

/// Rows the LLM labels join the growth overlay (when their kNN confidence was high enough and
/// the label is in the index's schema).
pub fn attach_growth(tier: &mut LlmTier, g: Arc<Growth>, labels: Vec<String>) {
    let version = tier.prompt_version().to_string();
    tier.on_label(Box::new(move |row, v, text| {
        if row.confidence.unwrap_or(0.0) < g.min_confidence {
            return;
        }
        let (Some(label), Some(llm)) = (&row.label, &row.llm) else {
            return;
        };
        let Ok(l) = labels.binary_search(label) else {
            return;
        };
        let ex = Exemplar {
            id: row.id.clone(),
            label: label.clone(),
            source: "llm".into(),
            llm_model: Some(llm.model.clone()),
            prompt_version: Some(version.clone()),
            text: text.to_string(),
        };
        if let Err(e) = g.add(v, ex, l as u32) {
            tracing::warn!("growing the index: {e}");
        }
    }));
}

/// Writes the exemplars a run learned into the index (one journaled save); returns how many.
pub fn save_growth(index_dir: &std::path::Path, g: &Growth) -> Result<usize> {
    let (vectors, ex) = g.take();
    let n = ex.len();
    if n > 0 {
        let mut index = ExemplarIndex::open(index_dir, false)?;
        index.add(&vectors, ex)?;
        index.save()?;
    }
    Ok(n)
}
