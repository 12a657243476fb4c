//! Wiring: the classifier core (render → embed → search → decide for a chunk of rows) and the
//! streaming run that connects reader, compute and writer threads with bounded channels, so a
//! slow stage holds back the ones before it instead of buffering without limit.
//! This module owns no format or model details; it only moves typed values between stages.

use crate::conversation::{Content, Row};
use crate::decide::{vote, Signal, Thresholds};
use crate::embed::{Encoder, EncoderOptions};
use crate::index::ExemplarIndex;
use crate::input::RowReader;
use crate::output::{DecidedBy, NeighborOut, OutputRow, OutputWriter};
use crate::progress::Progress;
use crate::render::Rendered;
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

/// A row's embedding, or why it has none.
pub type RowVector = std::result::Result<Vec<f32>, String>;

/// One classified row plus what the LLM tier needs if it was escalated.
pub struct Classified {
    pub out: OutputRow,
    /// Present for escalated rows only.
    pub content: Option<Content>,
    /// Embedding of the row (present for escalated rows only; the exemplar index can grow from it).
    pub vector: Option<Vec<f32>>,
    /// The kNN vote (absent for error rows).
    pub vote: Option<crate::decide::Vote>,
    /// (label, text) of the nearest exemplars, for escalated rows (few-shot prompts).
    pub examples: Vec<(String, String)>,
}

/// Nearest exemplars attached to an escalated row as few-shot examples.
const EXAMPLES_PER_ROW: usize = 4;
/// Characters of each attached example.
const EXAMPLE_CHARS: usize = 600;

/// Everything needed to classify: the encoder, the exemplar index and the decision settings.
pub struct Classifier {
    pub encoder: Encoder,
    pub index: ExemplarIndex,
    pub k: usize,
    pub thresholds: Thresholds,
    /// Neighbours reported per output row.
    pub report_neighbors: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ClassifierOptions {
    pub encoder: EncoderOptions,
    pub k: Option<usize>,
    pub threshold: Option<f32>,
    pub signal: Option<Signal>,
    /// Open the index for adding exemplars (loads it into memory instead of mapping it).
    pub writable: bool,
}

impl Classifier {
    pub fn open(index_dir: &Path, opts: &ClassifierOptions) -> Result<Self> {
        let index = ExemplarIndex::open(index_dir, !opts.writable)?;
        let mut enc_opts = opts.encoder.clone();
        if enc_opts.model.is_none() {
            // Default to the model the index was built with.
            enc_opts.model = Some(index.manifest.model.id.clone());
        }
        enc_opts.include_system_turns |= index.manifest.build.include_system_turns;
        let encoder = Encoder::load(&enc_opts)?;
        Self::new(encoder, index, opts)
    }

    pub fn new(encoder: Encoder, index: ExemplarIndex, opts: &ClassifierOptions) -> Result<Self> {
        index.check_model(&encoder.files, encoder.dim())?;
        if index.is_empty() {
            return Err(Error::index(index.dir(), "the index holds no exemplars"));
        }
        let d = &index.manifest.decision;
        let signal = match opts.signal {
            Some(s) => s,
            None => d.signal.parse().map_err(Error::Config)?,
        };
        let k = opts.k.unwrap_or(d.k).max(1);
        let mut thresholds = Thresholds::global(
            signal,
            opts.threshold.unwrap_or(d.threshold),
            index.labels().len(),
        );
        if opts.threshold.is_none() {
            for (label, t) in &d.per_label {
                if let Ok(i) = index.labels().binary_search(label) {
                    thresholds.per_label[i] = *t;
                }
            }
        }
        Ok(Classifier {
            encoder,
            index,
            k,
            thresholds,
            report_neighbors: k,
        })
    }

    /// Renders rows to token ids in parallel (errors stay per row).
    pub fn render(&self, rows: &[Row]) -> Vec<std::result::Result<Rendered, String>> {
        rows.par_iter()
            .map(|r| match &r.content {
                Ok(c) => self.encoder.renderer.render(c),
                Err(e) => Err(e.clone()),
            })
            .collect()
    }

