//! Reading conversations from JSONL and Parquet in bounded batches (memory does not grow with
//! the input). Column names are configurable; a row may carry a plain `text` or OpenAI-style
//! `turns`/`messages` (`[{role, content}]`, content as a string or as a list of text parts).
//!
//! Per-row problems (broken JSON, invalid UTF-8, missing fields, oversize lines) become rows
//! whose `content` is an error naming the file and line, so the run continues and the output
//! accounts for every row. Problems with the whole file (missing, unreadable, no usable column)
//! are errors. This module must never tokenize, embed or write anything.

use crate::conversation::{Content, Role, Row, Turn};
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Which fields hold what.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Columns {
    pub id: String,
    pub text: String,
    /// `None`: use `turns` or `messages` when present.
    pub turns: Option<String>,
    pub label: String,
    pub split: String,
    pub passthrough: Vec<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            id: "id".into(),
            text: "text".into(),
            turns: None,
            label: "label".into(),
            split: "split".into(),
            passthrough: Vec::new(),
        }
    }
}

const AUTO_TURNS: [&str; 3] = ["turns", "messages", "conversation"];

#[derive(Debug, Clone)]
pub struct InputOptions {
    pub columns: Columns,
    /// Keep only rows whose split column equals this.
    pub split: Option<String>,
    pub batch_rows: usize,
    /// Longest accepted JSONL line; longer lines become error rows without being buffered whole.
    pub max_line_bytes: usize,
}

impl Default for InputOptions {
    fn default() -> Self {
        InputOptions {
            columns: Columns::default(),
            split: None,
            batch_rows: 1024,
            max_line_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Parquet,
}

impl Format {
    pub fn from_path(p: &Path) -> Result<Format> {
        let name = p.to_string_lossy().to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".parquet") || name.ends_with(".pq") {
            Ok(Format::Parquet)
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
            Ok(Format::Jsonl)
        } else {
            Err(Error::input(
                p,
                "unknown format: name the file *.jsonl, *.ndjson, *.jsonl.gz or *.parquet",
            ))
        }
    }
}

/// A source of row batches.
pub trait RowReader: Send {
    /// The next batch, or `None` at the end. Never returns an empty batch.
    fn next_batch(&mut self) -> Result<Option<Vec<Row>>>;
    /// Rows in the file before split filtering, when cheap to know.
    fn total_rows(&self) -> Option<u64>;
    /// Arrow types of the pass-through columns (JSONL: Utf8).
    fn passthrough_types(&self) -> Vec<DataType>;
}

pub fn open(path: &Path, opts: &InputOptions) -> Result<Box<dyn RowReader>> {
    if !path.exists() {
        return Err(Error::input(path, "file not found"));
    }
    match Format::from_path(path)? {
        Format::Jsonl => Ok(Box::new(JsonlReader::open(path, opts.clone())?)),
        Format::Parquet => Ok(Box::new(ParquetReader::open(path, opts.clone())?)),
    }
}

/// Reads every row of a file at once (for modest labelled sets: index building and eval).
pub fn read_all(path: &Path, opts: &InputOptions) -> Result<Vec<Row>> {
    let mut r = open(path, opts)?;
    let mut all = Vec::new();
    while let Some(b) = r.next_batch()? {
        all.extend(b);
    }
    Ok(all)
}

fn stem(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "input".into())
        .split('.')
        .next()
        .unwrap_or("input")
        .to_string()
}

/// Stable generated id: the file's stem and the 0-based row position.
pub fn generated_id(stem: &str, index: u64) -> String {
    format!("{stem}:{index}")
}

fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(other.to_string()),
    }
}

