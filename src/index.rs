//! The exemplar index: a directory holding a usearch index (cosine, f32), the exemplars' ids,
//! labels and provenance (Parquet), and a manifest that ties the index to the model that made
//! its vectors. Opening checks the manifest against the embedder and refuses a mismatch.
//!
//! Layout: `manifest.json`, `vectors.usearch`, `exemplars.parquet` (+ optional files that later
//! stages add, such as a trained head). Saves are atomic per file (write, fsync, rename), the
//! manifest last, and opening cross-checks counts, so an interrupted save is detected.
//! This module must never embed text or decide labels.

use crate::fsio::{commit, sha256_file, sync_dir, sync_file};
use crate::model::{ModelFiles, Pooling};
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

pub const MANIFEST: &str = "manifest.json";
pub const VECTORS: &str = "vectors.usearch";
pub const EXEMPLARS: &str = "exemplars.parquet";
const FORMAT_VERSION: u32 = 1;
/// Up to this many exemplars, search is exact (brute force): deterministic, and cheaper than
/// embedding the query itself (100k × 384 multiply-adds versus ~10M per token).
pub const EXACT_SEARCH_LIMIT: usize = 100_000;
/// A batch of searches is exact only while (queries × exemplars) stays under this: brute
/// force over a whole index for every one of its own exemplars (calibration) is quadratic —
/// 50k exemplars took two minutes that way — where the graph answers in a few milliseconds.
pub const EXACT_SEARCH_PAIRS: usize = 250_000_000;
/// Exemplar text kept for LLM few-shot prompts and for humans reading the index.
const MAX_STORED_TEXT: usize = 2000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    pub weights_sha256: String,
    pub dims: usize,
    pub pooling: Pooling,
    pub max_tokens: usize,
    /// Absolute folder the model was loaded from at build time: a hint for processes that
    /// run elsewhere (Spark workers); the digest is checked whatever folder is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_dir: Option<String>,
    /// Set when the encoder was fine-tuned on this index's exemplars (`semtel tune`): its
    /// folder inside the index directory and the model it started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuned: Option<TunedInfo>,
    /// The fast engine's arithmetic the vectors were made with (absent: bf16). Queries use
    /// the same unless the user says otherwise (with a warning).
    #[serde(default, skip_serializing_if = "crate::index::is_bf16")]
    pub precision: crate::embed::Precision,
}

fn is_bf16(p: &crate::embed::Precision) -> bool {
    *p == crate::embed::Precision::Bf16
}

/// A fine-tuned encoder stored with its index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TunedInfo {
    /// Folder (relative to the index directory) holding the tuned model.
    pub dir: String,
    pub base_id: String,
    pub base_weights_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_source_dir: Option<String>,
    pub loss: String,
    pub epochs: usize,
    pub lr: f64,
    pub steps: usize,
    /// Held-out kNN accuracy of the frozen encoder and of the chosen candidate (the search).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuned_accuracy: Option<f64>,
    pub seconds: f64,
    /// Share of exemplar ids (chosen by [`in_calibration_fold`]) the final run never trained
    /// on, so that cross-validated calibration scores only rows the encoder has not seen; 0
    /// when it trained on every exemplar (calibrate such an index on held-out rows).
    #[serde(default)]
    pub calibration_share: f64,
}

/// Whether exemplar `id` belongs to a tuned index's calibration fold (a fixed hash of the id,
/// so the fold survives `index add` and reopening).
pub fn in_calibration_fold(id: &str, share: f64) -> bool {
    let h = crate::hash::group_key(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < share
}

impl ModelInfo {
    pub fn of(files: &ModelFiles, dims: usize) -> Self {
        ModelInfo {
            id: files.id.clone(),
            weights_sha256: files.weights_sha256.clone(),
            dims,
            pooling: files.pooling,
            max_tokens: files.max_tokens,
            source_dir: std::fs::canonicalize(&files.dir)
                .ok()
                .map(|p| p.display().to_string()),
            tuned: None,
            precision: crate::embed::Precision::Bf16,
        }
    }

    /// [`ModelInfo::of`] the encoder's files, with the precision it runs.
    pub fn of_encoder(encoder: &crate::embed::Encoder) -> Self {
        ModelInfo {
            precision: encoder.precision,
            ..Self::of(&encoder.files, encoder.dim())
        }
    }
}

/// The model to load for an index when none is named: the tuned encoder stored in the index
/// (`semtel tune`), else `$SEMTEL_MODEL`, else the folder the index was built from (when this
/// machine has it), else its id (a folder under `models/`, or a Hugging Face id in the local
/// hf-hub cache). The one place this rule lives.
pub fn default_model(index_dir: &Path, m: &ModelInfo) -> String {
    if let Some(t) = &m.tuned {
        return index_dir.join(&t.dir).display().to_string();
    }
    base_model(m)
}

/// The rule of [`default_model`] for an untuned model description.
pub fn base_model(m: &ModelInfo) -> String {
    std::env::var("SEMTEL_MODEL")
        .ok()
        .or_else(|| {
            m.source_dir
                .clone()
                .filter(|d| Path::new(d).join("config.json").is_file())
        })
        .unwrap_or_else(|| m.id.clone())
}

/// Parameters recorded at build time.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct BuildInfo {
    pub sources: Vec<String>,
    pub split: Option<String>,
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
    pub include_system_turns: bool,
    /// Each labelled row carries a set of labels (stored as one exemplar per label).
    #[serde(default)]
    pub multi_label: bool,
}

