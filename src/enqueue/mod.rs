//! `t2i enqueue`: one job from flags or a bulk set (JSONL, CSV, prompt list, prompt template), each
//! item checked with the workers' own `Job::parse` before anything is published; stable job ids
//! (batch id + index), so running the same command again resumes. A rerun lists the batch's key
//! prefix once (not one GET per job): done jobs are skipped, failed ones published again, and jobs
//! an earlier run published that have not ended (queued or running) are left alone unless
//! `--republish-pending`. `batch.json` records the batch's size and how far publishing got
//! ([`crate::batch::BatchRecord`]). Publishing uses confirms with a window of outstanding ones
//! (backpressure). A job naming a model is published on that model's route; one the broker returns
//! because no pool serves the model is failed at once ([`crate::unserved`]) and reported, and the
//! command exits non-zero. `--wait` follows the batch as `t2i batch watch` does and builds the data
//! set from the store as `t2i batch manifest` does.

pub mod expand;
pub mod plan;
pub mod seeds;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};

use crate::batch::watch::{self, Finished};
use crate::batch::{BatchRecord, Seen, scan};
use crate::cli::{EnqueueArgs, UsageError};
use crate::job::{JobId, ModelDefaults, parse_job_body};
use crate::queue::{Connection, Delivered, Lane, Publisher, QueueError, Route};
use crate::storage::{ImageStore, ObjectKey, Store};
use expand::{Combine, InputError, InputFormat, Items};
use plan::{Plan, PlannedJob, Planner};
use seeds::SeedStrategy;

pub async fn run(args: EnqueueArgs) -> Result<()> {
    let prepared = prepare(&args)?;
    if args.dry_run {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for j in prepared.planner.jobs() {
            writeln!(out, "{}", json_text(&j.body))?;
        }
        out.flush()?;
        eprintln!(
            "dry run: {} job(s) in batch {} for the {} queue; nothing published",
            prepared.planner.len(),
            prepared.planner.batch_id(),
            prepared.lane.routing_key()
        );
        return Ok(());
    }
    match publish_and_wait(&args, &prepared).await? {
        Some(finished) => watch::report(&finished),
        None => Ok(()),
    }
}

/// A checked batch, ready to publish.
pub struct Prepared {
    pub lane: Lane,
    pub planner: Planner,
    /// Every key prefix a job of the batch stores under (the batch's own, and any an input row set).
    pub prefixes: BTreeSet<String>,
}

