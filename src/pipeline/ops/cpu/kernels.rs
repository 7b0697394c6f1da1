//! CPU f32 kernels for the transformer blocks: linear layers, multi-head attention and GEGLU.
//!
//! candle 0.11 runs each of these as a chain of whole-tensor passes: a linear layer is a GEMM into a
//! zeroed buffer plus a broadcast bias add; attention copies q, k and v into head-major layout,
//! scales q, writes the full `(B, H, Nq, Nk)` score tensor, reads and rewrites it for the softmax
//! (scalar `expf`), reads it again for the second GEMM and transposes the result back; GEGLU runs a
//! scalar `erf` over a strided view and a strided multiply. Here:
//!
//! * [`linear`]: the output starts as the broadcast bias and one GEMM accumulates onto it.
//! * [`attention`]: one task per (image, head, block of queries). The block's scores
//!   (`rows × Nk`, sized to stay in the core's L2 cache) come from a GEMM that reads q and k in place
//!   through strides, are turned into probabilities in place, and a second GEMM writes
//!   `probabilities · v` straight into the `(B, Nq, H·d)` output. Nothing else is allocated or copied.
//! * [`geglu`]: one pass, `hidden · gelu(gate)`, with a vectorizable `erf`.
//!
//! The element-wise parts are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked
//! at run time ([`multiversioned!`]); the GEMMs are the `gemm` crate's, which dispatches itself.
//! Each task's arithmetic depends only on its own image, so results do not depend on the batch.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// Defines `fn $name(args)` whose body is compiled for AVX-512 (x86-64-v4), AVX2+FMA (v3) and the
/// baseline, and runs the best one the CPU has. The body must be plain Rust: the point is to let
/// LLVM vectorize it with wider registers than the crate's baseline target (SSE2) allows.
macro_rules! multiversioned {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `v3` is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Lanes of the element-wise loops: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// `e^x` for `x ≤ 88.3` (larger inputs give e^88.3 ≈ 2.2e38, not infinity; NaN stays NaN), without
/// branches so that loops over it vectorize. Cephes `expf` (S. L. Moshier, Cephes Math Library,
/// `single/expf.c`): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, ln 2 split in two (Cody–Waite) so that
/// `n·ln 2` is exact in the first part, a degree-7 polynomial for `e^r`, then `2^n` built in the
/// exponent bits; relative error within a few ulp. Below -87.3 the result is e^-87.3 ≈ 1.2e-38
/// instead of a subnormal or zero, which no caller can tell apart from 0 after a sum of 1s.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to the nearest integer and leaves it in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // Cephes C1 = 0.693359375 (exact in 9 bits)
    const LN2_LO: f32 = -2.121_944_4e-4; // Cephes C2
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes expf's minimax coefficients for e^r = 1 + r + r²·P(r).
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let er = p * (r * r) + r + 1.0;
    // 2ⁿ: n sits in the low bits of t's representation; move n + 127 into the exponent field.
    let pow2n = f32::from_bits(t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127) << 23);
    er * pow2n
}

/// `erf(x)`: Abramowitz & Stegun, *Handbook of Mathematical Functions*, formula 7.1.26 (1.5e-7
/// absolute in exact arithmetic; about 5e-7 in f32), applied to |x| with erf's odd symmetry.
/// Branch-free. In GELU that is a few ulp of the result.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// GELU, exact (erf) form: `x · Φ(x) = x/2 · (1 + erf(x / √2))`, diffusers' `GELU(approximate="none")`.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x · sigmoid(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

multiversioned! {
    /// Softmax of each `width`-element row of `rows`, in place (max-subtracted, like PyTorch's).
    fn softmax_rows(rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width) {
            let mut lanes = [f32::NEG_INFINITY; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for (m, &v) in lanes.iter_mut().zip(c) {
                    *m = m.max(v);
                }
            }
            let max = chunks
                .remainder()
                .iter()
                .chain(&lanes)
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sums = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for (s, v) in sums.iter_mut().zip(c) {
                    *v = exp(*v - max);
                    *s += *v;
                }
            }
            let mut sum = 0f32;
            for v in chunks.into_remainder() {
                *v = exp(*v - max);
                sum += *v;
            }
            let inv = 1.0 / (sum + sums.iter().sum::<f32>());
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversioned! {
    /// `out[r, i] = h[r, i] · gelu(h[r, inner + i])` for rows of `2·inner` elements of `h`.
    fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) {
        for (src, dst) in h.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
            let (hidden, gate) = src.split_at(inner);
            for ((d, &a), &g) in dst.iter_mut().zip(hidden).zip(gate) {
                *d = a * gelu(g);
            }
        }
    }
}

