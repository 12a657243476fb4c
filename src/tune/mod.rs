//! Contrastive fine-tuning of the encoder on an index's exemplars (SetFit's first stage).
//!
//! Texts with a shared label are pulled together and the rest pushed apart, so the kNN vote
//! and the head downstream see tighter label clusters. The loss is in-batch supervised
//! contrastive (every other row of a batch is a negative, every row sharing a label a
//! positive) or SetFit's cosine-similarity pairs; batches are drawn label-grouped (a few rows
//! of each of several labels) so every anchor has positives.
//!
//! How long to train and how fast are chosen by a held-out fold of the exemplars: each
//! candidate learning rate trains on (a bounded sample of) the rest and is scored after every
//! epoch by the held-out accuracy of what is deployed on top of the encoder (the learned head;
//! the kNN vote for multi-label indexes); the frozen encoder is scored the same way, and
//! tuning is only kept when it beats it by `min_gain`. The final run trains on every row it is
//! given.
//!
//! This module must never read files other than its checkpoint, print, or touch the index:
//! the `app::tune` job feeds it token ids and writes what it returns.

pub mod bert;

pub use bert::TrainBert;

use crate::{Error, Result};
use candle_core::{DType, Tensor, Var, D};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The contrastive objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Supervised contrastive (Khosla et al. 2020) over the whole batch.
    SupCon,
    /// SetFit's default: squared error between cosine and 1 (same label) / 0 (different),
    /// positive and negative pairs weighted equally.
    Pairs,
}

impl std::str::FromStr for Loss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "supcon" => Ok(Loss::SupCon),
            "pairs" => Ok(Loss::Pairs),
            _ => Err(format!("unknown loss `{s}` (supcon or pairs)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TuneOptions {
    pub loss: Loss,
    /// Candidate learning rates for cross-validation (one value: no search over rates).
    pub lrs: Vec<f64>,
    /// The most epochs a candidate trains for; the best epoch count on the held-out fold wins.
    pub max_epochs: usize,
    /// Fixed epochs and rate: skip the held-out search.
    pub fixed: Option<(usize, f64)>,
    /// Rows per batch and rows per label within a batch.
    pub batch_rows: usize,
    pub per_label: usize,
    pub temperature: f64,
    pub weight_decay: f64,
    /// Wall-clock budget for the whole tuning (search + final run).
    pub time_budget: Option<Duration>,
    pub seed: u64,
    /// Share of exemplars held out for the search.
    pub holdout: f64,
    /// The most rows a search candidate trains on.
    pub search_rows: usize,
    /// Held-out accuracy the tuned encoder must gain over the frozen one to be kept.
    pub min_gain: f64,
    /// Where the final run's checkpoint lives (resumed when present and compatible).
    pub checkpoint: Option<PathBuf>,
    /// Seconds between checkpoint writes.
    pub checkpoint_every: Duration,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            loss: Loss::SupCon,
            // Few optimizer steps (one per 64 texts) want larger rates than SetFit's 2e-5 over
            // many pair batches; measured on a Banking77 fold: 1e-4 > 5e-5 > 2e-5.
            lrs: vec![5e-5, 1e-4, 2e-4],
            max_epochs: 3,
            fixed: None,
            batch_rows: 64,
            per_label: 4,
            temperature: 0.05,
            weight_decay: 0.01,
            time_budget: None,
            seed: 17,
            holdout: 0.2,
            search_rows: 3000,
            // Half a point: below that a gain is within the noise of a few thousand held-out
            // rows and of picking the best of several candidates.
            min_gain: 0.005,
            checkpoint: None,
            checkpoint_every: Duration::from_secs(60),
        }
    }
}

/// The exemplars as the trainer sees them: one token-id sequence per distinct text and the
/// labels it carries (one for a single-label index, a set for a multi-label one).
pub struct TuneData {
    pub seqs: Vec<Vec<u32>>,
    pub labels: Vec<Vec<u32>>,
    /// Each text's word-piece ids without special tokens (the head's lexical features).
    pub content: Vec<Vec<u32>>,
}