/// Text of a message `content`: a string, or OpenAI content parts (text parts joined).
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(s.as_str()),
                    Value::Object(o) => o.get("text").and_then(Value::as_str),
                    _ => None,
                })
                .collect();
            Some(texts.join("\n"))
        }
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn parse_turns(v: &Value) -> std::result::Result<Vec<Turn>, String> {
    let arr = v
        .as_array()
        .ok_or("turns must be a list of {role, content} objects")?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, t) in arr.iter().enumerate() {
        let o = t
            .as_object()
            .ok_or_else(|| format!("turn {i} is not an object with role and content"))?;
        let role = o
            .get("role")
            .or_else(|| o.get("from"))
            .or_else(|| o.get("speaker"))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("turn {i} has no `role`"))?;
        let content = o
            .get("content")
            .or_else(|| o.get("value"))
            .or_else(|| o.get("text"))
            .and_then(content_text)
            .ok_or_else(|| format!("turn {i} has no text `content`"))?;
        out.push(Turn {
            role: Role::parse(role),
            content,
        });
    }
    Ok(out)
}

/// A row from one JSON object, exactly as a JSONL input line is read (the live service and
/// its journal read requests with it).
pub fn row_from_json(
    obj: &serde_json::Map<String, Value>,
    index: u64,
    stem: &str,
    cols: &Columns,
) -> Row {
    row_from_object(obj, index, stem, cols)
}

/// Shared row construction from a JSON object (JSONL rows).
fn row_from_object(
    obj: &serde_json::Map<String, Value>,
    index: u64,
    stem: &str,
    cols: &Columns,
) -> Row {
    let id = obj
        .get(&cols.id)
        .and_then(value_to_string)
        .unwrap_or_else(|| generated_id(stem, index));
    let label = obj.get(&cols.label).and_then(value_to_string);
    let passthrough = cols
        .passthrough
        .iter()
        .map(|c| obj.get(c).cloned().unwrap_or(Value::Null))
        .collect();
    let turns_field = match &cols.turns {
        Some(c) => obj.get(c).map(|v| (c.as_str(), v)),
        None => AUTO_TURNS
            .iter()
            .find_map(|c| obj.get(*c).filter(|v| v.is_array()).map(|v| (*c, v))),
    };
    // A turns field that holds a string (a serialised list, or text put in the wrong field)
    // gets a message saying so, not "no text field".
    let stray_turns: Option<&str> = match &cols.turns {
        Some(c) => obj.get(c).filter(|v| v.is_string()).map(|_| c.as_str()),
        None => AUTO_TURNS
            .iter()
            .copied()
            .find(|c| obj.get(*c).is_some_and(Value::is_string)),
    };
    let content = match (turns_field, obj.get(&cols.text)) {
        (_, None | Some(Value::Null)) if stray_turns.is_some() => Err(format!(
            "`{}` is a string; send a list of {{\"role\", \"content\"}} messages (or the text in `{}`)",
            stray_turns.unwrap_or_default(),
            cols.text
        )),
        (Some((_, v)), _) if !v.is_null() => parse_turns(v).map(Content::Turns),
        (_, Some(Value::String(s))) => Ok(Content::Text(s.clone())),
        (_, Some(Value::Null)) | (_, None) => Err(format!(
            "no `{}` field and no turns field ({}); name the columns with --text-col / --turns-col",
            cols.text,
            cols.turns.clone().unwrap_or_else(|| AUTO_TURNS.join("/"))
        )),
        (_, Some(_)) => Err(format!("`{}` is not a string", cols.text)),
    };
    Row {
        index,
        id,
        content,
        label,
        passthrough,
    }
}

fn error_row(index: u64, stem: &str, cols: &Columns, msg: String) -> Row {
    Row {
        index,
        id: generated_id(stem, index),
        content: Err(msg),
        label: None,
        passthrough: vec![Value::Null; cols.passthrough.len()],
    }
}

pub struct JsonlReader {
    path: PathBuf,
    stem: String,
    reader: Box<dyn BufRead + Send>,
    opts: InputOptions,
    line: u64,
    total: Option<u64>,
    saw_content_column: bool,
    buf: Vec<u8>,
    /// Set once the file cannot be read further (a truncated gzip stream, an I/O error): the
    /// rows before it were returned, the failure became an error row, and reading stops.
    ended: bool,
}

