//! The Gemma 3 encoder (EmbeddingGemma) on candle, in f32: the reference every faster path is
//! checked against.
//!
//! EmbeddingGemma is a Gemma 3 text model run *bidirectionally*: every token sees every other
//! token, except on the sliding-window layers, where a token sees those within the window's
//! radius on either side. candle-transformers' Gemma 3 is the causal decoder (a KV cache and a
//! causal mask), so this module has its own forward: scaled token embeddings, then per layer
//! RMSNorm → grouped-query attention with per-head RMSNorm on queries and keys and RoPE (one base
//! for the sliding layers, another for the global ones) → RMSNorm → residual, RMSNorm → GeGLU
//! (tanh GELU) → RMSNorm → residual; a final RMSNorm. Pooling, the sentence-transformers Dense
//! projections and the L2 norm follow (see [`super::dense`]).
//!
//! It must stay f32 (the upstream model is published for f32 or bf16, never f16) and must never
//! read anything but the folder's `config.json` and weights.

use super::dense::DenseStack;
use super::{normalize_rows, Device, Embedder};
use crate::model::{ModelFiles, Pooling};
use crate::{Error, Result};
use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use std::path::Path;

/// What the forward needs from a Gemma 3 `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f64,
    pub rope_global: f64,
    pub rope_local: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_scale: f64,
    /// On sliding layers a query sees keys at most this far away, either side.
    pub window_radius: usize,
    /// Per layer: whether it is a sliding-window layer.
    pub sliding: Vec<bool>,
    pub max_positions: usize,
}

impl GemmaConfig {
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
                        "{}: `{k}` missing from a Gemma 3 config",
                        path.display()
                    ))
                })
        };
        let float = |k: &str, default: f64| cfg.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
        let layers = num("num_hidden_layers")?;
        let head_dim = num("head_dim")?;
        let act = cfg
            .get("hidden_activation")
            .or_else(|| cfg.get("hidden_act"))
            .and_then(|v| v.as_str())
            .unwrap_or("gelu_pytorch_tanh");
        if act != "gelu_pytorch_tanh" {
            return Err(Error::Model(format!(
                "{}: Gemma activation `{act}` is not supported (gelu_pytorch_tanh expected)",
                path.display()
            )));
        }
        if cfg
            .get("use_bidirectional_attention")
            .and_then(|v| v.as_bool())
            != Some(true)
        {
            return Err(Error::Model(format!(
                "{}: a causal Gemma 3 decoder, not an embedding model; semtel runs Gemma 3 encoders with `use_bidirectional_attention` (EmbeddingGemma)",
                path.display()
            )));
        }
        // The config gives the window's full width; bidirectionally a token sees half of it
        // on each side (transformers sets `sliding_window // 2 + 1` as the exclusive bound).
        let window = num("sliding_window")?;
        let sliding: Vec<bool> = match cfg.get("layer_types").and_then(|v| v.as_array()) {
            Some(types) => types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect(),
            None => {
                let pattern = num("sliding_window_pattern").unwrap_or(6).max(1);
                (0..layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        if sliding.len() != layers {
            return Err(Error::Model(format!(
                "{}: {} layer_types for {layers} layers",
                path.display(),
                sliding.len()
            )));
        }
        if cfg.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(Error::Model(format!(
                "{}: RoPE scaling is not supported for Gemma encoders",
                path.display()
            )));
        }
        if cfg
            .get("attn_logit_softcapping")
            .is_some_and(|v| !v.is_null())
        {
            return Err(Error::Model(format!(
                "{}: attention logit soft-capping is not supported for Gemma encoders",
                path.display()
            )));
        }
        let heads = num("num_attention_heads")?;
        let kv_heads = num("num_key_value_heads")?;
        if kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(Error::Model(format!(
                "{}: {heads} query heads over {kv_heads} key/value heads of size {head_dim} is not a valid grouped-query layout",
                path.display()
            )));
        }
        Ok(GemmaConfig {
            hidden: num("hidden_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate: num("intermediate_size")?,
            vocab: num("vocab_size")?,
            eps: float("rms_norm_eps", 1e-6),
            rope_global: float("rope_theta", 1_000_000.0),
            rope_local: float("rope_local_base_freq", 10_000.0),
            query_scale: float("query_pre_attn_scalar", head_dim as f64).powf(-0.5),
            window_radius: window / 2,
            sliding,
            max_positions: num("max_position_embeddings")?,
        })
    }
}

