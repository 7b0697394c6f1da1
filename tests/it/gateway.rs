//! `t2i gateway` through the real binary, with a real worker, RabbitMQ and Garage: the Flask-demo
//! shape (`POST /generate-image`), `POST /v1/jobs` then `GET /v1/jobs/{id}`, and the structured 4xx.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::broker::{WorkerProc, World, serial};
use crate::webhooks::{json, spawn_gateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_generates_queues_and_reports_errors() {
    let _g = serial().await;
    let world = World::new("gateway").await;
    let public = crate::broker::public_garage_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let (_gateway, base) = spawn_gateway(
        &world,
        &[
            "--auth-token",
            "s3cret",
            "--min-side",
            "32",
            "--s3-public-endpoint",
            &public,
        ],
        &dir.path().join("gateway.log"),
    )
    .await;
    // As in docker/compose.yaml: the worker presigns for the name clients use, not its own.
    let worker = WorkerProc::spawn(&world, "w1", &["--s3-public-endpoint", &public]);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>, token: Option<&str>| {
        let mut r = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    // The Flask-demo shape: text in, a working image URL out.
    let r = post(
        "/generate-image",
        json!({"text": "a cat", "width": 32, "height": 32, "steps": 1})
            .to_string()
            .into_bytes(),
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = json(r).await;
    assert_eq!(v["status"], "succeeded");
    let url = v["image_url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{public}/")),
        "presigned for the public endpoint: {url}"
    );
    let png = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(
        hex::encode(Sha256::digest(&png)),
        v["images"][0]["sha256"].as_str().unwrap()
    );

    // POST /v1/jobs → 202, then GET /v1/jobs/{id} once stored.
    let r = post(
        "/v1/jobs",
        json!({"prompt": "a dog", "width": 32, "height": 32, "steps": 1})
            .to_string()
            .into_bytes(),
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let id = json(r).await["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let r = http
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        // Recorded as queued before it was published: never a 404 on the way.
        assert_eq!(r.status(), 200);
        let v = json(r).await;
        if v["status"] == "succeeded" {
            break v;
        }
        assert!(
            ["queued", "running"].contains(&v["status"].as_str().unwrap()),
            "{v}"
        );
        assert!(Instant::now() < deadline, "job {id} never finished");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["job_id"], id.as_str());

    // Structured 4xx.
    // (path, body, bearer token, expected status, expected error code)
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/generate-image",
            br#"{"text": "x"}"#.to_vec(),
            None,
            401,
            "unauthorized",
        ),
        (
            "/generate-image",
            br#"{"text": "x"}"#.to_vec(),
            Some("wrong"),
            401,
            "unauthorized",
        ),
        (
            "/generate-image",
            br#"{"text": "x", "width": 1001}"#.to_vec(),
            Some("s3cret"),
            422,
            "invalid_input",
        ),
        (
            "/generate-image",
            br#"{"prompt_typo": "x"}"#.to_vec(),
            Some("s3cret"),
            422,
            "invalid_input",
        ),
        (
            "/v1/jobs",
            br#"{"prompt": "x", "stpes": 3}"#.to_vec(),
            Some("s3cret"),
            422,
            "invalid_input",
        ),
        (
            "/v1/jobs",
            b"not json".to_vec(),
            Some("s3cret"),
            400,
            "invalid_json",
        ),
        (
            "/v1/jobs",
            vec![b' '; 70 * 1024],
            Some("s3cret"),
            413,
            "too_large",
        ),
    ];
    for (path, body, token, status, code) in cases {
        let r = post(path, body, token).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {code}");
        let v: Value = json(r).await;
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    let r = post(
        "/generate-image",
        br#"{"text": "x", "width": 1001}"#.to_vec(),
        Some("s3cret"),
    )
    .await
    .unwrap();
    assert_eq!(json(r).await["error"]["field"], "width");
    let r = http
        .get(format!("{base}/v1/jobs/never-submitted"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let spec = json(reqwest::get(format!("{base}/openapi.json")).await.unwrap()).await;
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["paths"]["/generate-image"]["post"].is_object());
    // Requests by route template (never the raw id) and status, with latency.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "t2i_http_requests_total{method=\"POST\",route=\"/generate-image\",status=\"401\"} 2",
        "t2i_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"413\"} 1",
        "t2i_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"404\"}",
        "t2i_http_request_duration_seconds_count{method=\"POST\",route=\"/generate-image\"}",
        "t2i_ready 1",
        "t2i_build_info{version=",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(!metrics.contains("never-submitted"), "{metrics}");
    drop(worker);
    world.cleanup().await;
}
