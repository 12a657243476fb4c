//! The static-embedding tier for very large runs: a token table distilled from the transformer
//! (model2vec-style), so embedding is a lookup and a weighted mean instead of a forward pass.
//!
//! Distillation (`semtel static distill`): every vocabulary token goes through the transformer
//! alone (`[CLS] token [SEP]`, mean-pooled), the vectors are reduced by PCA, and each row is
//! scaled by a frequency weight — SIF `a / (a + p(token))` with p counted on a corpus when one
//! is given, otherwise a Zipf weight from the vocabulary's frequency order (WordPiece
//! vocabularies list tokens by frequency after their special and single-character entries).
//! This module must never run the transformer at classification time.

use super::{normalize_rows, Embedder, Encoder};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const STATIC_META: &str = "static.json";
pub const STATIC_TABLE: &str = "static.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaticMeta {
    pub dims: usize,
    pub vocab: usize,
    pub source_model: String,
    pub source_sha256: String,
    pub weighting: String,
    /// Token ids that carry no meaning (special tokens): skipped when averaging.
    pub skip_ids: Vec<u32>,
}

pub struct StaticEmbedder {
    table: Vec<f32>,
    dims: usize,
    vocab: usize,
    skip: Vec<bool>,
}

impl StaticEmbedder {
    pub fn load(dir: &Path) -> Result<StaticEmbedder> {
        let mp = dir.join(STATIC_META);
        let meta: StaticMeta =
            serde_json::from_slice(&std::fs::read(&mp).map_err(|e| Error::io(&mp, e))?)
                .map_err(|e| Error::Model(format!("{}: {e}", mp.display())))?;
        let tp = dir.join(STATIC_TABLE);
        let t = candle_core::safetensors::load(&tp, &candle_core::Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", tp.display())))?;
        let table: Vec<f32> = t
            .get("table")
            .ok_or_else(|| Error::Model(format!("{}: no `table` tensor", tp.display())))?
            .flatten_all()
            .and_then(|x| x.to_vec1())
            .map_err(|e| Error::Model(e.to_string()))?;
        if table.len() != meta.vocab * meta.dims {
            return Err(Error::Model(format!(
                "{}: table size does not match static.json",
                tp.display()
            )));
        }
        let mut skip = vec![false; meta.vocab];
        for &i in &meta.skip_ids {
            if (i as usize) < skip.len() {
                skip[i as usize] = true;
            }
        }
        Ok(StaticEmbedder {
            table,
            dims: meta.dims,
            vocab: meta.vocab,
            skip,
        })
    }
}

impl Embedder for StaticEmbedder {
    fn dim(&self) -> usize {
        self.dims
    }

