//! Every job state over HTTP: `GET /v1/jobs/{id}` reads the store's records (queued, running,
//! succeeded, failed, canceled, expired) for jobs from the gateway and from other producers, under
//! any key prefix, with URLs presigned on each read; `DELETE` cancels. Real gateway, worker,
//! RabbitMQ and Garage.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, get_object, s3, serial};
use crate::webhooks::{json, spawn_gateway};

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn post(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), json(r).await)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), json(r).await)
    }

    async fn delete(&self, id: &str) -> (u16, Value) {
        let url = format!("{}/v1/jobs/{id}", self.base);
        let r = self.http.delete(url).send().await.unwrap();
        (r.status().as_u16(), json(r).await)
    }

    /// Polls the job until `done` holds for its record, which must always be found (200) unless
    /// `may_be_unknown` (a job from another producer, not started yet).
    async fn until(&self, id: &str, may_be_unknown: bool, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (status, v) = self.get(&format!("/v1/jobs/{id}")).await;
            if status == 200 && done(&v) {
                return v;
            }
            assert!(
                status == 200 || (may_be_unknown && status == 404),
                "{id}: HTTP {status} {v}"
            );
            assert!(Instant::now() < deadline, "{id}: last seen {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn state(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_state_is_readable_over_http_and_delete_cancels() {
    let _g = serial().await;
    let world = World::new("jobs").await;
    let dir = tempfile::tempdir().unwrap();
    let (_gateway, base) = spawn_gateway(
        &world,
        &["--min-side", "32", "--presign-ttl-s", "600"],
        &dir.path().join("gateway.log"),
    )
    .await;
    let api = Api {
        base,
        http: reqwest::Client::new(),
    };
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &["--max-batch", "1", "--batch-window-ms", "0"],
    );
    let s3 = s3().await;

    // 1. Through the gateway under a key prefix, found by id alone (the index), URLs made per read.
    let (status, v) = api
        .post(
            json!({"prompt": "a dog", "width": 32, "height": 32, "steps": 1,
            "output": {"key_prefix": "sets/a/"}}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let (_, queued) = api.get(&format!("/v1/jobs/{id}")).await;
    if state(&queued) == "queued" {
        assert!(
            queued["params"]["seed"].is_null(),
            "no seed before a worker draws it: {queued}"
        );
    }
    let first = api.until(&id, false, |v| state(v) == "succeeded").await;
    assert!(first["params"]["seed"].is_u64(), "{first}");
    assert!(first["updated_at"].is_string(), "{first}");
    let img = &first["images"][0];
    assert_eq!(img["key"], format!("{}/sets/a/{id}/0.png", world.prefix));
    let url = img["url"].as_str().unwrap();
    assert!(img["url_expires_at"].is_string());
    let png = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Signed again on the next read (SigV4 dates have one-second resolution).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, again) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_ne!(again["images"][0]["url"], img["url"], "presigned afresh");
    // What is stored holds durable locations only.
    let key = format!("{}/sets/a/{id}/result.json", world.prefix);
    let (stored, _, _) = get_object(&s3, &key).await.expect("result.json");
    let stored: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored["status"], "succeeded");
    assert!(stored["images"][0]["url"].is_null(), "{stored}");
    assert_eq!(stored["images"][0]["key"], img["key"]);
    assert!(stored["images"][0]["bucket"].is_string());
    let index = format!("{}/_index/{id}.json", world.prefix);
    assert!(get_object(&s3, &index).await.is_some(), "no index object");
    // The prefix may also be given; a wrong one finds nothing; a bad one is refused.
    let (status, _) = api.get(&format!("/v1/jobs/{id}?key_prefix=sets/a/")).await;
    assert_eq!(status, 200);
    let (status, v) = api.get(&format!("/v1/jobs/{id}?key_prefix=sets/b/")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, v) = api.get(&format!("/v1/jobs/{id}?key_prefix=../x/")).await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (422, Some("key_prefix"))
    );
    let (status, v) = api.delete(&id).await;
    assert_eq!((status, state(&v)), (409, "succeeded"), "{v}");

    // 2. Expired before it started: failure.json, read back with its error.
    let (_, v) = api
        .post(
            json!({"prompt": "late", "width": 32, "height": 32, "steps": 1,
            "deadline": "2020-01-01T00:00:00Z"}),
        )
        .await;
    let late = v["job_id"].as_str().unwrap().to_string();
    let v = api.until(&late, false, |v| state(v) == "expired").await;
    assert_eq!(v["error"]["code"], "expired", "{v}");
    let (status, _) = api.delete(&late).await;
    assert_eq!(status, 409);

    // 3. Canceled while running: large enough (512², CFG, 150 steps) to be running when the cancel
    // arrives, and stopped between steps.
    let (_, v) = api
        .post(json!({"prompt": "long", "width": 512, "height": 512, "steps": 150}))
        .await;
    let long = v["job_id"].as_str().unwrap().to_string();
    let running = api.until(&long, false, |v| state(v) != "queued").await;
    assert_eq!(state(&running), "running", "{running}");
    assert_eq!(running["worker"], "w1");
    let (status, v) = api.delete(&long).await;
    assert_eq!((status, state(&v)), (202, "cancel_requested"), "{v}");
    let v = api.until(&long, false, |v| state(v) != "running").await;
    assert_eq!(state(&v), "canceled", "{v}");
    assert_eq!(v["error"]["code"], "canceled");

    // 4. From another producer (as `t2i enqueue` publishes: a prefix, no gateway record): unknown
    // until a worker starts it, then found by id.
    let body = json!({"job_id": "direct-1", "prompt": "x", "width": 32, "height": 32, "steps": 1,
        "output": {"key_prefix": "datasets/x/"}});
    world
        .publish(Lane::Bulk, "direct-1", body.to_string().as_bytes())
        .await;
    let v = api
        .until("direct-1", true, |v| state(v) == "succeeded")
        .await;
    assert_eq!(
        v["images"][0]["key"],
        format!("{}/datasets/x/direct-1/0.png", world.prefix)
    );

    // 5. Invalid input from another producer: failed, with the field, recorded at the root.
    let bad = br#"{"job_id": "bad-1", "prompt": "x", "width": 4096}"#;
    world.publish(Lane::Interactive, "bad-1", bad).await;
    let v = api.until("bad-1", true, |v| state(v) == "failed").await;
    assert_eq!(v["error"]["code"], "invalid_input", "{v}");
    assert_eq!(v["error"]["field"], "width");

    // 6. Unknown and malformed ids: JSON errors.
    let (status, v) = api.get("/v1/jobs/never-seen").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, v) = api.get("/v1/jobs/a%20b").await;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (422, Some("job_id"))
    );
    drop(worker);
}
