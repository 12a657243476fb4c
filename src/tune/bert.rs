//! A BERT/MPNet encoder whose forward pass candle can differentiate, for fine-tuning (and, for
//! MPNet, which candle-transformers lacks, the candle engine's inference path).
//!
//! The inference engines (candle-transformers' BERT, the fast bf16 kernels) use fused
//! LayerNorm and softmax ops that have no backward pass in candle 0.11, so training needs its
//! own forward made of differentiable primitives. It reads and writes the same tensor names as
//! a sentence-transformers folder, so a tuned model is an ordinary model folder that every
//! engine loads unchanged.
//!
//! The token, position and token-type tables stay frozen: they hold most of the parameters,
//! a batch touches a few rows of them, and weight decay would otherwise drift the rows no
//! exemplar uses. Everything above them (the embedding LayerNorm and every encoder layer) is
//! trained.
//!
//! This module must never tokenize, read conversations or decide anything.

use crate::model::{Architecture, Pooling};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use std::collections::HashMap;
use std::path::Path;

/// The architecture numbers a forward pass needs (from `config.json`).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f64,
}

/// Weights: a frozen part and a trained part (the [`Var`]s the optimizer updates).
pub struct TrainBert {
    pub shape: Shape,
    arch: Architecture,
    pub pooling: Pooling,
    frozen: HashMap<String, Tensor>,
    trained: Vec<(String, Var)>,
    by_name: HashMap<String, usize>,
    device: Device,
}

fn is_frozen(name: &str) -> bool {
    name.ends_with("word_embeddings.weight")
        || name.ends_with("position_embeddings.weight")
        || name.ends_with("token_type_embeddings.weight")
        || name.starts_with("pooler.")
}

impl TrainBert {
    /// Loads a model folder's `model.safetensors` in f32 (`prefix` is `""` or `"bert."`).
    pub fn load(
        weights: &Path,
        config: &Path,
        pooling: Pooling,
        device: &Device,
    ) -> Result<TrainBert> {
        Self::load_with(weights, config, pooling, device, true)
    }

    /// The same model for inference only: every weight a plain tensor, so no forward pass
    /// records a gradient graph (which would keep every activation of a batch alive).
    pub fn load_frozen(
        weights: &Path,
        config: &Path,
        pooling: Pooling,
        device: &Device,
    ) -> Result<TrainBert> {
        Self::load_with(weights, config, pooling, device, false)
    }

