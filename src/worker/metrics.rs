//! What the worker reports on `/metrics` (served by [`crate::health`], which adds `t2i_ready`,
//! `t2i_build_info` and the `process_*` metrics). Names follow Prometheus' rules: base units
//! (`_seconds`, `_bytes`), `_total` on counters, one meaning per metric — per-batch and per-job
//! timings are separate histograms, and retries are not outcomes.

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Histogram buckets in seconds, for queue waits and phases alike. They go past the 600 s default
/// job timeout (`--job-timeout-s`) so slow batches and long backlogs land in a finite bucket
/// rather than only in `+Inf`.
pub const SECONDS_BUCKETS: [f64; 20] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    900.0, 1800.0, 3600.0, 7200.0,
];

/// Terminal outcomes of a delivery (`t2i_jobs_total{outcome}`), all present from the start at 0
/// so that ratios are defined before the first job. `reannounced`: a redelivered job whose
/// result was already stored, announced again (not a second `succeeded`).
pub const OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "rejected",
    "expired",
    "canceled",
    "reannounced",
];

/// Everything the worker reports.
pub struct Metrics {
    /// Deliveries settled for good, by outcome (see [`OUTCOMES`]), counted once the terminal
    /// event is announced: an announcement that fails is redelivered and counted then.
    jobs: IntCounterVec,
    /// Transient failures sent to the retry queue (not an outcome: the job comes back).
    pub retries: IntCounter,
    pub images: IntCounter,
    pub queue_wait: Histogram,
    /// One observation per batch on the device.
    pub batch_inference: Histogram,
    /// One observation per job.
    pub job_encode: Histogram,
    pub job_upload: Histogram,
    pub batch_size: Histogram,
    /// Deliveries this worker holds unsettled: waiting for a batch, rendering, or being stored.
    pub held: IntGauge,
    /// Jobs in the batch on the device now.
    pub rendering: IntGauge,
    /// Per served model (its pool's slug): 1 while it is loaded on the device.
    pub model_loaded: IntGaugeVec,
    /// Per served model: the bytes its loaded tensors hold (kept after an unload: its size).
    pub model_weight_bytes: IntGaugeVec,
    pub model_loads: IntCounterVec,
    pub model_unloads: IntCounterVec,
    /// Registered only where the device can say (CUDA), so no one reads a 0 as a measurement.
    device_memory: OnceLock<(Device, Gauge)>,
}

fn seconds(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()))
        .expect("static metric")
}

impl Metrics {
    /// Registers the worker's metrics in `registry` (once per process).
    pub fn new(registry: &Registry) -> Arc<Self> {
        let jobs = IntCounterVec::new(
            Opts::new(
                "jobs_total",
                "Jobs settled for good, by terminal outcome (retries are t2i_job_retries_total)",
            ),
            &["outcome"],
        )
        .expect("static metric");
        for o in OUTCOMES {
            jobs.with_label_values(&[o]);
        }
        let retries = IntCounter::new(
            "job_retries_total",
            "Transient failures sent to the retry queue for a later attempt",
        )
        .expect("static metric");
        let images =
            IntCounter::new("images_total", "Images generated and stored").expect("static metric");
        let queue_wait = seconds(
            "queue_wait_seconds",
            "Per job: publication (or receipt) to start of rendering",
        );
        let batch_inference = seconds(
            "batch_inference_seconds",
            "Per batch: time on the device (text encoding, denoising, VAE decode)",
        );
        let job_encode = seconds("job_encode_seconds", "Per job: encoding its images");
        let job_upload = seconds(
            "job_upload_seconds",
            "Per job: storing its images and result.json",
        );
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_images", "Images per device batch")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
        )
        .expect("static metric");
        let held = IntGauge::new(
            "jobs_held",
            "Deliveries held unsettled: waiting for a batch, rendering or being stored",
        )
        .expect("static metric");
        let rendering = IntGauge::new("jobs_rendering", "Jobs in the batch on the device")
            .expect("static metric");
        let per_model = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("static metric")
        };
        let model_loaded = per_model("model_loaded", "1 while the served model is on the device");
        let model_weight_bytes = per_model(
            "model_weight_bytes",
            "Bytes the served model's loaded tensors hold (measured at its last load)",
        );
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["model"]).expect("static metric")
        };
        let model_loads = counter("model_loads_total", "Loads of the served model");
        let model_unloads = counter(
            "model_unloads_total",
            "Unloads of the served model to fit the memory budget",
        );
        for m in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(retries.clone()),
            Box::new(images.clone()),
            Box::new(queue_wait.clone()),
            Box::new(batch_inference.clone()),
            Box::new(job_encode.clone()),
            Box::new(job_upload.clone()),
            Box::new(batch_size.clone()),
            Box::new(held.clone()),
            Box::new(rendering.clone()),
            Box::new(model_loaded.clone()),
            Box::new(model_weight_bytes.clone()),
            Box::new(model_loads.clone()),
            Box::new(model_unloads.clone()),
        ] {
            registry.register(m).expect("metrics are registered once");
        }
        Arc::new(Self {
            jobs,
            retries,
            images,
            queue_wait,
            batch_inference,
            job_encode,
            job_upload,
            batch_size,
            held,
            rendering,
            model_loaded,
            model_weight_bytes,
            model_loads,
            model_unloads,
            device_memory: OnceLock::new(),
        })
    }

    /// Shows every served model from the start (not loaded, nothing counted yet).
    pub fn serve_models<'a>(&self, slugs: impl IntoIterator<Item = &'a str>) {
        for slug in slugs {
            self.model_loaded.with_label_values(&[slug]).set(0);
            self.model_weight_bytes.with_label_values(&[slug]);
            self.model_loads.with_label_values(&[slug]);
            self.model_unloads.with_label_values(&[slug]);
        }
    }

    /// Counts a terminal outcome (one of [`OUTCOMES`]).
    pub fn outcome(&self, outcome: &str) {
        debug_assert!(OUTCOMES.contains(&outcome), "{outcome}");
        self.jobs.with_label_values(&[outcome]).inc();
    }

    #[cfg(test)]
    pub fn outcome_count(&self, outcome: &str) -> u64 {
        self.jobs.with_label_values(&[outcome]).get()
    }

    /// Registers `t2i_device_memory_bytes` when `device` reports its memory use (CUDA), and sets it.
    pub fn watch_device(&self, registry: &Registry, device: &Device) {
        let Some(used) = crate::device::memory_used(device) else {
            return;
        };
        let gauge = Gauge::new(
            "device_memory_bytes",
            "Memory in use on the CUDA device (the whole device, as nvidia-smi shows it)",
        )
        .expect("static metric");
        if registry.register(Box::new(gauge.clone())).is_ok() {
            gauge.set(used as f64);
            let _ = self.device_memory.set((device.clone(), gauge));
        }
    }

    /// Refreshes `t2i_device_memory_bytes` (after each batch: the peak of a batch is near its end).
    pub fn sample_device_memory(&self) {
        if let Some((device, gauge)) = self.device_memory.get()
            && let Some(used) = crate::device::memory_used(device)
        {
            gauge.set(used as f64);
        }
    }

    /// Counts a delivery as held until the returned guard drops (settled, requeued, or lost with
    /// its connection), so the gauge cannot drift whichever way the delivery leaves.
    pub fn hold(self: &Arc<Self>) -> Held {
        self.held.inc();
        Held(self.clone())
    }
}

