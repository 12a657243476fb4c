//! Python binding of semtel. It owns no logic: PyArrow record batches cross the boundary
//! zero-copy through the Arrow C data interface, and every decision is made by the core crate
//! (`semtel::app::arrow::ArrowJob`). Heavy state (model, index) is loaded once per process and
//! shared by every `Classifier` built with the same settings; the index is memory-mapped so
//! that several worker processes share its pages.

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ffi_stream::RecordBatchStreamReader as ArrowArrayStreamReader;
use arrow::pyarrow::PyArrowType;
use arrow::record_batch::RecordBatchReader;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Times this process loaded a model + index (the test of "once per worker" reads it).
static LOADS: AtomicU64 = AtomicU64::new(0);

type Cache = Mutex<HashMap<String, Arc<semtel::pipeline::Classifier>>>;

fn cache() -> &'static Cache {
    static C: OnceLock<Cache> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

fn err(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// A classifier over an exemplar index.
#[pyclass(frozen, module = "semtel")]
struct Classifier {
    core: Arc<semtel::pipeline::Classifier>,
    columns: semtel::input::Columns,
    llm: Option<semtel::llm::LlmConfig>,
    next_index: AtomicU64,
}

#[pymethods]
impl Classifier {
    /// Loads (or reuses, within this process) the model and the index.
    ///
    /// `text_col` / `turns_col` / `id_col` name the input columns; `passthrough` lists input
    /// columns copied to the output; `threads` sizes this process's worker pool (default:
    /// `RAYON_NUM_THREADS`, else all cores); `llm_config` (a TOML file) sends escalated rows to
    /// the LLM tier inside `classify_batch` (default: they come back as `escalate`);
    /// `audit_rate` (with `llm_config`) also sends that share of kept rows to the LLM, blind,
    /// chosen by id with `audit_seed`: the `audit` and `audit_label` columns say what it answered.
    #[new]
    #[pyo3(signature = (index_dir, model=None, threshold=None, signal=None, llm_config=None,
        text_col="text", turns_col=None, id_col="id", passthrough=None, threads=None, engine=None,
        also=None, audit_rate=None, audit_seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        index_dir: &str,
        model: Option<String>,
        threshold: Option<f32>,
        signal: Option<String>,
        llm_config: Option<String>,
        text_col: &str,
        turns_col: Option<String>,
        id_col: &str,
        passthrough: Option<Vec<String>>,
        threads: Option<usize>,
        engine: Option<String>,
        also: Option<Vec<(String, String)>>,
        audit_rate: Option<f64>,
        audit_seed: Option<u64>,
    ) -> PyResult<Self> {
        if let Some(r) = audit_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(PyValueError::new_err(format!(
                    "audit_rate is a share between 0 and 1, not {r}"
                )));
            }
            if r > 0.0 && llm_config.is_none() {
                return Err(PyValueError::new_err(
                    "audit_rate needs llm_config: audited rows are asked of the LLM",
                ));
            }
        }
        let audit = audit_rate
            .filter(|&r| r > 0.0)
            .map(|rate| semtel::pipeline::AuditPlan {
                rate,
                seed: audit_seed.unwrap_or(0),
                llm_accuracy: None,
            });
        if let Some(n) = threads {
            // The pool is per process and fixed at first use; later requests cannot resize it.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .build_global();
        }
        let signal = signal
            .map(|s| s.parse::<semtel::decide::Signal>())
            .transpose()
            .map_err(PyValueError::new_err)?;
        let engine = engine
            .map(|s| s.parse::<semtel::embed::Engine>())
            .transpose()
            .map_err(PyValueError::new_err)?
            .unwrap_or_default();
        let also = also.unwrap_or_default();
        let key =
            format!("{index_dir}|{model:?}|{threshold:?}|{signal:?}|{engine:?}|{also:?}|{audit:?}");
        let core = {
            let mut c = cache().lock().map_err(err)?;
            match c.get(&key) {
                Some(x) => x.clone(),
                None => {
                    let opts = semtel::pipeline::ClassifierOptions {
                        encoder: semtel::embed::EncoderOptions {
                            model,
                            engine,
                            ..Default::default()
                        },
                        threshold,
                        signal,
                        audit,
                        ..Default::default()
                    };
                    let dir = std::path::PathBuf::from(index_dir);
                    let loaded = py
                        .detach(|| -> semtel::Result<semtel::pipeline::Classifier> {
                            let mut c = semtel::pipeline::Classifier::open(&dir, &opts)?;
                            for (name, d) in &also {
                                let t = semtel::pipeline::Taxonomy::open(
                                    name,
                                    std::path::Path::new(d),
                                    &c.encoder,
                                )?;
                                c.extra.push(t);
                            }
                            Ok(c)
                        })
                        .map_err(err)?;
                    LOADS.fetch_add(1, Ordering::SeqCst);
                    let a = Arc::new(loaded);
                    c.insert(key, a.clone());
                    a
                }
            }
        };
        let llm = llm_config
            .map(|p| semtel::llm::LlmConfig::load(std::path::Path::new(&p)))
            .transpose()
            .map_err(err)?;
        Ok(Classifier {
            core,
            columns: semtel::input::Columns {
                id: id_col.into(),
                text: text_col.into(),
                turns: turns_col,
                passthrough: passthrough.unwrap_or_default(),
                ..Default::default()
            },
            llm,
            next_index: AtomicU64::new(0),
        })
    }

    /// Classifies one `pyarrow.RecordBatch`, returning a `pyarrow.RecordBatch` of results.
    fn classify_batch(
        &self,
        py: Python<'_>,
        batch: PyArrowType<RecordBatch>,
    ) -> PyResult<PyArrowType<RecordBatch>> {
        let batch = batch.0;
        let job = semtel::app::arrow::ArrowJob::new(&batch.schema(), &self.columns, &self.core)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let first = self
            .next_index
            .fetch_add(batch.num_rows() as u64, Ordering::SeqCst);
        let out = py
            .detach(|| run(&self.core, &job, &batch, first, self.llm.as_ref()))
            .map_err(err)?;
        Ok(PyArrowType(out))
    }

    /// Classifies a stream (`pyarrow.RecordBatchReader` or anything with `__arrow_c_stream__`)
    /// lazily, returning a `pyarrow.RecordBatchReader`.
    fn classify_stream(
        &self,
        reader: PyArrowType<ArrowArrayStreamReader>,
    ) -> PyResult<PyArrowType<Box<dyn RecordBatchReader + Send>>> {
        let input = reader.0;
        let job = semtel::app::arrow::ArrowJob::new(&input.schema(), &self.columns, &self.core)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let schema = job.output_schema();
        let start = self.next_index.fetch_add(1 << 40, Ordering::SeqCst);
        Ok(PyArrowType(Box::new(Stream {
            input,
            job,
            core: self.core.clone(),
            llm: self.llm.clone(),
            schema,
            next: start,
        })))
    }

    /// The output schema for an input schema (what Spark's `mapInArrow` needs up front).
    fn output_schema(&self, input_schema: PyArrowType<Schema>) -> PyResult<PyArrowType<Schema>> {
        let job = semtel::app::arrow::ArrowJob::new(&input_schema.0, &self.columns, &self.core)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyArrowType(job.output_schema().as_ref().clone()))
    }

    /// The index's labels.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.core.index.labels().to_vec()
    }

    /// The embedding engine in use.
    #[getter]
    fn engine(&self) -> String {
        self.core.encoder.engine.describe()
    }

    /// The confidence signal and the global threshold in force.
    #[getter]
    fn decision(&self) -> (String, f32) {
        (
            self.core.thresholds.signal.name().to_string(),
            self.core.thresholds.global,
        )
    }
}

