//! The A1111 weighting syntax (`prompt_weighting: "a1111"`) against the reference of
//! `scripts/parity/make_weighting_fixtures.py` (`tests/fixtures/reference/weighting.*`): A1111's
//! parse as diffusers' community `lpw_stable_diffusion_xl.py` ships it, pieces tokenized alone,
//! 75-token chunks closed at `BREAK`, A1111's "Original" emphasis per chunk and encoder, held by the
//! script to `lpw_stable_diffusion.py`'s `get_weighted_text_embeddings` where the two are defined
//! alike. On `ssd-1b-tiny` and `sd15-tiny`: the parser on a corpus, chunk ids and weights, context
//! and pooled embeddings; text without syntax encodes to the bit as literal text; a batch of
//! weighted and literal images renders each as alone.

use std::ops::ControlFlow;

use candle_core::{DType, IndexOp, Tensor};
use t2i_worker::job::weighting::{self, MAX_WEIGHT, Piece, WeightError};
use t2i_worker::job::{LongPrompt, PromptWeighting};
use t2i_worker::pipeline::prompt::MAX_CHUNKS;
use t2i_worker::pipeline::scheduler::SchedulerKind;
use t2i_worker::pipeline::tokenizer::ClipTokenizer;
use t2i_worker::pipeline::{ImageSpec, RenderBatch, Variant};

use crate::support::{Reference, assert_close, load_pipeline, max_abs_diff, model_dir};

/// The bound of the other parity tests: 1e-4 relative to the reference's magnitude.
const TOL: f64 = 1e-4;
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

fn mode(case: &serde_json::Value) -> LongPrompt {
    LongPrompt::parse(case["mode"].as_str().unwrap()).expect("a mode")
}

fn text<'a>(case: &'a serde_json::Value, key: &str) -> &'a str {
    case[key].as_str().unwrap()
}

fn row(t: &Tensor, i: usize) -> Tensor {
    t.i(i..i + 1).unwrap()
}

/// What our parser must give for a reference parse: the same pieces (A1111's `["BREAK", -1]`
/// marker, multiplied by brackets or not, is a break), or the range error where a text's weight is
/// outside our bound.
fn expected(parse: &[serde_json::Value]) -> Result<Vec<Piece>, ()> {
    let mut pieces = Vec::new();
    for entry in parse {
        let text = entry[0].as_str().unwrap().to_string();
        let weight: f64 = entry[1].as_str().unwrap().parse().unwrap();
        if text == "BREAK" && weight < 0.0 {
            pieces.push(Piece::Break);
            continue;
        }
        if !text.is_empty() && !(0.0..=MAX_WEIGHT).contains(&weight) {
            return Err(());
        }
        pieces.push(Piece::Text { text, weight });
    }
    Ok(pieces)
}

#[test]
fn the_parser_matches_the_reference_on_its_corpus() {
    let r = Reference::load("weighting");
    let corpus = r.meta["parse_corpus"].as_array().unwrap();
    assert!(corpus.len() > 400, "the fixed and the random prompts");
    let (mut parsed, mut numbers, mut ranges) = (0, 0, 0);
    for entry in corpus {
        let prompt = entry["prompt"].as_str().unwrap();
        let ours = weighting::parse(prompt);
        if entry.get("error").is_some() {
            // Python's float() refused the weight: so do we.
            assert!(
                matches!(ours, Err(WeightError::Number { .. })),
                "{prompt:?}: {ours:?}"
            );
            numbers += 1;
            continue;
        }
        match expected(entry["parse"].as_array().unwrap()) {
            Ok(want) => {
                // Weights to the bit: the same products in the same order.
                assert_eq!(ours.as_ref(), Ok(&want), "{prompt:?}");
                parsed += 1;
            }
            Err(()) => {
                assert!(
                    matches!(ours, Err(WeightError::Range { .. })),
                    "{prompt:?}: {ours:?}"
                );
                ranges += 1;
            }
        }
    }
    // The corpus exercises every outcome.
    assert!(
        parsed > 300 && numbers > 0 && ranges > 0,
        "{parsed} {numbers} {ranges}"
    );
}

#[test]
fn chunk_ids_and_weights_are_the_references() {
    let r = Reference::load("weighting");
    for (family, model) in FAMILIES {
        let folders: &[(&str, &str)] = match family {
            "sdxl" => &[("tokenizer", "1"), ("tokenizer_2", "2")],
            _ => &[("tokenizer", "1")],
        };
        for (folder, n) in folders {
            let tok = ClipTokenizer::load(&model_dir(model).join(folder), 77).unwrap();
            for case in cases(&r, family) {
                let max = match mode(&case) {
                    LongPrompt::Chunk => MAX_CHUNKS,
                    LongPrompt::Truncate => 1,
                };
                for (side, prefix) in [("prompt", ""), ("negative", "negative_")] {
                    let key = format!("{family}.{}.{prefix}", text(&case, "name"));
                    let pieces = weighting::parse(text(&case, side)).unwrap();
                    let got = tok.encode_weighted_chunks(&pieces, max).unwrap();
                    let ids: Vec<i64> = got
                        .chunks
                        .chunks
                        .concat()
                        .into_iter()
                        .map(i64::from)
                        .collect();
                    let want: Vec<i64> = r
                        .get(&format!("{key}ids{n}"))
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(ids, want, "{model} {folder} {key}ids");
                    let weights: Vec<f32> = got.weights.concat();
                    let want: Vec<f32> = r
                        .get(&format!("{key}weights{n}"))
                        .flatten_all()
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(weights, want, "{model} {folder} {key}weights");
                }
            }
        }
    }
}

