//! A LoRA job through the real `t2i worker`, RabbitMQ and Garage: adapters from the worker's LoRA
//! folder, jobs with different adapter sets in one queue, each image equal to the same job rendered
//! alone in this process; the events' `params.loras` and the PNG's A1111 parameters; adapters that
//! escape the folder, are missing or do not fit the model fail their job only. And `s3://` adapters
//! through the worker's S3 client against Garage.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::Duration;

use candle_core::DType;
use sha2::Digest;
use t2i_worker::events::CloudEvent;
use t2i_worker::job::{Limits, parse_job_body};
use t2i_worker::pipeline::lora::AdapterFile;
use t2i_worker::pipeline::{ImageSpec, RenderBatch, Variant};
use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, get_object, s3, serial};
use crate::support::{fixtures, load_pipeline};

fn body(id: &str, seed: u64, loras: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "job_id": id, "prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 64,
        "height": 64, "steps": 2, "seed": seed, "loras": loras
    })
    .to_string()
    .into_bytes()
}

/// A1111's short hash of a safetensors file: SHA-256 of the bytes after the header, 12 digits.
fn addnet_hash(bytes: &[u8]) -> String {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    hex::encode(sha2::Sha256::digest(&bytes[8 + n..]))[..12].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_jobs_render_with_their_own_adapters_and_record_them() {
    let _g = serial().await;
    let mut world = World::new("lora").await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, cache) = (tmp.path().join("loras"), tmp.path().join("cache"));
    std::fs::create_dir_all(dir.join("styles")).unwrap();
    for (from, to) in [
        ("ssd1b-peft.safetensors", "styles/ink.safetensors"),
        ("ssd1b-kohya.safetensors", "face.safetensors"),
        ("sdxl-kohya-sgm.safetensors", "sdxl-only.safetensors"),
    ] {
        std::fs::copy(fixtures().join("loras").join(from), dir.join(to)).unwrap();
    }
    std::fs::write(tmp.path().join("outside.safetensors"), b"secret").unwrap();
    std::os::unix::fs::symlink(
        tmp.path().join("outside.safetensors"),
        dir.join("escape.safetensors"),
    )
    .unwrap();
    let worker = WorkerProc::spawn(
        &world,
        "w1",
        &[
            "--max-batch",
            "4",
            "--batch-window-ms",
            "400",
            "--lora-dir",
            dir.to_str().unwrap(),
            "--lora-cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    let ink = serde_json::json!([{"uri": "styles/ink.safetensors", "scale": 0.8}]);
    let face = serde_json::json!([{"uri": "face.safetensors", "scale": -0.7}]);
    let stack = serde_json::json!([{"uri": "styles/ink.safetensors", "scale": 0.6}, {"uri": "face.safetensors"}]);
    let good = [
        ("ink-1", 1, ink.clone()),
        ("face-1", 2, face.clone()),
        ("ink-2", 3, ink.clone()),
        ("plain-1", 4, serde_json::json!([])),
        ("stack-1", 5, stack),
        ("face-2", 6, face),
    ];
    let bad = [
        (
            "escape",
            serde_json::json!([{"uri": "escape.safetensors"}]),
            "outside the LoRA folder",
        ),
        (
            "missing",
            serde_json::json!([{"uri": "nope.safetensors"}]),
            "not found",
        ),
        (
            "misfit",
            serde_json::json!([{"uri": "sdxl-only.safetensors"}]),
            "mid_block_attentions_0",
        ),
    ];
    let mut ids = HashSet::new();
    for (id, seed, loras) in &good {
        world
            .publish(Lane::Interactive, id, &body(id, *seed, loras.clone()))
            .await;
        ids.insert(id.to_string());
    }
    for (id, loras, _) in &bad {
        world
            .publish(Lane::Interactive, id, &body(id, 9, loras.clone()))
            .await;
        ids.insert(id.to_string());
    }
    let finished = world
        .collect_until(Duration::from_secs(180), |seen: &[CloudEvent]| {
            let done: HashSet<&str> = seen
                .iter()
                .filter(|e| e.kind.ends_with(".succeeded") || e.kind.ends_with(".failed"))
                .map(|e| e.subject.as_str())
                .collect();
            ids.iter().all(|i| done.contains(i.as_str()))
        })
        .await;
    assert!(finished, "not every job ended: {}", worker.log_tail(40));
    let terminal = world.terminal();
    for (id, _, why) in &bad {
        let e = &terminal[*id][0];
        let error = e
            .data
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{id} succeeded"));
        assert_eq!(e.kind, "t2i.job.failed", "{id}");
        assert_eq!(
            serde_json::to_value(error.code).unwrap(),
            "invalid_input",
            "{id}"
        );
        assert_eq!(error.field.as_deref(), Some("loras[0].uri"), "{id}");
        assert!(error.message.contains(why), "{id}: {}", error.message);
        assert!(!error.message.contains("secret"));
    }

    let p = load_pipeline("ssd-1b-tiny", DType::F32, Variant::Auto);
    let limits = Limits {
        min_side: 32,
        ..Limits::default()
    };
    let client = s3().await;
    for (id, seed, _) in &good {
        let e = &terminal[*id][0];
        assert_eq!(e.kind, "t2i.job.succeeded", "{id}: {:?}", e.data.error);
        let job = parse_job_body(
            &body(
                id,
                *seed,
                good.iter().find(|g| g.0 == *id).unwrap().2.clone(),
            ),
            &limits,
            &p.model_defaults(),
        )
        .unwrap();
        let g = &job.generation;
        let params = e.data.params.as_ref().unwrap();
        // The files, as the job named them, from the LoRA folder.
        let files: Vec<AdapterFile> = g
            .loras
            .iter()
            .map(|l| AdapterFile::local(dir.join(&l.uri), l.scale).unwrap())
            .collect();
        let reported = params
            .get("loras")
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default();
        assert_eq!(reported.len(), files.len(), "{id}: {params}");
        for (r, f) in reported.iter().zip(&files) {
            assert_eq!(r["sha256"], f.sha256.as_str(), "{id}");
            assert_eq!(r["scale"].as_f64(), Some(f.scale), "{id}");
        }
        // The stored image is this job rendered alone, with its own adapters.
        let (png, _, _) = get_object(&client, &e.data.images[0].key).await.unwrap();
        let stored = image::load_from_memory(&png).unwrap().to_rgb8();
        let alone = RenderBatch::new(g, ImageSpec::all_of(g)).with_loras(files.clone());
        let want = p
            .render(&alone, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert!(
            stored == want.images[0],
            "{id}: the stored image is not the job's own render"
        );
        // A1111 metadata: a tag per adapter after the prompt, and their short hashes.
        let text = String::from_utf8_lossy(&png);
        for (l, f) in g.loras.iter().zip(&files) {
            let tag = format!("<lora:{}:{}>", l.name(), l.scale);
            assert!(text.contains(&tag), "{id}: {tag} missing");
            let hash = addnet_hash(&std::fs::read(&f.path).unwrap());
            assert!(
                text.contains(&format!("{}: {hash}", l.name())),
                "{id}: hash of {}",
                l.name()
            );
        }
        if files.is_empty() {
            assert!(!text.contains("Lora hashes"), "{id}");
        }
    }
    // The worker survived the adapter that did not fit the model.
    let (status, _) = worker.http_get("/readyz").unwrap();
    assert_eq!(status, 200);
    drop(worker);
    world.cleanup().await;
}

/// `s3://` adapters with the worker's S3 client against Garage: read under an allowed prefix only;
/// a missing key is final; an object that is not safetensors is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_loras_are_read_only_under_an_allowed_prefix() {
    use t2i_worker::adapters::{FetchError, Fetcher, LoraSettings, S3Allow};
    use t2i_worker::job::{Lora, LoraSource};
    crate::broker::garage_env();
    let client = s3().await;
    let (bucket, prefix) = (
        crate::broker::bucket(),
        format!("lora-s3-{}", std::process::id()),
    );
    let file = std::fs::read(fixtures().join("loras/ssd1b-kohya.safetensors")).unwrap();
    for (key, body) in [
        ("loras/ink.safetensors", file.clone()),
        ("loras/junk.safetensors", b"<html>".to_vec()),
        ("private/ink.safetensors", file.clone()),
    ] {
        client
            .put_object()
            .bucket(&bucket)
            .key(format!("{prefix}/{key}"))
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(LoraSettings {
        dir: None,
        cache_dir: tmp.path().to_path_buf(),
        cache_max_bytes: 1 << 30,
        max_file_bytes: 1 << 30,
        s3_allow: vec![S3Allow::parse(&format!("s3://{bucket}/{prefix}/loras/")).unwrap()],
        s3: Default::default(),
        allow_http: false,
        allow_private_networks: false,
        hub_token: false,
        allow_hosts: vec![],
        timeout: Duration::from_secs(30),
    })
    .unwrap();
    let fetch = |key: &str| {
        let lora = Lora {
            uri: format!("s3://{bucket}/{prefix}/{key}"),
            scale: 1.0,
            sha256: None,
            short_hash: None,
            source: LoraSource::S3 {
                bucket: bucket.clone(),
                key: format!("{prefix}/{key}"),
            },
        };
        let fetcher = &fetcher;
        async move { fetcher.fetch(&lora).await }
    };
    let got = fetch("loras/ink.safetensors").await.unwrap();
    assert_eq!(got.hashes.sha256, hex::encode(sha2::Sha256::digest(&file)));
    assert_eq!(std::fs::read(&got.path).unwrap(), file);
    let refused = fetch("private/ink.safetensors").await.unwrap_err();
    assert!(refused.to_string().contains("--lora-s3-allow"), "{refused}");
    let missing = fetch("loras/nope.safetensors").await.unwrap_err();
    assert!(
        matches!(missing, FetchError::NotFound(_)) && !missing.is_retryable(),
        "{missing}"
    );
    let junk = fetch("loras/junk.safetensors").await.unwrap_err();
    assert!(matches!(junk, FetchError::Invalid(_)), "{junk}");
    for key in [
        "loras/ink.safetensors",
        "loras/junk.safetensors",
        "private/ink.safetensors",
    ] {
        let _ = client
            .delete_object()
            .bucket(&bucket)
            .key(format!("{prefix}/{key}"))
            .send()
            .await;
    }
}
