//! Wiring: the classifier core (render → embed → search → decide for a chunk of rows) and the
//! streaming run that connects reader, compute and writer threads with bounded channels, so a
//! slow stage holds back the ones before it instead of buffering without limit.
//! This module owns no format or model details; it only moves typed values between stages.

use crate::conversation::{Content, Row};
use crate::decide::{vote_distribution, vote_labeled, Pick, Scores, Signal, Thresholds};
use crate::embed::{Encoder, EncoderOptions};
use crate::index::ExemplarIndex;
use crate::input::RowReader;
use crate::progress::Progress;
use crate::row::{DecidedBy, EscalateReason, NeighborOut, OutputRow};
use crate::sink::{Done, RowSink};
use crate::{Error, Result};
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

/// A row's embedding, or why it has none.
pub type RowVector = std::result::Result<Vec<f32>, String>;

/// One classified row plus what the LLM tier needs if it was escalated.
#[derive(Clone)]
pub struct Classified {
    pub out: OutputRow,
    /// Present for escalated rows only.
    pub content: Option<Content>,
    /// Embedding of the row (present for escalated and audited rows only; the exemplar index
    /// can grow from it).
    pub vector: Option<Vec<f32>>,
    /// A kept row chosen for audit (`--audit-rate`): it goes to the LLM tier too, blind, and
    /// keeps its kNN label; the LLM's answer lands in `out.audit`.
    pub audit: bool,
    /// The kNN vote and head scores (absent for error rows).
    pub scores: Option<Scores>,
    /// (label, text) of the nearest exemplars, for escalated rows (few-shot prompts).
    pub examples: Vec<(String, String)>,
}

/// Nearest exemplars attached to an escalated row as few-shot examples.
const EXAMPLES_PER_ROW: usize = 4;
/// Characters of each attached example.
const EXAMPLE_CHARS: usize = 600;

/// An additional label set applied from the same embedding pass (`classify --also`).
pub struct Taxonomy {
    pub name: String,
    pub index: ExemplarIndex,
    pub k: usize,
    pub thresholds: Thresholds,
    pub head: Option<crate::head::Head>,
    pub multi_label: bool,
    /// Per-label rules of a multi-label index calibrated with the head (else empty: the
    /// kNN vote decides).
    pub rules: Vec<crate::multilabel::LabelRule>,
    /// The index's per-language centring, when it was built with one.
    pub space: Option<crate::center::QuerySpace>,
}

impl Taxonomy {
    /// Opens an index as a taxonomy for `encoder` (it must share the encoder's model).
    pub fn open(name: &str, dir: &Path, encoder: &Encoder) -> Result<Taxonomy> {
        let index = ExemplarIndex::open(dir, true)?;
        index.check_model(&encoder.files, encoder.dim())?;
        let d = &index.manifest.decision;
        let multi_label = index.manifest.build.multi_label;
        let signal: Signal = if multi_label {
            Signal::Vote
        } else {
            d.signal.single().unwrap_or_default()
        };
        let mut thresholds = Thresholds::global(signal, d.threshold, index.labels().len());
        for (label, t) in &d.per_label {
            if let Ok(i) = index.labels().binary_search(label) {
                thresholds.per_label[i] = *t;
            }
        }
        let multi_head = d.signal == crate::index::DecisionSignal::MultiHead;
        let head = if multi_label && !multi_head {
            None
        } else {
            crate::head::Head::load(dir)?
        };
        let rules: Vec<crate::multilabel::LabelRule> = if multi_head {
            index
                .labels()
                .iter()
                .map(|l| d.label_rules.get(l).copied().unwrap_or_default())
                .collect()
        } else {
            Vec::new()
        };
        if multi_head && !head.as_ref().is_some_and(|h| h.multi_label()) {
            return Err(Error::index(
                dir,
                "its multi-label head is missing or is not one-vs-rest; rerun `semtel calibrate`",
            ));
        }
        if !multi_label && signal.needs_head() && head.is_none() {
            return Err(Error::index(
                dir,
                "its signal needs the learned head, which is missing; rerun `semtel calibrate`",
            ));
        }
        Ok(Taxonomy {
            name: name.to_string(),
            k: d.k,
            space: index.query_space(),
            index,
            thresholds,
            head,
            multi_label,
            rules,
        })
    }

