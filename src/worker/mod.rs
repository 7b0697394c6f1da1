//! `t2i worker`: consume jobs, render them in batches on one device thread, store, announce, ack.
//!
//! `run` loads and warms the model, starts the render thread and the HTTP endpoint, then keeps a
//! broker session alive: connect (jittered backoff) → declare topology → consume both lanes with
//! manual acks → schedule batches → … until the connection dies (reconnect; nothing from the dead
//! channels is acked on the new one) or `shutdown` fires (stop consuming, finish the batch on the
//! device, requeue what has not started, let in-flight uploads finish within the grace period, close,
//! return Ok). Per-job decisions live in `handler.rs`, batching in `batcher.rs`.

mod batcher;
mod handler;
pub mod http;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
};
use lapin::types::FieldTable;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ModelConfig;
use crate::events::{ErrorCode, EventData, EventKind};
use crate::job::{Limits, ModelDefaults, parse_job_body};
use crate::pipeline::runner::Runner;
use crate::pipeline::{ImageSpec, PipelineError, RenderBatch};
use crate::queue::publisher::attempt_of;
use crate::queue::{Lane, Publisher, Topology};
use crate::storage::{ImageStore, ObjectKey, Store};
use batcher::{Batcher, Decision, Pending};
use handler::{BatchTiming, Ctx, InHand};
use http::Metrics;

/// Everything `t2i worker` needs, validated once from flags.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    pub storage: String,
    pub force_path_style: Option<bool>,
    pub model: ModelConfig,
    pub limits: Limits,
    /// Most images per device batch.
    pub max_batch: u32,
    /// How long a partial batch waits for company.
    pub batch_window: Duration,
    /// Job queues consumed, interactive first when both.
    pub lanes: Vec<Lane>,
    /// Unacked deliveries per lane.
    pub prefetch: u16,
    pub worker_id: String,
    pub http_addr: Option<SocketAddr>,
    /// A batch running longer than this fails its jobs with `timeout`.
    pub job_timeout: Duration,
    /// After SIGTERM, how long in-flight uploads and events may take.
    pub grace_period: Duration,
    /// Minimum time between two `job.progress` events of a job.
    pub progress_interval: Duration,
}

/// Jobs and batches canceled through `t2i.control` (kept for the life of the process).
#[derive(Default)]
struct Cancellations {
    jobs: HashSet<String>,
    batches: HashSet<String>,
}

impl Cancellations {
    fn covers(&self, job: &crate::job::Job) -> bool {
        self.jobs.contains(job.job_id.as_str())
            || job
                .batch
                .as_ref()
                .is_some_and(|b| self.batches.contains(&b.id))
    }

    fn apply(&mut self, body: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Control {
            #[serde(default)]
            cancel_jobs: Vec<String>,
            #[serde(default)]
            cancel_batches: Vec<String>,
        }
        match serde_json::from_slice::<Control>(body) {
            Ok(c) => {
                self.jobs.extend(c.cancel_jobs);
                self.batches.extend(c.cancel_batches);
            }
            Err(e) => tracing::warn!(error = %e, "ignoring malformed control message"),
        }
    }
}