/// How `classify` turns neighbours into a decision; calibration rewrites it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecisionConfig {
    pub k: usize,
    /// Rows whose confidence is below this are escalated.
    pub threshold: f32,
    /// Per-label thresholds (label → threshold) that override `threshold`.
    #[serde(default)]
    pub per_label: BTreeMap<String, f32>,
    /// Which confidence signal the thresholds apply to.
    #[serde(default)]
    pub signal: DecisionSignal,
    /// How the thresholds were chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// Multi-label indexes calibrated with the one-vs-rest head: each label's cut and the
    /// probabilities at which its in/out verdicts are kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_rules: BTreeMap<String, crate::multilabel::LabelRule>,
    /// The novelty rule (`crate::novelty`), fitted on the exemplars by calibration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub novelty: Option<crate::novelty::NoveltyConfig>,
}

/// The confidence signal an index's thresholds apply to: one of the single-label signals, or
/// the multi-label vote. Stored as its name (`vote_sim`, `head_knn`, …, `multi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionSignal {
    Single(crate::decide::Signal),
    MultiVote,
    /// The one-vs-rest head with per-label rules (`semtel calibrate` on a multi-label index).
    MultiHead,
}

impl Default for DecisionSignal {
    fn default() -> Self {
        DecisionSignal::Single(crate::decide::Signal::default())
    }
}

impl DecisionSignal {
    pub fn name(&self) -> &'static str {
        match self {
            DecisionSignal::Single(s) => s.name(),
            DecisionSignal::MultiVote => "multi",
            DecisionSignal::MultiHead => "multi_head",
        }
    }
    /// The single-label signal, or `None` for a multi-label index.
    pub fn single(&self) -> Option<crate::decide::Signal> {
        match self {
            DecisionSignal::Single(s) => Some(*s),
            DecisionSignal::MultiVote | DecisionSignal::MultiHead => None,
        }
    }
}

impl Serialize for DecisionSignal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for DecisionSignal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "multi" => return Ok(DecisionSignal::MultiVote),
            "multi_head" => return Ok(DecisionSignal::MultiHead),
            _ => {}
        }
        s.parse()
            .map(DecisionSignal::Single)
            .map_err(serde::de::Error::custom)
    }
}

/// How an index's thresholds were chosen (recorded in the manifest).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Calibration {
    /// `semtel calibrate`: the full report.
    Calibrated(CalibrationReport),
    /// `index build` / `index add`: leave-one-out over the exemplars.
    LeaveOneOut(LeaveOneOut),
    /// `semtel calibrate` on a multi-label index.
    Multi(MultiCalibrationReport),
}

/// One head tried by multi-label calibration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadVariant {
    pub word_pieces: bool,
    pub micro_f1: f64,
}

/// What `semtel calibrate` chose for a multi-label index, and what it measured on the rows it
/// chose by (out-of-fold predictions of the exemplar rows, or held-out labelled rows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MultiCalibrationReport {
    pub method: String,
    pub rows: usize,
    pub target_precision: f64,
    /// Micro-F1 of the head with and without the word-piece features; the better is kept.
    #[serde(default)]
    pub head_variants: Vec<HeadVariant>,
    /// The plain kNN vote (labels with at least half the neighbours' weight).
    pub vote: crate::multilabel::SetMetrics,
    /// The one-vs-rest head with the chosen cuts.
    pub head: crate::multilabel::SetMetrics,
    pub kept: crate::multilabel::KeptVerdicts,
    /// Labels with too few rows to choose a cut for (they take the pooled one).
    pub labels_default_cut: Vec<String>,
    /// Labels none of whose "in" verdicts is sure enough to keep.
    pub labels_never_kept: Vec<String>,
}

impl Calibration {
    /// The kept accuracy the calibration promises (its target), when it had one.
    pub fn promised_accuracy(&self) -> Option<f64> {
        match self {
            Calibration::Calibrated(r) => r.target_kept_accuracy,
            Calibration::LeaveOneOut(l) => Some(l.target_kept_accuracy),
            Calibration::Multi(r) => Some(r.target_precision),
        }
    }

    /// True for the automatic single-label leave-one-out calibration, which `index add`
    /// redoes after adding exemplars (a `semtel calibrate` result is kept as it is).
    pub fn is_automatic_single_label(&self) -> bool {
        matches!(self, Calibration::LeaveOneOut(l) if l.method == LeaveOneOut::SINGLE)
    }
}

/// The automatic calibration of `index build`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaveOneOut {
    pub expected_coverage: f64,
    pub k: usize,
    pub method: String,
    pub rows: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    pub target_kept_accuracy: f64,
}

