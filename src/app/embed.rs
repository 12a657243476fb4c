//! The embed job: vectors of a file's conversations to Parquet.

use super::index::AddSummary;
use crate::embed::Encoder;
use crate::input::{self, InputOptions};
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::Path;

/// Embeds every readable row of `path` into a Parquet file of `id`, `label`, `vector`
/// (fixed-size list of f32). Rows that cannot be read or rendered are listed in the summary.
pub fn embed_file(
    encoder: &Encoder,
    path: &Path,
    opts: &InputOptions,
    out: &Path,
    progress: &Progress,
) -> Result<AddSummary> {
    use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let start = std::time::Instant::now();
    let d = encoder.dim();
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new(
            "vector",
            DataType::FixedSizeList(item.clone(), d as i32),
            false,
        ),
    ]));
    let f = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema.clone(), None)
        .map_err(|e| Error::output(out, e.to_string()))?;
    let mut reader = input::open(path, opts)?;
    let mut s = AddSummary::default();
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        let mut flat = Vec::new();
        for (r, e) in rows.iter().zip(encoder.embed_rows(&rows)?) {
            match e {
                Ok(e) => {
                    ids.push(r.id.clone());
                    labels.push(r.label.clone());
                    flat.extend_from_slice(&e.vector);
                }
                Err(e) => {
                    s.skipped_errors += 1;
                    if s.problems.len() < 10 {
                        s.problems.push(e);
                    }
                }
            }
        }
        if ids.is_empty() {
            continue;
        }
        let v = flat;
        s.added += ids.len();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(ids)),
            Arc::new(StringArray::from_iter(labels)),
            Arc::new(
                FixedSizeListArray::try_new(
                    item.clone(),
                    d as i32,
                    Arc::new(Float32Array::from(v)),
                    None,
                )
                .map_err(|e| Error::output(out, e.to_string()))?,
            ),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| Error::output(out, e.to_string()))?;
        w.write(&batch)
            .map_err(|e| Error::output(out, e.to_string()))?;
    }
    w.close().map_err(|e| Error::output(out, e.to_string()))?;
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}