impl JsonlReader {
    pub fn open(path: &Path, opts: InputOptions) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let gz = path.extension().is_some_and(|x| x == "gz");
        // Counting lines of a gzip file would mean decompressing it twice: no total then.
        let total = if gz { None } else { count_lines(path).ok() };
        let reader: Box<dyn BufRead + Send> = if gz {
            Box::new(BufReader::with_capacity(
                1 << 20,
                flate2::read::MultiGzDecoder::new(BufReader::new(f)),
            ))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, f))
        };
        Ok(JsonlReader {
            path: path.to_path_buf(),
            stem: stem(path),
            reader,
            opts,
            line: 0,
            total,
            saw_content_column: false,
            buf: Vec::new(),
            ended: false,
        })
    }

    /// Reads one line into `self.buf`, refusing to buffer more than `max_line_bytes`.
    /// Returns Ok(None) at EOF, Ok(Some(false)) for an over-long line (skipped).
    fn read_line(&mut self) -> Result<Option<bool>> {
        self.buf.clear();
        let max = self.opts.max_line_bytes;
        let mut too_long = false;
        loop {
            let avail = match self.reader.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(&self.path, e)),
            };
            if avail.is_empty() {
                return Ok(if self.buf.is_empty() && !too_long {
                    None
                } else {
                    Some(!too_long)
                });
            }
            let (chunk, done) = match memchr_nl(avail) {
                Some(p) => (&avail[..p], p + 1),
                None => (avail, avail.len()),
            };
            if !too_long {
                if self.buf.len() + chunk.len() > max {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            let found_nl = done <= avail.len() && done > chunk.len();
            self.reader.consume(done);
            if found_nl {
                return Ok(Some(!too_long));
            }
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    let mut last = b'\n';
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&c| c == b'\n').count() as u64;
        last = buf[k - 1];
    }
    Ok(if last != b'\n' { n + 1 } else { n })
}

impl RowReader for JsonlReader {
    fn total_rows(&self) -> Option<u64> {
        self.total
    }

    fn passthrough_types(&self) -> Vec<DataType> {
        vec![DataType::Utf8; self.opts.columns.passthrough.len()]
    }

