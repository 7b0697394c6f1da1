//! Prompts over 77 tokens (`long_prompt`): `chunk` against compel 2.5.1's embeddings on the tiny
//! fixtures (`tests/fixtures/reference/long-prompt.*`, written by
//! `scripts/parity/make_long_prompt_fixtures.py`: compel with `truncate_long_prompts=False`,
//! `split_long_text_mode=BRUTAL`), and `truncate` against diffusers' own `encode_prompt`.

use std::ops::ControlFlow;

use candle_core::{DType, IndexOp, Tensor};
use t2i_worker::job::LongPrompt;
use t2i_worker::pipeline::prompt::MAX_CHUNKS;
use t2i_worker::pipeline::scheduler::SchedulerKind;
use t2i_worker::pipeline::tokenizer::ClipTokenizer;
use t2i_worker::pipeline::{ImageSpec, Pipeline, RenderBatch, Variant};

use crate::support::{Reference, assert_close, load_pipeline, max_abs_diff, model_dir};

/// The bound of the module parity tests (parity.rs): 1e-4 relative to the reference's magnitude.
const TOL: f64 = 1e-4;
/// The fixtures' tokenizers' context (`model_max_length`), and its body without BOS and EOS.
const CONTEXT: usize = 77;
const BODY: usize = CONTEXT - 2;

/// (reference key prefix, fixture) per family.
const FAMILIES: [(&str, &str); 2] = [("sdxl", "ssd-1b-tiny"), ("sd", "sd15-tiny")];

fn cases(r: &Reference, family: &str) -> Vec<serde_json::Value> {
    r.meta["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["family"] == family)
        .cloned()
        .collect()
}

fn row(t: &Tensor, i: usize) -> Tensor {
    t.i(i..i + 1).unwrap()
}

#[test]
fn chunked_prompts_and_padded_negatives_match_compel() {
    let r = Reference::load("long-prompt");
    for (family, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        let cases = cases(&r, family);
        assert_eq!(cases.len(), 2, "{family}: both cases in the reference");
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let key = format!("{family}.{name}");
            let texts = [
                case["prompt"].as_str().unwrap(),
                case["negative"].as_str().unwrap(),
            ];
            let emb = p.encode_prompts_as(&texts, LongPrompt::Chunk).unwrap();
            let tokens = case["context_tokens"].as_u64().unwrap() as usize;
            assert_eq!(tokens % CONTEXT, 0, "{key}: whole chunks");
            assert!(tokens > CONTEXT, "{key}: the case is long");
            assert_eq!(emb.context.dim(1).unwrap(), tokens, "{key}: context length");
            let what = format!("{model} {key}");
            assert_close(
                &format!("{what} embeds"),
                &row(&emb.context, 0),
                r.get(&format!("{key}.embeds")),
                TOL,
            );
            assert_close(
                &format!("{what} negative (padded to the positive's chunks)"),
                &row(&emb.context, 1),
                r.get(&format!("{key}.negative_embeds")),
                TOL,
            );
            if family == "sdxl" {
                let pooled = emb.pooled.as_ref().expect("SDXL pools");
                assert_close(
                    &format!("{what} pooled"),
                    &row(pooled, 0),
                    r.get(&format!("{key}.pooled")),
                    TOL,
                );
                assert_close(
                    &format!("{what} negative pooled"),
                    &row(pooled, 1),
                    r.get(&format!("{key}.negative_pooled")),
                    TOL,
                );
            } else {
                assert!(emb.pooled.is_none());
            }
            // Nothing was cut: every case fits in MAX_CHUNKS chunks.
            assert_eq!(emb.truncated, vec![false, false], "{key}");
        }
    }
}

