//! Stride-1, "same"-padded k×k convolutions on CPU in f32: every 3×3 convolution of the UNet and the
//! VAE except the two downsamplers.
//!
//! candle 0.11's CPU kernel (`cpu_backend/conv2d.rs`, `conv2d_tiled`) transposes the whole input to
//! NHWC on one thread, re-flattens the kernel on every call, gathers 512-pixel tiles one element at
//! a time with strided writes, and scatters the GEMM result back one element at a time; on this
//! machine that reaches about a quarter of the FMA peak on SSD-1B's VAE. Here the work is split into
//! bands of whole output rows of one image. A band's column matrix (`c_in·k·k` rows, one per input
//! channel and kernel tap, by `rows·w` columns) is built from contiguous row copies of the NCHW
//! input, and one single-threaded GEMM `W (c_out × c_in·k·k) × cols` writes the band straight into
//! the NCHW output, on top of the bias. Bands run in parallel on rayon's pool.
//!
//! 3×3 convolutions with at least 32 input and output channels (all of SSD-1B's but the UNet's
//! `conv_in` and the VAE's `conv_in`/`conv_out`) run as Winograd F(2×2, 3×3) instead, in bands of
//! tile rows: input transform, 16 GEMMs, output transform, 2.25× fewer multiplications than the
//! direct GEMM. At 512² this halved the time of every SSD-1B convolution shape, UNet and VAE.
//!
//! A band's shape depends only on the image size and channel count, never on the batch, so an image
//! is computed by exactly the same GEMMs whatever it is batched with (bit-identical results).
#![allow(unsafe_code)]

use rayon::prelude::*;

use super::kernels::{Operand, OutPtr, gemm_f32};

/// Shape of one convolution: input `(b, c_in, h, w)`, weight `(c_out, c_in, k, k)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SameConv {
    pub b: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: usize,
}

/// Largest column matrix built for one band (elements; f32: 8 MiB per rayon thread). Big enough
/// that a band's GEMM has hundreds to thousands of columns for every SSD-1B layer (the GEMM packs
/// its operands into cache-sized blocks itself), small enough to stay out of the way of memory.
const MAX_BAND_ELEMENTS: usize = 2 << 20;

/// Bands per image to aim for, so that both cores of one image's convolution have work, with some
/// slack for uneven bands...
const MIN_BANDS_PER_IMAGE: usize = 4;
/// ...but not below this many output pixels per band (a GEMM narrower than this is mostly
/// overhead: the tiny test models' 4×4 latents stay one band).
const MIN_BAND_PIXELS: usize = 256;

/// Fewest input and output channels for the Winograd path: with fewer, its 16 GEMMs are too thin to
/// pay for the transforms and the per-call setup (the UNet's `conv_in` has 4 input channels, the VAE's
/// `conv_out` 3 outputs; the tiny test models' 8–16 channel convolutions ran 5–20% slower per image
/// with it). Every other SSD-1B/SDXL 3×3 convolution has 128 or more.
const WINOGRAD_MIN_CHANNELS: usize = 32;
/// Largest transformed input plus GEMM output of one Winograd band (elements; f32: 8 MiB per rayon
/// thread), as for the column matrix above.
const MAX_WINOGRAD_BAND: usize = 2 << 20;
/// Fewest tiles per Winograd band, unless the image has fewer: every band re-reads all transformed
/// weights, so a band needs enough tiles to reuse them (SSD-1B's 16×16 latents at 512² are 64
/// tiles, one band per image).
const MIN_BAND_TILES: usize = 64;

/// Per-thread buffers of the Winograd bands (kept across bands, so allocated once per thread).
#[derive(Default)]
struct WinogradScratch {
    /// Transformed input, `(16, c_in, tiles)`.
    v: Vec<f32>,
    /// GEMM outputs, `(16, c_out, tiles)`.
    m: Vec<f32>,
    /// Even/odd columns of the band's padded input rows of one channel, `tiles per row + 1` each.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// `d·B` of those rows: four combinations per row, `tiles per row` each.
    cols: Vec<f32>,
    /// Row-combined products of one tile row (two output rows × four columns).
    rows: [[Vec<f32>; 4]; 2],
}

