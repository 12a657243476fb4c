//! The fast CPU engine: a BERT/MPNet encoder written for this job instead of a general
//! framework (MPNet differs only in tensor names, position offset, no token types, and a
//! relative position bias added to the attention scores: all read from [`Architecture`]).
//!
//! * No padding: a batch is one flat `[tokens, hidden]` matrix with cumulative sequence
//!   lengths; every linear layer is a single GEMM over all tokens of the batch, and attention
//!   runs per sequence.
//! * bf16 products with f32 accumulation on AVX512-BF16 (`vdpbf16ps`); LayerNorm, softmax,
//!   GELU and the residual stream stay f32. Bias, residual, GELU and the f32→bf16 conversion are
//!   fused into the GEMM's tile epilogue, so activations cross memory once per layer step.
//! * One batch per thread, no intra-op threading: on few cores, parallel batches beat splitting
//!   every matrix product.
//!
//! It is selected at run time only when the CPU has the instructions ([`kernels::supported`]);
//! otherwise the candle engine runs. It must never be called on an unsupported CPU.

pub mod kernels;

use super::{normalize_rows, Embedder};
use crate::model::{Architecture, Family, ModelFiles, Pooling};
use crate::{Error, Result};
use kernels::{AttnScratch, Epilogue, PackedB};
use std::cell::RefCell;
use std::collections::HashMap;

struct Layer {
    qkv: PackedB,
    out: PackedB,
    ln1: (Vec<f32>, Vec<f32>),
    ffn1: PackedB,
    ffn2: PackedB,
    ln2: (Vec<f32>, Vec<f32>),
}

pub struct FastBert {
    hidden: usize,
    heads: usize,
    inter: usize,
    eps: f32,
    word: Vec<f32>,
    pos: Vec<f32>,
    type0: Vec<f32>,
    emb_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    pooling: Pooling,
    /// Longest sequence the position table allows.
    max_len: usize,
    /// Position id of a sequence's first token.
    position_offset: usize,
    /// Relative position bias per head, by `key − query + max_len − 1` (MPNet).
    relative: Option<Vec<Vec<f32>>>,
    family: Family,
}

/// Per-thread activation buffers, grown on demand and reused between batches.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    tmp: Vec<f32>,
    xb: Vec<u16>,
    qkv: Vec<u16>,
    attn: Vec<u16>,
    h: Vec<u16>,
    attn_scratch: AttnScratch,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// BERT's sub-layer tail: `x ← LayerNorm(a·W + b + x)` for `t` rows (W packed in `w`), with
/// the bf16 copy of the result in `xb` for the next product. `tmp` is scratch of `x`'s size.
///
/// # Safety
/// Needs the CPU features `kernels::gemm` needs (checked once when the engine loads).
#[allow(clippy::too_many_arguments)]
unsafe fn residual_norm(
    a: &[u16],
    lda: usize,
    t: usize,
    w: &PackedB,
    ln: &(Vec<f32>, Vec<f32>),
    eps: f32,
    x: &mut Vec<f32>,
    tmp: &mut Vec<f32>,
    xb: &mut [u16],
) {
    let h = w.n;
    kernels::gemm(
        a,
        lda,
        t,
        w,
        &mut Epilogue::F32 {
            out: &mut tmp[..t * h],
            ld: h,
            residual: Some(&x[..t * h]),
        },
    );
    kernels::layernorm_rows(&mut tmp[..t * h], xb, h, &ln.0, &ln.1, eps);
    std::mem::swap(x, tmp);
}

fn resize<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

