//! The NomicBERT encoder (nomic-embed-text-v1.5) on candle, in f32: the reference the fast
//! engine's NomicBERT layers are checked against.
//!
//! NomicBERT is BERT with the position table replaced by rotary positions and the GELU
//! feed-forward by SwiGLU, and no biases in attention or feed-forward: word + token-type 0
//! embeddings → LayerNorm, then per layer fused QKV → RoPE on queries and keys → attention →
//! output projection → residual → LayerNorm, `fc2(silu(fc12·x) ⊙ fc11·x)` → residual →
//! LayerNorm (post-norm, as BERT). Tensor names are those of nomic-ai's own checkpoint (what
//! `scripts/fetch-model nomic-embed-text-v1.5` writes from the official GGUF).
//!
//! It must stay f32 and must never read anything but the folder's `config.json` and weights.

use super::gemma::{pad_batch, pool, Padded, Rope};
use super::{normalize_rows, Device, Embedder};
use crate::model::{ModelFiles, Pooling};
use crate::{Error, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use std::path::Path;

/// What the forward needs from a NomicBERT `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct NomicConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub type_vocab: usize,
    pub eps: f64,
    pub rope_base: f64,
    pub max_positions: usize,
}

impl NomicConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let num = |k: &str| {
            cfg.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::Model(format!(
                        "{}: `{k}` missing from a NomicBERT config",
                        path.display()
                    ))
                })
        };
        let act = cfg
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("silu");
        if act != "silu" && act != "swiglu" {
            return Err(Error::Model(format!(
                "{}: NomicBERT activation `{act}` is not supported (SwiGLU expected)",
                path.display()
            )));
        }
        if cfg.get("rotary_emb_interleaved").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::Model(format!(
                "{}: interleaved rotary embeddings are not supported",
                path.display()
            )));
        }
        let rope_base = cfg
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| cfg.get("rotary_emb_base"))
            .and_then(|v| v.as_f64())
            .unwrap_or(1000.0);
        let (hidden, heads) = (num("hidden_size")?, num("num_attention_heads")?);
        if heads == 0 || hidden % heads != 0 || (hidden / heads) % 2 != 0 {
            return Err(Error::Model(format!(
                "{}: hidden_size {hidden} over {heads} heads is not a rotary layout",
                path.display()
            )));
        }
        Ok(NomicConfig {
            hidden,
            layers: num("num_hidden_layers")?,
            heads,
            intermediate: num("intermediate_size")?,
            vocab: num("vocab_size")?,
            type_vocab: num("type_vocab_size").unwrap_or(2).max(1),
            eps: cfg
                .get("layer_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-12),
            rope_base,
            max_positions: num("max_position_embeddings")?,
        })
    }
}

struct Layer {
    qkv: Linear,
    out: Linear,
    norm1: LayerNorm,
    up: Linear,
    gate: Linear,
    down: Linear,
    norm2: LayerNorm,
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((out, inp), "weight")?, None))
}

impl Layer {
    fn load(vb: VarBuilder, c: &NomicConfig) -> candle_core::Result<Self> {
        let h = c.hidden;
        Ok(Layer {
            qkv: linear(vb.pp("attn.Wqkv"), h, 3 * h)?,
            out: linear(vb.pp("attn.out_proj"), h, h)?,
            norm1: candle_nn::layer_norm(h, c.eps, vb.pp("norm1"))?,
            up: linear(vb.pp("mlp.fc11"), h, c.intermediate)?,
            gate: linear(vb.pp("mlp.fc12"), h, c.intermediate)?,
            down: linear(vb.pp("mlp.fc2"), c.intermediate, h)?,
            norm2: candle_nn::layer_norm(h, c.eps, vb.pp("norm2"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rope: &Rope,
        c: &NomicConfig,
    ) -> candle_core::Result<Tensor> {
        let (n, len, h) = x.dims3()?;
        let hd = h / c.heads;
        let qkv = self.qkv.forward(x)?.reshape((n, len, 3, c.heads, hd))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let q = rope.apply(&part(0)?)?;
        let k = rope.apply(&part(1)?)?;
        let v = part(2)?.contiguous()?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?
            .broadcast_add(mask)?;
        let ctx = candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((n, len, h))?;
        let x = self.norm1.forward(&(x + self.out.forward(&ctx)?)?)?;
        let ffn = (self.gate.forward(&x)?.silu()? * self.up.forward(&x)?)?;
        self.norm2.forward(&(&x + self.down.forward(&ffn)?)?)
    }
}

/// nomic-embed-text on candle (f32, CPU or CUDA), padded per batch.
pub struct CandleNomic {
    config: NomicConfig,
    word: Embedding,
    type0: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    rope: Rope,
    pooling: Pooling,
    device: candle_core::Device,
}

impl CandleNomic {
    pub fn load(files: &ModelFiles, device: Device) -> Result<Self> {
        let config = NomicConfig::read(&files.dir)?;
        let device = device.candle()?;
        // SAFETY: the weights file is memory-mapped read-only; semtel never writes to it and
        // verified its digest just before.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&files.weights),
                DType::F32,
                &device,
            )?
        };
        let c = &config;
        let load = || -> candle_core::Result<_> {
            let word = Embedding::new(
                vb.get((c.vocab, c.hidden), "embeddings.word_embeddings.weight")?,
                c.hidden,
            );
            let types = vb.get(
                (c.type_vocab, c.hidden),
                "embeddings.token_type_embeddings.weight",
            )?;
            let type0 = types.narrow(0, 0, 1)?;
            let emb_norm = candle_nn::layer_norm(c.hidden, c.eps, vb.pp("emb_ln"))?;
            let layers = (0..c.layers)
                .map(|i| Layer::load(vb.pp(format!("encoder.layers.{i}")), c))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((word, type0, emb_norm, layers))
        };
        let (word, type0, emb_norm, layers) = load().map_err(|e| {
            Error::Model(format!(
                "{}: cannot load NomicBERT weights ({e})",
                files.weights.display()
            ))
        })?;
        let rope = Rope::new(c.rope_base, c.hidden / c.heads, c.max_positions)?.to(&device)?;
        Ok(CandleNomic {
            word,
            type0,
            emb_norm,
            layers,
            rope,
            pooling: files.pooling,
            device,
            config,
        })
    }
}

impl Embedder for CandleNomic {
    fn dim(&self) -> usize {
        self.config.hidden
    }

    fn pads(&self) -> bool {
        true
    }

    fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    fn describe(&self) -> String {
        let on = if self.on_gpu() { "CUDA" } else { "CPU" };
        format!("candle (semtel nomic-bert encoder) f32 on {on}")
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        let n = cu.len().saturating_sub(1);
        if n == 0 {
            return Ok(Vec::new());
        }
        let Padded {
            ids: padded,
            keep,
            max_len,
            ..
        } = pad_batch(ids, cu, self.config.max_positions)?;
        let additive: Vec<f32> = keep
            .iter()
            .map(|&k| if k > 0.0 { 0.0 } else { f32::MIN })
            .collect();
        let input = Tensor::from_vec(padded, (n, max_len), &self.device)?;
        let mask = Tensor::from_vec(additive, (n, 1, 1, max_len), &self.device)?;
        let x = self.word.forward(&input)?.broadcast_add(&self.type0)?;
        let mut x = self.emb_norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, &self.rope, &self.config)?;
        }
        let mut v = pool(&x, &keep, self.pooling)?;
        normalize_rows(&mut v, self.dim());
        Ok(v)
    }
}
