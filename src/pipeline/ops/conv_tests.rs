//! The convolution kernels of [`super::conv2d`] against candle's and an f64 reference, within the
//! rounding bound of each output, and batch-independent.

use candle_core::Device;
use candle_nn::Conv2d;

use super::*;

fn max_element(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_element(&(a - b).unwrap().abs().unwrap())
}

#[test]
fn banded_convolution_matches_candles_kernel_and_ignores_the_batch() {
    let dev = Device::Cpu;
    // Odd sizes and more channels out than in: every border case of the row copies.
    // (8, 16, 70, 33) runs as four bands of rows, the last one shorter; the 5×5 case has no bias.
    for (c_in, c_out, h, w, k, bias) in [
        (3, 5, 7, 6, 3, true),
        (4, 2, 1, 9, 3, true),
        (2, 3, 5, 1, 3, true),
        (8, 16, 70, 33, 3, true),
        (3, 4, 9, 8, 5, false),
    ] {
        let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev).unwrap();
        let bias = bias.then(|| Tensor::randn(0f32, 1.0, c_out, &dev).unwrap());
        let cfg = Conv2dConfig {
            padding: (k - 1) / 2,
            ..Default::default()
        };
        // Σ|w|·|x| + |b| per output: the scale of each output's rounding error.
        let magnitude = Conv2d::new(
            weight.abs().unwrap(),
            bias.as_ref().map(|b| b.abs().unwrap()),
            cfg,
        );
        let x = Tensor::randn(0f32, 1.0, (3, c_in, h, w), &dev).unwrap();
        assert!(same_conv_on_cpu(&x, &weight, &cfg).unwrap().is_some());
        let ours = conv2d(&x, &weight, bias.as_ref(), cfg).unwrap();
        let candle = Conv2d::new(weight.clone(), bias.clone(), cfg)
            .forward(&x)
            .unwrap();
        // Both are f32 sums of n = c_in·k² + 1 terms in different orders (different GEMM
        // blockings): each is within γₙ·Σ|terms| of the exact value, γₙ ≈ n·u with u = ε/2
        // (Higham, Accuracy and Stability of Numerical Algorithms, §3.1), so they differ by at
        // most 2γₙ·Σ|terms| (2.2γₙ: the computed magnitude is itself rounded). A misplaced
        // element is off by O(Σ|terms|), some 10⁴ times more.
        let gamma = (c_in * k * k + 1) as f64 * f32::EPSILON as f64 / 2.0;
        let allowed = (magnitude.forward(&x.abs().unwrap()).unwrap() * (2.2 * gamma)).unwrap();
        let excess = max_element(&((&ours - &candle).unwrap().abs().unwrap() - allowed).unwrap());
        assert!(
            excess <= 0.0,
            "{c_in}->{c_out} {h}x{w} k{k}: {} over the rounding bound by {excess}",
            max_diff(&ours, &candle)
        );
        for i in 0..3 {
            let alone = conv2d(&x.narrow(0, i, 1).unwrap(), &weight, bias.as_ref(), cfg).unwrap();
            assert_eq!(max_diff(&ours.narrow(0, i, 1).unwrap(), &alone), 0.0);
        }
    }
}

#[test]
fn winograd_convolution_is_within_its_rounding_bound_and_ignores_the_batch() {
    let dev = Device::Cpu;
    // Odd and even sizes (partial tiles at the right and bottom), one row, one column, and
    // (32, 36, 70, 19) in several bands of tile rows, the last one shorter.
    for (c_in, c_out, h, w, bias) in [
        (32, 32, 8, 8, true),
        (32, 40, 9, 7, true),
        (36, 32, 1, 5, false),
        (32, 33, 6, 1, true),
        (32, 36, 70, 19, true),
    ] {
        let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap();
        let bias = bias.then(|| Tensor::randn(0f32, 1.0, c_out, &dev).unwrap());
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let x = Tensor::randn(0f32, 1.0, (3, c_in, h, w), &dev).unwrap();
        let shape = same_conv_on_cpu(&x, &weight, &cfg).unwrap().unwrap();
        assert!(shape.uses_winograd());
        let ours = conv2d(&x, &weight, bias.as_ref(), cfg).unwrap();
        let f64_conv = Conv2d::new(
            weight.to_dtype(DType::F64).unwrap(),
            bias.as_ref().map(|b| b.to_dtype(DType::F64).unwrap()),
            cfg,
        );
        let exact = f64_conv
            .forward(&x.to_dtype(DType::F64).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        // Every quantity Winograd F(2×2, 3×3) computes for an output is a signed sum of
        // products g·d of one channel's taps and the 16 inputs of its tile: |G g Gᵀ| ≤ Σ|g|
        // (G's products are ≤ 1), |Bᵀ d B| ≤ Σ|d| (B's entries are 0, ±1), and each output adds
        // 9 of the 16 products (Aᵀ, A: three ±1 per row). So S = 9·Σ_c Σ|g_c|·Σ_tile|d_c|
        // (+ |bias|) bounds every intermediate, and the result is within γₙ·S of the exact
        // value with n = c_in + 16 rounding steps at most (weights 4, input 4, GEMM c_in,
        // output 4, bias 1; Higham §3.1); 2× for slack. A misplaced element is off by
        // O(Σ|g·d|), about S/144, over 10³ times more than the bound.
        let gamma = (c_in + 16) as f64 * f32::EPSILON as f64 / 2.0;
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tap_sums = weight.abs().unwrap().sum_keepdim((2, 3)).unwrap();
        let tile_kernel = (tap_sums.broadcast_as((c_out, c_in, 4, 4)).unwrap() * 9.0)
            .unwrap()
            .contiguous()
            .unwrap();
        let padded = x
            .abs()
            .unwrap()
            .pad_with_zeros(2, 0, 2 * th - h)
            .unwrap()
            .pad_with_zeros(3, 0, 2 * tw - w)
            .unwrap();
        let per_tile = padded.conv2d(&tile_kernel, 1, 2, 1, 1).unwrap();
        assert_eq!(per_tile.dims4().unwrap(), (3, c_out, th, tw));
        let mut magnitude = per_tile
            .upsample_nearest2d(2 * th, 2 * tw)
            .unwrap()
            .narrow(2, 0, h)
            .unwrap()
            .narrow(3, 0, w)
            .unwrap();
        if let Some(bias) = &bias {
            magnitude = magnitude
                .broadcast_add(&bias.abs().unwrap().reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
        }
        let allowed = (magnitude * (2.0 * gamma)).unwrap();
        let excess = max_element(&((&ours - &exact).unwrap().abs().unwrap() - allowed).unwrap());
        assert!(
            excess <= 0.0,
            "{c_in}->{c_out} {h}x{w}: {} over the rounding bound by {excess}",
            max_diff(&ours, &exact)
        );
        for i in 0..3 {
            let alone = conv2d(&x.narrow(0, i, 1).unwrap(), &weight, bias.as_ref(), cfg).unwrap();
            assert_eq!(max_diff(&ours.narrow(0, i, 1).unwrap(), &alone), 0.0);
        }
    }
}
