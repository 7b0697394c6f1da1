//! Scaled dot-product attention, the one kernel the UNet, the CLIP encoders and the VAE share.
//!
//! Inputs are `(batch, tokens, heads × head_dim)` as the projections produce them. On CUDA with the
//! `flash-attn` feature and a half dtype the fused kernel is used; otherwise the textbook form runs with
//! the softmax in f32 (diffusers' SDPA accumulates in f32 for half inputs too). Masks are additive.
//! Unmasked f32 attention on CPU (the UNet's and the VAE's) runs as blocked GEMM + softmax tasks
//! that never build the whole score tensor (`cpu::kernels::attention`).
//! This file has no weights; projections live with their modules.

use candle_core::{DType, Result, Tensor};

use super::cpu::{self, AttentionShape, with_cpu_f32};

/// Most elements of one `(B, H, Nq, Nk)` score tensor. cuBLAS's batched GEMM fails
/// (`CUBLAS_STATUS_EXECUTION_FAILED`, measured on an H100 at 1024², batch 8 with CFG: 16 × 10 heads ×
/// 4096² = 2.7e9 elements) once a tensor passes 2³¹ elements, and the scores are the largest
/// activation by far; larger batches are computed in slices of the batch, as diffusers' sliced
/// attention does. 2³⁰ f32 scores are 4 GiB.
const MAX_SCORE_ELEMENTS: usize = 1 << 30;

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
    sliced_attention(q, k, v, heads, mask, MAX_SCORE_ELEMENTS)
}

/// [`attention`] over slices of the batch whose score tensors hold at most `max_scores` elements.
fn sliced_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, nq, _) = q.dims3()?;
    let nk = k.dim(1)?;
    let per_item = (heads * nq * nk).max(1);
    let slice = (max_scores / per_item).clamp(1, b.max(1));
    if slice >= b {
        return attention_once(q, k, v, heads, mask);
    }
    let mut out = Vec::with_capacity(b.div_ceil(slice));
    for start in (0..b).step_by(slice) {
        let len = slice.min(b - start);
        // A mask with a batch dimension is sliced with the batch; a broadcast one (dim 1) is not.
        let m = match mask {
            Some(m) if m.rank() == 4 && m.dim(0)? == b => Some(m.narrow(0, start, len)?),
            other => other.cloned(),
        };
        out.push(attention_once(
            &q.narrow(0, start, len)?,
            &k.narrow(0, start, len)?,
            &v.narrow(0, start, len)?,
            heads,
            m.as_ref(),
        )?);
    }
    Tensor::cat(&out, 0)
}

fn attention_once(
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

    // Shapes that do not fit (a width not divisible by the heads, k/v of another width) fall
    // through to candle's ops, which report them as errors.
    if mask.is_none()
        && q.device().is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && head_dim * heads == inner
        && k.dims3()? == (b, nk, inner)
        && v.dims3()? == (b, nk, inner)
    {
        let shape = AttentionShape {
            b,
            nq,
            nk,
            heads,
            head_dim,
        };
        let out = with_cpu_f32(q, |qs| {
            with_cpu_f32(k, |ks| {
                with_cpu_f32(v, |vs| {
                    Ok(cpu::kernels::attention(qs, ks, vs, shape, scale as f32))
                })
            })
        })?;
        return Tensor::from_vec(out, (b, nq, inner), q.device());
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn slicing_the_batch_changes_nothing() {
        let dev = Device::Cpu;
        let (b, nq, nk, heads, d) = (5, 7, 9, 2, 4);
        let q = Tensor::randn(0f32, 1.0, (b, nq, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, nk, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, nk, heads * d), &dev).unwrap();
        let mask = Tensor::randn(0f32, 1.0, (b, 1, nq, nk), &dev).unwrap();
        for m in [None, Some(&mask)] {
            let whole = attention(&q, &k, &v, heads, m).unwrap();
            // Two items per slice, then one.
            for limit in [2 * heads * nq * nk, 1] {
                let sliced = sliced_attention(&q, &k, &v, heads, m, limit).unwrap();
                let diff = (&whole - &sliced)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-6, "limit {limit}: {diff}");
            }
        }
    }
}