/// Gemma's RMSNorm: `x / rms(x) · (1 + w)`, in f32.
struct RmsNorm {
    scale: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(RmsNorm {
            scale: (vb.get(dim, "weight")? + 1.0)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.scale)
    }
}

/// RoPE's `cos` and `sin` by position and pair (`max_positions × head_dim/2` each) for one
/// base, as the reference computes them: f32 inverse frequencies, the angle in f64. Every
/// engine's rotary tables come from here.
pub(crate) fn rope_tables(
    base: f64,
    head_dim: usize,
    max_positions: usize,
) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        for i in 0..half {
            let inv = (1.0 / base.powf((2 * i) as f64 / head_dim as f64)) as f32;
            let a = p as f64 * inv as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// A padded batch for the candle forwards: ids (padding 0), a keep mask (1.0 on real tokens),
/// the longest row. Refuses rows beyond `max_positions`.
pub(super) struct Padded {
    pub ids: Vec<u32>,
    pub keep: Vec<f32>,
    pub lens: Vec<usize>,
    pub max_len: usize,
}

pub(super) fn pad_batch(ids: &[u32], cu: &[usize], max_positions: usize) -> Result<Padded> {
    let n = cu.len().saturating_sub(1);
    let lens: Vec<usize> = cu.windows(2).map(|w| w[1] - w[0]).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0).max(1);
    if max_len > max_positions {
        return Err(Error::Embed(format!(
            "a sequence of {max_len} tokens exceeds the model's {max_positions} positions"
        )));
    }
    let mut padded = vec![0u32; n * max_len];
    let mut keep = vec![0f32; n * max_len];
    for i in 0..n {
        let s = &ids[cu[i]..cu[i + 1]];
        padded[i * max_len..][..s.len()].copy_from_slice(s);
        keep[i * max_len..][..s.len()].fill(1.0);
    }
    Ok(Padded {
        ids: padded,
        keep,
        lens,
        max_len,
    })
}

/// Mean (over `keep`) or first-token pooling of `hidden` (n, len, h) into `n × h` values.
pub(super) fn pool(hidden: &Tensor, keep: &[f32], pooling: Pooling) -> Result<Vec<f32>> {
    let (n, len, _) = hidden.dims3()?;
    let keep = Tensor::from_vec(keep.to_vec(), (n, len, 1), hidden.device())?;
    let pooled = match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => hidden
            .broadcast_mul(&keep)?
            .sum(1)?
            .broadcast_div(&keep.sum(1)?)?,
    };
    Ok(pooled.flatten_all()?.to_vec1()?)
}

/// `cos` and `sin` tables for positions `0..max_positions`, one RoPE base (also NomicBERT's).
pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(super) fn new(
        base: f64,
        head_dim: usize,
        max_positions: usize,
    ) -> candle_core::Result<Self> {
        let (cos, sin) = rope_tables(base, head_dim, max_positions);
        let dev = &candle_core::Device::Cpu;
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_positions, head_dim / 2), dev)?,
            sin: Tensor::from_vec(sin, (max_positions, head_dim / 2), dev)?,
        })
    }

    pub(super) fn to(&self, device: &candle_core::Device) -> candle_core::Result<Self> {
        Ok(Rope {
            cos: self.cos.to_device(device)?,
            sin: self.sin.to_device(device)?,
        })
    }

    /// Rotates `x` of shape (batch, heads, len, head_dim) (halves, not interleaved pairs).
    pub(super) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let len = x.dim(2)?;
        candle_nn::rotary_emb::rope(
            &x.contiguous()?,
            &self.cos.narrow(0, 0, len)?,
            &self.sin.narrow(0, 0, len)?,
        )
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    sliding: bool,
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((out, inp), "weight")?, None))
}