/// One optimizer step, for progress display.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub phase: String,
    pub step: usize,
    pub total: usize,
    pub loss: f64,
}

/// A finished search, remembered in the checkpoint folder.
#[derive(serde::Serialize, serde::Deserialize)]
struct SearchMemo {
    key: String,
    frozen: f64,
    candidates: Vec<Candidate>,
    epochs: usize,
    lr: f64,
}

/// One candidate of the search: held-out accuracy after each epoch.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub lr: f64,
    pub accuracy_by_epoch: Vec<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TuneReport {
    pub texts: usize,
    pub labels: usize,
    pub loss: Loss,
    /// Held-out accuracy (head, or kNN vote for multi-label) of the frozen encoder (None
    /// when the search was skipped).
    pub frozen_accuracy: Option<f64>,
    pub candidates: Vec<Candidate>,
    /// The chosen epochs and learning rate; None when tuning was not kept.
    pub chosen: Option<(usize, f64)>,
    /// Why the frozen encoder was kept, when it was.
    pub kept_frozen: Option<String>,
    pub final_steps: usize,
    pub final_loss: Option<f64>,
    /// Steps of the final run that a checkpoint spared.
    pub resumed_steps: usize,
    /// The time budget cut the final run short; its checkpoint (and the search's outcome)
    /// wait for the next run.
    pub resumable: bool,
    pub seconds: f64,
}

/// Plain AdamW whose moments are tensors we can checkpoint (candle-nn's are private).
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
    wd: f64,
}

impl AdamW {
    fn new(vars: &[(String, Var)], wd: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(AdamW {
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            t: 0,
            wd,
        })
    }

    /// One step with gradient clipping to global norm 1.
    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
        lr: f64,
    ) -> Result<()> {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        self.t += 1;
        let gs: Vec<Option<Tensor>> = vars.iter().map(|(_, v)| grads.get(v).cloned()).collect();
        let mut sq = 0f64;
        for g in gs.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, ((_, var), g)) in vars.iter().zip(gs).enumerate() {
            let Some(g) = g else { continue };
            let g = (g * clip)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&self.m[i] / c1)?;
            let vhat = (&self.v[i] / c2)?;
            let upd = mhat.broadcast_div(&vhat.sqrt()?.affine(1.0, eps)?)?;
            let w = var.as_tensor();
            let next = ((w * (1.0 - lr * self.wd))? - (upd * lr)?)?;
            var.set(&next)?;
        }
        Ok(())
    }
}

/// The batches of one epoch: rows grouped `per_label` at a time by a label they carry (so
/// every anchor has positives), rows of similar length grouped together and groups of similar
/// length batched together (padding is most of the cost of short texts otherwise), batches in
/// random order. Every row appears once.
fn epoch_batches(
    labels: &[Vec<u32>],
    lens: &[usize],
    rows: &[usize],
    per_label: usize,
    batch_rows: usize,
    rng: &mut fastrand::Rng,
) -> Vec<Vec<usize>> {
    let mut by_label: HashMap<u32, Vec<usize>> = HashMap::new();
    for &r in rows {
        let ls = &labels[r];
        if ls.is_empty() {
            continue;
        }
        let l = ls[rng.usize(..ls.len())];
        by_label.entry(l).or_default().push(r);
    }
    let mut keys: Vec<u32> = by_label.keys().copied().collect();
    keys.sort_unstable();
    let mut groups: Vec<(usize, u64, Vec<usize>)> = Vec::new();
    for k in keys {
        let mut members = by_label.remove(&k).unwrap_or_default();
        rng.shuffle(&mut members);
        members.sort_by_key(|&r| lens[r]);
        for c in members.chunks(per_label.max(2)) {
            let longest = c.iter().map(|&r| lens[r]).max().unwrap_or(0);
            groups.push((longest, rng.u64(..), c.to_vec()));
        }
    }
    groups.sort_unstable_by_key(|g| (g.0, g.1));
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for (_, _, g) in groups {
        if cur.len() + g.len() > batch_rows && !cur.is_empty() {
            batches.push(std::mem::take(&mut cur));
        }
        cur.extend(g);
    }
    if cur.len() > 1 {
        batches.push(cur);
    }
    rng.shuffle(&mut batches);
    batches
}

