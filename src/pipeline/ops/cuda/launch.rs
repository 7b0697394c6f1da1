//! Launches of the element-wise and GroupNorm kernels (`kernels/*.cu`, PTX built by `build.rs`),
//! each as a candle `CustomOp` whose `cuda_fwd` loads the PTX once per device
//! (`CudaDevice::get_or_load_custom_func`) and launches on candle's stream. The ops only see
//! contiguous inputs (made so here) in one float dtype; shapes were checked by the `*_fits`
//! functions of [`super`], and [`super::geometry`] gives every grid. `unsafe` is allowed here
//! (kernel launches, the uninitialised outputs they fill), each use with its SAFETY note.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor,
};
use half::{bf16, f16};

use super::geometry::{self, Launch};

const ELEMENTWISE: (&str, &str) = (
    "t2i_elementwise",
    include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx")),
);
const GROUP_NORM: (&str, &str) = (
    "t2i_group_norm",
    include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx")),
);

/// The element types the kernels are built for, and their C-name suffixes (`kernels/common.cuh`).
pub(super) trait Float: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl Float for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Float for f16 {
    const SUFFIX: &'static str = "f16";
}
impl Float for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            dt => candle_core::bail!("t2i CUDA kernels: unsupported dtype {dt:?}"),
        }
    };
}
#[cfg(feature = "cudnn")]
pub(super) use with_float;

fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: 0,
    }
}

pub(super) fn view<'a, T: Float>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("t2i CUDA kernels: input is not contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// A fresh, uninitialised output of `n` elements (NaN-filled when poisoning, see [`super`]).
pub(super) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it (checked on a GPU by the
    // op check, which poisons outputs first).
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if super::poison() {
        let stream = dev.cuda_stream();
        let bytes = out.num_bytes();
        let (ptr, _sync) = out.device_ptr_mut(&stream);
        // SAFETY: `ptr` is this allocation's, `bytes` its size, on the stream that owns it.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memset_d8_async(
                ptr,
                0xff,
                bytes,
                stream.cu_stream(),
            )
        }
        .w()?;
    }
    Ok(out)
}

/// Kernel `t2i_<name>_<suffix>` of a module, loaded from its PTX on first use (candle keeps the
/// module per device). Launch it with `dev.cuda_stream().launch_builder(&f)`: candle's stream.
fn func(
    dev: &CudaDevice,
    (module, ptx): (&str, &str),
    name: &str,
    suffix: &str,
) -> Result<CudaFunction> {
    let f = dev.get_or_load_custom_func(&format!("t2i_{name}_{suffix}"), module, ptx)?;
    Ok(f.into_cuda_function())
}

fn wrap<T: Float>(out: CudaSlice<T>, dev: &CudaDevice, shape: &Shape) -> (CudaStorage, Shape) {
    (
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        shape.clone(),
    )
}

fn cpu_unused<T>(name: &str) -> Result<T> {
    candle_core::bail!("{name}: a CUDA kernel; the ops layer runs it on CUDA devices only")
}

fn u32_of(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{n} does not fit u32")))
}

/// Launches `t2i_bias_rows`: `out[r, j] = x[r, j] + bias[r % period]` over `rows × cols`. `out`
/// may be `x` itself (each element is read, then written, by one thread).
pub(super) fn launch_bias_rows<T: Float>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    bias: &CudaView<T>,
    out: &CudaView<T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let Some(l) = geometry::rows(rows, cols) else {
        candle_core::bail!("bias_rows: {rows}x{cols} does not fit the kernel's grid");
    };
    let f = func(dev, ELEMENTWISE, "bias_rows", T::SUFFIX)?;
    let (cols, period) = (u32_of(cols)?, u32_of(bias.len())?);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(bias).arg(out).arg(&cols).arg(&period);
    // SAFETY: argument types and count match the kernel's signature (kernels/elementwise.cu).
    unsafe { b.launch(config(l)) }.w()?;
    Ok(())
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "t2i-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unused(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let d = xl.dims();
        let (b, c, hw) = (d[0], d[1], d[2..].iter().product::<usize>());
        let Some(plan) = geometry::group_norm(b, c, hw, self.groups) else {
            candle_core::bail!("group_norm: {:?} in {} groups does not fit", d, self.groups);
        };
        with_float!(xs.dtype(), T => {
            let (x, w, bias) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?, view::<T>(bs, bl)?);
            let partial = output::<f32>(dev, b * self.groups * plan.chunks as usize * 3)?;
            let f = func(dev, GROUP_NORM, "gn_partial", T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut a = stream.launch_builder(&f);
            a.arg(&x).arg(&partial).arg(&plan.group_len).arg(&plan.chunk_len);
            // SAFETY: argument types and count match `t2i_gn_partial_*` (kernels/group_norm.cu).
            unsafe { a.launch(config(plan.partial)) }.w()?;

            let out = output::<T>(dev, xl.shape().elem_count())?;
            let (hw, channels, cpg) = (u32_of(hw)?, u32_of(c)?, u32_of(c / self.groups)?);
            let (eps, silu) = (self.eps as f32, i32::from(self.silu));
            let f = func(dev, GROUP_NORM, "gn_apply", T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut a = stream.launch_builder(&f);
            a.arg(&x).arg(&partial).arg(&w).arg(&bias).arg(&out);
            a.arg(&hw).arg(&channels).arg(&cpg).arg(&plan.chunks).arg(&eps).arg(&silu);
            // SAFETY: argument types and count match `t2i_gn_apply_*` (kernels/group_norm.cu).
            unsafe { a.launch(config(plan.apply)) }.w()?;
            Ok(wrap(out, dev, xl.shape()))
        })
    }
}