    fn next_batch(&mut self) -> Result<Option<Vec<Row>>> {
        let mut rows = Vec::with_capacity(self.opts.batch_rows);
        let cols = self.opts.columns.clone();
        while rows.len() < self.opts.batch_rows && !self.ended {
            let ok = match self.read_line() {
                Ok(None) => break,
                Ok(Some(ok)) => ok,
                Err(e) => {
                    // Keep every row read so far; the unreadable rest becomes one error row.
                    self.ended = true;
                    let index = self.line;
                    self.line += 1;
                    let gz = self.path.extension().is_some_and(|x| x == "gz");
                    let advice = if gz {
                        "the gzip stream is truncated or damaged"
                    } else {
                        "the file could not be read further"
                    };
                    rows.push(error_row(
                        index,
                        &self.stem,
                        &cols,
                        format!(
                            "{} line {}: {advice} ({}); the {index} lines before it were read; re-fetch or repair the file, then rerun with --resume to classify the rest",
                            self.path.display(),
                            index + 1,
                            match &e {
                                Error::Io { source, .. } => source.to_string(),
                                other => other.to_string(),
                            }
                        ),
                    ));
                    break;
                }
            };
            let index = self.line;
            self.line += 1;
            let lineno = index + 1;
            let where_ = format!("{} line {lineno}", self.path.display());
            if !ok {
                rows.push(error_row(
                    index,
                    &self.stem,
                    &cols,
                    format!(
                        "{where_}: line longer than {} bytes; split the conversation or raise --max-line-bytes",
                        self.opts.max_line_bytes
                    ),
                ));
                continue;
            }
            // A UTF-8 byte-order mark (Windows editors write one at the start of a file, and
            // concatenated files carry them mid-stream) is not part of the JSON.
            let bytes = trim_ascii(&self.buf);
            let bytes = trim_ascii(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes));
            if bytes.is_empty() {
                continue; // blank lines are not rows
            }
            let v: Value = match serde_json::from_slice(bytes) {
                Ok(v) => v,
                Err(e) => {
                    let utf8 = std::str::from_utf8(bytes).is_ok();
                    let why = if utf8 {
                        format!("broken JSON ({e}); fix or drop the line")
                    } else {
                        "invalid UTF-8; re-encode the file as UTF-8".to_string()
                    };
                    let mut row = error_row(index, &self.stem, &cols, format!("{where_}: {why}"));
                    // The line's id, when the rest of it is readable: the error row must say
                    // which conversation it stands for.
                    if !utf8 {
                        if let Ok(Value::Object(o)) =
                            serde_json::from_str::<Value>(&String::from_utf8_lossy(bytes))
                        {
                            if let Some(id) = o.get(&cols.id).and_then(value_to_string) {
                                row.id = id;
                            }
                        }
                    }
                    rows.push(row);
                    continue;
                }
            };
            let Value::Object(obj) = v else {
                rows.push(error_row(
                    index,
                    &self.stem,
                    &cols,
                    format!("{where_}: not a JSON object"),
                ));
                continue;
            };
            if let Some(want) = &self.opts.split {
                if obj.get(&cols.split).and_then(Value::as_str) != Some(want.as_str()) {
                    continue;
                }
            }
            let mut row = row_from_object(&obj, index, &self.stem, &cols);
            if let Err(e) = &mut row.content {
                *e = format!("{where_}: {e}");
            }
            rows.push(row);
        }
        first_batch_check(&self.path, &mut self.saw_content_column, &rows)?;
        Ok(if rows.is_empty() { None } else { Some(rows) })
    }
}

/// Every row of the first batch failed: almost always a wrong column name or a file that is
/// not conversations at all. Stop instead of writing thousands of errors (JSONL and Parquet
/// alike). Once a readable row was seen, bad rows are per-row errors.
fn first_batch_check(path: &Path, saw_content: &mut bool, rows: &[Row]) -> Result<()> {
    if rows.iter().any(|r| r.content.is_ok()) {
        *saw_content = true;
    }
    if !*saw_content && !rows.is_empty() {
        let first = rows[0].content.as_ref().err().cloned().unwrap_or_default();
        return Err(Error::input(
            path,
            format!(
                "no readable conversation in the first {} rows (first problem: {first})",
                rows.len()
            ),
        ));
    }
    Ok(())
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &b[start..end]
}

/// Which columns of an Arrow schema hold what (resolved once per file or stream).
#[derive(Debug, Clone)]
pub struct BatchColumns {
    pub text: Option<String>,
    pub turns: Option<String>,
    pub id: Option<String>,
    pub label: Option<String>,
    pub split: Option<String>,
    pub columns: Columns,
    /// Arrow types of the pass-through columns (unsupported types become Utf8).
    pub passthrough_types: Vec<DataType>,
}

