//! t2i-worker: text-to-image generation with SDXL-family models (SSD-1B, SDXL 1.0, Segmind-Vega) and
//! Stable Diffusion 1.x/2.x in candle, for a fleet of queue-fed workers and for local use.
//!
//! # Layout
//!
//! The data path of `t2i worker`, one hop per arrow:
//!
//! ```text
//! queue::Consumer → Delivery → worker::intake (job::parse_job_body, earlier result?, deadline,
//!   cancellations; adapters::Fetcher brings LoRA files to disk) → worker::batcher (compatible
//!   jobs) → worker::render (pipeline::runner, the device thread: tokenize → text encoders →
//!   denoise loop → VAE, LoRA variants from pipeline::lora) → (Job, Action) → worker::complete
//!   (image::encode → storage::ImageStore::put under ObjectKey → events::CloudEvent → queue::Publisher,
//!   confirmed) → Outcome → worker::session settles the delivery (ack, reject, retry copy)
//! ```
//!
//! Side paths: `generate`: flags → `job::Generation::parse` (→ `adapters::Fetcher`) →
//! `pipeline::Pipeline::render` → files;
//! `enqueue`: JSONL/CSV/templates → `parse_job_body` → `queue::Publisher`; `webhooks`: events →
//! signed POST → ack; `gateway`: HTTP → `parse_job_body` → `queue::Publisher` (→ reply queue).
//!
//! * The contract — [`job`], [`events`], [`control`] — depends on nothing else in the crate; every
//!   other module may use it.
//! * [`queue`] is the only module that talks to RabbitMQ; [`storage`] the only one that talks to S3
//!   or the file system for results; [`records`] says what is stored about each job's state; [`pipeline`] owns the model and never does I/O beyond loading.
//! * [`cli`] declares every flag (subcommands import it, never the reverse); [`config`] turns flags
//!   into validated configuration; [`health`] serves `/healthz`, `/readyz`, `/metrics`.
#![deny(unsafe_code)]
#![warn(clippy::dbg_macro, clippy::todo)]

pub mod adapters;
pub mod batch;
pub mod bench;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod control;
pub mod device;
pub mod enqueue;
pub mod events;
pub mod gateway;
pub mod generate;
pub mod health;
pub mod healthcheck;
pub mod image;
pub mod job;
pub mod pipeline;
pub mod queue;
pub mod records;
pub mod schemas;
pub mod shutdown;
pub mod storage;
pub mod unserved;
pub mod webhooks;
pub mod worker;
