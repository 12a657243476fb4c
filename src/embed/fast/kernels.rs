//! AVX-512 kernels of the fast CPU engine: a bf16 GEMM on `vdpbf16ps` (f32 accumulation) with
//! pre-packed weights and fused epilogues (bias, residual, GELU, conversion), LayerNorm, softmax
//! and the conversions between f32 and bf16.
//!
//! Every `unsafe fn` here requires the CPU features checked by [`supported`]; callers must
//! never reach them on a CPU without those features. Layouts:
//! * activations consumed by a GEMM are row-major bf16 (`u16`), so a row's consecutive pair of
//!   values is one `u32` that `vdpbf16ps` broadcasts;
//! * weights are packed once into panels of [`NR`] output columns: for each pair of input
//!   features `kp`, the 32 bf16 values `(w[n][2kp], w[n][2kp+1])` for the panel's columns `n`,
//!   which is exactly one 64-byte load.

#![allow(clippy::missing_safety_doc)]
#![allow(clippy::too_many_arguments)]

use std::arch::x86_64::*;

/// Output columns per packed weight panel (two zmm registers of f32 accumulators).
pub const NR: usize = 32;
/// Rows per micro-kernel call: 14 rows × 2 registers = 28 accumulators, plus 2 weight
/// registers and a broadcast, fill the 32 zmm registers without spilling.
pub const MR: usize = 14;
/// Rows per cache block: a block of A (MC × K bf16) stays in L2 while every weight panel
/// streams past it.
const MC: usize = 14 * 14;

/// True when this CPU can run the kernels.
pub fn supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bf16")
}

/// Round-to-nearest-even f32 → bf16, scalar (used for packing and tails).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

#[inline]
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A weight matrix packed for [`gemm`]: `n` outputs, `k` inputs (even), padded to whole panels.
pub struct PackedB {
    pub n: usize,
    pub k: usize,
    panels: usize,
    data: Vec<u32>,
    pub bias: Vec<f32>,
}

impl PackedB {
    /// Packs PyTorch's `[n][k]` (out, in) layout, multiplying weights and bias by `scale`.
    pub fn from_out_in(w: &[f32], bias: &[f32], n: usize, k: usize, scale: f32) -> Self {
        assert_eq!(w.len(), n * k);
        assert_eq!(bias.len(), n);
        assert!(k.is_multiple_of(2), "input width must be even");
        let panels = n.div_ceil(NR);
        let kp = k / 2;
        let mut data = vec![0u32; panels * kp * NR];
        for p in 0..panels {
            for j in 0..kp {
                for c in 0..NR {
                    let col = p * NR + c;
                    if col >= n {
                        continue;
                    }
                    let lo = f32_to_bf16(w[col * k + 2 * j] * scale) as u32;
                    let hi = f32_to_bf16(w[col * k + 2 * j + 1] * scale) as u32;
                    data[(p * kp + j) * NR + c] = lo | (hi << 16);
                }
            }
        }
        let mut b = vec![0f32; panels * NR];
        for (i, x) in bias.iter().enumerate() {
            b[i] = x * scale;
        }
        PackedB {
            n,
            k,
            panels,
            data,
            bias: b,
        }
    }

    fn panel(&self, p: usize) -> *const u32 {
        unsafe { self.data.as_ptr().add(p * (self.k / 2) * NR) }
    }
}

/// What a GEMM does with each finished tile.
pub enum Epilogue<'a> {
    /// `out = acc + bias (+ residual)`, f32, row stride `ld`.
    F32 {
        out: &'a mut [f32],
        ld: usize,
        residual: Option<&'a [f32]>,
    },
    /// `out = bf16(act(acc + bias))`, row stride `ld` (in bf16 elements).
    Bf16 {
        out: &'a mut [u16],
        ld: usize,
        gelu: bool,
    },
}

/// The micro-kernel: `dst[r][0..32] = Σ_kp A[r][kp] · B[kp][0..32]` for `R` rows.
/// `a` points at row 0 (as u32 pairs), rows `lda` u32 apart; `b` at a packed panel; `dst` rows
/// are `ldd` floats apart.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel<const R: usize>(
    kp: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    dst: *mut f32,
    ldd: usize,
) {
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let mut bp = b;
    let mut ap = a;
    for _ in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        for r in 0..R {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * lda) as i32));
            acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
        }
        bp = bp.add(NR);
        ap = ap.add(1);
    }
    for r in 0..R {
        _mm512_storeu_ps(dst.add(r * ldd), acc0[r]);
        _mm512_storeu_ps(dst.add(r * ldd + 16), acc1[r]);
    }
}

