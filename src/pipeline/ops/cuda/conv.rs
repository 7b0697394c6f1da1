//! The project's own cuDNN convolution (feature `cudnn`, switch `conv`), through the cuDNN bindings
//! candle re-exports (cudarc). What it does that candle 0.11.1's `conv2d` does not
//! (`candle-core/src/cuda_backend/cudnn.rs`):
//!
//! * **Tensor-op math** for f16/bf16 (`cudnnSetConvolutionMathType(CUDNN_TENSOR_OP_MATH)`): without
//!   it cuDNN may not offer tensor-core algorithms for half types (PyTorch,
//!   `aten/src/ATen/cudnn/Descriptors.h`, sets it for both). f32 keeps the default math, as
//!   candle's. Half types compute in f32 (PyTorch's "pseudo-half" configuration, as candle's bf16).
//! * **A plan per shape**, made on first use and cached ([`ConvKey`]): descriptors, the algorithm
//!   (measured with `cudnnFindConvolutionForwardAlgorithm`, else cuDNN's heuristic), its math type
//!   and workspace size. candle re-creates descriptors and re-runs the heuristic on every call.
//! * **One grow-only workspace**, never zero-filled (candle `alloc_zeros` one per call).
//! * **Bias (and residual) fused**: `cudnnConvolutionBiasActivationForward` with the identity
//!   activation, `y = conv(x) + z + bias`, where cuDNN allows it (identity needs the
//!   IMPLICIT_PRECOMP_GEMM algorithm); otherwise the residual is copied into `y` first and the
//!   convolution accumulates onto it (`beta = 1`), and the bias is added in place by the
//!   project's row kernel. A shape whose fused call fails once runs unfused from then on.
//!
//! State is per thread and device, like candle's cuDNN handles (a handle must not be used by two
//! threads at once); renders run on one device thread. `unsafe` is allowed here (cuDNN's C API),
//! each use with its SAFETY note.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;

use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::cudnn::{result as dnn, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Result, Storage, Tensor};
use candle_nn::Conv2dConfig;
use sys::cudnnConvolutionFwdAlgo_t as Algo;

use super::conv_key::ConvKey;
use super::launch::{Float, launch_bias_rows, output, view, with_float};

/// Most workspace one plan may use; faster algorithms that want more are passed over.
const MAX_WORKSPACE: usize = 1 << 30;

macro_rules! owned {
    ($name:ident, $raw:ty, $destroy:path) => {
        struct $name($raw);
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created once, destroyed once, here.
                let _ = unsafe { $destroy(self.0) }.result();
            }
        }
    };
}
owned!(Handle, sys::cudnnHandle_t, sys::cudnnDestroy);
owned!(
    TensorDesc,
    sys::cudnnTensorDescriptor_t,
    sys::cudnnDestroyTensorDescriptor
);
owned!(
    FilterDesc,
    sys::cudnnFilterDescriptor_t,
    sys::cudnnDestroyFilterDescriptor
);
owned!(
    ConvDesc,
    sys::cudnnConvolutionDescriptor_t,
    sys::cudnnDestroyConvolutionDescriptor
);
owned!(
    ActDesc,
    sys::cudnnActivationDescriptor_t,
    sys::cudnnDestroyActivationDescriptor
);

fn data_type(dtype: DType) -> sys::cudnnDataType_t {
    match dtype {
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        _ => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    }
}

fn tensor(dtype: DType, dims: [i32; 4]) -> Result<TensorDesc> {
    let d = TensorDesc(dnn::create_tensor_descriptor()?);
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    // SAFETY: a fresh descriptor.
    unsafe { dnn::set_tensor4d_descriptor(d.0, nchw, data_type(dtype), dims) }?;
    Ok(d)
}

/// One shape's descriptors and algorithm.
struct Plan {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    bias: TensorDesc,
    conv: ConvDesc,
    algo: Algo,
    math: sys::cudnnMathType_t,
    workspace: usize,
    /// `cudnnFindConvolutionForwardAlgorithm` (measured) or the v7 heuristic.
    chosen_by: &'static str,
    /// Whether the fused bias call works for this shape; `None` until tried.
    fused: Option<bool>,
}

