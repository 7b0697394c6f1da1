//! Folding adapters into a component's weights, and the `VarBuilder` its variant is built from.
//!
//! A touched weight becomes `W + Σᵢ sᵢ · scaleᵢ · upᵢ @ downᵢ` (the job's scale `sᵢ`, the file's
//! `alpha / rank`), adapter after adapter in the job's order, as PEFT's `merge` does under diffusers'
//! `fuse_lora`: for a linear layer `B @ A`; for a convolution the same product over the flattened
//! `in × kh × kw` axis, which is what PEFT's `conv2d(A.transpose(0, 1), B)` computes for a `1×1`
//! up. The sum is kept in f32 and rounded to the weight's dtype once (PEFT rounds after each
//! adapter: the same in f32, closer to exact in half precision). Untouched weights are not copied:
//! [`Overlay`] hands the base tensors out again (they share storage), so a variant costs only the
//! merged tensors.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};

use super::format::{Component, ModuleLora};
use super::{AdapterFile, LoraError};

/// A component's tensors by name.
pub(crate) type Weights = Arc<HashMap<String, Tensor>>;

/// The merged weights of `component` for `adapters` (each with the pairs read from its file).
pub(crate) fn merge(
    base: &HashMap<String, Tensor>,
    component: Component,
    adapters: &[(&AdapterFile, Vec<ModuleLora>)],
) -> Result<HashMap<String, Tensor>, LoraError> {
    let mut sums: HashMap<String, Tensor> = HashMap::new();
    for (adapter, pairs) in adapters {
        let fail = |source: candle_core::Error| LoraError::Merge {
            uri: adapter.uri.clone(),
            source,
        };
        for p in pairs.iter().filter(|p| p.component == component) {
            let w = base.get(&p.weight).ok_or_else(|| LoraError::Tensor {
                uri: adapter.uri.clone(),
                tensor: p.key.clone(),
                message: format!("the model has no weight {}", p.weight),
            })?;
            let delta = delta(p, w.dims(), w.device(), adapter.scale * p.scale).map_err(fail)?;
            let sum = match sums.remove(&p.weight) {
                Some(s) => s,
                None => w.to_dtype(DType::F32).map_err(fail)?,
            };
            sums.insert(p.weight.clone(), (sum + delta).map_err(fail)?);
        }
    }
    sums.into_iter()
        .map(|(name, sum)| {
            let dtype = base[&name].dtype();
            sum.to_dtype(dtype)
                .map(|t| (name, t))
                .map_err(|source| LoraError::Merge {
                    uri: adapters
                        .first()
                        .map(|(a, _)| a.uri.clone())
                        .unwrap_or_default(),
                    source,
                })
        })
        .collect()
}

/// `factor · up @ down`, shaped like the weight (`dims`), in f32 on `device`.
fn delta(
    p: &ModuleLora,
    dims: &[usize],
    device: &Device,
    factor: f64,
) -> candle_core::Result<Tensor> {
    let rank = p.down.dim(0)?;
    let down = p.down.to_device(device)?.reshape((rank, ()))?;
    let up = p.up.to_device(device)?.reshape((p.up.dim(0)?, rank))?;
    (up.matmul(&down)? * factor)?.reshape(dims)
}

/// Bytes held by a set of tensors.
pub(crate) fn bytes(tensors: &HashMap<String, Tensor>) -> u64 {
    tensors
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// A component's base tensors with some replaced by merged ones, as a candle backend: re-running a
/// component's constructor over it builds the variant without reading a file.
pub(crate) struct Overlay {
    pub base: Weights,
    pub merged: Weights,
}

impl Overlay {
    fn find(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.merged
            .get(name)
            .or_else(|| self.base.get(name))
            .ok_or_else(|| {
                candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                }
                .bt()
            })
    }
}

impl candle_nn::var_builder::SimpleBackend for Overlay {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.find(name)?;
        if t.dims() != shape.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: t.shape().clone(),
            }
            .bt());
        }
        t.to_dtype(dtype)?.to_device(device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.find(name)?.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.merged.contains_key(name) || self.base.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn adapter(scale: f64) -> AdapterFile {
        AdapterFile {
            path: PathBuf::from("x.safetensors"),
            sha256: String::new(),
            scale,
            uri: "x.safetensors".into(),
        }
    }

    fn pair(weight: &str, down: Tensor, up: Tensor, scale: f64) -> ModuleLora {
        ModuleLora {
            component: Component::Unet,
            weight: weight.into(),
            key: format!("unet.{weight}"),
            down,
            up,
            scale,
        }
    }

    #[test]
    fn a_linear_weight_gets_the_scaled_product_of_each_adapter_in_turn() {
        let base: HashMap<String, Tensor> =
            [("l.weight".to_string(), t(&[1., 0., 0., 1.], &[2, 2]))].into();
        // up (2×1) @ down (1×2) = [[1, 2], [2, 4]].
        let p = pair(
            "l.weight",
            t(&[1., 2.], &[1, 2]),
            t(&[1., 2.], &[2, 1]),
            0.5,
        );
        let q = pair(
            "l.weight",
            t(&[1., 0.], &[1, 2]),
            t(&[0., 1.], &[2, 1]),
            1.0,
        );
        let (a, b) = (adapter(2.0), adapter(-1.0));
        let merged = merge(&base, Component::Unet, &[(&a, vec![p]), (&b, vec![q])]).unwrap();
        // I + 2·0.5·[[1,2],[2,4]] − 1·[[0,0],[1,0]].
        let got = merged["l.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, [2., 2., 1., 5.]);
        // Nothing else is merged, and other components are left alone.
        assert_eq!(merged.len(), 1);
        assert!(
            merge(&base, Component::TextEncoder, &[(&a, vec![])])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_convolution_delta_flattens_the_kernel_as_peft_does() {
        // Base (out 1, in 2, 2×2 kernel) of zeros; down (rank 1, in 2, 2×2), up (1, 1, 1, 1) = 3.
        let base: HashMap<String, Tensor> = [(
            "c.weight".to_string(),
            Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        let down: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        let p = pair(
            "c.weight",
            t(&down, &[1, 2, 2, 2]),
            t(&[3.], &[1, 1, 1, 1]),
            1.0,
        );
        let a = adapter(1.0);
        let merged = merge(&base, Component::Unet, &[(&a, vec![p])]).unwrap();
        let w = &merged["c.weight"];
        assert_eq!(w.dims(), [1, 2, 2, 2]);
        let want: Vec<f32> = down.iter().map(|v| 3.0 * v).collect();
        assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    #[test]
    fn merged_weights_keep_the_base_dtype() {
        let base: HashMap<String, Tensor> = [(
            "l.weight".to_string(),
            t(&[1., 0., 0., 1.], &[2, 2]).to_dtype(DType::BF16).unwrap(),
        )]
        .into();
        let p = pair(
            "l.weight",
            t(&[1., 1.], &[1, 2]),
            t(&[1., 1.], &[2, 1]),
            1.0,
        );
        let a = adapter(0.25);
        let merged = merge(&base, Component::Unet, &[(&a, vec![p])]).unwrap();
        assert_eq!(merged["l.weight"].dtype(), DType::BF16);
        assert_eq!(bytes(&merged), 4 * 2);
    }
}