/// Calls `kernel::<rows>(args)` for a row count of 1..=[`MR`] (the micro-kernels take their
/// row count as a constant, so the accumulators stay in registers).
macro_rules! by_rows {
    ($rows:expr, $kernel:ident, ($($arg:expr),*)) => {
        match $rows {
            14 => $kernel::<14>($($arg),*),
            13 => $kernel::<13>($($arg),*),
            12 => $kernel::<12>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            1 => $kernel::<1>($($arg),*),
            _ => unreachable!(),
        }
    };
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel_dispatch(
    rows: usize,
    kp: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    dst: *mut f32,
    ldd: usize,
) {
    by_rows!(rows, kernel, (kp, a, lda, b, dst, ldd))
}

/// `C = A · B` for `m` rows of row-major bf16 `a` (row stride `lda` bf16 elements, `k` used),
/// finishing every tile with `epi`. Single-threaded by design: the engine runs one batch per
/// thread.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn gemm(a: &[u16], lda: usize, m: usize, b: &PackedB, epi: &mut Epilogue) {
    debug_assert!(lda.is_multiple_of(2) && lda >= b.k);
    debug_assert!(m == 0 || a.len() >= (m - 1) * lda + b.k);
    let kp = b.k / 2;
    let a32 = a.as_ptr() as *const u32;
    let lda32 = lda / 2;
    let mut tile = [[0f32; NR]; MR];
    let mut m0 = 0;
    while m0 < m {
        let mb = MC.min(m - m0);
        for p in 0..b.panels {
            let bp = b.panel(p);
            let col0 = p * NR;
            let cols = NR.min(b.n - col0);
            let mut r0 = m0;
            while r0 < m0 + mb {
                let rows = MR.min(m0 + mb - r0);
                kernel_dispatch(
                    rows,
                    kp,
                    a32.add(r0 * lda32),
                    lda32,
                    bp,
                    tile.as_mut_ptr() as *mut f32,
                    NR,
                );
                finish_tile(&tile, rows, r0, col0, cols, &b.bias[col0..col0 + NR], epi);
                r0 += rows;
            }
        }
        m0 += mb;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn finish_tile(
    tile: &[[f32; NR]; MR],
    rows: usize,
    r0: usize,
    col0: usize,
    cols: usize,
    bias: &[f32],
    epi: &mut Epilogue,
) {
    let full = cols == NR;
    let mask: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        (1u32 << cols) as u16 - 1
    };
    let mask_hi: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as u16
    } else {
        0
    };
    let b0 = _mm512_loadu_ps(bias.as_ptr());
    let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
    match epi {
        Epilogue::F32 { out, ld, residual } => {
            for (r, row) in tile.iter().enumerate().take(rows) {
                let o = out.as_mut_ptr().add((r0 + r) * *ld + col0);
                let mut v0 = _mm512_add_ps(_mm512_loadu_ps(row.as_ptr()), b0);
                let mut v1 = _mm512_add_ps(_mm512_loadu_ps(row.as_ptr().add(16)), b1);
                if let Some(res) = residual {
                    let rp = res.as_ptr().add((r0 + r) * *ld + col0);
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(mask, rp));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask_hi, rp.add(16)));
                }
                if full {
                    _mm512_storeu_ps(o, v0);
                    _mm512_storeu_ps(o.add(16), v1);
                } else {
                    _mm512_mask_storeu_ps(o, mask, v0);
                    _mm512_mask_storeu_ps(o.add(16), mask_hi, v1);
                }
            }
        }
        Epilogue::Bf16 { out, ld, gelu } => {
            for (r, row) in tile.iter().enumerate().take(rows) {
                let o = out.as_mut_ptr().add((r0 + r) * *ld + col0);
                let mut v0 = _mm512_add_ps(_mm512_loadu_ps(row.as_ptr()), b0);
                let mut v1 = _mm512_add_ps(_mm512_loadu_ps(row.as_ptr().add(16)), b1);
                if *gelu {
                    v0 = gelu16(v0);
                    v1 = gelu16(v1);
                }
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
                if full {
                    _mm512_storeu_si512(o as *mut _, packed);
                } else {
                    let m32: __mmask32 = ((mask_hi as u32) << 16) | mask as u32;
                    _mm512_mask_storeu_epi16(o as *mut i16, m32, packed);
                }
            }
        }
    }
}

/// e^x for 16 lanes (relative error ~2e-7 on [-87, 88]; large negatives flush to 0).
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
    // x = n·ln2 + r, |r| ≤ ln2/2
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    // Taylor/minimax polynomial of degree 6.
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    _mm512_scalef_ps(p, n)
}

