//! The flags of each subcommand. Groups shared by several (broker, model, storage, generation,
//! limits) live in [`super`] and are flattened in, so each flag has one home.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{
    BrokerArgs, DatasetArgs, GenerationArgs, LimitArgs, LoraArgs, ModelArgs, StorageArgs, WatchArgs,
};

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Job ids to cancel.
    pub job_ids: Vec<String>,

    /// Batch id to cancel (every job whose `batch.id` it is); repeatable.
    #[arg(long = "batch")]
    pub batches: Vec<String>,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// http:// URL to probe.
    #[arg(
        env = "T2I_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:9090/healthz"
    )]
    pub url: String,

    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout_s: u64,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A prompt; repeat for several.
    #[arg(long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,

    /// A file with one prompt per line (`-` for stdin); blank lines and lines starting with `#` are
    /// skipped.
    #[arg(long, value_name = "PATH")]
    pub prompts_file: Option<PathBuf>,

    #[command(flatten)]
    pub generation: GenerationArgs,

    /// Seed of the first image of each prompt; image i uses seed + i [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Images per prompt, 1..=8.
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,

    /// Initial latents (safetensors with a tensor `latents` of shape [n, 4, h/8, w/8], unscaled, like
    /// diffusers' `latents=`), one row per image in output order.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,

    /// Output file (one image) or folder.
    #[arg(long, short, default_value = "outputs")]
    pub output: PathBuf,

    /// Image format: png, jpeg, webp [default: from --output's extension, else png].
    #[arg(long)]
    pub format: Option<String>,

    /// JPEG quality, 1..=100.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,

    /// Images rendered together on the device. Results do not depend on it (each image has its own
    /// seeded noise); larger batches are faster on GPUs and use more memory.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,

    /// A LoRA adapter for every image, `URI[:SCALE]` (scale 1 when left out; write `:1` when the URI
    /// itself ends in `:<number>`); repeat for several. URIs as in jobs' `loras[].uri`.
    #[arg(long = "lora", value_name = "URI[:SCALE]")]
    pub loras: Vec<String>,

    #[command(flatten)]
    pub lora: LoraArgs,

    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct SchemasArgs {
    /// Output folder.
    #[arg(long, default_value = "schemas")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub storage: StorageArgs,

    /// Most images rendered in one device batch.
    #[arg(long, env = "T2I_MAX_BATCH", default_value_t = 4)]
    pub max_batch: u32,

    /// How long a partial batch waits for compatible jobs, in milliseconds.
    #[arg(long, env = "T2I_BATCH_WINDOW_MS", default_value_t = 50)]
    pub batch_window_ms: u64,

    /// Job queues to consume: `interactive`, `bulk` or both (interactive first). A bulk-only pool can
    /// scale to zero while interactive workers stay up.
    #[arg(
        long,
        env = "T2I_LANES",
        default_value = "interactive,bulk",
        value_delimiter = ','
    )]
    pub lanes: Vec<String>,

    /// Also take the jobs that name no model (the default pool's queues, t2i.jobs and t2i.jobs.bulk).
    /// Jobs naming this worker's model come from its model's own queues either way; in a fleet of
    /// several models, leave it on for the pools of one model only.
    #[arg(long, env = "T2I_DEFAULT_POOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub default_pool: bool,

    /// Serve several models instead of --model (comma-separated repo ids or folders): each one's
    /// jobs come from its pool's queues, jobs that name no model render with the first. The first is
    /// loaded at start; the others when their first job comes, the least recently used unloaded
    /// first to stay within --memory-budget.
    #[arg(long, env = "T2I_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,

    /// Most bytes the served models' weights may hold on the device together (e.g. 12GiB, 9.5GB,
    /// 800MiB, or bytes); working memory for rendering comes on top [default: no limit].
    #[arg(long, env = "T2I_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,

    /// Unacknowledged deliveries per queue [default: 2 × max batch, so the next batch is ready while
    /// the previous one uploads].
    #[arg(long, env = "T2I_PREFETCH")]
    pub prefetch: Option<u16>,

    /// This worker's name in events (`data.worker`) and connection names [default: hostname-pid].
    #[arg(long, env = "T2I_WORKER_ID")]
    pub worker_id: Option<String>,

    /// The CloudEvents `source` of every event, a URI-reference naming the deployment: set the same
    /// on every worker of it (consumers deduplicate on source + id) [default: /t2i-worker/<amqp
    /// prefix>].
    #[arg(long, env = "T2I_EVENT_SOURCE")]
    pub event_source: Option<String>,

    /// Address for /healthz, /readyz and /metrics (e.g. 0.0.0.0:9090); off when unset.
    #[arg(long, env = "T2I_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,

    /// A batch running longer than this fails its jobs with `timeout`, in seconds.
    #[arg(long, env = "T2I_JOB_TIMEOUT_S", default_value_t = 600)]
    pub job_timeout_s: u64,

    /// After SIGTERM/SIGINT, how long in-flight work may take to finish, in seconds.
    #[arg(long, env = "T2I_GRACE_PERIOD_S", default_value_t = 60)]
    pub grace_period_s: u64,

    /// Minimum interval between two job.progress events of a job, in milliseconds.
    #[arg(long, env = "T2I_PROGRESS_INTERVAL_MS", default_value_t = 1000)]
    pub progress_interval_ms: u64,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub lora: LoraArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub generation: GenerationArgs,

    /// Batch sizes to measure, comma-separated (e.g. 1,4,8).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,

    /// Untimed renders per batch size before measuring (kernel loading, allocator warm-up).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,

    /// Timed renders per batch size (the mean is reported).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,

    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also time every op (convolution, linear, group norm, GEGLU, attention, adds) per phase, with the
    /// device synchronised around each op (slower than an unprofiled run; `T2I_PROFILE=1` does
    /// the same for any subcommand).
    #[arg(long)]
    pub profile: bool,

    /// Instead of benchmarking a model: check each of the project's CUDA kernels against candle's
    /// path at SSD-1B's shapes on --device/--dtype (errors against f32, time; PASS/FAIL per kernel;
    /// exit 1 on a failure). Loads no model.
    #[arg(long)]
    pub check_ops: bool,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The CloudEvents `source` of the failures announced here (jobs for a model no pool serves):
    /// the workers' (T2I_EVENT_SOURCE) [default: /t2i-worker/<amqp prefix>].
    #[arg(long, env = "T2I_EVENT_SOURCE")]
    pub event_source: Option<String>,

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

    /// Seeds for items without one. A job with seed s renders s, s+1, ... (one per image), and jobs
    /// get disjoint ranges, so no image of a batch repeats another's prompt, parameters and seed:
    /// `index` gives each job the next range after the previous job's images (from --seed); `random`
    /// scatters the ranges (a bijection of the job index, keyed by --seed). Without --seed both derive
    /// from the batch id, so two batch ids render different seeds and rerunning the same command the
    /// same ones. Seeds are always written into the jobs; a seed set by an input row is kept (its
    /// --images-per-prompt copies continue after its images).
    #[arg(long, default_value = "index")]
    pub seed_strategy: String,

    /// Pin the seeds: the base of `index` (jobs get seed, seed + n, ... for n images per job) or the
    /// key of `random`; the same in every batch id [default: a hash of the batch id].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Batch id [default: derived from the expanded jobs, so the same command gets the same id].
    #[arg(long)]
    pub batch_id: Option<String>,

    /// Object key prefix of the images [default: datasets/<batch id>/].
    #[arg(long)]
    pub key_prefix: Option<String>,

    /// Queue: `bulk` or `interactive` [default: interactive for --prompt, bulk otherwise].
    #[arg(long)]
    pub lane: Option<String>,

    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Images per job, 1..=8 [default: 1].
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
    /// Webhook receiver id (from the relay's receivers file) for every job's events.
    #[arg(long)]
    pub webhook_receiver: Option<String>,

    #[command(flatten)]
    pub storage: StorageArgs,

    /// Publish every item, whatever an earlier run published or stored.
    #[arg(long)]
    pub no_skip: bool,

    /// On a rerun, publish again the jobs that were published and have not ended (queued or
    /// running), not only those never published or that failed.
    #[arg(long)]
    pub republish_pending: bool,

    /// Print the expanded jobs (JSON lines) and publish nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Outstanding publisher confirms (backpressure window).
    #[arg(long, default_value_t = 4096)]
    pub confirm_window: usize,

    /// Wait until every job has ended (as `t2i batch watch`); exit 1 if any did not succeed.
    #[arg(long)]
    pub wait: bool,

    /// With --wait: the data set to build from the store once every job has ended.
    #[command(flatten)]
    pub dataset: DatasetArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub watch: WatchArgs,
}

