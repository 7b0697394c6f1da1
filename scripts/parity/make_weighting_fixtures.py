#!/usr/bin/env python3
"""Reference embeddings for the A1111 prompt-weighting syntax (`prompt_weighting: "a1111"`).

Reads the existing tiny fixtures (never changes them) and writes NEW reference files only:
  reference/weighting.safetensors + .json

What the reference is. The syntax and the weighting are AUTOMATIC1111's:
  * the parse is `parse_prompt_attention` as diffusers' community pipeline `lpw_stable_diffusion_xl.py`
    ships it (A1111's `modules/prompt_parser.py` function, `BREAK` included), imported from that file;
  * each parsed piece is tokenized on its own (`tokenizer(text, add_special_tokens=False)`), the ids cut
    into 75-token chunks and closed at every `BREAK`, each chunk `BOS … EOS` padded with the tokenizer's
    pad to 77 (A1111's `sd_hijack_clip.tokenize_line` with `comma_padding_backtrack = 0`, and its
    `process_tokens` padding; the same chunks as compel's BRUTAL split for text without syntax);
  * each chunk is encoded on its own and weighted by A1111's "Original" emphasis
    (`sd_emphasis.EmphasisOriginal`): `z *= w; z *= mean_before / mean_after`, per chunk and per encoder;
  * texts of one call are padded to the same number of chunks with the empty prompt's chunk; SDXL's pooled
    embedding is encoder 2's projection of the first chunk, unweighted (A1111's `zs[0].pooled`).
A1111 itself cannot run outside its web UI, so those steps are written out below (a few lines each) and
held to the runnable reference, diffusers' community `lpw_stable_diffusion.py` (`get_weighted_text_embeddings`,
imported from that file, run unmodified on a `pipe` stand-in that only names transformers 5's
`final_layer_norm` where lpw looks for transformers 4's), wherever the two are defined alike: every single-chunk case and the
`truncate` case (`max_embeddings_multiples=1`) on the SD fixture, and SDXL's first encoder (whose pad is
EOS, as lpw assumes) through a `pipe` stand-in whose `final_layer_norm` is the identity (`clip_skip=1` then
gives `hidden_states[-2]`, SDXL's penultimate states). The script asserts they agree within 1e-5. Where they
differ, by design: lpw restores the mean over the whole prompt instead of per chunk, pads the last chunk as
`BOS … pad … EOS` (so it cannot encode SDXL's second tokenizer, whose pad is `!`, as diffusers does), and
ignores `BREAK`; the JSON records lpw's difference on the multi-chunk SD cases. `lpw_stable_diffusion_xl.py`'s
own embedding function is not used: it interpolates towards the last token instead of A1111's emphasis,
hard-codes CLIP's BOS/EOS ids 49406/49407 (out of the tiny fixtures' 562-token vocabulary), leaves the last
chunk unpadded, pools from the last chunk, and encodes `BREAK` as a word with weight -1.

Also written: a corpus of prompts (fixed and seeded random ones over the syntax's characters) with
`parse_prompt_attention`'s result or its exception, for the Rust parser to match weight for weight.

Run, with the two community files of a diffusers checkout (examples/community/, used as of commit
58eb52c0803ea9af3abec60841c2a093bdf1f951; they are not copied into this repository):
  python scripts/parity/make_weighting_fixtures.py --lpw PATH/lpw_stable_diffusion.py \
      --lpw-xl PATH/lpw_stable_diffusion_xl.py
"""

import argparse
import copy
import hashlib
import importlib.util
import json
import random
import types
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

BODY = 75  # 77 minus BOS and EOS: A1111's `chunk_length`
MAX_CHUNKS = 10  # src/pipeline/prompt.rs MAX_CHUNKS

