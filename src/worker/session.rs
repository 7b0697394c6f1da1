//! One broker connection's worth of work: declare (the topology and the served models' pools), consume
//! the routes (each lane of every model's pool, and of the default pool unless `--default-pool false`)
//! and the control fanout, and
//! move every delivery along its path — [`intake`] → the [`Batcher`] → [`render_batch`] → the
//! completion handler — settling each delivery by the [`Outcome`] it ends with ([`settle`]).
//!
//! The session ends when shutdown fires (stop consuming, requeue what has not started, let the
//! batch on the device and the in-flight uploads finish within the grace period) or when the
//! connection dies (nothing from the dead channels is settled on a new one: the broker redelivers).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batcher::{Batcher, Decision, Pending};
use super::complete::{Action, Completion, JobMeta, Outcome};
use super::intake::{Contract, Intake, fetch_adapters, intake};
use super::render::{BatchResult, RenderCtx, render_batch};
use super::{InHand, Shared};
use crate::events::EventKind;
use crate::queue::{Connection, Consumer, Delivery, Publisher, QueueError, Route};
use crate::storage::ImageStore;

pub enum SessionEnd {
    Shutdown,
    ConnectionLost(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Broker(#[from] QueueError),
    #[error("{0}")]
    Device(String),
}

/// Longest wait for the topology declarations and consumers of a new session.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the session checks that its connection is still up, besides the consumers' own
/// notifications.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// What a session consumes from, once declared.
struct Opened {
    ctx: Arc<RenderCtx>,
    /// One consumer per route; which lane a delivery is on decides its place in the batcher.
    jobs: Vec<(Route, Consumer)>,
    control: Consumer,
}

/// Runs one session on `conn` until shutdown or until the connection is lost.
pub async fn session(
    sh: &Shared,
    conn: &Connection,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    // A broker that accepts the connection but never answers (still recovering its queues after a
    // restart) must not hold the worker: setup gets a deadline, then the session starts over.
    match tokio::time::timeout(SETUP_TIMEOUT, open(sh, conn)).await {
        Ok(Ok(s)) => run(sh, conn, shutdown, s).await,
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Ok(SessionEnd::ConnectionLost(format!(
            "the broker did not finish setting up the session within {SETUP_TIMEOUT:?}"
        ))),
    }
}

async fn open(sh: &Shared, conn: &Connection) -> Result<Opened, QueueError> {
    let cfg = &sh.cfg;
    conn.declare_pools(&cfg.topology, &cfg.pools).await?;
    let publisher = conn.publisher(&cfg.topology).await?;
    let completion = Arc::new(Completion {
        store: sh.store.clone(),
        sink: publisher.clone(),
        worker_id: cfg.worker_id.clone(),
        source: cfg.event_source.clone(),
        models: sh.served.clone(),
        dtype: cfg.models[0].dtype_name(),
        max_attempts: cfg.topology.delivery_limit.max(1),
        metrics: sh.metrics.clone(),
    });
    let ctx = Arc::new(RenderCtx {
        runner: sh.runner.clone(),
        publisher,
        completion,
        cancellations: sh.cancellations.clone(),
        metrics: sh.metrics.clone(),
        job_timeout: cfg.job_timeout,
        progress_interval: cfg.progress_interval,
    });
    let mut jobs = Vec::new();
    for &lane in &cfg.lanes {
        let own = cfg.pools.iter().map(|pool| Route {
            lane,
            pool: Some(pool.clone()),
        });
        let routes = own.chain(cfg.default_pool.then_some(Route::from(lane)));
        for route in routes {
            let c = conn
                .consume_route(&cfg.topology, &route, &cfg.worker_id, cfg.prefetch)
                .await?;
            jobs.push((route, c));
        }
    }
    let control = conn.subscribe_control(&cfg.topology).await?;
    Ok(Opened { ctx, jobs, control })
}

/// Settles a delivery as its outcome says; a settle that fails means the channel is gone, so the
/// session is told to reconnect (`broken`), after which the broker redelivers.
async fn settle(
    outcome: Outcome,
    delivery: &Delivery,
    route: &Route,
    publisher: &Publisher,
    broken: &CancellationToken,
) {
    let settled = match outcome {
        Outcome::Completed => delivery.ack().await,
        Outcome::Rejected => delivery.reject().await,
        Outcome::Retry => match publisher.retry(route, delivery).await {
            Ok(()) => delivery.ack().await,
            Err(e) => Err(e),
        },
        Outcome::Abandoned => {
            broken.cancel();
            return;
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle a delivery (channel gone?); the broker will redeliver");
        broken.cancel();
    }
}

/// What one session shares with the tasks it spawns.
struct Work {
    ctx: Arc<RenderCtx>,
    tracker: TaskTracker,
    /// Cancelled when a publish or a settle fails: the session reconnects, and closing the
    /// connection hands every unsettled delivery back to the broker at once.
    broken: CancellationToken,
}

impl Work {
    /// Hands a job and its action to the completion handler, then settles its delivery.
    fn finish(&self, h: InHand, action: Action) {
        let (ctx, broken) = (self.ctx.clone(), self.broken.clone());
        self.tracker.spawn(async move {
            let outcome = ctx.completion.act(&h.job, &h.meta, action).await;
            settle(outcome, &h.delivery, &h.meta.route, &ctx.publisher, &broken).await;
        });
    }

    /// Intake of one delivery, off the session loop (it may read the store): settled at once, or
    /// sent to the batcher through `ready`.
    fn intake(&self, sh: &Shared, d: Delivery, route: Route, ready: &mpsc::Sender<InHand>) {
        let (ctx, broken, ready) = (self.ctx.clone(), self.broken.clone(), ready.clone());
        let (cfg, served, cancels) = (sh.cfg.clone(), sh.served.clone(), sh.cancellations.clone());
        let (store, fetcher) = (sh.store.clone(), sh.fetcher.clone());
        self.tracker.spawn(async move {
            // Held from receipt: a delivery settled at intake is counted for as long as it takes.
            let held = ctx.metrics.hold();
            let meta = JobMeta {
                route,
                attempt: d.attempt(),
                arrived: Instant::now(),
                published: d.published_at(),
                reply_to: d.reply_to(),
            };
            let contract = Contract {
                limits: &cfg.limits,
                served: &served,
            };
            let covered = |job: &crate::job::Job| lock(&cancels).covers(job);
            let now = OffsetDateTime::now_utc();
            let decided = intake(d.body(), &contract, store.as_ref(), covered, now).await;
            let outcome = match decided {
                Intake::Invalid(bad) => {
                    let (c, reply) = (&ctx.completion, meta.reply_to.as_ref());
                    c.reject_body(d.body(), d.message_id(), reply, bad.job_id, bad.rejection)
                        .await
                }
                Intake::Settled(job, action) => ctx.completion.act(&job, &meta, action).await,
                Intake::Render(mut job, model) => match fetch_adapters(&fetcher, &mut job).await {
                    Ok(adapters) => {
                        let h = InHand {
                            job: *job,
                            model,
                            meta,
                            delivery: d,
                            held,
                            adapters,
                        };
                        let _ = ready.send(h).await;
                        return;
                    }
                    Err(action) => ctx.completion.act(&job, &meta, action).await,
                },
            };
            settle(outcome, &d, &meta.route, &ctx.publisher, &broken).await;
        });
    }

    /// Ends the waiting jobs that `take` picks with `kind` (expired, canceled).
    fn end_waiting(
        &self,
        batcher: &mut Batcher<InHand>,
        kind: EventKind,
        take: impl Fn(&crate::job::Job) -> bool,
    ) {
        for p in batcher.take_where(|p| take(&p.job)) {
            self.finish(p.extra, Action::End(kind));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The next delivery of any job consumer, with the index of its route. Dropping it loses nothing:
/// each consumer's `next` only takes a delivery off its stream when it resolves.
async fn next_delivery(
    jobs: &mut [(Route, Consumer)],
) -> (usize, Option<Result<Delivery, QueueError>>) {
    if jobs.is_empty() {
        return std::future::pending().await;
    }
    let next = jobs
        .iter_mut()
        .enumerate()
        .map(|(i, (_, consumer))| Box::pin(async move { (i, consumer.next().await) }));
    futures_util::future::select_all(next).await.0
}

async fn run(
    sh: &Shared,
    conn: &Connection,
    shutdown: &CancellationToken,
    opened: Opened,
) -> Result<SessionEnd, SessionError> {
    let cfg = &sh.cfg;
    let Opened {
        ctx,
        mut jobs,
        mut control,
    } = opened;
    let work = Work {
        ctx,
        tracker: TaskTracker::new(),
        broken: CancellationToken::new(),
    };
    sh.health.set_ready(true);
    tracing::info!(worker = %cfg.worker_id, storage = %sh.store.describe(), "consuming");
    let mut connection_check = tokio::time::interval(CONNECTION_CHECK);
    let (ready_tx, mut ready_rx) = mpsc::channel::<InHand>(1024);
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
            _ = work.broken.cancelled() => {
                break Ok(SessionEnd::ConnectionLost("a publish or acknowledgement failed".into()))
            }
            _ = connection_check.tick() => {
                if !conn.is_connected() {
                    break Ok(SessionEnd::ConnectionLost("the connection is down".into()));
                }
            }
            (i, d) = next_delivery(&mut jobs) => match d {
                Some(Ok(d)) => work.intake(sh, d, jobs[i].0.clone(), &ready_tx),
                Some(Err(e)) => break Ok(SessionEnd::ConnectionLost(e.to_string())),
                None => {
                    let key = jobs[i].0.routing_key();
                    break Ok(SessionEnd::ConnectionLost(format!("consumer of {key} closed")));
                }
            },
            c = control.next() => match c {
                Some(Ok(d)) => {
                    lock(&sh.cancellations).apply(d.body());
                    let cancels = lock(&sh.cancellations);
                    work.end_waiting(&mut batcher, EventKind::Canceled, |j| cancels.covers(j));
                }
                Some(Err(e)) => break Ok(SessionEnd::ConnectionLost(e.to_string())),
                None => break Ok(SessionEnd::ConnectionLost("control consumer closed".into())),
            },
            Some(h) = ready_rx.recv() => {
                let (job, lane, arrived) = (h.job.clone(), h.meta.route.lane, h.meta.arrived);
                batcher.push(Pending { job, model: h.model, lane, arrived, extra: h });
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
            let now = OffsetDateTime::now_utc();
            work.end_waiting(&mut batcher, EventKind::Expired, |j| j.is_expired(now));
            match batcher.next_batch(Instant::now()) {
                Decision::Ready(batch) => {
                    wake = None;
                    let jobs = batch.into_iter().map(|p| p.extra).collect();
                    let (ctx, tracker, broken) =
                        (work.ctx.clone(), work.tracker.clone(), work.broken.clone());
                    inflight = Some(tokio::spawn(async move {
                        let BatchResult { jobs, device_error } = render_batch(&ctx, jobs).await?;
                        let w = Work {
                            ctx,
                            tracker,
                            broken,
                        };
                        for (h, action) in jobs {
                            w.finish(h, action);
                        }
                        device_error.map_or(Ok(()), Err)
                    }));
                }
                Decision::WaitUntil(t) => wake = Some(t),
                Decision::Empty => wake = None,
            }
        }
    };
    let consumers: Vec<Consumer> = jobs.into_iter().map(|(_, c)| c).collect();
    teardown(sh, conn, work, batcher, inflight, consumers).await;
    end
}

/// Stops consuming; what has not started goes back to the queue for another worker; the batch on
/// the device and the in-flight uploads get the grace period.
async fn teardown(
    sh: &Shared,
    conn: &Connection,
    work: Work,
    mut batcher: Batcher<InHand>,
    inflight: Option<tokio::task::JoinHandle<Result<(), String>>>,
    consumers: Vec<Consumer>,
) {
    let grace = sh.cfg.grace_period;
    if !batcher.is_empty() {
        tracing::info!(
            waiting = batcher.len(),
            "requeueing jobs that had not started"
        );
    }
    // When the connection is gone the broker requeues everything unsettled by itself, and every
    // settle here would only wait out its timeout.
    let connected = conn.is_connected();
    if connected {
        for c in &consumers {
            c.cancel().await;
        }
    }
    let waiting = batcher.drain();
    if connected {
        for p in waiting {
            let _ = p.extra.delivery.requeue().await;
        }
    }
    if let Some(h) = inflight {
        tracing::info!(connected, "waiting for the batch on the device");
        // The batch on the device finishes (its jobs are acked when stored) unless the connection
        // died; its render is not waited for longer than the grace period.
        if tokio::time::timeout(grace, h).await.is_err() {
            tracing::warn!(
                "the batch on the device outlived the grace period; its jobs will be redelivered"
            );
        }
    }
    work.tracker.close();
    tracing::info!(
        tasks = work.tracker.len(),
        "waiting for in-flight uploads and events"
    );
    if tokio::time::timeout(grace, work.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with uploads still in flight; they will be redelivered");
    }
    sh.health.set_ready(false);
}