impl BatchColumns {
    /// Resolves `cols` against an Arrow schema; `origin` names the source in errors.
    pub fn resolve(
        schema: &arrow_schema::Schema,
        cols: &Columns,
        want_split: bool,
        origin: &str,
    ) -> std::result::Result<BatchColumns, String> {
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let has = |c: &str| names.iter().any(|n| n == c);
        let turns = match &cols.turns {
            Some(c) if has(c) => Some(c.clone()),
            Some(c) => {
                return Err(format!(
                    "{origin}: no column `{c}` (columns: {}); fix --turns-col",
                    names.join(", ")
                ))
            }
            None => AUTO_TURNS.iter().find(|c| has(c)).map(|c| c.to_string()),
        };
        let text = has(&cols.text).then(|| cols.text.clone());
        if text.is_none() && turns.is_none() {
            return Err(format!(
                "{origin}: no `{}` column and no turns column ({}); its columns are: {}. Name them with --text-col / --turns-col",
                cols.text,
                AUTO_TURNS.join("/"),
                names.join(", ")
            ));
        }
        let split = if want_split {
            if !has(&cols.split) {
                return Err(format!(
                    "{origin}: --split needs a `{}` column; there is none",
                    cols.split
                ));
            }
            Some(cols.split.clone())
        } else {
            None
        };
        let mut passthrough_types = Vec::new();
        for c in &cols.passthrough {
            let f = schema.field_with_name(c).map_err(|_| {
                format!(
                    "{origin}: pass-through column `{c}` is missing (columns: {})",
                    names.join(", ")
                )
            })?;
            passthrough_types.push(match f.data_type() {
                t @ (DataType::Boolean
                | DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64
                | DataType::Float32
                | DataType::Float64) => t.clone(),
                _ => DataType::Utf8,
            });
        }
        Ok(BatchColumns {
            text,
            turns,
            id: has(&cols.id).then(|| cols.id.clone()),
            label: has(&cols.label).then(|| cols.label.clone()),
            split,
            columns: cols.clone(),
            passthrough_types,
        })
    }

    /// The columns a reader needs to load.
    pub fn projection(&self) -> Vec<String> {
        let mut p: Vec<String> = Vec::new();
        for c in [&self.text, &self.turns, &self.id, &self.label, &self.split]
            .into_iter()
            .flatten()
        {
            if !p.contains(c) {
                p.push(c.clone());
            }
        }
        for c in &self.columns.passthrough {
            if !p.contains(c) {
                p.push(c.clone());
            }
        }
        p
    }

    /// Converts a record batch to rows; rows are numbered from `first_index`, ids generated
    /// from `stem` where absent, `origin` names the source in per-row errors.
    pub fn rows(
        &self,
        batch: &RecordBatch,
        split: Option<&str>,
        first_index: u64,
        stem: &str,
        origin: &str,
    ) -> Vec<Row> {
        let cols = &self.columns;
        let get = |name: &Option<String>| -> Option<ArrayRef> {
            name.as_ref().and_then(|n| batch.column_by_name(n).cloned())
        };
        // A categorical (dictionary-encoded) text column is text: decoded here once per batch.
        let text = get(&self.text).map(decode_dictionary);
        let turns = get(&self.turns);
        let ids = get(&self.id).map(as_utf8);
        let labels = get(&self.label).map(as_utf8);
        let splits = get(&self.split).map(as_utf8);
        let pass: Vec<Option<ArrayRef>> = cols
            .passthrough
            .iter()
            .map(|c| batch.column_by_name(c).cloned())
            .collect();
        let mut rows = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let index = first_index + i as u64;
            if let (Some(want), Some(s)) = (split, &splits) {
                if utf8_at(s, i).as_deref() != Some(want) {
                    continue;
                }
            }
            let id = ids
                .as_ref()
                .and_then(|a| utf8_at(a, i))
                .unwrap_or_else(|| generated_id(stem, index));
            let from_turns = turns
                .as_ref()
                .filter(|a| !a.is_null(i))
                .map(|a| turns_at(a, i));
            let content = match (from_turns, &text) {
                (Some(t), _) => t.map(Content::Turns),
                // As in JSONL, a number or a list is not a conversation: no silent stringify.
                (None, Some(a)) if !is_text_type(a.data_type()) => Err(format!(
                    "`{}` is not text (column type {}); name the text column with --text-col",
                    cols.text,
                    a.data_type()
                )),
                (None, Some(a)) => match utf8_at(a, i) {
                    Some(s) => Ok(Content::Text(s)),
                    None if a.data_type() == &DataType::Binary
                        || a.data_type() == &DataType::LargeBinary =>
                    {
                        Err(format!("`{}` is not valid UTF-8 text", cols.text))
                    }
                    None => Err(format!("`{}` is null", cols.text)),
                },
                (None, None) => Err("turns are null and there is no text column".to_string()),
            }
            .map_err(|e| format!("{origin} row {index}: {e}"));
            let label = labels.as_ref().and_then(|a| utf8_at(a, i));
            let passthrough = pass
                .iter()
                .map(|a| a.as_ref().map_or(Value::Null, |a| json_at(a, i)))
                .collect();
            rows.push(Row {
                index,
                id,
                content,
                label,
                passthrough,
            });
        }
        rows
    }
}

