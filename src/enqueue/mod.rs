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

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::BasicProperties;
use lapin::Confirmation;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions};
use lapin::types::FieldTable;
use serde_json::{Map, Value};

use crate::cli::{BrokerArgs, UsageError};
use crate::events::{CloudEvent, EventData};
use crate::job::{ModelDefaults, parse_job_body};
use crate::queue::{Lane, Publisher};
use crate::storage::{ImageStore, Store};
use expand::{Combine, InputError, InputFormat, Plan, PlannedJob, SeedStrategy};

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// A prompt (repeatable): one job each.
    #[arg(long)]
    pub prompt: Vec<String>,

    /// Jobs from a file: `.jsonl` (job objects), `.csv` (a header row of job fields), anything else a
    /// prompt per line (`#` comments). `-` reads standard input as a prompt list.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,

    /// Format of --input instead of its extension: jsonl, csv, prompts.
    #[arg(long)]
    pub input_format: Option<String>,

    /// Prompt template with `{name}` placeholders, filled from --var lists.
    #[arg(long)]
    pub template: Option<String>,

    /// Values of a template placeholder: `name=v1,v2,...` (repeatable).
    #[arg(long = "var")]
    pub vars: Vec<String>,

    /// Combine --var lists element by element instead of every combination.
    #[arg(long)]
    pub zip: bool,

    /// Jobs per prompt, each with its own seed.
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: u32,

    /// Seeds for items without one: `index` (--seed + item index) or `random` (64-bit, derived from
    /// the batch id and index so a rerun reuses them). Seeds are always written into the jobs.
    #[arg(long, default_value = "index")]
    pub seed_strategy: String,

    /// Base seed of the `index` strategy.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Batch id [default: derived from the expanded jobs, so the same command gets the same id].
    #[arg(long)]
    pub batch_id: Option<String>,

    /// Object key prefix of the images [default: datasets/<batch id>/].
    #[arg(long)]
    pub key_prefix: Option<String>,

    /// Queue: `bulk` or `interactive` [default: interactive for --prompt, bulk otherwise].
    #[arg(long)]
    pub lane: Option<String>,

    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long)]
    pub num_images: Option<u32>,
    /// Model the jobs ask for (a worker serving another one rejects them).
    #[arg(long)]
    pub model: Option<String>,
    /// Image format: png, jpeg, webp.
    #[arg(long)]
    pub format: Option<String>,
    /// Webhook URL for every job's events (the relay signs and delivers them).
    #[arg(long)]
    pub webhook: Option<String>,

    /// Where the workers store results (to skip finished items and fetch images): as `t2i worker`.
    #[arg(long, env = "T2I_STORAGE", default_value = "./outputs")]
    pub storage: String,

    /// S3 path-style addressing [default: on when AWS_ENDPOINT_URL is set].
    #[arg(long, env = "T2I_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: Option<bool>,

    /// Publish every item even if its result is already stored.
    #[arg(long)]
    pub no_skip: bool,

    /// Print the expanded jobs (JSON lines) and publish nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Outstanding publisher confirms (backpressure window).
    #[arg(long, default_value_t = 4096)]
    pub confirm_window: usize,

    /// Wait for every job's terminal event; exit 1 if any did not succeed.
    #[arg(long)]
    pub wait: bool,

    /// Give up waiting after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub wait_timeout_s: u64,

    /// With --wait: write `metadata.jsonl` (Hugging Face ImageFolder) into this folder.
    #[arg(long)]
    pub manifest: Option<PathBuf>,

    /// With --manifest: download the images next to it (`images/`), verifying their sha256.
    #[arg(long)]
    pub download: bool,

    /// With --wait: write WebDataset shards (`shard-00000.tar`, ...) into this folder.
    #[arg(long)]
    pub webdataset: Option<PathBuf>,

    /// Samples per WebDataset shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,

    #[command(flatten)]
    pub limits: crate::cli::LimitArgs,

    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Terminal outcome of one job, from its event or its stored `result.json`.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub data: EventData,
    pub skipped: bool,
}

