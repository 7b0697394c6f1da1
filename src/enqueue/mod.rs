//! `t2i enqueue`: one job from flags or a bulk set (JSONL, CSV, prompt list, prompt template), each
//! item checked with the workers' own `Job::parse` before anything is published; stable job ids
//! (batch id + index), so running the same command again resumes. A rerun lists the batch's key
//! prefix once (not one GET per job): done jobs are skipped, failed ones published again, and jobs
//! an earlier run published that have not ended (queued or running) are left alone unless
//! `--republish-pending`. `batch.json` records the batch's size and how far publishing got
//! ([`crate::batch::BatchRecord`]). Publishing uses confirms with a window of outstanding ones
//! (backpressure). `--wait` follows the batch as `t2i batch watch` does and builds the data set from
//! the store as `t2i batch manifest` does.

pub mod expand;
pub mod seeds;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};

use crate::batch::watch::{self, Finished};
use crate::batch::{BatchRecord, Seen, scan};
use crate::cli::{EnqueueArgs, UsageError};
use crate::job::{JobId, ModelDefaults, parse_job_body};
use crate::queue::{Connection, Delivered, Lane};
use crate::storage::{ImageStore, ObjectKey, Store};
use expand::{Combine, InputError, InputFormat, Plan, PlannedJob};
use seeds::SeedStrategy;

pub async fn run(args: EnqueueArgs) -> Result<()> {
    let (lane, jobs, batch_id) = prepare(&args)?;
    if args.dry_run {
        for j in &jobs {
            println!("{}", json_text(&j.body));
        }
        eprintln!(
            "dry run: {} job(s) in batch {batch_id} for the {} queue; nothing published",
            jobs.len(),
            lane.routing_key()
        );
        return Ok(());
    }
    match publish_and_wait(&args, lane, &jobs, &batch_id).await? {
        Some(finished) => watch::report(&finished),
        None => Ok(()),
    }
}

/// Flags and inputs → validated jobs. Any invalid item is reported (all of them, with file and
/// line) and nothing is published.
pub fn prepare(args: &EnqueueArgs) -> Result<(Lane, Vec<PlannedJob>, String)> {
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
        items = expand::expand_template(t, &vars, combine).map_err(|e| report(&[e]))?;
    }
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
    set(
        "webhook",
        args.webhook
            .as_deref()
            .map(|u| serde_json::json!({ "url": u })),
    );
    let plan = Plan {
        defaults,
        images_per_prompt: args.images_per_prompt,
        seeds,
        batch_id: args.batch_id.clone(),
        key_prefix: args.key_prefix.clone(),
    };
    let (batch_id, jobs) = expand::plan(items, &plan);
    if let Err(r) = crate::job::JobId::parse(&batch_id) {
        return Err(usage(format!("--batch-id: {}", r.reason)));
    }
    // The workers' own checks, with the same bounds (T2I_MIN_SIDE, ... as the workers read them).
    let limits = args.limits.limits();
    let defaults = ModelDefaults::default();
    let mut errors = input_errors;
    let mut ids = HashSet::new();
    for j in &jobs {
        let body = json_text(&j.body);
        let model = j
            .body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("segmind/SSD-1B");
        if let Err(bad) = parse_job_body(body.as_bytes(), &limits, &defaults, model) {
            let r = bad.rejection;
            errors.push(InputError {
                origin: j.origin.clone(),
                reason: format!("{}: {} ({})", r.field, r.reason, r.value),
            });
        }
        if !ids.insert(j.job_id.as_str()) {
            errors.push(InputError {
                origin: j.origin.clone(),
                reason: format!("job_id {} appears twice", j.job_id),
            });
        }
    }
    if !errors.is_empty() {
        return Err(report(&errors));
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
    Ok((lane, jobs, batch_id))
}

/// Prints every input error (up to 100) and returns the usage error that ends the command.
fn report(errors: &[InputError]) -> anyhow::Error {
    for e in errors.iter().take(100) {
        eprintln!("invalid: {e}");
    }
    if errors.len() > 100 {
        eprintln!("... and {} more", errors.len() - 100);
    }
    UsageError(format!(
        "{} invalid item(s); nothing was published",
        errors.len()
    ))
    .into()
}

/// Every this many jobs, publishing stops to collect the confirms and records in `batch.json`
/// that all jobs before this point are published: an interrupted run resumes from there.
const CHECKPOINT_JOBS: usize = 50_000;

