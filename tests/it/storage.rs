//! The stores behind the worker: S3 multipart uploads and presigned URLs against Garage (also for
//! a public endpoint name), and a local folder as the store.

use std::collections::HashSet;
use std::time::Duration;

use t2i_worker::queue::Lane;

use crate::broker::{WorkerProc, World, get_object, s3, serial};
use crate::worker::{all_succeeded, job};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_uploads_and_presigned_urls_work_against_garage() {
    use t2i_worker::storage::{ImageStore, S3Options, S3Store};
    let _g = serial().await;
    crate::broker::garage_env();
    let prefix = format!(
        "t2it-multipart-{}/",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let opts = S3Options {
        force_path_style: Some(true),
        public_endpoint: None,
    };
    let store = S3Store::from_env(&crate::broker::bucket(), &prefix, &opts)
        .await
        .unwrap()
        .with_multipart(5 * 1024 * 1024, 5 * 1024 * 1024);
    let body: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let meta = vec![("job-id".to_string(), "big".to_string())];
    let stored = store
        .put(
            "big.bin",
            body.clone(),
            "application/octet-stream",
            &meta,
            Some(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get("big.bin").await.unwrap().as_deref(),
        Some(&body[..])
    );
    assert_eq!(store.get("absent.bin").await.unwrap(), None);
    // The presigned URL serves the object to a client without credentials.
    let url = stored.url.unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..head_end]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(resp.len() - head_end - 4, body.len());
    let client = s3().await;
    let (_, ct, meta) = get_object(&client, &format!("{prefix}big.bin"))
        .await
        .unwrap();
    assert_eq!(ct.as_deref(), Some("application/octet-stream"));
    assert_eq!(meta.get("job-id").map(String::as_str), Some("big"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_presigned_for_a_public_endpoint_name_it_and_open_without_credentials() {
    use t2i_worker::storage::{ImageStore, S3Options, Store};
    let _g = serial().await;
    let public = crate::broker::public_garage_endpoint();
    let public_url = reqwest::Url::parse(&public).unwrap();
    let prefix = format!(
        "t2it-public-{}/",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let storage = format!("s3://{}/{prefix}", crate::broker::bucket());
    let open = |endpoint: &str| {
        let opts = S3Options {
            force_path_style: None,
            public_endpoint: Some(endpoint.to_string()),
        };
        let storage = storage.clone();
        async move { Store::open(&storage, &opts).await.unwrap() }
    };
    let body = b"\x89PNG\r\n\x1a\n not really a png".to_vec();
    let store = open(&public).await;
    let stored = store
        .put(
            "a.png",
            body.clone(),
            "image/png",
            &[],
            Some(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    let url = reqwest::Url::parse(stored.url.as_deref().unwrap()).unwrap();
    assert_eq!(
        (url.host_str(), url.port()),
        (Some("localhost"), public_url.port()),
        "{url}"
    );
    assert!(
        url.path()
            .starts_with(&format!("/{}/{prefix}", crate::broker::bucket())),
        "path-style for the public endpoint: {url}"
    );
    // A client without credentials opens it at the public name.
    let r = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    // The signature covers the host: it was signed for the public name, not rewritten afterwards.
    let mut moved = url.clone();
    moved.set_host(Some("127.0.0.1")).unwrap();
    assert_eq!(reqwest::get(moved).await.unwrap().status(), 403);
    // Presigning does no I/O and every request goes to AWS_ENDPOINT_URL: a public endpoint where
    // nothing listens changes only the URLs.
    let elsewhere = open("http://127.0.0.1:9").await;
    let stored = elsewhere
        .put(
            "b.png",
            body.clone(),
            "image/png",
            &[],
            Some(Duration::from_secs(300)),
        )
        .await
        .unwrap();
    assert!(
        stored
            .url
            .as_deref()
            .unwrap()
            .starts_with("http://127.0.0.1:9/"),
        "{stored:?}"
    );
    assert_eq!(
        elsewhere.get("a.png").await.unwrap().as_deref(),
        Some(&body[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_folder_works_as_the_store() {
    let _g = serial().await;
    let mut world = World::new("local").await;
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", dir.path().display());
    let worker = WorkerProc::spawn(&world, "w1", &["--storage", &storage]);
    world
        .publish(
            Lane::Interactive,
            "l1",
            &job("l1", 32, 32, 1, "euler", 9, 2),
        )
        .await;
    let ids: HashSet<String> = ["l1".to_string()].into();
    assert!(
        world
            .collect_until(Duration::from_secs(60), all_succeeded(&ids))
            .await
    );
    for i in 0..2 {
        let img = image::open(dir.path().join(format!("l1/{i}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    assert!(dir.path().join("l1/result.json").exists());
    let e = &world.terminal()["l1"][0];
    assert!(
        e.data.images[0]
            .url
            .as_deref()
            .unwrap()
            .starts_with("file://")
    );
    drop(worker);
    world.cleanup().await;
}
