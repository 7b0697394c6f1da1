//! LoRA adapters on the device side: a render's adapters (local files, already fetched by the caller)
//! become a *variant* of the model, the UNet and text encoders they change rebuilt over merged
//! weights; the VAE and every untouched component stay the base model's.
//!
//! The base weights are never changed and never read again: while the pipeline loads, the UNet's and
//! the text encoders' builders record every tensor they hand out (`weights::Recorded`; the record
//! shares storage with the model). A variant re-runs a component's constructor over an [`merge::Overlay`]
//! of those tensors, the merged ones in place of the weights the adapters touch, so switching
//! adapters costs the merge and the merged tensors' memory, never a load from disk. Variants are
//! cached by (each adapter's content hash, its scale) within a byte budget ([`cache::Lru`]).
//!
//! Reading a file: [`format`] (which family), [`peft`] (diffusers/PEFT keys, adapter metadata),
//! [`kohya`] (kohya keys, SGM block names); folding: [`merge`]. A file that does not fit the model
//! (a module it lacks, a shape mismatch, a rank that does not pair) fails the render with
//! [`LoraError`] naming the tensor; nothing is cached then, and the base model is untouched.

mod cache;
mod format;
mod kohya;
mod merge;
mod peft;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::Digest;

pub use format::Component;
use format::{ComponentTargets, ModuleLora, Targets};
use merge::{Overlay, Weights};

use super::clip::{ClipOutput, ClipTextEncoder};
use super::config::{ClipConfig, UNetConfig};
use super::prompt::{TextEncoders, TextPlan};
use super::unet::UNet;
use super::weights::{LoadStats, Recorded, recording_var_builder, var_builder};

/// Bytes of merged variants kept in memory unless the caller sets another budget
/// ([`super::Pipeline::set_lora_memory_budget`]): room for one SSD-1B UNet variant with every
/// attention and feed-forward weight merged in f32, or a few in half precision.
pub const DEFAULT_MEMORY_BUDGET: u64 = 4 << 30;

/// One adapter of a render: a local safetensors file and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFile {
    pub path: PathBuf,
    /// SHA-256 of the file (hex): its identity in the variant cache, checked when the file is read.
    pub sha256: String,
    /// The job's scale.
    pub scale: f64,
    /// The URI the job named, for messages.
    pub uri: String,
}

impl AdapterFile {
    /// A local file, hashed now.
    pub fn local(path: impl Into<PathBuf>, scale: f64) -> std::io::Result<Self> {
        let path = path.into();
        let sha256 = hex::encode(sha2::Sha256::digest(std::fs::read(&path)?));
        Ok(Self {
            uri: path.display().to_string(),
            path,
            sha256,
            scale,
        })
    }
}

/// Why an adapter could not be applied: the job's adapters are wrong for this model (or unreadable),
/// not the device.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA {uri}: {message}")]
    File { uri: String, message: String },
    #[error("LoRA {uri}: tensor `{tensor}`: {message}")]
    Tensor {
        uri: String,
        tensor: String,
        message: String,
    },
    #[error("merging LoRA {uri}: {source}")]
    Merge {
        uri: String,
        source: candle_core::Error,
    },
}

/// The model with a set of adapters merged: the components they change, rebuilt.
pub struct Adapted {
    unet: Option<UNet>,
    text: Option<TextEncoders>,
    merged: HashMap<Component, Weights>,
    bytes: u64,
}

impl Adapted {
    /// A merged weight, by component and name (`None` when the adapters do not touch it).
    pub fn merged_weight(&self, component: Component, name: &str) -> Option<&Tensor> {
        self.merged.get(&component)?.get(name)
    }

    /// Memory held by the merged weights.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn unet(&self) -> Option<&UNet> {
        self.unet.as_ref()
    }

    pub(crate) fn text(&self) -> Option<&TextEncoders> {
        self.text.as_ref()
    }
}

/// The LoRA side of a pipeline (the rest is in `pipeline/mod.rs`).
impl super::Pipeline {
    /// The model with `loras` merged (cached; merged now when new), or `None` for no adapters.
    pub fn adapted(
        &self,
        loras: &[AdapterFile],
    ) -> Result<Option<Arc<Adapted>>, super::PipelineError> {
        if loras.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.adapters.variant(loras, &self.text)?))
    }

    /// How many LoRA variants this pipeline has merged (cache misses).
    pub fn lora_merges(&self) -> usize {
        self.adapters.merges()
    }

    /// Bytes of merged LoRA variants kept in memory ([`DEFAULT_MEMORY_BUDGET`] unless set);
    /// the most recently used one is kept whatever its size.
    pub fn set_lora_memory_budget(&self, bytes: u64) {
        self.adapters.set_budget(bytes);
    }
}

/// While a pipeline loads: records the tensors of the components adapters may change.
pub(crate) struct Recorder(HashMap<Component, Recorded>);

impl Recorder {
    pub(crate) fn new() -> Self {
        Self(
            Component::ALL
                .into_iter()
                .map(|c| (c, Recorded::default()))
                .collect(),
        )
    }

    /// `files` as a `VarBuilder` for `component`, recording what it hands out when adapters may
    /// change that component (`weights::var_builder` otherwise).
    pub(crate) fn var_builder(
        &self,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        component: &'static str,
    ) -> candle_core::Result<(VarBuilder<'static>, LoadStats)> {
        match Component::parse(component).and_then(|c| self.0.get(&c)) {
            Some(r) => recording_var_builder(files, dtype, device, component, r.clone()),
            None => var_builder(files, dtype, device, component),
        }
    }