/// Exact-form GELU, 0.5·x·(1 + erf(x/√2)), with erf from Abramowitz & Stegun 7.1.26
/// (|error| < 1.5e-7, far below the bf16 rounding that follows).
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu16(x: __m512) -> __m512 {
    let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let az = _mm512_abs_ps(z);
    // t = 1/(1 + p·|z|): rcp14 plus one Newton step (~1e-8 relative), cheaper than a divide.
    let d = _mm512_fmadd_ps(az, _mm512_set1_ps(0.327_591_1), _mm512_set1_ps(1.0));
    let r = _mm512_rcp14_ps(d);
    let t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)));
    let mut p = _mm512_set1_ps(1.061_405_4);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453_152_1));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421_413_7));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284_496_72));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254_829_6));
    p = _mm512_mul_ps(p, t);
    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(az, az)));
    let erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0));
    // Restore the sign of z.
    let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
    let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
    _mm512_mul_ps(
        _mm512_mul_ps(_mm512_set1_ps(0.5), x),
        _mm512_add_ps(_mm512_set1_ps(1.0), erf),
    )
}

/// LayerNorm of each `n`-wide row of `x` in place (f32), also writing the bf16 copy `xb`.
/// `n` must be a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn layernorm_rows(
    x: &mut [f32],
    xb: &mut [u16],
    n: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    debug_assert!(n.is_multiple_of(16));
    let rows = x.len() / n;
    let inv_n = 1.0 / n as f32;
    for r in 0..rows {
        let row = x.as_mut_ptr().add(r * n);
        let mut s = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            s = _mm512_add_ps(s, _mm512_loadu_ps(row.add(j)));
        }
        let mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) * inv_n);
        let mut v = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let d = _mm512_sub_ps(_mm512_loadu_ps(row.add(j)), mean);
            v = _mm512_fmadd_ps(d, d, v);
        }
        let var = _mm512_reduce_add_ps(v) * inv_n;
        let rstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        let ob = xb.as_mut_ptr().add(r * n);
        for j in (0..n).step_by(16) {
            let d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row.add(j)), mean), rstd);
            let y = _mm512_fmadd_ps(
                d,
                _mm512_loadu_ps(gamma.as_ptr().add(j)),
                _mm512_loadu_ps(beta.as_ptr().add(j)),
            );
            _mm512_storeu_ps(row.add(j), y);
            let yb: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(y));
            _mm256_storeu_si256(ob.add(j) as *mut __m256i, yb);
        }
    }
}

/// Unnormalised softmax: writes `bf16(exp(row[j] - max))` for `j < len` (zeros up to the
/// padded length) to `out` and returns `1 / Σ exp`, which the caller applies to the (narrower)
/// attention output instead of to every probability.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn softmax_exp_bf16(row: &[f32], len: usize, out: &mut [u16]) -> f32 {
    let padded = row.len();
    debug_assert!(padded.is_multiple_of(32) && len <= padded && out.len() >= padded);
    let p = row.as_ptr();
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j < len {
        let m: __mmask16 = if len - j >= 16 {
            0xffff
        } else {
            ((1u32 << (len - j)) - 1) as u16
        };
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(j)));
        j += 16;
    }
    let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut sum = _mm512_setzero_ps();
    let o = out.as_mut_ptr();
    let mut j = 0;
    while j < padded {
        let valid = len.saturating_sub(j);
        let m0: __mmask16 = if valid >= 16 {
            0xffff
        } else {
            ((1u32 << valid) - 1) as u16
        };
        let v1 = valid.saturating_sub(16);
        let m1: __mmask16 = if v1 >= 16 {
            0xffff
        } else {
            ((1u32 << v1) - 1) as u16
        };
        let e0 = _mm512_maskz_mov_ps(m0, exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(j)), mx)));
        let e1 = _mm512_maskz_mov_ps(m1, exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(j + 16)), mx)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
        _mm512_storeu_si512(o.add(j) as *mut _, packed);
        j += 32;
    }
    1.0 / _mm512_reduce_add_ps(sum)
}

