//! Bad input, measured: a bounded property run over [`parse_job_body`], the one parser every job
//! body meets (worker, gateway, `t2i enqueue`). cargo-fuzz needs a nightly toolchain; this is
//! `proptest` on stable, run by `cargo test` like any unit test.
//!
//! The property, for every input: no panic, and either a job whose own message
//! ([`Job::to_request`]) parses back to the same job, or a rejection whose `field` names the
//! body or a member the body has, with a non-empty reason. Inputs are arbitrary bytes, valid job
//! messages mutated byte by byte, and near-valid jobs built member by member (wrong types, huge
//! and non-finite numbers, unicode, deep nesting, bounds ±1, unknown and repeated members).
//!
//! The generators are `pub(crate)` so the control message's property (`crate::control`) reuses
//! them. Failures print the shrunk input; nothing is written to the tree.

use std::cell::RefCell;
use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::Value;

use super::*;
use crate::job::{LongPrompt, PromptWeighting, SchedulerKind};
use crate::storage::{INDEX_PREFIX, ObjectKey};

/// Cases per property in a plain `cargo test`: about a second each in a debug build on one core.
/// `PROPTEST_CASES=100000 PROPTEST_RNG_SEED=$RANDOM cargo test --lib fuzz` runs a longer campaign
/// from another seed.
const CASES: u32 = 1000;
/// The seed of a plain `cargo test`: the test command must give the same verdict on the same tree
/// (with a random seed, a run turned red on a `key_prefix` of `0/./` that no earlier run had drawn,
/// on a tree whose parser had not changed). Campaigns from other seeds are how new inputs get tried.
const SEED: u64 = 0x7432_6977_6f72_6b65;

pub(crate) fn config() -> ProptestConfig {
    let mut c = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = CASES;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = proptest::test_runner::RngSeed::Fixed(SEED);
    }
    c
}

