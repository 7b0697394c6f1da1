//! CLIP BPE tokenizers, built from the files SD and SDXL repos actually ship.
//!
//! Hub repos ship `vocab.json` + `merges.txt` + `special_tokens_map.json` + `tokenizer_config.json` and
//! usually no `tokenizer.json`. We assemble the same tokenizer transformers' `CLIPTokenizer` builds
//! (NFC, whitespace collapse and lowercase; CLIP's split regex then byte-level; BPE with `</w>` word
//! suffix; `<|startoftext|> … <|endoftext|>`), with the `tokenizers` crate. When `tokenizer.json` exists
//! it is used as is. Either way padding and truncation come from the config files: each tokenizer pads
//! to `model_max_length` (77) with its own pad token (tokenizer 1: `<|endoftext|>`, tokenizer 2: `!`,
//! id 0, registered as a special token, so a literal `!` is id 0 there). This module does not run the
//! text encoders.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NFC, Replace, Sequence as NormSequence, utils::Lowercase};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's pre-tokenization pattern (transformers `CLIPTokenizer`, from OpenAI's `simple_tokenizer.py`).
use crate::job::weighting::Piece;

const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct TokenizerError {
    path: PathBuf,
    message: String,
}

fn err(path: &Path, message: impl std::fmt::Display) -> TokenizerError {
    TokenizerError {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Token ids for one prompt, padded to the model's context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// The prompt had more than `max_length - 2` tokens and was cut (reported to the user).
    pub truncated: bool,
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation, padding or BOS/EOS: the raw ids long prompts are
    /// chunked from.
    raw: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// A weighted prompt's chunks: [`Chunks`] with every id's weight beside it (BOS, EOS and padding 1).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChunks {
    pub chunks: Chunks,
    /// `weights[c][i]` weighs `chunks.chunks[c][i]`.
    pub weights: Vec<Vec<f32>>,
}

/// A prompt's token ids in context-length chunks (long-prompt encoding, `prompt.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunks {
    /// Each `max_length` (77) ids: BOS, up to `max_length - 2` (75) prompt ids, EOS, padding.
    pub chunks: Vec<Vec<u32>>,
    /// The prompt had more ids than `max_chunks` chunks hold and the rest was dropped.
    pub truncated: bool,
}