#[derive(Debug, Args)]
pub struct WebhooksArgs {
    /// An operator command instead of the relay.
    #[command(subcommand)]
    pub action: Option<WebhooksAction>,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Receivers file (TOML): each `[[receiver]]` has an `id`, a `url`, its own `secrets`
    /// (`whsec_...`, and/or `secrets_env` naming a variable that holds them), optional `events`
    /// and `all_jobs`. Jobs name a receiver by id (`webhook.receiver`) or by a URL it owns.
    #[arg(long, env = "T2I_WEBHOOK_RECEIVERS")]
    pub receivers: Option<std::path::PathBuf>,

    /// Key(s) for ad-hoc receivers, `whsec_<base64>`, space- or comma-separated: a job URL that no
    /// configured receiver owns (and every --endpoint) is signed with a secret derived from it
    /// and the URL, which `t2i webhooks url-secret URL` prints for the URL's owner. Without it
    /// such URLs are dead-lettered. Several keys: several signatures (rotation).
    #[arg(long, env = "T2I_WEBHOOK_URL_KEY", hide_env_values = true)]
    pub url_key: Option<String>,

    /// Removed: one secret for every receiver let any receiver forge events for the others. Use
    /// --receivers and --url-key (see the README); setting it is an error, not silently ignored.
    #[arg(long, env = "T2I_WEBHOOK_SECRET", hide = true, hide_env_values = true)]
    pub secret: Option<String>,