impl LeaveOneOut {
    pub const SINGLE: &'static str = "leave-one-out over exemplars";
    pub const MULTI: &'static str = "leave-one-out over exemplar rows (exact label set)";
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalReport {
    pub signal: String,
    pub aurc: f64,
    pub accuracy: f64,
    /// Share kept at the target kept-accuracy on the calibration rows (no per-label tuning).
    pub coverage_at_target: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct Interval {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CalibrationReport {
    pub method: String,
    pub rows: usize,
    pub signal: String,
    pub signals: Vec<SignalReport>,
    pub target_kept_accuracy: Option<f64>,
    pub budget: Option<f64>,
    pub per_label: bool,
    /// Threshold on the calibrated score every row's score is compared with.
    pub calibrated_threshold: f64,
    pub expected_coverage: Interval,
    pub expected_kept_accuracy: Interval,
    /// Labels whose raw threshold ended stricter / looser than the global one.
    pub stricter_labels: usize,
    pub looser_labels: usize,
}

impl Default for DecisionConfig {
    fn default() -> Self {
        DecisionConfig {
            k: 10,
            threshold: 0.4,
            per_label: BTreeMap::new(),
            signal: DecisionSignal::default(),
            calibration: None,
            label_rules: BTreeMap::new(),
            novelty: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub semtel_version: String,
    pub model: ModelInfo,
    pub metric: String,
    pub scalar: String,
    pub count: usize,
    /// Sorted label set.
    pub labels: Vec<String>,
    pub build: BuildInfo,
    pub decision: DecisionConfig,
    /// sha256 of each data file (name → hex digest), verified when the index is opened: a
    /// damaged file is refused instead of silently changing labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
    /// Per-language centring of the vectors (`crate::center`); absent: the model's own vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub centering: Option<crate::center::Centering>,
}

/// Where an exemplar's label came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    pub id: String,
    pub label: String,
    /// `gold` for labelled input, `llm` for labels learned during a run.
    pub source: String,
    pub llm_model: Option<String>,
    pub prompt_version: Option<String>,
    pub text: String,
}

pub struct ExemplarIndex {
    dir: PathBuf,
    pub manifest: Manifest,
    index: usearch::Index,
    /// Indexed by key (keys are dense, 0..count).
    exemplars: Vec<Exemplar>,
    /// Label of each exemplar as an index into `manifest.labels`.
    label_of: Vec<u32>,
    read_only: bool,
}

/// The detected language of each exemplar's text (`None` where it cannot be told).
fn exemplar_languages(exemplars: &[Exemplar]) -> Vec<Option<&'static str>> {
    exemplars
        .par_iter()
        .map(|e| {
            crate::lang::detect(&crate::conversation::Content::Text(e.text.clone())).map(|d| d.code)
        })
        .collect()
}

fn new_usearch(dims: usize, b: &BuildInfo) -> Result<usearch::Index> {
    let opts = IndexOptions {
        dimensions: dims,
        metric: MetricKind::Cos,
        // f32 explicitly: the default quantizes to bf16, which perturbs scores.
        quantization: ScalarKind::F32,
        connectivity: b.connectivity,
        expansion_add: b.expansion_add,
        expansion_search: b.expansion_search,
        multi: false,
    };
    usearch::Index::new(&opts).map_err(|e| Error::vector_index("creating the index", e))
}

impl ExemplarIndex {
    /// A new, empty index in `dir` (which must not hold an index already).
    pub fn create(dir: &Path, model: ModelInfo, build: BuildInfo) -> Result<Self> {
        if dir.join(MANIFEST).exists() {
            return Err(Error::index(
                dir,
                "an index already exists here; use `semtel index add` to extend it or choose another --out",
            ));
        }
        let mut build = build;
        if build.connectivity == 0 {
            build.connectivity = 16;
        }
        if build.expansion_add == 0 {
            build.expansion_add = 128;
        }
        if build.expansion_search == 0 {
            build.expansion_search = 128;
        }
        let index = new_usearch(model.dims, &build)?;
        Ok(ExemplarIndex {
            dir: dir.to_path_buf(),
            manifest: Manifest {
                format_version: FORMAT_VERSION,
                semtel_version: crate::VERSION.to_string(),
                model,
                metric: "cos".into(),
                scalar: "f32".into(),
                count: 0,
                labels: Vec::new(),
                build,
                decision: DecisionConfig::default(),
                checksums: BTreeMap::new(),
                centering: None,
            },
            index,
            exemplars: Vec::new(),
            label_of: Vec::new(),
            read_only: false,
        })
    }

    /// Reads and checks an index's manifest only (finishing an interrupted save first): for
    /// callers that need its settings before deciding how to open it. Does not verify the data
    /// files; [`open`](Self::open) does.
    pub fn read_manifest(dir: &Path) -> Result<Manifest> {
        recover_swap(dir)?;
        recover_save(dir)?;
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::index(
                    dir,
                    "no manifest.json: not a semtel index (build one with `semtel index build`)",
                )
            } else {
                Error::io(&mpath, e)
            }
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::index(
                dir,
                format!("manifest.json is not valid ({e}); rebuild the index"),
            )
        })?;
        if manifest.format_version > FORMAT_VERSION {
            return Err(Error::index(
                dir,
                format!(
                    "index format {} is newer than this semtel ({}) understands; upgrade semtel",
                    manifest.format_version, FORMAT_VERSION
                ),
            ));
        }
        if manifest.decision.k == 0 {
            return Err(Error::index(
                dir,
                "manifest.json has decision.k = 0; set it to the number of neighbours to vote (10 is the default) or rebuild the index",
            ));
        }
        Ok(manifest)
    }