/// Self-attention for one sequence and one head, all in bf16 products with f32 accumulation.
///
/// `qkv` holds the sequence's rows (stride `ld` bf16), Q at `qoff`, K at `koff`, V at `voff`,
/// each `hd` wide (a multiple of 32), Q already scaled by 1/√hd. Writes the head's output
/// (bf16) into `out` rows (stride `ldo`) at columns `ooff..ooff + hd` and nowhere else, so
/// heads may run in parallel on one output (a raw pointer for that reason). `rel`, when given, is a relative
/// position bias `(by_distance, center)`: score(i, j) += `by_distance[center + j − i]` (MPNet).
/// `window`, when given, is a radius: query i sees only keys j with |i − j| ≤ radius (Gemma's
/// sliding layers). `scratch` is reused between calls.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_head(
    qkv: &[u16],
    ld: usize,
    len: usize,
    hd: usize,
    (qoff, koff, voff): (usize, usize, usize),
    out: *mut u16,
    ldo: usize,
    ooff: usize,
    rel: Option<(&[f32], usize)>,
    window: Option<usize>,
    scratch: &mut AttnScratch,
) {
    debug_assert!(hd.is_multiple_of(NR));
    let lpad = len.div_ceil(NR) * NR;
    // Pack Kᵀ: panels of 32 keys; for each pair of head dims kp, the 32 keys' (k[2kp], k[2kp+1]).
    let kp_n = hd / 2;
    scratch.kpack.clear();
    scratch.kpack.resize(lpad / NR * kp_n * NR, 0);
    let q32 = qkv.as_ptr() as *const u32;
    let ld32 = ld / 2;
    for key in 0..len {
        let src = q32.add(key * ld32 + koff / 2);
        let (p, c) = (key / NR, key % NR);
        for kp in 0..kp_n {
            *scratch.kpack.get_unchecked_mut((p * kp_n + kp) * NR + c) = *src.add(kp);
        }
    }
    // Pack V: panels of 32 head dims; for each pair of keys jp, (v[2jp][n], v[2jp+1][n]).
    let vpanels = hd / NR;
    let jp_n = lpad / 2;
    scratch.vpack.clear();
    scratch.vpack.resize(vpanels * jp_n * NR, 0);
    // Interleave two key rows of 32 bf16: u16 slot 2n takes row k0[n], slot 2n+1 row k1[n].
    let idx_lo = _mm512_loadu_si512(PAIR_LO.as_ptr() as *const _);
    let idx_hi = _mm512_loadu_si512(PAIR_HI.as_ptr() as *const _);
    let zero = _mm512_setzero_si512();
    for jp in 0..jp_n {
        let (k0, k1) = (2 * jp, 2 * jp + 1);
        for vp in 0..vpanels {
            let col = voff + vp * NR;
            let r0 = if k0 < len {
                _mm512_loadu_si512(qkv.as_ptr().add(k0 * ld + col) as *const _)
            } else {
                zero
            };
            let r1 = if k1 < len {
                _mm512_loadu_si512(qkv.as_ptr().add(k1 * ld + col) as *const _)
            } else {
                zero
            };
            let dst = scratch.vpack.as_mut_ptr().add((vp * jp_n + jp) * NR);
            _mm512_storeu_si512(dst as *mut _, _mm512_permutex2var_epi16(r0, idx_lo, r1));
            _mm512_storeu_si512(
                dst.add(16) as *mut _,
                _mm512_permutex2var_epi16(r0, idx_hi, r1),
            );
        }
    }
    scratch.scores.clear();
    scratch.scores.resize(MR * lpad, 0.0);
    scratch.probs.clear();
    scratch.probs.resize(MR * lpad, 0);
    let mut tile = [[0f32; NR]; MR];
    let mut r0 = 0;
    while r0 < len {
        let rows = MR.min(len - r0);
        // S = Q Kᵀ for these query rows, 32 keys at a time.
        for p in 0..lpad / NR {
            kernel_dispatch(
                rows,
                kp_n,
                q32.add(r0 * ld32 + qoff / 2),
                ld32,
                scratch.kpack.as_ptr().add(p * kp_n * NR),
                scratch.scores.as_mut_ptr().add(p * NR),
                lpad,
            );
        }
        if let Some((by_distance, center)) = rel {
            for r in 0..rows {
                // Keys j of query i = r0 + r use by_distance[center - i + j], j in 0..len.
                let start = center - (r0 + r);
                let bias = &by_distance[start..start + len];
                let srow = &mut scratch.scores[r * lpad..r * lpad + len];
                for (s, b) in srow.iter_mut().zip(bias) {
                    *s += b;
                }
            }
        }
        if let Some(radius) = window.filter(|&r| r + 1 < len) {
            for r in 0..rows {
                let i = r0 + r;
                let srow = &mut scratch.scores[r * lpad..r * lpad + len];
                // exp16 clamps at −87: a masked key weighs e⁻⁸⁷ relative to the row's largest,
                // nothing next to the hundreds of keys inside the window.
                srow[..i.saturating_sub(radius)].fill(-1e30);
                srow[(i + radius + 1).min(len)..].fill(-1e30);
            }
        }
        let mut inv = [0f32; MR];
        for (r, inv) in inv.iter_mut().enumerate().take(rows) {
            let srow = &scratch.scores[r * lpad..(r + 1) * lpad];
            *inv = softmax_exp_bf16(srow, len, &mut scratch.probs[r * lpad..(r + 1) * lpad]);
        }
        // O = P V, 32 head dims at a time.
        for vp in 0..vpanels {
            kernel_dispatch(
                rows,
                jp_n,
                scratch.probs.as_ptr() as *const u32,
                jp_n,
                scratch.vpack.as_ptr().add(vp * jp_n * NR),
                tile.as_mut_ptr() as *mut f32,
                NR,
            );
            for (r, t) in tile.iter().enumerate().take(rows) {
                let o = out.add((r0 + r) * ldo + ooff + vp * NR);
                let s = _mm512_set1_ps(inv[r]);
                let v0 = _mm512_mul_ps(_mm512_loadu_ps(t.as_ptr()), s);
                let v1 = _mm512_mul_ps(_mm512_loadu_ps(t.as_ptr().add(16)), s);
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
                _mm512_storeu_si512(o as *mut _, packed);
            }
        }
        r0 += rows;
    }
}

