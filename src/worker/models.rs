//! A worker serving several models within a memory budget (`--models`, `--memory-budget`).
//!
//! [`Served`] is what the async side knows of each model from its files alone (spec, pool slug,
//! the defaults its jobs are parsed with, its safety checker): enough to take, route and announce
//! its jobs before it is ever loaded. [`ModelSet`] lives on the render thread
//! ([`crate::pipeline::runner::Pipelines`]): it loads a model when a batch for it comes and, to stay
//! within the budget, first unloads the least recently used others; [`Residency`] is that decision,
//! pure. Loading and unloading happen only there, between two batches, so a model with a batch in
//! flight is never unloaded; batches never mix models (the batcher keys on the model).
//!
//! The budget counts the models' loaded tensors as measured when they loaded
//! ([`crate::pipeline::Pipeline::loaded_bytes`]); rendering's working memory comes on top. A model
//! never loaded yet has no measured size, so room is made for the whole budget before its first load
//! (every idle model is unloaded); from then on its size is known. A model larger than the budget on
//! its own, or one that failed to load, is not loaded again: its jobs fail with
//! `model_unavailable` naming the reason, so a model that cannot fit never loops on out-of-memory.

use std::sync::Arc;
use std::time::Instant;

use crate::config::ModelConfig;
use crate::events::SafetyChecker;
use crate::job::{ModelDefaults, ModelSlug, model_matches};
use crate::pipeline::runner::Pipelines;
use crate::pipeline::{Pipeline, PipelineError};

use super::metrics::Metrics;

/// A served model as the async side sees it.
#[derive(Debug, Clone)]
pub struct Served {
    /// As configured (`segmind/SSD-1B`): reported in events and image metadata.
    pub spec: String,
    pub slug: ModelSlug,
    /// Its jobs' absent fields take these (its native size, sampler, guidance).
    pub defaults: ModelDefaults,
    pub safety_checker: Option<SafetyChecker>,
}

/// Which served model a job is for: the one it names, or without a name the first (the default
/// pool's). `None`: this worker does not serve the model it names.
pub fn model_of(served: &[Served], asked: Option<&str>) -> Option<usize> {
    match asked {
        None => Some(0),
        Some(m) => served.iter().position(|s| model_matches(m, &s.spec)),
    }
}

/// What must happen before model `i` can render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// It is loaded.
    Ready,
    /// Unload these (least recently used first), then load it.
    Load { unload: Vec<usize> },
    /// Its measured size alone exceeds the budget.
    TooLarge { bytes: u64, budget: u64 },
}

/// Which models are loaded, their measured sizes and when each was last used; the budget.
#[derive(Debug, Clone)]
pub struct Residency {
    budget: Option<u64>,
    models: Vec<Resident>,
    clock: u64,
}

#[derive(Debug, Clone, Default)]
struct Resident {
    loaded: bool,
    bytes: Option<u64>,
    last_used: u64,
}

impl Residency {
    pub fn new(models: usize, budget: Option<u64>) -> Self {
        Self {
            budget,
            models: vec![Resident::default(); models],
            clock: 0,
        }
    }

    /// What rendering with model `i` takes now (module docs).
    pub fn plan(&self, i: usize) -> Plan {
        let me = &self.models[i];
        if me.loaded {
            return Plan::Ready;
        }
        let Some(budget) = self.budget else {
            return Plan::Load { unload: vec![] };
        };
        let need = match me.bytes {
            Some(bytes) if bytes > budget => return Plan::TooLarge { bytes, budget },
            Some(bytes) => bytes,
            None => budget,
        };
        let mut used: u64 = self.loaded().map(|(_, r)| r.bytes.unwrap_or(0)).sum();
        let mut idle: Vec<(usize, &Resident)> = self.loaded().collect();
        idle.sort_by_key(|(_, r)| r.last_used);
        let mut unload = Vec::new();
        for (j, r) in idle {
            if used.saturating_add(need) <= budget {
                break;
            }
            unload.push(j);
            used -= r.bytes.unwrap_or(0);
        }
        Plan::Load { unload }
    }

    fn loaded(&self) -> impl Iterator<Item = (usize, &Resident)> {
        self.models.iter().enumerate().filter(|(_, r)| r.loaded)
    }