impl Layer {
    fn load(vb: VarBuilder, c: &GemmaConfig, sliding: bool) -> candle_core::Result<Self> {
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        let (h, hd) = (c.hidden, c.head_dim);
        Ok(Layer {
            q: linear(a.pp("q_proj"), h, c.heads * hd)?,
            k: linear(a.pp("k_proj"), h, c.kv_heads * hd)?,
            v: linear(a.pp("v_proj"), h, c.kv_heads * hd)?,
            o: linear(a.pp("o_proj"), c.heads * hd, h)?,
            q_norm: RmsNorm::load(a.pp("q_norm"), hd, c.eps)?,
            k_norm: RmsNorm::load(a.pp("k_norm"), hd, c.eps)?,
            input_norm: RmsNorm::load(vb.pp("input_layernorm"), h, c.eps)?,
            post_attn_norm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, c.eps)?,
            pre_ffn_norm: RmsNorm::load(vb.pp("pre_feedforward_layernorm"), h, c.eps)?,
            post_ffn_norm: RmsNorm::load(vb.pp("post_feedforward_layernorm"), h, c.eps)?,
            gate: linear(m.pp("gate_proj"), h, c.intermediate)?,
            up: linear(m.pp("up_proj"), h, c.intermediate)?,
            down: linear(m.pp("down_proj"), c.intermediate, h)?,
            sliding,
        })
    }

    /// `x`: (n, len, hidden); `mask`: additive (n, 1, len, len) for this layer's kind.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rope: &Rope,
        c: &GemmaConfig,
    ) -> candle_core::Result<Tensor> {
        let (n, len, _) = x.dims3()?;
        let (hd, kvh) = (c.head_dim, c.kv_heads);
        let groups = c.heads / kvh;
        let h = self.input_norm.forward(x)?;
        let heads = |t: Tensor, k: usize| t.reshape((n, len, k, hd))?.transpose(1, 2);
        let q = heads(self.q.forward(&h)?, c.heads)?;
        let k = heads(self.k.forward(&h)?, kvh)?;
        let v = heads(self.v.forward(&h)?, kvh)?.contiguous()?;
        let q = rope.apply(&self.q_norm.forward(&q)?)?;
        let k = rope.apply(&self.k_norm.forward(&k)?)?;
        // Grouped queries: the `groups` query heads of one key/value head as one tall matrix
        // (query head h uses key/value head h / groups, as the reference repeats them).
        let q = (q * c.query_scale)?.reshape((n, kvh, groups * len, hd))?;
        let scores = q
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .reshape((n, c.heads, len, len))?
            .broadcast_add(mask)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores)?.reshape((n, kvh, groups * len, len))?;
        let ctx = probs
            .matmul(&v)?
            .reshape((n, c.heads, len, hd))?
            .transpose(1, 2)?
            .reshape((n, len, c.heads * hd))?;
        let attn = self.post_attn_norm.forward(&self.o.forward(&ctx)?)?;
        let x = (x + attn)?;
        let h = self.pre_ffn_norm.forward(&x)?;
        let ffn = (self.gate.forward(&h)?.gelu()? * self.up.forward(&h)?)?;
        let ffn = self.post_ffn_norm.forward(&self.down.forward(&ffn)?)?;
        x + ffn
    }
}

/// EmbeddingGemma on candle (f32, CPU or CUDA), padded per batch.
pub struct CandleGemma {
    config: GemmaConfig,
    embed: Embedding,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope_global: Rope,
    rope_local: Rope,
    dense: DenseStack,
    pooling: Pooling,
    device: candle_core::Device,
}