#[test]
fn chunk_ids_are_compels() {
    let r = Reference::load("long-prompt");
    for (family, model) in FAMILIES {
        let folders: &[(&str, &str)] = match family {
            "sdxl" => &[("tokenizer", "ids1"), ("tokenizer_2", "ids2")],
            _ => &[("tokenizer", "ids1")],
        };
        for (folder, ids) in folders {
            let tok = ClipTokenizer::load(&model_dir(model).join(folder), CONTEXT).unwrap();
            for case in cases(&r, family) {
                let key = format!("{family}.{}.{ids}", case["name"].as_str().unwrap());
                let want: Vec<i64> = r.get(&key).flatten_all().unwrap().to_vec1().unwrap();
                let got = tok
                    .encode_chunks(case["prompt"].as_str().unwrap(), MAX_CHUNKS)
                    .unwrap();
                assert!(!got.truncated);
                let got: Vec<i64> = got.chunks.concat().into_iter().map(i64::from).collect();
                assert_eq!(got, want, "{model} {folder} {key}");
            }
        }
    }
}

#[test]
fn truncate_mode_is_diffusers_encoding_and_reports_the_cut() {
    let r = Reference::load("long-prompt");
    for (family, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        for case in cases(&r, family) {
            let key = format!("{family}.{}", case["name"].as_str().unwrap());
            let texts = [
                case["prompt"].as_str().unwrap(),
                case["negative"].as_str().unwrap(),
            ];
            let emb = p.encode_prompts_as(&texts, LongPrompt::Truncate).unwrap();
            assert_eq!(emb.context.dim(1).unwrap(), CONTEXT, "{key}");
            // The mode is the old behaviour to the bit.
            let old = p.encode_prompts(&texts).unwrap();
            assert_eq!(max_abs_diff(&emb.context, &old.context), 0.0, "{key}");
            assert_eq!(emb.truncated, old.truncated, "{key}");
            let long = [0, 1].map(|i| case["token_counts"][i].as_u64().unwrap() as usize > BODY);
            assert_eq!(emb.truncated, long.to_vec(), "{key}: prompt_truncated");
            let what = format!("{model} {key} truncated");
            assert_close(
                &format!("{what} embeds"),
                &row(&emb.context, 0),
                r.get(&format!("{key}.diffusers_embeds")),
                TOL,
            );
            assert_close(
                &format!("{what} negative"),
                &row(&emb.context, 1),
                r.get(&format!("{key}.diffusers_negative_embeds")),
                TOL,
            );
            if let Some(pooled) = &emb.pooled {
                assert_close(
                    &format!("{what} pooled"),
                    &row(pooled, 0),
                    r.get(&format!("{key}.diffusers_pooled")),
                    TOL,
                );
                // compel's pooled embedding is diffusers' (the prompt cut at 77 tokens).
                assert_close(
                    &format!("{what} pooled = compel's"),
                    &row(pooled, 0),
                    r.get(&format!("{key}.pooled")),
                    TOL,
                );
            }
        }
    }
}

/// `n` prompt tokens on the fixtures' tokenizers ("a" is one token there; checked).
fn prompt_of(p: &Pipeline, n: usize) -> String {
    let ids = &p.tokenize("a a a").unwrap()[0].ids;
    // BOS, three ids, EOS, then padding (tokenizer 1 pads with EOS).
    assert_eq!((ids[1], ids[2]), (ids[3], ids[3]), "`a` is one token");
    assert_ne!(ids[3], ids[4], "`a` is one token");
    assert_eq!(ids[4], ids[5], "`a` is one token");
    vec!["a"; n].join(" ")
}

#[test]
fn chunk_boundaries_short_prompts_and_the_chunk_bound() {
    for (_, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        // At most 75 tokens: one chunk, diffusers' encoding to the bit.
        let short = ["a photo of a cat", "hello!", ""];
        let chunked = p.encode_prompts_as(&short, LongPrompt::Chunk).unwrap();
        let plain = p.encode_prompts(&short).unwrap();
        assert_eq!(
            max_abs_diff(&chunked.context, &plain.context),
            0.0,
            "{model}"
        );
        if let (Some(a), Some(b)) = (&chunked.pooled, &plain.pooled) {
            assert_eq!(max_abs_diff(a, b), 0.0, "{model} pooled");
        }
        let full = prompt_of(&p, BODY);
        let over = prompt_of(&p, BODY + 1);
        let one = p.encode_prompts_as(&[&full], LongPrompt::Chunk).unwrap();
        assert_eq!(one.context.dim(1).unwrap(), CONTEXT, "{model}: 75 tokens");
        let two = p.encode_prompts_as(&[&over], LongPrompt::Chunk).unwrap();
        assert_eq!(two.context.dim(1).unwrap(), 2 * CONTEXT, "{model}: 76");
        assert_eq!(two.truncated, vec![false]);
        // The first chunk of a long prompt is its truncated encoding; the second one token long.
        let cut = p.encode_prompts(&[&over]).unwrap();
        assert!(cut.truncated[0], "{model}: 76 tokens are cut by truncate");
        assert_eq!(
            max_abs_diff(&two.context.narrow(1, 0, CONTEXT).unwrap(), &cut.context),
            0.0,
            "{model}"
        );
        // Past MAX_CHUNKS chunks the rest is cut and reported; the contract's longest prompt.
        let huge = prompt_of(&p, 2000);
        let capped = p
            .encode_prompts_as(&[&huge, "blurry"], LongPrompt::Chunk)
            .unwrap();
        assert_eq!(capped.context.dim(1).unwrap(), MAX_CHUNKS * CONTEXT);
        assert_eq!(capped.truncated, vec![true, false], "{model}");
    }
}