/// Flags and inputs → validated jobs. Any invalid item is reported (up to 100 of them, with file
/// and line) and nothing is published. The jobs are checked as they are made, one at a time.
pub fn prepare(args: &EnqueueArgs) -> Result<Prepared> {
    let usage = |m: String| anyhow::Error::from(UsageError(m));
    let sources = [
        !args.prompt.is_empty(),
        args.input.is_some(),
        args.template.is_some(),
    ]
    .iter()
    .filter(|&&s| s)
    .count();
    if sources != 1 {
        return Err(usage(
            "give exactly one of --prompt, --input or --template".into(),
        ));
    }
    let mut items = Vec::new();
    let mut template = None;
    let mut input_errors = Vec::new();
    if !args.prompt.is_empty() {
        for (i, p) in args.prompt.iter().enumerate() {
            let mut job = Map::new();
            job.insert("prompt".into(), Value::from(p.as_str()));
            items.push(expand::Item {
                origin: format!("--prompt #{}", i + 1),
                job,
            });
        }
    } else if let Some(path) = &args.input {
        let format = match &args.input_format {
            Some(f) => InputFormat::parse(f)
                .ok_or_else(|| usage(format!("--input-format `{f}`: jsonl, csv or prompts")))?,
            None => InputFormat::of_path(path),
        };
        let path = if path.as_os_str() == "-" {
            PathBuf::from("/dev/stdin")
        } else {
            path.clone()
        };
        let (read, errors) = expand::read_file(&path, format);
        items = read;
        input_errors = errors;
    } else if let Some(t) = &args.template {
        let vars = args
            .vars
            .iter()
            .map(|v| expand::parse_var(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(usage)?;
        let combine = if args.zip {
            Combine::Zip
        } else {
            Combine::Cartesian
        };
        template = Some(expand::Template::new(t, &vars, combine).map_err(|e| report(&[e], 1))?);
    }
    let items = match template {
        Some(t) => Items::Template(t),
        None => Items::List(items),
    };
    if items.is_empty() && input_errors.is_empty() {
        return Err(usage("the input holds no jobs".into()));
    }
    let seeds = match args.seed_strategy.as_str() {
        "index" => SeedStrategy::Index { base: args.seed },
        "random" => SeedStrategy::Random { key: args.seed },
        other => {
            return Err(usage(format!("--seed-strategy `{other}`: index or random")));
        }
    };
    if args.images_per_prompt == 0 {
        return Err(usage("--images-per-prompt must be at least 1".into()));
    }
    let mut defaults = Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            defaults.insert(k.to_string(), v);
        }
    };
    let g = &args.generation;
    set(
        "negative_prompt",
        g.negative_prompt.as_deref().map(Value::from),
    );
    set("width", g.width.map(Value::from));
    set("height", g.height.map(Value::from));
    set("steps", g.steps.map(Value::from));
    set("guidance_scale", g.guidance_scale.map(Value::from));
    set("scheduler", g.scheduler.as_deref().map(Value::from));
    set("num_images", args.num_images.map(Value::from));
    set("model", args.model.as_deref().map(Value::from));
    set(
        "output",
        args.format
            .as_deref()
            .map(|f| serde_json::json!({ "format": f })),
    );
    let mut webhook = serde_json::Map::new();
    if let Some(u) = &args.webhook {
        webhook.insert("url".into(), u.as_str().into());
    }
    if let Some(r) = &args.webhook_receiver {
        webhook.insert("receiver".into(), r.as_str().into());
    }
    set(
        "webhook",
        (!webhook.is_empty()).then_some(Value::Object(webhook)),
    );
    let plan = Plan {
        defaults,
        images_per_prompt: args.images_per_prompt,
        seeds,
        batch_id: args.batch_id.clone(),
        key_prefix: args.key_prefix.clone(),
    };
    let planner = Planner::new(items, &plan);
    let batch_id = planner.batch_id().to_string();
    if let Err(r) = crate::job::JobId::parse(&batch_id) {
        return Err(usage(format!("--batch-id: {}", r.reason)));
    }
    // The workers' own checks, with the same bounds (T2I_MIN_SIDE, ... as the workers read them).
    let limits = args.limits.limits();
    let defaults = ModelDefaults::default();
    let mut errors = input_errors;
    let mut invalid = errors.len();
    let mut note = |errors: &mut Vec<InputError>, e: InputError| {
        invalid += 1;
        if errors.len() < 100 {
            errors.push(e);
        }
    };
    // Derived ids (`<batch id>-<index>`) are unique by construction: only ids set by input rows are
    // remembered, to find repeats among them and with the derived ones.
    let mut own_ids = HashSet::new();
    let derived = |id: &str| {
        id.strip_prefix(&batch_id)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < planner.len())
    };
    let mut prefixes = BTreeSet::from([planner.key_prefix().to_string()]);
    for j in planner.jobs() {
        let body = json_text(&j.body);
        match parse_job_body(body.as_bytes(), &limits, &defaults) {
            Err(bad) => {
                let r = bad.rejection;
                let reason = format!("{}: {} ({})", r.field, r.reason, r.value);
                note(
                    &mut errors,
                    InputError {
                        origin: j.origin.clone(),
                        reason,
                    },
                );
            }
            Ok(job) if !prefixes.contains(&job.output.key_prefix) => {
                prefixes.insert(job.output.key_prefix);
            }
            Ok(_) => {}
        }
        let index = j.body["batch"]["index"].as_u64().unwrap_or(u64::MAX);
        let own = j.job_id != format!("{batch_id}-{index:07}");
        if own && (derived(&j.job_id) || !own_ids.insert(j.job_id.clone())) {
            let reason = format!("job_id {} appears twice", j.job_id);
            note(
                &mut errors,
                InputError {
                    origin: j.origin.clone(),
                    reason,
                },
            );
        }
    }
    if !errors.is_empty() {
        return Err(report(&errors, invalid));
    }
    let lane = match args.lane.as_deref().map(Lane::parse) {
        Some(Ok(lane)) => lane,
        Some(Err(e)) => return Err(usage(format!("--lane: {e}"))),
        None if !args.prompt.is_empty() => Lane::Interactive,
        None => Lane::Bulk,
    };
    if args.dataset.wanted() && !args.wait {
        return Err(usage("--manifest and --webdataset need --wait".into()));
    }
    Ok(Prepared {
        lane,
        planner,
        prefixes,
    })
}

