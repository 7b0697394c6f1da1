//! Compiles the ops layer's CUDA kernels (`src/pipeline/ops/cuda/kernels/*.cu`) to PTX when the
//! `cuda` feature is on, and does nothing otherwise. The PTX goes to `OUT_DIR/<name>.ptx`, where
//! `src/pipeline/ops/cuda/launch.rs` embeds it; candle loads it at run time.
//!
//! * nvcc: `$NVCC`, else `nvcc` on `PATH` (scripts/build-cuda.sh puts the PyPI wheel's there; the
//!   CUDA development images have it).
//! * Target: `compute_$CUDA_COMPUTE_CAP` (`80` or `8.0` both mean 8.0), the variable candle's own
//!   kernel build reads; 80 when unset (PTX for 8.0 is compiled for any newer GPU at load).
//! * Flags: `kernels/nvcc.flags`, the ones scripts/test.sh compiles the kernels with in CI.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &str = "src/pipeline/ops/cuda/kernels";

fn main() {
    println!("cargo::rerun-if-changed={KERNELS}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    assert!(
        !cap.is_empty(),
        "CUDA_COMPUTE_CAP must be a compute capability such as 80 or 90"
    );
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let flags = std::fs::read_to_string(Path::new(KERNELS).join("nvcc.flags"))
        .expect("read the nvcc flags");
    let mut sources: Vec<_> = std::fs::read_dir(KERNELS)
        .expect("read the kernel folder")
        .map(|e| e.expect("list the kernel folder").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src.file_stem().expect("a .cu file has a stem");
        let ptx = out.join(stem).with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(flags.split_whitespace())
            .arg(format!("-arch=compute_{cap}"))
            .arg("--ptx")
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (set NVCC or put nvcc on PATH): {e}"));
        assert!(status.success(), "{nvcc} failed on {}", src.display());
    }
}
