//! The middle of a job's path: one batch of compatible jobs on the device thread.
//!
//! [`render_batch`] sends `job.started` for every job, renders the batch (publishing throttled
//! `job.progress` hints and stopping between steps when every job is canceled or past its deadline,
//! or the batch outlives the job timeout), and returns each job with the [`Action`] its result
//! calls for. It stores and settles nothing: the session hands each pair to the completion handler.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::InHand;
use super::complete::{Action, BatchTiming, Completion};
use super::intake::Cancellations;
use super::metrics::Metrics;
use crate::events::{ErrorCode, EventKind, ProgressInfo};
use crate::job::{Job, Lora, Rejection};
use crate::pipeline::lora::LoraError;
use crate::pipeline::runner::Runner;
use crate::pipeline::{ImageSpec, PipelineError, RenderBatch, StepProgress};
use crate::queue::Publisher;
use crate::storage::Store;

/// What a render needs besides its jobs.
pub struct RenderCtx {
    pub runner: Runner,
    pub publisher: Publisher,
    pub completion: Arc<Completion<Store, Publisher>>,
    pub cancellations: Arc<Mutex<Cancellations>>,
    pub metrics: Arc<Metrics>,
    /// A batch running longer than this fails its jobs with `timeout`.
    pub job_timeout: Duration,
    /// Minimum time between two `job.progress` events of a job.
    pub progress_interval: Duration,
}

/// The jobs of a rendered batch with what is to become of each, and the device error when the
/// device failed in a way that counts towards giving up (not out of memory: that fails the jobs
/// alone).
pub struct BatchResult {
    pub jobs: Vec<(InHand, Action)>,
    pub device_error: Option<String>,
}

/// Why a batch stopped between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Canceled,
    Expired,
    TimedOut,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Renders one batch; `Err` when the render thread is gone.
pub async fn render_batch(ctx: &RenderCtx, jobs: Vec<InHand>) -> Result<BatchResult, String> {
    let started = Instant::now();
    let started_utc = OffsetDateTime::now_utc();
    let queued: Vec<Duration> = jobs
        .iter()
        .map(|h| match h.meta.published {
            // AMQP timestamps have 1 s resolution; never report less than we saw ourselves.
            Some(p) => Duration::from_secs_f64((started_utc - p).as_seconds_f64().max(0.0))
                .max(started.saturating_duration_since(h.meta.arrived)),
            None => started.saturating_duration_since(h.meta.arrived),
        })
        .collect();
    for q in &queued {
        ctx.metrics.queue_wait.observe(q.as_secs_f64());
    }
    let confirms = send_started(ctx, &jobs).await;
    tokio::spawn(async move {
        for (job, pending) in confirms {
            if let Err(e) = pending.confirmed().await {
                tracing::warn!(%job, error = %e, "publishing job.started");
            }
        }
    });
    let images: Vec<ImageSpec> = jobs
        .iter()
        .flat_map(|h| ImageSpec::all_of(&h.job.generation))
        .collect();
    ctx.metrics.batch_size.observe(images.len() as f64);
    // One adapter set per batch (the batch key): the first job's files serve them all.
    let batch =
        RenderBatch::new(&jobs[0].job.generation, images).with_loras(jobs[0].adapter_files());

    let (progress_tx, progress_task) = progress_publisher(ctx, &jobs);
    let stop_reason: Arc<Mutex<Option<Stop>>> = Arc::default();
    let hook = step_hook(ctx, &jobs, started, progress_tx, stop_reason.clone());
    ctx.metrics.rendering.set(jobs.len() as i64);
    // The batcher keys on the model: every job of the batch is for the first one's.
    let result = ctx.runner.render(jobs[0].model, batch, hook).await;
    ctx.metrics.rendering.set(0);
    let _ = progress_task.await;
    let inference = started.elapsed();
    ctx.metrics.batch_inference.observe(inference.as_secs_f64());
    ctx.metrics.sample_device_memory();
    let result = result.map_err(|gone| gone.to_string())?;
    Ok(match result {
        Ok(rendered) => {
            let mut images = rendered.images.into_iter();
            let mut truncated = rendered.truncated.into_iter();
            let now = OffsetDateTime::now_utc();
            let cancels = lock(&ctx.cancellations);
            let jobs = jobs
                .into_iter()
                .zip(queued)
                .map(|(h, queued)| {
                    let n = h.job.generation.num_images as usize;
                    let mine: Vec<_> = images.by_ref().take(n).collect();
                    // Consume exactly this job's n flags (no short-circuit), so the next job's line up.
                    let trunc = truncated.by_ref().take(n).fold(false, |a, t| a | t);
                    let action = if cancels.covers(&h.job) {
                        Action::End(EventKind::Canceled)
                    } else if h.job.is_expired(now) {
                        Action::End(EventKind::Expired)
                    } else {
                        let timing = BatchTiming {
                            started,
                            queued,
                            inference,
                        };
                        Action::Complete {
                            images: mine,
                            truncated: trunc,
                            timing,
                        }
                    };
                    (h, action)
                })
                .collect();
            BatchResult {
                jobs,
                device_error: None,
            }
        }
        Err(PipelineError::Stopped { .. }) => {
            let reason = lock(&stop_reason).unwrap_or(Stop::Canceled);
            let action = || match reason {
                Stop::TimedOut => Action::Fail(
                    ErrorCode::Timeout,
                    "the batch exceeded the worker's job timeout".into(),
                ),
                Stop::Expired => Action::End(EventKind::Expired),
                Stop::Canceled => Action::End(EventKind::Canceled),
            };
            BatchResult {
                jobs: jobs.into_iter().map(|h| (h, action())).collect(),
                device_error: None,
            }
        }
        Err(PipelineError::Lora(e)) if !matches!(e, LoraError::Merge { .. }) => {
            // The adapters do not fit the model (or could not be read): the jobs' fault, not the
            // device's. Every job of the batch has the same adapters.
            let field = match &e {
                LoraError::File { uri, .. }
                | LoraError::Tensor { uri, .. }
                | LoraError::Merge { uri, .. } => uri.clone(),
            };
            let jobs = jobs
                .into_iter()
                .map(|h| {
                    let i = h.job.generation.loras.iter().position(|l| l.uri == field);
                    let name = i.map_or("loras".to_string(), |i| Lora::field(i, "uri"));
                    let rejection = Rejection::new(name, format!("{field:?}"), e.to_string());
                    (h, Action::Invalid(rejection))
                })
                .collect();
            BatchResult {
                jobs,
                device_error: None,
            }
        }
        // A model that cannot be loaded or does not fit fails these jobs, not the device.
        Err(PipelineError::ModelUnavailable(why)) => BatchResult {
            jobs: jobs
                .into_iter()
                .map(|h| (h, Action::Fail(ErrorCode::ModelUnavailable, why.clone())))
                .collect(),
            device_error: None,
        },
        Err(e) => {
            let oom = e.is_out_of_memory();
            let message = e.to_string();
            let code = if oom {
                ErrorCode::Oom
            } else {
                ErrorCode::Internal
            };
            let jobs = jobs
                .into_iter()
                .map(|h| (h, Action::Fail(code, message.clone())))
                .collect();
            // Out of memory fails those jobs; other device errors count towards giving up.
            BatchResult {
                jobs,
                device_error: (!oom).then_some(message),
            }
        }
    })
}

