//! The learned head: a multinomial logistic regression over the exemplar embedding and the
//! conversation's word pieces (TF-IDF of unigrams and bigrams of the tokenizer's ids, the same
//! ids the embedder saw), trained with candle-nn (AdamW) and applied in plain Rust.
//!
//! Why both views: the sentence embedding knows paraphrase, the word pieces know the exact
//! keywords an intent hinges on ("virtual card" vs "physical card"); TnT-LLM-style heads on
//! embeddings alone lose those distinctions. Everything the head needs at classification time
//! comes from the one embedding pass (vector + token ids), so it adds no model call.
//! This module must never embed text or read rows; it gets vectors and ids.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const HEAD_FILE: &str = "head.safetensors";
pub const HEAD_META: &str = "head.json";

/// Sparse TF-IDF features of word-piece unigrams and bigrams.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Lexicon {
    /// n-gram key → feature index.
    index: HashMap<u64, u32>,
    idf: Vec<f32>,
}

fn ngrams(ids: &[u32]) -> impl Iterator<Item = u64> + '_ {
    let uni = ids.iter().map(|&a| (1u64 << 63) | a as u64);
    let bi = ids.windows(2).map(|w| ((w[0] as u64) << 32) | w[1] as u64);
    uni.chain(bi)
}

impl Lexicon {
    /// Features seen in at least `min_df` documents, at most `max_features` of them (the most
    /// frequent: the weights are dense per feature, so the cap bounds training time and memory
    /// on large indexes).
    pub fn fit(docs: &[&[u32]], min_df: usize, max_features: usize) -> Lexicon {
        let mut df: HashMap<u64, u32> = HashMap::new();
        for d in docs {
            let mut seen: Vec<u64> = ngrams(d).collect();
            seen.sort_unstable();
            seen.dedup();
            for g in seen {
                *df.entry(g).or_default() += 1;
            }
        }
        let n = docs.len() as f32;
        let mut keys: Vec<(u64, u32)> = df
            .into_iter()
            .filter(|&(_, c)| c as usize >= min_df)
            .collect();
        if keys.len() > max_features {
            keys.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            keys.truncate(max_features);
        }
        keys.sort_unstable();
        let mut index = HashMap::with_capacity(keys.len());
        let mut idf = Vec::with_capacity(keys.len());
        for (i, (k, c)) in keys.into_iter().enumerate() {
            index.insert(k, i as u32);
            idf.push(((1.0 + n) / (1.0 + c as f32)).ln() + 1.0);
        }
        Lexicon { index, idf }
    }

    pub fn len(&self) -> usize {
        self.idf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idf.is_empty()
    }

    /// Sublinear-tf × idf, L2-normalised, sorted by feature.
    pub fn features(&self, ids: &[u32]) -> Vec<(u32, f32)> {
        let mut tf: HashMap<u32, f32> = HashMap::new();
        for g in ngrams(ids) {
            if let Some(&i) = self.index.get(&g) {
                *tf.entry(i).or_default() += 1.0;
            }
        }
        let mut v: Vec<(u32, f32)> = tf
            .into_iter()
            .map(|(i, c)| (i, (1.0 + c.ln()) * self.idf[i as usize]))
            .collect();
        let norm = v.iter().map(|(_, x)| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|(_, x)| *x /= norm);
        }
        v.sort_unstable_by_key(|x| x.0);
        v
    }
}

/// Training settings (defaults chosen by cross-validation on Banking77 and CLINC150 train).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// L2 penalty on the weights (per example, i.e. 1/(C·n) in scikit-learn's terms).
    pub l2: f64,
    pub min_df: usize,
    pub seed: u64,
    /// At most this many word-piece features (the most frequent).
    #[serde(default = "max_features")]
    pub max_features: usize,
    /// Use the word-piece features besides the embedding. Multi-label calibration measures
    /// both and keeps the better: on dialogues full of names and places (SGD) the keywords
    /// of the training services mislead on new ones.
    #[serde(default = "yes")]
    pub lexical: bool,
}

fn yes() -> bool {
    true
}

fn max_features() -> usize {
    1 << 15
}

/// Rows up to which `epochs` are taken as given; beyond, passes shrink so that the number of
/// optimizer steps stays about what `epochs` over this many rows takes (at least two passes):
/// on 200k rows twenty passes cost minutes and converge no better.
const FULL_EPOCH_ROWS: usize = 10_000;