multiversioned! {
    /// `y = silu((x - mean) · scale + shift)` (or without the SiLU) over one channel: the fused
    /// GroupNorm's last pass (`norm.rs`).
    pub(crate) fn normalize_channel(
        xs: &[f32],
        out: &mut [f32],
        mean: f32,
        scale: f32,
        shift: f32,
        with_silu: bool,
    ) {
        if with_silu {
            for (y, &v) in out.iter_mut().zip(xs) {
                *y = silu((v - mean) * scale + shift);
            }
        } else {
            for (y, &v) in out.iter_mut().zip(xs) {
                *y = (v - mean) * scale + shift;
            }
        }
    }
}

/// Rows of `2·inner` elements in, rows of `inner` out: diffusers' `GEGLU` after its projection.
pub(crate) fn geglu(h: &[f32], inner: usize) -> Vec<f32> {
    assert!(inner > 0 && h.len().is_multiple_of(2 * inner));
    let rows = h.len() / (2 * inner);
    let mut out = vec![0f32; rows * inner];
    // About 64 KiB of output per task: enough work per task, enough tasks for every core.
    let per_task = (16_384 / inner).max(1);
    out.par_chunks_mut(per_task * inner)
        .zip(h.par_chunks(per_task * 2 * inner))
        .for_each(|(dst, src)| geglu_rows(src, dst, inner));
    out
}

/// Fewest rows one linear GEMM is given. The gemm crate (0.19, `gemm-common/src/gemm.rs`) picks its
/// arithmetic by shape: a GEMV for one row, dot-product ("horizontal") kernels when rows × columns
/// ≤ 16 × 16, and for rows ≤ 64 with columns ≤ 64 a k-block of min(k, 512) instead of its cache
/// model's; each sums a row's products in another order. Beyond 64 rows a row's result depends only
/// on (columns, k), so fewer rows are padded with zeros to this many: a linear layer then gives an
/// image the same bits whatever else is in its batch. (Without it the tiny SSD-1B UNet at 64², whose
/// inner layers see few rows per image, put batch 1 and batch 4 in different classes: 1 pixel of 4
/// images moved by 1/255; `tests/it/batching.rs`.)
const MIN_GEMM_ROWS: usize = 65;

