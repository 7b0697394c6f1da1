//! The fetch policy: local paths never leave the LoRA folder, URLs go through the webhooks' SSRF
//! guard, S3 keys must be under an allowed prefix, downloads are bounded, checked and cached.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A valid safetensors file of `n` f32 values.
fn safetensors_bytes(n: usize) -> Vec<u8> {
    let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![n],
        bytemuck::cast_slice(&values),
    )
    .unwrap();
    safetensors::serialize([("w", view)], None).unwrap()
}

fn settings(dir: Option<&Path>, cache: &Path) -> LoraSettings {
    LoraSettings {
        dir: dir.map(Path::to_path_buf),
        cache_dir: cache.to_path_buf(),
        cache_max_bytes: 1 << 20,
        max_file_bytes: 4096,
        s3_allow: vec![S3Allow::parse("s3://loras/public/").unwrap()],
        s3: Default::default(),
        allow_http: false,
        allow_private_networks: false,
        hub_token: false,
        allow_hosts: vec![],
        timeout: Duration::from_secs(10),
    }
}

fn lora(source: LoraSource) -> Lora {
    Lora {
        uri: format!("{source:?}"),
        scale: 1.0,
        sha256: None,
        short_hash: None,
        source,
    }
}

fn local(path: &str) -> Lora {
    lora(LoraSource::Local(path.into()))
}

#[tokio::test]
async fn local_paths_never_leave_the_lora_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, cache) = (tmp.path().join("loras"), tmp.path().join("cache"));
    std::fs::create_dir_all(dir.join("styles")).unwrap();
    std::fs::write(dir.join("styles/ink.safetensors"), safetensors_bytes(4)).unwrap();
    std::fs::write(tmp.path().join("secret.safetensors"), safetensors_bytes(4)).unwrap();
    std::os::unix::fs::symlink(
        tmp.path().join("secret.safetensors"),
        dir.join("escape.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        dir.join("styles/ink.safetensors"),
        dir.join("alias.safetensors"),
    )
    .unwrap();
    let f = Fetcher::new(settings(Some(&dir), &cache)).unwrap();

    let ok = f.fetch(&local("styles/ink.safetensors")).await.unwrap();
    assert_eq!(
        ok.path,
        std::fs::canonicalize(dir.join("styles/ink.safetensors")).unwrap()
    );
    assert_eq!(ok.hashes.sha256.len(), 64);
    // A symlink that stays inside is followed.
    assert_eq!(
        f.fetch(&local("alias.safetensors")).await.unwrap().path,
        ok.path
    );
    for escape in [
        "../secret.safetensors",
        "styles/../../secret.safetensors",
        "/etc/passwd",
        "escape.safetensors",
    ] {
        let e = f.fetch(&local(escape)).await.unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{escape}: {e}");
        assert!(!e.is_retryable());
    }
    let missing = f.fetch(&local("nope.safetensors")).await.unwrap_err();
    assert!(matches!(missing, FetchError::NotFound(_)), "{missing}");
    // Without a LoRA folder, no local path at all.
    let none = Fetcher::new(settings(None, &cache)).unwrap();
    let e = none
        .fetch(&local("styles/ink.safetensors"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--lora-dir"), "{e}");
    // A file that is not safetensors is refused for good.
    std::fs::write(dir.join("pickle.safetensors"), b"\x80\x02}q\x00.").unwrap();
    let e = f.fetch(&local("pickle.safetensors")).await.unwrap_err();
    assert!(
        matches!(e, FetchError::Invalid(_)) && e.to_string().contains("not a safetensors"),
        "{e}"
    );
}

#[tokio::test]
async fn urls_are_judged_by_the_webhooks_ssrf_guard() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fetcher::new(settings(None, tmp.path())).unwrap();
    for bad in [
        "https://127.0.0.1/x.safetensors",
        "https://169.254.169.254/latest/meta-data/x.safetensors",
        "https://[::ffff:10.0.0.1]/x.safetensors",
        "https://localhost/x.safetensors",
        "https://2130706433/x.safetensors",
        "http://93.184.215.14/x.safetensors",
    ] {
        let e = f
            .fetch(&lora(LoraSource::Url(bad.into())))
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{bad}: {e}");
        assert!(!e.is_retryable(), "{bad}");
    }
}

#[tokio::test]
async fn s3_keys_must_be_under_an_allowed_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Fetcher::new(settings(None, tmp.path())).unwrap();
    for (bucket, key) in [
        ("loras", "private/x.safetensors"),
        ("images", "public/x.safetensors"),
    ] {
        let e = f
            .fetch(&lora(LoraSource::S3 {
                bucket: bucket.into(),
                key: key.into(),
            }))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--lora-s3-allow"), "{e}");
        assert!(!e.is_retryable());
    }
}

