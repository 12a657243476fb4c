//! The bootstrap job: from a taxonomy, an LLM and unlabelled conversations to a calibrated
//! index, with no labelled data.
//!
//! 1. Read the input (a seeded random subset of at most `max_rows`, bounded memory), drop exact
//!    duplicates, embed once.
//! 2. Round 0: the LLM labels representatives of the embedding space ([`crate::sample`]:
//!    k-means++ seeding, a few Lloyd steps, each cluster's medoid; near-duplicates never both),
//!    plus a uniformly random sample held back for calibration; part of that sample is asked
//!    twice, and the LLM's agreement with itself sets the agreement target (unless given).
//! 3. Build the index from what the LLM said (`source = llm`, model and prompt version kept),
//!    calibrate it for *agreement with the LLM* on the held-back sample; re-aim the target at
//!    the LLM's self-agreement on the retest rows that index keeps, and rebuild if it moved.
//! 4. Active rounds: spend the rest of the budget on representatives of the rows the current
//!    index would escalate; rebuild and re-calibrate; stop at the budget or when the projected
//!    escalation rate stops falling (two rounds in a row).
//! 5. The held-back rows join the final index (its thresholds were chosen without them, so they
//!    are conservative); the report goes next to it.
//!
//! Resumable: each round's plan (the ids chosen) and every LLM answer are written to the work
//! folder `<out>.bootstrap/` as they happen, so a killed bootstrap continues where it stopped
//! and never pays twice for a row. This module must never print; it returns a report.

use crate::calibrate::{CalibrateOptions, Interval};
use crate::conversation::Row;
use crate::embed::{Encoder, EncoderOptions};
use crate::index::{BuildInfo, Exemplar, ExemplarIndex, ModelInfo};
use crate::input::InputOptions;
use crate::llm::{LlmConfig, LlmTier};
use crate::pipeline::{Classified, Classifier, ClassifierOptions, RowVector};
use crate::progress::Progress;
use crate::row::{DecidedBy, OutputRow};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// The label schema: names with descriptions, optionally a few seed examples per label.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaxonomyFile {
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub examples: BTreeMap<String, Vec<String>>,
}

impl TaxonomyFile {
    /// A TOML file with a `[labels]` table (`label = "description"`, the table the LLM
    /// configuration accepts) and an optional `[examples]` table (`label = ["text", …]`).
    ///
    /// A `.prompty` file works too: its label list is read from the front matter, from
    /// `sample.labels` or `inputs.labels.default` — a list of names, of `{name, description}`
    /// mappings, or a mapping of name to description.
    pub fn load(path: &Path) -> Result<TaxonomyFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let t: TaxonomyFile = if path.extension().is_some_and(|x| x == "prompty") {
            TaxonomyFile {
                labels: labels_from_prompty(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
                examples: BTreeMap::new(),
            }
        } else {
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        };
        if t.labels.len() < 2 {
            return Err(Error::Config(format!(
                "{}: a [labels] table with at least two `label = \"description\"` entries is needed",
                path.display()
            )));
        }
        if let Some(l) = t.examples.keys().find(|l| !t.labels.contains_key(*l)) {
            return Err(Error::Config(format!(
                "{}: [examples] names `{l}`, which is not in [labels]",
                path.display()
            )));
        }
        Ok(t)
    }
}

/// The label list a Prompty file carries in its front matter.
pub fn labels_from_prompty(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("---") {
        return Err("a .prompty file starts with a `---` line and YAML front matter".into());
    }
    let yaml: Vec<&str> = lines.take_while(|l| l.trim() != "---").collect();
    let fm: serde_json::Value = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&yaml.join("\n"))
        .map_err(|e| format!("front matter is not valid YAML: {e}"))
        .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()))?;
    let list = [&fm["sample"]["labels"], &fm["inputs"]["labels"]["default"]]
        .into_iter()
        .find(|v| !v.is_null())
        .ok_or("no label list in the front matter: put it under `sample: labels:` or `inputs: labels: default:`")?;
    let mut out = BTreeMap::new();
    match list {
        serde_json::Value::Array(items) => {
            for it in items {
                match it {
                    serde_json::Value::String(n) => {
                        out.insert(n.clone(), String::new());
                    }
                    serde_json::Value::Object(m) => {
                        let name = m
                            .get("name")
                            .and_then(|v| v.as_str())
                            .ok_or("a label mapping needs `name:`")?;
                        let d = m.get("description").and_then(|v| v.as_str()).unwrap_or("");
                        out.insert(name.to_string(), d.to_string());
                    }
                    other => {
                        return Err(format!("a label must be a name or a mapping, not {other}"))
                    }
                }
            }
        }
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone(), v.as_str().unwrap_or("").to_string());
            }
        }
        other => {
            return Err(format!(
                "the label list must be a list or a mapping, not {other}"
            ))
        }
    }
    Ok(out)
}

