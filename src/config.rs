//! Flags → validated configuration, once, at start-up (ripgrep's `hiargs.rs` pattern). Nothing below
//! this module reads flags or environment variables of ours.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::cli::{ModelArgs, UsageError};
use crate::device::{dtype_name, parse_device, parse_dtype};
use crate::job::{Limits, ModelSlug};
use crate::pipeline::ops::switch::{self, Kernels};
use crate::pipeline::{LoadOptions, ModelSourceError, Pipeline, PipelineError, Variant};
use crate::queue::{Lane, Topology};

/// Everything `t2i worker` needs, validated once from flags.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    pub storage: String,
    pub s3: crate::storage::S3Options,
    /// The served models (`--models`, or `--model` alone); the first renders the jobs that name
    /// none (the default pool's).
    pub models: Vec<ModelConfig>,
    /// Most bytes the served models' loaded weights may hold together (`--memory-budget`).
    pub memory_budget: Option<u64>,
    pub limits: Limits,
    /// Most images per device batch.
    pub max_batch: u32,
    /// How long a partial batch waits for company.
    pub batch_window: Duration,
    /// Job queues consumed, interactive first when both.
    pub lanes: Vec<Lane>,
    /// The served models' pools, in `models` order: their queues are declared and consumed on
    /// every lane.
    pub pools: Vec<ModelSlug>,
    /// Whether the default pool's queues (jobs naming no model) are consumed too.
    pub default_pool: bool,
    /// Unacked deliveries per lane.
    pub prefetch: u16,
    pub worker_id: String,
    /// The CloudEvents `source` of every event: the deployment's, not this worker's.
    pub event_source: String,
    pub http_addr: Option<SocketAddr>,
    /// A batch running longer than this fails its jobs with `timeout`.
    pub job_timeout: Duration,
    /// After SIGTERM, how long in-flight uploads and events may take.
    pub grace_period: Duration,
    /// Minimum time between two `job.progress` events of a job.
    pub progress_interval: Duration,
    /// Where jobs' LoRA adapters may come from.
    pub lora: crate::adapters::LoraSettings,
    /// Bytes of merged LoRA variants the pipeline keeps.
    pub lora_memory_bytes: u64,
}

/// Which model to load, where, and how.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// As given: a repo id or a folder (also the `Model:` name in image metadata).
    pub spec: String,
    pub revision: Option<String>,
    pub variant: Variant,
    pub device: Device,
    pub device_name: String,
    pub dtype: DType,
    /// The ops layer's CUDA kernels switched on (`--cuda-kernels`), set for the process when the
    /// model loads.
    pub cuda_kernels: Kernels,
}

impl ModelConfig {
    pub fn from_args(args: &ModelArgs) -> Result<Self, UsageError> {
        let usage = |e: &dyn std::fmt::Display| UsageError(e.to_string());
        let device = parse_device(&args.device).map_err(|e| usage(&e))?;
        let dtype = if args.dtype.eq_ignore_ascii_case("auto") {
            // bf16 on CUDA: f16 overflows in SDXL-family UNets more often and bf16 is as fast on
            // Ampere and newer. Metal: f16. CPU: f32 (half types are emulated and slower there).
            match &device {
                Device::Cuda(_) => DType::BF16,
                Device::Metal(_) => DType::F16,
                Device::Cpu => DType::F32,
            }
        } else {
            parse_dtype(&args.dtype).map_err(|e| usage(&e))?
        };
        let variant = Variant::parse(&args.variant).ok_or_else(|| {
            UsageError(format!(
                "unknown --variant `{}` (expected auto, default or fp16)",
                args.variant
            ))
        })?;
        let cuda_kernels = Kernels::parse(&args.cuda_kernels).map_err(|e| usage(&e))?;
        Ok(Self {
            spec: args.model.clone(),
            revision: args.revision.clone(),
            variant,
            device,
            device_name: args.device.clone(),
            dtype,
            cuda_kernels,
        })
    }

    /// A short model name for metadata: the last path segment (`segmind/SSD-1B` → `SSD-1B`).
    pub fn display_name(&self) -> String {
        crate::image::model_display_name(&self.spec).to_string()
    }