    #[command(flatten)]
    pub state: WebhookStateArgs,

    /// How long a relay trusts what it read of a receiver's disabled state, in seconds: how long
    /// a 410 seen by another replica, or an `enable`, takes to apply here (one store read per
    /// receiver per interval).
    #[arg(long, env = "T2I_WEBHOOK_STATE_REFRESH_S", default_value_t = 5.0)]
    pub state_refresh_s: f64,

    /// An ad-hoc receiver for every job's events, in addition to each job's own webhook
    /// (repeatable; signed with its per-URL secret, so it needs --url-key). A receiver in the
    /// receivers file with `all_jobs = true` does the same with secrets of its own.
    #[arg(
        long = "endpoint",
        env = "T2I_WEBHOOK_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,

    /// Event types sent to the --endpoint receivers.
    #[arg(
        long,
        env = "T2I_WEBHOOK_ENDPOINT_EVENTS",
        value_delimiter = ',',
        default_value = "job.succeeded,job.failed,job.expired,job.canceled"
    )]
    pub endpoint_events: Vec<String>,

    /// Delays between attempts, in seconds (one retry queue each); the last attempt is followed by
    /// dead-lettering. Default: ~10.5 hours in all.
    #[arg(
        long = "webhook-retry-delays",
        env = "T2I_WEBHOOK_RETRY_DELAYS",
        value_delimiter = ',',
        default_value = "5,30,120,600,1800,3600,7200,14400,14400"
    )]
    pub webhook_retry_delays: Vec<f64>,

    /// Per-request timeout, in seconds.
    #[arg(long, env = "T2I_WEBHOOK_TIMEOUT_S", default_value_t = 10)]
    pub timeout_s: u64,

    /// Deliveries in flight at once.
    #[arg(long, env = "T2I_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub concurrency: u16,

    /// Allow plain http:// receivers.
    #[arg(long, env = "T2I_WEBHOOK_ALLOW_HTTP")]
    pub allow_http: bool,

    /// Allow loopback, private and link-local addresses (trusted networks only).
    #[arg(long, env = "T2I_WEBHOOK_ALLOW_PRIVATE")]
    pub allow_private_networks: bool,

    /// `host:port` allowed whatever it resolves to (repeatable), e.g. an in-cluster receiver. Only
    /// that port (the scheme's default when a URL names none): the host's other ports are guarded
    /// as usual, and a redirect gets the allowance only from an allowed receiver.
    #[arg(
        long = "allow-host",
        env = "T2I_WEBHOOK_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub allow_hosts: Vec<String>,

    /// Send webhooks through this HTTP(S) proxy (`http://host:port`, credentials in the URL),
    /// except to --allow-host receivers. Without it requests go direct: HTTP_PROXY, HTTPS_PROXY,
    /// ALL_PROXY and NO_PROXY are ignored. The proxy resolves receiver names, so it must refuse
    /// internal destinations itself; the relay still checks every URL and redirect.
    #[arg(long, env = "T2I_WEBHOOK_EGRESS_PROXY", hide_env_values = true)]
    pub egress_proxy: Option<String>,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "T2I_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
}