/// How the first round chooses rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Sampling {
    /// Medoids of k-means clusters over the embeddings (coverage of the space).
    Representative,
    /// Uniformly at random (the baseline).
    Random,
}

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub input: PathBuf,
    pub input_options: InputOptions,
    pub taxonomy: PathBuf,
    pub llm: LlmConfig,
    pub out: PathBuf,
    pub encoder: EncoderOptions,
    /// Rows the LLM may label in all…
    pub budget_rows: Option<usize>,
    /// …or dollars it may cost.
    pub budget_usd: Option<f64>,
    /// At most this many input rows are read (a seeded random subset) and embedded.
    pub max_rows: usize,
    /// Rounds in all (the first plus active ones); 1: no active rounds.
    pub rounds: usize,
    /// Share of the row budget the first round spends.
    pub first_share: f64,
    /// Share of the row budget spent on a uniformly random sample held back to calibrate on
    /// (the rows the rounds choose are not a fair sample of the corpus; these are).
    pub holdout: f64,
    /// Wanted agreement with the LLM on the rows the index keeps. `None`: as high as the LLM
    /// agrees with itself (measured by asking it twice about part of the held-back rows), at
    /// most 0.97 — a noisy LLM cannot be agreed with more than it agrees with itself.
    pub target: Option<f64>,
    pub sampling: Sampling,
    pub k: usize,
    pub seed: u64,
    /// Replace an index already at `out`.
    pub overwrite: bool,
}

impl BootstrapOptions {
    pub fn new(
        input: PathBuf,
        taxonomy: PathBuf,
        llm: LlmConfig,
        out: PathBuf,
        encoder: EncoderOptions,
    ) -> Self {
        BootstrapOptions {
            input,
            input_options: InputOptions::default(),
            taxonomy,
            llm,
            out,
            encoder,
            budget_rows: None,
            budget_usd: None,
            max_rows: 200_000,
            rounds: 4,
            first_share: 0.4,
            holdout: 0.2,
            target: None,
            sampling: Sampling::Representative,
            k: 10,
            seed: 7,
            overwrite: false,
        }
    }
}

/// One round of a bootstrap.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: usize,
    /// Rows the LLM labelled in this round / so far.
    pub labelled: usize,
    pub labelled_total: usize,
    /// Rows it could not label (kept out of the index).
    pub failed: usize,
    pub spent_usd: f64,
    /// Agreement with the LLM on the held-back rows the index keeps (95 % interval).
    pub agreement: Interval,
    /// Share of the corpus the index would send to the LLM at the calibrated thresholds.
    pub escalated_share: f64,
    pub exemplars: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootstrapReport {
    pub index: PathBuf,
    pub input_rows: usize,
    /// Rows embedded (the random subset, exact duplicates removed).
    pub pool_rows: usize,
    pub duplicates_skipped: usize,
    pub unreadable_rows: usize,
    pub sampling: Sampling,
    pub rounds: Vec<RoundReport>,
    /// Rows asked twice, and how often the LLM gave the same label.
    pub llm_retest_rows: usize,
    pub llm_self_agreement: Option<f64>,
    /// The same, over the retest rows the last round's index keeps (the target when there
    /// are enough of them).
    pub llm_retest_kept_rows: usize,
    pub llm_self_agreement_kept: Option<f64>,
    /// The agreement target the thresholds were calibrated for.
    pub target: f64,
    pub stopped_because: String,
    pub labelled_rows: usize,
    pub spent_usd: f64,
    /// Projected LLM cost per million conversations: every one sent to the LLM…
    pub llm_only_per_million_usd: f64,
    /// …and only the share the index escalates.
    pub hybrid_per_million_usd: f64,
    /// Labels of the taxonomy the LLM never gave.
    pub labels_unused: Vec<String>,
    /// Labels it gave too rarely (< 3 rows) to calibrate or vote on.
    pub labels_rare: Vec<String>,
    pub seconds: f64,
}

/// One LLM answer, as the work folder keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Labelled {
    id: String,
    /// `None`: the LLM gave no label of the schema (kept so it is not asked again).
    label: Option<String>,
    round: usize,
    holdout: bool,
    model: Option<String>,
    prompt_version: Option<String>,
    cost_usd: f64,
}

impl Labelled {
    /// The exemplar this answer makes, with the row's place in the pool (`None`: no label, or
    /// the row is not in this pool).
    fn exemplar(&self, pool: &Pool) -> Option<(usize, Exemplar)> {
        let (label, &i) = (self.label.as_ref()?, pool.by_id.get(&self.id)?);
        let text = pool.rows[i]
            .content
            .as_ref()
            .map(|c| c.flatten())
            .unwrap_or_default();
        Some((
            i,
            Exemplar {
                id: self.id.clone(),
                label: label.clone(),
                source: "llm".into(),
                llm_model: self.model.clone(),
                prompt_version: self.prompt_version.clone(),
                text,
            },
        ))
    }
}

/// The pool: the rows the bootstrap works on, embedded once.
struct Pool {
    rows: Vec<Row>,
    vectors: Vec<f32>,
    ids: Vec<Vec<u32>>,
    by_id: HashMap<String, usize>,
    dim: usize,
}

impl Pool {
    fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
}

/// The work folder of a bootstrap into `out`: `<out>.bootstrap/` (plans, answers, report).
pub fn work_dir(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "index".into());
    name.push(".bootstrap");
    out.with_file_name(name)
}