#[test]
fn renders_take_long_prompts_in_both_modes() {
    let long = ["a photo of a cat sitting on the table"; 12].join(", ");
    for (_, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        let batch = |mode: LongPrompt, negative: Option<&str>| RenderBatch {
            images: vec![ImageSpec {
                prompt: long.clone(),
                negative_prompt: negative.map(str::to_string),
                seed: 3,
            }],
            width: 64,
            height: 64,
            steps: 2,
            guidance_scale: 5.0,
            scheduler: SchedulerKind::Euler,
            long_prompt: mode,
            prompt_weighting: Default::default(),
            latents: None,
            loras: Vec::new(),
        };
        let render = |b: &RenderBatch| p.render(b, &mut |_| ControlFlow::Continue(())).unwrap();
        // No negative: SDXL's zero row (force_zeros_for_empty_prompt) or SD's "" padded alike.
        for negative in [None, Some("blurry")] {
            let chunk = render(&batch(LongPrompt::Chunk, negative));
            let cut = render(&batch(LongPrompt::Truncate, negative));
            assert_eq!(chunk.truncated, vec![false], "{model}");
            assert_eq!(cut.truncated, vec![true], "{model}");
            assert_ne!(
                chunk.images[0].as_raw(),
                cut.images[0].as_raw(),
                "{model}: the rest of the prompt counts"
            );
        }
    }
}

#[test]
fn a_batch_of_mixed_lengths_renders_every_image_as_alone() {
    let long = ["a photo of a cat sitting on the table"; 12].join(", ");
    for (_, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        let spec = |prompt: &str, negative: Option<&str>, seed| ImageSpec {
            prompt: prompt.to_string(),
            negative_prompt: negative.map(str::to_string),
            seed,
        };
        // Two chunk counts: the long prompt's, and one chunk (a long negative counts too).
        let images = vec![
            spec(&long, Some("blurry"), 1),
            spec("a red fox", None, 2),
            spec("a dark wolf", Some(&long), 3),
            spec("a red fox", Some("blurry"), 4),
        ];
        let batch = RenderBatch {
            images: images.clone(),
            width: 64,
            height: 64,
            steps: 2,
            guidance_scale: 5.0,
            scheduler: SchedulerKind::EulerAncestral,
            long_prompt: LongPrompt::Chunk,
            prompt_weighting: Default::default(),
            latents: None,
            loras: Vec::new(),
        };
        let render = |b: &RenderBatch| p.render(b, &mut |_| ControlFlow::Continue(())).unwrap();
        // Two groups of two steps: progress counts 1..=4 of 4.
        let mut seen = Vec::new();
        let together = p
            .render(&batch, &mut |s| {
                seen.push((s.step, s.total));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)], "{model}");
        assert_eq!(together.images.len(), images.len());
        for (i, image) in images.into_iter().enumerate() {
            let alone = render(&RenderBatch {
                images: vec![image],
                ..batch.clone()
            });
            assert_eq!(
                together.images[i].as_raw(),
                alone.images[0].as_raw(),
                "{model}: image {i} differs when batched"
            );
            assert_eq!(together.truncated[i], alone.truncated[0]);
        }
    }
}