    /// Opens an index. `read_only` refuses later additions (the serving and classifying
    /// paths); otherwise exemplars can be added and saved.
    ///
    /// The vectors are always read into memory the process owns, never memory-mapped: a
    /// mapping of a file that something later truncates or overwrites in place (`cp` of a new
    /// index over the old one, a half-finished copy) ends the process with SIGBUS on the next
    /// search, and a served index must survive whatever happens to its files. The cost is the
    /// vectors' size in resident memory per process (dims × 4 bytes per exemplar plus the
    /// graph: 10,003 MiniLM exemplars ≈ 17 MB).
    pub fn open(dir: &Path, read_only: bool) -> Result<Self> {
        let manifest = Self::read_manifest(dir)?;
        verify_checksums(dir, &manifest)?;
        let vpath = dir.join(VECTORS);
        let vpath_s = vpath.to_string_lossy().to_string();
        let index = usearch::Index::restore(&vpath_s).map_err(|e| {
            Error::index(
                dir,
                format!("cannot read {VECTORS} ({e}); rebuild the index"),
            )
        })?;
        let exemplars = read_exemplars(&dir.join(EXEMPLARS))?;
        if index.size() != manifest.count || exemplars.len() != manifest.count {
            return Err(Error::index(
                dir,
                format!(
                    "inconsistent index: manifest says {} exemplars, vectors hold {}, exemplars.parquet holds {} (an interrupted save?); rebuild it",
                    manifest.count,
                    index.size(),
                    exemplars.len()
                ),
            ));
        }
        let label_pos: std::collections::HashMap<&str, u32> = manifest
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i as u32))
            .collect();
        let label_of = exemplars
            .iter()
            .map(|e| {
                label_pos.get(e.label.as_str()).copied().ok_or_else(|| {
                    Error::index(
                        dir,
                        format!("label `{}` missing from the manifest; rebuild", e.label),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let threads = rayon::current_num_threads().max(1);
        index
            .reserve_capacity_and_threads(index.size().max(1), threads)
            .map_err(|e| Error::index(dir, e.to_string()))?;
        Ok(ExemplarIndex {
            dir: dir.to_path_buf(),
            manifest,
            index,
            exemplars,
            label_of,
            read_only,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index now lives at `dir` (an [`IndexUpdate`] committed its stage there).
    pub fn moved_to(&mut self, dir: &Path) {
        self.dir = dir.to_path_buf();
    }

    pub fn len(&self) -> usize {
        self.exemplars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exemplars.is_empty()
    }

    pub fn labels(&self) -> &[String] {
        &self.manifest.labels
    }

    pub fn exemplar(&self, key: u64) -> &Exemplar {
        &self.exemplars[key as usize]
    }

    /// How many exemplars the language detector gives each language (`und`: none told).
    pub fn exemplar_language_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for l in exemplar_languages(&self.exemplars) {
            *m.entry(l.unwrap_or("und").to_string()).or_insert(0) += 1;
        }
        m
    }

    pub fn exemplars(&self) -> &[Exemplar] {
        &self.exemplars
    }

    /// Label index (into [`labels`](Self::labels)) of every exemplar, by key.
    pub fn label_indices(&self) -> &[u32] {
        &self.label_of
    }

    /// Refuses to pair this index with vectors from another model.
    pub fn check_model(&self, files: &ModelFiles, dims: usize) -> Result<()> {
        let m = &self.manifest.model;
        // (source_dir is a location hint, not part of the identity)
        if m.weights_sha256 != files.weights_sha256 || m.dims != dims || m.pooling != files.pooling
        {
            if let Some(t) = &m.tuned {
                return Err(Error::index(
                    &self.dir,
                    format!(
                        "its encoder was fine-tuned (`semtel tune`) and lives in {}; drop --model (and SEMTEL_MODEL does not apply) so the tuned model is used, or rebuild the index for `{}`",
                        self.dir.join(&t.dir).display(),
                        files.id
                    ),
                ));
            }
            return Err(Error::index(
                &self.dir,
                format!(
                    "built with model `{}` (weights sha256 {}…, {} dims, {:?} pooling) but the loaded model is `{}` (sha256 {}…, {dims} dims, {:?} pooling); pass --model {} or rebuild the index with this model",
                    m.id,
                    &m.weights_sha256[..m.weights_sha256.len().min(12)],
                    m.dims,
                    m.pooling,
                    files.id,
                    &files.weights_sha256[..files.weights_sha256.len().min(12)],
                    files.pooling,
                    m.id
                ),
            ));
        }
        Ok(())
    }

    /// Adds exemplars with their model vectors (L2-normalised, `vectors.len() == n * dims`),
    /// centred first when the index is ([`center_languages`](Self::center_languages)).
    pub fn add(&mut self, vectors: &[f32], exemplars: Vec<Exemplar>) -> Result<()> {
        match &self.manifest.centering {
            Some(c) if vectors.len() == exemplars.len() * c.dims() => {
                let langs = exemplar_languages(&exemplars);
                let mut v = vectors.to_vec();
                c.place_exemplars(&mut v, &langs);
                self.add_placed(&v, exemplars)
            }
            _ => self.add_placed(vectors, exemplars),
        }
    }

    /// Adds exemplars whose vectors are already in the index's space (what a query's
    /// [`query_space`](Self::query_space) made: the exemplars a run learned).
    pub fn add_placed(&mut self, vectors: &[f32], exemplars: Vec<Exemplar>) -> Result<()> {
        if self.read_only {
            return Err(Error::index(
                &self.dir,
                "opened read-only; reopen for writing to add exemplars",
            ));
        }
        let d = self.manifest.model.dims;
        if vectors.len() != exemplars.len() * d {
            return Err(Error::Internal(format!(
                "{} vectors of {d} dims for {} exemplars",
                vectors.len() / d.max(1),
                exemplars.len()
            )));
        }
        // Grow the label set, keeping it sorted, and remap existing label indices.
        let mut labels = self.manifest.labels.clone();
        for e in &exemplars {
            if let Err(pos) = labels.binary_search(&e.label) {
                labels.insert(pos, e.label.clone());
            }
        }
        if labels != self.manifest.labels {
            let old = std::mem::replace(&mut self.manifest.labels, labels);
            for l in self.label_of.iter_mut() {
                *l = self
                    .manifest
                    .labels
                    .binary_search(&old[*l as usize])
                    .unwrap() as u32;
            }
        }
        let start = self.exemplars.len();
        let threads = rayon::current_num_threads().max(1);
        // Reserve ahead (with headroom) and with a slot per thread: usearch refuses concurrent
        // adds without them.
        let need = start + exemplars.len();
        if need > self.index.capacity() {
            self.index
                .reserve_capacity_and_threads(need.max(self.index.capacity() * 2), threads)
                .map_err(|e| Error::index(&self.dir, e.to_string()))?;
        }
        vectors
            .par_chunks(d)
            .enumerate()
            .try_for_each(|(j, v)| self.index.add((start + j) as u64, v))
            .map_err(|e| Error::index(&self.dir, format!("usearch add: {e}")))?;
        for e in exemplars {
            self.label_of
                .push(self.manifest.labels.binary_search(&e.label).unwrap() as u32);
            let mut e = e;
            truncate_chars(&mut e.text, MAX_STORED_TEXT);
            self.exemplars.push(e);
        }
        self.manifest.count = self.exemplars.len();
        Ok(())
    }

    /// The `k` most similar exemplars of each query (`queries.len() == n * dims`), as
    /// (key, cosine similarity), best first.
    pub fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(u64, f32)>>> {
        let d = self.manifest.model.dims;
        let exact = self.len() <= EXACT_SEARCH_LIMIT
            && (queries.len() / d.max(1)).saturating_mul(self.len()) <= EXACT_SEARCH_PAIRS;
        let k = k.min(self.len());
        queries
            .par_chunks(d)
            .map(|q| {
                let m = if exact {
                    self.index.exact_search(q, k)
                } else {
                    self.index.search(q, k)
                }
                .map_err(|e| Error::index(&self.dir, format!("search: {e}")))?;
                let n = self.len() as u64;
                if let Some(&bad) = m.keys.iter().find(|&&key| key >= n) {
                    // Only a damaged vectors file (or a bug) can produce this; never index past
                    // the exemplars with it.
                    return Err(Error::index(
                        &self.dir,
                        format!("search returned key {bad} but the index holds {n} exemplars: {VECTORS} is damaged; rebuild the index"),
                    ));
                }
                Ok(m.keys
                    .iter()
                    .zip(&m.distances)
                    .map(|(&key, &dist)| (key, 1.0 - dist))
                    .collect())
            })
            .collect()
    }

    /// Centres every exemplar's vector per language (`crate::center`) and records the means in
    /// the manifest. The vectors must be the model's own (an index not centred yet).
    pub fn center_languages(&mut self) -> Result<()> {
        if self.manifest.centering.is_some() {
            return Ok(());
        }
        let d = self.manifest.model.dims;
        let mut v = self.vectors()?;
        let langs = exemplar_languages(&self.exemplars);
        let c = crate::center::Centering::fit(&v, d, &langs);
        c.place_exemplars(&mut v, &langs);
        self.rebuild(&v, d)?;
        self.manifest.centering = Some(c);
        Ok(())
    }

    /// The space queries are searched in: `None` for an index of the model's own vectors.
    pub fn query_space(&self) -> Option<crate::center::QuerySpace> {
        self.manifest
            .centering
            .clone()
            .map(crate::center::QuerySpace::new)
    }

    /// Replaces every exemplar's vector (key order, `len() * dims` model vectors) and the model
    /// that made them: what re-embedding with a tuned encoder does. A centred index is centred
    /// again with means fitted on the new vectors. Not saved until [`save`](Self::save).
    pub fn replace_vectors(&mut self, vectors: &[f32], model: ModelInfo) -> Result<()> {
        if self.read_only {
            return Err(Error::index(
                &self.dir,
                "opened read-only; reopen for writing",
            ));
        }
        if model.dims == 0 || vectors.len() != self.len() * model.dims {
            return Err(Error::Internal(format!(
                "{} values for {} exemplars of {} dims",
                vectors.len(),
                self.len(),
                model.dims
            )));
        }
        let centred = self.manifest.centering.take().is_some();
        self.rebuild(vectors, model.dims)?;
        self.manifest.model = model;
        if centred {
            self.center_languages()?;
        }
        Ok(())
    }

    /// A new graph holding `vectors` (key order) in place of the old one.
    fn rebuild(&mut self, vectors: &[f32], dims: usize) -> Result<()> {
        let index = new_usearch(dims, &self.manifest.build)?;
        index
            .reserve_capacity_and_threads(self.len().max(1), rayon::current_num_threads().max(1))
            .map_err(|e| Error::index(&self.dir, e.to_string()))?;
        vectors
            .par_chunks(dims)
            .enumerate()
            .try_for_each(|(j, v)| index.add(j as u64, v))
            .map_err(|e| Error::index(&self.dir, format!("usearch add: {e}")))?;
        self.index = index;
        Ok(())
    }

    /// Copies out all vectors in key order (`len() * dims` values).
    pub fn vectors(&self) -> Result<Vec<f32>> {
        let keys: Vec<usize> = (0..self.len()).collect();
        self.vectors_of(&keys)
    }

    /// Copies out the vectors of `keys`, in that order.
    pub fn vectors_of(&self, keys: &[usize]) -> Result<Vec<f32>> {
        let d = self.manifest.model.dims;
        let mut out = vec![0f32; keys.len() * d];
        out.par_chunks_mut(d)
            .zip(keys)
            .try_for_each(|(buf, &key)| self.index.get(key as u64, buf).map(|_| ()))
            .map_err(|e| Error::index(&self.dir, format!("reading vectors: {e}")))?;
        Ok(out)
    }

    /// Writes every file of the index as one atomic step: all files are written to `.tmp`
    /// names and synced, then a `SAVING` journal marker is written, then the files are renamed
    /// into place (the manifest last) and the marker removed. A crash before the marker leaves
    /// the old index; after it, the next open finishes the renames ([`recover_save`]).
    pub fn save(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let _lock = crate::fsio::PathLock::acquire(&self.dir)?;
        let vtmp = self.dir.join(format!("{VECTORS}.tmp"));
        self.index
            .save(&vtmp.to_string_lossy())
            .map_err(|e| Error::index(&self.dir, format!("saving vectors: {e}")))?;
        let etmp = self.dir.join(format!("{EXEMPLARS}.tmp"));
        write_exemplars(&etmp, &self.exemplars)?;
        for (name, tmp) in [(VECTORS, &vtmp), (EXEMPLARS, &etmp)] {
            sync_file(tmp)?;
            self.manifest
                .checksums
                .insert(name.to_string(), sha256_file(tmp)?);
        }
        self.refresh_head_checksums()?;
        let mtmp = self.write_manifest_tmp()?;
        let marker = self.dir.join(SAVE_MARKER);
        std::fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&marker, e))?;
        sync_dir(&self.dir);
        for (tmp, name) in [(&vtmp, VECTORS), (&etmp, EXEMPLARS), (&mtmp, MANIFEST)] {
            std::fs::rename(tmp, self.dir.join(name)).map_err(|e| Error::io(tmp, e))?;
            crate::failpoint::hit("index-save");
        }
        sync_dir(&self.dir);
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
        Ok(())
    }

    /// Rewrites only the manifest (decision settings changed, a head trained, say).
    pub fn save_manifest(&mut self) -> Result<()> {
        self.refresh_head_checksums()?;
        let mtmp = self.write_manifest_tmp()?;
        commit(&mtmp, &self.dir.join(MANIFEST))
    }

    /// The learned head's files are written by `semtel calibrate` next to the index; their
    /// digests join the manifest whenever it is written.
    fn refresh_head_checksums(&mut self) -> Result<()> {
        for name in [crate::head::HEAD_FILE, crate::head::HEAD_META] {
            let p = self.dir.join(name);
            if p.is_file() {
                self.manifest
                    .checksums
                    .insert(name.to_string(), sha256_file(&p)?);
            } else {
                self.manifest.checksums.remove(name);
            }
        }
        Ok(())
    }

    fn write_manifest_tmp(&self) -> Result<PathBuf> {
        let mtmp = self.dir.join(format!("{MANIFEST}.tmp"));
        let json = serde_json::to_string_pretty(&self.manifest)
            .map_err(|e| Error::index(&self.dir, format!("manifest: {e}")))?;
        std::fs::write(&mtmp, json).map_err(|e| Error::io(&mtmp, e))?;
        sync_file(&mtmp)?;
        Ok(mtmp)
    }
}

/// Journal marker of an index save in progress (see [`ExemplarIndex::save`]).
pub const SAVE_MARKER: &str = "SAVING";

/// Finishes an index save that a crash interrupted after its journal marker was written.
fn recover_save(dir: &Path) -> Result<()> {
    let marker = dir.join(SAVE_MARKER);
    if !marker.exists() {
        return Ok(());
    }
    for name in [VECTORS, EXEMPLARS, MANIFEST] {
        let tmp = dir.join(format!("{name}.tmp"));
        match std::fs::rename(&tmp, dir.join(name)) {
            Ok(()) => {}
            // Renamed before the crash (or by a concurrent opener): nothing to do.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    }
    sync_dir(dir);
    match std::fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&marker, e)),
    }
}

/// A rewrite of an index directory that leaves either the old index or the new one at its
/// path, whatever fails or crashes in between — never neither, never a mix.
///
/// The command works in a staging directory beside the index (`.NAME.staging-PID-N`): for an
/// existing index it starts as a copy whose files are hard links of the originals (every index
/// writer replaces files by rename, so writing the stage never changes a file the old index
/// uses), for a new one it starts empty. [`commit`](Self::commit) checks the staged index (its
/// manifest and every digest in it) and swaps the two directories in one atomic rename
/// (`renameat2(RENAME_EXCHANGE)`; where the file system cannot, two renames whose gap the
/// next open repairs, see `recover_swap`), then deletes the old one. Dropped without a
/// commit, the stage is deleted and the old index is untouched. The index's lock is held from
/// start to end, so two rewrites never interleave, and leftovers of a crashed rewrite are
/// removed by the next one.
pub struct IndexUpdate {
    target: PathBuf,
    stage: PathBuf,
    _lock: crate::fsio::PathLock,
    committed: bool,
}

/// Files a staging copy leaves out: unfinished writes and the save journal's marker.
fn staging_skips(name: &str) -> bool {
    name.ends_with(".tmp") || name == SAVE_MARKER
}

fn sibling(target: &Path, what: &str) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::index(target, "an index needs a directory name"))?
        .to_string_lossy()
        .to_string();
    Ok(target.with_file_name(format!(".{name}.{what}")))
}

