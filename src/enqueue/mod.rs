//! `t2i enqueue`: one job from flags or a bulk set (JSONL, CSV, prompt list, prompt template), each
//! item checked with the workers' own `Job::parse` before anything is published; stable job ids
//! (batch id + index) so running the same command again resumes: items whose `result.json` is
//! already stored are skipped, the rest published again (a worker re-announces one that finished in
//! the meantime instead of rendering it twice). Publishing uses confirms with a window of outstanding
//! ones (backpressure). `--wait` follows the events with a progress bar, exits non-zero on failures,
//! and writes a dataset manifest (Hugging Face ImageFolder `metadata.jsonl`), optionally with the
//! images downloaded, or WebDataset `.tar` shards.

pub mod expand;
mod manifest;
pub mod seeds;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};

use crate::cli::{EnqueueArgs, UsageError};
use crate::events::{CloudEvent, EventData, EventKind};
use crate::job::{JobId, ModelDefaults, parse_job_body};
use crate::queue::{Connection, Delivered, Lane};
use crate::storage::{ImageStore, ObjectKey, Store};
use expand::{Combine, InputError, InputFormat, Plan, PlannedJob};
use seeds::SeedStrategy;

/// Terminal outcome of one job, from its event or its stored `result.json`.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub data: EventData,
    pub skipped: bool,
}

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
    let outcomes = publish_and_wait(&args, lane, &jobs, &batch_id).await?;
    if let Some(outcomes) = outcomes {
        let failed: Vec<&Outcome> = outcomes
            .values()
            .filter(|o| o.data.status != "succeeded")
            .collect();
        if args.manifest.is_some() || args.webdataset.is_some() {
            manifest::write(&args, &jobs, &outcomes).await?;
        }
        if !failed.is_empty() {
            for o in failed.iter().take(20) {
                let why = o
                    .data
                    .error
                    .as_ref()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .unwrap_or_else(|| o.data.status.clone());
                eprintln!("failed: {} ({why})", o.data.job_id);
            }
            anyhow::bail!("{} of {} job(s) did not succeed", failed.len(), jobs.len());
        }
    }
    Ok(())
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
    if (args.manifest.is_some() || args.webdataset.is_some()) && !args.wait {
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

async fn publish_and_wait(
    args: &EnqueueArgs,
    lane: Lane,
    jobs: &[PlannedJob],
    batch_id: &str,
) -> Result<Option<HashMap<String, Outcome>>> {
    let topology = crate::config::topology(&args.broker)?;
    let storage = &args.storage.storage;
    let store = Store::open(storage, &args.storage.s3_options())
        .await
        .with_context(|| format!("opening the store {storage}"))?;

    // Items already done (an earlier run of the same command) are not published again.
    let mut outcomes: HashMap<String, Outcome> = HashMap::new();
    if !args.no_skip {
        let found: Vec<(String, Option<EventData>)> =
            futures_util::stream::iter(jobs.iter().map(|j| {
                let store = &store;
                async move {
                    let prefix = j.body["output"]["key_prefix"].as_str().unwrap_or("");
                    // Planned ids passed `Job::parse` in `prepare`.
                    let data = match JobId::parse(&j.job_id) {
                        Ok(id) => store
                            .get(&ObjectKey::result(prefix, &id))
                            .await
                            .ok()
                            .flatten()
                            .and_then(|b| serde_json::from_slice::<EventData>(&b).ok()),
                        Err(_) => None,
                    };
                    (j.job_id.clone(), data)
                }
            }))
            .buffer_unordered(64)
            .collect()
            .await;
        for (id, data) in found {
            if let Some(data) = data.filter(|d| d.status == "succeeded") {
                outcomes.insert(
                    id,
                    Outcome {
                        data,
                        skipped: true,
                    },
                );
            }
        }
    }
    let todo: Vec<&PlannedJob> = jobs
        .iter()
        .filter(|j| !outcomes.contains_key(&j.job_id))
        .collect();

    let conn = Connection::open(&args.broker.amqp_url, "t2i enqueue")
        .await
        .context("connecting to RabbitMQ")?;
    conn.declare(&topology)
        .await
        .context("declaring the topology")?;

    // Subscribe before publishing, so no event can be missed.
    let mut events = if args.wait {
        Some(
            conn.subscribe_events(&topology, &EventKind::TERMINAL)
                .await?,
        )
    } else {
        None
    };

    let publisher = conn.publisher(&topology).await?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut unroutable = 0usize;
    let window = args.confirm_window.max(1);
    let check = |d: Delivered, unroutable: &mut usize| {
        if d == Delivered::Unroutable {
            *unroutable += 1;
        }
    };
    for j in &todo {
        let body = json_text(&j.body);
        let sent = publisher
            .send_job(lane, &j.job_id, body.as_bytes(), None)
            .await?;
        pending.push(sent.confirmed());
        while pending.len() >= window {
            if let Some(c) = pending.next().await {
                check(c?, &mut unroutable);
            }
        }
    }
    while let Some(c) = pending.next().await {
        check(c?, &mut unroutable);
    }
    let secs = started.elapsed().as_secs_f64();
    if unroutable > 0 {
        anyhow::bail!("{unroutable} job(s) were not routed to any queue");
    }
    eprintln!(
        "batch {batch_id}: published {} job(s) to {} in {secs:.2}s ({:.0} jobs/s, confirmed); {} already done",
        todo.len(),
        topology.queue(lane),
        todo.len() as f64 / secs.max(1e-9),
        outcomes.len()
    );
    let Some(consumer) = events.as_mut() else {
        conn.close("done").await;
        return Ok(None);
    };

    // Wait for every job of this run.
    let wanted: HashSet<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(jobs.len() as u64)
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{bar:30}] {pos}/{len} done, {msg} {per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let failed_count =
        |o: &HashMap<String, Outcome>| o.values().filter(|o| o.data.status != "succeeded").count();
    bar.set_position(outcomes.len() as u64);
    bar.set_message(format!("{} failed", failed_count(&outcomes)));
    let deadline = (args.wait_timeout_s > 0)
        .then(|| Instant::now() + Duration::from_secs(args.wait_timeout_s));
    while outcomes.len() < wanted.len() {
        let next = match deadline {
            Some(d) => {
                match tokio::time::timeout(
                    d.saturating_duration_since(Instant::now()),
                    consumer.next(),
                )
                .await
                {
                    Ok(n) => n,
                    Err(_) => {
                        bar.abandon();
                        anyhow::bail!(
                            "timed out: {} of {} job(s) finished",
                            outcomes.len(),
                            wanted.len()
                        );
                    }
                }
            }
            None => consumer.next().await,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => anyhow::bail!("lost the event stream: {e}"),
            None => anyhow::bail!("the event stream ended"),
        };
        let Ok(event) = serde_json::from_slice::<CloudEvent>(delivery.body()) else {
            continue;
        };
        if !wanted.contains(event.subject.as_str()) || outcomes.contains_key(&event.subject) {
            continue;
        }
        outcomes.insert(
            event.subject.clone(),
            Outcome {
                data: event.data,
                skipped: false,
            },
        );
        bar.set_position(outcomes.len() as u64);
        bar.set_message(format!("{} failed", failed_count(&outcomes)));
    }
    bar.finish();
    conn.close("done").await;
    let done = started.elapsed().as_secs_f64();
    eprintln!(
        "batch {batch_id}: {} job(s) finished in {done:.1}s ({:.2} jobs/s), {} failed",
        wanted.len(),
        todo.len() as f64 / done.max(1e-9),
        failed_count(&outcomes)
    );
    Ok(Some(outcomes))
}

/// A job object as JSON text (a `Map` always serialises).
fn json_text(body: &Map<String, Value>) -> String {
    serde_json::to_string(body).unwrap_or_default()
}
