//! `t2i worker`: consume jobs, render them in batches on one device thread, store, announce, ack.
//!
//! A job's path, one file per stretch:
//!
//! ```text
//! Delivery → intake.rs (parse, earlier result?, deadline, canceled?, LoRA files) ─settled now─┐
//!   └─ Render → batcher.rs (compatible jobs, one batch) → render.rs (device thread,           │
//!        started/progress, stop between steps) → (job, Action) ────────────────────────────────┤
//!   complete.rs: Action → store + announce → Outcome  ◀───────────────────────────────────────┘
//!   session.rs: Outcome → ack | reject (dead-letter) | retry copy + ack | leave (reconnect)
//! ```
//!
//! `run` reads every served model's configs, loads and warms the first, starts the render thread
//! (which loads the others on demand within the memory budget: [`models`]) and the health
//! endpoint, then keeps broker sessions going ([`session`]) with the one reconnect policy of
//! [`crate::queue::Reconnect`] until `shutdown` fires. Ready means the first model is warm and the
//! session consumes; the other models load when their first job comes (it waits for the load).

mod batcher;
mod complete;
#[cfg(test)]
pub(crate) mod fakes;
mod intake;
mod metrics;
mod models;
mod render;
mod session;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

pub use crate::config::WorkerConfig;
use crate::events::SafetyChecker;
use crate::health::Health;
use crate::job::{Generation, GenerationRequest, Job, ModelDefaults, ModelSlug};
use crate::pipeline::runner::Runner;
use crate::pipeline::{ImageSpec, RenderBatch};
use crate::queue::{Delivery, Reconnect};
use crate::storage::Store;
use complete::JobMeta;
use intake::Cancellations;
use metrics::Metrics;
use models::{ModelSet, Served};
use session::{SessionEnd, SessionError};

/// A valid job waiting for, or on, the device, with its delivery (settled once, at its end).
pub struct InHand {
    pub job: Job,
    /// Which served model renders it (an index into [`Shared::served`]).
    pub model: usize,
    pub meta: JobMeta,
    pub delivery: Delivery,
    /// Counts it in `t2i_jobs_held` until it is dropped, however it leaves.
    pub held: metrics::Held,
    /// Its LoRA files, fetched at intake (held: the disk cache keeps them until the job leaves).
    pub adapters: Vec<crate::adapters::Fetched>,
}

impl InHand {
    /// The job's LoRA files as a render takes them.
    pub fn adapter_files(&self) -> Vec<crate::pipeline::lora::AdapterFile> {
        self.job
            .generation
            .loras
            .iter()
            .zip(&self.adapters)
            .map(|(lora, fetched)| fetched.adapter(lora))
            .collect()
    }
}

/// What every session of the process shares.
pub(crate) struct Shared {
    cfg: Arc<WorkerConfig>,
    /// The served models, in `cfg.models` order.
    served: Arc<Vec<Served>>,
    runner: Runner,
    store: Arc<Store>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    cancellations: Arc<Mutex<Cancellations>>,
    /// Fetches jobs' LoRA files at intake.
    fetcher: Arc<crate::adapters::Fetcher>,
}

/// Device failures in a row after which the worker exits non-zero for its supervisor to replace it.
const DEVICE_FAILURES_TO_GIVE_UP: u32 = 3;