impl SameConv {
    /// 3×3 convolutions with enough channels run as Winograd F(2×2, 3×3), the rest as im2col.
    pub(in crate::pipeline::ops) fn uses_winograd(&self) -> bool {
        self.k == 3 && self.c_in >= WINOGRAD_MIN_CHANNELS && self.c_out >= WINOGRAD_MIN_CHANNELS
    }

    /// Tile rows (pairs of output rows) per Winograd band (the last band may be shorter).
    fn winograd_band_rows(&self) -> usize {
        let (th, tw) = (self.h.div_ceil(2), self.w.div_ceil(2));
        let by_memory = MAX_WINOGRAD_BAND / (16 * (self.c_in + self.c_out) * tw);
        let for_parallelism = th.div_ceil(MIN_BANDS_PER_IMAGE);
        by_memory
            .min(for_parallelism)
            .max(MIN_BAND_TILES.div_ceil(tw))
            .clamp(1, th)
    }

    /// Adds the convolution of `x` (NCHW) with the 3×3 `weight` to `out` (NCHW, holding the bias),
    /// by [`winograd`] in bands of tile rows of one image; bands run in parallel on rayon's pool and,
    /// as above, a band's shape does not depend on the batch.
    fn forward_winograd(&self, x: &[f32], weight: &[f32], out: &mut [f32]) {
        let &Self {
            b,
            c_in,
            h,
            w,
            c_out,
            ..
        } = self;
        let hw = h * w;
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let u = winograd::weights(weight, c_out, c_in);
        let rows = self.winograd_band_rows();
        let bands = th.div_ceil(rows);
        let dst = OutPtr(out.as_mut_ptr());
        (0..b * bands)
            .into_par_iter()
            .for_each_init(WinogradScratch::default, |s, item| {
                let (img, band) = (item / bands, item % bands);
                let (t0, t1) = (band * rows, (band * rows + rows).min(th));
                let tiles = (t1 - t0) * tw;
                s.v.resize(16 * c_in * tiles, 0.0);
                s.m.resize(16 * c_out * tiles, 0.0);
                self.winograd_input(&x[img * c_in * hw..][..c_in * hw], t0, t1, s);
                for xi in 0..16 {
                    // SAFETY: `m`'s block ξ is c_out × tiles (row stride `tiles`) inside `s.m`
                    // (16·c_out·tiles); `U_ξ` is c_out × c_in with row stride 16·c_in starting at
                    // ξ·c_in inside `u` (c_out·16·c_in); `V_ξ` is c_in × tiles inside `s.v`. All
                    // are owned here and alive for the call; `accumulate` is false, so `m`'s old
                    // contents are never read.
                    unsafe {
                        gemm_f32(
                            (c_out, tiles, c_in),
                            s.m.as_mut_ptr().add(xi * c_out * tiles),
                            tiles,
                            false,
                            Operand {
                                ptr: u.as_ptr().add(xi * c_in),
                                rs: 16 * c_in,
                                cs: 1,
                            },
                            Operand {
                                ptr: s.v.as_ptr().add(xi * c_in * tiles),
                                rs: tiles,
                                cs: 1,
                            },
                            1.0,
                            gemm::Parallelism::None,
                        );
                    }
                }
                let WinogradScratch { m, rows: sums, .. } = s;
                for sum in sums.iter_mut().flatten() {
                    sum.resize(tw, 0.0);
                }
                for o in 0..c_out {
                    for ty in t0..t1 {
                        let at = (ty - t0) * tw;
                        let mm = |xi: usize| &m[(xi * c_out + o) * tiles + at..][..tw];
                        // Aᵀ·M: output row 0 = M₀ + M₁ + M₂, row 1 = M₁ - M₂ - M₃ (rows of M).
                        let [s0, s1] = &mut *sums;
                        for k in 0..4 {
                            winograd::add(&mut s0[k], mm(k), mm(4 + k));
                            winograd::add_assign(&mut s0[k], mm(8 + k));
                            winograd::sub(&mut s1[k], mm(4 + k), mm(8 + k));
                            winograd::sub_assign(&mut s1[k], mm(12 + k));
                        }
                        for (a, sum) in sums.iter().enumerate() {
                            let y = 2 * ty + a;
                            if y >= h {
                                continue;
                            }
                            // SAFETY: row y < h of output channel o of image `img`: inside `out`;
                            // the (img, band) items cover disjoint output rows (y in 2·t0..2·t1),
                            // so no two threads write the same element and nothing else reads
                            // `out` until the parallel loop has returned.
                            let row = unsafe {
                                std::slice::from_raw_parts_mut(
                                    dst.get().add(img * c_out * hw + o * hw + y * w),
                                    w,
                                )
                            };
                            winograd::add_output_row(sum, row);
                        }
                    }
                }
            });
    }

