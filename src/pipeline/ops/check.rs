//! `t2i bench --check-ops`: every CUDA kernel of the ops layer ([`super::cuda`], flash-attn) against
//! candle's path, at SSD-1B's shapes at 1024² (the UNet's with CFG, two rows; the VAE decoder's at
//! one image), on the device and dtype given. Each case runs both paths on the same random inputs
//! and compares both with candle's path in f32 on the same device (run with
//! `NVIDIA_TF32_OVERRIDE=0` so that reference is plain f32): relative L2 error ‖out − ref‖ / ‖ref‖,
//! largest absolute error, and the median time of back-to-back calls. The kernels' outputs are
//! NaN-filled before they are written, so a missed element fails the case.
//!
//! A case passes when the kernel's output is finite and its relative error is at most twice candle's
//! own in that dtype, or under the dtype's floor (one rounding of the dtype; for convolutions and
//! attention in f32, 1e-4, as cuDNN's and flash-attn's algorithms sum in other orders). A kernel
//! passes when all its cases do; its speed-up is candle's summed time over its own. The check
//! never switches a kernel on: that stays with `--cuda-kernels` (docs/gpu.md).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Conv2dConfig;

use super::switch::Kernel;
use super::{attention, cuda};

/// One path's figures in one case.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PathResult {
    pub ms: f64,
    pub rel_l2: f64,
    pub max_abs: f64,
}

/// One case: a kernel at one shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    pub kernel: &'static str,
    pub case: String,
    pub dtype: &'static str,
    pub candle: PathResult,
    /// `None` when the kernel did not run (not built, or it does not take this shape).
    pub t2i: Option<PathResult>,
    /// PASS, FAIL or SKIP.
    pub verdict: &'static str,
    pub note: String,
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

struct Ctx<'a> {
    dev: &'a Device,
    dtype: DType,
    json: bool,
    results: Vec<CaseResult>,
}

/// Runs every case on `dev` in `dtype`, printing one line per case and a summary per kernel;
/// `Ok(true)` when no case failed.
pub fn run(dev: &Device, dtype: DType, json: bool) -> Result<bool> {
    if !dev.is_cuda() {
        candle_core::bail!("--check-ops compares CUDA kernels: run it with --device cuda");
    }
    let mut ctx = Ctx {
        dev,
        dtype,
        json,
        results: Vec::new(),
    };
    cuda::set_poison(true);
    let outcome = (|| {
        group_norms(&mut ctx)?;
        geglus(&mut ctx)?;
        adds(&mut ctx)?;
        convolutions(&mut ctx)?;
        attentions(&mut ctx)
    })();
    cuda::set_poison(false);
    outcome?;
    Ok(summarize(&ctx.results, json))
}