    /// Model `i` was loaded and holds `bytes`.
    pub fn set_loaded(&mut self, i: usize, bytes: u64) {
        let r = &mut self.models[i];
        (r.loaded, r.bytes) = (true, Some(bytes));
    }

    /// Model `i` measured `bytes` but is not kept (too large for the budget).
    pub fn set_measured(&mut self, i: usize, bytes: u64) {
        self.models[i].bytes = Some(bytes);
    }

    pub fn set_unloaded(&mut self, i: usize) {
        self.models[i].loaded = false;
    }

    /// Model `i` renders now (the least recently used are unloaded first).
    pub fn touch(&mut self, i: usize) {
        self.clock += 1;
        self.models[i].last_used = self.clock;
    }
}

/// One served model on the render thread.
struct Slot {
    config: ModelConfig,
    slug: String,
    pipeline: Option<Pipeline>,
    /// Why it is not loaded again (failed to load, or larger than the budget).
    unavailable: Option<String>,
}

/// The served models' pipelines on the render thread (module docs).
pub struct ModelSet {
    slots: Vec<Slot>,
    residency: Residency,
    /// Bytes of merged LoRA variants each loaded model may keep (`--lora-memory-max-mb`), on top
    /// of its weights.
    lora_budget: u64,
    metrics: Arc<Metrics>,
}

impl ModelSet {
    /// `configs[i]` is served model `i`; `first`, already loaded and warm, is model 0 (the caller
    /// has checked that it fits the budget).
    pub fn new(
        configs: Vec<ModelConfig>,
        first: Pipeline,
        budget: Option<u64>,
        lora_budget: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = configs
            .into_iter()
            .map(|config| Slot {
                slug: ModelSlug::of(&config.spec)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| config.spec.clone()),
                config,
                pipeline: None,
                unavailable: None,
            })
            .collect::<Vec<_>>();
        let mut set = Self {
            residency: Residency::new(slots.len(), budget),
            slots,
            lora_budget,
            metrics,
        };
        let bytes = first.loaded_bytes();
        set.residency.set_loaded(0, bytes);
        set.residency.touch(0);
        set.slots[0].pipeline = Some(first);
        set.count_load(0, bytes, true);
        set
    }

    /// The metrics of model `i` after a load (`kept`: it stays loaded).
    fn count_load(&self, i: usize, bytes: u64, kept: bool) {
        let (m, slug) = (&self.metrics, self.slots[i].slug.as_str());
        m.model_weight_bytes
            .with_label_values(&[slug])
            .set(bytes as i64);
        m.model_loaded.with_label_values(&[slug]).set(kept as i64);
        m.model_loads.with_label_values(&[slug]).inc();
    }

    fn unload(&mut self, j: usize) {
        let slot = &mut self.slots[j];
        // Dropping the pipeline frees its tensors on the device.
        slot.pipeline = None;
        self.residency.set_unloaded(j);
        let m = &self.metrics;
        m.model_loaded.with_label_values(&[&slot.slug]).set(0);
        m.model_unloads.with_label_values(&[&slot.slug]).inc();
        tracing::info!(model = %slot.config.spec, "model unloaded to fit the memory budget");
    }

    fn load(&mut self, i: usize) -> Result<(), String> {
        let started = Instant::now();
        let spec = self.slots[i].config.spec.clone();
        let loaded = self.slots[i]
            .config
            .load()
            .map_err(|e| format!("model {spec:?} could not be loaded: {e}"))?;
        let bytes = loaded.pipeline.loaded_bytes();
        if let Some(budget) = self.residency.budget
            && bytes > budget
        {
            self.residency.set_measured(i, bytes);
            self.count_load(i, bytes, false);
            return Err(too_large(&spec, bytes, budget));
        }
        self.residency.set_loaded(i, bytes);
        self.count_load(i, bytes, true);
        loaded.pipeline.set_lora_memory_budget(self.lora_budget);
        self.slots[i].pipeline = Some(loaded.pipeline);
        tracing::info!(model = %spec, bytes, load_s = started.elapsed().as_secs_f64(), "model loaded");
        Ok(())
    }
}

/// Why a model is not served: its weights alone exceed the budget.
pub fn too_large(spec: &str, bytes: u64, budget: u64) -> String {
    format!(
        "model {spec:?} needs {bytes} bytes of weights, more than the worker's memory budget of \
         {budget} bytes (--memory-budget)"
    )
}