const PAIR_LO: [u16; 32] = {
    let mut a = [0u16; 32];
    let mut n = 0;
    while n < 16 {
        a[2 * n] = n as u16;
        a[2 * n + 1] = 32 + n as u16;
        n += 1;
    }
    a
};
const PAIR_HI: [u16; 32] = {
    let mut a = [0u16; 32];
    let mut n = 0;
    while n < 16 {
        a[2 * n] = 16 + n as u16;
        a[2 * n + 1] = 48 + n as u16;
        n += 1;
    }
    a
};

/// True when this CPU also has the int8 dot product (`vpdpbusd`, AVX512-VNNI).
pub fn int8_supported() -> bool {
    supported() && is_x86_feature_detected!("avx512vnni")
}

/// A weight matrix quantised to int8 for [`gemm_i8`]: symmetric, one scale per output column;
/// panels of [`NR`] columns, for each group of four inputs the 32 columns' four `i8` (one
/// `u32` each, so one 64-byte load covers 16 columns).
pub struct PackedI8 {
    pub n: usize,
    pub k: usize,
    panels: usize,
    data: Vec<u32>,
    /// Per column (padded to whole panels): the dequantisation scale, and the sum of the
    /// column's quantised weights (what an activation's zero point costs).
    scale: Vec<f32>,
    colsum: Vec<i32>,
    pub bias: Vec<f32>,
}

impl PackedI8 {
    /// Quantises PyTorch's `[n][k]` (out, in) layout; `k` a multiple of 4.
    pub fn from_out_in(w: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k);
        assert_eq!(bias.len(), n);
        assert!(k.is_multiple_of(4), "input width must be a multiple of 4");
        let panels = n.div_ceil(NR);
        let kq = k / 4;
        let mut data = vec![0u32; panels * kq * NR];
        let mut scale = vec![0f32; panels * NR];
        let mut colsum = vec![0i32; panels * NR];
        for col in 0..n {
            let row = &w[col * k..(col + 1) * k];
            let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scale[col] = s;
            let q: Vec<i8> = row
                .iter()
                .map(|x| (x / s).round().clamp(-127.0, 127.0) as i8)
                .collect();
            colsum[col] = q.iter().map(|&v| v as i32).sum();
            let (p, c) = (col / NR, col % NR);
            for j in 0..kq {
                let word = u32::from_le_bytes([
                    q[4 * j] as u8,
                    q[4 * j + 1] as u8,
                    q[4 * j + 2] as u8,
                    q[4 * j + 3] as u8,
                ]);
                data[(p * kq + j) * NR + c] = word;
            }
        }
        let mut b = vec![0f32; panels * NR];
        b[..n].copy_from_slice(bias);
        PackedI8 {
            n,
            k,
            panels,
            data,
            scale,
            colsum,
            bias: b,
        }
    }

    fn panel(&self, p: usize) -> *const u32 {
        unsafe { self.data.as_ptr().add(p * (self.k / 4) * NR) }
    }
}

/// Activations quantised per row to `u8` with a zero point (asymmetric: a GELU output is
/// mostly positive, a LayerNorm output is not centred), as [`gemm_i8`] reads them.
#[derive(Default)]
pub struct QuantRows {
    pub q: Vec<u8>,
    pub scale: Vec<f32>,
    pub zero: Vec<i32>,
}