/// Runs the worker until `shutdown` fires. Errors only for what cannot be retried (model, storage URL,
/// repeated device failures).
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    let metrics = Metrics::new();
    if let Some(addr) = cfg.http_addr {
        let (m, s) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = http::serve(addr, m, s).await {
                tracing::error!(error = %e, "HTTP endpoint failed");
            }
        });
    }
    let store = Arc::new(
        Store::open(&cfg.storage, cfg.force_path_style)
            .await
            .with_context(|| format!("opening storage {}", cfg.storage))?,
    );
    let model_cfg = cfg.model.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = model_cfg.load()?;
        // Warm up before consuming: the first render pays for allocations and kernel loading.
        let warm = RenderBatch {
            images: vec![ImageSpec {
                prompt: "warm-up".into(),
                negative_prompt: None,
                seed: 0,
            }],
            width: 64,
            height: 64,
            steps: 1,
            guidance_scale: 5.0,
            scheduler: crate::pipeline::SchedulerKind::Euler,
            latents: None,
        };
        loaded
            .pipeline
            .render(&warm, &mut |_| std::ops::ControlFlow::Continue(()))
            .map_err(|e| crate::config::LoadError::Pipeline(Box::new(e)))?;
        Ok::<_, crate::config::LoadError>(loaded)
    })
    .await?
    .with_context(|| format!("loading model {}", cfg.model.spec))?;
    tracing::info!(model = %cfg.model.spec, load_s = loaded.load_time.as_secs_f64(), "model warm");
    let defaults = ModelDefaults {
        size: loaded.pipeline.default_size() as u32,
        scheduler: loaded.pipeline.default_scheduler(),
        ..ModelDefaults::default()
    };
    let (runner, _thread) = Runner::spawn(loaded.pipeline).context("starting the render thread")?;
    let cancellations = Arc::new(Mutex::new(Cancellations::default()));
    let shared = Shared {
        cfg: Arc::new(cfg),
        defaults,
        runner,
        store,
        metrics,
        cancellations,
    };

    let mut consecutive_failures = 0u32;
    loop {
        let conn = match crate::queue::connect_with_retry(
            &shared.cfg.amqp_url,
            &shared.cfg.worker_id,
            &shutdown,
        )
        .await
        {
            Some(c) => c,
            None => break,
        };
        match session(&shared, &conn, &shutdown).await {
            Ok(SessionEnd::Shutdown) => {
                close(&conn, "worker shutting down").await;
                break;
            }
            Ok(SessionEnd::ConnectionLost(reason)) => {
                tracing::warn!(%reason, "broker session ended; reconnecting");
                consecutive_failures = 0;
            }
            Err(SessionError::Device(e)) => {
                consecutive_failures += 1;
                tracing::error!(error = %e, consecutive_failures, "device failure");
                if consecutive_failures >= 3 {
                    close(&conn, "worker failing").await;
                    anyhow::bail!(
                        "giving up after {consecutive_failures} consecutive device failures: {e}"
                    );
                }
            }
            Err(SessionError::Broker(e)) => {
                tracing::warn!(error = %e, "broker error; reconnecting")
            }
        }
        shared
            .metrics
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        close(&conn, "reconnecting").await;
        tokio::time::sleep(crate::queue::backoff(
            1,
            Duration::from_millis(200),
            Duration::from_secs(2),
        ))
        .await;
    }
    Ok(())
}

/// Closes a connection, without waiting long for a broker that is gone.
async fn close(conn: &Connection, why: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, why.into())).await;
}

struct Shared {
    cfg: Arc<WorkerConfig>,
    defaults: ModelDefaults,
    runner: Runner,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    cancellations: Arc<Mutex<Cancellations>>,
}

enum SessionEnd {
    Shutdown,
    ConnectionLost(String),
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Device(String),
}

/// What the delivery pre-check tasks hand to the scheduler.
enum Ready {
    Job(Box<InHand>),
}

/// One broker connection's worth of work.
async fn session(
    sh: &Shared,
    conn: &Connection,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    // A broker that accepts the connection but never answers (still recovering its queues after a
    // restart) must not hold the worker: setup gets a deadline, then the session starts over.
    match tokio::time::timeout(SETUP_TIMEOUT, open_session(sh, conn)).await {
        Ok(Ok(s)) => run_session(sh, conn, shutdown, s).await,
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(SessionEnd::ConnectionLost(format!(
            "the broker did not finish setting up the session within {SETUP_TIMEOUT:?}"
        ))),
    }
}

/// Longest wait for the topology declarations and consumers of a new session.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the session checks that its connection is still up, besides the consumers' own
/// notifications.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

type LaneConsumer = (lapin::Channel, String, lapin::Consumer);

/// What a session consumes from, once declared.
struct Opened {
    ctx: Arc<Ctx>,
    interactive: Option<LaneConsumer>,
    bulk: Option<LaneConsumer>,
    control: lapin::Consumer,
}

