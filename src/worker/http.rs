//! The worker's HTTP side door (`T2I_HTTP_ADDR`): `/healthz` (the process is alive), `/readyz` (the
//! model is warm and the consumers are up) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

/// Everything the worker reports.
pub struct Metrics {
    registry: Registry,
    /// Jobs by outcome: succeeded, failed, rejected, retried, expired, canceled, reannounced.
    pub jobs: IntCounterVec,
    pub images: IntCounter,
    pub queue_wait: Histogram,
    /// Seconds per phase: inference (per batch), encode and upload (per job).
    pub phase: HistogramVec,
    pub batch_size: Histogram,
    pub device_memory: Gauge,
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry =
            Registry::new_custom(Some("t2i".into()), None).expect("static prefix is valid");
        let secs = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let jobs = IntCounterVec::new(
            Opts::new("jobs_total", "Jobs handled, by outcome"),
            &["outcome"],
        )
        .expect("static metric");
        let images =
            IntCounter::new("images_total", "Images generated and stored").expect("static metric");
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "queue_wait_seconds",
                "Publication (or receipt) to start of rendering",
            )
            .buckets(secs.clone()),
        )
        .expect("static metric");
        let phase = HistogramVec::new(
            HistogramOpts::new(
                "phase_seconds",
                "Time per phase: inference per batch, encode and upload per job",
            )
            .buckets(secs),
            &["phase"],
        )
        .expect("static metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_images", "Images per device batch")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
        )
        .expect("static metric");
        let device_memory = Gauge::new(
            "device_memory_bytes",
            "Device memory in use (CUDA), 0 where unknown",
        )
        .expect("static metric");
        for m in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(images.clone()),
            Box::new(queue_wait.clone()),
            Box::new(phase.clone()),
            Box::new(batch_size.clone()),
            Box::new(device_memory.clone()),
        ] {
            registry.register(m).expect("metrics are registered once");
        }
        Arc::new(Self {
            registry,
            jobs,
            images,
            queue_wait,
            phase,
            batch_size,
            device_memory,
            ready: AtomicBool::new(false),
        })
    }

    pub fn outcome(&self, outcome: &str) {
        self.jobs.with_label_values(&[outcome]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], m.render())
}

/// Serves until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    metrics_state: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(metrics_state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "HTTP endpoint up");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
