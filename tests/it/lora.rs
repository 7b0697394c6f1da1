//! LoRA adapters in the pipeline, against diffusers 0.42.1 + peft 0.22.0 on the tiny fixtures
//! (`scripts/parity/make_lora_fixtures.py`: `load_lora_weights` + `fuse_lora`, see
//! `tests/fixtures/reference/lora.json`): for every format (diffusers/PEFT with adapter metadata, the
//! older diffusers spelling, kohya, kohya with SGM block names) and a stack of two, the fused weights
//! of a few layers, the latents after every step (1e-4, as `parity.rs`) and the image (1/255).
//! Then the variant cache (a second batch does not merge again; a new set merges without reading the
//! model's files; the base model is never changed), batches that render each image as alone, and
//! adapters that do not fit the model failing with the tensor named.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, IndexOp, Tensor};
use t2i_worker::pipeline::denoise::RecordedNoise;
use t2i_worker::pipeline::lora::{Adapted, AdapterFile, Component};
use t2i_worker::pipeline::scheduler::SchedulerKind;
use t2i_worker::pipeline::{ImageSpec, Pipeline, PipelineError, RenderBatch, Variant};

use crate::parity::{image_tensor, max_pixel_diff};
use crate::support::{Reference, assert_close, fixtures, load_pipeline, max_abs_diff, model_dir};

const MODULE_TOL: f64 = 1e-4;

fn lora_file(name: &str) -> PathBuf {
    fixtures().join("loras").join(name)
}

fn adapter(name: &str, scale: f64) -> AdapterFile {
    AdapterFile::local(lora_file(name), scale).unwrap()
}

/// A merged weight by the name diffusers gave it (text encoders with or without `text_model.`).
fn merged<'a>(v: &'a Adapted, component: &str, name: &str) -> &'a Tensor {
    let c = Component::parse(component).unwrap();
    v.merged_weight(c, name)
        .or_else(|| match name.strip_prefix("text_model.") {
            Some(inner) => v.merged_weight(c, inner),
            None => v.merged_weight(c, &format!("text_model.{name}")),
        })
        .unwrap_or_else(|| panic!("{component} {name} not merged"))
}