impl Pipelines for ModelSet {
    fn pipeline(&mut self, i: usize) -> Result<&Pipeline, PipelineError> {
        if i >= self.slots.len() {
            return Err(PipelineError::ModelUnavailable(format!(
                "no served model {i}"
            )));
        }
        if let Some(why) = &self.slots[i].unavailable {
            return Err(PipelineError::ModelUnavailable(why.clone()));
        }
        match self.residency.plan(i) {
            Plan::Ready => {}
            Plan::TooLarge { bytes, budget } => {
                let why = too_large(&self.slots[i].config.spec, bytes, budget);
                return Err(PipelineError::ModelUnavailable(why));
            }
            Plan::Load { unload } => {
                for j in unload {
                    self.unload(j);
                }
                if let Err(why) = self.load(i) {
                    tracing::error!(error = %why, "model unavailable");
                    self.slots[i].unavailable = Some(why.clone());
                    return Err(PipelineError::ModelUnavailable(why));
                }
            }
        }
        self.residency.touch(i);
        self.slots[i]
            .pipeline
            .as_ref()
            .ok_or_else(|| PipelineError::ModelUnavailable("model not loaded".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn with(budget: Option<u64>, loaded: &[(usize, u64)], n: usize) -> Residency {
        let mut r = Residency::new(n, budget);
        for &(i, bytes) in loaded {
            r.set_loaded(i, bytes);
            r.touch(i);
        }
        r
    }

    #[test]
    fn a_loaded_model_is_ready_and_without_a_budget_nothing_is_unloaded() {
        let r = with(None, &[(0, 9 * GB), (1, 9 * GB)], 3);
        assert_eq!(r.plan(0), Plan::Ready);
        assert_eq!(r.plan(2), Plan::Load { unload: vec![] });
    }

    #[test]
    fn the_least_recently_used_go_first_and_only_as_many_as_needed() {
        let mut r = with(Some(10 * GB), &[(0, 3 * GB), (1, 3 * GB), (2, 3 * GB)], 4);
        r.set_measured(3, 4 * GB);
        // 9 used + 4 needed: one must go, the least recently used (0).
        assert_eq!(r.plan(3), Plan::Load { unload: vec![0] });
        r.touch(0);
        assert_eq!(r.plan(3), Plan::Load { unload: vec![1] });
        r.set_measured(3, 7 * GB);
        assert_eq!(r.plan(3), Plan::Load { unload: vec![1, 2] });
    }

    #[test]
    fn a_model_of_unknown_size_gets_the_whole_budget() {
        let r = with(Some(10 * GB), &[(0, 3 * GB), (1, 2 * GB)], 3);
        assert_eq!(r.plan(2), Plan::Load { unload: vec![0, 1] });
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_without_unloading() {
        let mut r = with(Some(4 * GB), &[(0, 3 * GB)], 2);
        r.set_measured(1, 5 * GB);
        assert_eq!(
            r.plan(1),
            Plan::TooLarge {
                bytes: 5 * GB,
                budget: 4 * GB
            }
        );
    }

    #[test]
    fn an_unloaded_model_frees_its_share() {
        let mut r = with(Some(6 * GB), &[(0, 3 * GB), (1, 3 * GB)], 3);
        r.set_measured(2, 3 * GB);
        assert_eq!(r.plan(2), Plan::Load { unload: vec![0] });
        r.set_unloaded(0);
        assert_eq!(r.plan(2), Plan::Load { unload: vec![] });
        assert!(matches!(r.plan(0), Plan::Load { .. }));
    }

    #[test]
    fn jobs_find_their_model_by_any_of_its_names() {
        let served = |spec: &str| Served {
            spec: spec.into(),
            slug: ModelSlug::of(spec).unwrap(),
            defaults: ModelDefaults::default(),
            safety_checker: None,
        };
        let all = [served("segmind/SSD-1B"), served("/models/sd15-tiny")];
        assert_eq!(model_of(&all, None), Some(0));
        assert_eq!(model_of(&all, Some("SSD-1B")), Some(0));
        assert_eq!(model_of(&all, Some("sd15-tiny")), Some(1));
        assert_eq!(model_of(&all, Some("segmind/Segmind-Vega")), None);
    }
}
