//! The sampler names a job may ask for (`scheduler`): part of the contract, so the wire names and
//! the labels written into image metadata live here. Which diffusers class each one reproduces is
//! the pipeline's business (`pipeline/scheduler/`).

/// A sampler name from the job contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Ddim,
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    Dpmpp2mKarras,
    /// PNDM's PLMS sampler (diffusers' default for SD 1.5).
    Pndm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        Self::Euler,
        Self::EulerAncestral,
        Self::Ddim,
        Self::Dpmpp2m,
        Self::Dpmpp2mKarras,
        Self::Pndm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_ancestral",
            Self::Ddim => "ddim",
            Self::Dpmpp2m => "dpmpp_2m",
            Self::Dpmpp2mKarras => "dpmpp_2m_karras",
            Self::Pndm => "pndm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The sampler label A1111/ComfyUI-style `parameters` text uses ("Sampler: Euler a").
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::Ddim => "DDIM",
            Self::Dpmpp2m => "DPM++ 2M",
            Self::Dpmpp2mKarras => "DPM++ 2M Karras",
            // A1111's name for the same sampler (its `sd_samplers_compvis`: "PLMS").
            Self::Pndm => "PLMS",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
