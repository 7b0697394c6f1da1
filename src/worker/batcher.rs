//! Grouping compatible jobs into one device batch. Pure: no clock of its own, no broker.
//!
//! Jobs are compatible when they are for the same served model and share size, steps, sampler,
//! guidance, long-prompt mode, weighting and LoRA adapters with their scales
//! (`Generation::is_batchable_with`: one batch runs on one merged model). The head of the interactive queue always goes first, so a bulk
//! backlog delays an interactive job by at most the batch already on the device; bulk jobs with the
//! same parameters may ride along. A batch that is not full waits at most `window` after its oldest
//! job arrived, trading a little latency for throughput.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::job::Job;
use crate::queue::Lane;

/// A job waiting for the device, with whatever the caller needs to finish it (`T`: the delivery).
pub struct Pending<T> {
    pub job: Job,
    /// The served model that renders it: a batch has one.
    pub model: usize,
    pub lane: Lane,
    pub arrived: Instant,
    pub extra: T,
}

pub enum Decision<T> {
    /// Render these now.
    Ready(Vec<Pending<T>>),
    /// Nothing is due before this instant (the batch window of the oldest job).
    WaitUntil(Instant),
    Empty,
}

pub struct Batcher<T> {
    interactive: VecDeque<Pending<T>>,
    bulk: VecDeque<Pending<T>>,
    /// Most images in one batch.
    max_images: u32,
    window: Duration,
}

impl<T> Batcher<T> {
    pub fn new(max_images: u32, window: Duration) -> Self {
        Self {
            interactive: VecDeque::new(),
            bulk: VecDeque::new(),
            max_images: max_images.max(1),
            window,
        }
    }

    pub fn push(&mut self, p: Pending<T>) {
        match p.lane {
            Lane::Interactive => self.interactive.push_back(p),
            Lane::Bulk => self.bulk.push_back(p),
        }
    }

