//! The one integration-test binary (candle makes every extra test binary slow to link).
//!
//! * `batching`: every stage and a whole render bit-identical whatever the batch (CPU).
//! * `parity`, `parity_sd`: the pipeline against diffusers' own tensors on tiny random-weight models
//!   (`tests/fixtures/`, built by `scripts/parity/make_fixtures.py` and `make_sd_fixtures.py`).
//! * `long_prompt`: prompts over 77 tokens, chunked against compel's embeddings and truncated
//!   against diffusers' (`make_long_prompt_fixtures.py`).
//! * `lora`: LoRA adapters of every format against diffusers' `fuse_lora` (`make_lora_fixtures.py`),
//!   the variant cache, batches; `lora_worker`: a LoRA job through the real worker.
//! * `cli`: `t2i generate` through the real binary.
//! * `worker`: `t2i worker` against the real RabbitMQ and Garage (`broker` is its harness);
//!   `faults`: through a kill, a broker restart and a storage outage; `lifecycle`: deadlines,
//!   `reply_to`, re-announcement, cancellation; `storage`: S3 multipart, presigned URLs, a local folder.
//! * `clients`: `t2i enqueue` (bulk sets, resume, manifests) against a real worker.
//! * `webhooks`: `t2i webhooks` (signatures, retries); `guard`: its SSRF guard; `gateway`: `t2i gateway`.
//! * `api`: `t2i gateway` against its OpenAPI document (schemathesis) and issue 16's holes in it.
//! * `jobs`: every job state over HTTP (`GET`/`DELETE /v1/jobs/{id}`) from the store's records.
//! * `receivers`: webhook receivers with their own secrets, rotation, 410 → disabled, replay.
//! * `routing`: two pools of different models on one broker; jobs for a model no pool serves.
//! * `multi_model`: one worker serving two models within a memory budget (LRU unloading).
//! * `deploy`: the RabbitMQ definitions in `infra/` against the topology the worker declares.
//! * `weighting`: the A1111 weighting syntax against A1111's method as held to diffusers' community
//!   long-prompt-weighting pipeline (`make_weighting_fixtures.py`).

mod api;
mod batching;
mod broker;
mod cli;
mod clients;
mod deploy;
mod faults;
mod gateway;
mod guard;
mod jobs;
mod lifecycle;
mod long_prompt;
mod lora;
mod lora_worker;
mod multi_model;
mod parity;
mod parity_sd;
mod receivers;
mod routing;
mod storage;
mod support;
mod webhooks;
mod weighting;
mod worker;
