//! `--device` and `--dtype` values → candle devices and dtypes.
//!
//! `cpu` always works; `cuda[:N]` needs the `cuda` cargo feature and a driver, `metal[:N]` the `metal`
//! feature on macOS. A device the binary was not built for is a clear error, not a panic. Probing
//! (`Device::new_cuda`) is the only reliable check: candle reports CUDA as "available" whenever the
//! feature is compiled in.

use candle_core::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}` (expected cpu, cuda, cuda:N, metal or metal:N)")]
    Unknown(String),
    #[error("device `{0}`: this binary was built without the `{1}` cargo feature")]
    NotBuilt(String, &'static str),
    #[error("device `{0}`: {1}")]
    Unavailable(String, candle_core::Error),
    #[error("unknown dtype `{0}` (expected f32, f16 or bf16)")]
    UnknownDType(String),
}

/// Parses and opens a device.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    let (kind, index) = match s.split_once(':') {
        Some((k, i)) => (
            k.to_string(),
            i.parse::<usize>()
                .map_err(|_| DeviceError::Unknown(spec.into()))?,
        ),
        None => (s.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !cfg!(feature = "cuda") {
                return Err(DeviceError::NotBuilt(spec.into(), "cuda"));
            }
            Device::new_cuda(index).map_err(|e| DeviceError::Unavailable(spec.into(), e))
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(DeviceError::NotBuilt(spec.into(), "metal"));
            }
            Device::new_metal(index).map_err(|e| DeviceError::Unavailable(spec.into(), e))
        }
        _ => Err(DeviceError::Unknown(spec.into())),
    }
}

pub fn parse_dtype(spec: &str) -> Result<DType, DeviceError> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(DeviceError::UnknownDType(spec.into())),
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// Used memory of the CUDA device (the whole device, as `nvidia-smi` shows it); `None` on other
/// devices, which have no such query. Shared by `t2i bench` and the worker's
/// `t2i_device_memory_bytes`.
#[cfg(feature = "cuda")]
pub fn memory_used(device: &Device) -> Option<u64> {
    let dev = device.as_cuda_device().ok()?;
    let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as u64)
}

#[cfg(not(feature = "cuda"))]
pub fn memory_used(_: &Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_dtypes_parse() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("int8").is_err());
        assert!(matches!(parse_device("tpu"), Err(DeviceError::Unknown(_))));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let e = parse_device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("`cuda` cargo feature"), "{e}");
    }
}