    fn describe(&self) -> String {
        format!("static token table ({} × {})", self.vocab, self.dims)
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        let n = cu.len().saturating_sub(1);
        let d = self.dims;
        let mut out = vec![0f32; n * d];
        for i in 0..n {
            let o = &mut out[i * d..(i + 1) * d];
            let mut count = 0;
            for &t in &ids[cu[i]..cu[i + 1]] {
                let t = t as usize;
                if t >= self.vocab || self.skip[t] {
                    continue;
                }
                o.iter_mut()
                    .zip(&self.table[t * d..(t + 1) * d])
                    .for_each(|(a, b)| *a += b);
                count += 1;
            }
            if count == 0 {
                // Only special tokens: fall back to them rather than a zero vector.
                for &t in &ids[cu[i]..cu[i + 1]] {
                    if (t as usize) < self.vocab {
                        o.iter_mut()
                            .zip(&self.table[t as usize * d..(t as usize + 1) * d])
                            .for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        normalize_rows(&mut out, d);
        Ok(out)
    }
}

/// Eigen-decomposition of a symmetric matrix (cyclic Jacobi): returns (eigenvalues,
/// eigenvectors as columns of a row-major n×n matrix), unsorted.
fn jacobi_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut off = 0f64;
        for p in 0..n {
            for q in p + 1..n {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        if off < 1e-18 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum().max(0.0) * 2.0 - 1.0; // sign, with sign(0) = 1
                let t = t / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// What `semtel static distill` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DistillSummary {
    pub vocab: usize,
    pub dims: usize,
    pub explained_variance: f64,
    pub weighting: String,
    pub seconds: f64,
}

/// [`distill`] over the readable conversations of `corpus` (their rendered token ids weight
/// the tokens).
pub fn distill_files(
    encoder: &super::Encoder,
    out: &std::path::Path,
    dims: usize,
    corpus: &[std::path::PathBuf],
    opts: &crate::input::InputOptions,
) -> crate::Result<DistillSummary> {
    let mut docs = Vec::new();
    for c in corpus {
        for r in crate::input::read_all(c, opts)? {
            if let Ok(content) = r.content {
                if let Ok(rd) = encoder.renderer.render(&content) {
                    docs.push(encoder.renderer.content_ids(&rd.ids).to_vec());
                }
            }
        }
    }
    distill(encoder, out, dims, &docs)
}

/// Distils a static table from `enc` into `out`. `corpus`: token ids of texts to count
/// frequencies on (empty: Zipf weights from the vocabulary order).
pub fn distill(
    enc: &Encoder,
    out: &Path,
    dims: usize,
    corpus: &[Vec<u32>],
) -> Result<DistillSummary> {
    let start = std::time::Instant::now();
    let tok = enc.renderer.tokenizer();
    let vocab = tok.get_vocab_size(true);
    let specials: Vec<u32> = tok
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(i, _)| *i)
        .collect();
    let cls_sep = enc.renderer.encode_head("").map_err(Error::Tokenizer)?;
    // Every vocabulary token alone between the model's special tokens.
    let seqs: Vec<Vec<u32>> = (0..vocab as u32)
        .map(|t| {
            let mut s = cls_sep.clone();
            let at = s.len() / 2;
            s.insert(at, t);
            s
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let x = enc.embed_ids(&refs)?;
    let d = enc.dim();
    let dims = dims.min(d);
    // PCA: centre, covariance, top `dims` eigenvectors.
    let mut mean = vec![0f64; d];
    for row in x.chunks(d) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= vocab as f64);
    let mut cov = vec![0f64; d * d];
    let mut centred = vec![0f64; d];
    for row in x.chunks(d) {
        for j in 0..d {
            centred[j] = row[j] as f64 - mean[j];
        }
        for i in 0..d {
            let ci = centred[i];
            for j in i..d {
                cov[i * d + j] += ci * centred[j];
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            cov[i * d + j] = cov[j * d + i];
        }
    }
    let (vals, vecs) = jacobi_eigen(&mut cov, d);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| vals[b].partial_cmp(&vals[a]).unwrap());
    let total: f64 = vals.iter().map(|v| v.max(0.0)).sum();
    let kept: f64 = order.iter().take(dims).map(|&i| vals[i].max(0.0)).sum();
    // Frequency weights.
    let (weights, weighting): (Vec<f64>, String) = if corpus.is_empty() {
        // Zipf over the vocabulary order past the special and single-character block.
        let first_word = (0..vocab)
            .find(|&i| {
                tok.id_to_token(i as u32).is_some_and(|t| {
                    t.chars().count() > 1 && !t.starts_with('[') && !t.starts_with("##")
                })
            })
            .unwrap_or(0);
        (
            (0..vocab)
                .map(|i| {
                    let rank = i.saturating_sub(first_word) as f64;
                    (2.0 + rank).ln()
                })
                .collect(),
            "zipf (log rank in vocabulary order)".into(),
        )
    } else {
        let mut counts = vec![0f64; vocab];
        let mut n = 0f64;
        for doc in corpus {
            for &t in doc {
                if (t as usize) < vocab {
                    counts[t as usize] += 1.0;
                    n += 1.0;
                }
            }
        }
        let a = 1e-3;
        (
            counts
                .iter()
                .map(|c| a / (a + (c + 0.5) / n.max(1.0)))
                .collect(),
            format!("SIF a=1e-3 on {} corpus tokens", n as u64),
        )
    };
    let mut table = vec![0f32; vocab * dims];
    for (t, row) in x.chunks(d).enumerate() {
        for (k, &e) in order.iter().take(dims).enumerate() {
            let mut s = 0f64;
            for j in 0..d {
                s += (row[j] as f64 - mean[j]) * vecs[j * d + e];
            }
            table[t * dims + k] = (s * weights[t]) as f32;
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors: HashMap<String, candle_core::Tensor> = [(
        "table".to_string(),
        candle_core::Tensor::from_vec(table, (vocab, dims), &candle_core::Device::Cpu)
            .map_err(Error::tensor("building the static table"))?,
    )]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, out.join(STATIC_TABLE))
        .map_err(Error::tensor("writing the static table"))?;
    std::fs::copy(
        enc.files.dir.join("tokenizer.json"),
        out.join("tokenizer.json"),
    )
    .map_err(|e| Error::io(out.join("tokenizer.json"), e))?;
    let meta = StaticMeta {
        dims,
        vocab,
        source_model: enc.files.id.clone(),
        source_sha256: enc.files.weights_sha256.clone(),
        weighting: weighting.clone(),
        skip_ids: specials,
    };
    std::fs::write(
        out.join(STATIC_META),
        serde_json::to_vec_pretty(&meta).expect("json"),
    )
    .map_err(|e| Error::io(out.join(STATIC_META), e))?;
    Ok(DistillSummary {
        vocab,
        dims,
        explained_variance: kept / total.max(1e-12),
        weighting,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_eigenpairs() {
        // [[2,1],[1,2]] has eigenvalues 1 and 3.
        let mut a = vec![2.0, 1.0, 1.0, 2.0];
        let (vals, v) = jacobi_eigen(&mut a, 2);
        let mut s = vals.clone();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert!((s[0] - 1.0).abs() < 1e-9 && (s[1] - 3.0).abs() < 1e-9);
        // Columns are unit vectors.
        let n0 = (v[0] * v[0] + v[2] * v[2]).sqrt();
        assert!((n0 - 1.0).abs() < 1e-9);
    }
}