impl Ctx<'_> {
    /// Random f32 inputs on the device, N(mean, std²).
    fn randn(&self, shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
        Tensor::randn(mean, std, shape, self.dev)
    }

    fn case(
        &mut self,
        kernel: Kernel,
        name: String,
        inputs: &[Tensor],
        candle: Op,
        t2i: Option<Op>,
        note: impl Fn() -> String,
    ) -> Result<()> {
        let reference = candle(inputs)?.to_dtype(DType::F32)?;
        let lo = inputs
            .iter()
            .map(|t| t.to_dtype(self.dtype))
            .collect::<Result<Vec<_>>>()?;
        let candle_r = self.measure(&reference, &|| candle(&lo))?;
        let t2i_r = match t2i {
            Some(f) => Some(self.measure(&reference, &|| f(&lo))?),
            None => None,
        };
        let exact = matches!(
            kernel,
            Kernel::GroupNorm | Kernel::Geglu | Kernel::Bias | Kernel::Residual
        );
        let floor: f64 = match self.dtype {
            DType::BF16 => 1.0 / 256.0,
            DType::F16 => 1.0 / 2048.0,
            _ if exact => 1e-6,
            _ => 1e-4,
        };
        let verdict = match t2i_r {
            None => "SKIP",
            Some(t) if t.rel_l2.is_finite() && t.rel_l2 <= floor.max(2.0 * candle_r.rel_l2) => {
                "PASS"
            }
            Some(_) => "FAIL",
        };
        let result = CaseResult {
            kernel: kernel.name(),
            case: name,
            dtype: crate::device::dtype_name(self.dtype),
            candle: candle_r,
            t2i: t2i_r,
            verdict,
            note: note(),
        };
        self.print(&result);
        self.results.push(result);
        Ok(())
    }

    /// Errors of `f`'s output against `reference`, and its median time per call.
    fn measure(&self, reference: &Tensor, f: &dyn Fn() -> Result<Tensor>) -> Result<PathResult> {
        let out = f()?.to_dtype(DType::F32)?;
        let diff = (out - reference)?.to_dtype(DType::F64)?;
        let num = diff.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let den = reference
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        let max_abs = diff.abs()?.max_all()?.to_scalar::<f64>()?;
        let rel_l2 = if num.is_nan() {
            f64::NAN
        } else {
            (num / den.max(f64::MIN_POSITIVE)).sqrt()
        };
        // Warm up (module loads, cuDNN plans), then three trials of back-to-back calls.
        self.dev.synchronize()?;
        let start = Instant::now();
        drop(f()?);
        self.dev.synchronize()?;
        let reps = if start.elapsed().as_secs_f64() > 5e-3 {
            3
        } else {
            10
        };
        let mut trials = Vec::with_capacity(3);
        for _ in 0..3 {
            let start = Instant::now();
            for _ in 0..reps {
                drop(f()?);
            }
            self.dev.synchronize()?;
            trials.push(start.elapsed().as_secs_f64() * 1e3 / reps as f64);
        }
        trials.sort_by(f64::total_cmp);
        Ok(PathResult {
            ms: trials[1],
            rel_l2,
            max_abs: if num.is_nan() { f64::NAN } else { max_abs },
        })
    }

    fn print(&self, r: &CaseResult) {
        if self.json {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
            return;
        }
        let path = |p: &PathResult| {
            format!(
                "{:>9.3} ms  rel {:>8.2e}  max {:>8.2e}",
                p.ms, p.rel_l2, p.max_abs
            )
        };
        let (ours, speed) = match &r.t2i {
            Some(t) => (path(t), format!("{:>6.2}x", r.candle.ms / t.ms)),
            None => ("-".into(), String::new()),
        };
        println!(
            "{:<4} {:<9} {:<44} candle {} | t2i {} {speed} {}",
            r.verdict,
            r.kernel,
            r.case,
            path(&r.candle),
            ours,
            r.note
        );
    }
}

/// Per kernel: PASS when every case ran and passed, the speed-up over the cases that ran.
fn summarize(results: &[CaseResult], json: bool) -> bool {
    let mut all_pass = true;
    if !json {
        println!("kernel     cases  verdict  candle ms  t2i ms  speed-up");
    }
    for k in Kernel::ALL {
        let cases: Vec<_> = results.iter().filter(|r| r.kernel == k.name()).collect();
        let ran: Vec<_> = cases
            .iter()
            .filter_map(|r| r.t2i.map(|t| (r.candle.ms, t.ms)))
            .collect();
        let failed = cases.iter().any(|r| r.verdict == "FAIL");
        all_pass &= !failed;
        let verdict = if failed {
            "FAIL"
        } else if ran.is_empty() {
            "SKIP"
        } else {
            "PASS"
        };
        let (candle_ms, t2i_ms) = ran.iter().fold((0.0, 0.0), |(a, b), (c, t)| (a + c, b + t));
        let speedup = if t2i_ms > 0.0 {
            candle_ms / t2i_ms
        } else {
            0.0
        };
        if json {
            let line = serde_json::json!({
                "kernel": k.name(), "cases": cases.len(), "ran": ran.len(), "verdict": verdict,
                "candle_ms": candle_ms, "t2i_ms": t2i_ms, "speedup": speedup,
            });
            println!("{line}");
        } else {
            println!(
                "{:<10} {:>5}  {:<7}  {:>9.3}  {:>6.3}  {:>7.2}x",
                k.name(),
                format!("{}/{}", ran.len(), cases.len()),
                verdict,
                candle_ms,
                t2i_ms,
                speedup
            );
        }
    }
    all_pass
}