/// Classifies one batch. The core already turns a panic on a row into that row's error; a
/// panic anywhere else (the LLM tier, Arrow conversion) becomes an ordinary exception here,
/// never a `PanicException` (which `except Exception` does not catch).
fn run(
    core: &semtel::pipeline::Classifier,
    job: &semtel::app::arrow::ArrowJob,
    batch: &RecordBatch,
    first: u64,
    llm: Option<&semtel::llm::LlmConfig>,
) -> semtel::Result<RecordBatch> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_unguarded(core, job, batch, first, llm)
    }))
    .unwrap_or_else(|p| {
        Err(semtel::Error::Internal(format!(
            "classifying this batch panicked ({})",
            semtel::pipeline::panic_message(&*p)
        )))
    })
}

fn run_unguarded(
    core: &semtel::pipeline::Classifier,
    job: &semtel::app::arrow::ArrowJob,
    batch: &RecordBatch,
    first: u64,
    llm: Option<&semtel::llm::LlmConfig>,
) -> semtel::Result<RecordBatch> {
    match llm {
        None => job.classify(core, batch, first, None),
        Some(cfg) => {
            let mut tier = semtel::app::classify::llm_tier_from(core, cfg.clone())?;
            job.classify(core, batch, first, Some(&mut tier))
        }
    }
}

struct Stream {
    input: ArrowArrayStreamReader,
    job: semtel::app::arrow::ArrowJob,
    core: Arc<semtel::pipeline::Classifier>,
    llm: Option<semtel::llm::LlmConfig>,
    schema: SchemaRef,
    next: u64,
}

impl Iterator for Stream {
    type Item = Result<RecordBatch, ArrowError>;
    fn next(&mut self) -> Option<Self::Item> {
        let batch = match self.input.next()? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let first = self.next;
        self.next += batch.num_rows() as u64;
        Some(
            run(&self.core, &self.job, &batch, first, self.llm.as_ref())
                .map_err(|e| ArrowError::ExternalError(Box::new(e))),
        )
    }
}

impl RecordBatchReader for Stream {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// How many times this process loaded a model and index.
#[pyfunction]
fn model_loads() -> u64 {
    LOADS.load(Ordering::SeqCst)
}

#[pyfunction]
fn version() -> &'static str {
    semtel::VERSION
}

#[pymodule]
fn _semtel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    semtel::error::quiet_expected_panics();
    m.add_class::<Classifier>()?;
    m.add_function(wrap_pyfunction!(model_loads, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