/// What an earlier run left of each planned job, from one listing per key prefix.
async fn earlier(store: &Store, jobs: &[PlannedJob]) -> Result<HashMap<String, Seen>> {
    let mut seen = HashMap::new();
    let mut prefixes: Vec<&str> = jobs.iter().map(key_prefix_of).collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    let planned: HashSet<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    for prefix in prefixes {
        scan(store, prefix, |job, s| {
            if planned.contains(job) {
                seen.insert(job.to_string(), s);
            }
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
async fn publish_and_wait(
    args: &EnqueueArgs,
    lane: Lane,
    jobs: &[PlannedJob],
    batch_id: &str,
) -> Result<Option<Finished>> {
    let topology = crate::config::topology(&args.broker)?;
    let storage = &args.storage.storage;
    let store = Store::open(storage, &args.storage.s3_options())
        .await
        .with_context(|| format!("opening the store {storage}"))?;
    let batch_prefix = args
        .key_prefix
        .clone()
        .unwrap_or_else(|| format!("datasets/{batch_id}/"));
    let previous = BatchRecord::read(&store, &batch_prefix)
        .await?
        .filter(|r| r.batch_id == batch_id && r.total == jobs.len() as u64);
    let published_before = previous.as_ref().map_or(0, |r| r.published) as usize;

    // One listing decides: done → skipped; failed → published again (its failure record removed,
    // so a watcher does not count the old end); queued or running → left alone unless asked.
    let seen = if args.no_skip {
        HashMap::new()
    } else {
        earlier(&store, jobs).await?
    };
    let (mut done, mut pending, mut retried) = (0usize, 0usize, 0usize);
    let mut todo: Vec<(usize, &PlannedJob)> = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        match seen.get(&j.job_id) {
            Some(Seen::Done) => done += 1,
            Some(Seen::Ended) => {
                retried += 1;
                if let Ok(id) = JobId::parse(&j.job_id) {
                    store
                        .delete(&ObjectKey::failure(key_prefix_of(j), &id))
                        .await?;
                }
                todo.push((i, j));
            }
            Some(Seen::Running) if !args.republish_pending => pending += 1,
            None if i < published_before && !args.republish_pending => pending += 1,
            _ => todo.push((i, j)),
        }
    }
    let mut record = previous.unwrap_or_else(|| {
        BatchRecord::new(
            batch_id,
            &batch_prefix,
            jobs.len() as u64,
            lane.routing_key(),
        )
    });
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
    let mut unroutable = 0usize;
    let window = args.confirm_window.max(1);
    let mut collect = async |confirms: &mut FuturesUnordered<_>, keep: usize| -> Result<()> {
        while confirms.len() > keep {
            if let Some(c) = confirms.next().await
                && c? == Delivered::Unroutable
            {
                unroutable += 1;
            }
        }
        Ok(())
    };
    for (n, (i, j)) in todo.iter().enumerate() {
        let body = json_text(&j.body);
        let sent = publisher
            .send_job(lane, &j.job_id, body.as_bytes(), None)
            .await?;
        confirms.push(sent.confirmed());
        collect(&mut confirms, window - 1).await?;
        if (n + 1) % CHECKPOINT_JOBS == 0 {
            collect(&mut confirms, 0).await?;
            record.published = record.published.max(*i as u64 + 1);
            record.write(&store).await.context("writing batch.json")?;
        }
    }
    collect(&mut confirms, 0).await?;
    let secs = started.elapsed().as_secs_f64();
    if unroutable > 0 {
        anyhow::bail!("{unroutable} job(s) were not routed to any queue");
    }
    record.published = jobs.len() as u64;
    record.write(&store).await.context("writing batch.json")?;
    conn.close("published").await;
    eprintln!(
        "batch {batch_id}: published {} job(s) to {} in {secs:.2}s ({:.0} jobs/s, confirmed); \
         {done} already done, {pending} queued or running (not republished), {retried} failed before (republished)",
        todo.len(),
        topology.queue(lane),
        todo.len() as f64 / secs.max(1e-9),
    );
    if !args.wait {
        return Ok(None);
    }
    let target = watch::Target {
        store: &store,
        key_prefix: &batch_prefix,
        batch_id,
        total: jobs.len() as u64,
    };
    let finished = watch::follow(&target, &args.broker.amqp_url, &topology, &args.watch).await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "batch {batch_id}: {} job(s) ended in {secs:.1}s, {} failed",
        jobs.len(),
        finished.counts.failed
    );
    if args.dataset.wanted() {
        crate::batch::manifest::build(&store, &batch_prefix, &args.dataset).await?;
    }
    Ok(Some(finished))
}

/// A job object as JSON text (a `Map` always serialises).
fn json_text(body: &Map<String, Value>) -> String {
    serde_json::to_string(body).unwrap_or_default()
}