fn shape(dims: &[usize]) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("x")
}

fn group_norms(ctx: &mut Ctx) -> Result<()> {
    // (images, channels, side, eps, SiLU): the UNet's resnets (eps 1e-5, SiLU) and transformers
    // (1e-6, none) at 128², 64² and 32², and the VAE decoder's resnets up to 1024².
    let shapes = [
        (2, 320, 128, 1e-5, true),
        (2, 640, 64, 1e-5, true),
        (2, 640, 64, 1e-6, false),
        (2, 1280, 32, 1e-5, true),
        (2, 2560, 32, 1e-5, true),
        (1, 512, 128, 1e-6, true),
        (1, 256, 512, 1e-6, true),
        (1, 128, 1024, 1e-6, true),
    ];
    for (b, c, side, eps, silu) in shapes {
        let inputs = [
            ctx.randn(&[b, c, side, side], 0.5, 2.0)?,
            ctx.randn(&[c], 1.0, 0.2)?,
            ctx.randn(&[c], 0.0, 0.2)?,
        ];
        let candle = |t: &[Tensor]| super::candle_group_norm(&t[0], &t[1], &t[2], 32, eps, silu);
        let ours = |t: &[Tensor]| cuda::group_norm(&t[0], &t[1], &t[2], 32, eps, silu);
        let fits = cuda::group_norm_fits(&inputs[0], &inputs[1], &inputs[2], 32);
        let name = format!(
            "{} g32{}",
            shape(&[b, c, side, side]),
            if silu { "+silu" } else { "" }
        );
        ctx.case(
            Kernel::GroupNorm,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            String::new,
        )?;
    }
    Ok(())
}

fn geglus(ctx: &mut Ctx) -> Result<()> {
    // The feed-forwards of the 640- and 1280-wide transformers (inner width 4·dim).
    for (b, tokens, dim) in [(2, 4096, 640), (2, 1024, 1280)] {
        let inputs = [ctx.randn(&[b, tokens, 8 * dim], 0.0, 1.0)?];
        let candle = |t: &[Tensor]| super::candle_geglu(&t[0]);
        let ours = |t: &[Tensor]| cuda::geglu(&t[0]);
        let fits = cuda::geglu_fits(&inputs[0]);
        let name = shape(&[b, tokens, 8 * dim]);
        ctx.case(
            Kernel::Geglu,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            String::new,
        )?;
    }
    Ok(())
}