struct State {
    handle: Handle,
    identity: ActDesc,
    plans: HashMap<ConvKey, Plan>,
    workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::default();
}

impl State {
    fn new(dev: &CudaDevice) -> Result<State> {
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let handle = Handle(dnn::create_handle()?);
        // SAFETY: a fresh handle; candle's stream outlives the process's renders.
        unsafe { dnn::set_stream(handle.0, stream.cu_stream() as _) }?;
        let identity = ActDesc(dnn::create_activation_descriptor()?);
        let mode = sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY;
        let nan = sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN;
        // SAFETY: a fresh descriptor.
        unsafe { dnn::set_activation_descriptor(identity.0, mode, nan, 0.0) }?;
        Ok(State {
            handle,
            identity,
            plans: HashMap::new(),
            workspace: None,
        })
    }

    fn plan(&self, key: &ConvKey) -> Result<Plan> {
        let (n, k, oh, ow) = key.out_dims().expect("ConvKey::new checked the output");
        let out = [n as i32, k as i32, oh as i32, ow as i32];
        let w = FilterDesc(dnn::create_filter_descriptor()?);
        let conv = ConvDesc(dnn::create_convolution_descriptor()?);
        let math = if key.dtype == DType::F32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        let (p, s, d) = (key.pad, key.stride, key.dilation);
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let cross = sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
        let f32_compute = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        // SAFETY: fresh descriptors.
        unsafe {
            dnn::set_filter4d_descriptor(w.0, data_type(key.dtype), nchw, key.w)?;
            dnn::set_convolution2d_descriptor(conv.0, p, p, s, s, d, d, cross, f32_compute)?;
            dnn::set_convolution_math_type(conv.0, math)?;
        }
        let mut plan = Plan {
            x: tensor(key.dtype, key.x)?,
            y: tensor(key.dtype, out)?,
            bias: tensor(key.dtype, [1, k as i32, 1, 1])?,
            w,
            conv,
            algo: Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            math,
            workspace: 0,
            chosen_by: "find",
            fused: None,
        };
        let perf = match self.algorithms(&plan, true) {
            Ok(perf) if !perf.is_empty() => perf,
            _ => {
                plan.chosen_by = "heuristic";
                self.algorithms(&plan, false)?
            }
        };
        let Some(best) = perf.first() else {
            candle_core::bail!(
                "cuDNN offers no algorithm within {MAX_WORKSPACE} bytes for {key:?}"
            );
        };
        plan.algo = best.algo;
        plan.math = best.mathType;
        // SAFETY: the plan's descriptors are live; the handle is this thread's.
        unsafe {
            dnn::set_convolution_math_type(plan.conv.0, plan.math)?;
            plan.workspace = dnn::get_convolution_forward_workspace_size(
                self.handle.0,
                plan.x.0,
                plan.w.0,
                plan.conv.0,
                plan.y.0,
                plan.algo,
            )?;
        }
        Ok(plan)
    }