    fn load_with(
        weights: &Path,
        config: &Path,
        pooling: Pooling,
        device: &Device,
        trainable: bool,
    ) -> Result<TrainBert> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let arch = Architecture::read(dir)?;
        if matches!(
            arch.family,
            crate::model::Family::Gemma | crate::model::Family::Nomic
        ) {
            return Err(Error::Model(format!(
                "fine-tuning (`semtel tune`) runs BERT-family and MPNet encoders; {:?} encoders (Gemma, NomicBERT) are used frozen: the learned head still trains on their vectors (`semtel calibrate`)",
                arch.family
            )));
        }
        let shape = Shape {
            hidden: arch.hidden,
            heads: arch.heads,
            layers: arch.layers,
            eps: arch.eps,
        };
        if arch.activation != "gelu" {
            return Err(Error::Model(format!(
                "fine-tuning supports encoders with `gelu` activations; this one uses `{}`",
                arch.activation
            )));
        }
        let raw = candle_core::safetensors::load(weights, device)
            .map_err(|e| Error::Model(format!("{}: {e}", weights.display())))?;
        let mut frozen = HashMap::new();
        let mut trained = Vec::new();
        for (name, t) in raw {
            if !t.dtype().is_float() {
                continue; // position_ids and the like: not weights
            }
            let name = name
                .strip_prefix("bert.")
                .map(str::to_string)
                .unwrap_or(name);
            let t = t.to_dtype(DType::F32)?;
            if !trainable || is_frozen(&name) {
                frozen.insert(name, t);
            } else {
                trained.push((name, Var::from_tensor(&t)?));
            }
        }
        trained.sort_by(|a, b| a.0.cmp(&b.0));
        let by_name = trained
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let last_norm = arch.layer(shape.layers - 1, arch.layer_names.out_norm, "weight");
        let m = TrainBert {
            shape,
            arch,
            pooling,
            frozen,
            trained,
            by_name,
            device: device.clone(),
        };
        m.get("embeddings.word_embeddings.weight")?;
        m.get(&last_norm)?;
        Ok(m)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trained variables, in a stable (name) order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.trained
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(self.trained[i].1.as_tensor().clone());
        }
        self.frozen
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Model(format!("tensor `{name}` missing from the weights")))
    }

    /// Every tensor (frozen and trained) under its sentence-transformers name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out: HashMap<String, Tensor> = self.frozen.clone();
        for (n, v) in &self.trained {
            out.insert(n.clone(), v.as_tensor().clone());
        }
        out
    }

    /// Writes all weights as a safetensors file readable by every engine.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.tensors(), path)
            .map_err(|e| Error::Model(format!("writing {}: {e}", path.display())))
    }

    /// Overwrites trained weights from a map (a checkpoint); unknown names are an error.
    pub fn set_trained(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for (n, v) in &self.trained {
            let t = values
                .get(n)
                .ok_or_else(|| Error::Model(format!("checkpoint lacks `{n}`")))?;
            v.set(t)?;
        }
        Ok(())
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.get(&format!("{prefix}.weight"))?;
        let b = self.get(&format!("{prefix}.bias"))?;
        Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?)
    }

    /// LayerNorm from differentiable primitives (candle's fused one has no backward).
    fn norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.get(&format!("{prefix}.weight"))?;
        let b = self.get(&format!("{prefix}.bias"))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&var.affine(1.0, self.shape.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&w)?.broadcast_add(&b)?)
    }

    /// Sentence embeddings (L2-normalised, `(batch, hidden)`) of padded ids `(batch, len)`
    /// with a 0/1 `mask` of the same shape (f32).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.shape.hidden;
        let nh = self.shape.heads;
        let hd = h / nh;
        let word = self.get("embeddings.word_embeddings.weight")?;
        let off = self.arch.position_offset;
        if l + off > self.arch.max_positions {
            return Err(Error::Embed(format!(
                "sequence of {l} tokens exceeds the model's {} positions",
                self.arch.max_sequence()
            )));
        }
        let mut pos = self
            .get("embeddings.position_embeddings.weight")?
            .narrow(0, off, l)?;
        if self.arch.token_types {
            let typ = self
                .get("embeddings.token_type_embeddings.weight")?
                .narrow(0, 0, 1)?;
            pos = pos.broadcast_add(&typ)?;
        }
        let x = word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, h))?;
        let x = x.broadcast_add(&pos.unsqueeze(0)?)?;
        let mut x = self.norm(&x.reshape((b * l, h))?, "embeddings.LayerNorm")?;
        // Additive key mask: finite, so 0 · mask can never make NaN.
        let mut bias = mask.affine(1.0e4, -1.0e4)?.reshape((b, 1, 1, l))?;
        if let Some(rb) = self.arch.relative_bias {
            // (heads, l, l): bias[h][i][j] = table[bucket(j − i)][h], shared by every layer.
            let buckets: Vec<u32> = (0..l * l)
                .map(|k| rb.bucket((k % l) as i64 - (k / l) as i64) as u32)
                .collect();
            let buckets = Tensor::from_vec(buckets, l * l, &self.device)?;
            let rel = self
                .get("encoder.relative_attention_bias.weight")?
                .index_select(&buckets, 0)?
                .reshape((l, l, nh))?
                .permute((2, 0, 1))?
                .unsqueeze(0)?;
            bias = bias.broadcast_add(&rel)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let names = self.arch.layer_names;
        for i in 0..self.shape.layers {
            let name = |part: &str| format!("encoder.layer.{i}.{part}");
            let split = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((b, l, nh, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = split(self.linear(&x, &name(names.query))?)?;
            let k = split(self.linear(&x, &name(names.key))?)?;
            let v = split(self.linear(&x, &name(names.value))?)?;
            let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            // Softmax by exp / sum; the row maximum is a constant shift (no gradient needed).
            let s = s
                .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
                .exp()?;
            let p_attn = s.broadcast_div(&s.sum_keepdim(D::Minus1)?)?;
            let ctx = p_attn
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * l, h))?;
            let a = self.linear(&ctx, &name(names.attn_out))?;
            let a = self.norm(&(a + &x)?, &name(names.attn_norm))?;
            let f = self.linear(&a, &name(names.ffn_in))?.gelu_erf()?;
            let f = self.linear(&f, &name(names.ffn_out))?;
            x = self.norm(&(f + a)?, &name(names.out_norm))?;
        }
        let x = x.reshape((b, l, h))?;
        let pooled = match self.pooling {
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                x.broadcast_mul(&m)?
                    .sum(1)?
                    .broadcast_div(&m.sum(1)?.clamp(1e-9, f64::MAX)?)?
            }
        };
        let norm = pooled.sqr()?.sum_keepdim(1)?.affine(1.0, 1e-12)?.sqrt()?;
        Ok(pooled.broadcast_div(&norm)?)
    }

    /// Pads id sequences into `(ids, mask)` tensors.
    pub fn batch(&self, seqs: &[&[u32]]) -> Result<(Tensor, Tensor)> {
        let l = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; seqs.len() * l];
        let mut mask = vec![0f32; seqs.len() * l];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * l..i * l + s.len()].copy_from_slice(s);
            mask[i * l..i * l + s.len()].fill(1.0);
        }
        Ok((
            Tensor::from_vec(ids, (seqs.len(), l), &self.device)?,
            Tensor::from_vec(mask, (seqs.len(), l), &self.device)?,
        ))
    }

    /// Embeds sequences without building a gradient graph (length-sorted batches).
    pub fn embed(&self, seqs: &[&[u32]], max_batch_tokens: usize) -> Result<Vec<f32>> {
        let h = self.shape.hidden;
        let mut out = vec![0f32; seqs.len() * h];
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let plan = crate::embed::plan_batches(
            &lens,
            crate::embed::BatchOptions {
                max_batch_tokens,
                max_batch_rows: 256,
            },
        );
        for batch in plan {
            let b: Vec<&[u32]> = batch.iter().map(|&i| seqs[i]).collect();
            let (ids, mask) = self.batch(&b)?;
            let v: Vec<f32> = self
                .forward(&ids, &mask)?
                .detach()
                .flatten_all()?
                .to_vec1()?;
            for (j, &i) in batch.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&v[j * h..(j + 1) * h]);
            }
        }
        Ok(out)
    }
}