impl FastBert {
    /// Loads a BERT-family model when the CPU and the model's shape suit the kernels;
    /// `Ok(None)` means "use another engine".
    pub fn try_load(files: &ModelFiles) -> Result<Option<Self>> {
        if !kernels::supported() {
            return Ok(None);
        }
        let arch = Architecture::read(&files.dir)?;
        let (hidden, heads, inter, nl) = (arch.hidden, arch.heads, arch.intermediate, arch.layers);
        let hd = hidden / heads;
        if arch.activation != "gelu" || hidden % 32 != 0 || inter % 32 != 0 || hd % kernels::NR != 0
        {
            return Ok(None); // shapes the kernels do not cover: the candle engine handles them
        }
        let eps = arch.eps as f32;
        let tensors = candle_core::safetensors::load(&files.weights, &candle_core::Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", files.weights.display())))?;
        let w = Weights::new(tensors);
        let emb = |n: &str| w.get(&format!("embeddings.{n}"));
        let word = emb("word_embeddings.weight")?;
        let pos = emb("position_embeddings.weight")?;
        let type0 = if arch.token_types {
            emb("token_type_embeddings.weight")?[..hidden].to_vec()
        } else {
            vec![0.0; hidden]
        };
        let emb_ln = (emb("LayerNorm.weight")?, emb("LayerNorm.bias")?);
        let max_len = arch.max_sequence();
        let relative = match arch.relative_bias {
            Some(rb) => {
                let table = w.get("encoder.relative_attention_bias.weight")?;
                if table.len() != rb.num_buckets * heads {
                    return Err(Error::Model(format!(
                        "relative_attention_bias has {} values, expected {} buckets × {heads} heads",
                        table.len(),
                        rb.num_buckets
                    )));
                }
                Some(rb.expand(&table, heads, max_len))
            }
            None => None,
        };
        let names = arch.layer_names;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut layers = Vec::with_capacity(nl);
        for i in 0..nl {
            let p = |part: &str, kind: &str| w.get(&arch.layer(i, part, kind));
            let (q, k, v) = (
                p(names.query, "weight")?,
                p(names.key, "weight")?,
                p(names.value, "weight")?,
            );
            let (qb, kb, vb) = (
                p(names.query, "bias")?,
                p(names.key, "bias")?,
                p(names.value, "bias")?,
            );
            // Fold 1/√d into Q so attention scores need no extra pass.
            let qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
            let qbs: Vec<f32> = qb.iter().map(|x| x * scale).collect();
            let wqkv = [qs, k, v].concat();
            let bqkv = [qbs, kb, vb].concat();
            layers.push(Layer {
                qkv: PackedB::from_out_in(&wqkv, &bqkv, 3 * hidden, hidden, 1.0),
                out: PackedB::from_out_in(
                    &p(names.attn_out, "weight")?,
                    &p(names.attn_out, "bias")?,
                    hidden,
                    hidden,
                    1.0,
                ),
                ln1: (p(names.attn_norm, "weight")?, p(names.attn_norm, "bias")?),
                ffn1: PackedB::from_out_in(
                    &p(names.ffn_in, "weight")?,
                    &p(names.ffn_in, "bias")?,
                    inter,
                    hidden,
                    1.0,
                ),
                ffn2: PackedB::from_out_in(
                    &p(names.ffn_out, "weight")?,
                    &p(names.ffn_out, "bias")?,
                    hidden,
                    inter,
                    1.0,
                ),
                ln2: (p(names.out_norm, "weight")?, p(names.out_norm, "bias")?),
            });
        }
        if pos.len() < (arch.position_offset + max_len) * hidden {
            return Err(Error::Model(
                "position table shorter than config.json says".into(),
            ));
        }
        Ok(Some(FastBert {
            hidden,
            heads,
            inter,
            eps,
            word,
            pos,
            type0,
            emb_ln,
            layers,
            pooling: files.pooling,
            max_len,
            position_offset: arch.position_offset,
            relative,
            family: arch.family,
        }))
    }

    fn forward(&self, ids: &[u32], cu: &[usize], s: &mut Scratch) -> Result<Vec<f32>> {
        let h = self.hidden;
        let t = ids.len();
        let n = cu.len() - 1;
        resize(&mut s.x, t * h);
        resize(&mut s.tmp, t * h);
        resize(&mut s.xb, t * h);
        resize(&mut s.qkv, t * 3 * h);
        resize(&mut s.attn, t * h);
        resize(&mut s.h, t * self.inter);
        let vocab = self.word.len() / h;
        // Embeddings: word + position + token type 0.
        for i in 0..n {
            let (a, b) = (cu[i], cu[i + 1]);
            if b - a > self.max_len {
                return Err(Error::Embed(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    b - a,
                    self.max_len
                )));
            }
            for (p, tok) in (a..b).enumerate() {
                let id = ids[tok] as usize;
                if id >= vocab {
                    return Err(Error::Embed(format!(
                        "token id {id} outside the vocabulary"
                    )));
                }
                let row = &mut s.x[tok * h..(tok + 1) * h];
                let p = p + self.position_offset;
                let (we, pe) = (
                    &self.word[id * h..(id + 1) * h],
                    &self.pos[p * h..(p + 1) * h],
                );
                for j in 0..h {
                    row[j] = we[j] + pe[j] + self.type0[j];
                }
            }
        }
        let hd = h / self.heads;
        // SAFETY: `try_load` returned an engine only on a CPU with the required features.
        unsafe {
            kernels::layernorm_rows(
                &mut s.x[..t * h],
                &mut s.xb[..t * h],
                h,
                &self.emb_ln.0,
                &self.emb_ln.1,
                self.eps,
            );
            for l in &self.layers {
                kernels::gemm(
                    &s.xb[..t * h],
                    h,
                    t,
                    &l.qkv,
                    &mut Epilogue::Bf16 {
                        out: &mut s.qkv[..t * 3 * h],
                        ld: 3 * h,
                        gelu: false,
                    },
                );
                for i in 0..n {
                    let (a, b) = (cu[i], cu[i + 1]);
                    for head in 0..self.heads {
                        kernels::attention_head(
                            &s.qkv[a * 3 * h..b * 3 * h],
                            3 * h,
                            b - a,
                            hd,
                            (head * hd, h + head * hd, 2 * h + head * hd),
                            &mut s.attn[a * h..b * h],
                            h,
                            head * hd,
                            self.relative
                                .as_ref()
                                .map(|r| (r[head].as_slice(), self.max_len - 1)),
                            &mut s.attn_scratch,
                        );
                    }
                }
                residual_norm(
                    &s.attn[..t * h],
                    h,
                    t,
                    &l.out,
                    &l.ln1,
                    self.eps,
                    &mut s.x,
                    &mut s.tmp,
                    &mut s.xb[..t * h],
                );
                kernels::gemm(
                    &s.xb[..t * h],
                    h,
                    t,
                    &l.ffn1,
                    &mut Epilogue::Bf16 {
                        out: &mut s.h[..t * self.inter],
                        ld: self.inter,
                        gelu: true,
                    },
                );
                residual_norm(
                    &s.h[..t * self.inter],
                    self.inter,
                    t,
                    &l.ffn2,
                    &l.ln2,
                    self.eps,
                    &mut s.x,
                    &mut s.tmp,
                    &mut s.xb[..t * h],
                );
            }
        }
        let mut pooled = vec![0f32; n * h];
        for i in 0..n {
            let (a, b) = (cu[i], cu[i + 1]);
            let out = &mut pooled[i * h..(i + 1) * h];
            match self.pooling {
                Pooling::Cls => out.copy_from_slice(&s.x[a * h..(a + 1) * h]),
                Pooling::Mean => {
                    for tok in a..b {
                        for (o, x) in out.iter_mut().zip(&s.x[tok * h..(tok + 1) * h]) {
                            *o += x;
                        }
                    }
                    let inv = 1.0 / (b - a).max(1) as f32;
                    out.iter_mut().for_each(|o| *o *= inv);
                }
            }
        }
        normalize_rows(&mut pooled, h);
        Ok(pooled)
    }
}