/// Prints the input errors kept (up to 100) of `count` and returns the usage error that ends the
/// command.
fn report(errors: &[InputError], count: usize) -> anyhow::Error {
    for e in errors.iter().take(100) {
        eprintln!("invalid: {e}");
    }
    if count > errors.len().min(100) {
        eprintln!("... and {} more", count - errors.len().min(100));
    }
    UsageError(format!("{count} invalid item(s); nothing was published")).into()
}

/// Every this many jobs, publishing stops to collect the confirms and records in `batch.json`
/// that all jobs before this point are published: an interrupted run resumes from there.
const CHECKPOINT_JOBS: usize = 50_000;

/// What an earlier run left of each job, from one listing of each key prefix of the batch.
async fn earlier(store: &Store, prefixes: &BTreeSet<String>) -> Result<HashMap<String, Seen>> {
    let mut seen = HashMap::new();
    for prefix in prefixes {
        scan(store, prefix, |job, s| {
            seen.insert(job.to_string(), s);
        })
        .await
        .with_context(|| format!("listing {prefix}"))?;
    }
    Ok(seen)
}

fn key_prefix_of(j: &PlannedJob) -> &str {
    j.body["output"]["key_prefix"].as_str().unwrap_or("")
}

/// Publishes what an earlier run did not, then (with `--wait`) follows the batch to its end.
async fn publish_and_wait(args: &EnqueueArgs, prepared: &Prepared) -> Result<Option<Finished>> {
    let (lane, planner) = (prepared.lane, &prepared.planner);
    let (batch_id, total) = (planner.batch_id(), planner.len());
    let topology = crate::config::topology(&args.broker)?;
    let storage = &args.storage.storage;
    let store = Store::open(storage, &args.storage.s3_options())
        .await
        .with_context(|| format!("opening the store {storage}"))?;
    let batch_prefix = planner.key_prefix().to_string();
    let previous = BatchRecord::read(&store, &batch_prefix)
        .await?
        .filter(|r| r.batch_id == batch_id && r.total == total);
    // `--no-skip` publishes everything, whatever an earlier run did.
    let published_before = match &previous {
        Some(r) if !args.no_skip => r.published,
        _ => 0,
    };

    // One listing decides: done → skipped; failed → published again (its failure record removed,
    // so a watcher does not count the old end); queued or running → left alone unless asked.
    let seen = if args.no_skip {
        HashMap::new()
    } else {
        earlier(&store, &prepared.prefixes).await?
    };
    let mut record = previous
        .unwrap_or_else(|| BatchRecord::new(batch_id, &batch_prefix, total, lane.routing_key()));
    record.write(&store).await.context("writing batch.json")?;

    let conn = Connection::open(&args.broker.amqp_url, "t2i enqueue")
        .await
        .context("connecting to RabbitMQ")?;
    conn.declare(&topology)
        .await
        .context("declaring the topology")?;
    let publisher = conn.publisher(&topology).await?;
    let started = Instant::now();
    let mut confirms = FuturesUnordered::new();
    let mut returned = Returned {
        limits: args.limits.limits(),
        source: crate::config::event_source(args.event_source.as_deref(), &topology.prefix)?,
        ..Returned::default()
    };
    let window = args.confirm_window.max(1);
    let (mut done, mut pending, mut retried, mut published) = (0usize, 0usize, 0usize, 0usize);
    for (i, j) in planner.jobs().enumerate() {
        match seen.get(&j.job_id) {
            Some(Seen::Done) => {
                done += 1;
                continue;
            }
            Some(Seen::Ended) => {
                retried += 1;
                if let Ok(id) = JobId::parse(&j.job_id) {
                    let key = ObjectKey::failure(key_prefix_of(&j), &id);
                    store.delete(&key).await?;
                }
            }
            Some(Seen::Running) if !args.republish_pending => {
                pending += 1;
                continue;
            }
            None if (i as u64) < published_before && !args.republish_pending => {
                pending += 1;
                continue;
            }
            _ => {}
        }
        let body = json_text(&j.body);
        // Checked by `prepare`: a model's name always makes a route.
        let model = j.body.get("model").and_then(Value::as_str);
        let route = Route::of(lane, model).map_err(|r| anyhow::anyhow!("{}: {r}", j.job_id))?;
        let sent = publisher
            .send_job(&route, &j.job_id, body.as_bytes(), None)
            .await?;
        // The body comes back with the confirm only where it may be needed: a model's job.
        let kept = route.pool.is_some().then_some(body);
        confirms.push(async move { (sent.confirmed().await, route, kept) });
        published += 1;
        while confirms.len() >= window {
            if let Some(c) = confirms.next().await {
                returned.note(c, &publisher, &store).await?;
            }
        }
        if published % CHECKPOINT_JOBS == 0 {
            while let Some(c) = confirms.next().await {
                returned.note(c, &publisher, &store).await?;
            }
            record.published = record.published.max(i as u64 + 1);
            record.write(&store).await.context("writing batch.json")?;
        }
    }
    while let Some(c) = confirms.next().await {
        returned.note(c, &publisher, &store).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    if returned.unroutable > 0 {
        anyhow::bail!(
            "{} job(s) were not routed to any queue",
            returned.unroutable
        );
    }
    record.published = total;
    record.write(&store).await.context("writing batch.json")?;
    conn.close("published").await;
    eprintln!(
        "batch {batch_id}: published {} job(s) to {} in {secs:.2}s ({:.0} jobs/s, confirmed); \
         {done} already done, {pending} queued or running (not republished), {retried} failed before (republished)",
        published,
        topology.queue(lane),
        published as f64 / secs.max(1e-9),
    );
    let not_served = returned.report();
    if !args.wait {
        return match not_served {
            0 => Ok(None),
            n => {
                anyhow::bail!("{n} job(s) failed with model_not_served: no pool serves their model")
            }
        };
    }
    let target = watch::Target {
        store: &store,
        key_prefix: &batch_prefix,
        batch_id,
        total,
    };
    let finished = watch::follow(&target, &args.broker.amqp_url, &topology, &args.watch).await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "batch {batch_id}: {total} job(s) ended in {secs:.1}s, {} failed",
        finished.counts.failed
    );
    if args.dataset.wanted() {
        crate::batch::manifest::build(&store, &batch_prefix, &args.dataset).await?;
    }
    Ok(Some(finished))
}