    /// Decides one row under this taxonomy from its `hits` (key, similarity).
    pub fn decide(
        &self,
        hits: &[(u64, f32)],
        vector: &[f32],
        ids: &[u32],
        scratch: &mut [f32],
    ) -> crate::row::TaxOut {
        let labels = self.index.labels();
        let label_of = self.index.label_indices();
        if let (true, Some(h)) = (self.multi_label && !self.rules.is_empty(), &self.head) {
            let d = crate::multilabel::decide(&h.predict(vector, ids), &self.rules);
            let names = |v: &[u32]| v.iter().map(|&l| labels[l as usize].clone()).collect();
            return crate::row::TaxOut {
                label: None,
                labels: Some(names(&d.labels)),
                uncertain: Some(names(&d.uncertain)),
                confidence: Some(d.confidence),
                decided_by: if d.uncertain.is_empty() {
                    DecidedBy::Knn
                } else {
                    DecidedBy::Escalate
                },
            };
        }
        if self.multi_label {
            let group = |key: u64| crate::hash::group_key(&self.index.exemplar(key).id);
            let labeled: Vec<(u64, u32, f32)> = hits
                .iter()
                .map(|&(k, s)| (group(k), label_of[k as usize], s))
                .collect();
            let v = crate::decide::multi_vote(&labeled, self.k);
            let keep = v.confidence >= self.thresholds.global && !v.labels.is_empty();
            return crate::row::TaxOut {
                label: None,
                labels: Some(
                    v.labels
                        .iter()
                        .map(|&l| labels[l as usize].clone())
                        .collect(),
                ),
                uncertain: None,
                confidence: Some(v.confidence),
                decided_by: if keep {
                    DecidedBy::Knn
                } else {
                    DecidedBy::Escalate
                },
            };
        }
        let top: Vec<(u32, f32)> = hits
            .iter()
            .take(self.k)
            .map(|&(k, s)| (label_of[k as usize], s))
            .collect();
        let d = decide_single(
            &top,
            self.head.as_ref(),
            vector,
            ids,
            &self.thresholds,
            scratch,
        );
        let (label, conf, keep) = (d.label, d.confidence, d.keep);
        crate::row::TaxOut {
            label: label.map(|l| labels[l as usize].clone()),
            labels: None,
            uncertain: None,
            confidence: Some(conf),
            decided_by: if keep {
                DecidedBy::Knn
            } else {
                DecidedBy::Escalate
            },
        }
    }
}

/// A single-label decision: the scores, the label the configured signal picks, its
/// confidence, and whether the thresholds keep it.
pub struct Decision {
    pub scores: Scores,
    pub label: Option<u32>,
    pub confidence: f32,
    pub keep: bool,
}

/// The one single-label decision, for the main label and for every `--also` taxonomy
/// (`scratch` has one slot per label of the index): the
/// similarity-weighted vote over `labeled` neighbours (label, similarity), the learned head
/// when there is one, their mix, then the thresholds' verdict on the configured signal.
pub fn decide_single(
    labeled: &[(u32, f32)],
    head: Option<&crate::head::Head>,
    vector: &[f32],
    ids: &[u32],
    thresholds: &Thresholds,
    scratch: &mut [f32],
) -> Decision {
    let vote = vote_labeled(labeled, scratch);
    let (head, mix) = match head {
        Some(h) => {
            let p = h.predict(vector, ids);
            let d = vote_distribution(labeled, scratch.len());
            let m: Vec<f32> = p.iter().zip(&d).map(|(a, b)| 0.5 * (a + b)).collect();
            (Pick::of(&p), Pick::of(&m))
        }
        None => (None, None),
    };
    let scores = Scores { vote, head, mix };
    let (label, confidence) = scores.decision(thresholds.signal);
    Decision {
        keep: thresholds.keep(label, confidence),
        scores,
        label,
        confidence,
    }
}