/// Parquet input: read row group by row group; a batch that fails to decode (invalid UTF-8, a
/// damaged page) is re-read row by row so that only the bad rows become error rows.
pub struct ParquetReader {
    path: PathBuf,
    stem: String,
    opts: InputOptions,
    meta_rows: Vec<i64>,
    group: usize,
    /// Rows already emitted (or skipped) from the current group.
    offset_in_group: usize,
    reader: Option<parquet::arrow::arrow_reader::ParquetRecordBatchReader>,
    bc: BatchColumns,
    base_index: u64,
    saw_content: bool,
}

impl ParquetReader {
    pub fn open(path: &Path, opts: InputOptions) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // The parquet crate panics on some malformed files (found by fuzzing): a damaged file
        // must be an error, never a crash.
        let builder = crate::error::no_panic(|| ParquetRecordBatchReaderBuilder::try_new(f))
            .map_err(|p| format!("damaged: {p}"))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| Error::input(path, format!("not a readable Parquet file ({e})")))?;
        let bc = BatchColumns::resolve(builder.schema(), &opts.columns, opts.split.is_some(), "")
            .map_err(|e| Error::input(path, e.trim_start_matches(": ").to_string()))?;
        let meta_rows = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        Ok(ParquetReader {
            path: path.to_path_buf(),
            stem: stem(path),
            opts,
            meta_rows,
            group: 0,
            offset_in_group: 0,
            reader: None,
            bc,
            base_index: 0,
            saw_content: false,
        })
    }

    fn build_reader(
        &self,
        group: usize,
        skip: usize,
        batch: usize,
    ) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
        crate::error::no_panic(|| self.build_reader_unguarded(group, skip, batch)).unwrap_or_else(
            |p| {
                Err(Error::input(
                    &self.path,
                    format!("row group {group} is damaged ({p})"),
                ))
            },
        )
    }

    fn build_reader_unguarded(
        &self,
        group: usize,
        skip: usize,
        batch: usize,
    ) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
        let f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| Error::input(&self.path, e.to_string()))?;
        let schema = builder.parquet_schema();
        let roots: Vec<usize> = self
            .bc
            .projection()
            .iter()
            .filter_map(|c| builder.schema().index_of(c).ok())
            .collect();
        let mask = parquet::arrow::ProjectionMask::roots(schema, roots);
        let mut b = builder
            .with_projection(mask)
            .with_row_groups(vec![group])
            .with_batch_size(batch);
        if skip > 0 {
            let total = self.meta_rows[group] as usize;
            b = b.with_row_selection(RowSelection::from(vec![
                RowSelector::skip(skip),
                RowSelector::select(total - skip),
            ]));
        }
        b.build()
            .map_err(|e| Error::input(&self.path, e.to_string()))
    }

    fn convert(&self, batch: &RecordBatch, first_index: u64) -> Vec<Row> {
        let origin = self.path.display().to_string();
        self.bc.rows(
            batch,
            self.opts.split.as_deref(),
            first_index,
            &self.stem,
            &origin,
        )
    }

    /// Re-reads `n` rows starting at `skip` in `group` one at a time, turning undecodable rows
    /// into error rows.
    fn salvage(&self, group: usize, skip: usize, n: usize, first_index: u64) -> Result<Vec<Row>> {
        let mut out = Vec::new();
        for k in 0..n {
            let index = first_index + k as u64;
            let next = self
                .build_reader(group, skip + k, 1)
                .map_err(|e| e.to_string())
                .and_then(|mut r| {
                    crate::error::no_panic(move || r.next().map(|b| b.map_err(|e| e.to_string())))
                        .map_err(|p| format!("damaged page: {p}"))
                })
                .unwrap_or_else(|e| Some(Err(e)));
            match next {
                Some(Ok(b)) => out.extend(self.convert(&b, index)),
                Some(Err(e)) => out.push(error_row(
                    index,
                    &self.stem,
                    &self.opts.columns,
                    format!(
                        "{} row {index}: cannot decode ({e}); fix the value (UTF-8 text expected), re-export the file, or drop the row",
                        self.path.display()
                    ),
                )),
                None => break,
            }
        }
        Ok(out)
    }
}