    /// `V = Bᵀ·d·B` of every tile of tile rows `t0..t1` of one image, into `s.v` as
    /// `(16, c_in, tiles)`.
    fn winograd_input(&self, img: &[f32], t0: usize, t1: usize, s: &mut WinogradScratch) {
        let (h, w, c_in) = (self.h, self.w, self.c_in);
        let tw = w.div_ceil(2);
        let tiles = (t1 - t0) * tw;
        // Input rows 2·t0 - 1 ..= 2·t1 (the tiles overlap by two rows).
        let n_rows = 2 * (t1 - t0) + 2;
        s.even.resize(n_rows * (tw + 1), 0.0);
        s.odd.resize(n_rows * (tw + 1), 0.0);
        s.cols.resize(n_rows * 4 * tw, 0.0);
        for (c, plane) in img.chunks(h * w).enumerate() {
            for r in 0..n_rows {
                let y = (2 * t0 + r).checked_sub(1).filter(|&y| y < h);
                let (even, odd) = (
                    &mut s.even[r * (tw + 1)..][..tw + 1],
                    &mut s.odd[r * (tw + 1)..][..tw + 1],
                );
                winograd::split_row(y.map(|y| &plane[y * w..][..w]), even, odd);
                let (c01, c23) = s.cols[r * 4 * tw..][..4 * tw].split_at_mut(2 * tw);
                let ((c0, c1), (c2, c3)) = (c01.split_at_mut(tw), c23.split_at_mut(tw));
                winograd::columns(even, odd, [c0, c1, c2, c3]);
            }
            for ty in t0..t1 {
                let r0 = 2 * (ty - t0);
                let at = (ty - t0) * tw;
                for k in 0..4 {
                    let d = |r: usize| &s.cols[((r0 + r) * 4 + k) * tw..][..tw];
                    let v = |i: usize| ((4 * i + k) * c_in + c) * tiles + at;
                    // Bᵀ·(d·B): rows d₀ - d₂, d₁ + d₂, d₂ - d₁, d₁ - d₃.
                    winograd::sub(&mut s.v[v(0)..][..tw], d(0), d(2));
                    winograd::add(&mut s.v[v(1)..][..tw], d(1), d(2));
                    winograd::sub(&mut s.v[v(2)..][..tw], d(2), d(1));
                    winograd::sub(&mut s.v[v(3)..][..tw], d(1), d(3));
                }
            }
        }
    }

    /// Output rows per band (the last band may be shorter).
    fn band_rows(&self) -> usize {
        let kk = self.c_in * self.k * self.k;
        let by_memory = (MAX_BAND_ELEMENTS / (kk * self.w)).max(1);
        let for_parallelism = self
            .h
            .div_ceil(MIN_BANDS_PER_IMAGE)
            .max(MIN_BAND_PIXELS.div_ceil(self.w));
        by_memory.min(for_parallelism).clamp(1, self.h)
    }

