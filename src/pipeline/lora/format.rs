//! A LoRA safetensors file → the low-rank pairs it holds, each named by the model weight it changes.
//!
//! Two families of files exist (docs/model-notes.md §9):
//! * diffusers/PEFT (`unet.<module>.lora_A.weight`, `text_encoder.…`, `text_encoder_2.…`, and the
//!   older diffusers spellings): [`super::peft`];
//! * kohya (`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
//!   `lora_te_`, `lora_te1_`, `lora_te2_`): [`super::kohya`], which maps underscored names back to
//!   modules through the model's own weight names ([`Targets`]).
//!
//! diffusers' rule decides which: a file is kohya when every key starts with a kohya prefix
//! (`StableDiffusionXLLoraLoaderMixin.lora_state_dict`). Each pair is checked against the weight it
//! changes (rank pairing, output and input sizes, kernel); anything this module cannot apply
//! exactly (DoRA, LoHa, LoKr, Tucker "mid" weights, LoRA biases) is refused naming the tensor,
//! never skipped.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sha2::Digest;

use super::{AdapterFile, LoraError};

/// The parts of a pipeline an adapter may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 3] = [Self::Unet, Self::TextEncoder, Self::TextEncoder2];

    /// The component's folder in a diffusers pipeline, also the key prefix of diffusers' LoRA files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// One low-rank pair: `weight += scale · up @ down` (times the job's scale), on the model weight
/// `weight` of `component`.
#[derive(Debug, Clone)]
pub(crate) struct ModuleLora {
    pub component: Component,
    /// The model's weight, as its safetensors names it (`down_blocks.1.attentions.0.proj_in.weight`).
    pub weight: String,
    /// The file's key of the down (A) matrix, for messages.
    pub key: String,
    /// `(rank, in)` or `(rank, in, kh, kw)`, f32 on the CPU.
    pub down: Tensor,
    /// `(out, rank)` or `(out, rank, 1, 1)`, f32 on the CPU.
    pub up: Tensor,
    /// `alpha / rank` (`alpha / sqrt(rank)` for rsLoRA): PEFT's `scaling` before any adapter weight.
    pub scale: f64,
}

/// The weights of one component an adapter may target: their shapes, and the underscored spelling of
/// each module kohya files use.
#[derive(Debug, Default)]
pub(crate) struct ComponentTargets {
    /// Weight name → shape, for every tensor the component was built from.
    pub shapes: HashMap<String, Vec<usize>>,
    /// `module.path` with `.` → `_` → the weight name; `None` when two modules spell the same.
    underscored: HashMap<String, Option<String>>,
}

impl ComponentTargets {
    pub(crate) fn new(shapes: HashMap<String, Vec<usize>>, text_encoder: bool) -> Self {
        let mut underscored: HashMap<String, Option<String>> = HashMap::new();
        for name in shapes.keys() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let mut spellings = vec![module.replace('.', "_")];
            // A text encoder's weights may or may not carry transformers' `text_model.` prefix
            // (`clip.rs`); kohya and diffusers files may spell it either way.
            if text_encoder {
                match module.strip_prefix("text_model.") {
                    Some(inner) => spellings.push(inner.replace('.', "_")),
                    None => spellings.push(format!("text_model_{}", module.replace('.', "_"))),
                }
            }
            for s in spellings {
                underscored
                    .entry(s)
                    .and_modify(|w| {
                        if w.as_deref() != Some(name) {
                            *w = None;
                        }
                    })
                    .or_insert_with(|| Some(name.clone()));
            }
        }
        Self {
            shapes,
            underscored,
        }
    }

    /// The weight of a dotted module path (`down_blocks.0.resnets.0.conv1`), trying a text
    /// encoder's `text_model.` prefix both ways.
    pub(crate) fn dotted(&self, module: &str) -> Option<String> {
        let direct = format!("{module}.weight");
        if self.shapes.contains_key(&direct) {
            return Some(direct);
        }
        let other = match module.strip_prefix("text_model.") {
            Some(inner) => format!("{inner}.weight"),
            None => format!("text_model.{module}.weight"),
        };
        self.shapes.contains_key(&other).then_some(other)
    }

    /// The weight of an underscored module name; `Err` when it is ambiguous.
    pub(crate) fn underscored(&self, module: &str) -> Result<Option<String>, ()> {
        match self.underscored.get(module) {
            None => Ok(None),
            Some(Some(w)) => Ok(Some(w.clone())),
            Some(None) => Err(()),
        }
    }
}

/// What adapters may target in a loaded model.
#[derive(Debug, Default)]
pub(crate) struct Targets {
    pub components: HashMap<Component, ComponentTargets>,
    /// The UNet's `layers_per_block`, for kohya's SGM block numbering ([`super::kohya`]).
    pub layers_per_block: usize,
}

/// A file read into memory: its tensors (as stored) and its header metadata.
pub(crate) struct RawFile {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: HashMap<String, String>,
}

impl RawFile {
    pub(crate) fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }
}

/// Reads `adapter`'s file, checks it is the content the caller hashed, and returns its pairs.
pub(crate) fn read(adapter: &AdapterFile, targets: &Targets) -> Result<Vec<ModuleLora>, LoraError> {
    let raw = read_raw(&adapter.path, &adapter.sha256, &adapter.uri)?;
    parse(&raw, targets, &adapter.uri)
}