/// torch `nn.GroupNorm` (+ SiLU) in two passes with f32 statistics ([`super::group_norm_fits`]).
pub(crate) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormOp { groups, eps, silu };
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "t2i-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unused(self.name())
    }

    fn cuda_fwd(&self, hs: &CudaStorage, hl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = hs.device();
        let mut dims = hl.dims().to_vec();
        let inner = dims[dims.len() - 1] / 2;
        *dims.last_mut().expect("rank checked by geglu_fits") = inner;
        let shape = Shape::from(dims);
        let rows = shape.elem_count() / inner;
        let Some(l) = geometry::rows(rows, inner) else {
            candle_core::bail!("geglu: {rows}x{inner} does not fit the kernel's grid");
        };
        with_float!(hs.dtype(), T => {
            let h = view::<T>(hs, hl)?;
            let out = output::<T>(dev, shape.elem_count())?;
            let inner = u32_of(inner)?;
            let f = func(dev, ELEMENTWISE, "geglu", T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut a = stream.launch_builder(&f);
            a.arg(&h).arg(&out).arg(&inner);
            // SAFETY: argument types and count match `t2i_geglu_*` (kernels/elementwise.cu).
            unsafe { a.launch(config(l)) }.w()?;
            Ok(wrap(out, dev, &shape))
        })
    }
}

/// diffusers' GEGLU after its projection, exact erf ([`super::geglu_fits`]).
pub(crate) fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

/// The two-input element-wise kernels.
#[derive(Clone, Copy)]
enum Binary {
    /// `x (B, C, ...) + bias[(b·C + c) % period]`.
    BiasRows,
    /// `x (..., F) + bias (F)`.
    BiasCols,
    /// `a + b`.
    Add,
    /// `x (B, C, H, W) + tokens (B, H·W, C)` transposed.
    AddTokens,
}

impl CustomOp2 for Binary {
    fn name(&self) -> &'static str {
        match self {
            Self::BiasRows => "t2i-bias-rows",
            Self::BiasCols => "t2i-bias-cols",
            Self::Add => "t2i-add",
            Self::AddTokens => "t2i-add-tokens",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unused(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let d = xl.dims();
        let n = xl.shape().elem_count();
        with_float!(xs.dtype(), T => {
            let (x, y) = (view::<T>(xs, xl)?, view::<T>(ys, yl)?);
            let out = output::<T>(dev, n)?;
            match self {
                Self::BiasRows => {
                    let rows = d[0] * d[1];
                    launch_bias_rows(dev, &x, &y, &out.slice(..), rows, n / rows)?;
                }
                Self::BiasCols => {
                    let cols = y.len();
                    let Some(l) = geometry::rows(n / cols, cols) else {
                        candle_core::bail!("bias_cols: {d:?} does not fit the kernel's grid");
                    };
                    let cols = u32_of(cols)?;
                    let f = func(dev, ELEMENTWISE, "bias_cols", T::SUFFIX)?;
                    let stream = dev.cuda_stream();
                    let mut a = stream.launch_builder(&f);
                    a.arg(&x).arg(&y).arg(&out).arg(&cols);
                    // SAFETY: matches `t2i_bias_cols_*` (kernels/elementwise.cu).
                    unsafe { a.launch(config(l)) }.w()?;
                }
                Self::Add => {
                    let Some(l) = geometry::flat(n) else {
                        candle_core::bail!("add: empty tensor");
                    };
                    let f = func(dev, ELEMENTWISE, "add", T::SUFFIX)?;
                    let stream = dev.cuda_stream();
                    let mut a = stream.launch_builder(&f);
                    a.arg(&x).arg(&y).arg(&out).arg(&n);
                    // SAFETY: matches `t2i_add_*` (kernels/elementwise.cu).
                    unsafe { a.launch(config(l)) }.w()?;
                }
                Self::AddTokens => {
                    let (b, c, hw) = (d[0], d[1], d[2] * d[3]);
                    let Some(l) = geometry::tiles(b, c, hw) else {
                        candle_core::bail!("add_tokens: {d:?} does not fit the kernel's grid");
                    };
                    let (c, hw) = (u32_of(c)?, u32_of(hw)?);
                    let f = func(dev, ELEMENTWISE, "add_tokens", T::SUFFIX)?;
                    let stream = dev.cuda_stream();
                    let mut a = stream.launch_builder(&f);
                    a.arg(&x).arg(&y).arg(&out).arg(&c).arg(&hw);
                    // SAFETY: matches `t2i_add_tokens_*` (kernels/elementwise.cu).
                    unsafe { a.launch(config(l)) }.w()?;
                }
            }
            Ok(wrap(out, dev, xl.shape()))
        })
    }
}

fn binary(op: Binary, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &op)
}

/// `x (B, C, ...)` plus a bias per channel `(C)` or per image and channel `(B, C)`.
pub(crate) fn bias_rows(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    binary(Binary::BiasRows, x, bias)
}

/// `x (..., F)` plus a per-feature bias `(F)`.
pub(crate) fn bias_cols(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    binary(Binary::BiasCols, x, bias)
}

/// `a + b`, one shape.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Add, a, b)
}

/// `x (B, C, H, W)` plus `tokens (B, H·W, C)`, folded back onto the image.
pub(crate) fn add_tokens(tokens: &Tensor, x: &Tensor) -> Result<Tensor> {
    binary(Binary::AddTokens, x, tokens)
}