/// The loss of one batch of embeddings `e` (rows L2-normalised) and its positive mask.
fn batch_loss(e: &Tensor, pos: &Tensor, loss: Loss, temperature: f64) -> Result<Tensor> {
    let n = e.dim(0)?;
    let sim = e.matmul(&e.t()?)?;
    let eye = Tensor::eye(n, DType::F32, e.device())?;
    match loss {
        Loss::SupCon => {
            // Exclude self-similarity from the denominator with a large negative on the diagonal.
            let logits = ((sim / temperature)? - (&eye * 1.0e4)?)?;
            let max = logits.max_keepdim(D::Minus1)?.detach();
            let lse = logits
                .broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                .broadcast_add(&max)?;
            let logp = logits.broadcast_sub(&lse)?;
            let npos = pos.sum_keepdim(D::Minus1)?;
            let has = npos.gt(0.0)?.to_dtype(DType::F32)?;
            let per = (pos * logp)?
                .sum_keepdim(D::Minus1)?
                .broadcast_div(&npos.clamp(1.0, f64::MAX)?)?;
            let anchors = has.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
            Ok(((per * has)?.sum_all()? * (-1.0 / anchors))?)
        }
        Loss::Pairs => {
            let off = eye.affine(-1.0, 1.0)?; // 1 off the diagonal
            let neg = (&off - pos)?;
            let err = (sim - pos)?.sqr()?;
            let np = pos.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
            let nn = neg.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
            let lp = ((&err * pos)?.sum_all()? / np)?;
            let ln = ((err * neg)?.sum_all()? / nn)?;
            Ok(((lp + ln)? * 0.5)?)
        }
    }
}

fn positive_mask(
    labels: &[Vec<u32>],
    batch: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n = batch.len();
    let mut m = vec![0f32; n * n];
    for (i, &a) in batch.iter().enumerate() {
        for (j, &b) in batch.iter().enumerate() {
            if i != j && labels[a].iter().any(|l| labels[b].contains(l)) {
                m[i * n + j] = 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(m, (n, n), device)?)
}

/// Linear warm-up over the first 10 % of steps, then linear decay to zero.
fn lr_at(base: f64, step: usize, total: usize) -> f64 {
    let warm = (total / 10).max(1);
    if step < warm {
        base * (step + 1) as f64 / warm as f64
    } else {
        base * (total - step) as f64 / (total - warm).max(1) as f64
    }
}

/// The training run's fixed parameters, recorded in its checkpoint so that a resume with
/// other data or settings starts over instead of mixing runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunKey {
    data: String,
    lr: f64,
    epochs: usize,
    loss: Loss,
    batch_rows: usize,
    per_label: usize,
    seed: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CheckpointMeta {
    key: RunKey,
    step: usize,
    total: usize,
    adam_t: usize,
    last_loss: f64,
}

/// One training run: which rows, how long, how fast, until when, checkpointed where.
struct RunSpec<'a> {
    rows: &'a [usize],
    epochs: usize,
    lr: f64,
    phase: &'a str,
    deadline: Option<Instant>,
    checkpoint: Option<(&'a PathBuf, &'a RunKey)>,
}

struct Trainer<'a> {
    model: &'a TrainBert,
    data: &'a TuneData,
    opts: &'a TuneOptions,
}

/// What a deadline did to a training run.
struct Trained {
    steps: usize,
    last_loss: Option<f64>,
    resumed: usize,
    cut_short: bool,
}