    pub fn len(&self) -> usize {
        self.interactive.len() + self.bulk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything still waiting (shutdown: requeue them).
    pub fn drain(&mut self) -> Vec<Pending<T>> {
        self.interactive
            .drain(..)
            .chain(self.bulk.drain(..))
            .collect()
    }

    /// Removes and returns the waiting jobs `pred` selects (cancellations, expiries).
    pub fn take_where(&mut self, mut pred: impl FnMut(&Pending<T>) -> bool) -> Vec<Pending<T>> {
        let mut out = Vec::new();
        for q in [&mut self.interactive, &mut self.bulk] {
            let mut keep = VecDeque::with_capacity(q.len());
            for p in q.drain(..) {
                if pred(&p) {
                    out.push(p);
                } else {
                    keep.push_back(p);
                }
            }
            *q = keep;
        }
        out
    }

    pub fn next_batch(&mut self, now: Instant) -> Decision<T> {
        let head = match self.interactive.front().or(self.bulk.front()) {
            Some(h) => h,
            None => return Decision::Empty,
        };
        let mut budget = self.max_images;
        // (lane is interactive, index) of the selected jobs; the head is always selected.
        let mut chosen: Vec<(bool, usize)> = Vec::new();
        let mut images = 0;
        for (is_interactive, q) in [(true, &self.interactive), (false, &self.bulk)] {
            for (i, p) in q.iter().enumerate() {
                let n = p.job.generation.num_images;
                let is_head = chosen.is_empty();
                let fits = n <= budget && images + n <= self.max_images;
                let compatible = p.model == head.model
                    && p.job.generation.is_batchable_with(&head.job.generation);
                if is_head || (fits && compatible) {
                    chosen.push((is_interactive, i));
                    images += n;
                    budget = budget.saturating_sub(n);
                }
            }
        }
        let deadline = head.arrived + self.window;
        if images < self.max_images && now < deadline {
            return Decision::WaitUntil(deadline);
        }
        // Remove back to front so earlier indices stay valid.
        let mut batch = Vec::with_capacity(chosen.len());
        for &(is_interactive, i) in chosen.iter().rev() {
            let q = if is_interactive {
                &mut self.interactive
            } else {
                &mut self.bulk
            };
            if let Some(p) = q.remove(i) {
                batch.push(p);
            }
        }
        batch.reverse();
        Decision::Ready(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobRequest, Limits, ModelDefaults};

    fn job(id: &str, steps: u32, n: u32) -> Job {
        let req = JobRequest {
            job_id: id.into(),
            prompt: "x".into(),
            steps: Some(steps),
            num_images: Some(n),
            seed: Some(1),
            ..Default::default()
        };
        Job::parse(req, &Limits::default(), &ModelDefaults::default()).unwrap()
    }

    fn pending(id: &str, lane: Lane, steps: u32, n: u32, at: Instant) -> Pending<()> {
        Pending {
            job: job(id, steps, n),
            model: 0,
            lane,
            arrived: at,
            extra: (),
        }
    }

    fn ids(d: Decision<()>) -> Vec<String> {
        match d {
            Decision::Ready(b) => b.into_iter().map(|p| p.job.job_id.to_string()).collect(),
            Decision::WaitUntil(_) => vec!["wait".into()],
            Decision::Empty => vec![],
        }
    }

    #[test]
    fn interactive_jobs_go_before_a_bulk_backlog() {
        let t = Instant::now();
        let mut b = Batcher::new(2, Duration::ZERO);
        for i in 0..5 {
            b.push(pending(&format!("bulk{i}"), Lane::Bulk, 20, 1, t));
        }
        b.push(pending("urgent", Lane::Interactive, 30, 1, t));
        assert_eq!(ids(b.next_batch(t)), vec!["urgent"]);
        assert_eq!(ids(b.next_batch(t)), vec!["bulk0", "bulk1"]);
    }

    #[test]
    fn compatible_jobs_share_a_batch_up_to_the_image_budget() {
        let t = Instant::now();
        let mut b = Batcher::new(4, Duration::ZERO);
        b.push(pending("a", Lane::Interactive, 20, 2, t));
        b.push(pending("b", Lane::Interactive, 30, 1, t));
        b.push(pending("c", Lane::Bulk, 20, 2, t));
        b.push(pending("d", Lane::Bulk, 20, 1, t));
        assert_eq!(ids(b.next_batch(t)), vec!["a", "c"]);
        assert_eq!(ids(b.next_batch(t)), vec!["b"]);
        assert_eq!(ids(b.next_batch(t)), vec!["d"]);
        assert!(b.is_empty());
    }

    #[test]
    fn jobs_with_different_long_prompt_modes_are_not_batched() {
        let t = Instant::now();
        let mut b = Batcher::new(4, Duration::ZERO);
        let with_mode = |id: &str, mode: Option<&str>| {
            let req = JobRequest {
                job_id: id.into(),
                prompt: "x".into(),
                seed: Some(1),
                long_prompt: mode.map(str::to_string),
                ..Default::default()
            };
            Pending {
                job: Job::parse(req, &Limits::default(), &ModelDefaults::default()).unwrap(),
                model: 0,
                lane: Lane::Interactive,
                arrived: t,
                extra: (),
            }
        };
        b.push(with_mode("a", None));
        b.push(with_mode("b", Some("truncate")));
        b.push(with_mode("c", Some("chunk")));
        assert_eq!(ids(b.next_batch(t)), vec!["a", "c"]);
        assert_eq!(ids(b.next_batch(t)), vec!["b"]);
    }

    #[test]
    fn only_jobs_with_the_same_adapters_scales_and_files_share_a_batch() {
        let t = Instant::now();
        let mut b = Batcher::new(8, Duration::ZERO);
        let with = |id: &str, loras: &[(&str, f64)], sha: &str| {
            let req = JobRequest {
                job_id: id.into(),
                prompt: "x".into(),
                seed: Some(1),
                loras: Some(
                    loras
                        .iter()
                        .map(|(uri, scale)| crate::job::LoraRequest {
                            uri: uri.to_string(),
                            scale: Some(*scale),
                        })
                        .collect(),
                ),
                ..Default::default()
            };
            let mut job = Job::parse(req, &Limits::default(), &ModelDefaults::default()).unwrap();
            // As intake records them once the files are fetched.
            for l in &mut job.generation.loras {
                l.sha256 = Some(sha.into());
            }
            Pending {
                job,
                model: 0,
                lane: Lane::Interactive,
                arrived: t,
                extra: (),
            }
        };
        b.push(with("a", &[("ink.safetensors", 0.8)], "1"));
        b.push(with("none", &[], "1"));
        b.push(with("scale", &[("ink.safetensors", 0.5)], "1"));
        b.push(with("b", &[("ink.safetensors", 0.8)], "1"));
        b.push(with(
            "stack",
            &[("ink.safetensors", 0.8), ("face.safetensors", 1.0)],
            "1",
        ));
        b.push(with("changed", &[("ink.safetensors", 0.8)], "2"));
        b.push(with(
            "order",
            &[("face.safetensors", 1.0), ("ink.safetensors", 0.8)],
            "1",
        ));
        assert_eq!(ids(b.next_batch(t)), vec!["a", "b"]);
        for alone in ["none", "scale", "stack", "changed", "order"] {
            assert_eq!(ids(b.next_batch(t)), vec![alone]);
        }
    }

    #[test]
    fn jobs_for_different_models_are_not_batched() {
        let t = Instant::now();
        let mut b = Batcher::new(4, Duration::ZERO);
        for (id, model) in [("a", 0), ("b", 1), ("c", 0), ("d", 1)] {
            b.push(Pending {
                model,
                ..pending(id, Lane::Interactive, 20, 1, t)
            });
        }
        assert_eq!(ids(b.next_batch(t)), vec!["a", "c"]);
        assert_eq!(ids(b.next_batch(t)), vec!["b", "d"]);
    }

    #[test]
    fn a_partial_batch_waits_for_the_window_then_goes() {
        let t = Instant::now();
        let mut b = Batcher::new(4, Duration::from_millis(50));
        b.push(pending("a", Lane::Interactive, 20, 1, t));
        assert!(
            matches!(b.next_batch(t), Decision::WaitUntil(d) if d == t + Duration::from_millis(50))
        );
        assert_eq!(ids(b.next_batch(t + Duration::from_millis(50))), vec!["a"]);
    }

    #[test]
    fn a_full_batch_does_not_wait() {
        let t = Instant::now();
        let mut b = Batcher::new(2, Duration::from_secs(10));
        b.push(pending("a", Lane::Bulk, 20, 1, t));
        b.push(pending("b", Lane::Bulk, 20, 1, t));
        assert_eq!(ids(b.next_batch(t)), vec!["a", "b"]);
    }

    #[test]
    fn take_where_removes_only_the_selected() {
        let t = Instant::now();
        let mut b = Batcher::new(2, Duration::ZERO);
        b.push(pending("a", Lane::Bulk, 20, 1, t));
        b.push(pending("b", Lane::Interactive, 20, 1, t));
        let taken = b.take_where(|p| p.job.job_id.as_str() == "a");
        assert_eq!(taken.len(), 1);
        assert_eq!(b.len(), 1);
    }
}
