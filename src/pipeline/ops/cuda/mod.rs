//! The ops layer's own CUDA kernels, each behind a run-time switch ([`super::switch`]) that is off by
//! default: two-pass GroupNorm (+ SiLU), GEGLU, bias and residual adds (`kernels/*.cu`, compiled to
//! PTX by `build.rs` with the `cuda` feature and loaded through candle's custom-kernel mechanism,
//! `launch.rs`), and a cuDNN convolution of the project's own (`conv.rs`, `cudnn` feature).
//!
//! [`super`] decides when a kernel runs: on CUDA, switched on, and when the `*_fits` check here
//! accepts the shapes and dtypes (otherwise candle's path runs). The checks and the launch
//! geometry ([`geometry`], [`conv_key`]) are plain Rust, compiled and tested in every build; a
//! build without the `cuda` feature has stand-ins that are never called (the switches cannot be
//! turned on there).

pub(crate) mod conv_key;
pub(crate) mod geometry;

#[cfg(feature = "cudnn")]
mod conv;
#[cfg(feature = "cuda")]
mod launch;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

#[cfg(not(feature = "cuda"))]
pub(crate) use absent::{add, add_tokens, bias_cols, bias_rows, geglu, group_norm};
#[cfg(not(feature = "cudnn"))]
pub(crate) use absent_cudnn::conv2d;
#[cfg(feature = "cudnn")]
pub(crate) use conv::{conv2d, plan_reports};
#[cfg(feature = "cuda")]
pub(crate) use launch::{add, add_tokens, bias_cols, bias_rows, geglu, group_norm};

/// When on, every output these kernels allocate is filled with NaN bytes (`0xff`) before the
/// kernel writes it, so an element a kernel fails to write shows up as NaN (the op check,
/// `check.rs`, turns it on). Off in renders.
static POISON: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn poison() -> bool {
    POISON.load(Ordering::Relaxed)
}

fn float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

fn same_float(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| float(t.dtype()) && t.dtype() == ts[0].dtype())
}

/// A convolution cuDNN takes in one call ([`conv_key::ConvKey`]), with a bias `(K)` and a residual
/// of the output's shape, all in the input's dtype.
pub(crate) fn conv_fits(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: &candle_nn::Conv2dConfig,
    residual: Option<&Tensor>,
) -> bool {
    let (Ok(xd), Ok(wd)) = (x.dims4(), w.dims4()) else {
        return false;
    };
    let Some(key) = conv_key::ConvKey::new(xd, wd, cfg, x.dtype()) else {
        return false;
    };
    w.dtype() == x.dtype()
        && bias.is_none_or(|b| b.dtype() == x.dtype() && b.dims() == [wd.0])
        && residual.is_none_or(|r| r.dtype() == x.dtype() && r.dims4().ok() == key.out_dims())
}

/// `x` `(B, C, ...)` with per-channel `weight` and `bias` in `groups` groups.
pub(crate) fn group_norm_fits(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize) -> bool {
    let d = x.dims();
    d.len() >= 3
        && same_float(&[x, weight, bias])
        && weight.dims() == [d[1]]
        && bias.dims() == [d[1]]
        && geometry::group_norm(d[0], d[1], d[2..].iter().product(), groups).is_some()
}

/// `h` `(..., 2·inner)`.
pub(crate) fn geglu_fits(h: &Tensor) -> bool {
    let width = h.dims().last().copied().unwrap_or(0);
    float(h.dtype())
        && width > 0
        && width.is_multiple_of(2)
        && geometry::rows(h.elem_count() / width, width / 2).is_some()
}

/// `x` `(..., F)` and a per-feature `bias` `(F)`.
pub(crate) fn bias_cols_fits(x: &Tensor, bias: &Tensor) -> bool {
    let f = x.dims().last().copied().unwrap_or(0);
    same_float(&[x, bias])
        && f > 0
        && bias.dims() == [f]
        && geometry::rows(x.elem_count() / f, f).is_some()
}

/// `x` `(B, C, ...)` and a bias per channel `(C)` or per image and channel `(B, C)`.
pub(crate) fn bias_rows_fits(x: &Tensor, bias: &Tensor) -> bool {
    let d = x.dims();
    if d.len() < 2 || !same_float(&[x, bias]) {
        return false;
    }
    let per_channel = bias.dims() == [d[1]];
    let per_image = bias.dims() == [d[0], d[1]];
    (per_channel || per_image) && geometry::rows(d[0] * d[1], d[2..].iter().product()).is_some()
}