impl CandleGemma {
    pub fn load(files: &ModelFiles, device: Device) -> Result<Self> {
        let config = GemmaConfig::read(&files.dir)?;
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
        // sentence-transformers folders hold the bare text model; full checkpoints prefix it.
        let vb = if vb.contains_tensor("model.embed_tokens.weight") {
            vb.pp("model")
        } else {
            vb
        };
        let c = &config;
        let load = || -> candle_core::Result<_> {
            let embed = Embedding::new(
                vb.get((c.vocab, c.hidden), "embed_tokens.weight")?,
                c.hidden,
            );
            let layers = (0..c.layers)
                .map(|i| Layer::load(vb.pp(format!("layers.{i}")), c, c.sliding[i]))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let norm = RmsNorm::load(vb.pp("norm"), c.hidden, c.eps)?;
            Ok((embed, layers, norm))
        };
        let (embed, layers, norm) = load().map_err(|e| {
            Error::Model(format!(
                "{}: cannot load Gemma 3 weights ({e})",
                files.weights.display()
            ))
        })?;
        let rope_global = Rope::new(c.rope_global, c.head_dim, c.max_positions)?.to(&device)?;
        let rope_local = Rope::new(c.rope_local, c.head_dim, c.max_positions)?.to(&device)?;
        let dense = DenseStack::load(&files.dir)?;
        // The reference multiplies the embeddings by √hidden rounded to the weights' dtype.
        let embed_scale = (c.hidden as f32).sqrt() as f64;
        Ok(CandleGemma {
            embed,
            embed_scale,
            layers,
            norm,
            rope_global,
            rope_local,
            dense,
            pooling: files.pooling,
            device,
            config,
        })
    }

    /// The additive mask of one batch for full (`radius: None`) or sliding layers: 0 where a
    /// query may see a key (a real token, within the radius), a large negative elsewhere.
    fn mask(&self, lens: &[usize], max_len: usize, radius: Option<usize>) -> Result<Tensor> {
        let n = lens.len();
        let mut m = vec![f32::MIN; n * max_len * max_len];
        for (b, &l) in lens.iter().enumerate() {
            for q in 0..max_len {
                let row = &mut m[(b * max_len + q) * max_len..][..max_len];
                let (lo, hi) = match radius {
                    Some(r) => (q.saturating_sub(r), (q + r + 1).min(l)),
                    None => (0, l),
                };
                if lo < hi {
                    row[lo..hi].fill(0.0);
                }
            }
        }
        Ok(Tensor::from_vec(m, (n, 1, max_len, max_len), &self.device)?)
    }
}

impl Embedder for CandleGemma {
    fn dim(&self) -> usize {
        self.dense.out_dim().unwrap_or(self.config.hidden)
    }

    fn pads(&self) -> bool {
        true
    }

    fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    fn describe(&self) -> String {
        let on = if self.on_gpu() { "CUDA" } else { "CPU" };
        format!("candle (semtel gemma3 encoder) f32 on {on}")
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        let n = cu.len().saturating_sub(1);
        if n == 0 {
            return Ok(Vec::new());
        }
        let Padded {
            ids: padded,
            keep,
            lens,
            max_len,
        } = pad_batch(ids, cu, self.config.max_positions)?;
        let input = Tensor::from_vec(padded, (n, max_len), &self.device)?;
        let full = self.mask(&lens, max_len, None)?;
        // A sliding layer whose window covers the whole batch is a full layer.
        let sliding = if max_len > self.config.window_radius {
            self.mask(&lens, max_len, Some(self.config.window_radius))?
        } else {
            full.clone()
        };
        let mut x = (self.embed.forward(&input)? * self.embed_scale)?;
        for layer in &self.layers {
            let (mask, rope) = if layer.sliding {
                (&sliding, &self.rope_local)
            } else {
                (&full, &self.rope_global)
            };
            x = layer.forward(&x, mask, rope, &self.config)?;
        }
        let hidden = self.norm.forward(&x)?;
        let pooled = pool(&hidden, &keep, self.pooling)?;
        let mut v = self.dense.apply(&pooled, self.config.hidden)?;
        normalize_rows(&mut v, self.dim());
        Ok(v)
    }
}