/// Runs (or resumes) a bootstrap.
pub fn run(o: &BootstrapOptions, progress: &Progress) -> Result<BootstrapReport> {
    let started = std::time::Instant::now();
    if o.budget_rows.is_none() && o.budget_usd.is_none() {
        return Err(Error::Config(
            "give a budget: --budget-rows N or --budget-usd X".into(),
        ));
    }
    if !(0.0..0.9).contains(&o.holdout) || o.rounds == 0 {
        return Err(Error::Config(
            "holdout must be in [0, 0.9) and rounds at least 1".into(),
        ));
    }
    if o.out.join("manifest.json").exists() && !o.overwrite {
        return Err(Error::index(
            &o.out,
            "an index already exists here; choose another --out or pass --overwrite",
        ));
    }
    let tax = TaxonomyFile::load(&o.taxonomy)?;
    let labels: Vec<String> = tax.labels.keys().cloned().collect();
    let mut cfg = o.llm.clone();
    for (l, d) in &tax.labels {
        cfg.labels.entry(l.clone()).or_insert_with(|| d.clone());
    }
    let work = work_dir(&o.out);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let _lock = crate::fsio::PathLock::acquire(&work)?;
    if cfg.cache.is_none() {
        // Answers already paid for stay paid for, even if the labelled file were lost.
        cfg.cache = Some(work.join("llm-cache.jsonl").display().to_string());
    }
    let encoder = Encoder::load(&o.encoder)?;
    let (pool, input_rows, duplicates, unreadable) = read_pool(o, &encoder, progress)?;
    if pool.rows.is_empty() {
        return Err(Error::input(&o.input, "no readable conversations"));
    }
    let labelled_path = work.join("labelled.jsonl");
    let mut labelled = read_labelled(&labelled_path)?;
    let mut report = BootstrapReport {
        index: o.out.clone(),
        input_rows,
        pool_rows: pool.rows.len(),
        duplicates_skipped: duplicates,
        unreadable_rows: unreadable,
        sampling: o.sampling,
        rounds: Vec::new(),
        llm_retest_rows: 0,
        llm_self_agreement: None,
        llm_retest_kept_rows: 0,
        llm_self_agreement_kept: None,
        target: o.target.unwrap_or(MAX_AUTO_TARGET),
        stopped_because: String::new(),
        labelled_rows: 0,
        spent_usd: 0.0,
        llm_only_per_million_usd: 0.0,
        hybrid_per_million_usd: 0.0,
        labels_unused: Vec::new(),
        labels_rare: Vec::new(),
        seconds: 0.0,
    };
    let copts = ClassifierOptions {
        encoder: o.encoder.clone(),
        k: Some(o.k),
        threshold: None,
        signal: None,
        writable: false,
        ..Default::default()
    };
    let mut last_dir: Option<PathBuf> = None;
    // What asking the LLM twice cost (it counts against a dollar budget).
    let mut retest_cost = 0.0;
    let mut retested: Option<Retest> = None;
    let mut prev_escalated: Option<f64> = None;
    let mut flat_rounds = 0;
    for round in 0..o.rounds {
        let spent: f64 = labelled.values().map(|l| l.cost_usd).sum::<f64>() + retest_cost;
        let done = labelled.len();
        let rows_left = rows_left(o, done, spent);
        if rows_left == 0 {
            report.stopped_because = "the budget is spent".into();
            break;
        }
        let plan_path = work.join(format!("plan-{round}.json"));
        let plan: Plan = match std::fs::read_to_string(&plan_path) {
            Ok(t) => {
                serde_json::from_str(&t).map_err(|e| Error::input(&plan_path, e.to_string()))?
            }
            Err(_) => {
                let mut want = if round + 1 == o.rounds {
                    rows_left
                } else if round == 0 {
                    first_round_rows(o, &labels, &pool).min(rows_left)
                } else {
                    rows_left.div_ceil(o.rounds - round)
                };
                // Round 0 also draws the held-back sample, uniformly at random.
                let holdout = if round == 0 {
                    let n = holdout_rows(o, &labels).min(rows_left.saturating_sub(1));
                    want = want.min(rows_left - n);
                    let mut rng = fastrand::Rng::with_seed(o.seed ^ 0x5eed);
                    let mut all: Vec<usize> = (0..pool.rows.len()).collect();
                    rng.shuffle(&mut all);
                    all.truncate(n);
                    all
                } else {
                    Vec::new()
                };
                let held: HashSet<usize> = holdout.iter().copied().collect();
                let chosen = choose(
                    o,
                    round,
                    want,
                    &pool,
                    &labelled,
                    &held,
                    last_dir.as_deref(),
                    &copts,
                )?;
                let p = Plan {
                    train: chosen.iter().map(|&i| pool.rows[i].id.clone()).collect(),
                    holdout: holdout.iter().map(|&i| pool.rows[i].id.clone()).collect(),
                };
                let tmp = plan_path.with_extension("json.tmp");
                std::fs::write(&tmp, serde_json::to_vec(&p).expect("plan serialises"))
                    .map_err(|e| Error::io(&tmp, e))?;
                crate::fsio::commit(&tmp, &plan_path)?;
                p
            }
        };
        let held_ids: HashSet<String> = plan.holdout.iter().cloned().collect();
        let plan: Vec<String> = plan.train.into_iter().chain(plan.holdout).collect();
        let todo: Vec<usize> = plan
            .iter()
            .filter(|id| !labelled.contains_key(*id))
            .filter_map(|id| pool.by_id.get(id).copied())
            .collect();
        if plan.is_empty() {
            report.stopped_because = "no row is left that the index would escalate".into();
            break;
        }
        if !todo.is_empty() {
            label_rows(
                &cfg,
                &labels,
                &tax,
                &encoder,
                &pool,
                &todo,
                round,
                last_dir.as_deref(),
                &copts,
                &labelled_path,
                &held_ids,
                &mut labelled,
            )?;
        }
        if round == 0 && o.target.is_none() && report.llm_self_agreement.is_none() {
            let r = retest(&work, &cfg, &labels, &encoder, &pool, &labelled)?;
            report.llm_retest_rows = r.rows;
            report.llm_self_agreement = r.agreement;
            retest_cost = r.cost_usd;
            let a = r.agreement;
            retested = Some(r);
            if let Some(a) = a {
                // Kept rows should agree with the LLM as often as it agrees with itself. With
                // an LLM right a share `p` of the time and mistakes spread over other labels,
                // its self-agreement is about p², and an index right a share `q` agrees with
                // it about q·p: the two meet at q = p, the LLM's own accuracy. (The upper end
                // of the interval, used before, asked for more than the LLM delivers and sent
                // a third of the rows or more back to it.)
                report.target = a.min(MAX_AUTO_TARGET);
            }
        }
        // The index of this round, calibrated against the LLM on the held-back rows.
        let dir = work.join(format!("round-{round}"));
        let (mut exemplars, mut agreement, mut escalated) =
            build_round(&encoder, &pool, &labelled, &dir, o, report.target, &copts)?;
        // Re-aim at the LLM's reliability on the rows this index keeps (see
        // `kept_self_agreement`), and rebuild once when that moves the target.
        if let Some(r) = retested.as_ref().filter(|_| o.target.is_none()) {
            let (n, kept) = kept_self_agreement(&dir, &copts, &pool, r)?;
            if let Some(k) = kept {
                report.llm_retest_kept_rows = n;
                report.llm_self_agreement_kept = Some(k);
                let t = k.min(MAX_AUTO_TARGET);
                if (t - report.target).abs() >= 0.005 {
                    report.target = t;
                    (exemplars, agreement, escalated) =
                        build_round(&encoder, &pool, &labelled, &dir, o, t, &copts)?;
                }
            }
        }
        let this_round = labelled.values().filter(|l| l.round == round).count();
        report.rounds.push(RoundReport {
            round,
            labelled: this_round,
            labelled_total: labelled.len(),
            failed: labelled.values().filter(|l| l.label.is_none()).count(),
            spent_usd: labelled.values().map(|l| l.cost_usd).sum(),
            agreement,
            escalated_share: escalated,
            exemplars,
        });
        last_dir = Some(dir);
        // The projected rate is trusted once there are enough rows to calibrate on (ten per
        // label); before that it moves with the noise of tiny samples. Even then one round's
        // estimate is noisy (thresholds come from a few hundred held-back rows), so it takes
        // two rounds in a row without a fall of a point to stop before the budget is spent.
        let enough = labelled.len() >= 10 * labels.len();
        flat_rounds = match (prev_escalated, enough) {
            (Some(p), true) if p - escalated < 0.01 => flat_rounds + 1,
            _ => 0,
        };
        if flat_rounds >= 2 {
            report.stopped_because = format!(
                "the projected escalation rate stopped falling (under a point in each of the last two rounds, now {:.1} %)",
                100.0 * escalated
            );
            break;
        }
        prev_escalated = Some(escalated);
    }
    if report.stopped_because.is_empty() {
        report.stopped_because = format!("{} rounds done", report.rounds.len());
    }
    let Some(last) = last_dir else {
        return Err(Error::Config(
            "the budget allowed no LLM call: raise --budget-rows or --budget-usd".into(),
        ));
    };
    finish_index(&last, &pool, &labelled, &o.out, o.overwrite)?;
    // Report.
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for l in labelled.values() {
        if let Some(x) = &l.label {
            *counts.entry(x.as_str()).or_default() += 1;
        }
    }
    report.labels_unused = labels
        .iter()
        .filter(|l| !counts.contains_key(l.as_str()))
        .cloned()
        .collect();
    report.labels_rare = labels
        .iter()
        .filter(|l| counts.get(l.as_str()).is_some_and(|&c| c < 3))
        .cloned()
        .collect();
    report.labelled_rows = labelled.len();
    report.spent_usd = labelled.values().map(|l| l.cost_usd).sum::<f64>() + retest_cost;
    let per_row = report.spent_usd / labelled.len().max(1) as f64;
    report.llm_only_per_million_usd = per_row * 1e6;
    let escalated = report.rounds.last().map_or(1.0, |r| r.escalated_share);
    report.hybrid_per_million_usd = per_row * 1e6 * escalated;
    report.seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&report).expect("report serialises");
    let rp = work.join("report.json");
    std::fs::write(&rp, json).map_err(|e| Error::io(&rp, e))?;
    Ok(report)
}

