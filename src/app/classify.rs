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
    /// `--redact`, `--show-sent`: win over the LLM configuration file.
    pub llm_overrides: crate::llm::config::Overrides,
    /// `--grow`: add LLM-labelled rows whose kNN confidence is at least this to the index.
    pub grow_min_confidence: Option<f32>,
    /// `--retry-escalated`: after the run, send every row the output holds as `escalate` (the
    /// LLM failed, was down, or there was no LLM then) to the LLM tier again and patch the
    /// answers into the output in place.
    pub retry_escalated: bool,
    /// With an audit plan (`classifier.audit`): whether tripped guards escalate their segments
    /// (otherwise they are only reported).
    pub guards: bool,
    /// A pass-through column the audit is also reported by.
    pub segment_col: Option<String>,
}

/// Where a run keeps its guards' state (beside the output, so `--resume` carries on).
pub fn guards_path(output: &std::path::Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    output.with_file_name(format!("{name}.guards.json"))
}

/// Guards for a classifier that has an LLM to answer them (escalations, and audits when
/// `classifier.audit` is set): held to the index's promise. Languages the exemplars do not
/// cover start on probation (`crate::guard`). `None` without an LLM: nothing would ever come
/// back to judge a segment by.
pub fn guards_for(
    classifier: &Classifier,
    has_llm: bool,
    enforce: bool,
    state: Option<&std::path::Path>,
) -> Result<Option<Arc<crate::guard::Guards>>> {
    if !has_llm {
        return Ok(None);
    }
    let target = classifier
        .index
        .manifest
        .decision
        .calibration
        .as_ref()
        .and_then(|c| c.promised_accuracy())
        .unwrap_or(crate::calibrate::DEFAULT_TARGET);
    let options = crate::guard::GuardOptions {
        target,
        llm_accuracy: classifier.audit.and_then(|a| a.llm_accuracy).unwrap_or(1.0),
        enforce,
        ..Default::default()
    };
    let guards = match state {
        Some(p) => crate::guard::Guards::load_or_new(p, options)?,
        None => crate::guard::Guards::new(options),
    };
    Ok(Some(Arc::new(
        guards.cover(&classifier.index.exemplar_language_counts()),
    )))
}

/// What a finished classify run reports.
#[derive(Debug, Clone)]
pub struct ClassifyReport {
    pub summary: RunSummary,
    pub llm: Option<LlmStats>,
    /// Exemplars the run added to the index (`--grow`).
    pub grown: Option<usize>,
    /// `--retry-escalated`: what the second pass did.
    pub retried: Option<RetryReport>,
}

/// What `--retry-escalated` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RetryReport {
    /// Rows the output held as `escalate`.
    pub escalated: usize,
    /// Of those, found in the input and sent to the LLM tier again.
    pub sent: usize,
    /// Now labelled by the LLM.
    pub labelled: usize,
    pub llm: Option<LlmStats>,
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
        if opts.retry_escalated && (opts.llm.is_none() || opts.existing != Existing::Resume) {
            return Err(Error::Config(
                "--retry-escalated needs --resume (it works on an existing output) and --llm"
                    .into(),
            ));
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
        if classifier.audit.is_some() && opts.llm.is_none() {
            return Err(Error::Config(
                "--audit-rate needs --llm: audited rows are asked of the LLM".into(),
            ));
        }
        if let Some(col) = &opts.segment_col {
            classifier.audit_segment = Some(
                opts.input_options
                    .columns
                    .passthrough
                    .iter()
                    .position(|c| c == col)
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "--segment-col {col}: name it in --passthrough too (the audit reads it from the output's pass-through columns)"
                        ))
                    })?,
            );
        }
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
            Some(p) => {
                let cfg = crate::llm::LlmConfig::load_with(p, &opts.llm_overrides)?;
                classifier.redact_input = cfg.input_redactor()?;
                Some(llm_tier_from(&classifier, cfg)?)
            }
            None => None,
        };
        let (writer, done) = OutputWriter::open(&opts.output, spec, opts.existing)?;
        // After the output is locked: the guards' state belongs to it.
        let state = guards_path(&opts.output);
        if opts.existing != Existing::Resume {
            let _ = std::fs::remove_file(&state);
        }
        classifier.guards = guards_for(&classifier, tier.is_some(), opts.guards, Some(&state))?;
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
        if let Some(g) = &classifier.guards {
            g.save(&guards_path(&opts.output))?;
        }
        let retried = if opts.retry_escalated {
            Some(retry_escalated(&opts, &classifier)?)
        } else {
            None
        };
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
            retried,
        })
    }
}

