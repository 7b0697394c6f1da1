//! t2i-worker: text-to-image generation with SDXL-family models (SSD-1B, SDXL 1.0, Segmind-Vega) in
//! candle, for a fleet of queue-fed workers and for local use.
//!
//! # Layout
//!
//! The data path of `t2i generate`, one hop per arrow:
//!
//! ```text
//! flags → job::GenerationRequest → GenerationParams::parse → pipeline::Pipeline::render
//!   (tokenize → text encoders → denoise loop → VAE) → Vec<RgbImage> → image::encode (PNG/JPEG/WebP
//!   + generation parameters) → files
//! ```
//!
//! * [`job`] validates generation parameters once, at the edge; everything below trusts the types.
//! * [`pipeline`] owns the model: diffusers-layout loading, tokenizers, CLIP encoders, UNet, VAE,
//!   samplers, and the CFG loop. It is synchronous and owns no threads.
//! * [`image`] encodes pixels with the parameters embedded the way SD tools read them.
//! * [`generate`] is the `t2i generate` subcommand; [`cli`] the flags; [`device`] device/dtype parsing.
#![deny(unsafe_code)]
#![warn(clippy::dbg_macro, clippy::todo)]

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
pub mod schemas;
pub mod shutdown;
pub mod storage;
pub mod webhooks;
pub mod worker;
