//! Unit tests of the job message (`message.rs`): parsing, bounds, ids, key prefixes, models.

use super::*;

fn parse(body: &str) -> Result<Job, BadBody> {
    parse_job_body(
        body.as_bytes(),
        &Limits::default(),
        &ModelDefaults::default(),
    )
}

#[test]
fn the_design_example_parses() {
    let body = r#"{
      "job_id": "0190f6c2-7d3e-7a41-9c55-3b1f0e2a9d10",
      "prompt": "a wolf, half ice and half fire, dark fantasy, cinematic",
      "negative_prompt": "blurry, low quality",
      "width": 1024, "height": 1024,
      "steps": 25, "guidance_scale": 7.0, "scheduler": "euler",
      "seed": 42, "num_images": 1,
      "model": "segmind/SSD-1B",
      "output": {"format": "png", "quality": 90, "key_prefix": "datasets/wolves/", "presign_ttl_s": 3600},
      "webhook": {"url": "https://example.com/hooks/t2i", "events": ["job.succeeded", "job.failed"]},
      "batch": {"id": "wolves-2026-11", "index": 17, "total": 1000},
      "deadline": "2026-11-26T12:00:00Z",
      "metadata": {"anything": "echoed back verbatim"}
    }"#;
    let job = parse(body).unwrap();
    assert_eq!(job.output.key_prefix, "datasets/wolves/");
    assert_eq!(job.generation.seed, 42);
    assert!(job.deadline.is_some());
}

#[test]
fn only_job_id_and_prompt_are_required() {
    let job = parse(r#"{"job_id": "a", "prompt": "x"}"#).unwrap();
    assert_eq!(job.output.format, ImageFormat::Png);
    assert!(job.generation.seed_was_random);
}

#[test]
fn a_wrongly_typed_field_is_named_by_its_path() {
    let e = parse(r#"{"job_id": "a", "prompt": "x", "output": {"quality": "high"}}"#).unwrap_err();
    assert_eq!(e.rejection.field, "output.quality");
    assert_eq!(e.job_id.unwrap().as_str(), "a");
}

#[test]
fn unknown_fields_are_rejected() {
    let e = parse(r#"{"job_id": "a", "prompt": "x", "stpes": 3}"#).unwrap_err();
    assert!(e.rejection.reason.contains("stpes"), "{:?}", e.rejection);
}

#[test]
fn malformed_bodies_and_bad_ids_are_rejected() {
    assert_eq!(parse("not json").unwrap_err().rejection.field, "body");
    // Found by the property run (`fuzz`): these named the field `?`.
    assert_eq!(parse("[").unwrap_err().rejection.field, "body");
    assert_eq!(parse("{1").unwrap_err().rejection.field, "body");
    assert_eq!(parse("[x").unwrap_err().rejection.field, "body");
    assert!(parse("not json").unwrap_err().job_id.is_none());
    assert_eq!(
        parse(r#"{"prompt": "x"}"#).unwrap_err().rejection.field,
        "job_id"
    );
    assert_eq!(
        parse(r#"{"job_id": "a b", "prompt": "x"}"#)
            .unwrap_err()
            .rejection
            .field,
        "job_id"
    );
    let big = format!(r#"{{"job_id": "a", "prompt": "{}"}}"#, "x".repeat(70_000));
    assert_eq!(parse(&big).unwrap_err().rejection.field, "body");
}

#[test]
fn a_webhook_names_a_receiver_a_url_or_both_never_neither() {
    for ok in [
        r#"{"receiver": "acme"}"#,
        r#"{"receiver": "acme", "url": "https://hooks.acme.example/t2i/7"}"#,
        r#"{"url": "https://hooks.example/t2i"}"#,
    ] {
        let body = format!(r#"{{"job_id": "a", "prompt": "x", "webhook": {ok}}}"#);
        assert!(parse(&body).is_ok(), "{ok}");
    }
    for (bad, field) in [
        (r#"{}"#, "webhook"),
        (r#"{"events": ["job.failed"]}"#, "webhook"),
        (r#"{"receiver": "../etc"}"#, "webhook.receiver"),
        (r#"{"receiver": ""}"#, "webhook.receiver"),
        (
            r#"{"receiver": "a", "secret": "whsec_x"}"#,
            "webhook.secret",
        ),
    ] {
        let body = format!(r#"{{"job_id": "a", "prompt": "x", "webhook": {bad}}}"#);
        let e = parse(&body).unwrap_err().rejection;
        assert!(
            e.field == field || e.reason.contains("secret"),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn ids_that_would_name_a_folder_outside_the_job_are_rejected() {
    // Found by the property run: `..` put the job's objects in the prefix's parent folder.
    for bad in [".", "..", "_index"] {
        let body = format!(r#"{{"job_id": "{bad}", "prompt": "x"}}"#);
        assert_eq!(parse(&body).unwrap_err().rejection.field, "job_id", "{bad}");
        let body = format!(r#"{{"job_id": "a", "prompt": "x", "batch": {{"id": "{bad}"}}}}"#);
        assert_eq!(
            parse(&body).unwrap_err().rejection.field,
            "batch.id",
            "{bad}"
        );
    }
    assert!(parse(r#"{"job_id": "...", "prompt": "x"}"#).is_ok());
}

#[test]
fn key_prefixes_cannot_escape() {
    for bad in [
        "/abs/",
        "a/../b/",
        "spa ce/",
        "_index/",
        "_index/x/",
        "./_index/",
        "a/./b/",
        "0/./",
        ".",
    ] {
        let body =
            format!(r#"{{"job_id": "a", "prompt": "x", "output": {{"key_prefix": "{bad}"}}}}"#);
        assert_eq!(
            parse(&body).unwrap_err().rejection.field,
            "output.key_prefix",
            "{bad}"
        );
    }
}

#[test]
fn any_model_name_parses_and_what_names_none_is_rejected() {
    // Whether a pool serves it is for the broker and the worker to say, not the parser.
    for ok in ["stabilityai/sdxl", "SSD-1B", "/models/vega"] {
        let body = format!(r#"{{"job_id": "a", "prompt": "x", "model": "{ok}"}}"#);
        assert!(parse(&body).is_ok(), "{ok}");
    }
    for bad in ["", "/", "a/.."] {
        let body = format!(r#"{{"job_id": "a", "prompt": "x", "model": "{bad}"}}"#);
        assert_eq!(parse(&body).unwrap_err().rejection.field, "model", "{bad}");
    }
    let long = format!(
        r#"{{"job_id": "a", "prompt": "x", "model": "{}"}}"#,
        "m/".repeat(300)
    );
    assert_eq!(parse(&long).unwrap_err().rejection.field, "model");
}

#[test]
fn deadlines_are_rfc3339_and_checked() {
    let job =
        parse(r#"{"job_id": "a", "prompt": "x", "deadline": "2000-01-01T00:00:00Z"}"#).unwrap();
    assert!(job.is_expired(OffsetDateTime::now_utc()));
    let e = parse(r#"{"job_id": "a", "prompt": "x", "deadline": "tomorrow"}"#).unwrap_err();
    assert_eq!(e.rejection.field, "deadline");
}

#[test]
fn oversized_metadata_is_rejected() {
    let body = format!(
        r#"{{"job_id": "a", "prompt": "x", "metadata": {{"k": "{}"}}}}"#,
        "v".repeat(9000)
    );
    assert_eq!(parse(&body).unwrap_err().rejection.field, "metadata");
}