    /// `x` is the contiguous NCHW input, `weight` the contiguous `(c_out, c_in, k, k)` kernel.
    /// Returns the contiguous NCHW output, `(b, c_out, h, w)`.
    pub(crate) fn forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let &Self {
            b,
            c_in,
            h,
            w,
            c_out,
            k,
        } = self;
        let (hw, kk) = (h * w, c_in * k * k);
        assert!(k % 2 == 1, "same padding needs an odd kernel");
        assert_eq!(x.len(), b * c_in * hw);
        assert_eq!(weight.len(), c_out * kk);
        let mut out = vec![0f32; b * c_out * hw];
        if let Some(bias) = bias {
            assert_eq!(bias.len(), c_out);
            for (plane, &v) in out.chunks_mut(hw).zip(bias.iter().cycle()) {
                plane.fill(v);
            }
        }
        if out.is_empty() {
            return out;
        }
        if self.uses_winograd() {
            self.forward_winograd(x, weight, &mut out);
            return out;
        }
        let rows = self.band_rows();
        let bands = h.div_ceil(rows);
        let dst = OutPtr(out.as_mut_ptr());
        (0..b * bands)
            .into_par_iter()
            .for_each_init(Vec::new, |cols: &mut Vec<f32>, item| {
                let (img, band) = (item / bands, item % bands);
                let (r0, r1) = (band * rows, (band * rows + rows).min(h));
                let n = (r1 - r0) * w;
                // Every element is written by `fill_band`: no need to clear what a previous band left.
                cols.resize(kk * n, 0.0);
                self.fill_band(&x[img * c_in * hw..][..c_in * hw], cols, r0, r1);
                // SAFETY: the destination is element (i, j) at `out[img·c_out·hw + r0·w + i·hw + j]`
                // for i < c_out, j < n = (r1 - r0)·w: inside `out` (r1 ≤ h), and the (img, band)
                // items cover disjoint output rows, so no two threads write the same element and
                // nothing reads `out` until the parallel loop has returned. `weight` is c_out × kk
                // and `cols` kk × n, both contiguous and alive for the call.
                unsafe {
                    gemm_f32(
                        (c_out, n, kk),
                        dst.get().add(img * c_out * hw + r0 * w),
                        hw,
                        bias.is_some(),
                        Operand {
                            ptr: weight.as_ptr(),
                            rs: kk,
                            cs: 1,
                        },
                        Operand {
                            ptr: cols.as_ptr(),
                            rs: n,
                            cs: 1,
                        },
                        1.0,
                        gemm::Parallelism::None,
                    );
                }
            });
        out
    }

    /// Column matrix of output rows `r0..r1` of one image: row `(c·k + dy)·k + dx` holds input
    /// channel `c` shifted by `(dy - p, dx - p)` (zero outside the image), one output pixel per
    /// column. Writes every element of `cols[..c_in·k·k·n]`.
    fn fill_band(&self, img: &[f32], cols: &mut [f32], r0: usize, r1: usize) {
        let (h, w, k) = (self.h, self.w, self.k);
        let p = (k - 1) / 2;
        let n = (r1 - r0) * w;
        for (c, plane) in img.chunks(h * w).enumerate() {
            for dy in 0..k {
                for dx in 0..k {
                    let row = &mut cols[((c * k + dy) * k + dx) * n..][..n];
                    // Output x reads input x + dx - p: valid for x in x0..x1 (possibly empty).
                    let x0 = p.saturating_sub(dx).min(w);
                    let x1 = (w + p).saturating_sub(dx).clamp(x0, w);
                    for y in r0..r1 {
                        let out = &mut row[(y - r0) * w..][..w];
                        let Some(sy) = (y + dy).checked_sub(p).filter(|&sy| sy < h) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = (sy * w + x0 + dx).wrapping_sub(p);
                        out[..x0].fill(0.0);
                        if x0 < x1 {
                            out[x0..x1].copy_from_slice(&plane[src..src + (x1 - x0)]);
                        }
                        out[x1..].fill(0.0);
                    }
                }
            }
        }
    }
}

/// Winograd F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
/// each 2×2 output tile is `Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A` over the 4×4 input tiles `d_c`, so
/// the 9 multiplications per output and input channel of a 3×3 convolution become 16 per 2×2 tile
/// (2.25× fewer), done as 16 GEMMs `U_ξ (c_out × c_in) × V_ξ (c_in × tiles)`, one per point ξ of the
/// 4×4 transform domain. The transforms only add and halve; the matrices are the paper's (§4.1):
///   Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1],
///   Aᵀ = [1 1 1 0; 0 1 -1 -1].
/// Like PyTorch's convolution, it computes the cross-correlation.
mod winograd {
    /// Transformed weights, `(c_out, 16, c_in)`: element `(o, ξ, c)` is `(G g Gᵀ)[ξ]` of the kernel
    /// from input channel `c` to output channel `o` (ξ = 4·row + column).
    pub(super) fn weights(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
        use rayon::prelude::*;
        assert_eq!(weight.len(), c_out * c_in * 9);
        let mut u = vec![0f32; c_out * 16 * c_in];
        u.par_chunks_mut(16 * c_in)
            .zip(weight.par_chunks(9 * c_in))
            .for_each(|(u, w)| {
                for (c, g) in w.chunks_exact(9).enumerate() {
                    // G·g: 4 rows of 3.
                    let mut gg = [[0f32; 3]; 4];
                    for j in 0..3 {
                        let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                        gg[0][j] = g0;
                        gg[1][j] = 0.5 * (g0 + g1 + g2);
                        gg[2][j] = 0.5 * (g0 - g1 + g2);
                        gg[3][j] = g2;
                    }
                    // (G·g)·Gᵀ: 4 × 4.
                    for (i, [a0, a1, a2]) in gg.into_iter().enumerate() {
                        u[(4 * i) * c_in + c] = a0;
                        u[(4 * i + 1) * c_in + c] = 0.5 * (a0 + a1 + a2);
                        u[(4 * i + 2) * c_in + c] = 0.5 * (a0 - a1 + a2);
                        u[(4 * i + 3) * c_in + c] = a2;
                    }
                }
            });
        u
    }

