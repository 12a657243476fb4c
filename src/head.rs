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
    /// Features seen in at least `min_df` documents.
    pub fn fit(docs: &[&[u32]], min_df: usize) -> Lexicon {
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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeadMeta {
    dim: usize,
    n_labels: usize,
    lexicon: Lexicon,
    options: HeadOptions,
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
        let n = y.len();
        if n == 0 || x.len() != n * dim || ids.len() != n {
            return Err(Error::Internal("head: inconsistent training data".into()));
        }
        let lexicon = Lexicon::fit(ids, opts.min_df);
        let feats: Vec<Vec<(u32, f32)>> = ids.iter().map(|d| lexicon.features(d)).collect();
        let f = lexicon.len().max(1);
        let dev = Device::Cpu;
        let ce = |e: candle_core::Error| Error::Tensor {
            context: "training the head".into(),
            source: e,
        };
        let wd = Var::from_tensor(&Tensor::zeros((dim, n_labels), DType::F32, &dev).map_err(ce)?)
            .map_err(ce)?;
        let ws = Var::from_tensor(&Tensor::zeros((f, n_labels), DType::F32, &dev).map_err(ce)?)
            .map_err(ce)?;
        let b = Var::from_tensor(&Tensor::zeros(n_labels, DType::F32, &dev).map_err(ce)?)
            .map_err(ce)?;
        let mut opt = AdamW::new(
            vec![wd.clone(), ws.clone(), b.clone()],
            ParamsAdamW {
                lr: opts.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .map_err(ce)?;
        let mut rng = fastrand::Rng::with_seed(opts.seed);
        let mut order: Vec<usize> = (0..n).collect();
        let steps_total = opts.epochs * n.div_ceil(opts.batch);
        let mut step = 0;
        for _ in 0..opts.epochs {
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
                for (r, &i) in chunk.iter().enumerate() {
                    xb.extend_from_slice(&x[i * dim..(i + 1) * dim]);
                    for &(fi, v) in &feats[i] {
                        fid.push(fi);
                        fval.push(v);
                        frow.push(r as u32);
                    }
                    yb.push(y[i]);
                }
                let xt = Tensor::from_vec(xb, (bsz, dim), &dev).map_err(ce)?;
                let mut logits = xt.matmul(wd.as_tensor()).map_err(ce)?;
                if !fid.is_empty() {
                    let nnz = fid.len();
                    let idx = Tensor::from_vec(fid, nnz, &dev).map_err(ce)?;
                    let vals = Tensor::from_vec(fval, (nnz, 1), &dev).map_err(ce)?;
                    let rows = Tensor::from_vec(frow, nnz, &dev).map_err(ce)?;
                    let contrib = ws
                        .as_tensor()
                        .index_select(&idx, 0)
                        .and_then(|t| t.broadcast_mul(&vals))
                        .map_err(ce)?;
                    let sparse = Tensor::zeros((bsz, n_labels), DType::F32, &dev)
                        .and_then(|z| z.index_add(&rows, &contrib, 0))
                        .map_err(ce)?;
                    logits = (logits + sparse).map_err(ce)?;
                }
                let logits = logits.broadcast_add(b.as_tensor()).map_err(ce)?;
                let yt = Tensor::from_vec(yb, bsz, &dev).map_err(ce)?;
                let mut loss = candle_nn::loss::cross_entropy(&logits, &yt).map_err(ce)?;
                if opts.l2 > 0.0 {
                    let reg = (wd.as_tensor().sqr().and_then(|t| t.sum_all()).map_err(ce)?
                        + ws.as_tensor().sqr().and_then(|t| t.sum_all()).map_err(ce)?)
                    .map_err(ce)?;
                    loss = (loss + (reg * (opts.l2 / 2.0)).map_err(ce)?).map_err(ce)?;
                }
                opt.backward_step(&loss).map_err(ce)?;
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
            ws: flat(&ws)?,
            b: flat(&b)?,
            lexicon,
            options: opts.clone(),
        })
    }

    pub fn n_labels(&self) -> usize {
        self.n_labels
    }

    /// Class probabilities for one example.
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
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
