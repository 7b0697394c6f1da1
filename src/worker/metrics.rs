//! What the worker reports on `/metrics` (served by [`crate::health`]): jobs by outcome, images,
//! queue wait, time per phase, batch sizes and device memory.

use std::sync::Arc;

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Everything the worker reports.
pub struct Metrics {
    /// Jobs by outcome: succeeded, failed, rejected, retried, expired, canceled, reannounced.
    pub jobs: IntCounterVec,
    pub images: IntCounter,
    pub queue_wait: Histogram,
    /// Seconds per phase: inference (per batch), encode and upload (per job).
    pub phase: HistogramVec,
    pub batch_size: Histogram,
}

impl Metrics {
    /// Registers the worker's metrics in `registry` (once per process).
    pub fn new(registry: &Registry) -> Arc<Self> {
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
        // Registered for dashboards; nothing sets it yet, so it reads 0 ("unknown") everywhere.
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
            jobs,
            images,
            queue_wait,
            phase,
            batch_size,
        })
    }

    pub fn outcome(&self, outcome: &str) {
        self.jobs.with_label_values(&[outcome]).inc();
    }
}