/// Two tensors of one shape.
pub(crate) fn add_fits(a: &Tensor, b: &Tensor) -> bool {
    same_float(&[a, b]) && a.dims() == b.dims() && geometry::flat(a.elem_count()).is_some()
}

/// Tokens `(B, H·W, C)` onto an image `(B, C, H, W)`.
pub(crate) fn add_tokens_fits(tokens: &Tensor, x: &Tensor) -> bool {
    let (Ok((b, c, h, w)), Ok(t)) = (x.dims4(), tokens.dims3()) else {
        return false;
    };
    same_float(&[tokens, x]) && t == (b, h * w, c) && geometry::tiles(b, c, h * w).is_some()
}

#[cfg(not(feature = "cuda"))]
mod absent {
    //! Stand-ins for a build without CUDA: the ops layer only calls the kernels on a CUDA device.
    use candle_core::{Result, Tensor};

    fn absent<T>() -> Result<T> {
        candle_core::bail!("this binary was built without the `cuda` cargo feature")
    }
    pub(crate) fn group_norm(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: f64,
        _: bool,
    ) -> Result<Tensor> {
        absent()
    }
    pub(crate) fn geglu(_: &Tensor) -> Result<Tensor> {
        absent()
    }
    pub(crate) fn bias_cols(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        absent()
    }
    pub(crate) fn bias_rows(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        absent()
    }
    pub(crate) fn add(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        absent()
    }
    pub(crate) fn add_tokens(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        absent()
    }
}

#[cfg(not(feature = "cudnn"))]
mod absent_cudnn {
    //! Stand-in for a build without cuDNN: the ops layer only calls it with the `conv` switch,
    //! which such a build refuses.
    use candle_core::{Result, Tensor};
    use candle_nn::Conv2dConfig;

    pub(crate) fn conv2d(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Conv2dConfig,
        _: Option<&Tensor>,
    ) -> Result<Tensor> {
        candle_core::bail!("this binary was built without the `cudnn` cargo feature")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(dims: &[usize], dtype: DType) -> Tensor {
        Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
    }

    #[test]
    fn fit_checks_accept_the_models_shapes_and_refuse_mismatches() {
        let bf = DType::BF16;
        let x = t(&[2, 320, 64, 64], bf);
        let c = t(&[320], bf);
        assert!(group_norm_fits(&x, &c, &c, 32));
        assert!(
            !group_norm_fits(&x, &c, &c, 30),
            "groups must divide channels"
        );
        assert!(
            !group_norm_fits(&x, &t(&[320], DType::F32), &c, 32),
            "mixed dtypes"
        );
        assert!(!group_norm_fits(&t(&[2, 320], bf), &c, &c, 32), "rank 2");
        assert!(!group_norm_fits(&t(&[2, 320, 4], DType::U32), &c, &c, 32));

        assert!(geglu_fits(&t(&[2, 4096, 5120], bf)));
        assert!(!geglu_fits(&t(&[2, 4096, 5121], bf)), "odd width");

        assert!(bias_cols_fits(&t(&[2, 4096, 640], bf), &t(&[640], bf)));
        assert!(!bias_cols_fits(&t(&[2, 4096, 640], bf), &t(&[320], bf)));

        assert!(bias_rows_fits(&x, &c), "a convolution's bias");
        assert!(bias_rows_fits(&x, &t(&[2, 320], bf)), "a time embedding");
        assert!(!bias_rows_fits(&x, &t(&[320, 2], bf)));
        assert!(!bias_rows_fits(&x, &t(&[4, 320], bf)));

        assert!(add_fits(&x, &x));
        assert!(!add_fits(&x, &t(&[2, 320, 64, 32], bf)));

        let w = t(&[640, 320, 3, 3], bf);
        let stride2 = candle_nn::Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let y = t(&[2, 640, 32, 32], bf);
        assert!(conv_fits(&x, &w, Some(&t(&[640], bf)), &stride2, Some(&y)));
        assert!(
            !conv_fits(&x, &w, Some(&t(&[320], bf)), &stride2, None),
            "bias per output channel"
        );
        assert!(
            !conv_fits(&x, &w, None, &stride2, Some(&x)),
            "residual of the output's shape"
        );
        assert!(!conv_fits(
            &x,
            &t(&[640, 320, 3, 3], DType::F32),
            None,
            &stride2,
            None
        ));

        assert!(add_tokens_fits(&t(&[2, 4096, 320], bf), &x));
        assert!(
            !add_tokens_fits(&t(&[2, 320, 4096], bf), &x),
            "tokens must be (B, HW, C)"
        );
    }
}
