//! Prompt weights applied to one text encoder's chunk states: A1111's "Original" emphasis
//! (`modules/sd_emphasis.py` `EmphasisOriginal.after_transformers`, run per 77-token chunk by
//! `sd_hijack_clip.py` `process_tokens`). Each token's state is multiplied by its weight, then the
//! whole chunk is rescaled so that the mean over its tokens and channels is what it was before:
//!
//! ```text
//! z' = z · w · mean(z) / mean(z · w)
//! ```
//!
//! diffusers' community `lpw_stable_diffusion.py` applies the same formula (over the whole prompt
//! rather than per chunk; they agree on one chunk). The pooled embedding is not weighted (A1111 takes
//! it before the emphasis). Means and products are computed in f32 whatever the encoder's dtype.
//!
//! A chunk whose weights are all 1 comes back bit for bit as it went in. Where `mean(z · w)` is 0 or
//! the ratio is not finite (weights of 0 on every token that carries the mean), the ratio is 1:
//! A1111 would divide by zero there and render NaN.

use candle_core::{DType, Result, Tensor};

/// `hidden` `(rows, len, width)` with `weights[row][token]` applied; `weights` is `rows × len`.
pub(crate) fn emphasize(hidden: &Tensor, weights: &[Vec<f32>]) -> Result<Tensor> {
    let (rows, len, _) = hidden.dims3()?;
    if weights.len() != rows || weights.iter().any(|w| w.len() != len) {
        candle_core::bail!(
            "prompt weights for {} rows, states for {rows} rows of {len} tokens",
            weights.len()
        );
    }
    let plain: Vec<bool> = weights
        .iter()
        .map(|w| w.iter().all(|&x| x == 1.0))
        .collect();
    if plain.iter().all(|&p| p) {
        return Ok(hidden.clone());
    }
    let dtype = hidden.dtype();
    let device = hidden.device();
    let z = hidden.to_dtype(DType::F32)?;
    let flat: Vec<f32> = weights.iter().flatten().copied().collect();
    let w = Tensor::from_vec(flat, (rows, len, 1), device)?;
    let weighted = z.broadcast_mul(&w)?;
    let before: Vec<f32> = z.flatten_from(1)?.mean(1)?.to_vec1()?;
    let after: Vec<f32> = weighted.flatten_from(1)?.mean(1)?.to_vec1()?;
    let ratio: Vec<f32> = (0..rows)
        .map(|r| {
            let q = before[r] / after[r];
            if plain[r] || !q.is_finite() { 1.0 } else { q }
        })
        .collect();
    let ratio = Tensor::from_vec(ratio, (rows, 1, 1), device)?;
    weighted.broadcast_mul(&ratio)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn states() -> Tensor {
        // Two rows of three tokens, two channels each.
        let v: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0, 0.5, 2.0, 2.0, 0.0, 1.0];
        Tensor::from_vec(v, (2, 3, 2), &Device::Cpu).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        t.to_vec3().unwrap()
    }

    #[test]
    fn weights_of_one_change_nothing() {
        let z = states();
        let out = emphasize(&z, &[vec![1.0; 3], vec![1.0; 3]]).unwrap();
        assert_eq!(rows(&out), rows(&z));
    }

    #[test]
    fn weighted_tokens_scale_and_the_mean_is_restored_per_row() {
        let z = states();
        let out = emphasize(&z, &[vec![1.0, 2.0, 1.0], vec![1.0; 3]]).unwrap();
        let got = rows(&out);
        // Row 0: mean 3.5; weighted [1,2,6,8,5,6] has mean 14/3; ratio 3.5 / (14/3) = 0.75.
        let want = [[0.75, 1.5], [4.5, 6.0], [3.75, 4.5]];
        for (g, w) in got[0].iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        let mean: f32 = got[0].iter().flatten().sum::<f32>() / 6.0;
        assert!((mean - 3.5).abs() < 1e-6);
        // Row 1 has weights of 1: untouched, to the bit.
        assert_eq!(got[1], rows(&z)[1]);
    }

    #[test]
    fn a_zero_weighted_mean_leaves_the_weighted_states_unscaled() {
        let z = Tensor::from_vec(vec![1.0f32, -1.0, 0.0, 0.0], (1, 2, 2), &Device::Cpu).unwrap();
        // mean(z) = 0 and mean(z·w) = 0: the ratio 0/0 is replaced by 1.
        let out = emphasize(&z, &[vec![2.0, 1.0]]).unwrap();
        assert_eq!(rows(&out)[0], vec![vec![2.0, -2.0], vec![0.0, 0.0]]);
    }

    #[test]
    fn other_dtypes_come_back_in_their_dtype() {
        let z = states().to_dtype(DType::BF16).unwrap();
        let out = emphasize(&z, &[vec![1.0, 2.0, 1.0], vec![1.0; 3]]).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let plain = emphasize(&z, &[vec![1.0; 3], vec![1.0; 3]]).unwrap();
        assert_eq!(
            plain
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap(),
            z.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap()
        );
    }

    #[test]
    fn mismatched_weights_are_an_error_not_a_panic() {
        assert!(emphasize(&states(), &[vec![1.0; 3]]).is_err());
        assert!(emphasize(&states(), &[vec![1.0; 2], vec![1.0; 3]]).is_err());
    }
}