/// The file's tensors (as f32 on the CPU) and metadata; its SHA-256 must be `sha256`.
pub(crate) fn read_raw(path: &Path, sha256: &str, uri: &str) -> Result<RawFile, LoraError> {
    let file_err = |message: String| LoraError::File {
        uri: uri.to_string(),
        message,
    };
    let bytes =
        std::fs::read(path).map_err(|e| file_err(format!("reading {}: {e}", path.display())))?;
    // The variant cache is keyed by this hash: the file must still be what was fetched.
    let actual = hex::encode(sha2::Sha256::digest(&bytes));
    if !sha256.is_empty() && actual != sha256 {
        return Err(file_err(format!(
            "{} changed since it was fetched (sha256 {actual}, expected {sha256})",
            path.display()
        )));
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(format!("not a safetensors file: {e}")))?;
    let mut tensors = Vec::new();
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st
            .tensor(name)
            .map_err(|e| file_err(format!("tensor {name}: {e}")))?;
        let tensor_err = |message: String| LoraError::Tensor {
            uri: uri.to_string(),
            tensor: name.to_string(),
            message,
        };
        let dtype = DType::try_from(view.dtype()).map_err(|e| tensor_err(e.to_string()))?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(tensor_err(format!(
                "dtype {dtype:?}: expected a float type"
            )));
        }
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| tensor_err(e.to_string()))?;
        tensors.push((name.to_string(), t));
    }
    Ok(RawFile {
        tensors,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

/// Key prefixes of kohya files (diffusers' `lora_state_dict` test).
pub(crate) const KOHYA_PREFIXES: [&str; 4] = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];

/// The pairs of a file already read.
pub(crate) fn parse(
    raw: &RawFile,
    targets: &Targets,
    uri: &str,
) -> Result<Vec<ModuleLora>, LoraError> {
    if raw.tensors.is_empty() {
        return Err(LoraError::File {
            uri: uri.to_string(),
            message: "holds no tensors".into(),
        });
    }
    for (key, _) in &raw.tensors {
        if let Some(what) = unsupported(key) {
            return Err(LoraError::Tensor {
                uri: uri.to_string(),
                tensor: key.clone(),
                message: format!("{what} adapters are not supported (only LoRA / LoCon)"),
            });
        }
    }
    let kohya = raw
        .tensors
        .iter()
        .all(|(k, _)| KOHYA_PREFIXES.iter().any(|p| k.starts_with(p)));
    let pairs = if kohya {
        super::kohya::parse(raw, targets, uri)?
    } else {
        super::peft::parse(raw, targets, uri)?
    };
    for p in &pairs {
        check_fit(p, targets, uri)?;
    }
    Ok(pairs)
}

/// Adapter kinds recognised by their keys that this module does not apply.
fn unsupported(key: &str) -> Option<&'static str> {
    const KINDS: [(&str, &str); 9] = [
        ("dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        ("hada_", "LoHa"),
        ("lokr_", "LoKr"),
        (".lora_mid.", "LoCon with Tucker decomposition (lora_mid)"),
        ("oft_", "OFT"),
        (".diff", "full-weight difference"),
        ("lora_B.bias", "LoRA-with-bias"),
        (".on_input", "IA3"),
    ];
    KINDS
        .iter()
        .find(|(pattern, _)| key.contains(pattern))
        .map(|(_, kind)| *kind)
}

/// The pair's ranks agree and `up @ down` has the shape of the weight it changes: the same output
/// size, and the input size (times the kernel, for a convolution) flattened alike.
fn check_fit(p: &ModuleLora, targets: &Targets, uri: &str) -> Result<(), LoraError> {
    let err = |message: String| LoraError::Tensor {
        uri: uri.to_string(),
        tensor: p.key.clone(),
        message,
    };
    let base = targets
        .components
        .get(&p.component)
        .and_then(|c| c.shapes.get(&p.weight))
        .ok_or_else(|| err(format!("the model has no weight {}", p.weight)))?;
    let (down, up) = (p.down.dims(), p.up.dims());
    let rank_ok = match (down.len(), up.len()) {
        (2 | 4, 2) => down[0] == up[1],
        (2 | 4, 4) => down[0] == up[1] && up[2..] == [1, 1],
        _ => false,
    };
    if !rank_ok {
        return Err(err(format!(
            "down {down:?} and up {up:?} are not a LoRA pair (down (rank, in[, kh, kw]), up (out, rank[, 1, 1]))"
        )));
    }
    let in_flat: usize = down[1..].iter().product();
    let base_in: usize = base[1..].iter().product();
    let kernel_ok = match (down.len(), base.len()) {
        (4, 4) => down[2..] == base[2..],
        (4, 2) => down[2..] == [1, 1],
        (2, 4) => base[2..] == [1, 1],
        _ => true,
    };
    if up[0] != base[0] || in_flat != base_in || !kernel_ok {
        return Err(err(format!(
            "up {up:?} · down {down:?} does not fit {} of shape {base:?} in the {} (a LoRA for another model?)",
            p.weight,
            p.component.name()
        )));
    }
    Ok(())
}

/// A scalar tensor's value (`alpha`), whatever its shape (`[]` or `[1]`).
pub(crate) fn scalar(t: &Tensor) -> Option<f64> {
    (t.elem_count() == 1)
        .then(|| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok())
        .flatten()
        .map(|v| v[0] as f64)
}
