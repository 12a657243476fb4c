//! EmbeddingGemma on the bf16 kernels: the same forward as [`crate::embed::CandleGemma`]
//! (the f32 reference it is tested against), without padding and with the products in bf16.
//!
//! Per layer: RMSNorm → one GEMM for Q, K and V (f32 out) → per head RMSNorm, RoPE and the
//! query scale in f32, then bf16 → attention per (sequence, query head), the three query heads
//! sharing one key/value head, with the sliding window as a key mask → output GEMM → RMSNorm →
//! residual; RMSNorm → gate/up GEMM → GeGLU into bf16 → down GEMM → RMSNorm → residual. The
//! residual stream, every norm, RoPE and GELU stay f32. One batch per thread, as the BERT
//! engine; a batch is not split across threads.
//!
//! It must never be called on a CPU without AVX512-BF16 ([`super::kernels::supported`]).

use super::kernels::{self, AttnScratch, Epilogue, PackedB};
use crate::embed::dense::DenseStack;
use crate::embed::{normalize_rows, Embedder, GemmaConfig};
use crate::model::{ModelFiles, Pooling};
use crate::{Error, Result};

struct Layer {
    /// Q (heads·hd), K (kv·hd), V (kv·hd) outputs.
    qkv: PackedB,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    o: PackedB,
    input_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    pre_ffn_norm: Vec<f32>,
    post_ffn_norm: Vec<f32>,
    /// Gate then up, `2·inter` outputs.
    gate_up: PackedB,
    down: PackedB,
    sliding: bool,
}

/// `cos`/`sin` by position and pair (`max_positions × hd/2`) for one RoPE base.
struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(base: f64, hd: usize, max_positions: usize) -> Self {
        let (cos, sin) = crate::embed::gemma::rope_tables(base, hd, max_positions);
        RopeTable { cos, sin }
    }

    /// Rotates one head (f32, `hd` wide) to position `pos` (halves, as `rotate_half`).
    fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = x.len() / 2;
        let (c, s) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        let (a, b) = x.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (a[j], b[j]);
            a[j] = x1 * c[j] - x2 * s[j];
            b[j] = x2 * c[j] + x1 * s[j];
        }
    }
}

pub struct FastGemma {
    c: GemmaConfig,
    word: Vec<f32>,
    embed_scale: f32,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    rope_local: RopeTable,
    rope_global: RopeTable,
    dense: DenseStack,
    pooling: Pooling,
}

impl FastGemma {
    /// Loads the model; `None` where the kernels cannot run it (CPU or shapes).
    pub fn try_load(files: &ModelFiles) -> Result<Option<Self>> {
        let c = GemmaConfig::read(&files.dir)?;
        let (h, hd, inter) = (c.hidden, c.head_dim, c.intermediate);
        if !kernels::supported()
            || h % 32 != 0
            || inter % 32 != 0
            || hd % kernels::NR != 0
            || (c.heads * hd) % 32 != 0
        {
            return Ok(None);
        }
        let tensors = candle_core::safetensors::load(&files.weights, &candle_core::Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", files.weights.display())))?;
        let prefix = if tensors.contains_key("model.embed_tokens.weight") {
            "model."
        } else {
            ""
        };
        let get = |name: &str| -> Result<Vec<f32>> {
            let full = format!("{prefix}{name}");
            let t = tensors.get(&full).ok_or_else(|| {
                Error::Model(format!("weights lack `{full}`: not a Gemma 3 checkpoint"))
            })?;
            t.to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| Error::Model(format!("{full}: {e}")))
        };
        // Gemma's norms multiply by 1 + w.
        let norm = |name: &str| -> Result<Vec<f32>> {
            Ok(get(name)?.into_iter().map(|w| 1.0 + w).collect())
        };
        let word = get("embed_tokens.weight")?;
        if word.len() != c.vocab * h {
            return Err(Error::Model(format!(
                "embed_tokens has {} values, expected {} × {h}",
                word.len(),
                c.vocab
            )));
        }
        let (qn, kvn) = (c.heads * hd, c.kv_heads * hd);
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let l = |n: &str| format!("layers.{i}.{n}");
            let qkv = [
                get(&l("self_attn.q_proj.weight"))?,
                get(&l("self_attn.k_proj.weight"))?,
                get(&l("self_attn.v_proj.weight"))?,
            ]
            .concat();
            let gate_up = [
                get(&l("mlp.gate_proj.weight"))?,
                get(&l("mlp.up_proj.weight"))?,
            ]
            .concat();
            layers.push(Layer {
                qkv: PackedB::from_out_in(&qkv, &vec![0.0; qn + 2 * kvn], qn + 2 * kvn, h, 1.0),
                q_norm: norm(&l("self_attn.q_norm.weight"))?,
                k_norm: norm(&l("self_attn.k_norm.weight"))?,
                o: PackedB::from_out_in(
                    &get(&l("self_attn.o_proj.weight"))?,
                    &vec![0.0; h],
                    h,
                    qn,
                    1.0,
                ),
                input_norm: norm(&l("input_layernorm.weight"))?,
                post_attn_norm: norm(&l("post_attention_layernorm.weight"))?,
                pre_ffn_norm: norm(&l("pre_feedforward_layernorm.weight"))?,
                post_ffn_norm: norm(&l("post_feedforward_layernorm.weight"))?,
                gate_up: PackedB::from_out_in(&gate_up, &vec![0.0; 2 * inter], 2 * inter, h, 1.0),
                down: PackedB::from_out_in(
                    &get(&l("mlp.down_proj.weight"))?,
                    &vec![0.0; h],
                    h,
                    inter,
                    1.0,
                ),
                sliding: c.sliding[i],
            });
        }
        Ok(Some(FastGemma {
            word,
            // The reference multiplies by √hidden rounded to f32.
            embed_scale: (h as f32).sqrt(),
            layers,
            final_norm: norm("norm.weight")?,
            rope_local: RopeTable::new(c.rope_local, hd, c.max_positions),
            rope_global: RopeTable::new(c.rope_global, hd, c.max_positions),
            dense: DenseStack::load(&files.dir)?,
            pooling: files.pooling,
            c,
        }))
    }
}