/// An HTTP server answering every request with `body` (one connection per request); counts them.
async fn serve(body: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    serve_raw([head.into_bytes(), body].concat()).await
}

/// An HTTP server answering every request with `response` as is.
async fn serve_raw(response: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn downloads_are_bounded_checked_and_served_from_the_cache_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let good = safetensors_bytes(16);
    let (ok_addr, ok_hits) = serve(good.clone()).await;
    let (junk_addr, _) = serve(b"<html>not a LoRA</html>".to_vec()).await;
    let (big_addr, _) = serve(safetensors_bytes(4096)).await;
    let mut s = settings(None, tmp.path());
    s.allow_http = true;
    s.allow_hosts = [ok_addr, junk_addr, big_addr]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let f = Fetcher::new(s).unwrap();
    let url = |a: SocketAddr, name: &str| lora(LoraSource::Url(format!("http://{a}/{name}")));

    let first = f.fetch(&url(ok_addr, "a.safetensors")).await.unwrap();
    assert_eq!(std::fs::read(&first.path).unwrap(), good);
    assert_eq!(
        first.hashes.sha256,
        hex::encode(sha2::Sha256::digest(&good))
    );
    let again = f.fetch(&url(ok_addr, "a.safetensors")).await.unwrap();
    assert_eq!(
        (again.path.clone(), again.hashes.clone()),
        (first.path.clone(), first.hashes.clone())
    );
    assert_eq!(
        ok_hits.load(Ordering::SeqCst),
        1,
        "the second fetch is served from the cache"
    );

    let junk = f.fetch(&url(junk_addr, "b.safetensors")).await.unwrap_err();
    assert!(
        matches!(junk, FetchError::Invalid(_)) && !junk.is_retryable(),
        "{junk}"
    );
    let big = f.fetch(&url(big_addr, "c.safetensors")).await.unwrap_err();
    assert!(big.to_string().contains("limit of 4096"), "{big}");
    assert!(!big.is_retryable());
    // Only the good file is left in the cache: no partial or refused downloads.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // A server that is down is worth a retry.
    drop(f);
    let mut s = settings(None, tmp.path());
    s.allow_http = true;
    s.allow_hosts = vec!["127.0.0.1:9".into()];
    let down = Fetcher::new(s).unwrap();
    let e = down
        .fetch(&lora(LoraSource::Url(
            "http://127.0.0.1:9/x.safetensors".into(),
        )))
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

#[tokio::test]
async fn a_redirect_to_an_address_the_guard_refuses_is_refused_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    let redirect =
        b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/x.safetensors\r\n\
                     content-length: 0\r\nconnection: close\r\n\r\n";
    let (addr, _) = serve_raw(redirect.to_vec()).await;
    let mut s = settings(None, tmp.path());
    s.allow_http = true;
    s.allow_hosts = vec![addr.to_string()];
    let f = Fetcher::new(s).unwrap();
    let e = f
        .fetch(&lora(LoraSource::Url(format!(
            "http://{addr}/x.safetensors"
        ))))
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Refused(_)), "{e}");
    assert!(e.to_string().contains("169.254.169.254"), "{e}");
}
