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
//! * One batch per thread: on few cores, parallel batches beat splitting every matrix product.
//!   Only a call with fewer batches than threads (a live request of one long conversation)
//!   splits its batch by rows and attention heads ([`Embedder::embed_split`]), so a lone row
//!   does not leave the other cores idle.
//!
//! It is selected at run time only when the CPU has the instructions ([`kernels::supported`]);
//! otherwise the candle engine runs. It must never be called on an unsupported CPU.

mod gemma;
pub mod kernels;

pub use gemma::FastGemma;

use super::{normalize_rows, Embedder};
use crate::model::{Architecture, Family, ModelFiles, Pooling};
use crate::{Error, Result};
use kernels::{AttnScratch, Epilogue, PackedB, PackedI8, QuantRows};
use std::cell::RefCell;
use std::collections::HashMap;

struct Layer {
    qkv: PackedB,
    out: PackedB,
    ln1: (Vec<f32>, Vec<f32>),
    ffn: Ffn,
    ln2: (Vec<f32>, Vec<f32>),
}

/// A layer's two feed-forward products: bf16, or int8 where calibration allows
/// (`Precision::Int8`).
enum Ffn {
    Bf16(PackedB, PackedB),
    Int8(PackedI8, PackedI8),
    /// SwiGLU (NomicBERT): gate and up in one product (`2·inter` outputs, gate first), then
    /// `silu(gate) ⊙ up` into bf16, then down.
    SwiGlu(PackedB, PackedB),
}

/// How far (1 − cosine) the int8 model may move the calibration texts' vectors from the
/// all-bf16 ones: the median text, and the worst. The bar that matters is the labels (kNN
/// votes compare neighbours a few hundredths apart, so a thousandth moves almost none; the
/// agreement test measures it), and the median leaves room for bf16's own distance to f32
/// within a median cosine of 0.998 to f32. An earlier rule (each layer alone within 2e-4)
/// kept half of MiniLM's layers bf16 where together they stayed far inside these bars.
const INT8_MEDIAN_BUDGET: f32 = 1e-3;
const INT8_WORST_BUDGET: f32 = 2e-3;

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
    /// Rotary positions instead of a position table (NomicBERT): `cos` and `sin` by position
    /// and pair, `max_len × head_dim / 2` each.
    rope: Option<(Vec<f32>, Vec<f32>)>,
    family: Family,
    /// Loaded for int8 (calibrated; some layers may have stayed bf16).
    int8: bool,
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
    /// SwiGLU's gate and up outputs (f32, `2·inter` per row).
    gu: Vec<f32>,
    attn_scratch: AttnScratch,
    /// Per row part: quantised activations and a widening buffer (int8 feed-forward).
    quant: Vec<(QuantRows, Vec<f32>)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A raw view of an activation buffer that tasks of one batch share (see `FastBert::forward`).
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
// SAFETY: only used inside `forward`, whose tasks touch disjoint elements and end before the
// buffers do.
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    /// Rows `r0..r1` of a buffer with rows of `width` elements.
    ///
    /// # Safety
    /// In bounds, and no other live reference writes the same elements.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows<'a>(self, r0: usize, r1: usize, width: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(r0 * width), (r1 - r0) * width)
    }

    /// The element at `i` (a method, so closures capture the whole `Ptr`, which is `Sync`).
    ///
    /// # Safety
    /// In bounds.
    unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }

    /// Rows `r0..r1` to read.
    ///
    /// # Safety
    /// In bounds, and nothing writes the same elements while the view lives.
    unsafe fn view<'a>(self, r0: usize, r1: usize, width: usize) -> &'a [T] {
        std::slice::from_raw_parts(self.0.add(r0 * width), (r1 - r0) * width)
    }
}

/// Fewest tokens in a batch worth splitting across threads: below it the joins cost more than
/// the second core gives.
pub const MIN_SPLIT_TOKENS: usize = 64;

/// Fewest tokens in a batch for which the engine calls a pause point between layers: a layer
/// of a shorter batch takes under a millisecond or two.
const PAUSE_TOKENS: usize = 128;

/// `t` rows in up to `ways` parts of whole micro-kernel tiles (one part when not split).
fn row_parts(t: usize, ways: usize) -> Vec<(usize, usize)> {
    if ways <= 1 || t < MIN_SPLIT_TOKENS {
        return vec![(0, t)];
    }
    let per = t.div_ceil(ways).div_ceil(kernels::MR) * kernels::MR;
    (0..t).step_by(per).map(|a| (a, (a + per).min(t))).collect()
}