    /// Embeds rendered rows; rows that failed to render keep their error.
    pub fn embed(
        &self,
        rendered: &[std::result::Result<Rendered, String>],
    ) -> Result<Vec<RowVector>> {
        let ok: Vec<&[u32]> = rendered
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.ids.as_slice()))
            .collect();
        let flat = self.encoder.embed_ids(&ok)?;
        let d = self.encoder.dim();
        let mut it = flat.chunks(d);
        Ok(rendered
            .iter()
            .map(|r| match r {
                Ok(_) => Ok(it.next().expect("one vector per rendered row").to_vec()),
                Err(e) => Err(e.clone()),
            })
            .collect())
    }

    /// The full chunk step: render, embed, search, decide.
    pub fn classify(&self, rows: Vec<Row>) -> Result<Vec<Classified>> {
        let rendered = self.render(&rows);
        let vectors = self.embed(&rendered)?;
        self.decide(rows, vectors)
    }

    /// Search and vote for rows whose vectors are known.
    pub fn decide(&self, rows: Vec<Row>, vectors: Vec<RowVector>) -> Result<Vec<Classified>> {
        let d = self.encoder.dim();
        let mut flat = Vec::with_capacity(rows.len() * d);
        for v in vectors.iter().flatten() {
            flat.extend_from_slice(v);
        }
        let neighbors = self.index.search_batch(&flat, self.k)?;
        let mut nb_iter = neighbors.into_iter();
        let labels = self.index.labels();
        let label_of = self.index.label_indices();
        let mut scratch = vec![0f32; labels.len()];
        let mut out = Vec::with_capacity(rows.len());
        for (row, vec) in rows.into_iter().zip(vectors) {
            let vector = match vec {
                Ok(v) => v,
                Err(msg) => {
                    let msg = if row.content.is_err() {
                        msg
                    } else {
                        format!("row {}: {msg}", row.id)
                    };
                    out.push(Classified {
                        out: OutputRow::error(row.id, msg, row.passthrough),
                        content: None,
                        vector: None,
                        vote: None,
                        examples: Vec::new(),
                    });
                    continue;
                }
            };
            let nb = nb_iter.next().unwrap_or_default();
            let v = vote(&nb, label_of, &mut scratch);
            let conf = v.signal(self.thresholds.signal);
            let keep = self.thresholds.keep(v.label, conf);
            let knn_label = v.label.map(|l| labels[l as usize].clone());
            let neighbors = nb
                .iter()
                .take(self.report_neighbors)
                .map(|&(key, score)| {
                    let e = self.index.exemplar(key);
                    NeighborOut {
                        id: e.id.clone(),
                        label: e.label.clone(),
                        score,
                    }
                })
                .collect();
            let escalate = !keep;
            let examples = if escalate {
                nb.iter()
                    .take(EXAMPLES_PER_ROW)
                    .map(|&(key, _)| {
                        let e = self.index.exemplar(key);
                        let mut t = e.text.clone();
                        if t.len() > EXAMPLE_CHARS {
                            let mut i = EXAMPLE_CHARS;
                            while !t.is_char_boundary(i) {
                                i -= 1;
                            }
                            t.truncate(i);
                        }
                        (e.label.clone(), t)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            out.push(Classified {
                out: OutputRow {
                    id: row.id,
                    label: if keep { knn_label.clone() } else { None },
                    confidence: Some(conf),
                    margin: Some(v.margin),
                    top1_sim: Some(v.top1_sim),
                    decided_by: if keep {
                        DecidedBy::Knn
                    } else {
                        DecidedBy::Escalate
                    },
                    knn_label,
                    neighbors,
                    error: None,
                    llm: None,
                    passthrough: row.passthrough,
                },
                content: if escalate { row.content.ok() } else { None },
                vector: if escalate { Some(vector) } else { None },
                vote: Some(v),
                examples,
            });
        }
        Ok(out)
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    pub rows_read: u64,
    pub rows_skipped_resume: u64,
    pub rows_written: u64,
    pub knn: u64,
    pub escalated: u64,
    pub llm: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
}

/// What happens to escalated rows. The default keeps them as `escalate` in the output; the LLM
/// tier implements this to label them.
pub trait Escalation: Send {
    /// Takes the escalated rows of one chunk; labelled rows must be sent to `out` eventually.
    fn submit(&mut self, rows: Vec<Classified>, out: &SyncSender<Vec<OutputRow>>) -> Result<()>;
    /// Waits for everything submitted, sending the remaining rows to `out`.
    fn finish(&mut self, out: &SyncSender<Vec<OutputRow>>) -> Result<()>;
    /// Called after a chunk has been decided, with the rows kept by kNN (lets the exemplar index
    /// grow, for instance). Default: nothing.
    fn summary(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Escalated rows are written as they are.
pub struct NoEscalation;

impl Escalation for NoEscalation {
    fn submit(&mut self, rows: Vec<Classified>, out: &SyncSender<Vec<OutputRow>>) -> Result<()> {
        out.send(rows.into_iter().map(|c| c.out).collect())
            .map_err(|_| Error::Other("writer stopped".into()))
    }
    fn finish(&mut self, _out: &SyncSender<Vec<OutputRow>>) -> Result<()> {
        Ok(())
    }
}

/// Streams `reader` through `classifier` into `writer`, skipping ids in `done`.
pub fn run(
    classifier: &Classifier,
    mut reader: Box<dyn RowReader>,
    mut writer: OutputWriter,
    done: HashSet<String>,
    escalation: &mut dyn Escalation,
    progress: &Progress,
) -> Result<RunSummary> {
    let start = Instant::now();
    let mut summary = RunSummary::default();
    let (row_tx, row_rx): (SyncSender<Vec<Row>>, Receiver<Vec<Row>>) = sync_channel(2);
    let (out_tx, out_rx): (SyncSender<Vec<OutputRow>>, Receiver<Vec<OutputRow>>) = sync_channel(4);
    std::thread::scope(|s| -> Result<RunSummary> {
        // Reader: file → chunks of rows still to do.
        let reader_h = s.spawn(move || -> Result<(u64, u64)> {
            let (mut read, mut skipped) = (0u64, 0u64);
            while let Some(batch) = reader.next_batch()? {
                read += batch.len() as u64;
                progress.inc(batch.len() as u64);
                let n = batch.len() as u64;
                let todo: Vec<Row> = if done.is_empty() {
                    batch
                } else {
                    batch
                        .into_iter()
                        .filter(|r| !done.contains(&r.id))
                        .collect()
                };
                skipped += n - todo.len() as u64;
                if todo.is_empty() {
                    continue;
                }
                if row_tx.send(todo).is_err() {
                    break; // compute stage stopped; its error is reported there
                }
            }
            Ok((read, skipped))
        });
        // Writer: rows → disk, checkpointing at least every few seconds.
        let writer_h = s.spawn(move || -> Result<(OutputWriter, [u64; 4])> {
            let mut counts = [0u64; 4];
            let mut last = Instant::now();
            loop {
                match out_rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(rows) => {
                        for r in &rows {
                            counts[match r.decided_by {
                                DecidedBy::Knn => 0,
                                DecidedBy::Escalate => 1,
                                DecidedBy::Llm => 2,
                                DecidedBy::Error => 3,
                            }] += 1;
                        }
                        writer.write(&rows)?;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if last.elapsed() >= Duration::from_secs(5) {
                    writer.checkpoint()?;
                    last = Instant::now();
                }
            }
            Ok((writer, counts))
        });
        // Compute on this thread: render → embed → search → decide → escalate.
        let compute = (|| -> Result<()> {
            for rows in row_rx.iter() {
                let classified = classifier.classify(rows)?;
                let (esc, decided): (Vec<Classified>, Vec<Classified>) = classified
                    .into_iter()
                    .partition(|c| c.out.decided_by == DecidedBy::Escalate);
                if !decided.is_empty() {
                    out_tx
                        .send(decided.into_iter().map(|c| c.out).collect())
                        .map_err(|_| Error::Other("writer stopped".into()))?;
                }
                if !esc.is_empty() {
                    escalation.submit(esc, &out_tx)?;
                }
            }
            escalation.finish(&out_tx)
        })();
        drop(row_rx);
        drop(out_tx);
        let read_res = reader_h.join().expect("reader thread panicked");
        let write_res = writer_h.join().expect("writer thread panicked");
        // Report the first real failure: compute, then writer, then reader.
        compute?;
        let (writer, counts) = write_res?;
        let (read, skipped) = read_res?;
        summary.rows_read = read;
        summary.rows_written = writer.rows_written();
        summary.rows_skipped_resume = skipped;
        writer.finish()?;
        summary.knn = counts[0];
        summary.escalated = counts[1];
        summary.llm = counts[2];
        summary.errors = counts[3];
        summary.seconds = start.elapsed().as_secs_f64();
        summary.rows_per_second = summary.rows_written as f64 / summary.seconds.max(1e-9);
        Ok(summary)
    })
}
