//! `t2i generate` through the real binary: reproduction of diffusers' images from the reference
//! latents, output formats and metadata, the hub-cache resolution, and exit code 2 with one clear line
//! for every kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

use crate::support::{Reference, fixtures, max_abs_diff, model_dir};

pub(crate) fn t2i(args: &[&str]) -> Output {
    t2i_env(args, &[])
}

pub(crate) fn t2i_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_t2i"));
    cmd.args(args)
        .env_remove("T2I_MODEL")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running t2i")
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Saves a reference latents tensor as `--latents` expects it.
pub(crate) fn latents_file(dir: &Path, r: &Reference, case: &str) -> PathBuf {
    let path = dir.join(format!("{case}.safetensors"));
    let t = r.get(&format!("{case}.latents")).clone();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), t)]),
        &path,
    )
    .unwrap();
    path
}

pub(crate) fn read_png(path: &Path) -> (Tensor, Vec<(String, String)>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    let info = reader.info();
    let mut texts: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    texts.extend(
        info.utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap())),
    );
    let t = Tensor::from_vec(
        buf[..frame.buffer_size()].to_vec(),
        (1, frame.height as usize, frame.width as usize, 3),
        &Device::Cpu,
    )
    .unwrap();
    (t, texts)
}

#[test]
fn generate_with_reference_latents_reproduces_the_diffusers_image_for_each_deterministic_sampler() {
    let r = Reference::load("ssd-1b-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("ssd-1b-tiny");
    for scheduler in ["euler", "ddim", "dpmpp_2m", "dpmpp_2m_karras"] {
        let latents = latents_file(tmp.path(), &r, scheduler);
        let out = tmp.path().join(format!("{scheduler}.png"));
        let o = t2i(&[
            "generate",
            "--model",
            path_str(&model),
            "--prompt",
            "a photo of a cat",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "4",
            "--guidance-scale",
            "5",
            "--scheduler",
            scheduler,
            "--seed",
            "0",
            "--latents",
            path_str(&latents),
            "--output",
            path_str(&out),
        ]);
        assert!(o.status.success(), "{scheduler}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("timings:"),
            "no per-phase timings: {}",
            stderr(&o)
        );
        let (pixels, texts) = read_png(&out);
        let want = r.get(&format!("{scheduler}.image"));
        let diff = max_abs_diff(
            &pixels.to_dtype(DType::F32).unwrap(),
            &want.to_dtype(DType::F32).unwrap(),
        );
        assert!(
            diff <= 1.0,
            "{scheduler}: CLI image differs from diffusers by {diff}/255"
        );
        let params = &texts
            .iter()
            .find(|(k, _)| k == "parameters")
            .expect("parameters chunk")
            .1;
        assert!(
            params.starts_with("a photo of a cat\nSteps: 4, Sampler: "),
            "{params}"
        );
        assert!(
            params.contains("CFG scale: 5, Seed: 0, Size: 64x64, Model: ssd-1b-tiny"),
            "{params}"
        );
        let job = &texts.iter().find(|(k, _)| k == "t2i").expect("t2i chunk").1;
        let job: serde_json::Value = serde_json::from_str(job).unwrap();
        assert_eq!(job["scheduler"], scheduler);
    }
}

#[test]
fn several_prompts_fill_a_folder_in_each_format() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "# comment\na wolf\n\nthe sea\n").unwrap();
    for format in ["jpeg", "webp", "png"] {
        let out = tmp.path().join(format);
        let o = t2i(&[
            "generate",
            "--model",
            path_str(&model_dir("vega-tiny")),
            "--prompts-file",
            path_str(&prompts),
            "--prompt",
            "a cat",
            "--num-images",
            "2",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--format",
            format,
            "--output",
            path_str(&out),
            "--quiet",
        ]);
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        let files: Vec<PathBuf> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(PathBuf::from)
            .collect();
        assert_eq!(files.len(), 6, "3 prompts × 2 images");
        for f in &files {
            let img = image::open(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert_eq!(
                (img.width(), img.height()),
                (64, 64),
                "the model's default size"
            );
        }
        assert!(
            stderr(&o).contains("seed:"),
            "a random seed must be reported"
        );
    }
}