/// `x · wᵀ + bias` for `rows` rows of `x` (`rows × k`, contiguous) and `w` (`n × k`, contiguous,
/// PyTorch's `Linear.weight` layout). Returns `rows × n`; each row's bits do not depend on `rows`.
pub(crate) fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * k);
    assert_eq!(w.len(), n * k);
    if rows > 0 && rows < MIN_GEMM_ROWS {
        let mut padded = x.to_vec();
        padded.resize(MIN_GEMM_ROWS * k, 0.0);
        let mut out = linear(&padded, MIN_GEMM_ROWS, k, w, bias, n);
        out.truncate(rows * n);
        return out;
    }
    let mut out = vec![0f32; rows * n];
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n);
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(bias);
        }
    }
    if out.is_empty() || k == 0 {
        return out;
    }
    // SAFETY: dst is `rows × n` row-major (`out`), lhs `rows × k` row-major (`x`), rhs the `k × n`
    // transpose of `w` read through strides (element (i, j) = w[j·k + i]); all three buffers hold
    // exactly those elements (asserted above) and live for the call.
    unsafe {
        gemm_f32(
            (rows, n, k),
            out.as_mut_ptr(),
            n,
            bias.is_some(),
            Operand {
                ptr: x.as_ptr(),
                rs: k,
                cs: 1,
            },
            Operand {
                ptr: w.as_ptr(),
                rs: 1,
                cs: k,
            },
            1.0,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    out
}

/// Largest score block of one attention task (elements; f32: 256 KiB), so that the block stays in
/// the core's L2 cache between the GEMM that writes it, the softmax and the GEMM that reads it.
/// (Each block re-packs the head's k and v; 512 KiB blocks measured no faster at 512².)
const MAX_SCORE_BLOCK: usize = 64 * 1024;
/// Fewest query rows per task (fewer is mostly GEMM overhead), unless there are fewer queries.
const MIN_BLOCK_ROWS: usize = 16;

/// The shape of one multi-head attention: `q` is `(b, nq, heads·head_dim)`, `k` and `v` are
/// `(b, nk, heads·head_dim)`, all contiguous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionShape {
    pub b: usize,
    pub nq: usize,
    pub nk: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// `softmax(q kᵀ · scale) v` per head, returned as `(b, nq, heads·head_dim)`.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    let AttentionShape {
        b,
        nq,
        nk,
        heads,
        head_dim: d,
    } = shape;
    let inner = heads * d;
    assert_eq!(q.len(), b * nq * inner);
    assert_eq!(k.len(), b * nk * inner);
    assert_eq!(v.len(), b * nk * inner);
    let mut out = vec![0f32; b * nq * inner];
    if out.is_empty() || nk == 0 {
        // No keys: PyTorch's softmax over an empty row is empty and the product is zeros.
        return out;
    }
    let rows = (MAX_SCORE_BLOCK / nk).max(MIN_BLOCK_ROWS).min(nq);
    let blocks = nq.div_ceil(rows);
    let dst = OutPtr(out.as_mut_ptr());
    (0..b * heads * blocks).into_par_iter().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, item| {
            let (img, rest) = (item / (heads * blocks), item % (heads * blocks));
            let (h, block) = (rest / blocks, rest % blocks);
            let q0 = block * rows;
            let m = rows.min(nq - q0);
            scores.clear();
            scores.resize(m * nk, 0.0);
            let q_at = (img * nq + q0) * inner + h * d;
            let kv_at = img * nk * inner + h * d;
            // SAFETY (both GEMMs): q's block is rows q0..q0+m of image `img`, columns h·d..(h+1)·d
            // (row stride `inner`), inside `q`; kᵀ/v are image `img`'s nk rows, the same columns,
            // inside `k`/`v`; `scores` holds m × nk. The destination block of `out` is rows
            // q0..q0+m, columns h·d..(h+1)·d of image `img`: inside `out`, and the items cover
            // disjoint (image, head, block) rectangles, so no two threads write the same element
            // and nothing reads `out` until the parallel loop has returned.
            unsafe {
                // scores = scale · q_block · kᵀ (kᵀ read in place: element (c, j) = k[j, c]).
                gemm_f32(
                    (m, nk, d),
                    scores.as_mut_ptr(),
                    nk,
                    false,
                    Operand {
                        ptr: q.as_ptr().add(q_at),
                        rs: inner,
                        cs: 1,
                    },
                    Operand {
                        ptr: k.as_ptr().add(kv_at),
                        rs: 1,
                        cs: inner,
                    },
                    scale,
                    gemm::Parallelism::None,
                );
            }
            softmax_rows(scores, nk);
            unsafe {
                // out_block = probabilities · v.
                gemm_f32(
                    (m, d, nk),
                    dst.get().add(q_at),
                    inner,
                    false,
                    Operand {
                        ptr: scores.as_ptr(),
                        rs: nk,
                        cs: 1,
                    },
                    Operand {
                        ptr: v.as_ptr().add(kv_at),
                        rs: inner,
                        cs: 1,
                    },
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

/// A read-only f32 matrix operand addressed by strides: element `(i, j)` is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// `dst = scale · lhs · rhs`, plus the old `dst` when `accumulate`: one call of the gemm crate, for
/// an `m × n` destination with contiguous rows `dst_rs` apart, `lhs` `m × k` and `rhs` `k × n`.
///
/// # Safety
/// Every element the shapes and strides address lies in a live allocation; `dst` overlaps neither
/// operand, and no other thread reads or writes its `m × n` elements during the call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract is gemm's (in-bounds strided operands, exclusive `dst`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// An output buffer's base pointer, shared by parallel tasks that each write their own disjoint
/// part of it (attention here, the convolution's bands in `conv.rs`; see their SAFETY notes).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks only write disjoint elements through it, while the function that created it holds
// the buffer and reads nothing until the tasks have returned.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method, so closures capture the whole wrapper rather than the raw pointer field.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
#[path = "kernels_tests.rs"]
mod tests;