impl Embedder for FastBert {
    fn dim(&self) -> usize {
        self.hidden
    }

    fn describe(&self) -> String {
        let name = match self.family {
            Family::Bert => "semtel-bert",
            Family::Mpnet => "semtel-mpnet",
        };
        format!("{name} bf16 (AVX512-BF16 kernels, no padding)")
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        if cu.len() < 2 {
            return Ok(Vec::new());
        }
        SCRATCH.with(|s| self.forward(ids, cu, &mut s.borrow_mut()))
    }
}

/// Named f32 tensors of a safetensors file, tolerant of a `bert.` prefix.
struct Weights {
    map: HashMap<String, candle_core::Tensor>,
    prefix: String,
}

impl Weights {
    fn new(map: HashMap<String, candle_core::Tensor>) -> Self {
        let prefix = if map.contains_key("embeddings.word_embeddings.weight") {
            String::new()
        } else if map.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert.".into()
        } else {
            map.keys()
                .find_map(|k| k.strip_suffix("embeddings.word_embeddings.weight"))
                .unwrap_or("")
                .to_string()
        };
        Weights { map, prefix }
    }

    fn get(&self, name: &str) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .map
            .get(&full)
            .ok_or_else(|| Error::Model(format!("weights lack `{full}`: not a BERT checkpoint")))?;
        t.to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| Error::Model(format!("{full}: {e}")))
    }
}
