//! Parity with diffusers' `StableDiffusionPipeline` on tiny random-weight SD 1.5 and SD 2.1-v models,
//! and of the PNDM sampler on every family (`scripts/parity/make_sd_fixtures.py` built the fixtures
//! and references; same versions and bounds as `parity.rs`), and `t2i generate` on both SD fixtures.

use candle_core::DType;
use t2i_worker::pipeline::scheduler::{SchedulerConfig, SchedulerKind};
use t2i_worker::pipeline::{Family, Variant};

use crate::cli::{MockHub, latents_file, path_str, read_png, stderr, t2i, t2i_env};
use crate::parity::{check_cases, check_schedules};
use crate::support::{Reference, assert_close, load_pipeline, max_abs_diff, model_dir};

const MODULE_TOL: f64 = 1e-4;
/// The SD-family fixtures and the prefix of their scheduler references.
const SD_MODELS: [(&str, &str); 2] = [("sd15-tiny", "sd15"), ("sd21-v-tiny", "sd21-v")];

#[test]
fn sd_tokenizer_and_text_encoder_match_the_last_hidden_state() {
    for (name, _) in SD_MODELS {
        let r = Reference::load(name);
        let p = load_pipeline(name, DType::F32, Variant::Auto);
        let prompts: Vec<&str> = r.meta["token_prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let ids = r
            .get("tokens.ids1")
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let tokens = p.tokenize(prompt).unwrap();
            assert_eq!(tokens.len(), 1, "{name}: one tokenizer");
            assert_eq!(tokens[0].ids, ids[i], "{name}: prompt {prompt:?}");
        }
        assert!(p.tokenize(prompts[prompts.len() - 1]).unwrap()[0].truncated);
        let emb = p.encode_prompts(&prompts).unwrap();
        assert!(emb.pooled.is_none(), "{name}: SD has no pooled embedding");
        assert_close(
            &format!("{name} context"),
            &emb.context,
            r.get("text.hidden1"),
            MODULE_TOL,
        );
        // encode_prompt's negative branch: "" is encoded (StableDiffusionPipeline never zeroes).
        let neg = p.encode_prompts(&["blurry", ""]).unwrap();
        assert_close(
            &format!("{name} negative"),
            &neg.context,
            r.get("encode.negative_embeds"),
            MODULE_TOL,
        );
    }
}

#[test]
fn sd_time_embedding_unet_and_vae_match() {
    for (name, _) in SD_MODELS {
        let r = Reference::load(name);
        let p = load_pipeline(name, DType::F32, Variant::Auto);
        let unet = p.unet();
        let t: Vec<f64> = r
            .get("temb.t")
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let temb = unet.time_embedding(&t).unwrap();
        assert_close(
            &format!("{name} time embedding"),
            &temb,
            r.get("temb.out"),
            MODULE_TOL,
        );
        let sample = r.get("unet.sample");
        let cond = unet.conditioning(sample.dim(0).unwrap(), None).unwrap();
        let t = r.get("unet.timestep").to_vec1::<f32>().unwrap()[0] as f64;
        let out = unet
            .forward(sample, t, r.get("unet.encoder_hidden_states"), &cond)
            .unwrap();
        assert_close(&format!("{name} UNet"), &out, r.get("unet.out"), MODULE_TOL);
        // An SD UNet takes no text_time; asking for it is an error, not a silent mix-up.
        assert!(
            unet.conditioning(
                1,
                Some(t2i_worker::pipeline::unet::TextTimeInputs {
                    pooled: &temb,
                    time_ids: &[[64.0; 6]],
                })
            )
            .is_err()
        );
        let vae = p.vae_decoder().decode(r.get("vae.latents")).unwrap();
        assert_close(&format!("{name} VAE"), &vae, r.get("vae.out"), MODULE_TOL);
    }
}