/// Quantises `rows` rows of `k` f32 values (row stride `k`) into `out` (row stride `k`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_rows(x: &[f32], rows: usize, k: usize, out: &mut QuantRows) {
    debug_assert!(k.is_multiple_of(16) && x.len() >= rows * k);
    out.q.resize(rows * k, 0);
    out.scale.resize(rows, 0.0);
    out.zero.resize(rows, 0);
    for r in 0..rows {
        let row = x.as_ptr().add(r * k);
        let (mut lo, mut hi) = (_mm512_set1_ps(f32::MAX), _mm512_set1_ps(f32::MIN));
        for i in (0..k).step_by(16) {
            let v = _mm512_loadu_ps(row.add(i));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        // The range always holds 0, so 0 is exact (a zero point inside 0..=255).
        let (mn, mx) = (
            _mm512_reduce_min_ps(lo).min(0.0),
            _mm512_reduce_max_ps(hi).max(0.0),
        );
        let s = if mx > mn { (mx - mn) / 255.0 } else { 1.0 };
        let z = (-mn / s).round().clamp(0.0, 255.0);
        out.scale[r] = s;
        out.zero[r] = z as i32;
        let (inv, zv) = (_mm512_set1_ps(1.0 / s), _mm512_set1_ps(z));
        let dst = out.q.as_mut_ptr().add(r * k);
        for i in (0..k).step_by(16) {
            let v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(row.add(i)), inv), zv);
            let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(255.0));
            let q = _mm512_cvtps_epi32(v); // round to nearest
            _mm_storeu_si128(dst.add(i) as *mut __m128i, _mm512_cvtusepi32_epi8(q));
        }
    }
}

/// [`quantize_rows`] for bf16 input (the GELU output the feed-forward's second product reads).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_rows_bf16(
    x: &[u16],
    rows: usize,
    k: usize,
    f32_row: &mut Vec<f32>,
    out: &mut QuantRows,
) {
    // Widen to f32 (exact), then as above; rows one at a time into a reused buffer.
    f32_row.resize(rows * k, 0.0);
    for i in (0..rows * k).step_by(16) {
        let h = _mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i);
        let w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
        _mm512_storeu_ps(f32_row.as_mut_ptr().add(i), _mm512_castsi512_ps(w));
    }
    quantize_rows(f32_row, rows, k, out);
}

/// The int8 micro-kernel: `dst[r][0..32] = Σ_kq A[r][kq] · B[kq][0..32]` (four u8 × i8 products
/// per lane per step, i32 accumulation) for `R` rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel_i8<const R: usize>(
    kq: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    dst: *mut i32,
    ldd: usize,
) {
    let mut acc0 = [_mm512_setzero_si512(); R];
    let mut acc1 = [_mm512_setzero_si512(); R];
    let mut bp = b;
    let mut ap = a;
    for _ in 0..kq {
        let b0 = _mm512_loadu_si512(bp as *const _);
        let b1 = _mm512_loadu_si512(bp.add(16) as *const _);
        for r in 0..R {
            let av = _mm512_set1_epi32(*ap.add(r * lda) as i32);
            acc0[r] = _mm512_dpbusd_epi32(acc0[r], av, b0);
            acc1[r] = _mm512_dpbusd_epi32(acc1[r], av, b1);
        }
        bp = bp.add(NR);
        ap = ap.add(1);
    }
    for r in 0..R {
        _mm512_storeu_si512(dst.add(r * ldd) as *mut _, acc0[r]);
        _mm512_storeu_si512(dst.add(r * ldd + 16) as *mut _, acc1[r]);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel_i8_dispatch(
    rows: usize,
    kq: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    dst: *mut i32,
    ldd: usize,
) {
    by_rows!(rows, kernel_i8, (kq, a, lda, b, dst, ldd))
}

/// `C = A · B` for `m` rows of quantised activations `a` (row stride `b.k` bytes) against int8
/// weights, dequantised (`scale_a · scale_w · (acc − zero_a · Σw)`) and finished with `epi`
/// like [`gemm`]'s tiles (bias, residual, GELU, conversion).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")]
pub unsafe fn gemm_i8(a: &QuantRows, m: usize, b: &PackedI8, epi: &mut Epilogue) {
    debug_assert!(a.q.len() >= m * b.k && a.scale.len() >= m);
    let kq = b.k / 4;
    let a32 = a.q.as_ptr() as *const u32;
    let mut acc = [[0i32; NR]; MR];
    let mut tile = [[0f32; NR]; MR];
    let mut m0 = 0;
    while m0 < m {
        let mb = MC.min(m - m0);
        for p in 0..b.panels {
            let bp = b.panel(p);
            let col0 = p * NR;
            let cols = NR.min(b.n - col0);
            let (ws0, ws1) = (
                _mm512_loadu_ps(b.scale.as_ptr().add(col0)),
                _mm512_loadu_ps(b.scale.as_ptr().add(col0 + 16)),
            );
            let (cs0, cs1) = (
                _mm512_loadu_si512(b.colsum.as_ptr().add(col0) as *const _),
                _mm512_loadu_si512(b.colsum.as_ptr().add(col0 + 16) as *const _),
            );
            let mut r0 = m0;
            while r0 < m0 + mb {
                let rows = MR.min(m0 + mb - r0);
                kernel_i8_dispatch(
                    rows,
                    kq,
                    a32.add(r0 * kq),
                    kq,
                    bp,
                    acc.as_mut_ptr() as *mut i32,
                    NR,
                );
                for r in 0..rows {
                    let z = _mm512_set1_epi32(a.zero[r0 + r]);
                    let s = _mm512_set1_ps(a.scale[r0 + r]);
                    let row = acc[r].as_ptr();
                    let v0 = _mm512_sub_epi32(
                        _mm512_loadu_si512(row as *const _),
                        _mm512_mullo_epi32(z, cs0),
                    );
                    let v1 = _mm512_sub_epi32(
                        _mm512_loadu_si512(row.add(16) as *const _),
                        _mm512_mullo_epi32(z, cs1),
                    );
                    let f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(v0), _mm512_mul_ps(s, ws0));
                    let f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(v1), _mm512_mul_ps(s, ws1));
                    _mm512_storeu_ps(tile[r].as_mut_ptr(), f0);
                    _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), f1);
                }
                finish_tile(&tile, rows, r0, col0, cols, &b.bias[col0..col0 + NR], epi);
                r0 += rows;
            }
        }
        m0 += mb;
    }
}