/// One held delivery in `t2i_jobs_held`.
pub struct Held(Arc<Metrics>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition() -> String {
        let registry = Registry::new_custom(Some("t2i".into()), None).unwrap();
        let m = Metrics::new(&registry);
        m.queue_wait.observe(1.0);
        m.batch_inference.observe(1.0);
        m.job_encode.observe(1.0);
        m.job_upload.observe(1.0);
        m.batch_size.observe(1.0);
        m.serve_models(["ssd-1b"]);
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn names_follow_the_naming_rules() {
        let text = exposition();
        for name in [
            "t2i_jobs_total",
            "t2i_job_retries_total",
            "t2i_images_total",
            "t2i_queue_wait_seconds",
            "t2i_batch_inference_seconds",
            "t2i_job_encode_seconds",
            "t2i_job_upload_seconds",
            "t2i_batch_images",
            "t2i_jobs_held",
            "t2i_jobs_rendering",
            "t2i_model_loaded",
            "t2i_model_weight_bytes",
            "t2i_model_loads_total",
            "t2i_model_unloads_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} in {text}"
            );
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{line}"),
                // Every timing histogram is in seconds; the only other one counts images.
                "histogram" => {
                    assert!(
                        name.ends_with("_seconds") || name == "t2i_batch_images",
                        "{line}"
                    )
                }
                _ => {}
            }
        }
        // The mixed histogram and the retry-as-outcome are gone.
        assert!(!text.contains("phase_seconds"), "{text}");
        assert!(!text.contains("outcome=\"retried\""), "{text}");
        // No device here reports memory, so the gauge is absent rather than a misleading 0.
        assert!(!text.contains("device_memory_bytes"), "{text}");
    }

    #[test]
    fn every_outcome_reads_zero_from_the_start() {
        let text = exposition();
        for o in OUTCOMES {
            assert!(
                text.contains(&format!("t2i_jobs_total{{outcome=\"{o}\"}} 0")),
                "{o} in {text}"
            );
        }
    }

    #[test]
    fn buckets_reach_past_the_default_job_timeout() {
        let top = SECONDS_BUCKETS.last().copied().unwrap();
        assert!(top > 600.0, "{top}");
        let text = exposition();
        assert!(
            text.contains("t2i_batch_inference_seconds_bucket{le=\"900\"}"),
            "{text}"
        );
    }

    #[test]
    fn held_gauge_follows_its_guards() {
        let m = Metrics::new(&Registry::new());
        let (a, b) = (m.hold(), m.hold());
        assert_eq!(m.held.get(), 2);
        drop(a);
        assert_eq!(m.held.get(), 1);
        drop(b);
        assert_eq!(m.held.get(), 0);
    }
}