async fn open_session(sh: &Shared, conn: &Connection) -> Result<Opened, lapin::Error> {
    let cfg = &sh.cfg;
    let publisher = Publisher::open(conn, &cfg.topology).await?;
    cfg.topology.declare(publisher.channel()).await?;
    let ctx = Arc::new(Ctx {
        publisher,
        store: sh.store.clone(),
        worker_id: cfg.worker_id.clone(),
        model: cfg.model.spec.clone(),
        metrics: sh.metrics.clone(),
        max_attempts: cfg.topology.delivery_limit.max(1),
        dtype: cfg.model.dtype_name(),
        broken: CancellationToken::new(),
    });

    let mut consumers = Vec::new();
    for &lane in &cfg.lanes {
        let ch = conn.create_channel().await?;
        ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{}-{}", cfg.worker_id, lane.routing_key());
        let consumer = ch
            .basic_consume(
                cfg.topology.queue(lane).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push((lane, ch, tag, consumer));
    }
    let control_ch = conn.create_channel().await?;
    let control_q = crate::queue::declare_private_queue(&control_ch).await?;
    control_ch
        .queue_bind(
            control_q.name().clone(),
            cfg.topology.control_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let control = control_ch
        .basic_consume(
            control_q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // One consumer per configured lane; a lane not consumed never yields.
    let mut interactive = None;
    let mut bulk = None;
    for (lane, ch, tag, consumer) in consumers {
        match lane {
            Lane::Interactive => interactive = Some((ch, tag, consumer)),
            Lane::Bulk => bulk = Some((ch, tag, consumer)),
        }
    }
    Ok(Opened {
        ctx,
        interactive,
        bulk,
        control,
    })
}

async fn run_session(
    sh: &Shared,
    conn: &Connection,
    shutdown: &CancellationToken,
    opened: Opened,
) -> Result<SessionEnd, SessionError> {
    let cfg = &sh.cfg;
    let Opened {
        ctx,
        mut interactive,
        mut bulk,
        mut control,
    } = opened;
    sh.metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(worker = %cfg.worker_id, storage = %sh.store.describe(), "consuming");
    let mut connection_check = tokio::time::interval(CONNECTION_CHECK);

    let tracker = TaskTracker::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<Ready>(1024);
    let mut batcher: Batcher<InHand> = Batcher::new(cfg.max_batch, cfg.batch_window);
    let mut inflight: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    let mut wake: Option<Instant> = None;

    let end = loop {
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let render_done = async {
            match inflight.as_mut() {
                Some(h) => h.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(SessionEnd::Shutdown),
            _ = ctx.broken.cancelled() => {
                break Ok(SessionEnd::ConnectionLost("a publish or acknowledgement failed".into()))
            }
            _ = connection_check.tick() => {
                if !conn.status().connected() {
                    break Ok(SessionEnd::ConnectionLost("the connection is down".into()));
                }
            }
            d = next_delivery(&mut interactive) => match d {
                Some(Ok(d)) => spawn_precheck(sh, &ctx, &tracker, &ready_tx, d, Lane::Interactive),
                Some(Err(e)) => break Ok(SessionEnd::ConnectionLost(e.to_string())),
                None => break Ok(SessionEnd::ConnectionLost("interactive consumer closed".into())),
            },
            d = next_delivery(&mut bulk) => match d {
                Some(Ok(d)) => spawn_precheck(sh, &ctx, &tracker, &ready_tx, d, Lane::Bulk),
                Some(Err(e)) => break Ok(SessionEnd::ConnectionLost(e.to_string())),
                None => break Ok(SessionEnd::ConnectionLost("bulk consumer closed".into())),
            },
            c = control.next() => match c {
                Some(Ok(d)) => {
                    sh.cancellations.lock().unwrap_or_else(|p| p.into_inner()).apply(&d.data);
                    cancel_waiting(sh, &ctx, &tracker, &mut batcher);
                }
                Some(Err(e)) => break Ok(SessionEnd::ConnectionLost(e.to_string())),
                None => break Ok(SessionEnd::ConnectionLost("control consumer closed".into())),
            },
            Some(Ready::Job(h)) = ready_rx.recv() => {
                let arrived = h.arrived;
                let lane = h.lane;
                batcher.push(Pending { job: h.job.clone(), lane, arrived, extra: *h });
            },
            r = render_done => {
                inflight = None;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(SessionError::Device(e)),
                    Err(e) => break Err(SessionError::Device(format!("render task panicked: {e}"))),
                }
            },
            _ = sleep => { wake = None; }
        }
        if inflight.is_none() {
            expire_waiting(sh, &ctx, &tracker, &mut batcher);
            match batcher.next_batch(Instant::now()) {
                Decision::Ready(batch) => {
                    wake = None;
                    inflight = Some(tokio::spawn(render_batch(
                        sh.share(),
                        ctx.clone(),
                        tracker.clone(),
                        batch,
                    )));
                }
                Decision::WaitUntil(t) => wake = Some(t),
                Decision::Empty => wake = None,
            }
        }
    };

    // Stop consuming; what has not started goes back to the queue for another worker.
    if !batcher.is_empty() {
        tracing::info!(
            waiting = batcher.len(),
            "requeueing jobs that had not started"
        );
    }
    // Each broker call is bounded: after a connection reset lapin may never resolve a pending one
    // (seen here: the worker hung in this teardown after a broker restart). When the connection
    // is gone the broker requeues everything unsettled by itself.
    let connected = conn.status().connected();
    if connected {
        for (ch, tag, _) in [interactive.as_ref(), bulk.as_ref()].into_iter().flatten() {
            let _ = tokio::time::timeout(
                handler::SETTLE_TIMEOUT,
                ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
        }
    }
    let waiting = batcher.drain();
    if connected {
        for p in waiting {
            let _ = tokio::time::timeout(
                handler::SETTLE_TIMEOUT,
                p.extra.delivery.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                }),
            )
            .await;
        }
    }
    if let Some(h) = inflight.take() {
        tracing::info!(connected, "waiting for the batch on the device");
        // The batch on the device finishes (its jobs are acked when stored) unless the connection
        // died; its render is not waited for longer than the grace period.
        if tokio::time::timeout(cfg.grace_period, h).await.is_err() {
            tracing::warn!(
                "the batch on the device outlived the grace period; its jobs will be redelivered"
            );
        }
    }
    tracker.close();
    tracing::info!(
        tasks = tracker.len(),
        "waiting for in-flight uploads and events"
    );
    if tokio::time::timeout(cfg.grace_period, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with uploads still in flight; they will be redelivered");
    }
    sh.metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    end
}

impl Shared {
    fn share(&self) -> Arc<SharedRef> {
        Arc::new(SharedRef {
            cfg: self.cfg.clone(),
            runner: self.runner.clone(),
            metrics: self.metrics.clone(),
            cancellations: self.cancellations.clone(),
        })
    }
}

/// What a render task needs, owned.
struct SharedRef {
    cfg: Arc<WorkerConfig>,
    runner: Runner,
    metrics: Arc<Metrics>,
    cancellations: Arc<Mutex<Cancellations>>,
}

/// Validates a delivery and checks what can be checked before it waits for the device: invalid →
/// rejected; already done (`result.json`) → re-announced; expired or canceled → ended.
fn spawn_precheck(
    sh: &Shared,
    ctx: &Arc<Ctx>,
    tracker: &TaskTracker,
    ready: &mpsc::Sender<Ready>,
    d: Delivery,
    lane: Lane,
) {
    let (ctx, ready, cfg, defaults, cancels) = (
        ctx.clone(),
        ready.clone(),
        sh.cfg.clone(),
        sh.defaults,
        sh.cancellations.clone(),
    );
    tracker.spawn(async move {
        let job = match parse_job_body(&d.data, &cfg.limits, &defaults, &cfg.model.spec) {
            Ok(j) => j,
            Err(bad) => {
                ctx.reject_body(d, bad.job_id, bad.rejection).await;
                return;
            }
        };
        let attempt = attempt_of(&d.properties);
        let h = InHand::new(job, d, lane, attempt);
        let result_key = ObjectKey::result(&h.job.output.key_prefix, &h.job.job_id);
        match ctx.store.get(&result_key).await {
            Ok(Some(bytes)) => {
                if let Ok(stored) = serde_json::from_slice::<EventData>(&bytes) {
                    ctx.reannounce(h, stored).await;
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                ctx.retry_or_fail(h, format!("checking for an earlier result: {e}"))
                    .await;
                return;
            }
        }
        if h.job.is_expired(OffsetDateTime::now_utc()) {
            ctx.end_early(h, EventKind::Expired).await;
            return;
        }
        if cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .covers(&h.job)
        {
            ctx.end_early(h, EventKind::Canceled).await;
            return;
        }
        let _ = ready.send(Ready::Job(Box::new(h))).await;
    });
}

fn expire_waiting(
    sh: &Shared,
    ctx: &Arc<Ctx>,
    tracker: &TaskTracker,
    batcher: &mut Batcher<InHand>,
) {
    let now = OffsetDateTime::now_utc();
    for p in batcher.take_where(|p| p.job.is_expired(now)) {
        let ctx = ctx.clone();
        tracker.spawn(async move { ctx.end_early(p.extra, EventKind::Expired).await });
    }
    let _ = sh;
}

fn cancel_waiting(
    sh: &Shared,
    ctx: &Arc<Ctx>,
    tracker: &TaskTracker,
    batcher: &mut Batcher<InHand>,
) {
    let cancels = sh.cancellations.lock().unwrap_or_else(|p| p.into_inner());
    for p in batcher.take_where(|p| cancels.covers(&p.job)) {
        let ctx = ctx.clone();
        tracker.spawn(async move { ctx.end_early(p.extra, EventKind::Canceled).await });
    }
}

/// Renders one batch on the device thread, then hands each job to its own finishing task (encode,
/// upload, announce, ack), which overlaps with the next batch.
async fn render_batch(
    sh: Arc<SharedRef>,
    ctx: Arc<Ctx>,
    tracker: TaskTracker,
    batch: Vec<Pending<InHand>>,
) -> Result<(), String> {
    let jobs: Vec<InHand> = batch.into_iter().map(|p| p.extra).collect();
    let g0 = jobs[0].job.generation.clone();
    let started = Instant::now();
    let started_utc = OffsetDateTime::now_utc();
    let queued: Vec<Duration> = jobs
        .iter()
        .map(|h| match h.published {
            // AMQP timestamps have 1 s resolution; never report less than we saw ourselves.
            Some(p) => Duration::from_secs_f64((started_utc - p).as_seconds_f64().max(0.0))
                .max(started.saturating_duration_since(h.arrived)),
            None => started.saturating_duration_since(h.arrived),
        })
        .collect();
    for q in &queued {
        sh.metrics.queue_wait.observe(q.as_secs_f64());
    }
    tracker.spawn(ctx.started(&jobs).await.confirm_all());
    let images: Vec<ImageSpec> = jobs
        .iter()
        .flat_map(|h| h.job.generation.image_specs())
        .collect();
    sh.metrics.batch_size.observe(images.len() as f64);
    let render = RenderBatch {
        images,
        width: g0.width as usize,
        height: g0.height as usize,
        steps: g0.steps as usize,
        guidance_scale: g0.guidance_scale,
        scheduler: g0.scheduler,
        latents: None,
    };

    // Progress: throttled hints, published from an async task fed by the device thread.
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<(usize, usize)>();
    let progress_jobs: Vec<(crate::job::Job, u32)> =
        jobs.iter().map(|h| (h.job.clone(), h.attempt)).collect();
    let progress_ctx = ctx.clone();
    let progress_task = tokio::spawn(async move {
        while let Some((step, total)) = progress_rx.recv().await {
            let sends = progress_jobs
                .iter()
                .map(|(job, attempt)| progress_ctx.progress(job, *attempt, step, total));
            if !futures_util::future::join_all(sends)
                .await
                .into_iter()
                .all(|sent| sent)
            {
                // The channel is failing: hints are not worth waiting for.
                return;
            }
        }
    });
    let deadline_jobs: Vec<(crate::job::Job,)> = jobs.iter().map(|h| (h.job.clone(),)).collect();
    let cancels = sh.cancellations.clone();
    let (timeout, interval) = (sh.cfg.job_timeout, sh.cfg.progress_interval);
    let stop_reason: Arc<Mutex<Option<EventKind>>> = Arc::new(Mutex::new(None));
    let stop_flag = stop_reason.clone();
    let mut last_progress = Instant::now() - interval;
    let hook = Box::new(move |s: &crate::pipeline::StepProgress<'_>| {
        if last_progress.elapsed() >= interval || s.step == s.total {
            last_progress = Instant::now();
            let _ = progress_tx.send((s.step, s.total));
        }
        let now = OffsetDateTime::now_utc();
        let all_expired = deadline_jobs.iter().all(|(j,)| j.is_expired(now));
        let all_canceled = {
            let c = cancels.lock().unwrap_or_else(|p| p.into_inner());
            deadline_jobs.iter().all(|(j,)| c.covers(j))
        };
        let reason = if all_canceled {
            Some(EventKind::Canceled)
        } else if all_expired {
            Some(EventKind::Expired)
        } else if started.elapsed() > timeout {
            Some(EventKind::Failed)
        } else {
            None
        };
        match reason {
            Some(r) => {
                *stop_flag.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                std::ops::ControlFlow::Break(())
            }
            None => std::ops::ControlFlow::Continue(()),
        }
    });
    let result = sh.runner.render(render, hook).await;
    let _ = progress_task.await;
    let inference = started.elapsed();
    sh.metrics
        .phase
        .with_label_values(&["inference"])
        .observe(inference.as_secs_f64());
    let result = match result {
        Ok(r) => r,
        Err(gone) => return Err(gone.to_string()),
    };
    match result {
        Ok(rendered) => {
            let mut images = rendered.images.into_iter();
            let mut truncated = rendered.truncated.into_iter();
            for (h, queued) in jobs.into_iter().zip(queued) {
                let timing = BatchTiming {
                    started,
                    queued,
                    inference,
                };
                let n = h.job.generation.num_images as usize;
                let mine: Vec<_> = images.by_ref().take(n).collect();
                // Consume exactly this job's n flags (no short-circuit), so the next job's line up.
                let trunc = truncated
                    .by_ref()
                    .take(n)
                    .collect::<Vec<bool>>()
                    .contains(&true);
                let ctx = ctx.clone();
                let now = OffsetDateTime::now_utc();
                let expired = h.job.is_expired(now);
                let canceled = sh
                    .cancellations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .covers(&h.job);
                tracker.spawn(async move {
                    if canceled {
                        ctx.end_early(h, EventKind::Canceled).await
                    } else if expired {
                        ctx.end_early(h, EventKind::Expired).await
                    } else {
                        ctx.complete(h, mine, trunc, timing).await
                    }
                });
            }
            Ok(())
        }
        Err(PipelineError::Stopped { .. }) => {
            let reason = stop_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(EventKind::Canceled);
            for h in jobs {
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    match reason {
                        EventKind::Failed => {
                            ctx.fail(
                                h,
                                ErrorCode::Timeout,
                                "the batch exceeded the worker's job timeout".into(),
                            )
                            .await
                        }
                        kind => ctx.end_early(h, kind).await,
                    }
                });
            }
            Ok(())
        }
        Err(e) => {
            let oom = e.is_out_of_memory();
            let message = e.to_string();
            for h in jobs {
                let (ctx, message) = (ctx.clone(), message.clone());
                let code = if oom {
                    ErrorCode::Oom
                } else {
                    ErrorCode::Internal
                };
                tracker.spawn(async move { ctx.fail(h, code, message).await });
            }
            // Out of memory fails those jobs; other device errors count towards giving up.
            if oom { Ok(()) } else { Err(message) }
        }
    }
}

/// The next delivery of a lane's consumer, or never when the lane is not consumed.
async fn next_delivery(
    lane: &mut Option<(lapin::Channel, String, lapin::Consumer)>,
) -> Option<lapin::Result<Delivery>> {
    match lane {
        Some((_, _, consumer)) => consumer.next().await,
        None => std::future::pending().await,
    }
}