/// Where the relay keeps which receivers a 410 disabled (shared by every replica and by
/// `t2i webhooks enable`).
#[derive(Debug, Clone, Args)]
pub struct WebhookStateArgs {
    /// `s3://bucket/prefix`, `file:///path` or a folder; replicas must share it, so use the
    /// deployment's bucket (another prefix than the images').
    #[arg(
        long = "state",
        env = "T2I_WEBHOOK_STATE",
        default_value = "./webhook-state"
    )]
    pub state: String,

    /// S3 path-style addressing [default: on when AWS_ENDPOINT_URL is set].
    #[arg(long, env = "T2I_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum WebhooksAction {
    /// Re-enable a receiver that answered 410 Gone (its later events were dead-lettered: replay them).
    Enable(WebhooksEnableArgs),
    /// Move dead-lettered deliveries back to the relay's queue, each for the one target it failed.
    Replay(WebhooksReplayArgs),
    /// Print the secret an ad-hoc receiver verifies with (one line per --url-key).
    UrlSecret(WebhooksUrlSecretArgs),
}

#[derive(Debug, Args)]
pub struct WebhooksEnableArgs {
    /// The receiver id, or the URL of an ad-hoc receiver.
    pub receiver: String,

    #[command(flatten)]
    pub state: WebhookStateArgs,
}

#[derive(Debug, Args)]
pub struct WebhooksReplayArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Only deliveries for this receiver id or target URL (the others stay dead-lettered).
    #[arg(long)]
    pub receiver: Option<String>,

    /// Replay at most this many [default: all].
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct WebhooksUrlSecretArgs {
    /// The receiver URL, exactly as jobs name it (compared after URL normalisation).
    pub url: String,

    /// The relay's --url-key.
    #[arg(long, env = "T2I_WEBHOOK_URL_KEY", hide_env_values = true)]
    pub url_key: String,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The CloudEvents `source` of the failures announced here (jobs for a model no pool serves):
    /// the workers' (T2I_EVENT_SOURCE) [default: /t2i-worker/<amqp prefix>].
    #[arg(long, env = "T2I_EVENT_SOURCE")]
    pub event_source: Option<String>,

    /// Listen address.
    #[arg(long, env = "T2I_GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: std::net::SocketAddr,

    #[command(flatten)]
    pub storage: StorageArgs,

    /// Require `Authorization: Bearer <token>` on the API.
    #[arg(long, env = "T2I_GATEWAY_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// How long POST /generate-image waits for the result, in seconds.
    #[arg(long, env = "T2I_GATEWAY_WAIT_TIMEOUT_S", default_value_t = 120)]
    pub wait_timeout_s: u64,

    /// Lifetime of the image URLs `GET /v1/jobs/{id}` presigns on each read, in seconds (S3 allows
    /// at most 7 days: 604800).
    #[arg(long, env = "T2I_GATEWAY_PRESIGN_TTL_S", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub presign_ttl_s: u64,

    #[command(flatten)]
    pub limits: LimitArgs,

    /// The model recorded for queued jobs that name none (the default pool's); jobs naming a model
    /// are routed to its pool, and fail with 422 `model_not_served` when no pool serves it.
    #[arg(long, env = "T2I_MODEL", default_value = "segmind/SSD-1B")]
    pub model: String,
}
