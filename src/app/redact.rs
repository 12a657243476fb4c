//! The redact job (`semtel redact`): the same redaction stage the LLM tier runs, applied to a
//! whole file, for users who share data. Every input row yields one output row: its id, its
//! conversation with personal data replaced by typed placeholders (`text` or `messages`, as it
//! came), and `redacted`, the entities replaced by type; rows that cannot be read are written
//! with their `error`. Output is JSON Lines, written aside and renamed into place.
//!
//! This job never prints and never writes a redacted value anywhere.

use crate::conversation::Content;
use crate::input::{self, InputOptions};
use crate::pii::{Counts, Redactor};
use crate::{Error, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

#[derive(Debug, Default, Clone, Serialize)]
pub struct RedactSummary {
    pub rows: u64,
    pub rows_redacted: u64,
    pub error_rows: u64,
    /// Entities replaced, by type.
    pub redacted: Counts,
    pub seconds: f64,
}

/// Redacts every row of `input` into `output` (JSON Lines).
pub fn run(
    red: &Redactor,
    input: &Path,
    opts: &InputOptions,
    output: &Path,
    overwrite: bool,
) -> Result<RedactSummary> {
    let t = std::time::Instant::now();
    if output.exists() && !overwrite {
        return Err(Error::Config(format!(
            "{} exists: pass --overwrite to replace it",
            output.display()
        )));
    }
    let mut name = output.as_os_str().to_owned();
    name.push(".partial");
    let tmp = std::path::PathBuf::from(name);
    let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(f);
    let mut s = RedactSummary::default();
    let mut reader = input::open(input, opts)?;
    while let Some(rows) = reader.next_batch()? {
        // Rows are independent: redact a batch on every core.
        use rayon::prelude::*;
        let lines: Vec<(serde_json::Value, Option<Counts>)> = rows
            .par_iter()
            .map(|r| {
                let mut o = serde_json::Map::new();
                o.insert("id".into(), r.id.clone().into());
                match &r.content {
                    Ok(c) => {
                        let (c, counts) = red.redact_content(c);
                        match c {
                            Content::Text(t) => o.insert("text".into(), t.into()),
                            Content::Turns(ts) => o.insert(
                                "messages".into(),
                                serde_json::to_value(ts).unwrap_or_default(),
                            ),
                        };
                        o.insert(
                            "redacted".into(),
                            serde_json::to_value(&counts).unwrap_or_default(),
                        );
                        if let Some(l) = &r.label {
                            o.insert("label".into(), l.clone().into());
                        }
                        (serde_json::Value::Object(o), Some(counts))
                    }
                    Err(e) => {
                        o.insert("error".into(), e.clone().into());
                        (serde_json::Value::Object(o), None)
                    }
                }
            })
            .collect();
        for (v, counts) in lines {
            s.rows += 1;
            match counts {
                Some(c) => {
                    if !c.is_empty() {
                        s.rows_redacted += 1;
                    }
                    s.redacted.add(&c);
                }
                None => s.error_rows += 1,
            }
            writeln!(w, "{v}").map_err(|e| Error::io(&tmp, e))?;
        }
    }
    w.flush().map_err(|e| Error::io(&tmp, e))?;
    drop(w);
    crate::fsio::commit(&tmp, output)?;
    s.seconds = t.elapsed().as_secs_f64();
    Ok(s)
}