impl Trainer<'_> {
    fn run(
        &self,
        spec: RunSpec<'_>,
        on_step: &mut dyn FnMut(&StepEvent),
        // Called after each epoch; `false` ends the run there.
        mut after_epoch: impl FnMut(usize) -> Result<bool>,
    ) -> Result<Trained> {
        let RunSpec {
            rows,
            epochs,
            lr,
            phase,
            deadline,
            checkpoint,
        } = spec;
        let mut rng = fastrand::Rng::with_seed(self.opts.seed);
        let lens: Vec<usize> = self.data.seqs.iter().map(Vec::len).collect();
        let plan: Vec<Vec<Vec<usize>>> = (0..epochs)
            .map(|_| {
                epoch_batches(
                    &self.data.labels,
                    &lens,
                    rows,
                    self.opts.per_label,
                    self.opts.batch_rows,
                    &mut rng,
                )
            })
            .collect();
        let total: usize = plan.iter().map(Vec::len).sum();
        let vars = self.model.vars();
        let mut adam = AdamW::new(vars, self.opts.weight_decay)?;
        let mut start = 0usize;
        let mut last_loss = None;
        if let Some((path, key)) = checkpoint {
            if let Some((meta, tensors)) = read_checkpoint(path)? {
                if &meta.key == key && meta.total == total && meta.step <= total {
                    self.model.set_trained(&tensors)?;
                    for (i, (n, _)) in vars.iter().enumerate() {
                        if let (Some(m), Some(v)) = (
                            tensors.get(&format!("adam.m.{n}")),
                            tensors.get(&format!("adam.v.{n}")),
                        ) {
                            adam.m[i] = m.clone();
                            adam.v[i] = v.clone();
                        }
                    }
                    adam.t = meta.adam_t;
                    start = meta.step;
                    last_loss = Some(meta.last_loss);
                }
            }
        }
        let resumed = start;
        let mut last_save = Instant::now();
        let mut step = 0usize;
        for (epoch, batches) in plan.iter().enumerate() {
            for batch in batches {
                if step < start {
                    step += 1;
                    continue;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    if let Some((path, key)) = checkpoint {
                        write_checkpoint(path, key, self.model, &adam, step, total, last_loss)?;
                    }
                    return Ok(Trained {
                        steps: step,
                        last_loss,
                        resumed,
                        cut_short: true,
                    });
                }
                let seqs: Vec<&[u32]> = batch
                    .iter()
                    .map(|&i| self.data.seqs[i].as_slice())
                    .collect();
                let (ids, mask) = self.model.batch(&seqs)?;
                let e = self.model.forward(&ids, &mask)?;
                let pos = positive_mask(&self.data.labels, batch, self.model.device())?;
                let loss = batch_loss(&e, &pos, self.opts.loss, self.opts.temperature)?;
                let lv = loss.to_scalar::<f32>()? as f64;
                if !lv.is_finite() {
                    return Err(Error::Internal(format!(
                        "fine-tuning diverged at step {step} (loss {lv}); try a smaller --lr"
                    )));
                }
                let grads = loss.backward()?;
                adam.step(vars, &grads, lr_at(lr, step, total))?;
                last_loss = Some(match last_loss {
                    Some(prev) => 0.9 * prev + 0.1 * lv,
                    None => lv,
                });
                step += 1;
                on_step(&StepEvent {
                    phase: phase.to_string(),
                    step,
                    total,
                    loss: last_loss.unwrap_or(lv),
                });
                if let Some((path, key)) = checkpoint {
                    if last_save.elapsed() >= self.opts.checkpoint_every {
                        write_checkpoint(path, key, self.model, &adam, step, total, last_loss)?;
                        last_save = Instant::now();
                    }
                }
            }
            if !after_epoch(epoch + 1)? {
                break;
            }
        }
        Ok(Trained {
            steps: step,
            last_loss,
            resumed,
            cut_short: false,
        })
    }
}