/// Rows the budget still allows (the dollar budget converted at the cost per row so far, or
/// a first guess of $0.0002 a row before any).
fn rows_left(o: &BootstrapOptions, done: usize, spent: f64) -> usize {
    let by_rows = o.budget_rows.map(|b| b.saturating_sub(done));
    let by_usd = o.budget_usd.map(|b| {
        let per_row = if done > 0 && spent > 0.0 {
            spent / done as f64
        } else {
            0.0002
        };
        ((b - spent).max(0.0) / per_row) as usize
    });
    match (by_rows, by_usd) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(0),
    }
}

/// The first round's size: its share of a row budget, or (with a dollar budget alone) enough
/// for ten rows per label, at most a tenth of the pool.
fn first_round_rows(o: &BootstrapOptions, labels: &[String], pool: &Pool) -> usize {
    match o.budget_rows {
        Some(b) if o.rounds > 1 => ((b as f64 * o.first_share).ceil() as usize).max(1),
        Some(b) => b,
        None => (labels.len() * 10).clamp(50, (pool.rows.len() / 10).max(50)),
    }
}

/// Reads at most `max_rows` readable rows (reservoir sampling with the seed), without labels
/// and without exact duplicates, and embeds them. Returns (pool, rows read, duplicates,
/// unreadable rows).
fn read_pool(
    o: &BootstrapOptions,
    encoder: &Encoder,
    progress: &Progress,
) -> Result<(Pool, usize, usize, usize)> {
    let mut reader = crate::input::open(&o.input, &o.input_options)?;
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let mut seen = HashSet::new();
    let (mut read, mut dup, mut bad) = (0usize, 0usize, 0usize);
    let mut keep: Vec<Row> = Vec::new();
    let mut eligible = 0usize;
    while let Some(batch) = reader.next_batch()? {
        for mut r in batch {
            read += 1;
            // semtel sees no label here, whatever the file holds.
            r.label = None;
            let Ok(c) = &r.content else {
                bad += 1;
                continue;
            };
            if !seen.insert(crate::hash::text_hash(&c.flatten())) {
                dup += 1;
                continue;
            }
            eligible += 1;
            if keep.len() < o.max_rows {
                keep.push(r);
            } else {
                let j = rng.usize(0..eligible);
                if j < o.max_rows {
                    keep[j] = r;
                }
            }
        }
    }
    let dim = encoder.dim();
    let mut rows = Vec::with_capacity(keep.len());
    let mut vectors = Vec::with_capacity(keep.len() * dim);
    let mut ids = Vec::with_capacity(keep.len());
    for chunk in keep.chunks(2048) {
        for (r, e) in chunk.iter().zip(encoder.embed_rows(chunk)?) {
            match e {
                Ok(e) => {
                    ids.push(encoder.content_ids(&e.ids).to_vec());
                    vectors.extend_from_slice(&e.vector);
                    rows.push(r.clone());
                }
                Err(_) => bad += 1,
            }
        }
        progress.inc(chunk.len() as u64);
    }
    let by_id = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    Ok((
        Pool {
            rows,
            vectors,
            ids,
            by_id,
            dim,
        },
        read,
        dup,
        bad,
    ))
}