    /// The usable algorithms for `plan`'s descriptors, fastest first: measured (`find`, cuDNN
    /// allocates its own buffers) or from the heuristic.
    fn algorithms(
        &self,
        plan: &Plan,
        find: bool,
    ) -> Result<Vec<sys::cudnnConvolutionFwdAlgoPerf_t>> {
        const N: usize = Algo::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
        // SAFETY: plain-old-data filled by cuDNN below.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        let mut returned = 0;
        let (h, x, w, c, y) = (self.handle.0, plan.x.0, plan.w.0, plan.conv.0, plan.y.0);
        let (n, out, p) = (N as i32, &mut returned, perf.as_mut_ptr());
        // SAFETY: live descriptors, `perf` holds N results.
        unsafe {
            if find {
                sys::cudnnFindConvolutionForwardAlgorithm(h, x, w, c, y, n, out, p).result()?;
            } else {
                dnn::get_convolution_forward_algorithm(h, x, w, c, y, n, out, p)?;
            }
        }
        Ok(perf[..returned.clamp(0, n) as usize]
            .iter()
            .filter(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
            .filter(|r| r.memory <= MAX_WORKSPACE)
            .copied()
            .collect())
    }
}

/// What one cached plan chose, for the op check's report.
#[derive(Debug, Clone)]
pub(crate) struct PlanReport {
    pub key: ConvKey,
    pub algo: String,
    pub math: String,
    pub workspace: usize,
    pub chosen_by: &'static str,
    pub fused: Option<bool>,
}

/// The plans this thread has made so far on `device`.
pub(crate) fn plan_reports(dev: &CudaDevice) -> Vec<PlanReport> {
    STATES.with(|s| {
        let states = s.borrow();
        let Some(state) = states.get(&dev.id()) else {
            return Vec::new();
        };
        state
            .plans
            .iter()
            .map(|(key, p)| PlanReport {
                key: *key,
                algo: format!("{:?}", p.algo).replace("CUDNN_CONVOLUTION_FWD_ALGO_", ""),
                math: format!("{:?}", p.math).replace("CUDNN_", ""),
                workspace: p.workspace,
                chosen_by: p.chosen_by,
                fused: p.fused,
            })
            .collect()
    })
}

fn cuda_storage(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("cuDNN convolution: a tensor is not on a CUDA device"),
    }
}

/// `conv2d(x, w) + bias + residual`: `x` `(N, C, H, W)`, `w` `(K, C, R, S)`, `bias` `(K)`,
/// `residual` the output's shape; one float dtype for all (checked by the ops layer with
/// [`ConvKey::new`]).
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: Conv2dConfig,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(key) = ConvKey::new(x.dims4()?, w.dims4()?, &cfg, x.dtype()) else {
        candle_core::bail!(
            "cuDNN convolution: {:?} * {:?} {cfg:?} is not one call",
            x.dims(),
            w.dims()
        );
    };
    let (n, k, oh, ow) = key.out_dims().expect("checked by ConvKey::new");
    let dev = x.device().as_cuda_device()?.clone();
    let contiguous = |t: Option<&Tensor>| t.map(Tensor::contiguous).transpose();
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (bias, residual) = (contiguous(bias)?, contiguous(residual)?);
    if let Some(r) = &residual
        && r.dims4()? != (n, k, oh, ow)
    {
        candle_core::bail!(
            "cuDNN convolution: residual {:?}, output {:?}",
            r.dims(),
            (n, k, oh, ow)
        );
    }
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let bg = bias.as_ref().map(|b| b.storage_and_layout());
    let rg = residual.as_ref().map(|r| r.storage_and_layout());
    let y = with_float!(x.dtype(), T => {
        let xv = view::<T>(cuda_storage(&xg)?, xl)?;
        let wv = view::<T>(cuda_storage(&wg)?, wl)?;
        let bv = match &bg {
            Some((g, l)) => Some(view::<T>(cuda_storage(g)?, l)?),
            None => None,
        };
        let rv = match &rg {
            Some((g, l)) => Some(view::<T>(cuda_storage(g)?, l)?),
            None => None,
        };
        let y = run::<T>(&dev, &key, &xv, &wv, bv.as_ref(), rv.as_ref())?;
        CudaStorage::wrap_cuda_slice(y, dev.clone())
    });
    Ok(Tensor::from_storage(
        Storage::Cuda(y),
        (n, k, oh, ow),
        BackpropOp::none(),
        false,
    ))
}