fn write_checkpoint(
    path: &PathBuf,
    key: &RunKey,
    model: &TrainBert,
    adam: &AdamW,
    step: usize,
    total: usize,
    last_loss: Option<f64>,
) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (i, (n, v)) in model.vars().iter().enumerate() {
        map.insert(n.clone(), v.as_tensor().clone());
        map.insert(format!("adam.m.{n}"), adam.m[i].clone());
        map.insert(format!("adam.v.{n}"), adam.v[i].clone());
    }
    let wtmp = path.join("state.safetensors.tmp");
    candle_core::safetensors::save(&map, &wtmp)
        .map_err(|e| Error::Model(format!("writing {}: {e}", wtmp.display())))?;
    crate::fsio::commit(&wtmp, &path.join("state.safetensors"))?;
    let meta = CheckpointMeta {
        key: key.clone(),
        step,
        total,
        adam_t: adam.t,
        last_loss: last_loss.unwrap_or(f64::NAN),
    };
    let mtmp = path.join("meta.json.tmp");
    std::fs::write(&mtmp, serde_json::to_vec_pretty(&meta).unwrap_or_default())
        .map_err(|e| Error::io(&mtmp, e))?;
    // The meta names the state written just before it: a crash between the two leaves the old
    // meta with a newer state, which only costs replaying a few steps' worth of progress.
    crate::fsio::commit(&mtmp, &path.join("meta.json"))?;
    crate::failpoint::hit("tune-checkpoint");
    Ok(())
}

fn read_checkpoint(
    path: &std::path::Path,
) -> Result<Option<(CheckpointMeta, HashMap<String, Tensor>)>> {
    let mp = path.join("meta.json");
    let sp = path.join("state.safetensors");
    if !mp.is_file() || !sp.is_file() {
        return Ok(None);
    }
    let Ok(meta) = serde_json::from_slice::<CheckpointMeta>(
        &std::fs::read(&mp).map_err(|e| Error::io(&mp, e))?,
    ) else {
        return Ok(None); // a damaged checkpoint only costs its progress
    };
    match candle_core::safetensors::load(&sp, &candle_core::Device::Cpu) {
        Ok(t) => Ok(Some((meta, t))),
        Err(_) => Ok(None),
    }
}

/// Held-out accuracy of what will be deployed on top of the encoder: for a single-label index
/// the learned head (embedding + word pieces, default options) trained on the training fold;
/// for a multi-label one the kNN vote (a hit is a top-voted label the row carries).
fn held_out_accuracy(
    model: &TrainBert,
    embed: &mut EmbedFn,
    data: &TuneData,
    train: &[usize],
    held: &[usize],
) -> Result<f64> {
    let h = model.shape.hidden;
    let seqs =
        |rows: &[usize]| -> Vec<&[u32]> { rows.iter().map(|&i| data.seqs[i].as_slice()).collect() };
    let mut both = seqs(train);
    both.extend(seqs(held));
    let mut a = embed(model, &both)?;
    let b = a.split_off(train.len() * h);
    if held.is_empty() {
        return Ok(0.0);
    }
    if data.labels.iter().all(|l| l.len() == 1) {
        let n_labels = data
            .labels
            .iter()
            .flatten()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let ids: Vec<&[u32]> = train.iter().map(|&i| data.content[i].as_slice()).collect();
        let y: Vec<u32> = train.iter().map(|&i| data.labels[i][0]).collect();
        let head = crate::head::Head::train(&a, h, &ids, &y, n_labels, &Default::default())?;
        let hits = held
            .iter()
            .enumerate()
            .filter(|&(j, &i)| {
                let p = head.predict(&b[j * h..(j + 1) * h], &data.content[i]);
                let best = p
                    .iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map(|(l, _)| l as u32);
                best == Some(data.labels[i][0])
            })
            .count();
        return Ok(hits as f64 / held.len() as f64);
    }
    let at = Tensor::from_vec(a, (train.len(), h), &candle_core::Device::Cpu)?;
    let bt = Tensor::from_vec(b, (held.len(), h), &candle_core::Device::Cpu)?;
    let sims: Vec<Vec<f32>> = bt.matmul(&at.t()?)?.to_vec2()?;
    let k = 10.min(train.len());
    let mut hits = 0usize;
    for (qi, row) in sims.iter().enumerate() {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.select_nth_unstable_by(k.saturating_sub(1), |&x, &y| row[y].total_cmp(&row[x]));
        let mut votes: HashMap<u32, f32> = HashMap::new();
        for &j in &order[..k] {
            for &l in &data.labels[train[j]] {
                *votes.entry(l).or_default() += row[j].max(0.0);
            }
        }
        let best = votes
            .into_iter()
            .max_by(|x, y| x.1.total_cmp(&y.1).then(y.0.cmp(&x.0)))
            .map(|(l, _)| l);
        if best.is_some_and(|l| data.labels[held[qi]].contains(&l)) {
            hits += 1;
        }
    }
    Ok(hits as f64 / held.len() as f64)
}