#[test]
fn bad_arguments_exit_2_with_one_clear_line_and_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("ssd-1b-tiny");
    let m = path_str(&model);
    // A model folder whose UNet weights are missing.
    let broken = tmp.path().join("broken");
    copy_dir(&model, &broken);
    for f in std::fs::read_dir(broken.join("unet")).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(f).unwrap();
        }
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--width", "1004"], "multiple of 8"),
        (vec!["--steps", "0"], "steps"),
        (vec!["--guidance-scale", "NaN"], "guidance_scale"),
        (vec!["--scheduler", "heun"], "scheduler"),
        (vec!["--num-images", "9"], "num_images"),
        (
            vec!["--model", "/nonexistent/model"],
            "neither a local folder",
        ),
        (
            vec!["--model", path_str(&broken)],
            "diffusion_pytorch_model",
        ),
        (vec!["--device", "tpu"], "unknown device"),
        (
            vec!["--output", "one.png", "--num-images", "2"],
            "names one file",
        ),
        (vec!["--latents", "/nonexistent.safetensors"], "--latents"),
        (vec!["--width", "abc"], "invalid value"),
        (vec!["--no-such-flag"], "unexpected argument"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--prompt", "a cat"];
        if !extra.contains(&"--model") {
            args.extend(["--model", m]);
        }
        if !extra.contains(&"--steps") {
            args.extend(["--steps", "1"]);
        }
        args.extend(extra.iter().copied());
        let o = t2i(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(needle),
            "{extra:?}: expected `{needle}` in {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{extra:?}: {err}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{extra:?}: more than one line: {err}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn repo_ids_resolve_through_the_hub_cache_offline_with_revision_pinning() {
    // The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--segmind--tiny-ssd");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &model_dir("ssd-1b-tiny"),
        &repo.join("snapshots").join(commit),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let out = home.path().join("out.png");
    let env = [("HF_HOME", path_str(home.path())), ("HF_HUB_OFFLINE", "1")];
    let base = [
        "generate",
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--output",
        path_str(&out),
    ];

    let mut args = base.to_vec();
    args.extend(["--model", "segmind/tiny-ssd"]);
    let o = t2i_env(&args, &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());

    let mut args = base.to_vec();
    args.extend(["--model", "segmind/tiny-ssd", "--revision", commit]);
    assert!(t2i_env(&args, &env).status.success(), "pinned commit");

    let mut args = base.to_vec();
    args.extend(["--model", "segmind/tiny-ssd", "--revision", "v2"]);
    let o = t2i_env(&args, &env);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("HF_HUB_OFFLINE"), "{}", stderr(&o));

    let mut args = base.to_vec();
    args.extend(["--model", "segmind/not-there"]);
    let o = t2i_env(&args, &env);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not in the Hugging Face cache"),
        "{}",
        stderr(&o)
    );
    let _ = fixtures();
}