fn read_labelled(path: &Path) -> Result<BTreeMap<String, Labelled>> {
    let mut m = BTreeMap::new();
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(m);
    };
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        // A torn last line (a kill mid-write) is dropped: that row is asked again.
        if let Ok(l) = serde_json::from_str::<Labelled>(&line) {
            m.insert(l.id.clone(), l);
        }
    }
    Ok(m)
}

/// What a round asks the LLM about: rows for the index, and (round 0) the held-back sample.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Plan {
    train: Vec<String>,
    holdout: Vec<String>,
}

/// The highest agreement target chosen automatically.
const MAX_AUTO_TARGET: f64 = 0.97;
/// Held-back rows the LLM is asked about twice, at most: the target is its self-agreement,
/// so the estimate should be steady (±1.7 points at 0.9 over 300 rows, ±2.4 over 150).
const RETEST_ROWS: usize = 400;

/// Rows of the held-back sample: its share of a row budget (of the first round's size with a
/// dollar budget), at least two per label when the budget allows.
fn holdout_rows(o: &BootstrapOptions, labels: &[String]) -> usize {
    if o.holdout <= 0.0 {
        return 0;
    }
    let base = o.budget_rows.unwrap_or(labels.len() * 10 * o.rounds);
    ((base as f64 * o.holdout).round() as usize).max(2 * labels.len().min(base / 10))
}

/// Asks the LLM again (no cache) about part of the held-back rows: how often it repeats
/// itself bounds how well anything can agree with it. Kept in the work folder, so a resumed
/// bootstrap does not pay for it twice.
fn retest(
    work: &Path,
    cfg: &LlmConfig,
    labels: &[String],
    encoder: &Encoder,
    pool: &Pool,
    labelled: &BTreeMap<String, Labelled>,
) -> Result<Retest> {
    let path = work.join("retest.json");
    if let Ok(t) = std::fs::read_to_string(&path) {
        // (An earlier version wrote a (rows, agreement, cost) tuple: serde reads it as a
        // `Retest` without rows, and the target then stays the all-rows figure.)
        if let Ok(x) = serde_json::from_str::<Retest>(&t) {
            return Ok(x);
        }
    }
    let first: Vec<(&String, &String)> = labelled
        .values()
        .filter(|l| l.holdout)
        .filter_map(|l| l.label.as_ref().map(|x| (&l.id, x)))
        .take(RETEST_ROWS)
        .collect();
    if first.len() < 20 {
        return Ok(Retest::default());
    }
    let mut cfg = cfg.clone();
    cfg.cache = Some("off".into());
    let rows: Vec<Classified> = first
        .iter()
        .filter_map(|(id, _)| pool.by_id.get(*id))
        .map(|&i| escalated_item(&pool.rows[i], Vec::new()))
        .collect();
    let tier = LlmTier::new(cfg, labels.to_vec(), encoder.token_counter())?
        .with_system_turns(encoder.include_system_turns());
    let (again, stats) = super::compare::run_tier(tier, rows)?;
    let second: HashMap<&str, &str> = again
        .iter()
        .filter(|r| r.decided_by == DecidedBy::Llm)
        .filter_map(|r| r.label.as_deref().map(|l| (r.id.as_str(), l)))
        .collect();
    let rows: Vec<(String, bool)> = first
        .iter()
        .filter_map(|(id, l)| {
            second
                .get(id.as_str())
                .map(|m| ((*id).clone(), *m == l.as_str()))
        })
        .collect();
    let out = Retest {
        rows: rows.len(),
        agreement: agreement_of(rows.iter().map(|(_, a)| *a)),
        cost_usd: stats.cost_usd,
        per_row: rows,
    };
    std::fs::write(&path, serde_json::to_vec(&out).expect("serialises"))
        .map_err(|e| Error::io(&path, e))?;
    Ok(out)
}