/// Buffers reused across attention calls.
#[derive(Default)]
pub struct AttnScratch {
    kpack: Vec<u32>,
    vpack: Vec<u32>,
    scores: Vec<f32>,
    probs: Vec<u16>,
}

/// f32 → bf16 for a whole slice (length multiple of 16 handled vectorised, tail scalar).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
    let n = src.len();
    let mut i = 0;
    while i + 16 <= n {
        let y: __m256i =
            std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i))));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, y);
        i += 16;
    }
    for j in i..n {
        dst[j] = f32_to_bf16(src[j]);
    }
}

/// SwiGLU's product: `out[r][j] = bf16(silu(gu[r][j]) · gu[r][inter + j])` for `rows` rows of
/// `2·inter` f32 values (gate, then up), written `inter` apart.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn swiglu_rows(gu: &[f32], rows: usize, inter: usize, out: &mut [u16]) {
    debug_assert!(gu.len() >= rows * 2 * inter && out.len() >= rows * inter);
    for r in 0..rows {
        let g = gu.as_ptr().add(r * 2 * inter);
        let o = out.as_mut_ptr().add(r * inter);
        let mut j = 0;
        while j + 16 <= inter {
            let gv = _mm512_loadu_ps(g.add(j));
            let uv = _mm512_loadu_ps(g.add(inter + j));
            // silu(g) = g / (1 + e^-g); exp16 clamps, so a huge |g| gives ±0 or g, never NaN.
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let sv = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            let y: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_mul_ps(sv, uv)));
            _mm256_storeu_si256(o.add(j) as *mut __m256i, y);
            j += 16;
        }
        for j in j..inter {
            let (gx, ux) = (*g.add(j), *g.add(inter + j));
            *o.add(j) = f32_to_bf16(gx / (1.0 + (-gx).exp()) * ux);
        }
    }
}

/// GeGLU's product (Gemma): `out[r][j] = bf16(gelu_tanh(gu[r][j]) · gu[r][inter + j])` for
/// `rows` rows of `2·inter` f32 values (gate, then up), written `inter` apart. The tanh form of
/// GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, with tanh(z) = 1 − 2/(e²ᶻ + 1).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn geglu_rows(gu: &[f32], rows: usize, inter: usize, out: &mut [u16]) {
    debug_assert!(gu.len() >= rows * 2 * inter && out.len() >= rows * inter);
    let c = (2.0 / std::f32::consts::PI).sqrt();
    for r in 0..rows {
        let g = gu.as_ptr().add(r * 2 * inter);
        let o = out.as_mut_ptr().add(r * inter);
        let mut j = 0;
        while j + 16 <= inter {
            let x = _mm512_loadu_ps(g.add(j));
            let u = _mm512_loadu_ps(g.add(inter + j));
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let z = _mm512_mul_ps(
                _mm512_set1_ps(c),
                _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044_715), x),
            );
            let e = exp16(_mm512_add_ps(z, z));
            let tanh = _mm512_sub_ps(
                _mm512_set1_ps(1.0),
                _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, _mm512_set1_ps(1.0))),
            );
            let gelu = _mm512_mul_ps(
                _mm512_mul_ps(_mm512_set1_ps(0.5), x),
                _mm512_add_ps(_mm512_set1_ps(1.0), tanh),
            );
            let y: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_mul_ps(gelu, u)));
            _mm256_storeu_si256(o.add(j) as *mut __m256i, y);
            j += 16;
        }
        for j in j..inter {
            let (x, u) = (*g.add(j), *g.add(inter + j));
            let t = (c * (x + 0.044_715 * x * x * x)).tanh();
            *o.add(j) = f32_to_bf16(0.5 * x * (1.0 + t) * u);
        }
    }
}

