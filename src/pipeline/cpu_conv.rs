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
//! A band's shape depends only on the image size and channel count, never on the batch, so an image
//! is computed by exactly the same GEMMs whatever it is batched with (bit-identical results).
#![allow(unsafe_code)]

use rayon::prelude::*;

use super::cpu_ops::OutPtr;

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

impl SameConv {
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
                    gemm::gemm(
                        c_out,
                        n,
                        kk,
                        dst.get().add(img * c_out * hw + r0 * w),
                        1,
                        hw as isize,
                        bias.is_some(),
                        weight.as_ptr(),
                        1,
                        kk as isize,
                        cols.as_ptr(),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
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
