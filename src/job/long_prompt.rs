//! How a job's prompts longer than the text encoders' context (77 tokens) are encoded: the
//! `long_prompt` field of the contract. What each mode computes is the pipeline's business
//! (`pipeline/prompt.rs`, docs/model-notes.md §2).

/// A `long_prompt` value from the job contract.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LongPrompt {
    /// Every 75 tokens in a chunk of their own, the chunks' states concatenated (compel's
    /// `truncate_long_prompts=False`, A1111's convention); the negative prompt padded to as many
    /// chunks. A prompt of at most 75 tokens is encoded exactly as diffusers does.
    #[default]
    Chunk,
    /// Cut at 77 tokens, as diffusers' pipelines do (bit-for-bit diffusers parity on long prompts).
    Truncate,
}

impl LongPrompt {
    pub const ALL: [LongPrompt; 2] = [Self::Chunk, Self::Truncate];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chunk => "chunk",
            Self::Truncate => "truncate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for LongPrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