LONG = ", ".join(["a photo of a cat sitting on the table"] * 6)  # 89 tokens on the fixtures' tokenizers
HEAD = ", ".join(["a photo of a cat sitting on the table"] * 4)  # 59: a bracket opened after it spans 75
CASES = [
    # A1111's own docstring example, and a weighted negative.
    dict(name="nested", mode="chunk", prompt="a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         negative="(blurry:1.4), [[dark]], lowres"),
    # Escapes, a lone backslash, unbalanced brackets, an unmatched closer in the negative.
    dict(name="escaped", mode="chunk",
         prompt=r"a \(literal\) photo of a \[cat\] with (emphasis) and a \\ backslash, (unbalanced [words",
         negative="ugly) photo"),
    # A weighted span across the first chunk border, a nested weight in it, three chunks.
    dict(name="long_weighted", mode="chunk",
         prompt=HEAD + ", (a dog running (very fast:1.3) across the golden field at sunset, " + LONG
         + "), [a quiet ending]",
         negative="blurry"),
    # BREAK closes a chunk; a weighted BREAK-free negative.
    dict(name="break", mode="chunk", prompt="a red fox BREAK (a blue sky:1.3), [clouds] BREAK",
         negative="(blurry:1.2)"),
    # A short prompt and a long weighted negative: the positive is padded to its chunks.
    dict(name="weighted_negative", mode="chunk", prompt="a photo of a cat",
         negative=", ".join(["(blurry:1.3), [dark], ugly photo of a dog"] * 10)),
    # No syntax at all: diffusers' encoding exactly.
    dict(name="plain", mode="chunk", prompt="a photo of a cat, 4:3 ratio", negative="blurry"),
    # truncate + a1111: one chunk, the rest cut; weights in it.
    dict(name="truncate", mode="truncate", prompt="(a photo:1.2) of a [cat], " + LONG, negative="(blurry:1.1)"),
]

# Fixed parse cases: the docstring's, escapes, bad numbers, BREAK in every position.
CORPUS = [
    "", "normal text", "an (important) word", "(unbalanced", r"\(literal\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "[a]", "a) b]", "a:1.2) b: c", "(a:1.2]",
    r"\\ \( \) \[ \]", r"a\b", "a\\", r"(\(x\):2)", "((x:1.3))", "[(x", "(x:+.5)", "(x:0)", "(a:1.2.3)",
    "(a:.)", "(a:-1)", "(a:10.5)", "a red fox BREAK  a blue sky", "BREAK", "BREAKfast Break _BREAK",
    "(a BREAK b)", "a BREAK BREAK b", "()", "(:99)", "a\u001cBREAK\u001cb", "((((((((((a))))))))))",
    "[[[[[[[[[[a]]]]]]]]]]", "(a:1.5) (b:1.5) c", "((a)) ((b))", "x [y (z:1.4) w] v",
]
PIECES = ["a", "b", " ", "(", ")", "[", "]", ":", "\\", "1", ".", "2", "0", "BREAK", " BREAK ", ":1.5)",
          ":0.5)", ":9)", "é", "_", "+", "-", "\u001c", "word"]


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class A1111:
    """A1111's tokenize_line (no comma back-tracking, no embeddings) + process_tokens + EmphasisOriginal
    for one tokenizer/encoder pair."""

    def __init__(self, parse, tok, encoder, layer):
        self.parse, self.tok, self.encoder, self.layer = parse, tok, encoder, layer
        self.id_start, self.id_end, self.id_pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def chunks(self, prompt, max_chunks):
        chunks, tokens, mults = [], [], []

        def next_chunk():
            nonlocal tokens, mults
            to_add = BODY - len(tokens)
            chunk = [self.id_start] + tokens + [self.id_end] * to_add + [self.id_end]
            # process_tokens: everything after the first EOS becomes the pad (OpenCLIP / SDXL's `!`).
            first_end = chunk.index(self.id_end)
            chunk = chunk[:first_end + 1] + [self.id_pad] * (len(chunk) - first_end - 1)
            chunks.append((chunk, [1.0] + mults + [1.0] * to_add + [1.0]))
            tokens, mults = [], []

        for text, weight in self.parse(prompt):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            for t in self.tok(text, truncation=False, add_special_tokens=False).input_ids:
                if len(tokens) == BODY:
                    next_chunk()
                tokens.append(t)
                mults.append(weight)
        if tokens or not chunks:
            next_chunk()
        return chunks[:max_chunks], len(chunks) > max_chunks

    def encode(self, chunk):
        ids, mults = chunk
        out = self.encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-2] if self.layer == "penultimate" else out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)
        w = torch.tensor(mults, dtype=torch.float32)
        if (w != 1.0).any():
            original_mean = z.mean()
            z = z * w.reshape(w.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
        return z, pooled


def encode_pair(encoders, prompt, negative, mode):
    """Context (and pooled) of prompt and negative, padded to the same chunk count, encoders joined."""
    max_chunks = MAX_CHUNKS if mode == "chunk" else 1
    per = []
    for enc in encoders:
        (pc, pt), (nc, nt) = enc.chunks(prompt, max_chunks), enc.chunks(negative, max_chunks)
        per.append((enc, pc, nc, (pt, nt)))
    count = max(max(len(pc), len(nc)) for _, pc, nc, _ in per)
    contexts, pooled, ids = [[], []], [None, None], []
    for enc, pc, nc, cut in per:
        empty = enc.chunks("", 1)[0][0]
        ids.append((pc, nc))
        for side, chunks in enumerate([pc, nc]):
            parts = [enc.encode(c) for c in chunks + [empty] * (count - len(chunks))]
            contexts[side].append(torch.cat([z for z, _ in parts], dim=1))
            if parts[0][1] is not None:
                pooled[side] = parts[0][1]
    context = [torch.cat(c, dim=-1) for c in contexts]
    return context, pooled, ids, count, per[0][3]


def lpw_stand_in(tok, encoder, penultimate):
    """A `pipe` for lpw's get_weighted_text_embeddings: a tokenizer and an encoder. lpw reads
    `text_encoder.text_model.final_layer_norm`, transformers 4's layout; transformers 5's CLIPTextModel has
    `final_layer_norm` at the top, so the stand-in names it where lpw looks (SDXL: the identity, so that
    `clip_skip=1` gives the un-normalised `hidden_states[-2]`)."""
    encoder = copy.deepcopy(encoder)
    norm = torch.nn.Identity() if penultimate else encoder.final_layer_norm
    encoder.text_model = types.SimpleNamespace(final_layer_norm=norm)
    return types.SimpleNamespace(tokenizer=tok, text_encoder=encoder, device=torch.device("cpu"))


def check_against_lpw(lpw, pipe_like, clip_skip, case, count, mine, mine_negative, width):
    """lpw's embeddings of the case; asserted equal to ours where lpw is defined alike. Returns the
    largest difference."""
    multiples = 1 if case["mode"] == "truncate" else MAX_CHUNKS
    with torch.no_grad():
        theirs, theirs_negative = lpw.get_weighted_text_embeddings(
            pipe_like, case["prompt"], uncond_prompt=case["negative"], max_embeddings_multiples=multiples,
            clip_skip=clip_skip)
    if theirs.shape[1] != mine.shape[1]:
        return None
    diff = max((theirs - mine[..., :width]).abs().max().item(),
               (theirs_negative - mine_negative[..., :width]).abs().max().item())
    if count == 1:
        assert diff < 1e-5, f"{case['name']}: lpw's embeddings differ by {diff}"
    return diff


def build(kind, folder, lpw, parse, tensors, info):
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        encoders = [A1111(parse, pipe.tokenizer, pipe.text_encoder, "penultimate"),
                    A1111(parse, pipe.tokenizer_2, pipe.text_encoder_2, "penultimate")]
        stand_in = lpw_stand_in(pipe.tokenizer, pipe.text_encoder, True)
        clip_skip, width = 1, pipe.text_encoder.config.hidden_size
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
        encoders = [A1111(parse, pipe.tokenizer, pipe.text_encoder, "last")]
        stand_in = lpw_stand_in(pipe.tokenizer, pipe.text_encoder, False)
        clip_skip, width = None, pipe.text_encoder.config.hidden_size
    for case in CASES:
        with torch.no_grad():
            (context, negative), (pooled, npooled), ids, count, cut = encode_pair(
                encoders, case["prompt"], case["negative"], case["mode"])
        key = f"{kind}.{case['name']}"
        tensors[f"{key}.embeds"], tensors[f"{key}.negative_embeds"] = context, negative
        if pooled is not None:
            tensors[f"{key}.pooled"], tensors[f"{key}.negative_pooled"] = pooled, npooled
        for n, (pc, nc) in enumerate(ids, start=1):
            tensors[f"{key}.ids{n}"] = torch.tensor([i for c, _ in pc for i in c]).reshape(1, -1)
            tensors[f"{key}.weights{n}"] = torch.tensor([w for _, m in pc for w in m]).reshape(1, -1)
            tensors[f"{key}.negative_ids{n}"] = torch.tensor([i for c, _ in nc for i in c]).reshape(1, -1)
            tensors[f"{key}.negative_weights{n}"] = torch.tensor([w for _, m in nc for w in m]).reshape(1, -1)
        lpw_diff = check_against_lpw(lpw, stand_in, clip_skip, case, count, context, negative, width)
        if case["name"] == "plain":
            with torch.no_grad():
                plain = pipe.encode_prompt(prompt=case["prompt"], negative_prompt=case["negative"], device="cpu",
                                           num_images_per_prompt=1, do_classifier_free_guidance=True)
            assert (plain[0] - context).abs().max() < 1e-6, "plain text must encode as diffusers does"
        if case["name"] == "long_weighted":
            w = tensors[f"{key}.weights1"].reshape(-1)
            assert w[BODY] != 1.0 and w[77 + 1] != 1.0, "the weighted span crosses the first chunk border"
        info.append(dict(case, family=kind, model=f"models/{Path(folder).name}", chunks=count,
                         truncated=list(cut), context_tokens=context.shape[1],
                         lpw_max_abs_diff=lpw_diff, lpw_checked=count == 1,
                         lpw_compares="encoder 1 only (the stand-in)" if kind == "sdxl" else "whole context",
                         parse=parse(case["prompt"]), negative_parse=parse(case["negative"])))


def corpus(parse, lpw):
    rng = random.Random(19)
    prompts = CORPUS + ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 24))) for _ in range(400)]
    out = []
    for p in prompts:
        try:
            parsed = parse(p)
            out.append(dict(prompt=p, parse=[[t, repr(float(w))] for t, w in parsed]))
        except ValueError as e:
            out.append(dict(prompt=p, error=f"ValueError: {e}"))
            continue
        if "BREAK" not in p:
            # lpw_stable_diffusion.py's parser (no BREAK) is the same function.
            assert lpw.parse_prompt_attention(p) == parsed, p
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lpw", required=True, help="examples/community/lpw_stable_diffusion.py of diffusers")
    ap.add_argument("--lpw-xl", required=True, help="examples/community/lpw_stable_diffusion_xl.py of diffusers")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    lpw, lpw_xl = load(args.lpw, "lpw_stable_diffusion"), load(args.lpw_xl, "lpw_stable_diffusion_xl")
    parse = lpw_xl.parse_prompt_attention
    tensors, cases = {}, []
    build("sdxl", out / "models" / "ssd-1b-tiny", lpw, parse, tensors, cases)
    build("sd", out / "models" / "sd15-tiny", lpw, parse, tensors, cases)
    info = {"generated_by": "scripts/parity/make_weighting_fixtures.py", "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "lpw_stable_diffusion.py sha256": sha256(args.lpw),
            "lpw_stable_diffusion_xl.py sha256": sha256(args.lpw_xl),
            "method": "A1111: parse_prompt_attention (from lpw_stable_diffusion_xl.py), pieces tokenized alone, "
                      "75-token chunks closed at BREAK, EmphasisOriginal per chunk and encoder, pooled from "
                      "chunk 1 unweighted; held to lpw_stable_diffusion.get_weighted_text_embeddings on "
                      "single chunks",
            "cases": cases, "parse_corpus": corpus(parse, lpw)}
    (out / "reference").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "reference" / "weighting.safetensors")
    (out / "reference" / "weighting.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
