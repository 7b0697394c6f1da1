//! Scaled dot-product attention, the one kernel the UNet, the CLIP encoders and the VAE share.
//!
//! Inputs are `(batch, tokens, heads × head_dim)` as the projections produce them. On CUDA with the
//! `attn` switch on (a binary built with the `flash-attn` feature), a half dtype, no mask and a head
//! dim flash-attn has a kernel for ([`flash_fits`]), the fused kernel is used; otherwise the
//! textbook form runs with the softmax in f32 (diffusers' SDPA accumulates in f32 for half inputs
//! too). Masks are additive.
//! Unmasked f32 attention on CPU (the UNet's and the VAE's) runs as blocked GEMM + softmax tasks
//! that never build the whole score tensor (`cpu::kernels::attention`).
//! This file has no weights; projections live with their modules.

use candle_core::{DType, Result, Tensor};

use super::cpu::{self, AttentionShape, with_cpu_f32};
use super::switch::Kernel;

/// The head dims candle-flash-attn 0.11 has kernels for (`kernels/flash_fwd_hdim*_sm80.cu`). The
/// build scripts/build-cuda.sh makes defines `FLASHATTENTION_DISABLE_UNEVEN_K`, which compiles only
/// the kernels for a head dim equal to the kernel's, so any other head dim must not reach it.
const FLASH_HEAD_DIMS: [usize; 9] = [32, 64, 96, 128, 160, 192, 224, 256, 512];

/// Whether the fused kernel takes these inputs: `q`, `k`, `v` `(B, N, H·d)` of one half dtype and
/// batch and width, `d` one of [`FLASH_HEAD_DIMS`], and no mask (flash-attn has none; CLIP's
/// causal mask stays on the textbook path).
pub(super) fn flash_fits(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, masked: bool) -> bool {
    let (Ok((b, _, inner)), Ok((bk, nk, ik)), Ok(vd)) = (q.dims3(), k.dims3(), v.dims3()) else {
        return false;
    };
    let half = matches!(q.dtype(), DType::F16 | DType::BF16);
    !masked
        && half
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && heads > 0
        && inner.is_multiple_of(heads)
        && FLASH_HEAD_DIMS.contains(&(inner / heads))
        && (bk, ik) == (b, inner)
        && vd == (b, nk, inner)
}

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
    if super::takes(Kernel::Attn, q) && flash_fits(q, k, v, heads, mask.is_some()) {
        // No score tensor: no batch slicing either.
        return flash(q, k, v, heads);
    }
    sliced_attention(q, k, v, heads, mask, MAX_SCORE_ELEMENTS)
}

/// candle-flash-attn, which takes `(B, N, H, d)` directly: no transposes.
#[cfg(feature = "flash-attn")]
pub(super) fn flash(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = inner / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.reshape((b, nq, heads, d))?;
    let k = k.reshape((b, nk, heads, d))?;
    let v = v.reshape((b, nk, heads, d))?;
    candle_flash_attn::flash_attn(&q, &k, &v, scale as f32, false)?.reshape((b, nq, inner))
}

#[cfg(not(feature = "flash-attn"))]
pub(super) fn flash(_: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<Tensor> {
    candle_core::bail!("this binary was built without the `flash-attn` cargo feature")
}

/// [`attention`] without the fused kernel: the path every device but a CPU in f32 takes unless
/// switched.
pub(super) fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    sliced_attention(q, k, v, heads, None, MAX_SCORE_ELEMENTS)
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
    fn flash_takes_only_its_head_dims_half_dtypes_and_no_mask() {
        let t =
            |dims: (usize, usize, usize), dtype| Tensor::zeros(dims, dtype, &Device::Cpu).unwrap();
        let bf = DType::BF16;
        // SSD-1B's UNet: 10 and 20 heads of 64; its VAE: one head of 512; cross-attention to 77
        // tokens of another width than the queries' would not fit (k/v are projected to it).
        let (q, kv) = (t((2, 4096, 640), bf), t((2, 77, 640), bf));
        assert!(flash_fits(&q, &kv, &kv, 10, false));
        assert!(flash_fits(
            &t((2, 1024, 1280), bf),
            &t((2, 1024, 1280), bf),
            &t((2, 1024, 1280), bf),
            20,
            false
        ));
        let vae = t((1, 16384, 512), DType::F16);
        assert!(flash_fits(&vae, &vae, &vae, 1, false));
        assert!(!flash_fits(&q, &kv, &kv, 10, true), "masked");
        let f32q = t((2, 4096, 640), DType::F32);
        assert!(!flash_fits(&f32q, &f32q, &f32q, 10, false), "f32");
        assert!(
            !flash_fits(&q, &kv, &kv, 8, false),
            "head dim 80 has no kernel"
        );
        // CLIP-L: 12 heads of 64 (masked anyway); the tiny fixtures' head dims 4 and 8: none.
        let tiny = t((2, 64, 16), bf);
        assert!(!flash_fits(&tiny, &tiny, &tiny, 2, false));
        assert!(
            !flash_fits(&q, &t((1, 77, 640), bf), &kv, 10, false),
            "k batch differs"
        );
        assert!(
            !flash_fits(&q, &kv, &t((2, 76, 640), bf), 10, false),
            "v tokens differ"
        );
    }

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