#[test]
fn every_sampler_schedule_matches_on_the_sd_and_zero_snr_configs_and_pndm_on_sdxl() {
    let r = Reference::load("schedulers-sd");
    for (name, prefix) in SD_MODELS {
        let cfg = SchedulerConfig::load(&model_dir(name).join("scheduler/scheduler_config.json"))
            .unwrap();
        check_schedules(
            &r,
            &format!("{prefix}."),
            &cfg,
            SchedulerKind::ALL.into_iter(),
        );
    }
    let sdxl =
        SchedulerConfig::load(&model_dir("ssd-1b-tiny").join("scheduler/scheduler_config.json"))
            .unwrap();
    check_schedules(&r, "sdxl.", &sdxl, [SchedulerKind::Pndm].into_iter());
    // A zero-terminal-SNR config (rescaled betas, trailing spacing): the Euler family's and DPM++'s
    // sigmas show the rescaled ᾱ (and its 2⁻²⁴ end), PNDM ignores the key as diffusers does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, r.meta["configs"]["sd21-v-zero-snr"].to_string()).unwrap();
    let zero_snr = SchedulerConfig::load(&path).unwrap();
    check_schedules(
        &r,
        "sd21-v-zero-snr.",
        &zero_snr,
        SchedulerKind::ALL.into_iter(),
    );
}

#[test]
fn sd15_every_sampler_reproduces_diffusers_to_the_pixel() {
    check_cases("sd15-tiny", "sd15-tiny");
}

#[test]
fn sd21_v_prediction_every_sampler_reproduces_diffusers_to_the_pixel() {
    check_cases("sd21-v-tiny", "sd21-v-tiny");
}

#[test]
fn pndm_on_an_sdxl_family_model_reproduces_diffusers_to_the_pixel() {
    check_cases("ssd-1b-tiny", "ssd-1b-tiny-pndm");
}

#[test]
fn sd_defaults_come_from_the_model_files() {
    let sd15 = load_pipeline("sd15-tiny", DType::F32, Variant::Auto);
    assert_eq!(sd15.index().family, Family::Sd);
    assert!(sd15.index().has_safety_checker);
    let d = sd15.model_defaults();
    // unet sample_size 8 × VAE factor 8; PNDMScheduler shipped; StableDiffusionPipeline's 7.5.
    assert_eq!(
        (d.size, d.scheduler, d.guidance_scale),
        (64, SchedulerKind::Pndm, 7.5)
    );
    assert_eq!(d.unsupported_scheduler, None);
    let sd21 = load_pipeline("sd21-v-tiny", DType::F32, Variant::Auto);
    assert!(!sd21.index().has_safety_checker);
    let d = sd21.model_defaults();
    assert_eq!((d.size, d.scheduler), (128, SchedulerKind::Ddim));
    let ssd = load_pipeline("ssd-1b-tiny", DType::F32, Variant::Auto);
    assert_eq!(ssd.index().family, Family::Sdxl);
    assert_eq!(ssd.model_defaults().guidance_scale, 5.0);
}

