//! Where a model's files come from, and which safetensors files hold a component's weights.
//!
//! `--model` is either a local diffusers folder or a Hugging Face repo id. Repo ids resolve through the
//! hub cache exactly as `huggingface_hub` lays it out (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `models--owner--name/{refs,snapshots}`), so a cache filled by Python tools
//! is reused. `HF_HUB_OFFLINE=1` never touches the network; otherwise missing files are downloaded with
//! `hf-hub` (honouring `HF_ENDPOINT` and the cached token, or `HF_TOKEN`). `--revision` pins a branch,
//! tag or commit.
//!
//! Weight selection is pure (`select_weights`) so that the downloader fetches exactly the files the
//! loader will read: a single `{stem}.safetensors`, its `.fp16` variant, or shards listed by
//! `{stem}.safetensors.index.json` (`.index.fp16.json` for the variant), where stem is `model`
//! (transformers) or `diffusion_pytorch_model` (diffusers). This module does not build any network.

mod hub_file;
mod reader;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::DType;

pub(crate) use hub_file::{cached_hub_file, hub_download};
pub use reader::ComponentLoad;
pub(crate) use reader::{LoadStats, Recorded, recording_var_builder, var_builder};

/// The weighted components of an SD or SDXL pipeline, with their weight-file stems; a model uses the
/// ones its `model_index.json` names ([`components_of`]; SD 1.x/2.x have no `text_encoder_2`).
pub(crate) const COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
];

/// Config and tokenizer files a pipeline may read (absent optional ones are fine).
const SMALL_FILES: [&str; 14] = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
];
const SMALL_FILES_2: [&str; 2] = [
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/tokenizer.json",
];

#[derive(Debug, thiserror::Error)]
pub enum ModelSourceError {
    #[error("model `{0}` is neither a local folder nor a Hugging Face repo id (owner/name)")]
    NotFound(String),
    #[error("{}: not a diffusers pipeline folder (no model_index.json)", .0.display())]
    NotAPipeline(PathBuf),
    #[error(
        "model `{repo}` (revision {revision}) is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set",
        cache.display()
    )]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
    },
    #[error("downloading `{file}` of `{repo}` from the Hugging Face hub: {message}")]
    Download {
        repo: String,
        file: String,
        message: String,
    },
    #[error("{}: no safetensors weights (looked for {looked_for}){extra}", dir.display())]
    NoWeights {
        dir: PathBuf,
        looked_for: String,
        extra: String,
    },
    #[error("{}: {message}", path.display())]
    BadIndex { path: PathBuf, message: String },
}

/// Which weight file variant to prefer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// `.fp16` files when computing in f16/bf16 (half the bytes to read), full precision otherwise;
    /// whichever exists when only one does.
    #[default]
    Auto,
    /// Only the default (usually f32) files.
    Default,
    /// Only the `.fp16` files.
    Fp16,
}

impl Variant {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "default" | "fp32" | "none" => Some(Self::Default),
            "fp16" => Some(Self::Fp16),
            _ => None,
        }
    }

    fn prefers_fp16(self, dtype: DType) -> bool {
        match self {
            Self::Auto => matches!(dtype, DType::F16 | DType::BF16),
            Self::Default => false,
            Self::Fp16 => true,
        }
    }
}

/// The weight files chosen for one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WeightSelection {
    Single(String),
    Sharded { index: String },
}