/// Runs `strategy` through `check`, panicking with the shrunk input on a failure, and returns
/// how many cases were tried.
pub(crate) fn run<S: Strategy>(
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u32
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(config());
    let tried = std::cell::Cell::new(0u32);
    let result = runner.run(&strategy, |v| {
        tried.set(tried.get() + 1);
        check(v)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    tried.get()
}

// ---- JSON pieces, valid and not ------------------------------------------------------------

/// Text that is a JSON value, or nearly one: numbers serde cannot hold, deep nesting, odd escapes.
pub(crate) fn raw_json() -> BoxedStrategy<String> {
    prop_oneof![
        6 => json_value().prop_map(|v| v.to_string()),
        1 => prop::sample::select(vec![
            "1e400", "-1e400", "18446744073709551616", "-0", "0.0", "1E2", "-9223372036854775809",
            "1.0e-400", "4.9e-324", "NaN", "Infinity", "0x10", "01", "1.", ".5", "+1", "true ",
            "\"\\ud800\"", "\"\\u0000\"", "\"\\/\"", "\"\u{feff}\"", "\"\u{10ffff}\"", "nul",
            "\"unterminated", "{", "[", "]", "{\"a\":}", "[1,]", "",
        ])
        .prop_map(str::to_string),
        1 => (100usize..200, any::<bool>()).prop_map(|(depth, arrays)| if arrays {
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        } else {
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
        }),
        1 => (0usize..30).prop_map(|n| format!("\"{}\"", "x".repeat(4000 - 15 + n))),
    ]
    .boxed()
}

/// Any JSON value, a few levels deep, with unicode strings and numbers of every kind.
pub(crate) fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // non-finite becomes null
        any::<String>().prop_map(Value::from),
        prop::sample::select(vec![
            0u64,
            1,
            7,
            8,
            63,
            64,
            150,
            151,
            255,
            256,
            u32::MAX as u64 + 1
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn string(s: impl Into<String>) -> String {
    Value::String(s.into()).to_string()
}

/// A member's text: usually valid, sometimes absent (`None`), sometimes anything at all.
pub(crate) fn member(valid: BoxedStrategy<String>) -> BoxedStrategy<Option<String>> {
    prop_oneof![
        30 => valid.prop_map(Some),
        8 => Just(None),
        1 => raw_json().prop_map(Some),
    ]
    .boxed()
}

fn id() -> BoxedStrategy<String> {
    prop_oneof![
        24 => "[A-Za-z0-9._:-]{1,40}".prop_map(string),
        1 => Just(string("i".repeat(128))),
        1 => prop::sample::select(vec!["", "a b", "é", "../x", "a/b", ".", "..", "_index"])
            .prop_map(string),
        1 => Just(string("i".repeat(129))),
    ]
    .boxed()
}

fn prompt() -> BoxedStrategy<String> {
    prop_oneof![
        24 => any::<String>().prop_map(string),
        // The weighting syntax: brackets, weights good and bad, escapes, BREAK.
        8 => "([a-z ]|\\(|\\)|\\[|\\]|:[0-9.]{1,4}\\)|:|\\\\|BREAK){0,30}".prop_map(string),
        1 => (3995usize..4005).prop_map(|n| string("é".repeat(n))),
    ]
    .boxed()
}

fn side() -> BoxedStrategy<String> {
    prop_oneof![
        24 => (8u32..=256).prop_map(|n| (n * 8).to_string()),
        1 => prop::sample::select(vec!["0", "56", "1001", "2056", "4294967295", "-8", "64.0", "6.4e1"])
            .prop_map(str::to_string),
    ]
    .boxed()
}

fn number_in(lo: u64, hi: u64) -> BoxedStrategy<String> {
    prop_oneof![
        24 => (lo..=hi).prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![lo.wrapping_sub(1), hi + 1, u64::MAX]).prop_map(|n| n.to_string()),
    ]
    .boxed()
}

fn guidance() -> BoxedStrategy<String> {
    prop_oneof![
        24 => (0.0f64..=30.0).prop_map(|g| Value::from(g).to_string()),
        1 => prop::sample::select(vec!["-0.0", "30.000000000000004", "1e308", "5e-324", "7"])
            .prop_map(str::to_string),
    ]
    .boxed()
}

fn scheduler() -> BoxedStrategy<String> {
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
    prop_oneof![
        24 => prop::sample::select(names).prop_map(string),
        1 => prop::sample::select(vec!["EULER", "heun", "euler ", ""]).prop_map(string),
    ]
    .boxed()
}

fn long_prompt() -> BoxedStrategy<String> {
    let names: Vec<&str> = LongPrompt::ALL.iter().map(|k| k.as_str()).collect();
    prop_oneof![
        24 => prop::sample::select(names).prop_map(string),
        1 => prop::sample::select(vec!["CHUNK", "split", "truncate ", ""]).prop_map(string),
    ]
    .boxed()
}

fn prompt_weighting() -> BoxedStrategy<String> {
    let names: Vec<&str> = PromptWeighting::ALL.iter().map(|k| k.as_str()).collect();
    prop_oneof![
        24 => prop::sample::select(names).prop_map(string),
        1 => prop::sample::select(vec!["A1111", "compel", "none ", ""]).prop_map(string),
    ]
    .boxed()
}

fn model() -> BoxedStrategy<String> {
    prop_oneof![
        24 => prop::sample::select(vec!["segmind/SSD-1B", "SSD-1B", "ssd-1b", "/models/SSD-1B/"]),
        1 => prop::sample::select(vec!["stabilityai/sdxl", "", "/", "a/.."]),
    ]
    .prop_map(string)
    .boxed()
}

fn deadline() -> BoxedStrategy<String> {
    let valid = (
        1970u32..2200,
        1u32..=12,
        1u32..=28,
        0u32..24,
        0u32..60,
        0u32..60,
        prop::sample::select(vec!["", ".5", ".123456789", ".1234567891234"]),
        prop::sample::select(vec!["Z", "z", "+00:00", "-23:59", "+05:30", "-00:00"]),
    )
        .prop_map(|(y, mo, d, h, mi, s, frac, off)| {
            string(format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{off}"
            ))
        });
    prop_oneof![
        24 => valid,
        1 => prop::sample::select(vec![
            "tomorrow", "2026-13-01T00:00:00Z", "2016-12-31T23:59:60Z", "2026-02-30T00:00:00Z",
            "0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999-23:59", "2026-01-01 00:00:00Z",
        ])
        .prop_map(string),
    ]
    .boxed()
}

/// `{"k": v, ...}` from (key, text) pairs, in order, repeats and all.
fn object(members: Vec<(String, Option<String>)>) -> String {
    let body: Vec<String> = members
        .into_iter()
        .filter_map(|(k, v)| Some(format!("{}:{}", string(k), v?)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// Named members plus, now and then, an unknown or repeated one.
pub(crate) fn with_extras(
    named: Vec<(&'static str, BoxedStrategy<Option<String>>)>,
) -> BoxedStrategy<String> {
    let (names, values): (Vec<_>, Vec<_>) = named.into_iter().unzip();
    let extras = prop_oneof![
        40 => Just(vec![]),
        1 => vec((any::<String>(), raw_json().prop_map(Some)), 1..3),
        1 => (prop::sample::select(names.clone()), raw_json())
            .prop_map(|(k, v)| vec![(k.to_string(), Some(v))]),
    ];
    (values, extras)
        .prop_map(move |(values, extras)| {
            let mut members: Vec<(String, Option<String>)> =
                names.iter().map(|n| n.to_string()).zip(values).collect();
            members.extend(extras);
            object(members)
        })
        .boxed()
}

fn output() -> BoxedStrategy<String> {
    let format = prop_oneof![
        24 => prop::sample::select(vec!["png", "jpeg", "jpg", "webp"]),
        1 => prop::sample::select(vec!["PNG", "gif"]),
    ];
    let prefix = prop_oneof![
        24 => "[A-Za-z0-9._/=+-]{0,30}".prop_map(string),
        1 => prop::sample::select(vec!["/abs/", "a/../b", "_index/", "..", "a b/", "é/"])
            .prop_map(string),
        1 => (510usize..515).prop_map(|n| string("p".repeat(n))),
    ];
    with_extras(vec![
        ("format", member(format.prop_map(string).boxed())),
        ("quality", member(number_in(1, 100))),
        ("key_prefix", member(prefix.boxed())),
        ("presign_ttl_s", member(number_in(1, MAX_PRESIGN_TTL_S))),
    ])
}

fn webhook() -> BoxedStrategy<String> {
    let url = prop_oneof![
        24 => "https?://[a-z]{1,10}\\.example/[a-z0-9/]{0,20}".prop_map(string),
        1 => prop::sample::select(vec!["ftp://x/", "example.com", "", "HTTPS://x/"]).prop_map(string),
        1 => (2040usize..2056).prop_map(|n| string(format!("https://x/{}", "u".repeat(n - 10)))),
    ];
    let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.routing_key()).collect();
    let event = prop_oneof![
        24 => prop::sample::select(names).prop_map(str::to_string),
        1 => prop::sample::select(vec!["t2i.job.succeeded", "job.nope", ""]).prop_map(str::to_string),
    ];
    let events = vec(event, 0..4).prop_map(|e| Value::from(e).to_string());
    with_extras(vec![
        ("url", member(url.boxed())),
        ("events", member(events.boxed())),
    ])
}

fn batch() -> BoxedStrategy<String> {
    with_extras(vec![
        ("id", member(id())),
        ("index", member(number_in(0, u64::MAX - 1))),
        ("total", member(number_in(0, u64::MAX - 1))),
    ])
}

/// A job built member by member: valid most of the time, each member sometimes absent or wrong.
pub(crate) fn near_valid_job() -> BoxedStrategy<String> {
    let small = member;
    with_extras(vec![
        ("job_id", member(id())),
        ("prompt", member(prompt())),
        ("negative_prompt", small(prompt())),
        ("width", small(side())),
        ("height", small(side())),
        ("steps", small(number_in(1, 150))),
        ("guidance_scale", small(guidance())),
        ("scheduler", small(scheduler())),
        (
            "seed",
            small(any::<u64>().prop_map(|s| s.to_string()).boxed()),
        ),
        ("num_images", small(number_in(1, 8))),
        ("long_prompt", small(long_prompt())),
        ("prompt_weighting", small(prompt_weighting())),
        ("model", small(model())),
        ("output", small(output())),
        ("webhook", small(webhook())),
        ("batch", small(batch())),
        ("deadline", small(deadline())),
        (
            "metadata",
            small(json_value().prop_map(|v| v.to_string()).boxed()),
        ),
    ])
}

/// A valid job's message with a few bytes changed, inserted or cut.
fn mutated_job() -> BoxedStrategy<Vec<u8>> {
    let edits = vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4);
    (near_valid_job(), edits)
        .prop_map(|(body, edits)| {
            let mut b = body.into_bytes();
            for (at, byte, op) in edits {
                let i = at.index(b.len() + 1);
                match op {
                    0 => b.insert(i, byte),
                    1 if i < b.len() => b[i] = byte,
                    2 if i < b.len() => {
                        b.remove(i);
                    }
                    _ => b.truncate(i),
                }
            }
            b
        })
        .boxed()
}

// ---- the property --------------------------------------------------------------------------

fn parse(body: &[u8]) -> Result<Job, BadBody> {
    parse_job_body(body, &Limits::default(), &ModelDefaults::default())
}

/// What a run saw: jobs accepted, and rejections by field.
#[derive(Default)]
struct Tally {
    jobs: u32,
    rejected: BTreeMap<String, u32>,
}

impl Tally {
    fn report(&self, name: &str, tried: u32) {
        let rejected: u32 = self.rejected.values().sum();
        eprintln!(
            "{name}: {tried} inputs, {} jobs, {rejected} rejections by field {:?}",
            self.jobs, self.rejected
        );
    }
}

fn check(body: &[u8], tally: &RefCell<Tally>) -> Result<(), TestCaseError> {
    match parse(body) {
        Ok(job) => {
            let message = serde_json::to_vec(&job.to_request())
                .map_err(|e| TestCaseError::fail(format!("the job does not serialise: {e}")))?;
            let again = parse(&message).map_err(|b| {
                TestCaseError::fail(format!("its own message is refused: {}", b.rejection))
            })?;
            // Its objects stay under its key prefix, outside the store's id index.
            let key = ObjectKey::result(&job.output.key_prefix, &job.job_id);
            prop_assert!(
                !key.split('/').any(|s| s == "." || s == "..") && !key.starts_with(INDEX_PREFIX),
                "{} leaves its prefix",
                key
            );
            let mut expected = job;
            expected.generation.seed_was_random = false;
            prop_assert_eq!(again, expected);
            tally.borrow_mut().jobs += 1;
        }
        Err(bad) => {
            let r = &bad.rejection;
            prop_assert!(!r.reason.is_empty(), "no reason: {:?}", r);
            prop_assert!(
                names_a_member(body, &r.field),
                "field {:?} is not in the body",
                r
            );
            *tally
                .borrow_mut()
                .rejected
                .entry(top(&r.field))
                .or_default() += 1;
        }
    }
    Ok(())
}

/// The field's first segment: `output.quality` → `output`.
fn top(field: &str) -> String {
    field.split(['.', '[']).next().unwrap_or(field).to_string()
}

/// `body` (the whole message), a contract field, or a member the body actually has.
fn names_a_member(body: &[u8], field: &str) -> bool {
    const FIELDS: [&str; 18] = [
        "job_id",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "scheduler",
        "seed",
        "num_images",
        "long_prompt",
        "prompt_weighting",
        "model",
        "output",
        "webhook",
        "batch",
        "deadline",
        "metadata",
    ];
    // Raw values: the members' names, however deep their values nest.
    let members =
        serde_json::from_slice::<BTreeMap<String, Box<serde_json::value::RawValue>>>(body);
    // A body broken after the member the parser stopped at still names it.
    let quoted = |name: &str| {
        let q = Value::from(name).to_string();
        body.windows(q.len()).any(|w| w == q.as_bytes())
    };
    let has = |name: &str| members.as_ref().is_ok_and(|m| m.contains_key(name)) || quoted(name);
    !field.is_empty()
        && (field == "body"
            || FIELDS.contains(&top(field).as_str())
            || has(field)
            || has(&top(field)))
}

#[test]
fn arbitrary_bytes_never_panic_and_are_rejected_by_field() {
    let tally = RefCell::default();
    let tried = run(vec(any::<u8>(), 0..512), |b| check(&b, &tally));
    tally.borrow().report("bytes", tried);
}

#[test]
fn near_valid_jobs_parse_and_round_trip_or_are_rejected_by_field() {
    let tally = RefCell::<Tally>::default();
    let tried = run(near_valid_job(), |b| check(b.as_bytes(), &tally));
    let t = tally.borrow();
    t.report("near-valid jobs", tried);
    // The generator reaches both sides, or the property says little.
    assert!(t.jobs > tried / 20, "too few valid jobs");
    assert!(t.rejected.len() > 10, "too few kinds of rejection");
}

#[test]
fn mutated_jobs_never_panic_and_are_rejected_by_field() {
    let tally = RefCell::default();
    let tried = run(mutated_job(), |b| check(&b, &tally));
    tally.borrow().report("mutated jobs", tried);
}

#[test]
fn bodies_around_the_size_limit_are_judged_by_size_first() {
    let tally = RefCell::default();
    let sizes = (MAX_MESSAGE_BYTES - 64)..(MAX_MESSAGE_BYTES + 64);
    let tried = run(sizes, |n| {
        let head = r#"{"job_id":"a","prompt":"x","metadata":""#;
        let pad = n.saturating_sub(head.len() + 2);
        let body = format!("{head}{}\"}}", "m".repeat(pad));
        check(body.as_bytes(), &tally)?;
        if body.len() > MAX_MESSAGE_BYTES {
            let field = parse(body.as_bytes()).err().map(|b| b.rejection.field);
            prop_assert_eq!(field.as_deref(), Some("body"));
        }
        Ok(())
    });
    tally.borrow().report("sizes", tried);
}