/// `job.started` for every job: informational, so the device does not wait for the broker. The
/// frames are sent before the render, so a job's `started` precedes its terminal event on this
/// channel; the confirms are awaited elsewhere. Sent concurrently: one wake-up of the connection's
/// writer for the whole batch instead of one per job.
async fn send_started(
    ctx: &RenderCtx,
    jobs: &[InHand],
) -> Vec<(String, crate::queue::PendingConfirm)> {
    let sends = jobs.iter().map(|h| async move {
        let data = ctx
            .completion
            .data(&h.job, h.meta.attempt, EventKind::Started);
        ctx.completion.record_started(&h.job, &data);
        let event = ctx.completion.event(EventKind::Started, data);
        match ctx.publisher.send_event(&event, EventKind::Started).await {
            Ok(p) => Some((h.job.job_id.to_string(), p)),
            Err(e) => {
                tracing::warn!(job = %h.job.job_id, error = %e, "publishing job.started");
                None
            }
        }
    });
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Throttled progress hints, published from an async task fed by the device thread.
fn progress_publisher(
    ctx: &RenderCtx,
    jobs: &[InHand],
) -> (
    mpsc::UnboundedSender<(usize, usize)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, usize)>();
    let targets: Vec<(Job, u32)> = jobs
        .iter()
        .map(|h| (h.job.clone(), h.meta.attempt))
        .collect();
    let (publisher, completion) = (ctx.publisher.clone(), ctx.completion.clone());
    let task = tokio::spawn(async move {
        while let Some((step, total)) = rx.recv().await {
            let sends = targets.iter().map(|(job, attempt)| {
                let mut data = completion.data(job, *attempt, EventKind::Progress);
                data.params = None;
                data.progress = Some(ProgressInfo { step, total });
                let event = completion.event(EventKind::Progress, data);
                let publisher = &publisher;
                async move { publisher.event(&event, EventKind::Progress).await.is_ok() }
            });
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
    (tx, task)
}

/// Called on the device thread after every step: sends a progress hint when due, and stops the
/// batch when every job is canceled or expired, or the batch outlived the job timeout.
fn step_hook(
    ctx: &RenderCtx,
    jobs: &[InHand],
    started: Instant,
    progress: mpsc::UnboundedSender<(usize, usize)>,
    stop_reason: Arc<Mutex<Option<Stop>>>,
) -> crate::pipeline::runner::StepHook {
    let watched: Vec<Job> = jobs.iter().map(|h| h.job.clone()).collect();
    let cancels = ctx.cancellations.clone();
    let (timeout, interval) = (ctx.job_timeout, ctx.progress_interval);
    let mut last_progress = Instant::now() - interval;
    Box::new(move |s: &StepProgress<'_>| {
        if last_progress.elapsed() >= interval || s.step == s.total {
            last_progress = Instant::now();
            let _ = progress.send((s.step, s.total));
        }
        let now = OffsetDateTime::now_utc();
        let all_canceled = {
            let c = lock(&cancels);
            watched.iter().all(|j| c.covers(j))
        };
        let reason = if all_canceled {
            Some(Stop::Canceled)
        } else if watched.iter().all(|j| j.is_expired(now)) {
            Some(Stop::Expired)
        } else if started.elapsed() > timeout {
            Some(Stop::TimedOut)
        } else {
            None
        };
        match reason {
            Some(r) => {
                *lock(&stop_reason) = Some(r);
                std::ops::ControlFlow::Break(())
            }
            None => std::ops::ControlFlow::Continue(()),
        }
    })
}