/// Picks a component's weight file(s) from the names present in its folder. Pure, shared by the loader
/// and the downloader.
pub(crate) fn select_weights(
    names: &BTreeSet<String>,
    stem: &str,
    variant: Variant,
    dtype: DType,
) -> Option<WeightSelection> {
    let single = |v: Option<&str>| match v {
        None => format!("{stem}.safetensors"),
        Some(v) => format!("{stem}.{v}.safetensors"),
    };
    let index = |v: Option<&str>| match v {
        None => format!("{stem}.safetensors.index.json"),
        Some(v) => format!("{stem}.safetensors.index.{v}.json"),
    };
    let pick = |v: Option<&str>| {
        if names.contains(&single(v)) {
            Some(WeightSelection::Single(single(v)))
        } else if names.contains(&index(v)) {
            Some(WeightSelection::Sharded { index: index(v) })
        } else {
            None
        }
    };
    match variant {
        Variant::Default => pick(None),
        Variant::Fp16 => pick(Some("fp16")),
        Variant::Auto if variant.prefers_fp16(dtype) => pick(Some("fp16")).or_else(|| pick(None)),
        Variant::Auto => pick(None).or_else(|| pick(Some("fp16"))),
    }
}

/// Shard file names listed in a safetensors index (`weight_map` values), in order, deduplicated.
pub(crate) fn shard_names(index_path: &Path) -> Result<Vec<String>, ModelSourceError> {
    let bad = |message: String| ModelSourceError::BadIndex {
        path: index_path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index_path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("key `weight_map`: missing or not an object".into()))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("key `weight_map.{key}`: expected a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "key `weight_map.{key}`: shard `{file}` is outside the folder"
            )));
        }
        if seen.insert(file.to_string()) {
            out.push(file.to_string());
        }
    }
    Ok(out)
}

fn list_dir(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The safetensors files holding one component's weights in a local folder.
pub(crate) fn weight_files(
    dir: &Path,
    stem: &str,
    variant: Variant,
    dtype: DType,
) -> Result<Vec<PathBuf>, ModelSourceError> {
    let names = list_dir(dir);
    match select_weights(&names, stem, variant, dtype) {
        Some(WeightSelection::Single(name)) => Ok(vec![dir.join(name)]),
        Some(WeightSelection::Sharded { index }) => {
            let shards = shard_names(&dir.join(&index))?;
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            if let Some(missing) = paths.iter().find(|p| !p.exists()) {
                return Err(ModelSourceError::BadIndex {
                    path: dir.join(index),
                    message: format!("lists shard {} which does not exist", missing.display()),
                });
            }
            Ok(paths)
        }
        None => {
            let looked_for = match variant {
                Variant::Fp16 => {
                    format!("{stem}.fp16.safetensors, {stem}.safetensors.index.fp16.json")
                }
                Variant::Default => format!("{stem}.safetensors, {stem}.safetensors.index.json"),
                Variant::Auto => {
                    format!("{stem}[.fp16].safetensors, {stem}.safetensors.index[.fp16].json")
                }
            };
            let extra = if names.iter().any(|n| n.ends_with(".bin")) {
                "; only PyTorch .bin weights are present: convert them to safetensors".to_string()
            } else if !dir.exists() {
                "; the folder does not exist".to_string()
            } else {
                String::new()
            };
            Err(ModelSourceError::NoWeights {
                dir: dir.to_path_buf(),
                looked_for,
                extra,
            })
        }
    }
}

/// Resolves `--model` (folder or repo id) to a local diffusers folder with the needed files present.
pub fn resolve_model(
    spec: &str,
    revision: Option<&str>,
    variant: Variant,
    dtype: DType,
) -> Result<PathBuf, ModelSourceError> {
    let local = Path::new(spec);
    if local.is_dir() {
        if !local.join("model_index.json").is_file() {
            return Err(ModelSourceError::NotAPipeline(local.to_path_buf()));
        }
        return Ok(local.to_path_buf());
    }
    if !is_repo_id(spec) {
        return Err(ModelSourceError::NotFound(spec.to_string()));
    }
    let revision = revision.unwrap_or("main");
    let cache = hub_cache_dir();
    if let Some(snapshot) = cached_snapshot(&cache, spec, revision)
        && snapshot_is_complete(&snapshot, variant, dtype)
    {
        return Ok(snapshot);
    }
    if hub_offline() {
        return Err(ModelSourceError::NotCached {
            repo: spec.to_string(),
            revision: revision.to_string(),
            cache,
        });
    }
    download(spec, revision, variant, dtype, &cache)
}

/// `owner/name`, with the characters the hub allows.
fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn env_truthy(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

pub(crate) fn hub_offline() -> bool {
    env_truthy("HF_HUB_OFFLINE")
}

/// The hub cache directory, with huggingface_hub's precedence.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
        return PathBuf::from(dir);
    }
    hf_hub::Cache::from_env().path().clone()
}

fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// `snapshots/<commit>` for a revision: the commit itself, or what `refs/<revision>` points at.
fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = folder.join("snapshots").join(commit);
    snapshot
        .join("model_index.json")
        .is_file()
        .then_some(snapshot)
}

/// The [`COMPONENTS`] a `model_index.json` names (all of them when it cannot be read: the loader
/// then reports what is wrong with it). The safety checker is never among them: it is not run.
fn components_of(model_index: &Path) -> Vec<(&'static str, &'static str)> {
    let named = std::fs::read_to_string(model_index)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v.as_object().cloned());
    COMPONENTS
        .into_iter()
        .filter(|(component, _)| {
            named
                .as_ref()
                .is_none_or(|m| m.get(*component).is_some_and(|v| !v.is_null()))
        })
        .collect()
}

fn snapshot_is_complete(snapshot: &Path, variant: Variant, dtype: DType) -> bool {
    components_of(&snapshot.join("model_index.json"))
        .iter()
        .all(|(component, stem)| {
            weight_files(&snapshot.join(component), stem, variant, dtype).is_ok()
        })
}

fn download(
    repo: &str,
    revision: &str,
    variant: Variant,
    dtype: DType,
    cache: &Path,
) -> Result<PathBuf, ModelSourceError> {
    use hf_hub::api::sync::ApiBuilder;
    let err = |file: &str, e: &dyn std::fmt::Display| ModelSourceError::Download {
        repo: repo.to_string(),
        file: file.to_string(),
        message: e.to_string(),
    };
    let mut builder =
        ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf())).with_progress(true);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| err("(client)", &e))?;
    let api_repo = api.repo(hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let info = api_repo.info().map_err(|e| err("(repo info)", &e))?;
    let listed: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let fetch = |file: &str| api_repo.get(file).map_err(|e| err(file, &e));

    let index_path = fetch("model_index.json")?;
    for file in SMALL_FILES.iter().chain(SMALL_FILES_2.iter()) {
        if listed.contains(*file) {
            fetch(file)?;
        }
    }
    for (component, stem) in components_of(&index_path) {
        let names: BTreeSet<String> = listed
            .iter()
            .filter_map(|f| f.strip_prefix(&format!("{component}/")).map(str::to_string))
            .collect();
        match select_weights(&names, stem, variant, dtype) {
            Some(WeightSelection::Single(name)) => {
                fetch(&format!("{component}/{name}"))?;
            }
            Some(WeightSelection::Sharded { index }) => {
                let local_index = fetch(&format!("{component}/{index}"))?;
                for shard in shard_names(&local_index)? {
                    fetch(&format!("{component}/{shard}"))?;
                }
            }
            None => {
                return Err(ModelSourceError::NoWeights {
                    dir: PathBuf::from(format!("{repo}/{component}")),
                    looked_for: format!("{stem}[.fp16].safetensors or a sharded index"),
                    extra: " in the hub repo".into(),
                });
            }
        }
    }
    // hf-hub places every file under snapshots/<commit>/; model_index.json sits at its root.
    Ok(index_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn half_precision_prefers_the_fp16_variant_and_full_precision_the_default() {
        let n = names(&["model.safetensors", "model.fp16.safetensors"]);
        assert_eq!(
            select_weights(&n, "model", Variant::Auto, DType::BF16),
            Some(WeightSelection::Single("model.fp16.safetensors".into()))
        );
        assert_eq!(
            select_weights(&n, "model", Variant::Auto, DType::F32),
            Some(WeightSelection::Single("model.safetensors".into()))
        );
    }

    #[test]
    fn only_the_components_model_index_names_are_fetched_and_never_the_safety_checker() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model_index.json");
        // SD v1-5's model_index.json, abridged: one text encoder, a safety checker.
        std::fs::write(
            &index,
            r#"{"_class_name": "StableDiffusionPipeline", "safety_checker": ["stable_diffusion",
            "StableDiffusionSafetyChecker"], "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [null, null]}"#,
        )
        .unwrap();
        let got: Vec<&str> = components_of(&index).iter().map(|(c, _)| *c).collect();
        assert_eq!(got, ["unet", "vae", "text_encoder"]);
        // Unreadable: every component, and the loader reports what is wrong.
        std::fs::write(&index, "not json").unwrap();
        assert_eq!(components_of(&index).len(), COMPONENTS.len());
    }

    #[test]
    fn a_lone_variant_is_used_whatever_the_dtype_unless_default_is_forced() {
        let n = names(&["diffusion_pytorch_model.fp16.safetensors"]);
        assert!(select_weights(&n, "diffusion_pytorch_model", Variant::Auto, DType::F32).is_some());
        assert!(
            select_weights(&n, "diffusion_pytorch_model", Variant::Default, DType::F32).is_none()
        );
    }

    #[test]
    fn sharded_indexes_are_found_for_both_variants() {
        let n = names(&[
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
        ]);
        assert_eq!(
            select_weights(&n, "diffusion_pytorch_model", Variant::Fp16, DType::F32),
            Some(WeightSelection::Sharded {
                index: "diffusion_pytorch_model.safetensors.index.fp16.json".into()
            })
        );
    }

    #[test]
    fn repo_ids_are_owner_slash_name() {
        assert!(is_repo_id("segmind/SSD-1B"));
        assert!(is_repo_id("stabilityai/stable-diffusion-xl-base-1.0"));
        assert!(!is_repo_id("segmind"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
    }

    #[test]
    fn safetensors_files_load_every_tensor_across_shards_and_reject_bad_files() {
        use candle_core::{Shape, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.25], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let c = Tensor::new(&[7u32, 8, 9], &dev).unwrap();
        let (one, two) = (
            dir.path().join("one.safetensors"),
            dir.path().join("two.safetensors"),
        );
        candle_core::safetensors::save(&[("a", a.clone()), ("b", b.clone())].into(), &one).unwrap();
        candle_core::safetensors::save(&[("c", c.clone())].into(), &two).unwrap();

        let (vb, stats) =
            var_builder(&[one.clone(), two.clone()], DType::F32, &dev, "test").unwrap();
        let got = vb.get((3, 4), "a").unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        // Stored bf16, converted to the builder's dtype.
        let got = vb.get(2, "b").unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.to_vec1::<f32>().unwrap(), [1.5, -2.25]);
        let got = vb.get_unchecked_dtype("c", DType::U32).unwrap();
        assert_eq!(got.to_vec1::<u32>().unwrap(), [7, 8, 9]);
        assert!(vb.contains_tensor("c") && !vb.contains_tensor("d"));
        let err = vb.get((4, 3), "a").unwrap_err().to_string();
        assert!(err.contains("shape mismatch for a"), "{err}");
        assert!(vb.get(Shape::from(1), "d").is_err());
        // Three tensors read (the mismatched and the missing ones are refused before reading):
        // 12 f32, 2 bf16 and 3 u32 values.
        let stats = stats.lock().unwrap().clone();
        assert_eq!((stats.component, stats.tensors), ("test", 3));
        assert_eq!(stats.bytes, 12 * 4 + 2 * 2 + 3 * 4);

        // A truncated download and a file that is not safetensors at all.
        let bytes = std::fs::read(&one).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        let err = var_builder(&[cut], DType::F32, &dev, "test")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
        let err = var_builder(&[junk], DType::F32, &dev, "test")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("exceeds the file"), "{err}");
    }
}
