//! Writing results as the run goes, and resuming a killed run without duplicates or gaps.
//!
//! * JSONL: one line per row, flushed per batch; on resume a torn last line is cut off.
//! * Parquet file (`*.parquet`): rows go to numbered part files in `<file>.parts/`, each written
//!   to a `.tmp` name and renamed when closed (every few thousand rows or seconds), so a killed
//!   run keeps every closed part; at the end the parts are merged into the one file.
//! * Parquet dataset (a path without extension): the closed parts *are* the output.
//!
//! Resume reads the ids already written (complete file, closed parts) and the pipeline skips
//! them. Ids need not be unique: [`Done`] counts the rows written per id, and a resumed run skips
//! that many occurrences of the id, so an uninterrupted and a killed-and-resumed run write the
//! same number of rows for every id.
//!
//! One process at a time: an output is locked (an advisory lock on a hidden sibling file,
//! released by the OS when the process dies) for as long as its writer lives.
//!
//! Assembling a Parquet file is rolled forward after a crash: the merged file is written to
//! `<file>.tmp` and synced, then a `MERGED` marker is written into the parts folder, then the
//! file is renamed into place and the parts folder removed. A run that finds the marker finishes
//! that sequence instead of reading the parts again.
//!
//! This module must never decide labels; it only stores what it is given.

pub use crate::fsio::PathLock;
use crate::fsio::{commit, sync_dir};
pub use crate::row::{DecidedBy, LlmInfo, NeighborOut, OutputRow, TaxOut};
pub use crate::sink::Done;
use crate::{Error, Result};
use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
    UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{json, Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    Jsonl,
    ParquetFile,
    ParquetDir,
}

impl OutFormat {
    pub fn of(path: &Path) -> OutFormat {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
            OutFormat::Jsonl
        } else if name.ends_with(".parquet") || name.ends_with(".pq") {
            OutFormat::ParquetFile
        } else {
            OutFormat::ParquetDir
        }
    }
}

/// What a run writes besides the fixed columns.
#[derive(Debug, Clone, Default)]
pub struct OutputSpec {
    pub passthrough: Vec<(String, DataType)>,
    /// Additional taxonomies: (name, multi-label). Each adds `<name>_label` (or
    /// `<name>_labels`, plus `<name>_uncertain`: the labels whose verdict was escalated),
    /// `<name>_confidence` and `<name>_decided_by`.
    pub taxonomies: Vec<(String, bool)>,
    /// Close a Parquet part after this many rows…
    pub part_rows: usize,
    /// …or this long after its first row, whichever comes first.
    pub part_age: Duration,
}

/// Columns semtel writes itself; a pass-through column with one of these names is written as
/// `input_<name>` instead.
pub const RESERVED: &[&str] = &[
    "id",
    "label",
    "confidence",
    "margin",
    "top1_sim",
    "decided_by",
    "knn_label",
    "neighbors",
    "neighbor_ids",
    "neighbor_labels",
    "neighbor_scores",
    "error",
    "llm_model",
    "llm_tokens_in",
    "llm_tokens_out",
    "llm_cost_usd",
    "lang",
    "escalate_reason",
    "redacted",
    "novelty",
    "audit",
    "audit_label",
];

impl OutputSpec {
    /// `passthrough`: input column names and types, in input order.
    pub fn new(passthrough: Vec<(String, DataType)>) -> Self {
        let passthrough = passthrough
            .into_iter()
            .map(|(n, t)| {
                if RESERVED.contains(&n.as_str()) {
                    (format!("input_{n}"), t)
                } else {
                    (n, t)
                }
            })
            .collect();
        OutputSpec {
            passthrough,
            taxonomies: Vec::new(),
            part_rows: 20_000,
            part_age: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse to touch an existing output.
    Refuse,
    /// Keep what is there and skip its ids.
    Resume,
    /// Delete what is there.
    Overwrite,
}

pub fn schema(spec: &OutputSpec) -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("confidence", DataType::Float32, true),
        Field::new("margin", DataType::Float32, true),
        Field::new("top1_sim", DataType::Float32, true),
        Field::new("decided_by", DataType::Utf8, false),
        Field::new("knn_label", DataType::Utf8, true),
        Field::new("neighbor_ids", list(DataType::Utf8), true),
        Field::new("neighbor_labels", list(DataType::Utf8), true),
        Field::new("neighbor_scores", list(DataType::Float32), true),
        Field::new("error", DataType::Utf8, true),
        Field::new("llm_model", DataType::Utf8, true),
        // Int64 rather than UInt32: Spark has no unsigned types.
        Field::new("llm_tokens_in", DataType::Int64, true),
        Field::new("llm_tokens_out", DataType::Int64, true),
        Field::new("llm_cost_usd", DataType::Float64, true),
        Field::new("lang", DataType::Utf8, true),
        Field::new("escalate_reason", DataType::Utf8, true),
        // Entities redacted before the text left, by type, as a JSON object (`{"EMAIL": 2}`).
        Field::new("redacted", DataType::Utf8, true),
        // 0–1: the share of the voted label's exemplars nearer to it (`crate::novelty`).
        Field::new("novelty", DataType::Float32, true),
        // Audited kept rows (`--audit-rate`): agree / disagree / missing, and the LLM's label.
        Field::new("audit", DataType::Utf8, true),
        Field::new("audit_label", DataType::Utf8, true),
    ];
    for (name, multi) in &spec.taxonomies {
        if *multi {
            fields.push(Field::new(
                format!("{name}_labels"),
                list(DataType::Utf8),
                true,
            ));
            fields.push(Field::new(
                format!("{name}_uncertain"),
                list(DataType::Utf8),
                true,
            ));
        } else {
            fields.push(Field::new(format!("{name}_label"), DataType::Utf8, true));
        }
        fields.push(Field::new(
            format!("{name}_confidence"),
            DataType::Float32,
            true,
        ));
        fields.push(Field::new(
            format!("{name}_decided_by"),
            DataType::Utf8,
            true,
        ));
    }
    for (name, t) in &spec.passthrough {
        fields.push(Field::new(name, t.clone(), true));
    }
    Arc::new(Schema::new(fields))
}

