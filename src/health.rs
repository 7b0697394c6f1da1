//! The HTTP side door of every long-running subcommand (`t2i worker`, `webhooks`, `gateway`):
//! `/healthz` (the process is alive), `/readyz` (it can do its work: model warm and consumers up,
//! or connected to the broker) and `/metrics` (Prometheus text format, from one registry whose
//! metric names all start with `t2i_`, plus the standard `process_*` metrics on Linux). Each
//! subcommand registers its own metrics and says when it is ready; this module adds what every
//! subcommand reports alike: `t2i_ready` (what `/readyz` says, as 1/0), `t2i_build_info{version}`
//! (always 1) and, for HTTP servers that want them ([`HttpMetrics`]), requests by route and status.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// Readiness and the metrics registry of one process.
pub struct Health {
    ready: AtomicBool,
    ready_gauge: IntGauge,
    registry: Registry,
    /// Unprefixed, so the process metrics keep the names every dashboard expects (`process_*`).
    process: Registry,
}

impl Health {
    pub fn new() -> Arc<Self> {
        let registry =
            Registry::new_custom(Some("t2i".into()), None).expect("a static, valid prefix");
        let ready_gauge = IntGauge::new("ready", "1 when /readyz answers 200, else 0")
            .expect("a static, valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "build_info",
                "Always 1; the labels say which build is running",
            ),
            &["version"],
        )
        .expect("a static, valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for m in [
            Box::new(ready_gauge.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(build_info),
        ] {
            registry.register(m).expect("registered once");
        }
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");
        Arc::new(Self {
            ready: AtomicBool::new(false),
            ready_gauge,
            registry,
            process,
        })
    }

    /// Where the subcommand registers its metrics (names get the `t2i_` prefix).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.ready_gauge.set(ready as i64);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Every registered metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let _ = TextEncoder::new().encode(&families, &mut buf);
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

/// Requests by route, method and status (`t2i_http_requests_total`) and their latency
/// (`t2i_http_request_duration_seconds`). The route is the matched path template
/// (`/v1/jobs/{id}`), never the raw URL, so ids and probes cannot grow the label set; requests
/// that match no route share `route="unmatched"`.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("a static, valid metric");
        // Up to 10 min: `POST /generate-image` waits for the render (`--wait-timeout-s`).
        let buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            120.0, 300.0, 600.0,
        ];
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency, until the response head, by route and method",
            )
            .buckets(buckets),
            &["route", "method"],
        )
        .expect("a static, valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        registry
            .register(Box::new(duration.clone()))
            .expect("registered once");
        Self { requests, duration }
    }

    /// Wraps every route and the fallback of `router`. `Router::layer` runs after routing, which
    /// is what makes the matched path template known to the middleware.
    pub fn layer<S: Clone + Send + Sync + 'static>(self, router: Router<S>) -> Router<S> {
        router.layer(axum::middleware::from_fn_with_state(self, track))
    }
}

async fn track(State(m): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    // Any token is a valid method; only the standard ones get their own label value.
    let standard = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::PATCH,
        Method::OPTIONS,
    ];
    let method = match standard.contains(req.method()) {
        true => req.method().as_str().to_owned(),
        false => "other".to_owned(),
    };
    let start = Instant::now();
    let response = next.run(req).await;
    m.duration
        .with_label_values(&[&route, &method])
        .observe(start.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_reports_readiness_build_and_process() {
        let h = Health::new();
        let text = h.render();
        assert!(text.contains("t2i_ready 0"), "{text}");
        let build = format!(
            "t2i_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        #[cfg(target_os = "linux")]
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} in {text}"
            );
        }
        h.set_ready(true);
        assert!(h.render().contains("t2i_ready 1"));
    }

    #[tokio::test]
    async fn http_metrics_label_the_route_template_and_status() {
        let h = Health::new();
        let router: Router = Router::new().route("/v1/jobs/{id}", get(|| async { "job" }));
        let router = HttpMetrics::new(h.registry()).layer(router);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        for path in ["/v1/jobs/a", "/v1/jobs/b", "/nowhere/x"] {
            reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        }
        let text = h.render();
        for line in [
            "t2i_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"200\"} 2",
            "t2i_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
            "t2i_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/jobs/{id}\"} 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("/v1/jobs/a"), "{text}");
    }
}