impl IndexUpdate {
    /// Starts a rewrite of the index at `target` (which must hold one).
    pub fn begin(target: &Path) -> Result<IndexUpdate> {
        let u = Self::start(target)?;
        // Finish an interrupted in-place save first, so the copy is of a whole index.
        ExemplarIndex::read_manifest(target)?;
        crate::fsio::link_tree(target, &u.stage, &staging_skips)?;
        Ok(u)
    }

    /// Starts a new index at `target`; an index already there is replaced at commit only
    /// with `overwrite` (and kept if anything fails before).
    pub fn create(target: &Path, overwrite: bool) -> Result<IndexUpdate> {
        if target.join(MANIFEST).exists() && !overwrite {
            return Err(Error::index(
                target,
                "already holds an index; pass --overwrite to replace it or use `semtel index add`",
            ));
        }
        if target.is_dir()
            && !target.join(MANIFEST).exists()
            && std::fs::read_dir(target)
                .map_err(|e| Error::io(target, e))?
                .next()
                .is_some()
        {
            return Err(Error::index(
                target,
                "holds files but no index: choose an empty or new directory for the index",
            ));
        }
        let u = Self::start(target)?;
        std::fs::create_dir(&u.stage).map_err(|e| Error::io(&u.stage, e))?;
        Ok(u)
    }