impl RowReader for ParquetReader {
    fn total_rows(&self) -> Option<u64> {
        Some(self.meta_rows.iter().sum::<i64>() as u64)
    }

    fn passthrough_types(&self) -> Vec<DataType> {
        self.bc.passthrough_types.clone()
    }

    fn next_batch(&mut self) -> Result<Option<Vec<Row>>> {
        loop {
            if self.group >= self.meta_rows.len() {
                return Ok(None);
            }
            let group_rows = self.meta_rows[self.group] as usize;
            if self.offset_in_group >= group_rows {
                self.base_index += group_rows as u64;
                self.group += 1;
                self.offset_in_group = 0;
                self.reader = None;
                continue;
            }
            let first_index = self.base_index + self.offset_in_group as u64;
            if self.reader.is_none() {
                match self.build_reader(self.group, self.offset_in_group, self.opts.batch_rows) {
                    Ok(r) => self.reader = Some(r),
                    Err(e) => {
                        // The row group cannot even be opened: its rows become error rows,
                        // a batch at a time, and reading goes on with the next group.
                        let n = self.opts.batch_rows.min(group_rows - self.offset_in_group);
                        self.offset_in_group += n;
                        let rows: Vec<Row> = (0..n as u64)
                            .map(|k| {
                                let index = first_index + k;
                                error_row(
                                    index,
                                    &self.stem,
                                    &self.opts.columns,
                                    format!("{} row {index}: cannot decode ({e}); repair or re-export the file", self.path.display()),
                                )
                            })
                            .collect();
                        return Ok(Some(rows));
                    }
                }
            }
            let next = match self.reader.as_mut() {
                Some(r) => crate::error::no_panic(|| r.next()).unwrap_or_else(|p| {
                    Some(Err(arrow_schema::ArrowError::ExternalError(p.into())))
                }),
                None => None,
            };
            match next {
                None => {
                    self.offset_in_group = group_rows;
                }
                Some(Ok(batch)) => {
                    self.offset_in_group += batch.num_rows();
                    let rows = self.convert(&batch, first_index);
                    if !rows.is_empty() {
                        first_batch_check(&self.path, &mut self.saw_content, &rows)?;
                        return Ok(Some(rows));
                    }
                }
                Some(Err(_)) => {
                    let n = self.opts.batch_rows.min(group_rows - self.offset_in_group);
                    let rows = self.salvage(self.group, self.offset_in_group, n, first_index)?;
                    self.offset_in_group += n;
                    self.reader = None; // rebuild past the damaged stretch
                    if !rows.is_empty() {
                        return Ok(Some(rows));
                    }
                }
            }
        }
    }
}

fn is_text_type(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::Null
    )
}

/// A dictionary-encoded column as its plain values (Polars' and pandas' categoricals are
/// written that way); any other column as it is.
fn decode_dictionary(a: ArrayRef) -> ArrayRef {
    match a.data_type() {
        DataType::Dictionary(_, v) => arrow_cast::cast(&a, v).unwrap_or(a),
        _ => a,
    }
}