/// Everything needed to classify: the encoder, the exemplar index and the decision settings.
pub struct Classifier {
    pub encoder: Encoder,
    pub index: ExemplarIndex,
    pub k: usize,
    pub thresholds: Thresholds,
    /// Neighbours reported per output row.
    pub report_neighbors: usize,
    /// The learned head, when `semtel calibrate` trained one.
    pub head: Option<crate::head::Head>,
    /// Exemplars learned during this run (`classify --grow`).
    pub growth: Option<std::sync::Arc<crate::grow::Growth>>,
    /// Additional taxonomies decided from the same embeddings.
    pub extra: Vec<Taxonomy>,
    /// Redact personal data before embedding (`[redaction] before_embedding`): the encoder,
    /// the vote, the LLM and a grown index then only ever see placeholders.
    pub redact_input: Option<std::sync::Arc<crate::pii::Redactor>>,
    /// The index's per-language centring (queries are moved into it before the search).
    pub space: Option<crate::center::QuerySpace>,
    /// The index's novelty rule (`crate::novelty`): kept rows past it escalate as `novel`.
    pub novelty: Option<crate::novelty::Novelty>,
    /// Share of kept rows also asked of the LLM, blind, and the seed that picks them (by id,
    /// so a resumed run audits the same rows).
    pub audit: Option<AuditPlan>,
    /// Guards on segments whose audited agreement fell (`crate::guard`), shared with whatever
    /// feeds them evidence.
    pub guards: Option<std::sync::Arc<crate::guard::Guards>>,
    /// Position among the pass-through columns of the column audits are also reported by
    /// (`--segment-col`: an input source, a partition, a market).
    pub audit_segment: Option<usize>,
}

/// Which kept rows are audited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditPlan {
    pub rate: f64,
    pub seed: u64,
    /// The LLM's accuracy when known (`--audit-llm-accuracy`): corrects the estimate and the
    /// guards' bar. `None`: taken as 1.0, and reports say so.
    pub llm_accuracy: Option<f64>,
}

impl AuditPlan {
    /// Whether the row with this id is audited (a hash of the id and the seed: the same rows
    /// in every run with the same seed, and a `rate` share of them).
    pub fn picks(&self, id: &str) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let h = crate::hash::group_key(id) ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        ((h >> 11) as f64 / (1u64 << 53) as f64) < self.rate
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClassifierOptions {
    pub encoder: EncoderOptions,
    pub k: Option<usize>,
    pub threshold: Option<f32>,
    pub signal: Option<Signal>,
    /// Open the index for adding exemplars (otherwise additions are refused).
    pub writable: bool,
    /// `--audit-rate`/`--audit-seed`: kept rows also asked of the LLM.
    pub audit: Option<AuditPlan>,
    /// `--novelty off`: no novelty rule even when the index has one.
    pub no_novelty: bool,
}

impl Classifier {
    pub fn open(index_dir: &Path, opts: &ClassifierOptions) -> Result<Self> {
        let index = ExemplarIndex::open(index_dir, !opts.writable)?;
        let mut enc_opts = opts.encoder.clone();
        if enc_opts.model.is_none() {
            enc_opts.model = Some(crate::index::default_model(
                index_dir,
                &index.manifest.model,
            ));
        }
        enc_opts.include_system_turns |= index.manifest.build.include_system_turns;
        // The index's vectors were made with one precision; queries use it unless told
        // otherwise (then they are comparable but not identical: say so).
        let built = index.manifest.model.precision;
        match enc_opts.precision {
            None => enc_opts.precision = Some(built),
            Some(p) if p != built => tracing::warn!(
                "this index was built with --precision {}; querying it with {} (vectors differ slightly from the exemplars')",
                built.name(),
                p.name()
            ),
            Some(_) => {}
        }
        let encoder = Encoder::load(&enc_opts)?;
        let head = crate::head::Head::load(index_dir)?;
        let mut c = Self::new(encoder, index, opts)?;
        c.set_head(head)?;
        Ok(c)
    }

    /// (name, multi-label) of the additional taxonomies, for the output layout.
    pub fn taxonomy_columns(&self) -> Vec<(String, bool)> {
        self.extra
            .iter()
            .map(|t| (t.name.clone(), t.multi_label))
            .collect()
    }

    /// Attaches (or removes) a learned head; refuses one trained for another label set.
    pub fn set_head(&mut self, head: Option<crate::head::Head>) -> Result<()> {
        if let Some(h) = &head {
            if h.n_labels() != self.index.labels().len() {
                return Err(Error::index(
                    self.index.dir(),
                    "the head was trained for another label set (exemplars were added since); rerun `semtel calibrate`",
                ));
            }
        }
        if head.is_none() && self.thresholds.signal.needs_head() {
            return Err(Error::index(
                self.index.dir(),
                format!(
                    "signal `{}` needs the learned head: run `semtel calibrate` or choose a kNN signal",
                    self.thresholds.signal.name()
                ),
            ));
        }
        self.head = head;
        Ok(())
    }