    fn start(target: &Path) -> Result<IndexUpdate> {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let lock = crate::fsio::PathLock::acquire(target)?;
        recover_swap(target)?;
        // Leftovers of rewrites that crashed (no live one exists: we hold the lock).
        let prefix = sibling(target, "staging-")?;
        let prefix = prefix
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(rd) = std::fs::read_dir(parent) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                } else if n.starts_with(&format!(".{prefix}")) && n.ends_with(".lock") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stage = sibling(target, &format!("staging-{}-{n}", std::process::id()))?;
        Ok(IndexUpdate {
            target: target.to_path_buf(),
            stage,
            _lock: lock,
            committed: false,
        })
    }

    /// Where the command writes: open, save and calibrate the index here.
    pub fn dir(&self) -> &Path {
        &self.stage
    }

    /// The index this update replaces.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Checks the staged index and swaps it in; the old one is deleted afterwards.
    pub fn commit(mut self) -> Result<()> {
        let manifest = ExemplarIndex::read_manifest(&self.stage)?;
        verify_checksums(&self.stage, &manifest)?;
        sync_dir(&self.stage);
        crate::failpoint::hit("index-swap");
        if self.target.exists() {
            if !crate::fsio::exchange_dirs(&self.stage, &self.target)? {
                // Two renames: between them only `.NAME.previous` exists, which the next
                // open moves back (recover_swap): the old index, never neither.
                let prev = sibling(&self.target, "previous")?;
                let _ = std::fs::remove_dir_all(&prev);
                std::fs::rename(&self.target, &prev).map_err(|e| Error::io(&self.target, e))?;
                std::fs::rename(&self.stage, &self.target)
                    .map_err(|e| Error::io(&self.target, e))?;
                std::fs::rename(&prev, &self.stage).map_err(|e| Error::io(&prev, e))?;
            }
        } else {
            std::fs::rename(&self.stage, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        if let Some(p) = self.target.parent() {
            sync_dir(if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            });
        }
        self.committed = true;
        self.cleanup();
        Ok(())
    }

    /// Removes the stage (after a commit: the old index) and the lock file a save inside it
    /// left beside it.
    fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.stage);
        if let Ok(lock) = sibling(&self.stage, "lock") {
            let _ = std::fs::remove_file(lock);
        }
    }
}

