//! The CPU kernels against references: exp and erf against the standard library and an integral,
//! attention against a float64 reference and alone versus batched, linear layers and GEGLU against
//! direct sums.

use super::*;

#[test]
fn exp_and_erf_match_the_standard_library() {
    let mut worst_exp = 0f32;
    let mut worst_erf = 0f32;
    for i in -20_000..=20_000 {
        let x = i as f32 * 0.0043; // -86 .. 86
        let want = x.exp();
        worst_exp = worst_exp.max(((exp(x) - want) / want).abs());
        let x = i as f32 * 0.0004; // -8 .. 8
        worst_erf = worst_erf.max((erf(x) - erf_reference(x)).abs());
    }
    assert!(worst_exp < 4.0 * f32::EPSILON, "exp: {worst_exp}");
    // 1.5e-7 from the formula, plus f32 rounding of `1 - poly·e^{-x²}` (a few ulp of 1.0).
    assert!(worst_erf < 6e-7, "erf: {worst_erf}");
    assert_eq!(exp(f32::NEG_INFINITY), exp(-87.3));
    assert!(exp(f32::NAN).is_nan());
    assert!(silu(-200.0).abs() < 1e-30 && (silu(200.0) - 200.0).abs() < 1e-4);
}

/// erf in f64 by its definition, 2/√π ∫₀^|x| e^{-t²} dt, with composite Simpson over 4000
/// panels (error far below f32 resolution on |x| ≤ 8).
fn erf_reference(x: f32) -> f32 {
    let a = (x as f64).abs();
    let n = 4000;
    let h = a / n as f64;
    let f = |t: f64| (-t * t).exp();
    let mut s = f(0.0) + f(a);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    let v = s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt();
    (v as f32).copysign(x)
}

fn reference_attention(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
    let inner = s.heads * s.head_dim;
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let mut out = vec![0f32; s.b * s.nq * inner];
    for img in 0..s.b {
        for h in 0..s.heads {
            for i in 0..s.nq {
                let qi = &q[(img * s.nq + i) * inner + h * s.head_dim..][..s.head_dim];
                let scores: Vec<f64> = (0..s.nk)
                    .map(|j| {
                        let kj = &k[(img * s.nk + j) * inner + h * s.head_dim..][..s.head_dim];
                        qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|&x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..s.head_dim {
                    let acc: f64 = (0..s.nk)
                        .map(|j| {
                            e[j] / sum * v[(img * s.nk + j) * inner + h * s.head_dim + c] as f64
                        })
                        .sum();
                    out[(img * s.nq + i) * inner + h * s.head_dim + c] = acc as f32;
                }
            }
        }
    }
    out
}

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    // xorshift: deterministic, no extra dependency.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

#[test]
fn attention_matches_a_float64_reference_and_ignores_the_batch() {
    // Several query blocks with a short last one (nq = 4100 / rows = 16 at nk = 4097 would be
    // slow in the reference; 70 queries with 1000 keys give 64-row blocks plus a 6-row one).
    for (nq, nk, heads, head_dim) in [(7, 5, 2, 3), (70, 1000, 2, 8), (33, 77, 3, 16)] {
        let s = AttentionShape {
            b: 2,
            nq,
            nk,
            heads,
            head_dim,
        };
        let inner = heads * head_dim;
        let q = pseudo_random(2 * nq * inner, 1);
        let k = pseudo_random(2 * nk * inner, 2);
        let v = pseudo_random(2 * nk * inner, 3);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let ours = attention(&q, &k, &v, s, scale);
        let want = reference_attention(&q, &k, &v, s);
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-6, "{s:?}: {worst}");
        let one = AttentionShape { b: 1, ..s };
        let second = attention(
            &q[nq * inner..],
            &k[nk * inner..],
            &v[nk * inner..],
            one,
            scale,
        );
        assert_eq!(&ours[nq * inner..], &second[..], "{s:?}");
    }
}

#[test]
fn linear_and_geglu_match_direct_sums() {
    let (rows, k, n) = (37, 19, 23);
    let x = pseudo_random(rows * k, 4);
    let w = pseudo_random(n * k, 5);
    let bias = pseudo_random(n, 6);
    for with_bias in [true, false] {
        let got = linear(&x, rows, k, &w, with_bias.then_some(&bias[..]), n);
        for r in 0..rows {
            for j in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>()
                    + if with_bias { bias[j] } else { 0.0 };
                assert!((got[r * n + j] - want).abs() < 1e-5, "{r},{j}");
            }
        }
    }
    let inner = 21;
    let h = pseudo_random(5 * 2 * inner, 7);
    let got = geglu(&h, inner);
    for r in 0..5 {
        for i in 0..inner {
            let (a, g) = (
                h[r * 2 * inner + i] as f64,
                h[r * 2 * inner + inner + i] as f64,
            );
            let gelu = 0.5 * g * (1.0 + erf_reference((g / 2f64.sqrt()) as f32) as f64);
            assert!(
                (got[r * inner + i] as f64 - a * gelu).abs() < 1e-6,
                "{r},{i}"
            );
        }
    }
}