    pub fn dtype_name(&self) -> &'static str {
        dtype_name(self.dtype)
    }

    /// Resolves (downloading if needed) and loads the pipeline.
    pub fn load(&self) -> Result<LoadedModel, LoadError> {
        switch::set(self.cuda_kernels);
        if self.cuda_kernels != Kernels::NONE {
            tracing::info!(kernels = %self.cuda_kernels.names(), "experimental CUDA kernels on");
        }
        let start = Instant::now();
        let root = crate::pipeline::weights::resolve_model(
            &self.spec,
            self.revision.as_deref(),
            self.variant,
            self.dtype,
        )?;
        let resolved = start.elapsed();
        let pipeline = Pipeline::load(
            &root,
            &LoadOptions {
                device: self.device.clone(),
                dtype: self.dtype,
                variant: self.variant,
            },
        )
        .map_err(|e| LoadError::Pipeline(Box::new(e)))?;
        Ok(LoadedModel {
            pipeline,
            root,
            resolve_time: resolved,
            load_time: start.elapsed() - resolved,
        })
    }
}

pub struct LoadedModel {
    pub pipeline: Pipeline,
    pub root: PathBuf,
    pub resolve_time: Duration,
    pub load_time: Duration,
}

/// Loading failed: either the user's model is wrong/unsupported ([`LoadError::is_usage`]) or something
/// broke (download, I/O).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Source(#[from] ModelSourceError),
    #[error(transparent)]
    Pipeline(Box<PipelineError>),
}

impl LoadError {
    /// A model that is missing, incomplete or not supported: the user's to fix (exit code 2).
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Source(ModelSourceError::Download { .. }) => false,
            Self::Source(_) => true,
            Self::Pipeline(e) => match e.as_ref() {
                PipelineError::Source(ModelSourceError::Download { .. }) => false,
                PipelineError::Config(_)
                | PipelineError::Source(_)
                | PipelineError::Tokenizer(_)
                | PipelineError::LoadWeights { .. } => true,
                _ => false,
            },
        }
    }
}

/// Broker flags → topology.
pub fn topology(args: &crate::cli::BrokerArgs) -> Result<Topology, UsageError> {
    if args.amqp_prefix.is_empty() || args.amqp_prefix.len() > 100 {
        return Err(UsageError(
            "--amqp-prefix must be 1 to 100 characters".into(),
        ));
    }
    if args.retry_delays.is_empty() || args.retry_delays.iter().any(|d| !d.is_finite() || *d < 0.0)
    {
        return Err(UsageError(
            "--retry-delays must be non-negative seconds, e.g. 1,4,16".into(),
        ));
    }
    Ok(Topology {
        prefix: args.amqp_prefix.clone(),
        delivery_limit: args.delivery_limit.max(1),
        retry_delays: args
            .retry_delays
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect(),
    })
}

/// `t2i worker` flags → `WorkerConfig`.
pub fn worker_config(args: &crate::cli::WorkerArgs) -> Result<WorkerConfig, UsageError> {
    if args.max_batch == 0 {
        return Err(UsageError("--max-batch must be at least 1".into()));
    }
    let limits = args.limits.limits();
    let worker_id = args.worker_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let mut lanes = Vec::new();
    for name in &args.lanes {
        let lane = Lane::parse(name).map_err(|e| UsageError(format!("--lanes: {e}")))?;
        if !lanes.contains(&lane) {
            lanes.push(lane);
        }
    }
    if lanes.is_empty() {
        return Err(UsageError("--lanes needs at least one lane".into()));
    }
    lanes.sort_by_key(|l| *l != Lane::Interactive);
    let event_source = event_source(args.event_source.as_deref(), &args.broker.amqp_prefix)?;
    let prefetch = args
        .prefetch
        .unwrap_or_else(|| (args.max_batch.saturating_mul(2)).min(u16::MAX as u32) as u16)
        .max(1);
    let (models, pools) = served_models(args)?;
    let memory_budget = args
        .memory_budget
        .as_deref()
        .map(|b| parse_bytes(b).map_err(|e| UsageError(format!("--memory-budget: {e}"))))
        .transpose()?;
    Ok(WorkerConfig {
        amqp_url: args.broker.amqp_url.clone(),
        topology: topology(&args.broker)?,
        storage: args.storage.storage.clone(),
        s3: args.storage.s3_options(),
        models,
        memory_budget,
        limits,
        max_batch: args.max_batch,
        batch_window: Duration::from_millis(args.batch_window_ms),
        lanes,
        pools,
        default_pool: args.default_pool,
        prefetch,
        worker_id,
        event_source,
        http_addr: args.http_addr,
        job_timeout: Duration::from_secs(args.job_timeout_s.max(1)),
        grace_period: Duration::from_secs(args.grace_period_s),
        progress_interval: Duration::from_millis(args.progress_interval_ms),
        lora: lora_settings(&args.lora, args.storage.s3_options())?,
        lora_memory_bytes: args.lora.lora_memory_max_mb.saturating_mul(MIB),
    })
}

