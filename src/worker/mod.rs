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
//! `run` loads and warms the model, starts the render thread and the health endpoint, then keeps
//! broker sessions going ([`session`]) with the one reconnect policy of [`crate::queue::Reconnect`]
//! until `shutdown` fires.

mod batcher;
mod complete;
#[cfg(test)]
pub(crate) mod fakes;
mod intake;
mod metrics;
mod render;
mod session;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

pub use crate::config::WorkerConfig;
use crate::events::SafetyChecker;
use crate::health::Health;
use crate::job::{Generation, GenerationRequest, Job, ModelDefaults};
use crate::pipeline::runner::Runner;
use crate::pipeline::{ImageSpec, RenderBatch};
use crate::queue::{Delivery, Reconnect};
use crate::storage::Store;
use complete::JobMeta;
use intake::Cancellations;
use metrics::Metrics;
use session::{SessionEnd, SessionError};

/// A valid job waiting for, or on, the device, with its delivery (settled once, at its end).
pub struct InHand {
    pub job: Job,
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
    defaults: ModelDefaults,
    safety_checker: Option<SafetyChecker>,
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
        defaults,
        safety_checker,
        device,
    } = warm_up(&cfg).await?;
    metrics.watch_device(health.registry(), &device);
    let shared = Shared {
        cfg: Arc::new(cfg),
        defaults,
        safety_checker,
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

/// A loaded, warmed-up model and what the worker reports about it.
struct Warm {
    runner: Runner,
    defaults: ModelDefaults,
    safety_checker: Option<SafetyChecker>,
    device: candle_core::Device,
}

/// Loads the model, renders one tiny image (the first render pays for allocations and kernel
/// loading; do it before consuming), and starts the render thread.
async fn warm_up(cfg: &WorkerConfig) -> Result<Warm> {
    let (model_cfg, lora_budget) = (cfg.model.clone(), cfg.lora_memory_bytes);
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = model_cfg.load()?;
        loaded.pipeline.set_lora_memory_budget(lora_budget);
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
            .map_err(|e| crate::config::LoadError::Pipeline(Box::new(e)))?;
        Ok::<_, crate::config::LoadError>(loaded)
    })
    .await?
    .with_context(|| format!("loading model {}", cfg.model.spec))?;
    tracing::info!(model = %cfg.model.spec, load_s = loaded.load_time.as_secs_f64(), "model warm");
    let defaults = loaded.pipeline.model_defaults();
    let safety_checker = loaded
        .pipeline
        .index()
        .has_safety_checker
        .then_some(SafetyChecker::NotRun);
    let device = loaded.pipeline.device().clone();
    let (runner, _thread) = Runner::spawn(loaded.pipeline).context("starting the render thread")?;
    Ok(Warm {
        runner,
        defaults,
        safety_checker,
        device,
    })
}