/// The share of `true`, when there are at least 20 (fewer say too little).
fn agreement_of(agree: impl Iterator<Item = bool>) -> Option<f64> {
    let (mut n, mut yes) = (0usize, 0usize);
    for a in agree {
        n += 1;
        yes += a as usize;
    }
    (n >= 20).then(|| yes as f64 / n as f64)
}

/// The LLM asked twice about held-back rows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Retest {
    rows: usize,
    /// How often it gave the same label.
    agreement: Option<f64>,
    cost_usd: f64,
    /// Per row asked twice: (id, same label both times).
    #[serde(default)]
    per_row: Vec<(String, bool)>,
}

/// Fewest retest rows among those a round's index keeps for their self-agreement to set the
/// target (±3 points at 0.9 over 100 rows); fewer, and the whole retest sample's stands.
const MIN_KEPT_RETEST: usize = 100;

/// The LLM's self-agreement on the retest rows the round's index at `dir` would keep, with
/// how many those are. The target should be the LLM's reliability *on the rows the index
/// keeps*: an LLM whose mistakes fall on ambiguous rows is more reliable on the easy rows an
/// index keeps than on average, and a target taken over all rows lets the index keep them
/// at less accuracy than the LLM would have had. When errors fall anywhere the two agree.
fn kept_self_agreement(
    dir: &Path,
    copts: &ClassifierOptions,
    pool: &Pool,
    retest: &Retest,
) -> Result<(usize, Option<f64>)> {
    let which: Vec<(usize, bool)> = retest
        .per_row
        .iter()
        .filter_map(|(id, a)| pool.by_id.get(id).map(|&i| (i, *a)))
        .collect();
    if which.len() < MIN_KEPT_RETEST {
        return Ok((0, None));
    }
    let c = Classifier::open(dir, copts)?;
    let idx: Vec<usize> = which.iter().map(|(i, _)| *i).collect();
    let decided = decide_pool(&c, pool, &idx)?;
    let kept: Vec<bool> = decided
        .iter()
        .zip(&which)
        .filter(|(d, _)| **d != DecidedBy::Escalate && **d != DecidedBy::Error)
        .map(|(_, (_, a))| *a)
        .collect();
    let n = kept.len();
    if n < MIN_KEPT_RETEST {
        return Ok((n, None));
    }
    Ok((n, agreement_of(kept.into_iter())))
}

/// A pool row as the LLM tier takes it (nothing decided; `examples` for the prompt).
fn escalated_item(r: &Row, examples: Vec<(String, String)>) -> Classified {
    let mut out = OutputRow::error(r.id.clone(), String::new(), Vec::new());
    out.decided_by = DecidedBy::Escalate;
    out.error = None;
    Classified {
        out,
        content: r.content.clone().ok(),
        vector: None,
        scores: None,
        examples,
        audit: false,
    }
}

/// The rows a round asks the LLM about.
#[allow(clippy::too_many_arguments)]
fn choose(
    o: &BootstrapOptions,
    round: usize,
    want: usize,
    pool: &Pool,
    labelled: &BTreeMap<String, Labelled>,
    held: &HashSet<usize>,
    last_dir: Option<&Path>,
    copts: &ClassifierOptions,
) -> Result<Vec<usize>> {
    let unlabelled: Vec<usize> = (0..pool.rows.len())
        .filter(|&i| !labelled.contains_key(&pool.rows[i].id) && !held.contains(&i))
        .collect();
    let chosen_vecs: Vec<f32> = labelled
        .keys()
        .filter_map(|id| pool.by_id.get(id))
        .flat_map(|&i| pool.vector(i).iter().copied())
        .collect();
    let seed = o.seed.wrapping_add(round as u64);
    // Near-duplicates (cosine above this) of each other or of labelled rows are not bought.
    let near = 0.98;
    let candidates = match (round, last_dir) {
        (0, _) | (_, None) => unlabelled,
        (_, Some(dir)) => {
            // The rows the current index would escalate.
            let c = Classifier::open(dir, copts)?;
            let decided = decide_pool(&c, pool, &unlabelled)?;
            unlabelled
                .into_iter()
                .zip(decided)
                .filter(|(_, d)| *d == DecidedBy::Escalate)
                .map(|(i, _)| i)
                .collect()
        }
    };
    Ok(match o.sampling {
        Sampling::Random => {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut c = candidates;
            rng.shuffle(&mut c);
            c.truncate(want);
            c
        }
        Sampling::Representative => crate::sample::representatives(
            &pool.vectors,
            pool.dim,
            &candidates,
            want,
            &chosen_vecs,
            near,
            seed,
        ),
    })
}

