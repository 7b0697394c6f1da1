//! Scaled dot-product attention, the one kernel the UNet, the CLIP encoders and the VAE share.
//!
//! Inputs are `(batch, tokens, heads × head_dim)` as the projections produce them. On CUDA with the
//! `flash-attn` feature and a half dtype the fused kernel is used; otherwise the textbook form runs with
//! the softmax in f32 (diffusers' SDPA accumulates in f32 for half inputs too). Masks are additive.
//! This file has no weights; projections live with their modules.

use candle_core::{DType, Result, Tensor};

/// `softmax(q kᵀ / sqrt(d) + mask) v` over `heads` heads.
///
/// * `q`: `(B, Nq, H·d)`, `k`, `v`: `(B, Nk, H·d)`; returns `(B, Nq, H·d)`.
/// * `mask`: optional additive bias broadcastable to `(B, H, Nq, Nk)` (CLIP's causal mask).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let head_dim = inner / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();

    #[cfg(feature = "flash-attn")]
    if mask.is_none() && q.device().is_cuda() && matches!(q.dtype(), DType::F16 | DType::BF16) {
        // candle-flash-attn takes (B, N, H, d) directly: no transposes.
        let q = q.reshape((b, nq, heads, head_dim))?;
        let k = k.reshape((b, nk, heads, head_dim))?;
        let v = v.reshape((b, nk, heads, head_dim))?;
        let out = candle_flash_attn::flash_attn(&q, &k, &v, scale as f32, false)?;
        return out.reshape((b, nq, inner));
    }

    let split = |x: &Tensor, n: usize| -> Result<Tensor> {
        x.reshape((b, n, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qh, kh, vh) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
    let scores = (qh * scale)?.matmul(&kh.t()?)?;
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vh.dtype())?;
    let out = probs.matmul(&vh)?;
    out.transpose(1, 2)?.reshape((b, nq, inner))
}