/// Converts rows to one Arrow record batch in [`schema`]'s layout.
pub fn to_record_batch(rows: &[OutputRow], spec: &OutputSpec) -> Result<RecordBatch> {
    let schema = schema(spec);
    let n = rows.len();
    let mut id = StringBuilder::with_capacity(n, n * 16);
    let mut label = StringBuilder::new();
    let mut conf = Float32Builder::with_capacity(n);
    let mut margin = Float32Builder::with_capacity(n);
    let mut top1 = Float32Builder::with_capacity(n);
    let mut by = StringBuilder::new();
    let mut knn = StringBuilder::new();
    let mut nid = ListBuilder::new(StringBuilder::new());
    let mut nlab = ListBuilder::new(StringBuilder::new());
    let mut nsc = ListBuilder::new(Float32Builder::new());
    let mut err = StringBuilder::new();
    let mut lm = StringBuilder::new();
    let mut tin = Int64Builder::with_capacity(n);
    let mut tout = Int64Builder::with_capacity(n);
    let mut cost = Float64Builder::with_capacity(n);
    let mut lang = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut redacted = StringBuilder::new();
    let mut novelty = Float32Builder::with_capacity(n);
    let mut audit = StringBuilder::new();
    let mut audit_label = StringBuilder::new();
    for r in rows {
        novelty.append_option(r.novelty);
        audit.append_option(r.audit.as_ref().map(|a| a.verdict(r.label.as_deref())));
        audit_label.append_option(r.audit.as_ref().and_then(|a| a.label.as_deref()));
        lang.append_option(r.lang.as_deref());
        reason.append_option(r.escalate_reason.map(|e| e.as_str()));
        redacted.append_option(
            r.redacted
                .as_ref()
                .and_then(|c| serde_json::to_string(&c.0).ok()),
        );
        id.append_value(&r.id);
        label.append_option(r.label.as_deref());
        conf.append_option(r.confidence);
        margin.append_option(r.margin);
        top1.append_option(r.top1_sim);
        by.append_value(r.decided_by.as_str());
        knn.append_option(r.knn_label.as_deref());
        for nb in &r.neighbors {
            nid.values().append_value(&nb.id);
            nlab.values().append_value(&nb.label);
            nsc.values().append_value(nb.score);
        }
        nid.append(true);
        nlab.append(true);
        nsc.append(true);
        err.append_option(r.error.as_deref());
        lm.append_option(r.llm.as_ref().map(|l| l.model.as_str()));
        tin.append_option(r.llm.as_ref().map(|l| l.tokens_in as i64));
        tout.append_option(r.llm.as_ref().map(|l| l.tokens_out as i64));
        cost.append_option(r.llm.as_ref().map(|l| l.cost_usd));
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(label.finish()),
        Arc::new(conf.finish()),
        Arc::new(margin.finish()),
        Arc::new(top1.finish()),
        Arc::new(by.finish()),
        Arc::new(knn.finish()),
        Arc::new(nid.finish()),
        Arc::new(nlab.finish()),
        Arc::new(nsc.finish()),
        Arc::new(err.finish()),
        Arc::new(lm.finish()),
        Arc::new(tin.finish()),
        Arc::new(tout.finish()),
        Arc::new(cost.finish()),
        Arc::new(lang.finish()),
        Arc::new(reason.finish()),
        Arc::new(redacted.finish()),
        Arc::new(novelty.finish()),
        Arc::new(audit.finish()),
        Arc::new(audit_label.finish()),
    ];
    for (j, (_, multi)) in spec.taxonomies.iter().enumerate() {
        fn get(r: &OutputRow, j: usize) -> Option<&TaxOut> {
            r.extra.get(j)
        }
        if *multi {
            let lists = |f: fn(&TaxOut) -> Option<&Vec<String>>| -> ArrayRef {
                let mut b = ListBuilder::new(StringBuilder::new());
                for r in rows {
                    match get(r, j).and_then(f) {
                        Some(ls) => {
                            for l in ls {
                                b.values().append_value(l);
                            }
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Arc::new(b.finish())
            };
            cols.push(lists(|t| t.labels.as_ref()));
            cols.push(lists(|t| t.uncertain.as_ref()));
        } else {
            let mut b = StringBuilder::new();
            rows.iter()
                .for_each(|r| b.append_option(get(r, j).and_then(|t| t.label.as_deref())));
            cols.push(Arc::new(b.finish()));
        }
        let mut c = Float32Builder::new();
        rows.iter()
            .for_each(|r| c.append_option(get(r, j).and_then(|t| t.confidence)));
        cols.push(Arc::new(c.finish()));
        let mut d = StringBuilder::new();
        rows.iter()
            .for_each(|r| d.append_option(get(r, j).map(|t| t.decided_by.as_str())));
        cols.push(Arc::new(d.finish()));
    }
    for (j, (_, t)) in spec.passthrough.iter().enumerate() {
        cols.push(passthrough_array(rows.iter().map(|r| &r.passthrough[j]), t));
    }
    RecordBatch::try_new(schema, cols).map_err(|source| Error::Arrow {
        context: "building output rows".into(),
        source,
    })
}

/// Builds a pass-through column of the input's type; values that do not fit become null
/// (text columns hold JSON text for non-string values).
fn passthrough_array<'a>(vals: impl Iterator<Item = &'a Value>, t: &DataType) -> ArrayRef {
    match t {
        DataType::Boolean => {
            let mut b = BooleanBuilder::new();
            vals.for_each(|v| b.append_option(v.as_bool()));
            Arc::new(b.finish())
        }
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let mut b = Int64Builder::new();
            vals.for_each(|v| b.append_option(v.as_i64()));
            let a: ArrayRef = Arc::new(b.finish());
            arrow_cast::cast(&a, t).unwrap_or(a)
        }
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            let mut b = UInt64Builder::new();
            vals.for_each(|v| b.append_option(v.as_u64()));
            let a: ArrayRef = Arc::new(b.finish());
            arrow_cast::cast(&a, t).unwrap_or(a)
        }
        DataType::Float32 | DataType::Float64 => {
            let mut b = Float64Builder::new();
            vals.for_each(|v| b.append_option(v.as_f64()));
            let a: ArrayRef = Arc::new(b.finish());
            arrow_cast::cast(&a, t).unwrap_or(a)
        }
        _ => {
            let mut b = StringBuilder::new();
            vals.for_each(|v| match v {
                Value::Null => b.append_null(),
                Value::String(s) => b.append_value(s),
                other => b.append_value(other.to_string()),
            });
            Arc::new(b.finish())
        }
    }
}