impl Drop for IndexUpdate {
    fn drop(&mut self) {
        if !self.committed {
            self.cleanup();
        }
    }
}

/// Runs `f` on a staged copy of the index at `dir` and swaps the result in when it succeeds
/// ([`IndexUpdate`]); on an error the index is as it was.
pub fn update<T>(dir: &Path, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let u = IndexUpdate::begin(dir)?;
    let out = f(u.dir())?;
    u.commit()?;
    Ok(out)
}

/// The gap of a two-rename swap (file systems without `RENAME_EXCHANGE`): the index was moved
/// aside and the new one not yet moved in. Moves the old one back.
fn recover_swap(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let Ok(prev) = sibling(dir, "previous") else {
        return Ok(());
    };
    if prev.join(MANIFEST).exists() {
        std::fs::rename(&prev, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Streams every file the manifest has a digest for through sha256 and refuses the index on a
/// mismatch. Indexes written before digests existed open with a warning.
fn verify_checksums(dir: &Path, manifest: &Manifest) -> Result<()> {
    if manifest.checksums.is_empty() {
        tracing::warn!(
            "index {} has no checksums (built by an older semtel): damage cannot be detected; rebuild it to add them",
            dir.display()
        );
        return Ok(());
    }
    for (name, want) in &manifest.checksums {
        let p = dir.join(name);
        let got = sha256_file(&p).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::index(dir, format!("{name} is missing; rebuild the index"))
            }
            other => other,
        })?;
        if &got != want {
            let advice = if name.starts_with("head") {
                "rerun `semtel calibrate` to retrain the head"
            } else {
                "rebuild the index (`semtel index build --overwrite`)"
            };
            return Err(Error::index(
                dir,
                format!(
                    "{name} is damaged (sha256 {}… but the manifest recorded {}…); {advice}",
                    &got[..12],
                    &want[..want.len().min(12)]
                ),
            ));
        }
    }
    Ok(())
}