/// Gemma's RMSNorm of one f32 row: `x / √(mean(x²) + eps) · scale`, `scale` being `1 + w`.
pub fn rms_norm(x: &[f32], scale: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, v), s) in out.iter_mut().zip(x).zip(scale) {
        *o = v * r * s;
    }
}

/// Rotary positions on a bf16 row of heads `hd` wide (queries then keys, back to back): in
/// each head, pair `j` of the first and second halves turns by the angle whose `cos`/`sin`
/// are given (`hd / 2` of each), as the reference's `rotate_half` does.
pub fn rotate_halves(row: &mut [u16], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for head in row.chunks_exact_mut(hd) {
        let (a, b) = head.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (bf16_to_f32(a[j]), bf16_to_f32(b[j]));
            a[j] = f32_to_bf16(x1 * cos[j] - x2 * sin[j]);
            b[j] = f32_to_bf16(x2 * cos[j] + x1 * sin[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], w: &[f32], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = bias[j] as f64;
                for t in 0..k {
                    let x = bf16_to_f32(f32_to_bf16(a[i * k + t])) as f64;
                    let y = bf16_to_f32(f32_to_bf16(w[j * k + t])) as f64;
                    s += x * y;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn gemm_matches_naive_on_odd_shapes() {
        if !supported() {
            eprintln!("skipping: no avx512bf16 on this CPU");
            return;
        }
        for &(m, n, k) in &[(1, 32, 2), (15, 40, 64), (29, 70, 384), (200, 96, 30)] {
            let a = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let bias = rand_vec(n, 3);
            let mut ab = vec![0u16; m * k];
            unsafe { to_bf16(&a, &mut ab) };
            let b = PackedB::from_out_in(&w, &bias, n, k, 1.0);
            let mut out = vec![0f32; m * n];
            unsafe {
                gemm(
                    &ab,
                    k,
                    m,
                    &b,
                    &mut Epilogue::F32 {
                        out: &mut out,
                        ld: n,
                        residual: None,
                    },
                )
            };
            let want = naive(&a, &w, &bias, m, n, k);
            for (x, y) in out.iter().zip(&want) {
                assert!(
                    (x - y).abs() < 1e-3 * (1.0 + y.abs()),
                    "{m}x{n}x{k}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn gelu_and_exp_are_accurate() {
        if !supported() {
            return;
        }
        let xs: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.25).collect();
        for chunk in xs.chunks(16) {
            let mut g = [0f32; 16];
            let mut e = [0f32; 16];
            unsafe {
                let v = _mm512_loadu_ps(chunk.as_ptr());
                _mm512_storeu_ps(g.as_mut_ptr(), gelu16(v));
                _mm512_storeu_ps(e.as_mut_ptr(), exp16(v));
            }
            for (i, &x) in chunk.iter().enumerate() {
                let x64 = x as f64;
                let want = 0.5 * x64 * (1.0 + erf(x64 / std::f64::consts::SQRT_2));
                assert!(
                    (g[i] as f64 - want).abs() < 1e-5,
                    "gelu({x}) = {} vs {want}",
                    g[i]
                );
                let we = x64.exp();
                assert!(((e[i] as f64 - we) / we).abs() < 1e-6, "exp({x})");
            }
        }
    }

    fn erf(x: f64) -> f64 {
        // High-precision series/continued fraction is overkill; use a 1e-12 accurate expansion.
        let t = 1.0 / (1.0 + 0.5 * x.abs());
        let y = t
            * (-x * x - 1.26551223
                + t * (1.00002368
                    + t * (0.37409196
                        + t * (0.09678418
                            + t * (-0.18628806
                                + t * (0.27886807
                                    + t * (-1.13520398
                                        + t * (1.48851587
                                            + t * (-0.82215223 + t * 0.17087277)))))))))
                .exp();
        if x >= 0.0 {
            1.0 - y
        } else {
            y - 1.0
        }
    }
}