pub fn to_json(r: &OutputRow, spec: &OutputSpec) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(r.id));
    m.insert("label".into(), json!(r.label));
    m.insert("confidence".into(), json!(r.confidence));
    m.insert("margin".into(), json!(r.margin));
    m.insert("top1_sim".into(), json!(r.top1_sim));
    m.insert("decided_by".into(), json!(r.decided_by.as_str()));
    m.insert("knn_label".into(), json!(r.knn_label));
    m.insert(
        "neighbors".into(),
        Value::Array(
            r.neighbors
                .iter()
                .map(|n| json!({"id": n.id, "label": n.label, "score": n.score}))
                .collect(),
        ),
    );
    m.insert("error".into(), json!(r.error));
    m.insert("lang".into(), json!(r.lang));
    m.insert(
        "escalate_reason".into(),
        json!(r.escalate_reason.map(|e| e.as_str())),
    );
    m.insert("redacted".into(), json!(r.redacted.as_ref().map(|c| &c.0)));
    m.insert("novelty".into(), json!(r.novelty));
    if let Some(a) = &r.audit {
        m.insert("audit".into(), json!(a.verdict(r.label.as_deref())));
        m.insert("audit_label".into(), json!(a.label));
    }
    if let Some(l) = &r.llm {
        m.insert("llm_model".into(), json!(l.model));
        m.insert("llm_tokens_in".into(), json!(l.tokens_in));
        m.insert("llm_tokens_out".into(), json!(l.tokens_out));
        m.insert("llm_cost_usd".into(), json!(l.cost_usd));
    }
    for (j, (name, multi)) in spec.taxonomies.iter().enumerate() {
        let t = r.extra.get(j);
        if *multi {
            m.insert(
                format!("{name}_labels"),
                json!(t.and_then(|t| t.labels.clone())),
            );
            m.insert(
                format!("{name}_uncertain"),
                json!(t.and_then(|t| t.uncertain.clone())),
            );
        } else {
            m.insert(
                format!("{name}_label"),
                json!(t.and_then(|t| t.label.clone())),
            );
        }
        m.insert(
            format!("{name}_confidence"),
            json!(t.and_then(|t| t.confidence)),
        );
        m.insert(
            format!("{name}_decided_by"),
            json!(t.map(|t| t.decided_by.as_str())),
        );
    }
    for (j, (name, _)) in spec.passthrough.iter().enumerate() {
        m.insert(name.clone(), r.passthrough[j].clone());
    }
    Value::Object(m)
}