/// Sends the rows an output holds as `escalate` to the LLM tier again and patches the answers
/// into the output (each file replaced atomically; rows the LLM still cannot label keep
/// `escalate` with the new reason). Safe to kill and rerun: a patched row is no longer
/// `escalate`, and the response cache makes answers already paid for free.
fn retry_escalated(opts: &ClassifyOptions, classifier: &Classifier) -> Result<RetryReport> {
    use crate::output::{read_stored_rows, Patch};
    use crate::row::DecidedBy;
    let _lock = crate::output::PathLock::acquire(&opts.output)?;
    let escalated: std::collections::HashSet<String> = read_stored_rows(&opts.output)?
        .into_iter()
        .filter(|(_, r)| r.decided_by == DecidedBy::Escalate.as_str())
        .map(|(id, _)| id)
        .collect();
    let mut report = RetryReport {
        escalated: escalated.len(),
        ..Default::default()
    };
    if escalated.is_empty() {
        return Ok(report);
    }
    let mut tier = llm_tier(
        classifier,
        opts.llm.as_deref().expect("checked in open"),
        &opts.llm_overrides,
    )?;
    let forced_classifier = Classifier::open(
        &opts.index,
        &ClassifierOptions {
            threshold: Some(f32::INFINITY),
            ..opts.classifier.clone()
        },
    )?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<crate::row::OutputRow>>(64);
    let collector = std::thread::spawn(move || rx.iter().flatten().collect::<Vec<_>>());
    let mut reader = input::open(&opts.input, &opts.input_options)?;
    let mut seen = std::collections::HashSet::new();
    let mut sent = 0usize;
    let groups = std::iter::from_fn(|| loop {
        let batch = match reader.next_batch() {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let rows: Vec<_> = batch
            .into_iter()
            .filter(|r| escalated.contains(&r.id) && seen.insert(r.id.clone()))
            .collect();
        if rows.is_empty() {
            continue;
        }
        // Every one of them goes to the LLM (the classifier escalates everything): they were
        // escalated before, and the question now is only what the LLM says.
        return Some(forced_classifier.classify(rows).map(|c| {
            let forced: Vec<_> = c.into_iter().filter(|c| c.content.is_some()).collect();
            sent += forced.len();
            forced
        }));
    });
    let done = tier.submit_all(groups, &tx);
    report.sent = sent;
    drop(tx);
    let answers = collector
        .join()
        .map_err(|_| Error::Internal("the retry collector panicked".into()))?;
    let mut patches = std::collections::HashMap::new();
    for r in answers {
        let p = match (&r.decided_by, r.label, r.llm) {
            (DecidedBy::Llm, Some(label), Some(llm)) => Patch::Llm { label, llm },
            _ => Patch::Error(
                r.error
                    .unwrap_or_else(|| "the LLM gave no label on retry".to_string()),
            ),
        };
        patches.insert(r.id, p);
    }
    report.labelled = patches
        .values()
        .filter(|p| matches!(p, Patch::Llm { .. }))
        .count();
    // What was answered is kept even when the tier stopped (a refused key mid-way).
    crate::output::patch_escalated_in_place(&opts.output, |id| patches.get(id).cloned())?;
    report.llm = Some(tier.stats.clone());
    done.map(|()| report)
}

/// The LLM tier for a classifier's label set from a configuration file.
pub fn llm_tier(
    classifier: &Classifier,
    config: &std::path::Path,
    overrides: &crate::llm::config::Overrides,
) -> Result<LlmTier> {
    llm_tier_from(
        classifier,
        crate::llm::LlmConfig::load_with(config, overrides)?,
    )
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
/// the label is in the index's schema). Rows escalated for their language never do: the
/// encoder does not cover it, so their vectors would be misplaced exemplars.
pub fn attach_growth(tier: &mut LlmTier, g: Arc<Growth>, labels: Vec<String>) {
    let version = tier.prompt_version().to_string();
    tier.on_label(Box::new(move |row, v, text| {
        if row.confidence.unwrap_or(0.0) < g.min_confidence
            || row.escalate_reason == Some(crate::row::EscalateReason::Language)
        {
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

/// Writes the exemplars a run learned into the index (a staged copy swapped in whole:
/// [`crate::index::update`]); returns how many. When the save fails they stay in the overlay,
/// so a later save (the next reload, the shutdown) still has them.
pub fn save_growth(index_dir: &std::path::Path, g: &Growth) -> Result<usize> {
    let grown = g.take()?;
    let n = grown.exemplars.len();
    if n == 0 {
        return Ok(0);
    }
    let saved = crate::index::update(index_dir, |stage| {
        let mut index = ExemplarIndex::open(stage, false)?;
        // The overlay holds the vectors the vote searched with: already in the index's space.
        index.add_placed(&grown.vectors, grown.exemplars.clone())?;
        index.save()
    });
    match saved {
        Ok(()) => Ok(n),
        Err(e) => {
            g.restore(grown);
            Err(e)
        }
    }
}