    pub fn new(encoder: Encoder, index: ExemplarIndex, opts: &ClassifierOptions) -> Result<Self> {
        index.check_model(&encoder.files, encoder.dim())?;
        if index.is_empty() {
            return Err(Error::index(index.dir(), "the index holds no exemplars"));
        }
        let d = &index.manifest.decision;
        let signal = match opts.signal {
            Some(s) => s,
            None => d.signal.single().ok_or_else(|| {
                Error::index(
                    index.dir(),
                    "a multi-label index decides only as an additional taxonomy: pass it with --also NAME=DIR",
                )
            })?,
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
        let novelty = match (&d.novelty, opts.no_novelty) {
            (Some(cfg), false) => Some(crate::novelty::Novelty::new(cfg, index.labels())),
            _ => None,
        };
        Ok(Classifier {
            encoder,
            space: index.query_space(),
            index,
            k,
            thresholds,
            report_neighbors: k,
            head: None,
            growth: None,
            extra: Vec::new(),
            redact_input: None,
            novelty,
            audit: opts.audit,
            guards: None,
            audit_segment: None,
        })
    }

    /// The full chunk step: render, embed ([`Encoder::embed_rows`]), search, decide.
    pub fn classify(&self, rows: Vec<Row>) -> Result<Vec<Classified>> {
        let (rows, counts) = match &self.redact_input {
            Some(red) => redact_rows(red, rows),
            None => (rows, Vec::new()),
        };
        let mut vectors = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for e in self.encoder.embed_rows(&rows)? {
            match e {
                Ok(e) => {
                    ids.push(self.encoder.content_ids(&e.ids).to_vec());
                    vectors.push(Ok(e.vector));
                }
                Err(msg) => {
                    ids.push(Vec::new());
                    vectors.push(Err(msg));
                }
            }
        }
        let mut out = self.decide(rows, vectors, &ids)?;
        for (c, n) in out.iter_mut().zip(counts) {
            if !n.is_empty() {
                c.out.redacted = Some(n);
            }
        }
        Ok(out)
    }

    /// [`classify`](Self::classify) as the last line of defence against bugs: a panic while
    /// classifying the chunk is retried row by row, and each row that panics again becomes an
    /// error row (the panic's message, and advice to report it) while the others are classified.
    /// Returns the rows and how many of them panicked.
    pub fn classify_guarded(&self, rows: Vec<Row>) -> Result<(Vec<Classified>, u64)> {
        let backup = rows.clone();
        match catch_unwind(AssertUnwindSafe(|| self.classify(rows))) {
            Ok(r) => return r.map(|v| (v, 0)),
            Err(p) => tracing::warn!(
                "internal error in a chunk of {} rows ({}); isolating the row(s) that cause it",
                backup.len(),
                panic_message(&*p)
            ),
        }
        let mut out = Vec::with_capacity(backup.len());
        let mut panics = 0;
        for row in backup {
            let (id, passthrough) = (row.id.clone(), row.passthrough.clone());
            match catch_unwind(AssertUnwindSafe(|| self.classify(vec![row]))) {
                Ok(r) => out.extend(r?),
                Err(p) => {
                    panics += 1;
                    let msg = format!(
                        "internal error while classifying this row ({}); the run went on without it; please report this as a semtel bug",
                        panic_message(&*p)
                    );
                    out.push(Classified {
                        out: OutputRow::error(id, msg, passthrough),
                        content: None,
                        vector: None,
                        scores: None,
                        examples: Vec::new(),
                        audit: false,
                    });
                }
            }
        }
        Ok((out, panics))
    }

    /// Search and decide for rows whose model vectors (and content token ids, for the head)
    /// are known. The vectors are moved into each index's space here (per-language centring),
    /// so callers always pass the encoder's own output.
    pub fn decide(
        &self,
        rows: Vec<Row>,
        vectors: Vec<RowVector>,
        ids: &[Vec<u32>],
    ) -> Result<Vec<Classified>> {
        let d = self.encoder.dim();
        let languages = &self.encoder.files.languages;
        let detected: Vec<Option<crate::lang::Detected>> = {
            use rayon::prelude::*;
            rows.par_iter()
                .map(|r| r.content.as_ref().ok().and_then(crate::lang::detect))
                .collect()
        };
        let mut raw = Vec::with_capacity(rows.len() * d);
        let mut raw_langs = Vec::with_capacity(rows.len());
        for (v, l) in vectors.iter().zip(&detected) {
            if let Ok(v) = v {
                raw.extend_from_slice(v);
                raw_langs.push(l.map(|l| l.code));
            }
        }
        // Each index is searched in its own space (per-language centring or the model's own).
        let flat: std::borrow::Cow<[f32]> = match &self.space {
            Some(s) => s.place(&raw, &raw_langs).into(),
            None => raw.as_slice().into(),
        };
        let neighbors = self.index.search_batch(&flat, self.k)?;
        let mut nb_iter = neighbors.into_iter();
        // Additional taxonomies: one search per taxonomy over the same embeddings.
        let extra_flat: Vec<Option<Vec<f32>>> = self
            .extra
            .iter()
            .map(|t| t.space.as_ref().map(|s| s.place(&raw, &raw_langs)))
            .collect();
        let extra_hits: Vec<Vec<Vec<(u64, f32)>>> = self
            .extra
            .iter()
            .zip(&extra_flat)
            .map(|(t, f)| {
                t.index.search_batch(
                    f.as_deref().unwrap_or(&raw),
                    if t.multi_label { t.k * 4 } else { t.k },
                )
            })
            .collect::<Result<_>>()?;
        let mut extra_scratch: Vec<Vec<f32>> = self
            .extra
            .iter()
            .map(|t| vec![0f32; t.index.labels().len()])
            .collect();
        let mut vec_no = 0usize;
        let labels = self.index.labels();
        let label_of = self.index.label_indices();
        let mut scratch = vec![0f32; labels.len()];
        let mut out = Vec::with_capacity(rows.len());
        for (i, (row, vec)) in rows.into_iter().zip(vectors).enumerate() {
            let lang = detected[i];
            let vector = match vec {
                // The vector the vote searched with (what the head scores and `--grow` keeps).
                Ok(v) if self.space.is_none() => v,
                Ok(_) => flat[vec_no * d..(vec_no + 1) * d].to_vec(),
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
                        scores: None,
                        examples: Vec::new(),
                        audit: false,
                    });
                    continue;
                }
            };
            let extra: Vec<crate::row::TaxOut> = self
                .extra
                .iter()
                .enumerate()
                .map(|(t, tax)| {
                    let v = match &extra_flat[t] {
                        Some(f) => &f[vec_no * d..(vec_no + 1) * d],
                        None => &raw[vec_no * d..(vec_no + 1) * d],
                    };
                    tax.decide(
                        &extra_hits[t][vec_no],
                        v,
                        ids.get(i).map_or(&[][..], |x| x.as_slice()),
                        &mut extra_scratch[t],
                    )
                })
                .collect();
            vec_no += 1;
            let mut nb: Vec<(u64, f32)> = nb_iter.next().unwrap_or_default();
            let mut labeled: Vec<(u32, f32)> =
                nb.iter().map(|&(k, s)| (label_of[k as usize], s)).collect();
            if let Some(g) = self.growth.as_ref().filter(|g| !g.is_empty()) {
                // Merge the base neighbours with the ones learned during this run.
                let mut all: Vec<(u64, f32, u32)> = nb
                    .iter()
                    .zip(&labeled)
                    .map(|(&(k, s), &(l, _))| (k, s, l))
                    .collect();
                all.extend(g.search(&vector, self.k));
                all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
                all.truncate(self.k);
                nb = all.iter().map(|&(k, s, _)| (k, s)).collect();
                labeled = all.iter().map(|&(_, s, l)| (l, s)).collect();
            }
            let exemplar = |key: u64| -> crate::index::Exemplar {
                if key >= crate::grow::OVERLAY_KEY_BASE {
                    self.growth.as_ref().expect("overlay key").exemplar(key)
                } else {
                    self.index.exemplar(key).clone()
                }
            };
            let d = decide_single(
                &labeled,
                self.head.as_ref(),
                &vector,
                ids.get(i).map_or(&[][..], |x| x.as_slice()),
                &self.thresholds,
                &mut scratch,
            );
            let margin = d.scores.vote.margin;
            let top1 = d.scores.vote.top1_sim;
            let knn_label = d.scores.vote.label.map(|l| labels[l as usize].clone());
            let (scores, label, conf, keep) = (d.scores, d.label, d.confidence, d.keep);
            let foreign = lang.is_some_and(|l| crate::lang::outside(languages, &l));
            // Novelty: the nearest exemplar of the voted label, ranked among that label's own.
            let novelty = match (&self.novelty, scores.vote.label) {
                (Some(n), Some(l)) => {
                    let sim = labeled
                        .iter()
                        .filter(|x| x.0 == l)
                        .map(|x| x.1)
                        .fold(f32::NEG_INFINITY, f32::max);
                    Some(n.score(l, sim.max(-1.0)))
                }
                _ => None,
            };
            let novel =
                novelty.is_some_and(|s| self.novelty.as_ref().is_some_and(|n| n.is_novel(s)));
            let lang_code = lang.map(|l| l.code);
            let label_name = label.map(|l| labels[l as usize].as_str());
            let guarded = keep
                && !foreign
                && !novel
                && self
                    .guards
                    .as_ref()
                    .is_some_and(|g| g.holds(label_name, lang_code, conf));
            let escalate_reason = if foreign {
                Some(EscalateReason::Language)
            } else if !keep {
                Some(EscalateReason::Confidence)
            } else if novel {
                Some(EscalateReason::Novel)
            } else if guarded {
                Some(EscalateReason::Guard)
            } else {
                None
            };
            let keep = keep && !foreign && !novel && !guarded;
            let audit = keep && self.audit.is_some_and(|a| a.picks(&row.id));
            let neighbors = nb
                .iter()
                .take(self.report_neighbors)
                .map(|&(key, score)| {
                    let e = exemplar(key);
                    NeighborOut {
                        id: e.id,
                        label: e.label,
                        score,
                    }
                })
                .collect();
            let escalate = !keep;
            let to_llm = escalate || audit;
            let examples = if to_llm {
                nb.iter()
                    .take(EXAMPLES_PER_ROW)
                    .map(|&(key, _)| {
                        let e = exemplar(key);
                        let mut t = e.text;
                        if t.len() > EXAMPLE_CHARS {
                            let mut i = EXAMPLE_CHARS;
                            while !t.is_char_boundary(i) {
                                i -= 1;
                            }
                            t.truncate(i);
                        }
                        (e.label, t)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            out.push(Classified {
                out: OutputRow {
                    id: row.id,
                    label: if keep {
                        label.map(|l| labels[l as usize].clone())
                    } else {
                        None
                    },
                    confidence: Some(conf),
                    margin: Some(margin),
                    top1_sim: Some(top1),
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
                    extra,
                    lang: lang.map(|l| l.code.to_string()),
                    escalate_reason,
                    redacted: None,
                    novelty,
                    audit: None,
                },
                content: if to_llm { row.content.ok() } else { None },
                vector: if to_llm { Some(vector) } else { None },
                scores: Some(scores),
                examples,
                audit,
            });
        }
        Ok(out)
    }
}

/// Rows with their personal data replaced (in parallel), and what each lost.
fn redact_rows(red: &crate::pii::Redactor, rows: Vec<Row>) -> (Vec<Row>, Vec<crate::pii::Counts>) {
    use rayon::prelude::*;
    rows.into_par_iter()
        .map(|mut r| {
            let counts = match &r.content {
                Ok(c) => {
                    let (c, n) = red.redact_content(c);
                    r.content = Ok(c);
                    n
                }
                Err(_) => crate::pii::Counts::default(),
            };
            (r, counts)
        })
        .unzip()
}

pub use crate::error::panic_message;

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
    /// Error rows caused by an internal failure (a bug) rather than by the input; the CLI exits
    /// non-zero when there are any.
    pub internal_errors: u64,
    /// Input rows whose id an earlier row of the same input already had (checked among the
    /// first [`DUPLICATE_CHECK_ROWS`] distinct ids). Each is classified and written as its own
    /// row (and resume counts occurrences), but ids are not unique.
    pub duplicate_ids: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Share of rows escalated by kNN in each input chunk, in input order (shows the effect of
    /// `--grow`).
    pub escalation_by_chunk: Vec<f64>,
    /// Rows per detected language (`und` where it could not be told), largest first in print.
    pub languages: std::collections::BTreeMap<String, u64>,
    /// Rows escalated because the index's encoder does not cover their language.
    pub escalated_language: u64,
    /// Personal data replaced before anything left (or before embedding), by type.
    pub redacted: crate::pii::Counts,
    /// Rows kNN would have kept that were escalated as novel (`crate::novelty`).
    pub escalated_novel: u64,
    /// Rows kNN would have kept that a tripped guard escalated (`crate::guard`).
    pub escalated_guard: u64,
    /// `--audit-rate`: the realised kept-accuracy, estimated from the audited rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::guard::AuditReport>,
    /// The guards' state at the end of the run (with `--audit-rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guards: Option<crate::guard::GuardReport>,
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
            .map_err(|_| Error::WriterStopped)
    }
    fn finish(&mut self, _out: &SyncSender<Vec<OutputRow>>) -> Result<()> {
        Ok(())
    }
}

/// Streams `reader` through `classifier` into `writer`, skipping rows already `done` (as many
/// occurrences of each id as were written).
pub fn run(
    classifier: &Classifier,
    mut reader: Box<dyn RowReader>,
    mut writer: Box<dyn RowSink>,
    mut done: Done,
    escalation: &mut dyn Escalation,
    progress: &Progress,
) -> Result<RunSummary> {
    let start = Instant::now();
    let mut summary = RunSummary::default();
    let (row_tx, row_rx): (SyncSender<Vec<Row>>, Receiver<Vec<Row>>) = sync_channel(2);
    let (out_tx, out_rx): (SyncSender<Vec<OutputRow>>, Receiver<Vec<OutputRow>>) = sync_channel(4);
    std::thread::scope(|s| -> Result<RunSummary> {
        // Reader: file → chunks of rows still to do.
        let reader_h = s.spawn(move || -> Result<(u64, u64, u64)> {
            let (mut read, mut skipped, mut dups) = (0u64, 0u64, 0u64);
            // 64-bit hashes of the ids seen, to count repeated ids. Bounded: past
            // DUPLICATE_CHECK_ROWS distinct ids the check stops (memory must not grow with the
            // input); resume correctness never depends on it (`Done` counts per id).
            let mut seen: HashSet<u64> = HashSet::new();
            while let Some(batch) = reader.next_batch()? {
                read += batch.len() as u64;
                progress.inc(batch.len() as u64);
                let n = batch.len() as u64;
                for r in &batch {
                    let h = id_hash(&r.id);
                    if seen.contains(&h) {
                        dups += 1;
                    } else if seen.len() < DUPLICATE_CHECK_ROWS {
                        seen.insert(h);
                    }
                }
                let todo: Vec<Row> = if done.is_empty() {
                    batch
                } else {
                    batch.into_iter().filter(|r| !done.take(&r.id)).collect()
                };
                skipped += n - todo.len() as u64;
                if todo.is_empty() {
                    continue;
                }
                if row_tx.send(todo).is_err() {
                    break; // compute stage stopped; its error is reported there
                }
            }
            Ok((read, skipped, dups))
        });
        // Writer: rows → disk, checkpointing at least every few seconds.
        // Rows per language, rows escalated for their language, entities redacted.
        type Langs = (
            std::collections::BTreeMap<String, u64>,
            u64,
            crate::pii::Counts,
        );
        let guards = classifier.guards.clone();
        let audit_segment = classifier.audit_segment;
        let mut tally = classifier
            .audit
            .map(|a| crate::guard::AuditTally::new(a.llm_accuracy));
        // The sink, counts (kept, escalated, LLM, error; escalated as novel, by a guard), the
        // languages and the audit tally.
        type Written = (
            Box<dyn RowSink>,
            [u64; 6],
            Langs,
            Option<crate::guard::AuditTally>,
        );
        let writer_h = s.spawn(move || -> Result<Written> {
            let mut counts = [0u64; 6];
            let mut langs: Langs = Default::default();
            let mut last = Instant::now();
            let mut row_no = 0u64;
            loop {
                match out_rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(rows) => {
                        if let Some(g) = &guards {
                            g.tick(rows.len() as u64);
                        }
                        for r in &rows {
                            row_no += 1;
                            match r.escalate_reason {
                                Some(EscalateReason::Novel) => counts[4] += 1,
                                Some(EscalateReason::Guard) => counts[5] += 1,
                                _ => {}
                            }
                            if let (Some(a), Some(t)) = (&r.audit, tally.as_mut()) {
                                let seg = audit_segment.and_then(|i| r.passthrough.get(i)).map(
                                    |v| match v {
                                        serde_json::Value::String(s) => s.clone(),
                                        v => v.to_string(),
                                    },
                                );
                                t.add(
                                    r.label.as_deref(),
                                    a.label.as_deref(),
                                    r.lang.as_deref(),
                                    row_no - 1,
                                    seg.as_deref(),
                                );
                            }
                            if let Some(g) = &guards {
                                g.observe_row(r);
                            }
                            counts[match r.decided_by {
                                DecidedBy::Knn => 0,
                                DecidedBy::Escalate => 1,
                                DecidedBy::Llm => 2,
                                DecidedBy::Error => 3,
                            }] += 1;
                            if r.decided_by != DecidedBy::Error {
                                let l = r.lang.as_deref().unwrap_or("und");
                                *langs.0.entry(l.to_string()).or_insert(0) += 1;
                            }
                            if r.escalate_reason == Some(EscalateReason::Language) {
                                langs.1 += 1;
                            }
                            if let Some(c) = &r.redacted {
                                langs.2.add(c);
                            }
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
            Ok((writer, counts, langs, tally))
        });
        // Compute on this thread: render → embed → search → decide → escalate.
        let mut by_chunk = Vec::new();
        let mut internal_errors = 0u64;
        let compute = (|| -> Result<()> {
            for rows in row_rx.iter() {
                let (classified, panics) = classifier.classify_guarded(rows)?;
                internal_errors += panics;
                let (esc, decided): (Vec<Classified>, Vec<Classified>) = classified
                    .into_iter()
                    .partition(|c| c.out.decided_by == DecidedBy::Escalate || c.audit);
                let n = esc.len() + decided.len();
                by_chunk.push(esc.len() as f64 / n.max(1) as f64);
                if !decided.is_empty() {
                    out_tx
                        .send(decided.into_iter().map(|c| c.out).collect())
                        .map_err(|_| Error::WriterStopped)?;
                }
                if !esc.is_empty() {
                    escalation.submit(esc, &out_tx)?;
                }
            }
            escalation.finish(&out_tx)
        })();
        drop(row_rx);
        drop(out_tx);
        let read_res = reader_h.join().unwrap_or_else(|p| {
            Err(Error::Internal(format!(
                "the input reader panicked ({})",
                panic_message(&*p)
            )))
        });
        let write_res = writer_h.join().unwrap_or_else(|p| {
            Err(Error::Internal(format!(
                "the output writer panicked ({})",
                panic_message(&*p)
            )))
        });
        // Report the first real failure: compute, then writer, then reader. When compute only
        // saw the writer go away, the writer's own error (a full disk, say) is the real one.
        match compute {
            Err(Error::WriterStopped) => {
                write_res?;
                return Err(Error::WriterStopped);
            }
            other => other?,
        }
        let (writer, counts, (languages, escalated_language, redacted), tally) = write_res?;
        summary.escalated_novel = counts[4];
        summary.escalated_guard = counts[5];
        summary.audit = tally.as_ref().map(|t| t.report());
        summary.guards = classifier.guards.as_ref().map(|g| g.snapshot());
        summary.redacted = redacted;
        summary.languages = languages;
        summary.escalated_language = escalated_language;
        let (read, skipped, dups) = read_res?;
        summary.duplicate_ids = dups;
        summary.internal_errors = internal_errors;
        summary.rows_read = read;
        summary.rows_written = writer.rows_written();
        summary.rows_skipped_resume = skipped;
        writer.finish()?;
        summary.knn = counts[0];
        summary.escalated = counts[1];
        summary.llm = counts[2];
        summary.errors = counts[3];
        summary.escalation_by_chunk = by_chunk;
        summary.seconds = start.elapsed().as_secs_f64();
        summary.rows_per_second = summary.rows_written as f64 / summary.seconds.max(1e-9);
        Ok(summary)
    })
}

/// Distinct ids the duplicate check remembers (about 16 bytes each: ~64 MB at most).
pub const DUPLICATE_CHECK_ROWS: usize = 4_000_000;

fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}