fn adds(ctx: &mut Ctx) -> Result<()> {
    // Linear biases: attention output and GEGLU projection widths.
    for (b, tokens, f) in [(2, 4096, 640), (2, 4096, 5120), (2, 1024, 1280)] {
        let inputs = [
            ctx.randn(&[b, tokens, f], 0.0, 1.0)?,
            ctx.randn(&[f], 0.0, 1.0)?,
        ];
        let candle = |t: &[Tensor]| t[0].broadcast_add(&t[1]);
        let ours = |t: &[Tensor]| cuda::bias_cols(&t[0], &t[1]);
        let fits = cuda::bias_cols_fits(&inputs[0], &inputs[1]);
        let name = format!("linear {} + bias", shape(&[b, tokens, f]));
        ctx.case(
            Kernel::Bias,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            String::new,
        )?;
    }
    // A convolution's bias and a resnet's time embedding.
    for (b, c, side, per_image) in [
        (2, 320, 128, false),
        (1, 128, 1024, false),
        (2, 640, 64, true),
    ] {
        let bias_dims: &[usize] = if per_image { &[b, c] } else { &[c] };
        let inputs = [
            ctx.randn(&[b, c, side, side], 0.0, 1.0)?,
            ctx.randn(bias_dims, 0.0, 1.0)?,
        ];
        let candle = move |t: &[Tensor]| {
            if per_image {
                super::candle_add_channel_bias(&t[0], &t[1])
            } else {
                t[0].broadcast_add(&t[1].reshape((1, c, 1, 1))?)
            }
        };
        let ours = |t: &[Tensor]| cuda::bias_rows(&t[0], &t[1]);
        let fits = cuda::bias_rows_fits(&inputs[0], &inputs[1]);
        let what = if per_image {
            "time embedding"
        } else {
            "conv bias"
        };
        let name = format!("{} + {what}", shape(&[b, c, side, side]));
        ctx.case(
            Kernel::Bias,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            String::new,
        )?;
    }
    // Residuals: the transformer blocks' and the resnets'.
    for dims in [&[2, 4096, 640][..], &[2, 320, 128, 128]] {
        let inputs = [ctx.randn(dims, 0.0, 1.0)?, ctx.randn(dims, 0.0, 1.0)?];
        let candle = |t: &[Tensor]| &t[0] + &t[1];
        let ours = |t: &[Tensor]| cuda::add(&t[0], &t[1]);
        let fits = cuda::add_fits(&inputs[0], &inputs[1]);
        let name = format!("{} + residual", shape(dims));
        ctx.case(
            Kernel::Residual,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            String::new,
        )?;
    }
    // Transformer2D's tokens folded back onto its input.
    for (b, c, side) in [(2, 640, 64), (2, 1280, 32)] {
        let inputs = [
            ctx.randn(&[b, side * side, c], 0.0, 1.0)?,
            ctx.randn(&[b, c, side, side], 0.0, 1.0)?,
        ];
        let candle = |t: &[Tensor]| super::candle_add_tokens(&t[0], &t[1]);
        let ours = |t: &[Tensor]| cuda::add_tokens(&t[0], &t[1]);
        let fits = cuda::add_tokens_fits(&inputs[0], &inputs[1]);
        let name = format!("tokens {} onto image", shape(&[b, side * side, c]));
        ctx.case(
            Kernel::Residual,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            String::new,
        )?;
    }
    Ok(())
}

fn convolutions(ctx: &mut Ctx) -> Result<()> {
    // (images, c_in, c_out, side, kernel, stride, residual): SSD-1B's heaviest UNet convolutions,
    // a shortcut, a downsampler, conv_in/out, and the VAE decoder's.
    let shapes = [
        (2, 320, 320, 128, 3, 1, true),
        (2, 640, 640, 64, 3, 1, false),
        (2, 1280, 1280, 32, 3, 1, false),
        (2, 2560, 1280, 32, 3, 1, false),
        (2, 960, 320, 128, 3, 1, false),
        (2, 640, 320, 128, 1, 1, false),
        (2, 320, 320, 128, 3, 2, false),
        (2, 4, 320, 128, 3, 1, false),
        (2, 320, 4, 128, 3, 1, false),
        (1, 512, 512, 256, 3, 1, true),
        (1, 256, 256, 512, 3, 1, false),
        (1, 128, 128, 1024, 3, 1, false),
        (1, 128, 3, 1024, 3, 1, false),
    ];
    for (b, c_in, c_out, side, k, stride, residual) in shapes {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        let out_side = side / stride;
        let std = 1.0 / ((c_in * k * k) as f32).sqrt();
        let mut inputs = vec![
            ctx.randn(&[b, c_in, side, side], 0.0, 1.0)?,
            ctx.randn(&[c_out, c_in, k, k], 0.0, std)?,
            ctx.randn(&[c_out], 0.0, 0.1)?,
        ];
        if residual {
            inputs.push(ctx.randn(&[b, c_out, out_side, out_side], 0.0, 1.0)?);
        }
        let candle = |t: &[Tensor]| {
            let y = candle_nn::Module::forward(
                &candle_nn::Conv2d::new(t[1].clone(), Some(t[2].clone()), cfg),
                &t[0],
            )?;
            match t.get(3) {
                Some(r) => r + y,
                None => Ok(y),
            }
        };
        let ours = |t: &[Tensor]| cuda::conv2d(&t[0], &t[1], Some(&t[2]), cfg, t.get(3));
        let fits = cfg!(feature = "cudnn")
            && cuda::conv_fits(
                &inputs[0],
                &inputs[1],
                Some(&inputs[2]),
                &cfg,
                inputs.get(3),
            );
        let name = format!(
            "{} k{k} s{stride} -> {c_out}{}",
            shape(&[b, c_in, side, side]),
            if residual { " +res" } else { "" }
        );
        let dev = ctx.dev.clone();
        let dtype = ctx.dtype;
        let note = move || {
            conv_note(
                &dev,
                (b, c_in, side, side),
                (c_out, c_in, k, k),
                &cfg,
                dtype,
            )
        };
        ctx.case(
            Kernel::Conv,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            note,
        )?;
    }
    Ok(())
}

