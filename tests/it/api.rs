//! The gateway against its own OpenAPI document, with a real RabbitMQ and Garage and no worker:
//! the holes issue 16 found in it, one request each, then a bounded schemathesis run
//! (scripts/requirements-test.txt; `PYTHON` names the venv's interpreter, whose `st` is used)
//! that generates requests from `/openapi.json` and fails on any answer the document does not
//! allow: a 5xx, an undocumented status or content type, a body outside its schema, or a `$ref`
//! it cannot resolve.
//!
//! `T2I_SCHEMATHESIS_EXAMPLES` raises the examples per operation (default [`EXAMPLES`]).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

use crate::broker::{World, serial};
use crate::webhooks::{json, python, spawn_gateway};

const TOKEN: &str = "s3cret";
/// Examples per operation and phase: about 60 s for the whole run on a shared CI core, most of
/// it `POST /generate-image` waiting out its 1 s timeout. Enough to have found every hole above.
const EXAMPLES: u32 = 25;
/// The schemathesis checks that must pass (`st run --checks`).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_schema_conformance,response_headers_conformance,unsupported_method,ignored_auth";
/// Without a worker, `POST /generate-image` can only time out (504, documented): allowed there,
/// and only there. Warnings that mean a broken document fail the run.
const CONFIG: &str = r#"
[warnings]
fail-on = ["unresolvable_reference", "missing_auth", "unsupported_regex", "method_not_allowed"]

[[operations]]
include-name = "POST /generate-image"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
"#;

/// `DELETE /v1/jobs/{id}` answers 503 when no worker hears cancellations: a queue on the
/// control exchange stands in for one, so that 503 stays an error.
async fn listen_for_cancellations(world: &World) {
    let ch = world.conn.raw().create_channel().await.unwrap();
    let queue = format!("{}.test-control", world.prefix);
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        world.topology.control_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn send(r: reqwest::RequestBuilder) -> (u16, String, Value) {
    let r = r.bearer_auth(TOKEN).send().await.unwrap();
    let status = r.status().as_u16();
    let kind = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, kind, json(r).await)
}

/// A job body of exactly `len` bytes, without a `job_id`, and valid: a 4000-character prompt of
/// escaped emoji (12 bytes each), a negative prompt of escaped `é` (6 bytes each) to pad.
fn body_of(len: usize) -> Vec<u8> {
    let prompt = r"\ud83d\ude00".repeat(4000);
    let head = format!(r#"{{"prompt": "{prompt}", "negative_prompt": ""#);
    let pad = len - head.len() - 2;
    let negative = format!("{}{}", r"\u00e9".repeat(pad / 6), "n".repeat(pad % 6));
    format!(r#"{head}{negative}"}}"#).into_bytes()
}

/// The holes of issue 16 ("Gateway and its OpenAPI document"), each as the request that showed it.
async fn regressions(base: &str) {
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>| {
        http.post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body)
    };
    // A repeated query parameter answered text/plain.
    let (status, kind, v) = send(post("/v1/jobs?lane=bulk&lane=interactive", b"{}".into())).await;
    assert_eq!((status, kind.as_str()), (400, "application/json"), "{v}");
    assert_eq!(v["error"]["code"], "invalid_query");
    let (status, _, v) = send(post("/v1/jobs?lane=", br#"{"prompt": "x"}"#.into())).await;
    assert_eq!((status, &v["error"]["field"]), (422, &"lane".into()), "{v}");
    // Unknown routes and wrong methods answered with an empty body.
    let (status, kind, v) = send(http.get(format!("{base}/no/such/route"))).await;
    assert_eq!((status, kind.as_str()), (404, "application/json"), "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    let r = http.put(format!("{base}/v1/jobs")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    let (status, kind, v) = send(http.put(format!("{base}/v1/jobs"))).await;
    assert_eq!((status, kind.as_str()), (405, "application/json"), "{v}");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    // An id that is not UTF-8 once decoded answered text/plain.
    let (status, kind, v) = send(http.get(format!("{base}/v1/jobs/%FF"))).await;
    assert_eq!((status, kind.as_str()), (422, "application/json"), "{v}");
    // A body of exactly the limit was refused once the gateway had added its job_id.
    let (status, _, v) = send(post("/v1/jobs", body_of(64 * 1024))).await;
    assert_eq!(status, 202, "{v}");
    let (status, _, v) = send(post("/v1/jobs", body_of(64 * 1024 + 1))).await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (413, &"too_large".into()),
        "{v}"
    );
    // `job_id` is optional where the gateway assigns one.
    let spec = json(
        http.get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let job = &spec["components"]["schemas"]["JobSubmission"];
    assert_eq!(job["required"], serde_json::json!(["prompt"]), "{job}");
}

/// Runs schemathesis against the gateway at `base`; returns its output, panicking on a failure.
fn schemathesis(base: &str, dir: &Path) -> String {
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let examples = std::env::var("T2I_SCHEMATHESIS_EXAMPLES").unwrap_or(EXAMPLES.to_string());
    let st = Path::new(&python()).with_file_name("st");
    let out = std::fs::File::create(dir.join("st.log")).unwrap();
    let auth = format!("Authorization: Bearer {TOKEN}");
    // In the temporary folder: `st` keeps its crash cache (`.schemathesis/`) in the working one.
    let mut child = Command::new(&st)
        .current_dir(dir)
        .arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("{base}/openapi.json"), "--checks", CHECKS])
        .args(["--max-examples", &examples, "--seed", "16", "-H", &auth])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--request-timeout", "10", "--output-sanitize", "false"])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (pip install -r scripts/requirements-test.txt)",
                st.display()
            )
        });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(dir.join("st.log")).unwrap_or_default();
    if !status.is_some_and(|s| s.success()) {
        // A 503 is often the broker or Garage restarted under the test: the gateway says which.
        let gateway = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
        let problems: Vec<&str> = gateway.lines().filter(|l| !l.contains("INFO")).collect();
        let tail = problems[problems.len().saturating_sub(20)..].join("\n");
        panic!("schemathesis: {status:?}\n{log}\ngateway warnings, last 20:\n{tail}");
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_as_its_openapi_document_says() {
    let _g = serial().await;
    let world = World::new("api").await;
    listen_for_cancellations(&world).await;
    let dir = tempfile::tempdir().unwrap();
    let (_gateway, base) = spawn_gateway(
        &world,
        &["--auth-token", TOKEN, "--wait-timeout-s", "1"],
        &dir.path().join("gateway.log"),
    )
    .await;
    regressions(&base).await;
    let base2 = base.clone();
    let dir2 = dir.path().to_path_buf();
    let log = tokio::task::spawn_blocking(move || schemathesis(&base2, &dir2))
        .await
        .unwrap();
    // The numbers, for the record (`cargo test -- --nocapture`).
    for line in log
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed"))
    {
        eprintln!("schemathesis: {}", line.trim());
    }
    world.cleanup().await;
}