#[test]
fn weighted_embeddings_match_the_reference() {
    let r = Reference::load("weighting");
    for (family, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        let cases = cases(&r, family);
        assert_eq!(cases.len(), 7, "{family}: every case in the reference");
        for case in cases {
            let key = format!("{family}.{}", text(&case, "name"));
            let texts = [text(&case, "prompt"), text(&case, "negative")];
            let emb = p
                .encode_prompts_with(&texts, mode(&case), PromptWeighting::A1111)
                .unwrap();
            let tokens = case["context_tokens"].as_u64().unwrap() as usize;
            assert_eq!(emb.context.dim(1).unwrap(), tokens, "{key}: context length");
            let cut: Vec<bool> = serde_json::from_value(case["truncated"].clone()).unwrap();
            assert_eq!(emb.truncated, cut, "{key}: prompt_truncated");
            let what = format!("{model} {key}");
            let pairs = [
                ("embeds", &emb.context, 0),
                ("negative_embeds", &emb.context, 1),
            ];
            for (name, t, i) in pairs {
                let want = r.get(&format!("{key}.{name}"));
                assert_close(&format!("{what} {name}"), &row(t, i), want, TOL);
            }
            match &emb.pooled {
                Some(pooled) => {
                    for (name, i) in [("pooled", 0), ("negative_pooled", 1)] {
                        let want = r.get(&format!("{key}.{name}"));
                        assert_close(&format!("{what} {name}"), &row(pooled, i), want, TOL);
                    }
                }
                None => assert_eq!(family, "sd"),
            }
        }
    }
}

#[test]
fn weights_change_the_embedding_and_text_without_syntax_is_literal_to_the_bit() {
    let long = ["a photo of a cat sitting on the table"; 12].join(", ");
    for (_, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        for mode in LongPrompt::ALL {
            let plain = ["a photo of a cat, 4:3", "", long.as_str()];
            let weighted = p
                .encode_prompts_with(&plain, mode, PromptWeighting::A1111)
                .unwrap();
            let literal = p
                .encode_prompts_with(&plain, mode, PromptWeighting::None)
                .unwrap();
            assert_eq!(
                max_abs_diff(&weighted.context, &literal.context),
                0.0,
                "{model} {mode}"
            );
            assert_eq!(weighted.truncated, literal.truncated, "{model} {mode}");
            if let (Some(a), Some(b)) = (&weighted.pooled, &literal.pooled) {
                assert_eq!(max_abs_diff(a, b), 0.0, "{model} {mode} pooled");
            }
            // A weight changes the context, not the pooled embedding.
            let a = p
                .encode_prompts_with(&["a (photo:1.5) of a cat"], mode, PromptWeighting::A1111)
                .unwrap();
            let b = p
                .encode_prompts_with(&["a photo of a cat"], mode, PromptWeighting::A1111)
                .unwrap();
            assert!(
                max_abs_diff(&a.context, &b.context) > 1e-4,
                "{model} {mode}"
            );
            if let (Some(x), Some(y)) = (&a.pooled, &b.pooled) {
                assert_eq!(
                    max_abs_diff(x, y),
                    0.0,
                    "{model} {mode}: pooled is unweighted"
                );
            }
        }
    }
}

#[test]
fn a_batch_of_weighted_and_literal_prompts_renders_every_image_as_alone() {
    for (_, model) in FAMILIES {
        let p = load_pipeline(model, DType::F32, Variant::Auto);
        let spec = |prompt: &str, negative: Option<&str>, seed| ImageSpec {
            prompt: prompt.to_string(),
            negative_prompt: negative.map(str::to_string),
            seed,
        };
        let images = vec![
            spec("a (red:1.4) fox, [blurry]", Some("(ugly:1.2)"), 1),
            spec("a red fox", None, 2),
            spec("a red fox BREAK a (dark:0.6) wood", Some("blurry"), 3),
            spec("a red fox", Some("blurry"), 4),
        ];
        let batch = RenderBatch {
            images: images.clone(),
            width: 64,
            height: 64,
            steps: 2,
            guidance_scale: 5.0,
            scheduler: SchedulerKind::Euler,
            long_prompt: LongPrompt::Chunk,
            prompt_weighting: PromptWeighting::A1111,
            latents: None,
            loras: Vec::new(),
        };
        let render = |b: &RenderBatch| p.render(b, &mut |_| ControlFlow::Continue(())).unwrap();
        let together = render(&batch);
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
        }
        // The weights reach the pixels: the literal reading renders image 0 differently.
        let literal = render(&RenderBatch {
            images: vec![batch.images[0].clone()],
            prompt_weighting: PromptWeighting::None,
            ..batch.clone()
        });
        assert_ne!(
            literal.images[0].as_raw(),
            together.images[0].as_raw(),
            "{model}"
        );
    }
}