fn effective_epochs(epochs: usize, n: usize) -> usize {
    if n <= FULL_EPOCH_ROWS {
        epochs
    } else {
        (epochs * FULL_EPOCH_ROWS).div_ceil(n).max(2).min(epochs)
    }
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            epochs: 20,
            batch: 512,
            lr: 0.1,
            l2: 0.0,
            min_df: 2,
            seed: 13,
            max_features: max_features(),
            lexical: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeadMeta {
    dim: usize,
    n_labels: usize,
    lexicon: Lexicon,
    options: HeadOptions,
    /// One-vs-rest sigmoids (a multi-label index) instead of one softmax.
    #[serde(default)]
    multi_label: bool,
}

/// What a head is trained to predict.
pub enum Targets<'a> {
    /// One label per example (softmax, cross-entropy).
    Single(&'a [u32]),
    /// A set of labels per example (one sigmoid per label, binary cross-entropy): the
    /// one-vs-rest logistic regression of a multi-label index, trained jointly.
    Multi(&'a [Vec<u32>]),
}

impl Targets<'_> {
    fn len(&self) -> usize {
        match self {
            Targets::Single(y) => y.len(),
            Targets::Multi(y) => y.len(),
        }
    }
}

/// A trained head.
pub struct Head {
    dim: usize,
    n_labels: usize,
    lexicon: Lexicon,
    /// [dim][n_labels]
    wd: Vec<f32>,
    /// [features][n_labels]
    ws: Vec<f32>,
    b: Vec<f32>,
    options: HeadOptions,
    multi_label: bool,
}

/// Word-piece weights (features × labels) with Adam moments, updated lazily: only the rows
/// a batch touches move, with the global step's bias correction (the usual "lazy Adam").
struct SparseAdam {
    labels: usize,
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Scratch: each touched feature's slot in `grad` (u32::MAX when untouched).
    slot: Vec<u32>,
}

impl SparseAdam {
    // candle-nn's AdamW defaults, as the dense weights use.
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(features: usize, labels: usize) -> Self {
        SparseAdam {
            labels,
            w: vec![0.0; features * labels],
            m: vec![0.0; features * labels],
            v: vec![0.0; features * labels],
            slot: vec![u32::MAX; features],
        }
    }

    /// (batch × labels) logits from the batch's (feature, value, row) triples.
    fn logits(&self, fid: &[u32], fval: &[f32], frow: &[u32], rows: usize) -> Vec<f32> {
        let l = self.labels;
        let mut z = vec![0f32; rows * l];
        for ((&f, &v), &r) in fid.iter().zip(fval).zip(frow) {
            let (f, r) = (f as usize, r as usize);
            let w = &self.w[f * l..(f + 1) * l];
            z[r * l..(r + 1) * l]
                .iter_mut()
                .zip(w)
                .for_each(|(a, b)| *a += v * b);
        }
        z
    }

    /// One Adam step (1-based `step`) from dL/dlogits `g` (batch × labels).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        fid: &[u32],
        fval: &[f32],
        frow: &[u32],
        g: &[f32],
        lr: f64,
        l2: f64,
        step: usize,
    ) {
        let l = self.labels;
        let mut touched: Vec<u32> = Vec::new();
        let mut grad: Vec<f32> = Vec::new();
        for ((&f, &v), &r) in fid.iter().zip(fval).zip(frow) {
            let s = match self.slot[f as usize] {
                u32::MAX => {
                    let s = touched.len() as u32;
                    self.slot[f as usize] = s;
                    touched.push(f);
                    grad.resize(grad.len() + l, 0.0);
                    s
                }
                s => s,
            } as usize;
            let gr = &g[r as usize * l..(r as usize + 1) * l];
            grad[s * l..(s + 1) * l]
                .iter_mut()
                .zip(gr)
                .for_each(|(a, b)| *a += v * b);
        }
        let t = step as i32;
        let (c1, c2) = (1.0 - Self::B1.powi(t), 1.0 - Self::B2.powi(t));
        for (s, &f) in touched.iter().enumerate() {
            self.slot[f as usize] = u32::MAX;
            let at = f as usize * l;
            for j in 0..l {
                let i = at + j;
                let gj = grad[s * l + j] as f64 + l2 * self.w[i] as f64;
                let m = Self::B1 * self.m[i] as f64 + (1.0 - Self::B1) * gj;
                let v = Self::B2 * self.v[i] as f64 + (1.0 - Self::B2) * gj * gj;
                self.m[i] = m as f32;
                self.v[i] = v as f32;
                self.w[i] -= (lr * (m / c1) / ((v / c2).sqrt() + Self::EPS)) as f32;
            }
        }
    }
}