fn run<T: Float>(
    dev: &CudaDevice,
    key: &ConvKey,
    x: &CudaView<T>,
    w: &CudaView<T>,
    bias: Option<&CudaView<T>>,
    residual: Option<&CudaView<T>>,
) -> Result<CudaSlice<T>> {
    STATES.with(|s| {
        let mut states = s.borrow_mut();
        let state = match states.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(State::new(dev)?),
        };
        if !state.plans.contains_key(key) {
            let plan = state.plan(key)?;
            state.plans.insert(*key, plan);
        }
        let need = state.plans[key].workspace;
        if state.workspace.as_ref().is_none_or(|ws| ws.len() < need) {
            state.workspace = None; // free the old one before taking the larger
            // SAFETY: cuDNN's workspace is scratch; it is never read before cuDNN writes it.
            state.workspace = Some(unsafe { dev.alloc::<u8>(need.max(1))? });
        }
        let State {
            handle,
            identity,
            plans,
            workspace,
        } = &mut *state;
        let plan = plans.get_mut(key).expect("inserted above");
        let ws = workspace.as_mut().expect("allocated above");
        let ws_len = ws.len();
        let (n, k, oh, ow) = key.out_dims().expect("checked by ConvKey::new");
        let mut y = output::<T>(dev, n * k * oh * ow)?;
        let stream = dev.cuda_stream();
        let (one, zero) = (1f32, 0f32);
        let scalar = |v: &f32| v as *const f32 as *const c_void;

        if let Some(b) = bias
            && plan.fused != Some(false)
            && plan.algo == Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        {
            let fused = {
                let (xp, _gx) = x.device_ptr(&stream);
                let (wp, _gw) = w.device_ptr(&stream);
                let (bp, _gb) = b.device_ptr(&stream);
                let (wsp, _gws) = ws.device_ptr_mut(&stream);
                let (yp, _gy) = y.device_ptr_mut(&stream);
                let rp = residual.map(|r| r.device_ptr(&stream));
                // Without a residual, z is y itself with alpha2 = 0 (cuDNN's scaling
                // convention: the operand of a zero factor is not read).
                let (zp, alpha2) = match &rp {
                    Some((p, _)) => (*p, one),
                    None => (yp, zero),
                };
                // SAFETY: live descriptors matching these buffers' shapes and dtype (the
                // plan's key); the workspace holds at least the plan's size.
                unsafe {
                    dnn::convolution_bias_activation_forward(
                        handle.0,
                        scalar(&one),
                        plan.x.0,
                        xp as *const c_void,
                        plan.w.0,
                        wp as *const c_void,
                        plan.conv.0,
                        plan.algo,
                        wsp as *mut c_void,
                        ws_len,
                        scalar(&alpha2),
                        plan.y.0,
                        zp as *const c_void,
                        plan.bias.0,
                        bp as *const c_void,
                        identity.0,
                        plan.y.0,
                        yp as *mut c_void,
                    )
                }
            };
            match fused {
                Ok(()) => {
                    plan.fused = Some(true);
                    return Ok(y);
                }
                Err(e) if plan.fused.is_none() => {
                    tracing::info!(?key, error = %e, "cuDNN fused bias unavailable for this shape: unfused from now on");
                    plan.fused = Some(false);
                }
                Err(e) => return Err(e.into()),
            }
        }

        let beta = match residual {
            Some(r) => {
                dev.memcpy_dtod(r, &mut y)?;
                one
            }
            None => zero,
        };
        {
            let (xp, _gx) = x.device_ptr(&stream);
            let (wp, _gw) = w.device_ptr(&stream);
            let (wsp, _gws) = ws.device_ptr_mut(&stream);
            let (yp, _gy) = y.device_ptr_mut(&stream);
            // SAFETY: as above.
            unsafe {
                dnn::convolution_forward(
                    handle.0,
                    scalar(&one),
                    plan.x.0,
                    xp as *const c_void,
                    plan.w.0,
                    wp as *const c_void,
                    plan.conv.0,
                    plan.algo,
                    wsp as *mut c_void,
                    ws_len,
                    scalar(&beta),
                    plan.y.0,
                    yp as *mut c_void,
                )
            }?;
        }
        if let Some(b) = bias {
            let yv = y.slice(..);
            launch_bias_rows(dev, &yv, b, &yv, n * k, oh * ow)?;
        }
        Ok(y)
    })
}