/// [`for_parts`] with one buffer of `bufs` per part (`bufs.len() >= parts.len()`).
fn for_parts_with<B: Send>(
    parts: &[(usize, usize)],
    bufs: &mut [B],
    f: impl Fn(usize, usize, &mut B) + Sync,
) {
    if let [(a, b)] = parts {
        f(*a, *b, &mut bufs[0]);
    } else {
        use rayon::prelude::*;
        bufs[..parts.len()]
            .par_iter_mut()
            .zip(parts.par_iter())
            .for_each(|(buf, &(a, b))| f(a, b, buf));
    }
}

/// Runs `f(r0, r1)` for each part: inline for one, as parallel rayon tasks for several.
fn for_parts(parts: &[(usize, usize)], f: impl Fn(usize, usize) + Sync) {
    if let [(a, b)] = parts {
        f(*a, *b);
    } else {
        use rayon::prelude::*;
        parts.par_iter().for_each(|&(a, b)| f(a, b));
    }
}

fn resize<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

impl FastBert {
    /// Loads a BERT-family model when the CPU and the model's shape suit the kernels;
    /// `Ok(None)` means "use another engine".
    /// With `int8_calibration` (token ids of calibration texts) and a CPU with VNNI, the
    /// feed-forward runs in int8 where [`FastBert::calibrate_int8`] finds it harmless.
    pub fn try_load(
        files: &ModelFiles,
        int8_calibration: Option<&[&[u32]]>,
    ) -> Result<Option<Self>> {
        if !kernels::supported() {
            return Ok(None);
        }
        // Int8 where the CPU has VNNI (the caller says so when it falls back).
        let int8 = int8_calibration.filter(|_| kernels::int8_supported());
        let mut candidates = Vec::new();
        let arch = Architecture::read(&files.dir)?;
        if arch.family == Family::Gemma {
            return Ok(None); // the bf16 kernels run BERT, MPNet and NomicBERT layers
        }
        if arch.family == Family::Nomic {
            return Self::load_nomic(files);
        }
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
            let (w1, b1) = (p(names.ffn_in, "weight")?, p(names.ffn_in, "bias")?);
            let (w2, b2) = (p(names.ffn_out, "weight")?, p(names.ffn_out, "bias")?);
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
                ffn: Ffn::Bf16(
                    PackedB::from_out_in(&w1, &b1, inter, hidden, 1.0),
                    PackedB::from_out_in(&w2, &b2, hidden, inter, 1.0),
                ),
                ln2: (p(names.out_norm, "weight")?, p(names.out_norm, "bias")?),
            });
            if int8.is_some() {
                candidates.push(Ffn::Int8(
                    PackedI8::from_out_in(&w1, &b1, inter, hidden),
                    PackedI8::from_out_in(&w2, &b2, hidden, inter),
                ));
            }
        }
        if pos.len() < (arch.position_offset + max_len) * hidden {
            return Err(Error::Model(
                "position table shorter than config.json says".into(),
            ));
        }
        let mut bert = FastBert {
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
            rope: None,
            family: arch.family,
            int8: false,
        };
        if let Some(seqs) = int8 {
            bert.calibrate_int8(candidates, seqs)?;
        }
        Ok(Some(bert))
    }

    /// NomicBERT on the same kernels: BERT's post-norm layers with rotary positions applied
    /// to queries and keys after the QKV product, no biases, and a SwiGLU feed-forward.
    fn load_nomic(files: &ModelFiles) -> Result<Option<Self>> {
        let c = super::NomicConfig::read(&files.dir)?;
        let (hidden, heads, inter) = (c.hidden, c.heads, c.intermediate);
        let hd = hidden / heads;
        if hidden % 32 != 0 || inter % 32 != 0 || hd % kernels::NR != 0 {
            return Ok(None);
        }
        let tensors = candle_core::safetensors::load(&files.weights, &candle_core::Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", files.weights.display())))?;
        let w = Weights::new(tensors);
        let word = w.get("embeddings.word_embeddings.weight")?;
        let type0 = w.get("embeddings.token_type_embeddings.weight")?[..hidden].to_vec();
        let emb_ln = (w.get("emb_ln.weight")?, w.get("emb_ln.bias")?);
        let scale = 1.0 / (hd as f32).sqrt();
        let zeros = |n: usize| vec![0f32; n];
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |name: &str| w.get(&format!("encoder.layers.{i}.{name}"));
            // Fold 1/√d into Q (rotation is linear, so it commutes with the scale).
            let mut qkv = p("attn.Wqkv.weight")?;
            qkv[..hidden * hidden].iter_mut().for_each(|x| *x *= scale);
            let gate_up = [p("mlp.fc12.weight")?, p("mlp.fc11.weight")?].concat();
            layers.push(Layer {
                qkv: PackedB::from_out_in(&qkv, &zeros(3 * hidden), 3 * hidden, hidden, 1.0),
                out: PackedB::from_out_in(
                    &p("attn.out_proj.weight")?,
                    &zeros(hidden),
                    hidden,
                    hidden,
                    1.0,
                ),
                ln1: (p("norm1.weight")?, p("norm1.bias")?),
                ffn: Ffn::SwiGlu(
                    PackedB::from_out_in(&gate_up, &zeros(2 * inter), 2 * inter, hidden, 1.0),
                    PackedB::from_out_in(&p("mlp.fc2.weight")?, &zeros(hidden), hidden, inter, 1.0),
                ),
                ln2: (p("norm2.weight")?, p("norm2.bias")?),
            });
        }
        let (cos, sin) = super::gemma::rope_tables(c.rope_base, hd, c.max_positions);
        Ok(Some(FastBert {
            hidden,
            heads,
            inter,
            eps: c.eps as f32,
            word,
            pos: Vec::new(),
            type0,
            emb_ln,
            layers,
            pooling: files.pooling,
            max_len: c.max_positions,
            position_offset: 0,
            relative: None,
            rope: Some((cos, sin)),
            family: Family::Nomic,
            int8: false,
        }))
    }

    /// Whether the int8 feed-forward is in use (calibrated on load where asked for and
    /// available: not for SwiGLU models).
    pub fn is_int8(&self) -> bool {
        self.int8
    }

    /// Encodes one batch. `ways` > 1 splits every matrix product by rows and attention by
    /// (sequence, head) over that many rayon tasks: the same arithmetic in the same order per
    /// row, so the output is bit-for-bit that of `ways` = 1.
    fn forward(
        &self,
        ids: &[u32],
        cu: &[usize],
        s: &mut Scratch,
        ways: usize,
        pause: Option<&(dyn Fn() + Sync)>,
    ) -> Result<Vec<f32>> {
        let h = self.hidden;
        let t = ids.len();
        let n = cu.len() - 1;
        let inter = self.inter;
        resize(&mut s.x, t * h);
        resize(&mut s.tmp, t * h);
        resize(&mut s.xb, t * h);
        resize(&mut s.qkv, t * 3 * h);
        resize(&mut s.attn, t * h);
        resize(&mut s.h, t * inter);
        if matches!(self.layers.first().map(|l| &l.ffn), Some(Ffn::SwiGlu(..))) {
            resize(&mut s.gu, t * 2 * inter);
        }
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
                let we = &self.word[id * h..(id + 1) * h];
                if self.rope.is_some() {
                    // Rotary positions act in attention, not here.
                    for j in 0..h {
                        row[j] = we[j] + self.type0[j];
                    }
                } else {
                    let p = p + self.position_offset;
                    let pe = &self.pos[p * h..(p + 1) * h];
                    for j in 0..h {
                        row[j] = we[j] + pe[j] + self.type0[j];
                    }
                }
            }
        }
        let hd = h / self.heads;
        let parts = row_parts(t, ways);
        // Raw views of the activation buffers: each task below touches only its own rows (or,
        // in attention, its own head's columns), so no two tasks write the same element.
        let (x, tmp, xb, qkv, attn, hb) = (
            Ptr(s.x.as_mut_ptr()),
            Ptr(s.tmp.as_mut_ptr()),
            Ptr(s.xb.as_mut_ptr()),
            Ptr(s.qkv.as_mut_ptr()),
            Ptr(s.attn.as_mut_ptr()),
            Ptr(s.h.as_mut_ptr()),
        );
        let gu = Ptr(s.gu.as_mut_ptr());
        // SAFETY: `try_load` returned an engine only on a CPU with the required features;
        // every view below is inside the buffers resized above, and tasks run on disjoint rows
        // (or columns) of what they write.
        unsafe {
            kernels::layernorm_rows(
                x.rows(0, t, h),
                xb.rows(0, t, h),
                h,
                &self.emb_ln.0,
                &self.emb_ln.1,
                self.eps,
            );
            for (li, l) in self.layers.iter().enumerate() {
                // A layer boundary of a long batch: the owner may run other work here (the
                // activations are complete and nothing of this batch is in flight).
                if let (Some(p), true) = (pause, li > 0 && t >= PAUSE_TOKENS) {
                    p();
                }
                for_parts(&parts, |r0, r1| {
                    kernels::gemm(
                        xb.view(r0, r1, h),
                        h,
                        r1 - r0,
                        &l.qkv,
                        &mut Epilogue::Bf16 {
                            out: qkv.rows(r0, r1, 3 * h),
                            ld: 3 * h,
                            gelu: false,
                        },
                    );
                    if let Some((cos, sin)) = &self.rope {
                        // Rows r0..r1 belong to sequences whose first row is the last
                        // boundary at or before each row.
                        let mut seq = cu.partition_point(|&c| c <= r0).saturating_sub(1);
                        for r in r0..r1 {
                            while cu[seq + 1] <= r {
                                seq += 1;
                            }
                            let pos = r - cu[seq];
                            let row = qkv.rows(r, r + 1, 3 * h);
                            kernels::rotate_halves(
                                &mut row[..2 * h],
                                hd,
                                &cos[pos * hd / 2..(pos + 1) * hd / 2],
                                &sin[pos * hd / 2..(pos + 1) * hd / 2],
                            );
                        }
                    }
                });
                let head_task = |i: usize, head: usize, sc: &mut AttnScratch| {
                    let (a, b) = (cu[i], cu[i + 1]);
                    kernels::attention_head(
                        qkv.view(a, b, 3 * h),
                        3 * h,
                        b - a,
                        hd,
                        (head * hd, h + head * hd, 2 * h + head * hd),
                        attn.at(a * h),
                        h,
                        head * hd,
                        self.relative
                            .as_ref()
                            .map(|r| (r[head].as_slice(), self.max_len - 1)),
                        None,
                        sc,
                    );
                };
                if parts.len() > 1 {
                    use rayon::prelude::*;
                    (0..n * self.heads)
                        .into_par_iter()
                        .for_each_init(AttnScratch::default, |sc, task| {
                            head_task(task / self.heads, task % self.heads, sc)
                        });
                } else {
                    for i in 0..n {
                        for head in 0..self.heads {
                            head_task(i, head, &mut s.attn_scratch);
                        }
                    }
                }
                // The rest of the layer is row-local: attention output + residual → LayerNorm
                // (into `tmp`), the feed-forward, + residual → LayerNorm (back into `x`).
                if s.quant.len() < parts.len() {
                    s.quant.resize_with(parts.len(), Default::default);
                }
                for_parts_with(&parts, &mut s.quant, |r0, r1, (qa, wide)| {
                    let m = r1 - r0;
                    kernels::gemm(
                        attn.view(r0, r1, h),
                        h,
                        m,
                        &l.out,
                        &mut Epilogue::F32 {
                            out: tmp.rows(r0, r1, h),
                            ld: h,
                            residual: Some(x.view(r0, r1, h)),
                        },
                    );
                    kernels::layernorm_rows(
                        tmp.rows(r0, r1, h),
                        xb.rows(r0, r1, h),
                        h,
                        &l.ln1.0,
                        &l.ln1.1,
                        self.eps,
                    );
                    let mut gelu_out = Epilogue::Bf16 {
                        out: hb.rows(r0, r1, inter),
                        ld: inter,
                        gelu: true,
                    };
                    let mut ffn_out = Epilogue::F32 {
                        out: x.rows(r0, r1, h),
                        ld: h,
                        residual: Some(tmp.view(r0, r1, h)),
                    };
                    match &l.ffn {
                        Ffn::Int8(f1, f2) => {
                            // Quantise the LayerNorm output (f32, in `tmp`) and the GELU
                            // output per row, then the two int8 products.
                            kernels::quantize_rows(tmp.view(r0, r1, h), m, h, qa);
                            kernels::gemm_i8(qa, m, f1, &mut gelu_out);
                            kernels::quantize_rows_bf16(hb.view(r0, r1, inter), m, inter, wide, qa);
                            kernels::gemm_i8(qa, m, f2, &mut ffn_out);
                        }
                        Ffn::Bf16(f1, f2) => {
                            kernels::gemm(xb.view(r0, r1, h), h, m, f1, &mut gelu_out);
                            kernels::gemm(hb.view(r0, r1, inter), inter, m, f2, &mut ffn_out);
                        }
                        Ffn::SwiGlu(f1, f2) => {
                            kernels::gemm(
                                xb.view(r0, r1, h),
                                h,
                                m,
                                f1,
                                &mut Epilogue::F32 {
                                    out: gu.rows(r0, r1, 2 * inter),
                                    ld: 2 * inter,
                                    residual: None,
                                },
                            );
                            kernels::swiglu_rows(
                                gu.view(r0, r1, 2 * inter),
                                m,
                                inter,
                                hb.rows(r0, r1, inter),
                            );
                            kernels::gemm(hb.view(r0, r1, inter), inter, m, f2, &mut ffn_out);
                        }
                    }
                    kernels::layernorm_rows(
                        x.rows(r0, r1, h),
                        xb.rows(r0, r1, h),
                        h,
                        &l.ln2.0,
                        &l.ln2.1,
                        self.eps,
                    );
                });
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

impl FastBert {
    /// Keeps the int8 feed-forward (`candidates[i]` for layer `i`) in as many layers as the
    /// budget allows: layers are tried from the one whose int8 alone moves the output least,
    /// each kept only if the whole model, with every layer kept so far, stays within
    /// [`INT8_MEDIAN_BUDGET`] and [`INT8_WORST_BUDGET`] of the all-bf16 vectors on the
    /// calibration texts. Layers whose activations have outliers that a per-row `u8` cannot
    /// resolve (MPNet's later layers, say) stay bf16; the packing a layer does not use is
    /// dropped.
    fn calibrate_int8(&mut self, mut candidates: Vec<Ffn>, seqs: &[&[u32]]) -> Result<()> {
        let mut ids = Vec::new();
        let mut cu = vec![0];
        for s in seqs {
            ids.extend_from_slice(s);
            cu.push(ids.len());
        }
        let base = self.embed(&ids, &cu)?;
        let h = self.hidden;
        // (median, worst) of 1 − cosine to the bf16 vectors.
        let distance = |v: &[f32]| -> (f32, f32) {
            let mut d: Vec<f32> = (0..seqs.len())
                .map(|r| {
                    let (a, b) = (&base[r * h..(r + 1) * h], &v[r * h..(r + 1) * h]);
                    1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
                })
                .collect();
            d.sort_by(f32::total_cmp);
            (
                d.get(d.len() / 2).copied().unwrap_or(f32::MAX),
                d.last().copied().unwrap_or(f32::MAX),
            )
        };
        let within = |(median, worst): (f32, f32)| {
            median <= INT8_MEDIAN_BUDGET && worst <= INT8_WORST_BUDGET
        };
        if seqs.is_empty() {
            self.int8 = true;
            return Ok(());
        }
        // Each layer alone, to order them.
        let mut alone = Vec::with_capacity(self.layers.len());
        for (li, cand) in candidates.iter_mut().enumerate() {
            std::mem::swap(&mut self.layers[li].ffn, cand);
            let v = self.embed(&ids, &cu);
            std::mem::swap(&mut self.layers[li].ffn, cand);
            alone.push((distance(&v?), li));
        }
        alone.sort_by(|a, b| a.0 .1.total_cmp(&b.0 .1).then(a.0 .0.total_cmp(&b.0 .0)));
        // Greedily together.
        for &(d, li) in &alone {
            if !within(d) {
                continue;
            }
            std::mem::swap(&mut self.layers[li].ffn, &mut candidates[li]);
            let v = self.embed(&ids, &cu)?;
            if !within(distance(&v)) {
                std::mem::swap(&mut self.layers[li].ffn, &mut candidates[li]);
            }
        }
        self.int8 = true;
        Ok(())
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
            Family::Gemma => "semtel-gemma",
            Family::Nomic => "semtel-nomic",
        };
        let on = self
            .layers
            .iter()
            .filter(|l| matches!(l.ffn, Ffn::Int8(..)))
            .count();
        if self.int8 {
            format!(
                "{name} int8 feed-forward in {on} of {} layers + bf16 (AVX512-VNNI/BF16 kernels, no padding)",
                self.layers.len()
            )
        } else {
            format!("{name} bf16 (AVX512-BF16 kernels, no padding)")
        }
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        self.embed_split(ids, cu, 1, None)
    }

    fn embed_split(
        &self,
        ids: &[u32],
        cu: &[usize],
        ways: usize,
        pause: Option<&(dyn Fn() + Sync)>,
    ) -> Result<Vec<f32>> {
        if cu.len() < 2 {
            return Ok(Vec::new());
        }
        // A thread waiting on its own split tasks may run another batch's job (rayon steals
        // work while it waits); that job finds the buffers taken and uses fresh ones.
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => self.forward(ids, cu, &mut s, ways, pause),
            Err(_) => self.forward(ids, cu, &mut Scratch::default(), ways, pause),
        })
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
