//! Items → jobs: the command's defaults, `--images-per-prompt` copies, a seed (always explicit, so it
//! is recorded), a stable job id, the job's place in the batch and its key prefix.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::expand::{Item, Items};
use super::seeds::{SeedStrategy, Seeder};

/// The batch-wide settings that turn items into jobs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Defaults for fields an item does not set (already JSON-typed).
    pub defaults: Map<String, Value>,
    pub images_per_prompt: u32,
    pub seeds: SeedStrategy,
    /// `None`: derived from the expanded jobs, so the same command gets the same id.
    pub batch_id: Option<String>,
    pub key_prefix: Option<String>,
}

/// Images a job renders: its `num_images`, or the workers' default of 1 (`Generation::parse`). An
/// invalid value is rejected later by the workers' parser; here it only has to stay in the range of
/// the parsed field (`u32`).
fn images_of(job: &Map<String, Value>) -> u64 {
    job.get("num_images")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, u32::MAX.into())
}

/// A job ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedJob {
    pub origin: String,
    pub job_id: String,
    pub body: Map<String, Value>,
}

/// Items → jobs, on demand: defaults, copies, seeds, batch id, job ids, `batch` and
/// `output.key_prefix`. [`Planner::new`] walks the items once (the batch id digest, the largest
/// `num_images`); [`Planner::jobs`] then makes the jobs in batch order as often as asked, each from
/// its item, so a batch's memory is its items' (a template's value lists), not its jobs'.
pub struct Planner {
    items: Items,
    plan: Plan,
    batch_id: String,
    prefix: String,
    max_images: u64,
    total: u64,
}

impl Planner {
    pub fn new(items: Items, plan: &Plan) -> Self {
        let copies = plan.images_per_prompt.max(1);
        let mut h = Sha256::new();
        let mut max_images = 1;
        let mut total = 0u64;
        for i in 0..items.len() {
            for copy in 0..copies {
                let (_, job) = with_defaults(&items.item(i), copy, plan);
                max_images = max_images.max(images_of(&job));
                total += 1;
                // The batch id covers everything that defines the set (not the seeds of the random
                // strategy, which derive from it).
                if plan.batch_id.is_none() {
                    h.update(Value::Object(job).to_string().as_bytes());
                    h.update(b"\n");
                }
            }
        }
        let batch_id = plan.batch_id.clone().unwrap_or_else(|| {
            h.update(format!("{:?}", plan.seeds).as_bytes());
            format!("b{}", &hex::encode(h.finalize())[..15])
        });
        let prefix = plan
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("datasets/{batch_id}/"));
        Self {
            items,
            plan: plan.clone(),
            batch_id,
            prefix,
            max_images,
            total,
        }
    }

    pub fn batch_id(&self) -> &str {
        &self.batch_id
    }

    /// The batch's own key prefix (`--key-prefix`, else `datasets/<batch id>/`).
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Every job, in batch order.
    pub fn jobs(&self) -> impl Iterator<Item = PlannedJob> + '_ {
        let copies = self.plan.images_per_prompt.max(1);
        let mut seeder = Seeder::new(self.plan.seeds, &self.batch_id, self.max_images);
        (0..self.items.len())
            .flat_map(move |i| (0..copies).map(move |copy| (i, copy)))
            .enumerate()
            .map(move |(index, (i, copy))| {
                let (origin, mut body) = with_defaults(&self.items.item(i), copy, &self.plan);
                let index = index as u64;
                let seed = seeder.seed(index, images_of(&body));
                body.entry("seed").or_insert_with(|| Value::from(seed));
                let job_id = match body.get("job_id").and_then(Value::as_str) {
                    Some(id) => id.to_string(),
                    None => format!("{}-{index:07}", self.batch_id),
                };
                body.insert("job_id".into(), Value::from(job_id.clone()));
                body.insert(
                    "batch".into(),
                    serde_json::json!({"id": self.batch_id, "index": index, "total": self.total}),
                );
                let output = body
                    .entry("output")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(o) = output {
                    o.entry("key_prefix")
                        .or_insert_with(|| Value::from(self.prefix.clone()));
                }
                PlannedJob {
                    origin,
                    job_id,
                    body,
                }
            })
    }
}

/// Copy `copy` of an item with the command's defaults (and, for a row that sets its seed, the seed
/// after the images of the copies before).
fn with_defaults(item: &Item, copy: u32, plan: &Plan) -> (String, Map<String, Value>) {
    let mut job = item.job.clone();
    for (k, v) in &plan.defaults {
        job.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let origin = if plan.images_per_prompt > 1 {
        format!("{} (copy {})", item.origin, copy + 1)
    } else {
        item.origin.clone()
    };
    if let Some(seed) = job.get("seed").and_then(Value::as_u64) {
        let step = u64::from(copy) * images_of(&job);
        job.insert("seed".into(), Value::from(seed.wrapping_add(step)));
    }
    (origin, job)
}

/// All of a batch's jobs at once (small batches and tests).
pub fn plan(items: Vec<Item>, plan: &Plan) -> (String, Vec<PlannedJob>) {
    let p = Planner::new(Items::List(items), plan);
    let jobs = p.jobs().collect();
    (p.batch_id, jobs)
}