const MIB: u64 = 1 << 20;

/// `--lora-*` flags → where adapters may come from. The disk cache must hold at least one file of
/// the largest size accepted.
pub fn lora_settings(
    args: &crate::cli::LoraArgs,
    s3: crate::storage::S3Options,
) -> Result<crate::adapters::LoraSettings, UsageError> {
    let s3_allow = args
        .lora_s3_allow
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(crate::adapters::S3Allow::parse)
        .collect::<Result<_, _>>()
        .map_err(UsageError)?;
    if args.lora_max_mb == 0 || args.lora_cache_max_mb < args.lora_max_mb {
        return Err(UsageError(format!(
            "--lora-cache-max-mb ({}) must be at least --lora-max-mb ({}), which must be at least 1",
            args.lora_cache_max_mb, args.lora_max_mb
        )));
    }
    let cache_dir = args.lora_cache_dir.clone().unwrap_or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("t2i").join("loras")
    });
    Ok(crate::adapters::LoraSettings {
        dir: args.lora_dir.clone(),
        cache_dir,
        cache_max_bytes: args.lora_cache_max_mb.saturating_mul(MIB),
        max_file_bytes: args.lora_max_mb.saturating_mul(MIB),
        s3_allow,
        s3,
        allow_http: args.lora_allow_http,
        allow_private_networks: args.lora_allow_private_networks,
        hub_token: args.lora_hub_token,
        allow_hosts: args.lora_allow_host.clone(),
        timeout: Duration::from_secs(args.lora_fetch_timeout_s.max(1)),
    })
}

/// `--models` (or `--model` alone) → the served models and their pools: one model per pool, and a
/// revision pin only for a single model.
fn served_models(
    args: &crate::cli::WorkerArgs,
) -> Result<(Vec<ModelConfig>, Vec<ModelSlug>), UsageError> {
    let (flag, specs) = match args.models.as_slice() {
        [] => ("--model", vec![args.model.model.clone()]),
        many => (
            "--models",
            many.iter().map(|m| m.trim().to_string()).collect(),
        ),
    };
    if specs.len() > 1 && args.model.revision.is_some() {
        return Err(UsageError(
            "--revision pins one model; it cannot apply to several --models".into(),
        ));
    }
    let mut models = Vec::with_capacity(specs.len());
    let mut pools: Vec<ModelSlug> = Vec::with_capacity(specs.len());
    for spec in specs {
        let slug = ModelSlug::of(&spec).map_err(|r| UsageError(format!("{flag}: {}", r.reason)))?;
        if pools.contains(&slug) {
            return Err(UsageError(format!(
                "{flag}: two models share the pool `{slug}` (a model's pool is its last path segment)"
            )));
        }
        let model_args = crate::cli::ModelArgs {
            model: spec,
            ..args.model.clone()
        };
        models.push(ModelConfig::from_args(&model_args)?);
        pools.push(slug);
    }
    Ok((models, pools))
}

/// A byte count with an optional unit: `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000), `KiB`/`MiB`/
/// `GiB`/`TiB` (powers of 1024), any case; the number may have a fraction (`9.5GB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes (e.g. 12GiB)"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