    /// What was recorded, with what rebuilding the components takes, as the pipeline's [`Adapters`].
    pub(crate) fn into_adapters(
        self,
        unet_config: UNetConfig,
        text: &TextPlan,
        dtype: DType,
        device: &Device,
    ) -> Adapters {
        let text_specs = text
            .components()
            .iter()
            .enumerate()
            .filter_map(|(i, (folder, _))| {
                let (config, output) = text.encoder_spec(i);
                Component::parse(folder).map(|c| (c, config, output))
            })
            .collect();
        let base = self
            .0
            .into_iter()
            .map(|(c, r)| (c, std::mem::take(&mut *lock(&r))))
            .filter(|(_, tensors)| !tensors.is_empty())
            .collect();
        Adapters::new(base, unet_config, text_specs, dtype, device.clone())
    }
}

/// A variant's cache key: each adapter's content and scale, in order.
type Key = Vec<(String, u64)>;

/// What a pipeline keeps to build variants: the recorded base tensors, the constructors' configs,
/// and the cache.
pub(crate) struct Adapters {
    base: HashMap<Component, Weights>,
    targets: Targets,
    unet_config: UNetConfig,
    /// The text encoders in pipeline order.
    text_specs: Vec<(Component, ClipConfig, ClipOutput)>,
    dtype: DType,
    device: Device,
    cache: Mutex<cache::Lru<Key, Adapted>>,
    /// Variants built so far (each one a merge).
    merges: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Adapters {
    fn new(
        base: HashMap<Component, HashMap<String, Tensor>>,
        unet_config: UNetConfig,
        text_specs: Vec<(Component, ClipConfig, ClipOutput)>,
        dtype: DType,
        device: Device,
    ) -> Self {
        let components = base
            .iter()
            .map(|(c, tensors)| {
                let shapes = tensors
                    .iter()
                    .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                    .collect();
                (*c, ComponentTargets::new(shapes, *c != Component::Unet))
            })
            .collect();
        let targets = Targets {
            components,
            layers_per_block: unet_config.layers_per_block,
        };
        Self {
            base: base.into_iter().map(|(c, t)| (c, Arc::new(t))).collect(),
            targets,
            unet_config,
            text_specs,
            dtype,
            device,
            cache: Mutex::new(cache::Lru::new(DEFAULT_MEMORY_BUDGET)),
            merges: AtomicUsize::new(0),
        }
    }

    pub(crate) fn set_budget(&self, bytes: u64) {
        lock(&self.cache).set_budget(bytes);
    }

    pub(crate) fn merges(&self) -> usize {
        self.merges.load(Ordering::Relaxed)
    }

    /// The variant for `adapters` (from the cache, or merged now); `text` is the base model's text
    /// side, whose tokenizers a variant shares.
    pub(crate) fn variant(
        &self,
        adapters: &[AdapterFile],
        text: &TextEncoders,
    ) -> Result<Arc<Adapted>, LoraError> {
        let key: Key = adapters
            .iter()
            .map(|a| (a.sha256.clone(), a.scale.to_bits()))
            .collect();
        if let Some(hit) = lock(&self.cache).get(&key) {
            return Ok(hit);
        }
        let variant = Arc::new(self.build(adapters, text)?);
        self.merges.fetch_add(1, Ordering::Relaxed);
        lock(&self.cache).insert(key, variant.clone(), variant.bytes);
        Ok(variant)
    }

    fn build(&self, adapters: &[AdapterFile], text: &TextEncoders) -> Result<Adapted, LoraError> {
        let mut read = Vec::with_capacity(adapters.len());
        for a in adapters {
            let pairs: Vec<ModuleLora> = format::read(a, &self.targets)?;
            tracing::debug!(uri = %a.uri, modules = pairs.len(), "LoRA read");
            read.push((a, pairs));
        }
        let touched: BTreeSet<Component> = read
            .iter()
            .flat_map(|(_, pairs)| pairs.iter().map(|p| p.component))
            .collect();
        let mut merged = HashMap::new();
        for &c in &touched {
            let base = &self.base[&c];
            merged.insert(c, Arc::new(merge::merge(base, c, &read)?));
        }
        let first_uri = adapters.first().map(|a| a.uri.clone()).unwrap_or_default();
        let fail = |source| LoraError::Merge {
            uri: first_uri.clone(),
            source,
        };
        let overlay = |c: Component| {
            let backend = Overlay {
                base: self.base[&c].clone(),
                merged: merged.get(&c).cloned().unwrap_or_default(),
            };
            VarBuilder::from_backend(Box::new(backend), self.dtype, self.device.clone())
        };
        let unet = touched
            .contains(&Component::Unet)
            .then(|| UNet::load(overlay(Component::Unet), &self.unet_config))
            .transpose()
            .map_err(fail)?;
        let text = if self.text_specs.iter().any(|(c, _, _)| touched.contains(c)) {
            // Every encoder is rebuilt (an untouched one from the base tensors alone: no copies),
            // so the variant's text side is whole.
            let encoders = self
                .text_specs
                .iter()
                .map(|(c, config, output)| ClipTextEncoder::load(overlay(*c), config, *output))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(fail)?;
            Some(text.with_encoders(encoders))
        } else {
            None
        };
        let bytes = merged.values().map(|m| merge::bytes(m)).sum();
        Ok(Adapted {
            unet,
            text,
            merged,
            bytes,
        })
    }
}