/// How the classifier decides each of `which` pool rows.
fn decide_pool(c: &Classifier, pool: &Pool, which: &[usize]) -> Result<Vec<DecidedBy>> {
    let mut out = Vec::with_capacity(which.len());
    for chunk in which.chunks(4096) {
        let rows: Vec<Row> = chunk.iter().map(|&i| pool.rows[i].clone()).collect();
        let vectors: Vec<RowVector> = chunk.iter().map(|&i| Ok(pool.vector(i).to_vec())).collect();
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| pool.ids[i].clone()).collect();
        out.extend(
            c.decide(rows, vectors, &ids)?
                .into_iter()
                .map(|x| x.out.decided_by),
        );
    }
    Ok(out)
}

/// Sends pool rows `todo` to the LLM and appends every answer to the labelled file as it
/// arrives.
#[allow(clippy::too_many_arguments)]
fn label_rows(
    cfg: &LlmConfig,
    labels: &[String],
    tax: &TaxonomyFile,
    encoder: &Encoder,
    pool: &Pool,
    todo: &[usize],
    round: usize,
    last_dir: Option<&Path>,
    copts: &ClassifierOptions,
    path: &Path,
    held: &HashSet<String>,
    labelled: &mut BTreeMap<String, Labelled>,
) -> Result<()> {
    let seeds: Vec<(String, String)> = tax
        .examples
        .iter()
        .flat_map(|(l, v)| v.iter().map(move |t| (l.clone(), t.clone())))
        .collect();
    // With an index, each row's neighbours give its candidate labels and few-shot examples.
    let forced = match last_dir {
        Some(d) => Some(Classifier::open(
            d,
            &ClassifierOptions {
                threshold: Some(f32::INFINITY),
                ..copts.clone()
            },
        )?),
        None => None,
    };
    let mut tier = LlmTier::new(cfg.clone(), labels.to_vec(), encoder.token_counter())?
        .with_system_turns(encoder.include_system_turns());
    let version = tier.prompt_version().to_string();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<OutputRow>>(64);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let held = held.clone();
    let p = path.to_path_buf();
    let writer = std::thread::spawn(move || -> Result<Vec<Labelled>> {
        let mut w = std::io::BufWriter::new(file);
        let mut got = Vec::new();
        for rows in rx {
            for r in rows {
                let l = Labelled {
                    holdout: held.contains(&r.id),
                    id: r.id,
                    label: (r.decided_by == DecidedBy::Llm)
                        .then_some(r.label)
                        .flatten(),
                    round,
                    model: r.llm.as_ref().map(|x| x.model.clone()),
                    prompt_version: Some(version.clone()),
                    cost_usd: r.llm.as_ref().map_or(0.0, |x| x.cost_usd),
                };
                writeln!(w, "{}", serde_json::to_string(&l).expect("serialises"))
                    .map_err(|e| Error::io(&p, e))?;
                got.push(l);
            }
            // Every answer is on disk before the next batch: a kill loses none it paid for.
            w.flush().map_err(|e| Error::io(&p, e))?;
        }
        Ok(got)
    });
    let groups = todo.chunks(512).map(|chunk| -> Result<Vec<Classified>> {
        let rows: Vec<Row> = chunk.iter().map(|&i| pool.rows[i].clone()).collect();
        Ok(match &forced {
            Some(c) => {
                let vectors = chunk.iter().map(|&i| Ok(pool.vector(i).to_vec())).collect();
                let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| pool.ids[i].clone()).collect();
                c.decide(rows, vectors, &ids)?
                    .into_iter()
                    .filter(|c| c.content.is_some())
                    .collect()
            }
            None => rows
                .iter()
                .map(|r| escalated_item(r, seeds.clone()))
                .collect(),
        })
    });
    let done = tier.submit_all(groups, &tx);
    drop(tx);
    let got = writer
        .join()
        .map_err(|_| Error::Internal("the bootstrap writer panicked".into()))??;
    for l in got {
        labelled.insert(l.id.clone(), l);
    }
    done
}

