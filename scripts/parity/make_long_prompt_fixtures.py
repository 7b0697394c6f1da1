#!/usr/bin/env python3
"""Reference embeddings for long prompts (over 77 tokens), computed by compel 2.5.1.

Reads the existing tiny fixtures (never changes them) and writes NEW reference files only:
  reference/long-prompt.safetensors + .json

compel is set up as its SDXL/SD wrappers do (`CompelForSDXL`, `CompelForSD`: `truncate_long_prompts=False`;
SDXL: PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED for both encoders, the pooled embedding from encoder 2;
SD: LAST_HIDDEN_STATES_NORMALIZED) with one deliberate change: `split_long_text_mode=BRUTAL`, i.e. plain
75-token chunks (77 minus BOS and EOS), the A1111 / diffusers long-prompt-pipeline convention, instead of
compel's default of splitting at the last sentence boundary. Positive and negative prompts go through one
compel call per encoder, which pads the shorter with the empty prompt's chunk
(`pad_conditioning_tensors_to_same_length`); SDXL's two encoders' states are then concatenated along the
embedding dimension, as CompelForSDXL does.

The prompts contain no compel syntax (no parentheses, quotes, `+`/`-` suffixes), so compel's parse is the
plain text; the script asserts that compel's tokens equal the tokenizer's own. It also stores diffusers'
`encode_prompt` (which truncates at 77) for the same prompts: the worker's `long_prompt: "truncate"` mode
must keep giving exactly that.

Run (requirements.txt beside it, which pins compel):  python scripts/parity/make_long_prompt_fixtures.py
"""

import argparse
import json
from pathlib import Path

import compel
import diffusers
import torch
import transformers
from compel import Compel, ReturnedEmbeddingsType
from compel.embeddings_provider import SplitLongTextMode
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

# 3 chunks on the fixtures' tokenizer: > 2 × 75 tokens.
LONG = ", ".join(["a photo of a cat sitting on the table in the sea"] * 14)
# A long negative with a short positive: the positive is padded. (The 75/76-token boundary is checked by
# tests/it/long_prompt.rs on its own.)
LONG_NEGATIVE = ", ".join(["blurry, dark, ugly photo of a dog"] * 12)
CASES = [
    dict(name="long_positive", prompt=LONG, negative="blurry"),
    dict(name="long_negative", prompt="a photo of a cat", negative=LONG_NEGATIVE),
]
BRUTAL = SplitLongTextMode.BRUTAL


def plain_tokens(tok, text):
    """The tokenizer's ids without BOS/EOS and without truncation."""
    return tok(text, truncation=False, padding="do_not_pad").input_ids[1:-1]


def check_compel_tokens(tok, text, chunked):
    """compel's chunked ids hold exactly the tokenizer's ids of `text` (no syntax was parsed away)."""
    ids = plain_tokens(tok, text)
    kept = [t for t in chunked.flatten().tolist()
            if t not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)]
    assert kept == [t for t in ids if t != tok.pad_token_id], f"compel changed the tokens of {text!r}"
    return len(ids)


def sdxl(folder, tensors, info):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    c1 = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                truncate_long_prompts=False, split_long_text_mode=BRUTAL)
    c2 = Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2,
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                truncate_long_prompts=False, requires_pooled=True, split_long_text_mode=BRUTAL)
    for case in CASES:
        texts = [case["prompt"], case["negative"]]
        with torch.no_grad():
            left, toks1 = c1(texts, return_tokenization=True)
            right, toks2, pooled = c2(texts, return_tokenization=True)
            assert left.shape[1] == right.shape[1]
            embeds = torch.cat([left, right], dim=-1)
            pe, ne, pp, npool = pipe.encode_prompt(prompt=case["prompt"], negative_prompt=case["negative"],
                                                   device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True)
        counts = [check_compel_tokens(pipe.tokenizer, t, k) for t, k in zip(texts, toks1)]
        for t, k in zip(texts, toks2):
            check_compel_tokens(pipe.tokenizer_2, t, k)
        key = f"sdxl.{case['name']}"
        tensors[f"{key}.embeds"], tensors[f"{key}.negative_embeds"] = embeds[0:1], embeds[1:2]
        tensors[f"{key}.pooled"], tensors[f"{key}.negative_pooled"] = pooled[0:1], pooled[1:2]
        tensors[f"{key}.ids1"], tensors[f"{key}.ids2"] = toks1[0].reshape(1, -1), toks2[0].reshape(1, -1)
        tensors[f"{key}.diffusers_embeds"], tensors[f"{key}.diffusers_negative_embeds"] = pe, ne
        tensors[f"{key}.diffusers_pooled"], tensors[f"{key}.diffusers_negative_pooled"] = pp, npool
        info.append(dict(case, family="sdxl", model="models/ssd-1b-tiny", token_counts=counts,
                         context_tokens=embeds.shape[1]))


def sd(folder, tensors, info):
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    c = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
               returned_embeddings_type=ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
               truncate_long_prompts=False, split_long_text_mode=BRUTAL)
    for case in CASES:
        texts = [case["prompt"], case["negative"]]
        with torch.no_grad():
            embeds, toks = c(texts, return_tokenization=True)
            pe, ne = pipe.encode_prompt(prompt=case["prompt"], negative_prompt=case["negative"], device="cpu",
                                        num_images_per_prompt=1, do_classifier_free_guidance=True)
        counts = [check_compel_tokens(pipe.tokenizer, t, k) for t, k in zip(texts, toks)]
        key = f"sd.{case['name']}"
        tensors[f"{key}.embeds"], tensors[f"{key}.negative_embeds"] = embeds[0:1], embeds[1:2]
        tensors[f"{key}.ids1"] = toks[0].reshape(1, -1)
        tensors[f"{key}.diffusers_embeds"], tensors[f"{key}.diffusers_negative_embeds"] = pe, ne
        info.append(dict(case, family="sd", model="models/sd15-tiny", token_counts=counts,
                         context_tokens=embeds.shape[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    tensors, cases = {}, []
    sdxl(out / "models" / "ssd-1b-tiny", tensors, cases)
    sd(out / "models" / "sd15-tiny", tensors, cases)
    info = {"generated_by": "scripts/parity/make_long_prompt_fixtures.py", "compel": compel.__version__
            if hasattr(compel, "__version__") else "2.5.1", "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "compel_setup": "truncate_long_prompts=False, split_long_text_mode=BRUTAL; SDXL: both encoders "
                            "PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED, pooled from encoder 2; SD: "
                            "LAST_HIDDEN_STATES_NORMALIZED", "cases": cases}
    (out / "reference").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "reference" / "long-prompt.safetensors")
    (out / "reference" / "long-prompt.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