    /// Splits one input row into the even and odd columns of its zero-padded copy `p` (`p[q]` =
    /// `row[q - 1]`, zero outside): `even[i] = p[2i]`, `odd[i] = p[2i + 1]`, both `tiles + 1` long.
    /// `None` is a padding row (all zero).
    pub(super) fn split_row(row: Option<&[f32]>, even: &mut [f32], odd: &mut [f32]) {
        even.fill(0.0);
        odd.fill(0.0);
        if let Some(row) = row {
            let pairs = row.chunks_exact(2);
            if let [last] = pairs.remainder() {
                odd[row.len() / 2] = *last;
            }
            for (j, pair) in pairs.enumerate() {
                odd[j] = pair[0];
                even[j + 1] = pair[1];
            }
        }
    }

    /// `d·B` for one padded input row given as its split columns (`tiles + 1` each): the four
    /// column combinations of every tile, `out[k][tx]` for k < 4, tx < tiles.
    pub(super) fn columns(even: &[f32], odd: &[f32], out: [&mut [f32]; 4]) {
        let tiles = out[0].len();
        let (e0, e1) = (&even[..tiles], &even[1..=tiles]);
        let (o0, o1) = (&odd[..tiles], &odd[1..=tiles]);
        let [u0, u1, u2, u3] = out;
        for (u, (a, b)) in u0.iter_mut().zip(e0.iter().zip(e1)) {
            *u = a - b;
        }
        for (u, (a, b)) in u1.iter_mut().zip(o0.iter().zip(e1)) {
            *u = a + b;
        }
        for (u, (a, b)) in u2.iter_mut().zip(e1.iter().zip(o0)) {
            *u = a - b;
        }
        for (u, (a, b)) in u3.iter_mut().zip(o0.iter().zip(o1)) {
            *u = a - b;
        }
    }

    /// `out = a - b`, element-wise.
    pub(super) fn sub(out: &mut [f32], a: &[f32], b: &[f32]) {
        for (o, (a, b)) in out.iter_mut().zip(a.iter().zip(b)) {
            *o = a - b;
        }
    }
    /// `out = a + b`, element-wise.
    pub(super) fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
        for (o, (a, b)) in out.iter_mut().zip(a.iter().zip(b)) {
            *o = a + b;
        }
    }
    /// `out -= a`, element-wise.
    pub(super) fn sub_assign(out: &mut [f32], a: &[f32]) {
        for (o, a) in out.iter_mut().zip(a) {
            *o -= a;
        }
    }
    /// `out += a`, element-wise.
    pub(super) fn add_assign(out: &mut [f32], a: &[f32]) {
        for (o, a) in out.iter_mut().zip(a) {
            *o += a;
        }
    }

    /// One output row of a tile row, from the row-combined products `s[k]` (k < 4, `tiles` long):
    /// adds `s0 + s1 + s2` to the even columns of `out` and `s1 - s2 - s3` to the odd ones.
    pub(super) fn add_output_row(s: &[Vec<f32>; 4], out: &mut [f32]) {
        debug_assert_eq!(s[0].len(), out.len().div_ceil(2));
        let [s0, s1, s2, s3] = s;
        let full = out.len() / 2;
        let mut pairs = out.chunks_exact_mut(2);
        for (pair, (((a, b), c), d)) in (&mut pairs).zip(s0.iter().zip(s1).zip(s2).zip(s3)) {
            pair[0] += a + b + c;
            pair[1] += b - c - d;
        }
        if let [last] = pairs.into_remainder() {
            *last += s0[full] + s1[full] + s2[full];
        }
    }
}