pub fn run(args: EnqueueArgs) -> Result<()> {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcomes = runtime.block_on(publish_and_wait(&args, lane, &jobs, &batch_id))?;
    if let Some(outcomes) = outcomes {
        let failed: Vec<&Outcome> = outcomes
            .values()
            .filter(|o| o.data.status != "succeeded")
            .collect();
        if args.manifest.is_some() || args.webdataset.is_some() {
            runtime.block_on(manifest::write(&args, &jobs, &outcomes))?;
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
        "random" => SeedStrategy::Random,
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
    set(
        "negative_prompt",
        args.negative_prompt.as_deref().map(Value::from),
    );
    set("width", args.width.map(Value::from));
    set("height", args.height.map(Value::from));
    set("steps", args.steps.map(Value::from));
    set("guidance_scale", args.guidance_scale.map(Value::from));
    set("scheduler", args.scheduler.as_deref().map(Value::from));
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
    let lane = match args.lane.as_deref() {
        Some("bulk") => Lane::Bulk,
        Some("interactive") => Lane::Interactive,
        Some(other) => {
            return Err(usage(format!("--lane `{other}`: bulk or interactive")));
        }
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
    let store = Store::open(&args.storage, args.s3_force_path_style)
        .await
        .with_context(|| format!("opening the store {}", args.storage))?;

    // Items already done (an earlier run of the same command) are not published again.
    let mut outcomes: HashMap<String, Outcome> = HashMap::new();
    if !args.no_skip {
        let found: Vec<(String, Option<EventData>)> =
            futures_util::stream::iter(jobs.iter().map(|j| {
                let store = &store;
                async move {
                    let prefix = j.body["output"]["key_prefix"].as_str().unwrap_or("");
                    let key = format!("{prefix}{}/result.json", j.job_id);
                    let data = store
                        .get(&key)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|b| serde_json::from_slice::<EventData>(&b).ok());
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

    let conn = crate::queue::connect(&args.broker.amqp_url, "t2i enqueue")
        .await
        .context("connecting to RabbitMQ")?;
    let setup = conn.create_channel().await?;
    topology
        .declare(&setup)
        .await
        .context("declaring the topology")?;

    // Subscribe before publishing, so no event can be missed.
    let mut events = if args.wait {
        let q = crate::queue::declare_private_queue(&setup).await?;
        for key in ["job.succeeded", "job.failed", "job.expired", "job.canceled"] {
            setup
                .queue_bind(
                    q.name().clone(),
                    topology.events_exchange().as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Some(
            setup
                .basic_consume(
                    q.name().clone(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
        )
    } else {
        None
    };

    let publisher = Publisher::open(&conn, &topology).await?;
    let ch = publisher.channel();
    let exchange = topology.jobs_exchange();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut unroutable = 0usize;
    let window = args.confirm_window.max(1);
    let check = |c: std::result::Result<Confirmation, lapin::Error>,
                 unroutable: &mut usize|
     -> Result<()> {
        match c? {
            Confirmation::Nack(_) => anyhow::bail!("the broker refused a job (nack)"),
            Confirmation::Ack(Some(_)) => *unroutable += 1,
            _ => {}
        }
        Ok(())
    };
    for j in &todo {
        let body = json_text(&j.body);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(j.job_id.as_str().into())
            .with_timestamp(time::OffsetDateTime::now_utc().unix_timestamp() as u64);
        let confirm = ch
            .basic_publish(
                exchange.as_str().into(),
                lane.routing_key().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                props,
            )
            .await?;
        pending.push(confirm.into_future());
        while pending.len() >= window {
            if let Some(c) = pending.next().await {
                check(c, &mut unroutable)?;
            }
        }
    }
    while let Some(c) = pending.next().await {
        check(c, &mut unroutable)?;
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
        let _ = conn.close(0, "done".into()).await;
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
        let _ = delivery.ack(BasicAckOptions::default()).await;
        let Ok(event) = serde_json::from_slice::<CloudEvent>(&delivery.data) else {
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
    let _ = conn.close(0, "done".into()).await;
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