/// A reference case's batch, with its latents and adapters.
fn case_batch(r: &Reference, case: &serde_json::Value, loras: Vec<AdapterFile>) -> RenderBatch {
    let name = case["name"].as_str().unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    let negatives = case["negative_prompts"].as_array().unwrap();
    RenderBatch {
        images: case["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(negatives)
            .enumerate()
            .map(|(i, (p, n))| ImageSpec {
                prompt: text(p),
                negative_prompt: Some(text(n)),
                seed: i as u64,
            })
            .collect(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        scheduler: SchedulerKind::parse(case["scheduler"].as_str().unwrap()).unwrap(),
        long_prompt: Default::default(),
        prompt_weighting: Default::default(),
        latents: Some(r.get(&format!("{name}.latents")).clone()),
        loras,
    }
}

/// The latents after every step and the images of a render.
fn render_steps(p: &Pipeline, batch: &RenderBatch) -> (Vec<Tensor>, Vec<image::RgbImage>) {
    let mut steps = Vec::new();
    let mut noise = RecordedNoise {
        draws: VecDeque::new(),
    };
    let rendered = p
        .render_with_noise(batch, &mut noise, &mut |s| {
            steps.push(s.latents.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
    (steps, rendered.images)
}

#[test]
fn every_lora_format_merges_and_renders_as_diffusers_fuse_lora_does() {
    let r = Reference::load("lora");
    let cases = r.meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let p = load_pipeline(case["model"].as_str().unwrap(), DType::F32, Variant::Auto);
        let loras: Vec<AdapterFile> = case["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| adapter(l[0].as_str().unwrap(), l[1].as_f64().unwrap()))
            .collect();
        let variant = p.adapted(&loras).unwrap().expect("adapters given");
        for f in case["fused"].as_array().unwrap() {
            let (c, w) = (f[0].as_str().unwrap(), f[1].as_str().unwrap());
            let want = r.get(&format!("{name}.fused.{c}.{w}"));
            assert_close(
                &format!("{name}: fused {c} {w}"),
                merged(&variant, c, w),
                want,
                MODULE_TOL,
            );
        }
        let batch = case_batch(&r, case, loras);
        let (steps, images) = render_steps(&p, &batch);
        let want_steps = r.get(&format!("{name}.steps"));
        assert_eq!(steps.len(), want_steps.dim(0).unwrap(), "{name}");
        for (i, got) in steps.iter().enumerate() {
            let what = format!("{name}: latents after step {}", i + 1);
            assert_close(&what, got, &want_steps.i(i).unwrap(), MODULE_TOL);
        }
        let want_image = r.get(&format!("{name}.image"));
        let diff = max_pixel_diff(&images, want_image);
        let last = max_abs_diff(
            steps.last().unwrap(),
            &want_steps.i(steps.len() - 1).unwrap(),
        );
        println!("{name}: last latents max |diff| {last:.2e}, image max |diff| {diff}/255");
        assert!(diff <= 1.0, "{name}: image differs by {diff}/255");
        // The adapters matter: without them the same render is another image.
        let (_, plain) = render_steps(&p, &case_batch(&r, case, Vec::new()));
        assert!(
            max_pixel_diff(&plain, want_image) > 8.0,
            "{name}: the LoRA changed nothing"
        );
    }
}

/// A copy of a fixture model whose weight files can be deleted once it is loaded.
fn disposable_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    copy_dir(&model_dir(name), &dst);
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

fn small_batch(prompts: &[&str], loras: Vec<AdapterFile>) -> RenderBatch {
    RenderBatch {
        images: prompts
            .iter()
            .enumerate()
            .map(|(i, p)| ImageSpec {
                prompt: p.to_string(),
                negative_prompt: None,
                seed: 40 + i as u64,
            })
            .collect(),
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 5.0,
        scheduler: SchedulerKind::Euler,
        long_prompt: Default::default(),
        prompt_weighting: Default::default(),
        latents: None,
        loras,
    }
}

fn render(p: &Pipeline, batch: &RenderBatch) -> Vec<image::RgbImage> {
    p.render(batch, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .images
}

#[test]
fn variants_are_cached_built_without_reading_the_model_again_and_leave_the_base_untouched() {
    let (_tmp, dir) = disposable_model("ssd-1b-tiny");
    let p = Pipeline::load(
        &dir,
        &t2i_worker::pipeline::LoadOptions {
            device: candle_core::Device::Cpu,
            dtype: DType::F32,
            variant: Variant::Auto,
        },
    )
    .unwrap();
    let plain = small_batch(&["a photo of a cat"], Vec::new());
    let base_before = render(&p, &plain);
    // From here on the model's files are gone: anything that read them would fail.
    for component in ["unet", "text_encoder", "text_encoder_2", "vae"] {
        std::fs::remove_dir_all(dir.join(component)).unwrap();
    }
    let peft = small_batch(
        &["a photo of a cat"],
        vec![adapter("ssd1b-peft.safetensors", 0.8)],
    );
    let first = render(&p, &peft);
    assert_eq!(p.lora_merges(), 1);
    assert_eq!(
        render(&p, &peft),
        first,
        "the cached variant renders the same"
    );
    assert_eq!(
        p.lora_merges(),
        1,
        "a second batch with the same adapters does not merge again"
    );
    let kohya = small_batch(
        &["a photo of a cat"],
        vec![adapter("ssd1b-kohya.safetensors", -0.7)],
    );
    let other = render(&p, &kohya);
    assert_eq!(p.lora_merges(), 2, "another set merges once");
    assert_ne!(other, first);
    // The scale is part of a variant's identity.
    render(
        &p,
        &small_batch(
            &["a photo of a cat"],
            vec![adapter("ssd1b-peft.safetensors", 0.5)],
        ),
    );
    assert_eq!(p.lora_merges(), 3);
    // The base model was never changed.
    assert_eq!(render(&p, &plain), base_before);
    assert_ne!(first, base_before);
    // A budget too small for two keeps only the last variant used: the first merges again.
    p.set_lora_memory_budget(1);
    render(&p, &kohya);
    render(&p, &peft);
    assert_eq!(p.lora_merges(), 5);
    render(&p, &peft);
    assert_eq!(p.lora_merges(), 5);
}

#[test]
fn a_batch_with_adapters_renders_each_image_as_it_would_alone() {
    let p = load_pipeline("ssd-1b-tiny", DType::F32, Variant::Auto);
    let stack = vec![
        adapter("ssd1b-peft.safetensors", 0.6),
        adapter("ssd1b-kohya.safetensors", -0.4),
    ];
    let prompts = ["a photo of a cat", "a wolf, dark fantasy", "the sea"];
    let together = render(&p, &small_batch(&prompts, stack.clone()));
    for (i, prompt) in prompts.iter().enumerate() {
        let mut one = small_batch(&[prompt], stack.clone());
        one.images[0].seed = 40 + i as u64;
        let alone = render(&p, &one);
        let a = image_tensor(&together[i..i + 1])
            .to_dtype(DType::F32)
            .unwrap();
        let b = image_tensor(&alone).to_dtype(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "image {i} differs when batched");
    }
}

#[test]
fn adapters_that_do_not_fit_the_model_fail_naming_the_tensor() {
    // sd15-tiny has one text encoder and other widths: an SDXL adapter does not fit it.
    let p = load_pipeline("sd15-tiny", DType::F32, Variant::Auto);
    for file in ["ssd1b-peft.safetensors", "ssd1b-kohya.safetensors"] {
        let err = p
            .adapted(&[adapter(file, 1.0)])
            .err()
            .expect("an SDXL LoRA on SD 1.5");
        let msg = err.to_string();
        assert!(matches!(err, PipelineError::Lora(_)), "{msg}");
        assert!(msg.contains("tensor `"), "{file}: {msg}");
    }
    // The model still renders without adapters, and nothing was cached.
    assert_eq!(p.lora_merges(), 0);
    let ssd = load_pipeline("ssd-1b-tiny", DType::F32, Variant::Auto);
    // The SGM-named file is for sdxl-tiny, whose mid block has attention; SSD-1B's has none.
    let err = ssd
        .adapted(&[adapter("sdxl-kohya-sgm.safetensors", 1.0)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lora_unet_middle_block_1"), "{err}");
    assert!(err.contains("mid_block_attentions_0"), "{err}");
    // A file changed after it was fetched (its hash no longer matches) is refused.
    let mut stale = adapter("ssd1b-peft.safetensors", 1.0);
    stale.sha256 = "0".repeat(64);
    let err = ssd.adapted(&[stale]).err().unwrap().to_string();
    assert!(err.contains("changed since it was fetched"), "{err}");
}

#[test]
fn generate_renders_with_lora_flags_and_records_them_in_the_png() {
    use crate::cli::{path_str, stderr, t2i};
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("x.png"), tmp.path().join("cache"));
    let model = model_dir("ssd-1b-tiny");
    let loras = fixtures().join("loras");
    let common = [
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
        "2",
        "--seed",
        "3",
        "--quiet",
        "--lora-cache-dir",
        path_str(&cache),
    ];
    let run = |extra: &[&str]| t2i(&[&common[..], extra].concat());
    let ok = run(&[
        "--lora-dir",
        path_str(&loras),
        "--lora",
        "ssd1b-kohya.safetensors:-0.7",
        "--output",
        path_str(&out),
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let png = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&png);
    let file = std::fs::read(lora_file("ssd1b-kohya.safetensors")).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    use sha2::Digest;
    let hash = &hex::encode(sha2::Sha256::digest(&file[8 + n..]))[..12];
    assert!(
        text.contains("a photo of a cat <lora:ssd1b-kohya:-0.7>"),
        "{text}"
    );
    assert!(
        text.contains(&format!("Lora hashes: \"ssd1b-kohya: {hash}\"")),
        "{text}"
    );
    // The image is the one the pipeline renders with that adapter.
    let p = load_pipeline("ssd-1b-tiny", DType::F32, Variant::Auto);
    let req = t2i_worker::job::GenerationRequest {
        prompt: "a photo of a cat".into(),
        width: Some(64),
        height: Some(64),
        steps: Some(2),
        seed: Some(3),
        ..Default::default()
    };
    let g =
        t2i_worker::job::Generation::parse(req, &Default::default(), &p.model_defaults()).unwrap();
    let batch = RenderBatch::new(&g, ImageSpec::all_of(&g))
        .with_loras(vec![adapter("ssd1b-kohya.safetensors", -0.7)]);
    let want = render(&p, &batch);
    assert!(image::load_from_memory(&png).unwrap().to_rgb8() == want[0]);

    // Outside the LoRA folder, or without one: a usage error (exit 2) naming the flag.
    let escape = run(&[
        "--lora-dir",
        path_str(&loras),
        "--lora",
        "../models/x.safetensors",
    ]);
    assert_eq!(escape.status.code(), Some(2), "{}", stderr(&escape));
    assert!(
        stderr(&escape).contains("loras[0].uri"),
        "{}",
        stderr(&escape)
    );
    let no_dir = run(&["--lora", "ssd1b-kohya.safetensors"]);
    assert_eq!(no_dir.status.code(), Some(2), "{}", stderr(&no_dir));
    assert!(
        stderr(&no_dir).contains("--lora-dir"),
        "{}",
        stderr(&no_dir)
    );
}

/// `hf://` adapters are downloaded from `HF_ENDPOINT` into the LoRA cache, without the operator's
/// token unless `--lora-hub-token` lends it (the token that fetches the model would otherwise open
/// its private repos to every job).
#[test]
fn hub_loras_are_downloaded_anonymously_unless_the_token_is_lent() {
    use crate::cli::{MockHub, path_str, stderr, t2i_env};
    let hub = MockHub::serve(
        fixtures().join("loras"),
        "fedcba9876543210fedcba9876543210fedcba98",
    );
    let model = model_dir("ssd-1b-tiny");
    let file = "/test/tiny/resolve/main/ssd1b-peft.safetensors";
    for (lend, expected) in [(false, None), (true, Some("Bearer hf_operator_secret"))] {
        let tmp = tempfile::tempdir().unwrap();
        let (home, cache, out) = (
            tmp.path().join("hf"),
            tmp.path().join("loras"),
            tmp.path().join("x.png"),
        );
        let mut args = vec![
            "generate",
            "--model",
            path_str(&model),
            "--prompt",
            "a cat",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--quiet",
            "--lora",
            "hf://test/tiny/ssd1b-peft.safetensors:0.5",
            "--lora-cache-dir",
            path_str(&cache),
            "--output",
            path_str(&out),
        ];
        if lend {
            args.push("--lora-hub-token");
        }
        let before = hub.requests.lock().unwrap().len();
        let o = t2i_env(
            &args,
            &[
                ("HF_HOME", path_str(&home)),
                ("HF_ENDPOINT", &hub.addr),
                ("HF_TOKEN", "hf_operator_secret"),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let requests = hub.requests.lock().unwrap()[before..].to_vec();
        let auths = hub.authorizations.lock().unwrap()[before..].to_vec();
        assert_eq!(requests, [file], "lend {lend}");
        assert_eq!(auths[0].as_deref(), expected, "lend {lend}");
        assert!(
            String::from_utf8_lossy(&std::fs::read(&out).unwrap())
                .contains("<lora:ssd1b-peft:0.5>")
        );
    }
}