/// A stratified split: about `share` of each label's rows held out (at least one row of
/// labels with three or more).
fn split(data: &TuneData, share: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let mut by_label: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, ls) in data.labels.iter().enumerate() {
        if let Some(&l) = ls.first() {
            by_label.entry(l).or_default().push(i);
        }
    }
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for (_, mut rows) in by_label {
        rng.shuffle(&mut rows);
        let n = if rows.len() >= 3 {
            ((rows.len() as f64 * share).round() as usize).max(1)
        } else {
            0
        };
        held.extend_from_slice(&rows[..n]);
        train.extend_from_slice(&rows[n..]);
    }
    train.sort_unstable();
    held.sort_unstable();
    (train, held)
}

/// A digest of the training data, tying a checkpoint to it.
fn data_key(data: &TuneData) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (s, l) in data.seqs.iter().zip(&data.labels) {
        for x in s {
            h.update(x.to_le_bytes());
        }
        h.update([0xff]);
        for x in l {
            h.update(x.to_le_bytes());
        }
        h.update([0xfe]);
    }
    format!("{:x}", h.finalize())
}

/// Embeds id sequences with the model's current weights (the job hands in its fastest engine;
/// [`TrainBert::embed`] is the portable fallback).
pub type EmbedFn<'a> = dyn FnMut(&TrainBert, &[&[u32]]) -> Result<Vec<f32>> + 'a;

/// Fewest texts and labels worth tuning on: below this the held-out fold is too small to tell
/// a gain from noise, and contrastive batches have too few positives.
pub const MIN_TEXTS: usize = 40;