/// Marker written into a Parquet file output's parts folder once the merged file is complete.
const MERGED_MARKER: &str = "MERGED";

/// Finishes an interrupted Parquet file assembly (see the module docs), or throws away a
/// half-written merged file when the marker was never written.
fn recover_merge(path: &Path, parts: &Path) -> Result<()> {
    let tmp = merge_tmp(path);
    if parts.join(MERGED_MARKER).exists() {
        if tmp.exists() {
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        }
        std::fs::remove_dir_all(parts).map_err(|e| Error::io(parts, e))?;
    } else if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    Ok(())
}

fn merge_tmp(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

fn parts_dir(path: &Path, fmt: OutFormat) -> PathBuf {
    match fmt {
        OutFormat::ParquetDir => path.to_path_buf(),
        _ => {
            let mut s = path.as_os_str().to_owned();
            s.push(".parts");
            PathBuf::from(s)
        }
    }
}

fn complete_parts(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut parts = Vec::new();
    if !dir.is_dir() {
        return Ok(parts);
    }
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            parts.push(p);
        }
    }
    parts.sort();
    Ok(parts)
}

fn read_parquet_ids(path: &Path, into: &mut Done) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| {
        Error::output(
            path,
            format!("cannot read for --resume ({e}); move it away and rerun"),
        )
    })?;
    let mask = ProjectionMask::columns(b.parquet_schema(), ["id"]);
    for batch in b
        .with_projection(mask)
        .build()
        .map_err(|e| Error::output(path, e.to_string()))?
    {
        let batch = batch.map_err(|e| Error::output(path, e.to_string()))?;
        let ids = batch.column(0).as_string::<i32>();
        for i in 0..ids.len() {
            into.add(ids.value(i));
        }
    }
    Ok(())
}

// One sink per writer, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Sink {
    Jsonl(BufWriter<File>),
    Parquet {
        dir: PathBuf,
        next_part: usize,
        current: Option<(ArrowWriter<File>, PathBuf, Instant)>,
        rows_in_part: usize,
    },
}

/// A results writer; see the module docs for the on-disk protocol.
pub struct OutputWriter {
    path: PathBuf,
    fmt: OutFormat,
    spec: OutputSpec,
    sink: Sink,
    written: u64,
    _lock: PathLock,
}