/// Builds the round's index from the LLM-labelled rows not held back, calibrates it against
/// the LLM on the held-back ones, and measures the share of the pool it would escalate.
/// Returns (exemplars, agreement, escalated share).
fn build_round(
    encoder: &Encoder,
    pool: &Pool,
    labelled: &BTreeMap<String, Labelled>,
    dir: &Path,
    o: &BootstrapOptions,
    target: f64,
    copts: &ClassifierOptions,
) -> Result<(usize, Interval, f64)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let build = BuildInfo {
        sources: vec![o.input.display().to_string()],
        ..Default::default()
    };
    let mut index = ExemplarIndex::create(dir, ModelInfo::of_encoder(encoder), build)?;
    index.manifest.decision.k = o.k;
    let (mut vectors, mut ex) = (Vec::new(), Vec::new());
    let mut held: Vec<(usize, String)> = Vec::new();
    for l in labelled.values() {
        let Some((i, e)) = l.exemplar(pool) else {
            continue;
        };
        if l.holdout {
            held.push((i, e.label));
            continue;
        }
        vectors.extend_from_slice(pool.vector(i));
        ex.push(e);
    }
    if ex.is_empty() {
        return Err(Error::Llm(
            "the LLM labelled no row; check the LLM configuration and the taxonomy".into(),
        ));
    }
    let n = ex.len();
    index.add(&vectors, ex)?;
    if crate::center::CenterChoice::Auto.wanted(&encoder.files.languages) {
        index.center_languages()?;
    }
    crate::calibrate::auto_calibrate(&mut index, target)?;
    index.save()?;
    drop(index);
    let mut c = Classifier::open(dir, copts)?;
    let agreement = if held.len() >= 20 {
        let held_rows = &held;
        let scorer = |c: &Classifier| -> Result<Vec<(crate::decide::Scores, Option<u32>)>> {
            let which: Vec<usize> = held_rows.iter().map(|(i, _)| *i).collect();
            let rows: Vec<Row> = which.iter().map(|&i| pool.rows[i].clone()).collect();
            let vectors = which.iter().map(|&i| Ok(pool.vector(i).to_vec())).collect();
            let ids: Vec<Vec<u32>> = which.iter().map(|&i| pool.ids[i].clone()).collect();
            let decided = c.decide(rows, vectors, &ids)?;
            Ok(decided
                .into_iter()
                .zip(held_rows)
                .filter_map(|(d, (_, gold))| {
                    d.scores.map(|s| {
                        let g = c.index.labels().binary_search(gold).ok().map(|x| x as u32);
                        (s, g)
                    })
                })
                .collect())
        };
        let report = crate::calibrate::calibrate(
            &mut c,
            Some(&scorer),
            &CalibrateOptions {
                target: Some(target),
                // The target is the operating point, and fixed.
                choose_signal: crate::calibrate::SignalChoice::CoverageAtTarget,
                ..Default::default()
            },
        )?;
        if let Some(h) = &c.head {
            h.save(dir)?;
        }
        c.index.save_manifest()?;
        report.expected_kept_accuracy
    } else {
        // Too few held-back rows to calibrate on: the leave-one-out calibration stands.
        crate::calibrate::wilson(0, 0)
    };
    drop(c);
    let c = Classifier::open(dir, copts)?;
    let all: Vec<usize> = (0..pool.rows.len()).collect();
    let decided = decide_pool(&c, pool, &all)?;
    let escalated = decided
        .iter()
        .filter(|d| **d == DecidedBy::Escalate)
        .count() as f64
        / all.len() as f64;
    Ok((n, agreement, escalated))
}

/// The final index at `out`: the last round's (its thresholds and head) plus the held-back
/// rows.
fn finish_index(
    last: &Path,
    pool: &Pool,
    labelled: &BTreeMap<String, Labelled>,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    if out.exists() && !overwrite {
        return Err(Error::index(out, "exists; pass --overwrite to replace it"));
    }
    // Built beside `out` and swapped in whole: an index already there stays until then.
    let update = crate::index::IndexUpdate::create(out, overwrite)?;
    copy_dir(last, update.dir())?;
    let mut index = ExemplarIndex::open(update.dir(), false)?;
    let (mut vectors, mut ex) = (Vec::new(), Vec::new());
    for (i, e) in labelled
        .values()
        .filter(|l| l.holdout)
        .filter_map(|l| l.exemplar(pool))
    {
        vectors.extend_from_slice(pool.vector(i));
        ex.push(e);
    }
    if !ex.is_empty() {
        index.add(&vectors, ex)?;
        index.save()?;
    }
    drop(index);
    update.commit()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let p = e.path();
        if p.is_file() {
            std::fs::copy(&p, to.join(e.file_name())).map_err(|x| Error::io(&p, x))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{agreement_of, labels_from_prompty, Retest};

    #[test]
    fn self_agreement_needs_twenty_rows_and_old_retest_files_still_read() {
        assert_eq!(agreement_of(std::iter::repeat_n(true, 19)), None);
        let a = agreement_of((0..40).map(|i| i % 4 != 0)).unwrap();
        assert!((a - 0.75).abs() < 1e-12);
        let r = Retest {
            rows: 2,
            agreement: None,
            cost_usd: 0.5,
            per_row: vec![("a".into(), true), ("b".into(), false)],
        };
        let back: Retest = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.per_row, r.per_row);
        // The earlier format, a (rows, agreement, cost) tuple, reads as totals without rows.
        let old: Retest = serde_json::from_str("[300, 0.9, 0.01]").unwrap();
        assert_eq!(
            (old.rows, old.agreement, old.per_row.len()),
            (300, Some(0.9), 0)
        );
    }

    #[test]
    fn a_prompty_file_carries_the_label_list() {
        let p = "---\nname: c\nsample:\n  labels:\n    - name: billing\n      description: money\n    - refunds\n---\nsystem:\nhi\n";
        let l = labels_from_prompty(p).unwrap();
        assert_eq!(l.get("billing").map(String::as_str), Some("money"));
        assert_eq!(l.get("refunds").map(String::as_str), Some(""));
        let p = "---\nname: c\ninputs:\n  labels:\n    default:\n      a: first\n      b: second\n---\nuser:\nx\n";
        assert_eq!(labels_from_prompty(p).unwrap().len(), 2);
        assert!(labels_from_prompty("---\nname: c\n---\nuser:\nx\n").is_err());
        assert!(labels_from_prompty("no front matter").is_err());
    }
}