impl Embedder for FastGemma {
    fn dim(&self) -> usize {
        self.dense.out_dim().unwrap_or(self.c.hidden)
    }

    fn describe(&self) -> String {
        "semtel-gemma bf16 (AVX512-BF16)".into()
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        let n = cu.len().saturating_sub(1);
        if n == 0 {
            return Ok(Vec::new());
        }
        let c = &self.c;
        let (h, hd, inter) = (c.hidden, c.head_dim, c.intermediate);
        let (qn, kvn) = (c.heads * hd, c.kv_heads * hd);
        let wq = qn + 2 * kvn;
        let groups = c.heads / c.kv_heads;
        let t = ids.len();
        let eps = c.eps as f32;
        let mut x = vec![0f32; t * h];
        for i in 0..n {
            let (a, b) = (cu[i], cu[i + 1]);
            if b - a > c.max_positions {
                return Err(Error::Embed(format!(
                    "a sequence of {} tokens exceeds the model's {} positions",
                    b - a,
                    c.max_positions
                )));
            }
            for tok in a..b {
                let id = ids[tok] as usize;
                if id >= c.vocab {
                    return Err(Error::Embed(format!(
                        "token id {id} outside the vocabulary"
                    )));
                }
                for (o, w) in x[tok * h..(tok + 1) * h]
                    .iter_mut()
                    .zip(&self.word[id * h..(id + 1) * h])
                {
                    *o = w * self.embed_scale;
                }
            }
        }
        let mut normed = vec![0f32; h];
        let mut xb = vec![0u16; t * h];
        let mut qkv_f = vec![0f32; t * wq];
        let mut qkv_b = vec![0u16; t * wq];
        let mut attn = vec![0u16; t * qn];
        let mut tmp = vec![0f32; t * h];
        let mut gu = vec![0f32; t * 2 * inter];
        let mut hb = vec![0u16; t * inter];
        let mut scratch = AttnScratch::default();
        // Norms a row of `src` into bf16 `dst` (f32 arithmetic).
        let norm_bf16 = |src: &[f32], scale: &[f32], dst: &mut [u16], normed: &mut [f32]| {
            for (s, d) in src.chunks_exact(h).zip(dst.chunks_exact_mut(h)) {
                kernels::rms_norm(s, scale, eps, normed);
                for (o, v) in d.iter_mut().zip(normed.iter()) {
                    *o = kernels::f32_to_bf16(*v);
                }
            }
        };
        // x += rms_norm(tmp) · scale, row by row.
        let add_normed = |x: &mut [f32], tmp: &[f32], scale: &[f32], normed: &mut [f32]| {
            for (xr, tr) in x.chunks_exact_mut(h).zip(tmp.chunks_exact(h)) {
                kernels::rms_norm(tr, scale, eps, normed);
                for (o, v) in xr.iter_mut().zip(normed.iter()) {
                    *o += v;
                }
            }
        };
        for l in &self.layers {
            norm_bf16(&x, &l.input_norm, &mut xb, &mut normed);
            // SAFETY: `try_load` returned an engine only on a CPU with the required features;
            // every buffer is sized for `t` rows of the widths passed.
            unsafe {
                kernels::gemm(
                    &xb,
                    h,
                    t,
                    &l.qkv,
                    &mut Epilogue::F32 {
                        out: &mut qkv_f,
                        ld: wq,
                        residual: None,
                    },
                );
            }
            let rope = if l.sliding {
                &self.rope_local
            } else {
                &self.rope_global
            };
            let mut head = vec![0f32; hd];
            for i in 0..n {
                for (pos, tok) in (cu[i]..cu[i + 1]).enumerate() {
                    let row = &qkv_f[tok * wq..(tok + 1) * wq];
                    let out = &mut qkv_b[tok * wq..(tok + 1) * wq];
                    for (k, chunk) in row[..qn + kvn].chunks_exact(hd).enumerate() {
                        let is_q = k < c.heads;
                        kernels::rms_norm(
                            chunk,
                            if is_q { &l.q_norm } else { &l.k_norm },
                            eps,
                            &mut head,
                        );
                        rope.rotate(&mut head, pos);
                        let scale = if is_q { c.query_scale as f32 } else { 1.0 };
                        for (o, v) in out[k * hd..(k + 1) * hd].iter_mut().zip(&head) {
                            *o = kernels::f32_to_bf16(v * scale);
                        }
                    }
                    for (o, v) in out[qn + kvn..].iter_mut().zip(&row[qn + kvn..]) {
                        *o = kernels::f32_to_bf16(*v);
                    }
                }
            }
            let window = l.sliding.then_some(c.window_radius);
            for i in 0..n {
                let (a, b) = (cu[i], cu[i + 1]);
                for q in 0..c.heads {
                    let kv = q / groups;
                    // SAFETY: as above; each head writes its own columns of `attn`.
                    unsafe {
                        kernels::attention_head(
                            &qkv_b[a * wq..b * wq],
                            wq,
                            b - a,
                            hd,
                            (q * hd, qn + kv * hd, qn + kvn + kv * hd),
                            attn.as_mut_ptr().add(a * qn),
                            qn,
                            q * hd,
                            None,
                            window,
                            &mut scratch,
                        );
                    }
                }
            }
            // SAFETY: as above.
            unsafe {
                kernels::gemm(
                    &attn,
                    qn,
                    t,
                    &l.o,
                    &mut Epilogue::F32 {
                        out: &mut tmp,
                        ld: h,
                        residual: None,
                    },
                );
            }
            add_normed(&mut x, &tmp, &l.post_attn_norm, &mut normed);
            norm_bf16(&x, &l.pre_ffn_norm, &mut xb, &mut normed);
            // SAFETY: as above.
            unsafe {
                kernels::gemm(
                    &xb,
                    h,
                    t,
                    &l.gate_up,
                    &mut Epilogue::F32 {
                        out: &mut gu,
                        ld: 2 * inter,
                        residual: None,
                    },
                );
                kernels::geglu_rows(&gu, t, inter, &mut hb);
                kernels::gemm(
                    &hb,
                    inter,
                    t,
                    &l.down,
                    &mut Epilogue::F32 {
                        out: &mut tmp,
                        ld: h,
                        residual: None,
                    },
                );
            }
            add_normed(&mut x, &tmp, &l.post_ffn_norm, &mut normed);
        }
        let mut pooled = vec![0f32; n * h];
        for i in 0..n {
            let (a, b) = (cu[i], cu[i + 1]);
            let out = &mut pooled[i * h..(i + 1) * h];
            let rows: Vec<usize> = match self.pooling {
                Pooling::Cls => vec![a],
                Pooling::Mean => (a..b).collect(),
            };
            for &tok in &rows {
                kernels::rms_norm(
                    &x[tok * h..(tok + 1) * h],
                    &self.final_norm,
                    eps,
                    &mut normed,
                );
                for (o, v) in out.iter_mut().zip(&normed) {
                    *o += v;
                }
            }
            let inv = 1.0 / rows.len().max(1) as f32;
            out.iter_mut().for_each(|o| *o *= inv);
        }
        let mut v = self.dense.apply(&pooled, h)?;
        normalize_rows(&mut v, self.dim());
        Ok(v)
    }
}