/// Runs the worker until `shutdown` fires. Errors only for what cannot be retried (model, storage
/// URL, repeated device failures).
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    let health = Health::new();
    let metrics = Metrics::new(health.registry());
    if let Some(addr) = cfg.http_addr {
        crate::health::serve(addr, health.clone(), shutdown.clone())
            .await
            .with_context(|| format!("binding {addr}"))?;
    }
    let store = Arc::new(
        Store::open(&cfg.storage, &cfg.s3)
            .await
            .with_context(|| format!("opening storage {}", cfg.storage))?,
    );
    let fetcher = crate::adapters::Fetcher::new(cfg.lora.clone())
        .map_err(anyhow::Error::msg)
        .context("setting up LoRA fetching")?;
    let Warm {
        runner,
        served,
        device,
    } = warm_up(&cfg, &metrics).await?;
    metrics.watch_device(health.registry(), &device);
    let shared = Shared {
        cfg: Arc::new(cfg),
        served: Arc::new(served),
        runner,
        store,
        health,
        metrics,
        cancellations: Arc::default(),
        fetcher: Arc::new(fetcher),
    };
    let reconnect = Reconnect::new(&shared.cfg.amqp_url, &shared.cfg.worker_id);
    let mut device_failures = 0u32;
    while let Some(conn) = reconnect.connect(&shutdown).await {
        match session::session(&shared, &conn, &shutdown).await {
            Ok(SessionEnd::Shutdown) => {
                conn.close("worker shutting down").await;
                break;
            }
            Ok(SessionEnd::ConnectionLost(reason)) => {
                tracing::warn!(%reason, "broker session ended; reconnecting");
                device_failures = 0;
            }
            Err(SessionError::Device(e)) => {
                device_failures += 1;
                tracing::error!(error = %e, device_failures, "device failure");
                if device_failures >= DEVICE_FAILURES_TO_GIVE_UP {
                    conn.close("worker failing").await;
                    anyhow::bail!(
                        "giving up after {device_failures} consecutive device failures: {e}"
                    );
                }
            }
            Err(SessionError::Broker(e)) => {
                tracing::warn!(error = %e, "broker error; reconnecting")
            }
        }
        shared.health.set_ready(false);
        conn.close("reconnecting").await;
        if !reconnect.pause(&shutdown).await {
            break;
        }
    }
    Ok(())
}

/// The render thread with the first model warm, and what the worker reports about each model.
struct Warm {
    runner: Runner,
    served: Vec<Served>,
    device: candle_core::Device,
}

/// Reads every served model's configs (resolving, so downloading, each), loads the first and
/// renders one tiny image with it (the first render pays for allocations and kernel loading; do
/// it before consuming), and starts the render thread with every model on it.
async fn warm_up(cfg: &WorkerConfig, metrics: &Arc<Metrics>) -> Result<Warm> {
    let configs = cfg.models.clone();
    let (budget, lora_budget) = (cfg.memory_budget, cfg.lora_memory_bytes);
    let ((configs, pipeline), served) = tokio::task::spawn_blocking(move || {
        let mut served = Vec::with_capacity(configs.len());
        for m in &configs {
            let root = crate::pipeline::weights::resolve_model(
                &m.spec,
                m.revision.as_deref(),
                m.variant,
                m.dtype,
            )
            .with_context(|| format!("resolving model {}", m.spec))?;
            let info = crate::pipeline::ModelInfo::read(&root)
                .with_context(|| format!("reading model {}", m.spec))?;
            served.push(Served {
                spec: m.spec.clone(),
                slug: ModelSlug::of(&m.spec).map_err(|r| anyhow::anyhow!("{}", r.reason))?,
                defaults: info.defaults,
                safety_checker: info.has_safety_checker.then_some(SafetyChecker::NotRun),
            });
        }
        let loaded = configs[0]
            .load()
            .with_context(|| format!("loading model {}", configs[0].spec))?;
        loaded.pipeline.set_lora_memory_budget(lora_budget);
        let bytes = loaded.pipeline.loaded_bytes();
        if let Some(b) = budget
            && bytes > b
        {
            anyhow::bail!("{}", models::too_large(&configs[0].spec, bytes, b));
        }
        let request = GenerationRequest {
            prompt: "warm-up".into(),
            width: Some(64),
            height: Some(64),
            steps: Some(1),
            seed: Some(0),
            ..GenerationRequest::default()
        };
        let warm = Generation::parse(request, &Default::default(), &ModelDefaults::default())
            .expect("the warm-up request is within every bound");
        let batch = RenderBatch::new(&warm, ImageSpec::all_of(&warm));
        loaded
            .pipeline
            .render(&batch, &mut |_| std::ops::ControlFlow::Continue(()))
            .with_context(|| format!("warming up model {}", configs[0].spec))?;
        let load_s = loaded.load_time.as_secs_f64();
        tracing::info!(model = %configs[0].spec, bytes, load_s, "model warm");
        Ok::<_, anyhow::Error>(((configs, loaded.pipeline), served))
    })
    .await??;
    let device = pipeline.device().clone();
    metrics.serve_models(served.iter().map(|s| s.slug.as_str()));
    let set = ModelSet::new(configs, pipeline, budget, lora_budget, metrics.clone());
    let (runner, _thread) = Runner::spawn(set).context("starting the render thread")?;
    Ok(Warm {
        runner,
        served,
        device,
    })
}