/// Tunes `model` in place. On return the model holds the tuned weights when
/// `report.chosen` is set, and the base weights otherwise.
pub fn tune(
    model: &TrainBert,
    data: &TuneData,
    opts: &TuneOptions,
    embed: &mut EmbedFn,
    on_step: &mut dyn FnMut(&StepEvent),
) -> Result<TuneReport> {
    let t0 = Instant::now();
    let deadline = opts.time_budget.map(|b| t0 + b);
    let n_labels = {
        let mut s: Vec<u32> = data.labels.iter().flatten().copied().collect();
        s.sort_unstable();
        s.dedup();
        s.len()
    };
    let base: HashMap<String, Tensor> = model
        .vars()
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    let mut report = TuneReport {
        texts: data.seqs.len(),
        labels: n_labels,
        loss: opts.loss,
        frozen_accuracy: None,
        candidates: Vec::new(),
        chosen: None,
        kept_frozen: None,
        final_steps: 0,
        final_loss: None,
        resumed_steps: 0,
        resumable: false,
        seconds: 0.0,
    };
    let keep_frozen = |mut r: TuneReport, why: String| -> Result<TuneReport> {
        model.set_trained(&base)?;
        r.kept_frozen = Some(why);
        r.seconds = t0.elapsed().as_secs_f64();
        Ok(r)
    };
    if data.seqs.len() < MIN_TEXTS || n_labels < 2 {
        return keep_frozen(
            report,
            format!(
                "{} texts in {} labels: too few to learn from (at least {MIN_TEXTS} texts in 2 labels)",
                data.seqs.len(),
                n_labels
            ),
        );
    }
    let trainer = Trainer { model, data, opts };
    let all: Vec<usize> = (0..data.seqs.len()).collect();
    let digest = data_key(data);
    // A finished search is remembered beside the checkpoint, so a run cut short by its time
    // budget continues with the final run instead of searching again.
    let search_key = format!(
        "{digest}|{:?}|{:?}|{}|{}|{}|{}|{}|{}",
        opts.lrs,
        opts.loss,
        opts.max_epochs,
        opts.batch_rows,
        opts.per_label,
        opts.seed,
        opts.holdout,
        opts.search_rows
    );
    let search_file = opts.checkpoint.as_ref().map(|p| p.join("search.json"));
    let remembered: Option<SearchMemo> = search_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<SearchMemo>(&b).ok())
        .filter(|m| m.key == search_key);
    let (epochs, lr) = match (opts.fixed, remembered) {
        (Some(f), _) => f,
        (None, Some(m)) => {
            report.frozen_accuracy = Some(m.frozen);
            report.candidates = m.candidates;
            (m.epochs, m.lr)
        }
        (None, None) => {
            let (mut train, held) = split(data, opts.holdout, opts.seed);
            if train.len() > opts.search_rows {
                // The search trains on a bounded sample: its cost must not grow with the
                // index, and epoch counts transfer from it to the full run.
                let mut rng = fastrand::Rng::with_seed(opts.seed ^ 0xf01d);
                rng.shuffle(&mut train);
                train.truncate(opts.search_rows);
                train.sort_unstable();
            }
            let frozen = held_out_accuracy(model, embed, data, &train, &held)?;
            report.frozen_accuracy = Some(frozen);
            if frozen + opts.min_gain > 1.0 {
                return keep_frozen(
                    report,
                    format!(
                        "the frozen encoder already gets {:.2} % of the held-out exemplars right: nothing for tuning to gain",
                        frozen * 100.0
                    ),
                );
            }
            let mut best: Option<(f64, usize, f64)> = None;
            for &lr in &opts.lrs {
                let tc = Instant::now();
                model.set_trained(&base)?;
                let mut accs = Vec::new();
                let phase = format!("search lr {lr:.0e}");
                let trained = trainer.run(
                    RunSpec {
                        rows: &train,
                        epochs: opts.max_epochs,
                        lr,
                        phase: &phase,
                        deadline,
                        checkpoint: None,
                    },
                    on_step,
                    |_| {
                        let a = held_out_accuracy(model, embed, data, &train, &held)?;
                        // A candidate whose held-out accuracy has fallen a point below its
                        // best is past its peak: later epochs will not win.
                        let peak = accs.iter().copied().fold(frozen, f64::max);
                        accs.push(a);
                        Ok(a + 0.01 >= peak)
                    },
                )?;
                for (e, &a) in accs.iter().enumerate() {
                    if best.is_none_or(|b| a > b.0) {
                        best = Some((a, e + 1, lr));
                    }
                }
                report.candidates.push(Candidate {
                    lr,
                    accuracy_by_epoch: accs,
                    seconds: tc.elapsed().as_secs_f64(),
                });
                if trained.cut_short {
                    break;
                }
                // The time left must cover another candidate and then the final run on every
                // row; stop searching when it would not.
                if let (Some(d), Some(&(_, e, _))) = (deadline, best.as_ref()) {
                    let ran = report
                        .candidates
                        .last()
                        .map_or(1, |c| c.accuracy_by_epoch.len());
                    let per_epoch = tc.elapsed().as_secs_f64() / ran.max(1) as f64;
                    let full = data.seqs.len() as f64 / train.len().max(1) as f64;
                    let need = per_epoch * (opts.max_epochs as f64 + e as f64 * full);
                    if d.saturating_duration_since(Instant::now()).as_secs_f64() < need {
                        break;
                    }
                }
            }
            let Some((acc, e, lr)) = best else {
                return keep_frozen(
                    report,
                    "the time budget ended before one epoch of the search; allow more time (--time-budget)".into(),
                );
            };
            if acc < frozen + opts.min_gain {
                return keep_frozen(
                    report,
                    format!(
                        "held-out accuracy {:.2} % tuned vs {:.2} % frozen (at least {:.1} points needed): tuning does not help here",
                        acc * 100.0,
                        frozen * 100.0,
                        opts.min_gain * 100.0
                    ),
                );
            }
            if let Some(p) = &search_file {
                let memo = SearchMemo {
                    key: search_key.clone(),
                    frozen,
                    candidates: report.candidates.clone(),
                    epochs: e,
                    lr,
                };
                std::fs::create_dir_all(p.parent().unwrap_or(p)).map_err(|x| Error::io(p, x))?;
                std::fs::write(p, serde_json::to_vec(&memo).unwrap_or_default())
                    .map_err(|x| Error::io(p, x))?;
            }
            (e, lr)
        }
    };
    model.set_trained(&base)?;
    let key = RunKey {
        data: digest,
        lr,
        epochs,
        loss: opts.loss,
        batch_rows: opts.batch_rows,
        per_label: opts.per_label,
        seed: opts.seed,
    };
    let ckpt = opts.checkpoint.as_ref().map(|p| (p, &key));
    let spec = RunSpec {
        rows: &all,
        epochs,
        lr,
        phase: "tune",
        deadline,
        checkpoint: ckpt,
    };
    let trained = trainer.run(spec, on_step, |_| Ok(true))?;
    report.resumed_steps = trained.resumed;
    if trained.cut_short {
        report.resumable = true;
        return keep_frozen(
            report,
            format!(
                "the time budget ended after {} steps of the final run (checkpoint kept: run again to continue, or allow more time)",
                trained.steps
            ),
        );
    }
    report.chosen = Some((epochs, lr));
    report.final_steps = trained.steps;
    report.final_loss = trained.last_loss;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_batches_cover_every_row_once_with_positives() {
        let labels: Vec<Vec<u32>> = (0..103).map(|i| vec![(i % 7) as u32]).collect();
        let rows: Vec<usize> = (0..103).collect();
        let mut rng = fastrand::Rng::with_seed(3);
        let lens: Vec<usize> = (0..103).map(|i| 3 + i % 11).collect();
        let b = epoch_batches(&labels, &lens, &rows, 4, 16, &mut rng);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert!(seen.len() >= 101 && seen.windows(2).all(|w| w[0] < w[1]));
        assert!(b.iter().all(|x| x.len() <= 16));
        // Most rows have a same-label partner in their batch.
        let with_pos: usize = b
            .iter()
            .map(|x| {
                x.iter()
                    .filter(|&&i| x.iter().any(|&j| j != i && labels[j] == labels[i]))
                    .count()
            })
            .sum();
        assert!(with_pos * 10 >= seen.len() * 9, "{with_pos}");
    }

    #[test]
    fn schedule_warms_up_and_decays_to_zero() {
        assert!(lr_at(1.0, 0, 100) < lr_at(1.0, 9, 100));
        assert!((lr_at(1.0, 9, 100) - 1.0).abs() < 1e-9);
        assert!(lr_at(1.0, 99, 100) < 0.02);
    }

    #[test]
    fn supcon_prefers_clustered_embeddings() {
        let dev = candle_core::Device::Cpu;
        let labels = vec![vec![0u32], vec![0], vec![1], vec![1]];
        let pos = positive_mask(&labels, &[0, 1, 2, 3], &dev).unwrap();
        let good = Tensor::from_vec(vec![1f32, 0., 1., 0., 0., 1., 0., 1.], (4, 2), &dev).unwrap();
        let bad = Tensor::from_vec(vec![1f32, 0., 0., 1., 1., 0., 0., 1.], (4, 2), &dev).unwrap();
        for loss in [Loss::SupCon, Loss::Pairs] {
            let g = batch_loss(&good, &pos, loss, 0.1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let b = batch_loss(&bad, &pos, loss, 0.1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(g < b, "{loss:?}: {g} vs {b}");
        }
    }
}
