//! The HTTP side door of every long-running subcommand (`t2i worker`, `webhooks`, `gateway`):
//! `/healthz` (the process is alive), `/readyz` (it can do its work: model warm and consumers up,
//! or connected to the broker) and `/metrics` (Prometheus text format, from one registry whose
//! metric names all start with `t2i_`). Each subcommand registers its own metrics and says when it
//! is ready; this module serves them and knows nothing else about them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// Readiness and the metrics registry of one process.
pub struct Health {
    ready: AtomicBool,
    registry: Registry,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            registry: Registry::new_custom(Some("t2i".into()), None)
                .expect("a static, valid prefix"),
        })
    }

    /// Where the subcommand registers its metrics (names get the `t2i_` prefix).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Every registered metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The three routes, to serve alone ([`serve`]) or merged into a larger router (the gateway).
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], h.render())
}

/// Binds `addr` (an error here is the caller's to report) and serves until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "health and metrics endpoint up");
    tokio::spawn(async move {
        let served = axum::serve(listener, health.router())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health endpoint failed");
        }
    });
    Ok(())
}