fn truncate_chars(s: &mut String, max: usize) {
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
}

fn exemplar_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("llm_model", DataType::Utf8, true),
        Field::new("prompt_version", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, false),
    ]))
}

fn write_exemplars(path: &Path, ex: &[Exemplar]) -> Result<()> {
    let schema = exemplar_schema();
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = ArrowWriter::try_new(f, schema.clone(), None)
        .map_err(|e| Error::output(path, e.to_string()))?;
    for (c, chunk) in ex.chunks(65536).enumerate() {
        let base = (c * 65536) as u64;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from_iter_values(
                (0..chunk.len() as u64).map(|i| base + i),
            )),
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|e| &e.id))),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|e| &e.label),
            )),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|e| &e.source),
            )),
            Arc::new(StringArray::from_iter(
                chunk.iter().map(|e| e.llm_model.as_deref()),
            )),
            Arc::new(StringArray::from_iter(
                chunk.iter().map(|e| e.prompt_version.as_deref()),
            )),
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|e| &e.text))),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| Error::output(path, e.to_string()))?;
        w.write(&batch)
            .map_err(|e| Error::output(path, e.to_string()))?;
    }
    w.close().map_err(|e| Error::output(path, e.to_string()))?;
    Ok(())
}

fn read_exemplars(path: &Path) -> Result<Vec<Exemplar>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.build())
        .map_err(|e| Error::index(path, format!("unreadable ({e}); rebuild the index")))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| Error::index(path, e.to_string()))?;
        let s = |name: &str| -> Result<arrow_array::StringArray> {
            b.column_by_name(name)
                .map(|c| c.as_string::<i32>().clone())
                .ok_or_else(|| Error::index(path, format!("missing column {name}")))
        };
        let (id, label, source, model, pv, text) = (
            s("id")?,
            s("label")?,
            s("source")?,
            s("llm_model")?,
            s("prompt_version")?,
            s("text")?,
        );
        for i in 0..b.num_rows() {
            let opt = |a: &StringArray| (!a.is_null(i)).then(|| a.value(i).to_string());
            out.push(Exemplar {
                id: id.value(i).to_string(),
                label: label.value(i).to_string(),
                source: source.value(i).to_string(),
                llm_model: opt(&model),
                prompt_version: opt(&pv),
                text: text.value(i).to_string(),
            });
        }
    }
    Ok(out)
}
