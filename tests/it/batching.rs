//! The batching promise on CPU: `--batch-size` changes speed and memory, never pixels. Every stage
//! (text encoders, conditioning, UNet, VAE) must compute an image's tensors to the last bit as it
//! computes them alone, and so must a whole render.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use t2i_worker::pipeline::scheduler::SchedulerKind;
use t2i_worker::pipeline::unet::TextTimeInputs;
use t2i_worker::pipeline::{ImageSpec, RenderBatch, Variant};

use crate::support::{MODELS, load_pipeline, max_abs_diff};

const PROMPTS: [&str; 2] = ["a red fox", "a dark wolf"];

fn exact(what: &str, batched: &Tensor, i: usize, alone: &Tensor) {
    let diff = max_abs_diff(&batched.narrow(0, i, 1).unwrap(), alone);
    assert_eq!(
        diff, 0.0,
        "{what}: entry {i} differs by {diff} when batched"
    );
}

#[test]
fn every_stage_computes_an_entry_as_it_would_alone() {
    for name in MODELS {
        let p = load_pipeline(name, DType::F32, Variant::Auto);
        let both = p.encode_prompts(&PROMPTS).unwrap();
        // SDXL's micro-conditioning of a 64² render: original size, crop, target size.
        let ids = [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]; 2];
        let text_time = |pooled: &Option<Tensor>, ids: &[[f64; 6]]| {
            let pooled = pooled.as_ref().expect("SDXL pools").clone();
            p.unet()
                .conditioning(
                    ids.len(),
                    Some(TextTimeInputs {
                        pooled: &pooled,
                        time_ids: ids,
                    }),
                )
                .unwrap()
        };
        let cond = text_time(&both.pooled, &ids);
        let (b, c, h, w) = (2, 4, 8, 8);
        let data: Vec<f32> = (0..b * c * h * w)
            .map(|i| (i as f32 * 0.7123).sin() * 1.3)
            .collect();
        let sample = Tensor::from_vec(data, (b, c, h, w), &Device::Cpu).unwrap();
        let t = 499.0;
        let out = p.unet().forward(&sample, t, &both.context, &cond).unwrap();
        let times = p.unet().time_embedding(&[t, t, t]).unwrap();
        let time_alone = p.unet().time_embedding(&[t]).unwrap();
        exact(&format!("{name} time embedding"), &times, 2, &time_alone);
        for (i, prompt) in PROMPTS.iter().enumerate() {
            let alone = p.encode_prompts(&[prompt]).unwrap();
            exact(&format!("{name} context"), &both.context, i, &alone.context);
            let pooled = |e: &t2i_worker::pipeline::PromptEmbeddings| e.pooled.clone().unwrap();
            exact(
                &format!("{name} pooled"),
                &pooled(&both),
                i,
                &pooled(&alone),
            );
            let cond_alone = text_time(&alone.pooled, &ids[..1]);
            let aug = |c| t2i_worker::pipeline::unet::UNet::conditioning_tensor(c).unwrap();
            exact(
                &format!("{name} add_embedding"),
                aug(&cond),
                i,
                aug(&cond_alone),
            );
            let out_alone = p
                .unet()
                .forward(
                    &sample.narrow(0, i, 1).unwrap(),
                    t,
                    &alone.context,
                    &cond_alone,
                )
                .unwrap();
            exact(&format!("{name} UNet"), &out, i, &out_alone);
        }
    }
}

#[test]
fn a_render_is_bit_identical_whatever_the_batch() {
    // `t2i generate --prompt "a red fox" --prompt "a dark wolf" --num-images 2 --seed 7
    // --width 64 --height 64 --steps 4`, at --batch-size 4 and 1, with and without guidance.
    let p = load_pipeline("ssd-1b-tiny", DType::F32, Variant::Auto);
    let images: Vec<ImageSpec> = PROMPTS
        .iter()
        .flat_map(|prompt| {
            (7..9).map(|seed| ImageSpec {
                prompt: prompt.to_string(),
                negative_prompt: None,
                seed,
            })
        })
        .collect();
    for (scheduler, guidance_scale) in [
        (p.default_scheduler(), 5.0),
        (SchedulerKind::EulerAncestral, 1.0),
    ] {
        let batch = RenderBatch {
            images: images.clone(),
            width: 64,
            height: 64,
            steps: 4,
            guidance_scale,
            scheduler,
            long_prompt: Default::default(),
            prompt_weighting: Default::default(),
            latents: None,
            loras: Vec::new(),
        };
        let together = p
            .render(&batch, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        for (i, spec) in images.iter().enumerate() {
            let one = RenderBatch {
                images: vec![spec.clone()],
                ..batch.clone()
            };
            let alone = p.render(&one, &mut |_| ControlFlow::Continue(())).unwrap();
            let differing = together.images[i]
                .pixels()
                .zip(alone.images[0].pixels())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                differing, 0,
                "{scheduler:?} guidance {guidance_scale}: image {i} has {differing} pixels that \
                 differ from its render alone"
            );
        }
    }
}