impl ClipTokenizer {
    /// Loads `dir` (a `tokenizer` or `tokenizer_2` folder). `max_positions` is the text encoder's
    /// `max_position_embeddings`, the hard cap on the sequence length.
    pub fn load(dir: &Path, max_positions: usize) -> Result<Self, TokenizerError> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        let special = |key: &str, default: &str| -> String {
            special_map
                .as_ref()
                .and_then(|m| token_content(m.get(key)?))
                .or_else(|| config.as_ref().and_then(|c| token_content(c.get(key)?)))
                .unwrap_or_else(|| default.to_string())
        };
        let pad = special("pad_token", EOS);
        let bos = special("bos_token", BOS);
        let eos = special("eos_token", EOS);
        let unk = special("unk_token", EOS);
        // model_max_length may be absent or a huge sentinel (1e30); the encoder's positions cap it.
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length")?.as_f64())
            .filter(|m| *m >= 2.0 && *m < 1e9)
            .map(|m| m as usize)
            .unwrap_or(max_positions)
            .min(max_positions);

        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| err(&json, e))?
        } else {
            build_clip_bpe(dir, &unk)?
        };
        let vocab_path = dir.join("vocab.json");
        let id = |inner: &Tokenizer, tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                err(
                    &vocab_path,
                    format!("special token `{tok}` is not in the vocabulary"),
                )
            })
        };
        let (bos_id, eos_id) = (id(&inner, &bos)?, id(&inner, &eos)?);
        inner
            .add_special_tokens([
                AddedToken::from(bos.clone(), true),
                AddedToken::from(eos.clone(), true),
                AddedToken::from(unk.clone(), true),
                AddedToken::from(pad.clone(), true),
            ])
            .map_err(|e| err(dir, e))?;
        let pad_id = id(&inner, &pad)?;
        // A tokenizer.json may carry its own truncation and padding: the raw ids must have neither
        // (BOS/EOS are left out by encoding without special tokens).
        let mut raw = inner.clone();
        raw.with_truncation(None).map_err(|e| err(dir, e))?;
        raw.with_padding(None);
        let processor = TemplateProcessing::builder()
            .try_single(format!("{bos} $A {eos}"))
            .map_err(|e| err(dir, e))?
            .special_tokens(vec![(bos.clone(), bos_id), (eos.clone(), eos_id)])
            .build()
            .map_err(|e| err(dir, e))?;
        inner.with_post_processor(Some(processor));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| err(dir, e))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        Ok(Self {
            inner,
            raw,
            max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn encode(&self, text: &str) -> Result<Tokens, tokenizers::Error> {
        let enc = self.inner.encode(text, true)?;
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            truncated: !enc.get_overflowing().is_empty(),
        })
    }

    /// compel 2.5.1's `_chunk_and_pad_token_ids` with `SplitLongTextMode.BRUTAL`: the prompt's ids
    /// (no truncation) cut every `max_length - 2` ids (75 = 77 minus BOS and EOS), each piece wrapped in
    /// BOS … EOS and padded with this tokenizer's pad id to `max_length`. An empty prompt is one chunk
    /// (`[BOS, EOS, pad…]`, what [`ClipTokenizer::encode`] gives for ""), and a prompt of exactly 75 ids
    /// is one chunk, as in compel. At most `max_chunks` chunks are kept (the caller's bound).
    pub fn encode_chunks(
        &self,
        text: &str,
        max_chunks: usize,
    ) -> Result<Chunks, tokenizers::Error> {
        let enc = self.raw.encode(text, false)?;
        let ids = enc.get_ids();
        let body = self.max_length.saturating_sub(2).max(1);
        let max_chunks = max_chunks.max(1);
        let needed = ids.len().div_ceil(body).max(1);
        let chunks = (0..needed.min(max_chunks))
            .map(|c| {
                let piece = &ids[(c * body).min(ids.len())..((c + 1) * body).min(ids.len())];
                self.chunk_of(piece)
            })
            .collect();
        Ok(Chunks {
            chunks,
            truncated: needed > max_chunks,
        })
    }

    /// A1111's `tokenize_line` (`modules/sd_hijack_clip.py`) without its comma back-tracking (which
    /// compel's BRUTAL split and [`ClipTokenizer::encode_chunks`] do not do either): each text piece
    /// tokenized on its own, its ids appended with its weight; a chunk closes when it holds
    /// `max_length - 2` ids and another one comes, and at every [`Piece::Break`] (even an empty one,
    /// as A1111 does); at the end the open chunk closes if it has ids or is the only one. Chunks are
    /// wrapped and padded as in [`ClipTokenizer::encode_chunks`], which this equals for one text of
    /// weight 1. At most `max_chunks` are kept.
    pub fn encode_weighted_chunks(
        &self,
        pieces: &[Piece],
        max_chunks: usize,
    ) -> Result<WeightedChunks, tokenizers::Error> {
        let body = self.max_length.saturating_sub(2).max(1);
        let mut closed: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
        let mut open: (Vec<u32>, Vec<f32>) = (Vec::new(), Vec::new());
        for piece in pieces {
            match piece {
                Piece::Break => closed.push(std::mem::take(&mut open)),
                Piece::Text { text, weight } => {
                    let enc = self.raw.encode(text.as_str(), false)?;
                    for &id in enc.get_ids() {
                        if open.0.len() == body {
                            closed.push(std::mem::take(&mut open));
                        }
                        open.0.push(id);
                        open.1.push(*weight as f32);
                    }
                }
            }
        }
        if !open.0.is_empty() || closed.is_empty() {
            closed.push(open);
        }
        let max_chunks = max_chunks.max(1);
        let truncated = closed.len() > max_chunks;
        closed.truncate(max_chunks);
        let (chunks, weights) = closed
            .into_iter()
            .map(|(ids, w)| {
                let mut weights = Vec::with_capacity(self.max_length);
                weights.push(1.0);
                weights.extend(w);
                weights.resize(self.max_length, 1.0);
                (self.chunk_of(&ids), weights)
            })
            .unzip();
        Ok(WeightedChunks {
            chunks: Chunks { chunks, truncated },
            weights,
        })
    }

    /// The chunk of the empty prompt: compel's `empty_z` tokens, which pad shorter conditionings.
    pub fn empty_chunk(&self) -> Vec<u32> {
        self.chunk_of(&[])
    }

    fn chunk_of(&self, piece: &[u32]) -> Vec<u32> {
        let mut chunk = Vec::with_capacity(self.max_length);
        chunk.push(self.bos_id);
        chunk.extend_from_slice(piece);
        chunk.push(self.eos_id);
        chunk.resize(self.max_length, self.pad_id);
        chunk
    }
}

/// The tokenizer transformers 5's `CLIPTokenizer.__init__` assembles from vocab.json + merges.txt.
fn build_clip_bpe(dir: &Path, unk: &str) -> Result<Tokenizer, TokenizerError> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(err(f, "missing (and no tokenizer.json in the folder)"));
        }
    }
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .end_of_word_suffix("</w>".into())
        .unk_token(unk.into())
        .build()
        .map_err(|e| err(&merges, e))?;
    let mut tok = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| err(dir, e))?;
    tok.with_normalizer(Some(NormSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])))
    .map_err(|e| err(dir, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| err(dir, e))?;
    tok.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(tok)
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(path, e)),
    }
}

/// A special token written either as a string or as an AddedToken object (`{"content": "!", ...}`).
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}
