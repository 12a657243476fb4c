//! Where classified rows go. The streaming run ([`crate::pipeline::run`]) writes through this
//! trait and never names a format: the JSONL/Parquet writer ([`crate::output::OutputWriter`])
//! is one implementation, [`VecSink`] (rows kept in memory, for library users and tests)
//! another, and a server could add its own. This module must never know a file format.

use crate::row::OutputRow;
use crate::Result;
use std::collections::HashMap;

/// A destination for result rows, written in batches as a run goes.
pub trait RowSink: Send {
    /// Stores `rows` (never called with an empty slice).
    fn write(&mut self, rows: &[OutputRow]) -> Result<()>;
    /// Makes everything written so far durable; called every few seconds.
    fn checkpoint(&mut self) -> Result<()> {
        Ok(())
    }
    /// Rows written through this sink in this run.
    fn rows_written(&self) -> u64;
    /// Completes the output after the last row (e.g. assembles a Parquet file).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Keeps rows in memory; [`VecSink::rows`] hands them over once the run is done.
#[derive(Debug, Default, Clone)]
pub struct VecSink {
    shared: std::sync::Arc<std::sync::Mutex<Vec<OutputRow>>>,
}

impl VecSink {
    pub fn new() -> Self {
        Self::default()
    }
    /// The rows written so far (a run moves the sink, so keep a clone to read them).
    pub fn rows(&self) -> Vec<OutputRow> {
        self.shared.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl RowSink for VecSink {
    fn write(&mut self, rows: &[OutputRow]) -> Result<()> {
        if let Ok(mut v) = self.shared.lock() {
            v.extend_from_slice(rows);
        }
        Ok(())
    }
    fn rows_written(&self) -> u64 {
        self.shared.lock().map(|v| v.len() as u64).unwrap_or(0)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Rows an earlier run already wrote, counted per id (ids may repeat in the input).
#[derive(Debug, Default, Clone)]
pub struct Done {
    counts: HashMap<String, u32>,
    rows: u64,
}

impl Done {
    pub fn add(&mut self, id: &str) {
        *self.counts.entry(id.to_string()).or_insert(0) += 1;
        self.rows += 1;
    }
    /// Rows already written.
    pub fn len(&self) -> u64 {
        self.rows
    }
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
    /// Whether an input row with `id` was already written; consumes one written occurrence.
    pub fn take(&mut self, id: &str) -> bool {
        match self.counts.get_mut(id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(id);
                }
                true
            }
            _ => false,
        }
    }
    pub fn contains(&self, id: &str) -> bool {
        self.counts.contains_key(id)
    }
    /// The ids written (each once, however often).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.counts.keys().map(String::as_str)
    }
}
