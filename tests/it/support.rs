//! Fixture paths, reference loading and tensor comparison shared by the integration tests.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use t2i_worker::pipeline::{LoadOptions, Pipeline, Variant};

pub const MODELS: [&str; 3] = ["ssd-1b-tiny", "sdxl-tiny", "vega-tiny"];

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let dir = fixtures().join("reference");
        let tensors =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap_or_else(|e| panic!("loading reference tensors for {name}: {e}"));
        let meta = std::fs::read_to_string(dir.join(format!("{name}.json")))
            .map(|s| serde_json::from_str(&s).expect("reference JSON"))
            .unwrap_or(serde_json::Value::Null);
        Self { tensors, meta }
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference tensor `{key}` missing"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
}

pub fn load_pipeline(name: &str, dtype: DType, variant: Variant) -> Pipeline {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        variant,
    };
    Pipeline::load(&model_dir(name), &opts).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// Largest absolute difference between two tensors of the same shape (compared in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Asserts `got ≈ want` within `tol` relative to the reference's magnitude (at least 1).
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let diff = max_abs_diff(got, want);
    let scale = max_abs(want).max(1.0);
    assert!(
        diff <= tol * scale,
        "{what}: max |diff| {diff:.3e} exceeds {tol:.0e} × {scale:.3}"
    );
}