impl OutputWriter {
    /// Opens the output, honouring `existing`; returns the writer and the ids already written.
    pub fn open(path: &Path, spec: OutputSpec, existing: Existing) -> Result<(Self, Done)> {
        let fmt = OutFormat::of(path);
        let parts = parts_dir(path, fmt);
        // Before looking at anything: a second process on the same output would interleave
        // its rows with ours and destroy Parquet parts.
        let lock = PathLock::acquire(path)?;
        if fmt == OutFormat::ParquetFile {
            recover_merge(path, &parts)?;
        }
        let exists = match fmt {
            OutFormat::ParquetDir => !complete_parts(&parts)?.is_empty(),
            _ => path.exists() || parts.exists(),
        };
        if exists {
            match existing {
                Existing::Refuse => {
                    return Err(Error::output(
                        path,
                        "already exists; pass --resume to continue that run or --overwrite to replace it",
                    ))
                }
                Existing::Overwrite => {
                    if fmt != OutFormat::ParquetDir && path.exists() {
                        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
                    }
                    if parts.exists() {
                        std::fs::remove_dir_all(&parts).map_err(|e| Error::io(&parts, e))?;
                    }
                }
                Existing::Resume => {}
            }
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut done = Done::default();
        let sink = match fmt {
            OutFormat::Jsonl => {
                let f = if path.exists() {
                    resume_jsonl(path, &mut done)?
                } else {
                    File::create(path).map_err(|e| Error::io(path, e))?
                };
                Sink::Jsonl(BufWriter::with_capacity(1 << 20, f))
            }
            OutFormat::ParquetFile | OutFormat::ParquetDir => {
                if fmt == OutFormat::ParquetFile && path.exists() {
                    read_parquet_ids(path, &mut done)?;
                }
                std::fs::create_dir_all(&parts).map_err(|e| Error::io(&parts, e))?;
                // Parts still named .tmp were being written when the last run died: their rows
                // are not in `done` and will be redone.
                for e in std::fs::read_dir(&parts).map_err(|e| Error::io(&parts, e))? {
                    let p = e.map_err(|e| Error::io(&parts, e))?.path();
                    if p.extension().is_some_and(|x| x == "tmp") {
                        let _ = std::fs::remove_file(&p);
                    }
                }
                let existing_parts = complete_parts(&parts)?;
                for p in &existing_parts {
                    read_parquet_ids(p, &mut done)?;
                }
                let next_part = existing_parts
                    .iter()
                    .filter_map(|p| {
                        p.file_stem()?
                            .to_str()?
                            .strip_prefix("part-")?
                            .parse::<usize>()
                            .ok()
                    })
                    .max()
                    .map_or(0, |m| m + 1);
                Sink::Parquet {
                    dir: parts,
                    next_part,
                    current: None,
                    rows_in_part: 0,
                }
            }
        };
        Ok((
            OutputWriter {
                path: path.to_path_buf(),
                fmt,
                spec,
                sink,
                written: 0,
                _lock: lock,
            },
            done,
        ))
    }

    pub fn rows_written(&self) -> u64 {
        self.written
    }

    pub fn write(&mut self, rows: &[OutputRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        match &mut self.sink {
            Sink::Jsonl(w) => {
                for r in rows {
                    let line = serde_json::to_string(&to_json(r, &self.spec))
                        .map_err(|e| Error::output(&path, e.to_string()))?;
                    w.write_all(line.as_bytes())
                        .and_then(|_| w.write_all(b"\n"))
                        .map_err(|e| Error::io(&path, e))?;
                }
                w.flush().map_err(|e| Error::io(&path, e))?;
            }
            Sink::Parquet {
                dir,
                next_part,
                current,
                rows_in_part,
            } => {
                if current.is_none() {
                    let tmp = dir.join(format!("part-{:06}.parquet.tmp", *next_part));
                    let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                    let props = WriterProperties::builder()
                        .set_compression(Compression::ZSTD(ZstdLevel::default()))
                        .build();
                    let w = ArrowWriter::try_new(f, schema(&self.spec), Some(props))
                        .map_err(|e| Error::write_failed(&tmp, e))?;
                    *current = Some((w, tmp, Instant::now()));
                }
                let batch = to_record_batch(rows, &self.spec)?;
                let (w, tmp, _) = current.as_mut().expect("a part was opened above");
                w.write(&batch)
                    .map_err(|e| Error::write_failed(tmp.as_path(), e))?;
                *rows_in_part += rows.len();
            }
        }
        self.written += rows.len() as u64;
        crate::failpoint::hit("batch-written");
        self.maybe_close_part()?;
        Ok(())
    }

    fn maybe_close_part(&mut self) -> Result<()> {
        let due = match &self.sink {
            Sink::Parquet {
                current: Some((_, _, started)),
                rows_in_part,
                ..
            } => *rows_in_part >= self.spec.part_rows || started.elapsed() >= self.spec.part_age,
            _ => false,
        };
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Makes everything written so far durable (closes the current Parquet part, fsyncs JSONL).
    pub fn checkpoint(&mut self) -> Result<()> {
        match &mut self.sink {
            Sink::Jsonl(w) => {
                w.flush().map_err(|e| Error::io(&self.path, e))?;
                w.get_ref()
                    .sync_data()
                    .map_err(|e| Error::io(&self.path, e))?;
            }
            Sink::Parquet {
                current,
                next_part,
                rows_in_part,
                dir,
            } => {
                if let Some((w, tmp, _)) = current.take() {
                    w.close().map_err(|e| Error::write_failed(&tmp, e))?;
                    let dest = dir.join(format!("part-{:06}.parquet", *next_part));
                    commit(&tmp, &dest)?;
                    *next_part += 1;
                    *rows_in_part = 0;
                    crate::failpoint::hit("part-closed");
                }
            }
        }
        Ok(())
    }

    /// Closes the output; a single-file Parquet output is assembled from its parts here.
    pub fn finish(mut self) -> Result<()> {
        self.checkpoint()?;
        if self.fmt != OutFormat::ParquetFile {
            return Ok(());
        }
        let Sink::Parquet { dir, .. } = &self.sink else {
            unreachable!()
        };
        let mut inputs = Vec::new();
        if self.path.exists() {
            inputs.push(self.path.clone());
        }
        inputs.extend(complete_parts(dir)?);
        let tmp = merge_tmp(&self.path);
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut w = ArrowWriter::try_new(f, schema(&self.spec), Some(props))
            .map_err(|e| Error::write_failed(&tmp, e))?;
        for p in &inputs {
            let f = File::open(p).map_err(|e| Error::io(p, e))?;
            let r = ParquetRecordBatchReaderBuilder::try_new(f)
                .and_then(|b| b.build())
                .map_err(|e| Error::output(p, e.to_string()))?;
            for b in r {
                let b = b.map_err(|e| Error::output(p, e.to_string()))?;
                w.write(&b).map_err(|e| Error::write_failed(&tmp, e))?;
            }
        }
        let f = w.into_inner().map_err(|e| Error::write_failed(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        // From here on the merged file is complete: the marker makes a crash roll forward
        // (rename, remove the parts) instead of merging the parts a second time.
        let marker = dir.join(MERGED_MARKER);
        File::create(&marker)
            .and_then(|m| m.sync_all())
            .map_err(|e| Error::io(&marker, e))?;
        sync_dir(dir);
        crate::failpoint::hit("before-final-commit");
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent);
        }
        crate::failpoint::hit("final-commit");
        std::fs::remove_dir_all(dir).map_err(|e| {
            Error::output(
                dir,
                format!("{e}; the output is complete: remove this folder by hand, or rerun with --resume, which does it"),
            )
        })?;
        Ok(())
    }
}

impl crate::sink::RowSink for OutputWriter {
    fn write(&mut self, rows: &[OutputRow]) -> Result<()> {
        OutputWriter::write(self, rows)
    }
    fn checkpoint(&mut self) -> Result<()> {
        OutputWriter::checkpoint(self)
    }
    fn rows_written(&self) -> u64 {
        self.written
    }
    fn finish(self: Box<Self>) -> Result<()> {
        OutputWriter::finish(*self)
    }
}

/// Collects the ids of a JSONL output and cuts off a torn last line.
fn resume_jsonl(path: &Path, done: &mut Done) -> Result<File> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(f);
    let mut good_end = 0u64;
    let mut pos = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        pos += n as u64;
        if line.last() != Some(&b'\n') {
            break; // torn write
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(v) => {
                if let Some(id) = v.get("id").and_then(Value::as_str) {
                    done.add(id);
                }
                good_end = pos;
            }
            Err(_) => break,
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(good_end).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::End(0)).map_err(|e| Error::io(path, e))?;
    Ok(f)
}

/// Reads a finished output back (for tests, eval and the Python binding).
pub fn read_ids_and_labels(path: &Path) -> Result<Vec<(String, Option<String>, String)>> {
    let mut out = Vec::new();
    match OutFormat::of(path) {
        OutFormat::Jsonl => {
            let f = File::open(path).map_err(|e| Error::io(path, e))?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(|e| Error::io(path, e))?;
                let v: Value =
                    serde_json::from_str(&line).map_err(|e| Error::output(path, e.to_string()))?;
                out.push((
                    v["id"].as_str().unwrap_or_default().to_string(),
                    v["label"].as_str().map(str::to_string),
                    v["decided_by"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        fmt => {
            let files = if fmt == OutFormat::ParquetDir {
                complete_parts(path)?
            } else {
                vec![path.to_path_buf()]
            };
            for p in files {
                let f = File::open(&p).map_err(|e| Error::io(&p, e))?;
                let r = ParquetRecordBatchReaderBuilder::try_new(f)
                    .and_then(|b| b.build())
                    .map_err(|e| Error::output(&p, e.to_string()))?;
                for b in r {
                    let b = b.map_err(|e| Error::output(&p, e.to_string()))?;
                    let id = b.column_by_name("id").unwrap().as_string::<i32>().clone();
                    let lab = b
                        .column_by_name("label")
                        .unwrap()
                        .as_string::<i32>()
                        .clone();
                    let by = b
                        .column_by_name("decided_by")
                        .unwrap()
                        .as_string::<i32>()
                        .clone();
                    for i in 0..b.num_rows() {
                        out.push((
                            id.value(i).to_string(),
                            (!lab.is_null(i)).then(|| lab.value(i).to_string()),
                            by.value(i).to_string(),
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Per-row facts read back from a classify output: decided_by and neighbour ids/labels.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub decided_by: String,
    pub neighbor_ids: Vec<String>,
    pub neighbor_labels: Vec<String>,
}

/// Reads a classify output (JSONL, Parquet file or dataset) back, by id.
pub fn read_stored_rows(path: &Path) -> Result<std::collections::HashMap<String, StoredRow>> {
    let mut m = std::collections::HashMap::new();
    match OutFormat::of(path) {
        OutFormat::Jsonl => {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(|e| Error::io(path, e))?;
                let v: Value =
                    serde_json::from_str(&line).map_err(|e| Error::output(path, e.to_string()))?;
                let nb = v["neighbors"].as_array().cloned().unwrap_or_default();
                m.insert(
                    v["id"].as_str().unwrap_or_default().to_string(),
                    StoredRow {
                        decided_by: v["decided_by"].as_str().unwrap_or_default().to_string(),
                        neighbor_ids: nb
                            .iter()
                            .filter_map(|n| n["id"].as_str().map(String::from))
                            .collect(),
                        neighbor_labels: nb
                            .iter()
                            .filter_map(|n| n["label"].as_str().map(String::from))
                            .collect(),
                    },
                );
            }
        }
        _ => {
            for b in read_output_batches(path)? {
                let s = |n: &str| b.column_by_name(n).map(|c| c.as_string::<i32>().clone());
                let (Some(id), Some(by)) = (s("id"), s("decided_by")) else {
                    return Err(Error::output(
                        path,
                        "not a semtel output (no id/decided_by columns)",
                    ));
                };
                let list = |n: &str| b.column_by_name(n).map(|c| c.as_list::<i32>().clone());
                let (nid, nlab) = (list("neighbor_ids"), list("neighbor_labels"));
                for i in 0..b.num_rows() {
                    let strs = |l: &Option<arrow_array::ListArray>| -> Vec<String> {
                        l.as_ref()
                            .map(|l| {
                                let v = l.value(i);
                                let v = v.as_string::<i32>();
                                (0..v.len()).map(|k| v.value(k).to_string()).collect()
                            })
                            .unwrap_or_default()
                    };
                    m.insert(
                        id.value(i).to_string(),
                        StoredRow {
                            decided_by: by.value(i).to_string(),
                            neighbor_ids: strs(&nid),
                            neighbor_labels: strs(&nlab),
                        },
                    );
                }
            }
        }
    }
    Ok(m)
}

pub fn read_output_batches(path: &Path) -> Result<Vec<RecordBatch>> {
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for p in files {
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| Error::output(&p, e.to_string()))?;
        for b in r {
            out.push(b.map_err(|e| Error::output(&p, e.to_string()))?);
        }
    }
    Ok(out)
}

/// Rewrites an output in place (JSONL, Parquet file, or each part of a Parquet dataset),
/// applying `patch` to its `escalate` rows; each file is replaced atomically, so a kill leaves
/// every file either as it was or patched. The caller holds the output's lock. Returns (rows
/// written, rows patched).
pub fn patch_escalated_in_place(
    path: &Path,
    mut patch: impl FnMut(&str) -> Option<Patch>,
) -> Result<(usize, usize)> {
    if !path.is_dir() {
        return patch_escalated(path, path, patch);
    }
    let mut parts: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    parts.sort();
    let (mut written, mut patched) = (0, 0);
    for p in parts {
        let (w, n) = patch_escalated(&p, &p, &mut patch)?;
        written += w;
        patched += n;
    }
    crate::fsio::sync_dir(path);
    Ok((written, patched))
}

/// What to change in an escalated row of an output (`semtel llm import-batch`).
#[derive(Debug, Clone)]
pub enum Patch {
    /// The LLM labelled it.
    Llm { label: String, llm: LlmInfo },
    /// It stays escalated, with this reason.
    Error(String),
}

/// Rewrites the output `labels` into `merged` (atomically), applying `patch` to each row that
/// is `escalate`; every other row and column is kept as it is. Returns (rows written, rows
/// patched).
pub fn patch_escalated(
    labels: &Path,
    merged: &Path,
    mut patch: impl FnMut(&str) -> Option<Patch>,
) -> Result<(usize, usize)> {
    use arrow_array::{Float64Array, Int64Array, StringArray};
    let mut matched = 0usize;
    let mut rows_written = 0usize;
    match OutFormat::of(labels) {
        OutFormat::Jsonl => {
            let f = std::fs::File::open(labels).map_err(|e| Error::io(labels, e))?;
            let tmp = merged.with_extension("jsonl.tmp");
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?,
            );
            for line in BufReader::new(f).lines() {
                let line = line.map_err(|e| Error::io(labels, e))?;
                let mut v: Value = serde_json::from_str(&line)
                    .map_err(|e| Error::output(labels, e.to_string()))?;
                let id = v["id"].as_str().unwrap_or_default().to_string();
                if v["decided_by"] == "escalate" {
                    match patch(&id) {
                        Some(Patch::Llm { label, llm }) => {
                            matched += 1;
                            v["label"] = label.into();
                            v["decided_by"] = DecidedBy::Llm.as_str().into();
                            v["error"] = Value::Null;
                            v["llm_model"] = llm.model.into();
                            v["llm_tokens_in"] = llm.tokens_in.into();
                            v["llm_tokens_out"] = llm.tokens_out.into();
                            v["llm_cost_usd"] = llm.cost_usd.into();
                        }
                        Some(Patch::Error(p)) => {
                            matched += 1;
                            v["error"] = p.into();
                        }
                        None => {}
                    }
                }
                writeln!(w, "{v}").map_err(|e| Error::io(&tmp, e))?;
                rows_written += 1;
            }
            w.flush().map_err(|e| Error::io(&tmp, e))?;
            drop(w);
            crate::fsio::commit(&tmp, merged)?;
        }
        _ => {
            let batches = read_output_batches(labels)?;
            let schema = batches
                .first()
                .map(|b| b.schema())
                .ok_or_else(|| Error::output(labels, "empty output"))?;
            // Checked once here, so the per-batch column accesses below cannot fail.
            {
                use arrow_schema::DataType::{Float64, Int64, Utf8};
                for (name, ty) in [
                    ("id", Utf8),
                    ("decided_by", Utf8),
                    ("label", Utf8),
                    ("error", Utf8),
                    ("llm_model", Utf8),
                    ("llm_tokens_in", Int64),
                    ("llm_tokens_out", Int64),
                    ("llm_cost_usd", Float64),
                ] {
                    if schema.field_with_name(name).ok().map(|f| f.data_type()) != Some(&ty) {
                        return Err(Error::output(
                            labels,
                            format!(
                                "no {ty} column `{name}`: pass the output that `semtel classify` wrote for these rows"
                            ),
                        ));
                    }
                }
            }
            let tmp = merged.with_extension("parquet.tmp");
            let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut w = parquet::arrow::ArrowWriter::try_new(f, schema.clone(), None)
                .map_err(|e| Error::output(&tmp, e.to_string()))?;
            for b in batches {
                let col = |n: &str| b.column_by_name(n).expect("checked above").clone();
                let ids = col("id");
                let ids = ids.as_string::<i32>();
                let by_col = col("decided_by");
                let by = by_col.as_string::<i32>();
                let str_col = |n: &str| col(n).as_string::<i32>().clone();
                let (label, error, model) =
                    (str_col("label"), str_col("error"), str_col("llm_model"));
                let tin = col("llm_tokens_in");
                let tin = tin.as_primitive::<arrow_array::types::Int64Type>();
                let tout = col("llm_tokens_out");
                let tout = tout.as_primitive::<arrow_array::types::Int64Type>();
                let costc = col("llm_cost_usd");
                let costc = costc.as_primitive::<arrow_array::types::Float64Type>();
                let n = b.num_rows();
                let opt =
                    |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
                let (mut nl, mut nb, mut ne, mut nm) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                let (mut ni, mut no, mut nc) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for i in 0..n {
                    let mut row = (
                        opt(&label, i),
                        by.value(i).to_string(),
                        opt(&error, i),
                        opt(&model, i),
                        (!tin.is_null(i)).then(|| tin.value(i)),
                        (!tout.is_null(i)).then(|| tout.value(i)),
                        (!costc.is_null(i)).then(|| costc.value(i)),
                    );
                    if row.1 == "escalate" {
                        match patch(ids.value(i)) {
                            Some(Patch::Llm { label, llm }) => {
                                matched += 1;
                                row = (
                                    Some(label),
                                    DecidedBy::Llm.as_str().into(),
                                    None,
                                    Some(llm.model),
                                    Some(llm.tokens_in as i64),
                                    Some(llm.tokens_out as i64),
                                    Some(llm.cost_usd),
                                );
                            }
                            Some(Patch::Error(p)) => {
                                matched += 1;
                                row.2 = Some(p);
                            }
                            None => {}
                        }
                    }
                    nl.push(row.0);
                    nb.push(row.1);
                    ne.push(row.2);
                    nm.push(row.3);
                    ni.push(row.4);
                    no.push(row.5);
                    nc.push(row.6);
                }
                let mut cols: Vec<ArrayRef> = b.columns().to_vec();
                let idx = |n: &str| schema.index_of(n).expect("column");
                cols[idx("label")] = Arc::new(StringArray::from(nl));
                cols[idx("decided_by")] = Arc::new(StringArray::from(nb));
                cols[idx("error")] = Arc::new(StringArray::from(ne));
                cols[idx("llm_model")] = Arc::new(StringArray::from(nm));
                cols[idx("llm_tokens_in")] = Arc::new(Int64Array::from(ni));
                cols[idx("llm_tokens_out")] = Arc::new(Int64Array::from(no));
                cols[idx("llm_cost_usd")] = Arc::new(Float64Array::from(nc));
                let nbatch = RecordBatch::try_new(schema.clone(), cols)
                    .map_err(|e| Error::output(&tmp, e.to_string()))?;
                rows_written += n;
                w.write(&nbatch)
                    .map_err(|e| Error::output(&tmp, e.to_string()))?;
            }
            w.close().map_err(|e| Error::output(&tmp, e.to_string()))?;
            crate::fsio::commit(&tmp, merged)?;
        }
    }
    Ok((rows_written, matched))
}