/// A minimal stand-in for the Hugging Face hub's HTTP API, enough for hf-hub's sync client: repo info
/// (`/api/models/{repo}/revision/{rev}`) and ranged file downloads (`/{repo}/resolve/{rev}/{file}`)
/// with `ETag`, `X-Repo-Commit` and `Content-Range`. Serves one local folder as repo `test/tiny`.
pub(crate) struct MockHub {
    pub addr: String,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Each request's `Authorization` header, in the order of `requests`.
    pub authorizations: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl MockHub {
    pub(crate) fn serve(root: PathBuf, commit: &'static str) -> Self {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let authorizations = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, auth_log) = (requests.clone(), authorizations.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let (mut range, mut auth) = (None, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim().to_string());
                    }
                    if line.to_ascii_lowercase().starts_with("authorization:") {
                        auth = Some(line["authorization:".len()..].trim().to_string());
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                log.lock().unwrap().push(path.clone());
                auth_log.lock().unwrap().push(auth);
                let (status, headers, body) = respond(&root, commit, &path, range.as_deref());
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        Self {
            addr,
            requests,
            authorizations,
        }
    }
}

fn respond(
    root: &Path,
    commit: &str,
    path: &str,
    range: Option<&str>,
) -> (String, Vec<(String, String)>, Vec<u8>) {
    let not_found = || ("404 Not Found".to_string(), vec![], b"not found".to_vec());
    if path == "/api/models/test/tiny/revision/main" {
        let mut files = Vec::new();
        list_files(root, root, &mut files);
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|f| serde_json::json!({"rfilename": f}))
            .collect();
        let body = serde_json::json!({"sha": commit, "siblings": siblings})
            .to_string()
            .into_bytes();
        return (
            "200 OK".into(),
            vec![("Content-Type".into(), "application/json".into())],
            body,
        );
    }
    let Some(file) = path.strip_prefix("/test/tiny/resolve/main/") else {
        return not_found();
    };
    let Ok(data) = std::fs::read(root.join(file)) else {
        return not_found();
    };
    let start: usize = range
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range
        .and_then(|r| r.split('-').nth(1))
        .filter(|s| !s.is_empty())
    {
        Some(e) => e.parse::<usize>().unwrap().min(data.len() - 1),
        None => data.len() - 1,
    };
    let etag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (file, data.len()).hash(&mut h);
        format!("\"{:016x}\"", h.finish())
    };
    let headers = vec![
        ("ETag".to_string(), etag),
        ("X-Repo-Commit".to_string(), commit.to_string()),
        (
            "Content-Range".to_string(),
            format!("bytes {start}-{end}/{}", data.len()),
        ),
    ];
    (
        "206 Partial Content".into(),
        headers,
        data[start..=end].to_vec(),
    )
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            list_files(root, &p, out);
        } else {
            out.push(
                p.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
}

#[test]
fn repo_ids_download_only_the_needed_files_from_the_hub_then_work_offline() {
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let hub = MockHub::serve(model_dir("ssd-1b-tiny"), commit);
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out.png");
    let args = [
        "generate",
        "--model",
        "test/tiny",
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--quiet",
        "--output",
        path_str(&out),
    ];
    let o = t2i_env(
        &args,
        &[
            ("HF_HOME", path_str(home.path())),
            ("HF_ENDPOINT", &hub.addr),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let snapshot = home
        .path()
        .join("hub/models--test--tiny/snapshots")
        .join(commit);
    assert!(
        snapshot
            .join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
    assert!(
        !snapshot
            .join("unet/diffusion_pytorch_model.fp16.safetensors")
            .exists(),
        "f32 run must not download the fp16 variant"
    );
    let served = hub.requests.lock().unwrap().len();
    assert!(served > 0);

    // Everything is cached now: offline works and the hub is not asked again.
    let o = t2i_env(
        &args,
        &[("HF_HOME", path_str(home.path())), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t2i_env(
        &args,
        &[
            ("HF_HOME", path_str(home.path())),
            ("HF_ENDPOINT", &hub.addr),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        hub.requests.lock().unwrap().len(),
        served,
        "a complete cached snapshot needs no requests"
    );
}

/// `t2i bench --profile`: every op category of every phase, per UNet step for the denoise phase;
/// the ops the tiny UNet runs are all counted, and the shares of a phase never exceed its time.
#[test]
fn bench_profile_times_every_op_per_phase() {
    let model = model_dir("ssd-1b-tiny");
    let out = t2i(&[
        "bench",
        "--model",
        path_str(&model),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--json",
        "--profile",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let profile = row["profile"].as_array().expect("a profile");
    assert_eq!(
        profile.len(),
        3 * 7,
        "6 ops and `other` in 3 phases: {profile:?}"
    );
    let get = |phase: &str, op: &str| {
        profile
            .iter()
            .find(|r| r["phase"] == phase && r["op"] == op)
            .unwrap_or_else(|| panic!("{phase}/{op} in {profile:?}"))
    };
    for op in [
        "conv2d",
        "linear",
        "group_norm",
        "geglu",
        "attention",
        "add",
    ] {
        let r = get("denoise", op);
        assert!(
            r["ms"].as_f64().unwrap() > 0.0 && r["calls"].as_f64().unwrap() >= 1.0,
            "{r}"
        );
    }
    assert!(get("vae_decode", "conv2d")["calls"].as_f64().unwrap() >= 1.0);
    assert!(get("text_encode", "attention")["calls"].as_f64().unwrap() >= 1.0);
    for phase in ["text_encode", "denoise", "vae_decode"] {
        let percent: f64 = profile
            .iter()
            .filter(|r| r["phase"] == phase)
            .map(|r| r["percent"].as_f64().unwrap())
            .sum();
        assert!(percent <= 100.5, "{phase}: {percent}%");
    }
}

/// `--cuda-kernels` names switches this binary has; anything else is a usage error that says what
/// is accepted, before any model loads. `--check-ops` needs a CUDA device.
#[test]
fn cuda_kernel_switches_and_the_op_check_refuse_what_cannot_run() {
    let model = model_dir("ssd-1b-tiny");
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--model", path_str(&model), "--steps", "1"];
        args.extend_from_slice(extra);
        t2i(&args)
    };
    let out = bench(&["--cuda-kernels", "groupnorm,flash"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown kernel `flash`"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("groupnorm, geglu, bias, residual, conv, attn"));

    let out = bench(&["--check-ops"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--device cuda"), "{}", stderr(&out));

    if !cfg!(feature = "cuda") {
        let out = bench(&["--cuda-kernels", "geglu"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("`cuda` cargo feature"),
            "{}",
            stderr(&out)
        );
    }
    // Off by name: the same render as without the flag.
    let out = bench(&[
        "--cuda-kernels",
        "none",
        "--width",
        "64",
        "--height",
        "64",
        "--warmup",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The benchmark in smoke mode (tiny model, 64², 2 steps, batch 1 and 2, CFG): every figure is printed
/// and consistent. Speed is measured by `t2i bench` on real models, never asserted here.
#[test]
fn bench_smoke_prints_every_figure_per_batch_size() {
    let model = model_dir("ssd-1b-tiny");
    let out = t2i(&[
        "bench",
        "--model",
        path_str(&model),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--batch-sizes",
        "1,2",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, batch) in rows.iter().zip([1, 2]) {
        assert_eq!(row["batch"], batch);
        assert_eq!(row["cfg"], true);
        assert_eq!(row["implementation"], "t2i");
        for key in [
            "load_s",
            "text_encode_s",
            "step_s",
            "vae_decode_s",
            "total_s",
            "s_per_image",
            "images_per_s",
            "unet_tflops",
            "peak_rss_gib",
        ] {
            let v = row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} in {row}"));
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        let total = row["total_s"].as_f64().unwrap();
        let per_image = row["s_per_image"].as_f64().unwrap();
        assert!(
            (per_image * batch as f64 - total).abs() <= 1e-6 * total.max(1.0),
            "{row}"
        );
        let ips = row["images_per_s"].as_f64().unwrap();
        assert!((ips * per_image - 1.0).abs() < 1e-6, "{row}");
    }
}

/// `t2i healthcheck` (the containers' HEALTHCHECK) exits 0 on 200 and non-zero otherwise.
#[test]
fn healthcheck_follows_the_status_code() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for (i, conn) in listener.incoming().take(2).enumerate() {
            let mut conn = conn.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "connection closed mid-request");
                request.extend_from_slice(&buf[..n]);
            }
            let request = String::from_utf8_lossy(&request).into_owned();
            let status = if i == 0 {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").unwrap();
            assert!(request.starts_with("GET /healthz HTTP/1.0"), "{request}");
        }
    });
    let url = format!("http://{addr}/healthz");
    assert!(t2i(&["healthcheck", &url]).status.success());
    let down = t2i(&["healthcheck", &url]);
    assert!(!down.status.success());
    assert!(stderr(&down).contains("503"), "{}", stderr(&down));
    server.join().unwrap();
    let refused = t2i(&["healthcheck", &url]);
    assert!(!refused.status.success());
}