/// The confirm of one published job: its route, and its body when it named a model.
type Confirmed = (Result<Delivered, QueueError>, Route, Option<String>);

/// What the broker returned: jobs for models no pool serves (failed here, counted by model) and any
/// other unroutable job (no default queue bound: a broken topology).
#[derive(Default)]
struct Returned {
    not_served: std::collections::BTreeMap<String, usize>,
    unroutable: usize,
    /// The bounds `prepare` checked the jobs with, to read a returned one back.
    limits: crate::job::Limits,
    /// The deployment's CloudEvents `source` (`--event-source`).
    source: String,
}

impl Returned {
    async fn note(&mut self, c: Confirmed, publisher: &Publisher, store: &Store) -> Result<()> {
        let (delivered, route, body) = c;
        if delivered? == Delivered::Routed {
            return Ok(());
        }
        let job = body.and_then(|b| {
            parse_job_body(b.as_bytes(), &self.limits, &ModelDefaults::default()).ok()
        });
        let Some(job) = job.filter(|_| route.pool.is_some()) else {
            self.unroutable += 1;
            return Ok(());
        };
        crate::unserved::fail(publisher, store, &self.source, PRODUCER, &job, &route, None)
            .await
            .with_context(|| format!("announcing that {} failed", job.job_id))?;
        let model = job.model.unwrap_or_default();
        *self.not_served.entry(model).or_default() += 1;
        Ok(())
    }

    /// Prints one line per model no pool serves; the number of jobs that failed so.
    fn report(&self) -> usize {
        for (model, n) in &self.not_served {
            eprintln!(
                "error: no worker pool serves model {model:?}: {n} job(s) failed with model_not_served"
            );
        }
        self.not_served.values().sum()
    }
}

/// The name of `t2i enqueue` as a job's producer (`data.worker` of the failures it announces).
const PRODUCER: &str = "t2i enqueue";

/// A job object as JSON text (a `Map` always serialises).
fn json_text(body: &Map<String, Value>) -> String {
    serde_json::to_string(body).unwrap_or_default()
}