/// Binary cross-entropy from logits, summed over labels and averaged over the `n` examples,
/// in the stable form max(z, 0) − t·z + ln(1 + e^−|z|) (candle-nn's version takes the log of
/// a sigmoid, which saturates to −∞ on confident logits).
fn bce_with_logits(z: &Tensor, t: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let soft = (z.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    (soft - (t * z)?)?.sum_all()? / n as f64
}

impl Head {
    /// Trains on `n` examples: dense `x` (n × dim), token ids per example, labels `y`.
    pub fn train(
        x: &[f32],
        dim: usize,
        ids: &[&[u32]],
        y: &[u32],
        n_labels: usize,
        opts: &HeadOptions,
    ) -> Result<Head> {
        Self::train_for(x, dim, ids, Targets::Single(y), n_labels, opts)
    }

    /// Trains a single-label (softmax) or multi-label (one sigmoid per label) head.
    pub fn train_for(
        x: &[f32],
        dim: usize,
        ids: &[&[u32]],
        y: Targets<'_>,
        n_labels: usize,
        opts: &HeadOptions,
    ) -> Result<Head> {
        let n = y.len();
        if n == 0 || x.len() != n * dim || ids.len() != n {
            return Err(Error::Internal("head: inconsistent training data".into()));
        }
        let lexicon = if opts.lexical {
            Lexicon::fit(ids, opts.min_df, opts.max_features)
        } else {
            Lexicon::default()
        };
        let feats: Vec<Vec<(u32, f32)>> = ids.iter().map(|d| lexicon.features(d)).collect();
        let f = lexicon.len().max(1);
        let dev = Device::Cpu;
        let ce = |e: candle_core::Error| Error::Tensor {
            context: "training the head".into(),
            source: e,
        };
        let wd = Var::from_tensor(&Tensor::zeros((dim, n_labels), DType::F32, &dev).map_err(ce)?)
            .map_err(ce)?;
        // The word-piece weights (features × labels) live outside candle and get a lazy Adam
        // step: a batch touches a few thousand of their rows, and a dense optimizer step over
        // all of them was most of the training time on large label sets.
        let mut ws = SparseAdam::new(f, n_labels);
        let b = Var::from_tensor(&Tensor::zeros(n_labels, DType::F32, &dev).map_err(ce)?)
            .map_err(ce)?;
        let mut opt = AdamW::new(
            vec![wd.clone(), b.clone()],
            ParamsAdamW {
                lr: opts.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .map_err(ce)?;
        let mut rng = fastrand::Rng::with_seed(opts.seed);
        let mut order: Vec<usize> = (0..n).collect();
        let epochs = effective_epochs(opts.epochs, n);
        let steps_total = epochs * n.div_ceil(opts.batch);
        let mut step = 0;
        for _ in 0..epochs {
            rng.shuffle(&mut order);
            for chunk in order.chunks(opts.batch) {
                // Cosine-decayed learning rate: fast start, stable end.
                let lr = opts.lr
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * step as f64 / steps_total as f64).cos());
                opt.set_learning_rate(lr);
                step += 1;
                let bsz = chunk.len();
                let mut xb = Vec::with_capacity(bsz * dim);
                let mut fid = Vec::new();
                let mut fval = Vec::new();
                let mut frow = Vec::new();
                let mut yb = Vec::with_capacity(bsz);
                let mut multi_hot = Vec::new();
                for (r, &i) in chunk.iter().enumerate() {
                    xb.extend_from_slice(&x[i * dim..(i + 1) * dim]);
                    for &(fi, v) in &feats[i] {
                        fid.push(fi);
                        fval.push(v);
                        frow.push(r as u32);
                    }
                    match &y {
                        Targets::Single(y) => yb.push(y[i]),
                        Targets::Multi(y) => {
                            let at = multi_hot.len();
                            multi_hot.resize(at + n_labels, 0f32);
                            for &l in &y[i] {
                                if (l as usize) < n_labels {
                                    multi_hot[at + l as usize] = 1.0;
                                }
                            }
                        }
                    }
                }
                let xt = Tensor::from_vec(xb, (bsz, dim), &dev).map_err(ce)?;
                let mut logits = xt.matmul(wd.as_tensor()).map_err(ce)?;
                // The word pieces' share of the logits, as a leaf whose gradient is dL/dlogits.
                let sparse = if fid.is_empty() {
                    None
                } else {
                    let sp = ws.logits(&fid, &fval, &frow, bsz);
                    let v =
                        Var::from_tensor(&Tensor::from_vec(sp, (bsz, n_labels), &dev).map_err(ce)?)
                            .map_err(ce)?;
                    logits = (logits + v.as_tensor()).map_err(ce)?;
                    Some(v)
                };
                let logits = logits.broadcast_add(b.as_tensor()).map_err(ce)?;
                let mut loss = match &y {
                    Targets::Single(_) => {
                        let yt = Tensor::from_vec(yb, bsz, &dev).map_err(ce)?;
                        candle_nn::loss::cross_entropy(&logits, &yt).map_err(ce)?
                    }
                    Targets::Multi(_) => {
                        // Summed over labels, averaged over examples: each label's logistic
                        // regression gets the gradient it would get alone.
                        let t = Tensor::from_vec(multi_hot, (bsz, n_labels), &dev).map_err(ce)?;
                        bce_with_logits(&logits, &t, bsz).map_err(ce)?
                    }
                };
                if opts.l2 > 0.0 {
                    let reg = wd.as_tensor().sqr().and_then(|t| t.sum_all()).map_err(ce)?;
                    loss = (loss + (reg * (opts.l2 / 2.0)).map_err(ce)?).map_err(ce)?;
                }
                let grads = loss.backward().map_err(ce)?;
                opt.step(&grads).map_err(ce)?;
                if let Some(v) = sparse {
                    let g: Vec<f32> = grads
                        .get(v.as_tensor())
                        .ok_or_else(|| {
                            Error::Internal("head: no gradient for the word pieces".into())
                        })?
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .map_err(ce)?;
                    ws.step(&fid, &fval, &frow, &g, lr, opts.l2, step);
                }
            }
        }
        let flat = |v: &Var| -> Result<Vec<f32>> {
            v.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(ce)
        };
        Ok(Head {
            dim,
            n_labels,
            wd: flat(&wd)?,
            ws: ws.w,
            b: flat(&b)?,
            lexicon,
            options: opts.clone(),
            multi_label: matches!(y, Targets::Multi(_)),
        })
    }

    /// True for a one-vs-rest (multi-label) head: [`Head::predict`] gives independent
    /// per-label probabilities.
    pub fn multi_label(&self) -> bool {
        self.multi_label
    }

    pub fn n_labels(&self) -> usize {
        self.n_labels
    }

    /// Class probabilities for one example (per-label probabilities for a multi-label head).
    pub fn predict(&self, x: &[f32], ids: &[u32]) -> Vec<f32> {
        let c = self.n_labels;
        let mut z = self.b.clone();
        for (j, &xj) in x.iter().enumerate().take(self.dim) {
            if xj != 0.0 {
                let row = &self.wd[j * c..(j + 1) * c];
                z.iter_mut().zip(row).for_each(|(a, w)| *a += xj * w);
            }
        }
        for (f, v) in self.lexicon.features(ids) {
            let row = &self.ws[f as usize * c..(f as usize + 1) * c];
            z.iter_mut().zip(row).for_each(|(a, w)| *a += v * w);
        }
        if self.multi_label {
            z.iter_mut().for_each(|a| *a = 1.0 / (1.0 + (-*a).exp()));
            return z;
        }
        let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0;
        for a in z.iter_mut() {
            *a = (*a - m).exp();
            s += *a;
        }
        z.iter_mut().for_each(|a| *a /= s);
        z
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let f = self.lexicon.len().max(1);
        let ce = |e: candle_core::Error| Error::Tensor {
            context: "saving the head".into(),
            source: e,
        };
        let tensors: HashMap<String, Tensor> = [
            (
                "wd",
                Tensor::from_vec(self.wd.clone(), (self.dim, self.n_labels), &dev).map_err(ce)?,
            ),
            (
                "ws",
                Tensor::from_vec(self.ws.clone(), (f, self.n_labels), &dev).map_err(ce)?,
            ),
            (
                "b",
                Tensor::from_vec(self.b.clone(), self.n_labels, &dev).map_err(ce)?,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let tmp = dir.join(format!("{HEAD_FILE}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp).map_err(ce)?;
        crate::fsio::commit(&tmp, &dir.join(HEAD_FILE))?;
        let meta = HeadMeta {
            dim: self.dim,
            n_labels: self.n_labels,
            lexicon: self.lexicon.clone(),
            options: self.options.clone(),
            multi_label: self.multi_label,
        };
        let tmp = dir.join(format!("{HEAD_META}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&meta).expect("json"))
            .map_err(|e| Error::io(&tmp, e))?;
        crate::fsio::commit(&tmp, &dir.join(HEAD_META))
    }

    /// Loads the head of an index directory, if it has one.
    pub fn load(dir: &Path) -> Result<Option<Head>> {
        let (wp, mp) = (dir.join(HEAD_FILE), dir.join(HEAD_META));
        if !wp.exists() || !mp.exists() {
            return Ok(None);
        }
        let meta: HeadMeta = serde_json::from_slice(
            &std::fs::read(&mp).map_err(|e| Error::io(&mp, e))?,
        )
        .map_err(|e| {
            Error::index(
                dir,
                format!("head.json is damaged ({e}); rerun `semtel calibrate`"),
            )
        })?;
        let t = candle_core::safetensors::load(&wp, &Device::Cpu).map_err(|e| {
            Error::index(
                dir,
                format!("head.safetensors is damaged ({e}); rerun `semtel calibrate`"),
            )
        })?;
        let get = |k: &str| -> Result<Vec<f32>> {
            t.get(k)
                .ok_or_else(|| Error::index(dir, format!("head lacks `{k}`")))?
                .flatten_all()
                .and_then(|x| x.to_vec1())
                .map_err(|e| Error::index(dir, e.to_string()))
        };
        Ok(Some(Head {
            dim: meta.dim,
            n_labels: meta.n_labels,
            wd: get("wd")?,
            ws: get("ws")?,
            b: get("b")?,
            lexicon: meta.lexicon,
            options: meta.options,
            multi_label: meta.multi_label,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_sets_take_fewer_passes_but_as_many_steps() {
        assert_eq!(effective_epochs(20, 5_000), 20);
        assert_eq!(effective_epochs(20, 10_000), 20);
        assert_eq!(effective_epochs(20, 50_000), 4);
        assert_eq!(effective_epochs(20, 200_000), 2, "at least two passes");
        // Steps stay within a factor of the 10k-row budget.
        let steps = |n: usize| effective_epochs(20, n) * n.div_ceil(512);
        assert!(steps(50_000) <= 2 * steps(10_000));
    }

    #[test]
    fn the_lexicon_keeps_the_most_frequent_features() {
        let docs: Vec<Vec<u32>> = (0..50).map(|i| vec![1, 2, 3 + (i % 5)]).collect();
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let all = Lexicon::fit(&refs, 1, usize::MAX);
        let capped = Lexicon::fit(&refs, 1, 3);
        assert!(all.len() > 3);
        assert_eq!(capped.len(), 3);
        // Tokens 1 and 2 and the bigram 1→2 occur in every document.
        assert_eq!(capped.features(&[1, 2]).len(), 3);
        assert!(capped.features(&[3, 4]).is_empty());
    }

    #[test]
    fn learns_a_separable_problem_from_either_view() {
        // Two classes: class 0 has token 5 and x[0] > 0; class 1 token 9 and x[1] > 0.
        let mut x = Vec::new();
        let mut ids: Vec<Vec<u32>> = Vec::new();
        let mut y = Vec::new();
        for i in 0..200 {
            let c = i % 2;
            x.extend_from_slice(if c == 0 { &[1.0, 0.0] } else { &[0.0, 1.0] });
            ids.push(if c == 0 { vec![5, 7] } else { vec![9, 7] });
            y.push(c as u32);
        }
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let h = Head::train(
            &x,
            2,
            &refs,
            &y,
            2,
            &HeadOptions {
                epochs: 20,
                ..Default::default()
            },
        )
        .unwrap();
        let p = h.predict(&[0.0, 0.0], &[5, 7]);
        assert!(p[0] > 0.8, "{p:?}");
        let p = h.predict(&[0.0, 1.0], &[]);
        assert!(p[1] > 0.8, "{p:?}");
        let dir = std::env::temp_dir().join(format!("semtel-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        h.save(&dir).unwrap();
        let h2 = Head::load(&dir).unwrap().unwrap();
        assert_eq!(h2.predict(&[0.0, 1.0], &[9]), h.predict(&[0.0, 1.0], &[9]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