/// `--event-source` checked, or the deployment's default for the AMQP prefix: every process that
/// announces events of a deployment (workers, and `enqueue` and the gateway for the jobs no pool
/// serves) takes it the same way.
pub fn event_source(given: Option<&str>, amqp_prefix: &str) -> Result<String, UsageError> {
    match given {
        Some(s) => {
            crate::events::check_source(s)
                .map_err(|why| UsageError(format!("--event-source: {why}")))?;
            Ok(s.to_string())
        }
        None => Ok(crate::events::default_source(amqp_prefix)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn worker(flags: &[&str]) -> Result<WorkerConfig, UsageError> {
        let argv = [&["t2i", "worker"], flags].concat();
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Worker(args) => worker_config(&args),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_event_source_is_the_deployments_not_the_workers() {
        let a = worker(&["--worker-id", "w1", "--amqp-prefix", "prod"]).unwrap();
        let b = worker(&["--worker-id", "w2", "--amqp-prefix", "prod"]).unwrap();
        assert_eq!(a.event_source, "/t2i-worker/prod");
        assert_eq!(a.event_source, b.event_source);
        let set = worker(&["--event-source", "https://images.example.com/t2i"]).unwrap();
        assert_eq!(set.event_source, "https://images.example.com/t2i");
        let bad = worker(&["--event-source", "not a uri"]).unwrap_err();
        assert!(bad.0.contains("--event-source"), "{bad}");
    }

    #[test]
    fn lora_flags_become_bounds_and_an_s3_allow_list() {
        let w = worker(&[
            "--lora-s3-allow",
            "s3://loras/public/,s3://team",
            "--lora-max-mb",
            "8",
        ])
        .unwrap();
        assert_eq!(w.lora.max_file_bytes, 8 << 20);
        assert_eq!(w.lora.s3_allow.len(), 2);
        assert_eq!(w.lora_memory_bytes, 4096 << 20);
        assert!(w.lora.dir.is_none() && !w.lora.allow_http);
        let e = worker(&["--lora-s3-allow", "loras/public"]).unwrap_err();
        assert!(e.0.contains("s3://bucket"), "{e}");
        let e = worker(&["--lora-max-mb", "100", "--lora-cache-max-mb", "10"]).unwrap_err();
        assert!(e.0.contains("--lora-cache-max-mb"), "{e}");
    }

    #[test]
    fn a_worker_serves_its_models_pool_and_by_default_the_default_pool() {
        let w = worker(&["--model", "segmind/Segmind-Vega"]).unwrap();
        assert_eq!(w.pools[0].as_str(), "segmind-vega");
        assert!(w.default_pool);
        let w = worker(&["--model", "/models/vega/", "--default-pool", "false"]).unwrap();
        assert_eq!(w.pools[0].as_str(), "vega");
        assert!(!w.default_pool);
        assert!(worker(&["--model", "/"]).unwrap_err().0.contains("--model"));
    }

    #[test]
    fn several_models_each_get_a_pool_and_the_first_takes_the_default_pool() {
        let w = worker(&[
            "--models",
            "segmind/SSD-1B, /models/sd15",
            "--memory-budget",
            "12GiB",
        ])
        .unwrap();
        let pools: Vec<&str> = w.pools.iter().map(|p| p.as_str()).collect();
        assert_eq!(pools, ["ssd-1b", "sd15"]);
        assert_eq!(w.models[1].spec, "/models/sd15");
        assert_eq!(w.memory_budget, Some(12 << 30));
        let e = worker(&["--models", "a/SSD-1B,b/ssd-1b"]).unwrap_err();
        assert!(e.0.contains("share the pool"), "{e}");
        let e = worker(&["--models", "a,b", "--revision", "main"]).unwrap_err();
        assert!(e.0.contains("--revision"), "{e}");
        assert!(
            worker(&["--memory-budget", "lots"])
                .unwrap_err()
                .0
                .contains("--memory-budget")
        );
    }

    #[test]
    fn byte_counts_take_decimal_and_binary_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("9.5GB"), Ok(9_500_000_000));
        assert_eq!(parse_bytes("800 MiB"), Ok(800 << 20));
        assert_eq!(parse_bytes("2tib"), Ok(2 << 40));
        for bad in ["", "GB", "1.2.3GB", "5 parsecs", "0", "-1GB", "1e3"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