/// A folder whose files disagree fails to load with the file and the key named.
#[test]
fn a_folder_the_pipeline_cannot_serve_names_the_file_and_the_key() {
    let copy = |edit: &dyn Fn(&std::path::Path)| {
        let dir = copy_of("sd15-tiny");
        edit(dir.path());
        dir
    };
    let load = |dir: &std::path::Path| {
        let opts = t2i_worker::pipeline::LoadOptions {
            device: candle_core::Device::Cpu,
            dtype: DType::F32,
            variant: Variant::Auto,
        };
        t2i_worker::pipeline::Pipeline::load(dir, &opts)
            .err()
            .expect("must not load")
            .to_string()
    };
    let rewrite = |path: std::path::PathBuf, from: &str, to: &str| {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{}: {from}", path.display());
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    // Called an SDXL pipeline: the second text encoder is missing.
    let dir = copy(&|d| {
        rewrite(
            d.join("model_index.json"),
            "\"StableDiffusionPipeline\"",
            "\"StableDiffusionXLPipeline\"",
        )
    });
    let err = load(dir.path());
    assert!(
        err.contains("model_index.json") && err.contains("text_encoder_2"),
        "{err}"
    );
    // A pipeline class we do not implement.
    let dir = copy(&|d| {
        rewrite(
            d.join("model_index.json"),
            "\"StableDiffusionPipeline\"",
            "\"StableDiffusionUpscalePipeline\"",
        )
    });
    let err = load(dir.path());
    assert!(
        err.contains("_class_name") && err.contains("StableDiffusionUpscalePipeline"),
        "{err}"
    );
    // A cross-attention width the text encoder does not give.
    let dir = copy(&|d| {
        rewrite(
            d.join("unet/config.json"),
            "\"cross_attention_dim\": 24",
            "\"cross_attention_dim\": 32",
        )
    });
    let err = load(dir.path());
    assert!(
        err.contains("unet/config.json") && err.contains("cross_attention_dim"),
        "{err}"
    );
}

/// An SD 1.5 repo id on a hub that also has the safety checker and feature extractor SD v1-5 ships:
/// only what the pipeline reads is downloaded (one text encoder and tokenizer, no safety checker),
/// and the cached snapshot then renders offline.
#[test]
fn an_sd15_repo_downloads_one_text_encoder_and_never_the_safety_checker() {
    let repo = copy_of("sd15-tiny");
    for (file, bytes) in [
        ("safety_checker/config.json", &b"{}"[..]),
        ("safety_checker/model.safetensors", &b"not read"[..]),
        ("feature_extractor/preprocessor_config.json", &b"{}"[..]),
    ] {
        let path = repo.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let hub = MockHub::serve(repo.path().to_path_buf(), commit);
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
    let requests = hub.requests.lock().unwrap().clone();
    for absent in [
        "safety_checker",
        "feature_extractor",
        "text_encoder_2",
        "tokenizer_2",
    ] {
        assert!(
            !requests.iter().any(|r| r.contains(absent)),
            "{absent} was requested: {requests:?}"
        );
    }
    assert!(
        requests
            .iter()
            .any(|r| r.contains("text_encoder/model.safetensors"))
    );
    let o = t2i_env(
        &args,
        &[("HF_HOME", path_str(home.path())), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "offline: {}", stderr(&o));
}

/// A scratch copy of a fixture model folder.
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = model_dir(name);
    for entry in walk(&src) {
        let dst = dir.path().join(entry.strip_prefix(&src).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dst).unwrap();
    }
    dir
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// SD 1.5 and SD 2.1-v through the binary: the model's own defaults (size, sampler, guidance) with
/// only the prompt, steps, seed and latents given reproduce diffusers' `StableDiffusionPipeline`
/// image, and the A1111 text names PNDM by A1111's name.
#[test]
fn generate_reproduces_diffusers_on_the_sd_fixtures_with_the_models_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    // (model, reference case whose settings are the model's defaults, A1111 sampler, size)
    for (name, case, sampler, size) in [
        ("sd15-tiny", "pndm", "PLMS", 64),
        ("sd21-v-tiny", "ddim", "DDIM", 128),
    ] {
        let r = Reference::load(name);
        let latents = latents_file(tmp.path(), &r, case);
        let out = tmp.path().join(format!("{name}.png"));
        let o = t2i(&[
            "generate",
            "--model",
            path_str(&model_dir(name)),
            "--prompt",
            "a photo of a cat",
            "--steps",
            "4",
            "--seed",
            "0",
            "--latents",
            path_str(&latents),
            "--output",
            path_str(&out),
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let (pixels, texts) = read_png(&out);
        let want = r.get(&format!("{case}.image"));
        let diff = max_abs_diff(
            &pixels.to_dtype(DType::F32).unwrap(),
            &want.to_dtype(DType::F32).unwrap(),
        );
        assert!(
            diff <= 1.0,
            "{name}: CLI image differs from diffusers by {diff}/255"
        );
        let params = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
        let expected = format!(
            "Steps: 4, Sampler: {sampler}, CFG scale: 7.5, Seed: 0, Size: {size}x{size}, Model: {name}"
        );
        assert!(params.contains(&expected), "{params}");
    }
}