/// The cached plan's choice for a convolution: algorithm, math, workspace, fused or not.
#[cfg(feature = "cudnn")]
fn conv_note(
    dev: &Device,
    x: (usize, usize, usize, usize),
    w: (usize, usize, usize, usize),
    cfg: &Conv2dConfig,
    dtype: DType,
) -> String {
    let Ok(cuda_dev) = dev.as_cuda_device() else {
        return String::new();
    };
    let key = cuda::conv_key::ConvKey::new(x, w, cfg, dtype);
    cuda::plan_reports(cuda_dev)
        .into_iter()
        .find(|r| Some(r.key) == key)
        .map(|r| {
            let fused = match r.fused {
                Some(true) => "fused",
                Some(false) => "unfused",
                None => "bias untried",
            };
            let ws = r.workspace as f64 / (1 << 20) as f64;
            format!(
                "[{} {} {ws:.0} MiB {} {fused}]",
                r.algo, r.math, r.chosen_by
            )
        })
        .unwrap_or_default()
}

#[cfg(not(feature = "cudnn"))]
fn conv_note(
    _: &Device,
    _: (usize, usize, usize, usize),
    _: (usize, usize, usize, usize),
    _: &Conv2dConfig,
    _: DType,
) -> String {
    "[not built: cudnn feature]".into()
}

fn attentions(ctx: &mut Ctx) -> Result<()> {
    // (images, query tokens, key tokens, heads, head dim): the UNet's self-attention at 64² and
    // 32², its cross-attention to 77 text tokens, and the VAE's one 512-wide head at 128².
    for (b, nq, nk, heads, d) in [
        (2, 4096, 4096, 10, 64),
        (2, 1024, 1024, 20, 64),
        (2, 4096, 77, 10, 64),
        (1, 16384, 16384, 1, 512),
    ] {
        let inputs = [
            ctx.randn(&[b, nq, heads * d], 0.0, 1.0)?,
            ctx.randn(&[b, nk, heads * d], 0.0, 1.0)?,
            ctx.randn(&[b, nk, heads * d], 0.0, 1.0)?,
        ];
        let candle = |t: &[Tensor]| attention::unfused(&t[0], &t[1], &t[2], heads);
        let ours = |t: &[Tensor]| attention::flash(&t[0], &t[1], &t[2], heads);
        let lo: Vec<_> = inputs
            .iter()
            .map(|t| t.to_dtype(ctx.dtype))
            .collect::<Result<_>>()?;
        let fits = cfg!(feature = "flash-attn")
            && attention::flash_fits(&lo[0], &lo[1], &lo[2], heads, false);
        let note = if cfg!(feature = "flash-attn") {
            String::new()
        } else {
            "[not built: flash-attn feature]".into()
        };
        let name = format!("q {} kv {nk} {heads}x{d}", shape(&[b, nq, heads * d]));
        ctx.case(
            Kernel::Attn,
            name,
            &inputs,
            &candle,
            fits.then_some(&ours as Op),
            || note.clone(),
        )?;
    }
    Ok(())
}
