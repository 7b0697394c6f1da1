//! The one integration-test binary (candle makes every extra test binary slow to link).
//!
//! * `parity`: the pipeline against diffusers' own tensors on tiny random-weight models
//!   (`tests/fixtures/`, built by `scripts/parity/make_fixtures.py`).
//! * `cli`: `t2i generate` through the real binary.
//! * `worker`: `t2i worker` against the real RabbitMQ and Garage (`broker` is its harness).

mod broker;
mod cli;
mod parity;
mod support;
mod worker;