fn as_utf8(a: ArrayRef) -> ArrayRef {
    match a.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary => a,
        _ => arrow_cast::cast(&a, &DataType::Utf8).unwrap_or(a),
    }
}

fn utf8_at(a: &ArrayRef, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(a.as_string_view().value(i).to_string()),
        DataType::Binary => std::str::from_utf8(a.as_binary::<i32>().value(i))
            .ok()
            .map(str::to_string),
        DataType::LargeBinary => std::str::from_utf8(a.as_binary::<i64>().value(i))
            .ok()
            .map(str::to_string),
        _ => None,
    }
}

fn json_at(a: &ArrayRef, i: usize) -> Value {
    use arrow_array::types::*;
    if a.is_null(i) {
        return Value::Null;
    }
    macro_rules! num {
        ($t:ty) => {
            Value::from(a.as_primitive::<$t>().value(i))
        };
    }
    match a.data_type() {
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => num!(Float32Type),
        DataType::Float64 => num!(Float64Type),
        _ => {
            let s = as_utf8(a.slice(i, 1));
            utf8_at(&s, 0).map_or(Value::Null, Value::String)
        }
    }
}

/// Turns from a `List<Struct{role, content}>` cell.
fn turns_at(a: &ArrayRef, i: usize) -> std::result::Result<Vec<Turn>, String> {
    let item = match a.data_type() {
        DataType::List(_) => a.as_list::<i32>().value(i),
        DataType::LargeList(_) => a.as_list::<i64>().value(i),
        _ => return Err("turns column must be a list of {role, content} structs".into()),
    };
    let s = item
        .as_struct_opt()
        .ok_or("turns column must be a list of {role, content} structs")?;
    let field = |names: &[&str]| names.iter().find_map(|n| s.column_by_name(n).cloned());
    let roles = field(&["role", "from", "speaker"]).ok_or("turn structs have no `role` field")?;
    let contents =
        field(&["content", "value", "text"]).ok_or("turn structs have no `content` field")?;
    if !is_text_type(contents.data_type()) {
        return Err(format!(
            "turn `content` is not text (type {})",
            contents.data_type()
        ));
    }
    let roles = as_utf8(roles);
    let contents = as_utf8(contents);
    let mut out = Vec::with_capacity(s.len());
    for k in 0..s.len() {
        let role = utf8_at(&roles, k).ok_or_else(|| format!("turn {k} has no role"))?;
        out.push(Turn {
            role: Role::parse(&role),
            content: utf8_at(&contents, k).unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Columns {
        Columns::default()
    }

    #[test]
    fn parses_text_turns_and_messages() {
        let v: Value = serde_json::from_str(
            r#"{"id": 7, "messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": [{"type": "text", "text": "hello"}]}], "label": "greet"}"#,
        )
        .unwrap();
        let r = row_from_object(v.as_object().unwrap(), 3, "f", &cols());
        assert_eq!(r.id, "7");
        assert_eq!(r.label.as_deref(), Some("greet"));
        match r.content.unwrap() {
            Content::Turns(t) => {
                assert_eq!(t.len(), 2);
                assert_eq!(t[0].role, Role::User);
                assert_eq!(t[1].role, Role::Assistant);
                assert_eq!(t[1].content, "hello");
            }
            _ => panic!("expected turns"),
        }
        let v: Value = serde_json::from_str(r#"{"text": "plain"}"#).unwrap();
        let r = row_from_object(v.as_object().unwrap(), 3, "f", &cols());
        assert_eq!(r.id, "f:3");
        assert_eq!(r.content.unwrap(), Content::Text("plain".into()));
    }

    #[test]
    fn missing_column_is_a_row_error() {
        let v: Value = serde_json::from_str(r#"{"body": "x"}"#).unwrap();
        let r = row_from_object(v.as_object().unwrap(), 0, "f", &cols());
        assert!(r.content.unwrap_err().contains("--text-col"));
    }
}
