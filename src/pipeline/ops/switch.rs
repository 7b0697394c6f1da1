//! Which of the ops layer's own CUDA kernels are on: `--cuda-kernels` / `T2I_CUDA_KERNELS`, a
//! comma-separated list of [`Kernel`] names (`all` for every kernel this binary was built with,
//! `none` or empty for none). The default is none: every op runs candle's proven path until a
//! device measurement shows a kernel correct and faster (docs/gpu.md). The switches only ever
//! change what runs on a CUDA device; the CPU path never reads them.
//!
//! The setting is process-wide: a process renders with one model, and [`set`] is called when it
//! loads (`ModelConfig::load`). The ops ([`super`]) are the only readers.

use std::sync::atomic::{AtomicU8, Ordering};

/// One switchable kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Two-pass GroupNorm (+ SiLU) with f32 statistics ([`super::group_norm`]).
    GroupNorm,
    /// GEGLU in one pass, exact erf ([`super::geglu`]).
    Geglu,
    /// Per-channel / per-feature bias adds of linear layers, convolutions (when the convolution is
    /// candle's) and the resnets' time embedding.
    Bias,
    /// Residual adds: contiguous, and the Transformer2D tokens folded back onto the image.
    Residual,
    /// The project's own cuDNN convolution: tensor-op math, algorithm cached per shape, bias (and
    /// residual) fused where cuDNN allows.
    Conv,
    /// FlashAttention (candle-flash-attn) for the head dims it was built for, half dtypes, no mask.
    Attn,
}

impl Kernel {
    pub const ALL: [Kernel; 6] = [
        Self::GroupNorm,
        Self::Geglu,
        Self::Bias,
        Self::Residual,
        Self::Conv,
        Self::Attn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::GroupNorm => "groupnorm",
            Self::Geglu => "geglu",
            Self::Bias => "bias",
            Self::Residual => "residual",
            Self::Conv => "conv",
            Self::Attn => "attn",
        }
    }

    /// The cargo feature a binary needs for this kernel.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Conv => "cudnn",
            Self::Attn => "flash-attn",
            _ => "cuda",
        }
    }

    /// Whether this binary was built with the kernel.
    pub fn built(self) -> bool {
        match self {
            Self::Conv => cfg!(feature = "cudnn"),
            Self::Attn => cfg!(feature = "flash-attn"),
            _ => cfg!(feature = "cuda"),
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`Kernel`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kernels(u8);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwitchError {
    #[error("cuda kernels: unknown kernel `{0}` (expected a comma-separated list of {names}, or all or none)", names = names_list())]
    Unknown(String),
    #[error(
        "cuda kernels: `{kernel}` needs a binary built with the `{feature}` cargo feature (this one was not)"
    )]
    NotBuilt {
        kernel: &'static str,
        feature: &'static str,
    },
}

fn names_list() -> String {
    Kernel::ALL.map(Kernel::name).join(", ")
}

impl Kernels {
    pub const NONE: Kernels = Kernels(0);

    /// Every kernel this binary was built with.
    pub fn built() -> Kernels {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.built())
            .fold(Kernels::NONE, Kernels::with)
    }

    pub fn with(self, k: Kernel) -> Kernels {
        Kernels(self.0 | k.bit())
    }

    pub fn contains(self, k: Kernel) -> bool {
        self.0 & k.bit() != 0
    }

    /// Parses `--cuda-kernels`: names separated by commas (spaces and case ignored), `all`, `none`
    /// or nothing. A kernel this binary was not built with is an error, so a measurement never
    /// silently runs the path it meant to replace.
    pub fn parse(spec: &str) -> Result<Kernels, SwitchError> {
        let mut set = Kernels::NONE;
        let mut named = Vec::new();
        for name in spec.split(',').map(|s| s.trim().to_ascii_lowercase()) {
            match name.as_str() {
                "" | "none" => {}
                "all" => set = Kernels(set.0 | Kernels::built().0),
                _ => named.push(
                    Kernel::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or(SwitchError::Unknown(name))?,
                ),
            }
        }
        // Every name is known before any is refused for the build.
        for k in named {
            if !k.built() {
                return Err(SwitchError::NotBuilt {
                    kernel: k.name(),
                    feature: k.feature(),
                });
            }
            set = set.with(k);
        }
        Ok(set)
    }

    /// The names of the kernels in the set, comma-separated (`none` for the empty set).
    pub fn names(self) -> String {
        let on: Vec<_> = Kernel::ALL
            .into_iter()
            .filter(|&k| self.contains(k))
            .map(Kernel::name)
            .collect();
        if on.is_empty() {
            "none".into()
        } else {
            on.join(",")
        }
    }
}

static ON: AtomicU8 = AtomicU8::new(0);

/// Turns the kernels of `set` on for the process, and every other one off.
pub fn set(set: Kernels) {
    ON.store(set.0, Ordering::Relaxed);
}

/// The kernels on now.
pub fn current() -> Kernels {
    Kernels(ON.load(Ordering::Relaxed))
}

/// Whether `k` is on.
pub(crate) fn on(k: Kernel) -> bool {
    current().contains(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_in_any_case_and_order() {
        // Kernels every build has when it has CUDA at all; without it, each one is refused.
        let spec = " GroupNorm ,geglu,, residual ";
        if cfg!(feature = "cuda") {
            let set = Kernels::parse(spec).unwrap();
            assert_eq!(set.names(), "groupnorm,geglu,residual");
            assert!(set.contains(Kernel::Geglu) && !set.contains(Kernel::Bias));
        } else {
            assert_eq!(
                Kernels::parse(spec),
                Err(SwitchError::NotBuilt {
                    kernel: "groupnorm",
                    feature: "cuda"
                })
            );
        }
    }

    #[test]
    fn empty_none_and_all() {
        assert_eq!(Kernels::parse("").unwrap(), Kernels::NONE);
        assert_eq!(Kernels::parse("none").unwrap(), Kernels::NONE);
        assert_eq!(Kernels::NONE.names(), "none");
        let all = Kernels::parse("all").unwrap();
        assert_eq!(all, Kernels::built());
        for k in Kernel::ALL {
            assert_eq!(all.contains(k), k.built(), "{}", k.name());
        }
    }

    #[test]
    fn unknown_names_are_refused_with_the_list() {
        let e = Kernels::parse("groupnorm,flash").unwrap_err();
        assert_eq!(e, SwitchError::Unknown("flash".into()));
        let text = e.to_string();
        for k in Kernel::ALL {
            assert!(text.contains(k.name()), "{text}");
        }
    }

    #[test]
    fn kernels_missing_from_the_build_name_their_feature() {
        for k in Kernel::ALL.into_iter().filter(|k| !k.built()) {
            let e = Kernels::parse(k.name()).unwrap_err();
            assert!(e.to_string().contains(k.feature()), "{e}");
        }
    }

    #[test]
    fn names_round_trip() {
        for bits in 0..(1u8 << Kernel::ALL.len()) {
            let set = Kernels(bits);
            let names = set.names();
            // Round trip through the names wherever every member is built into this binary.
            if Kernel::ALL
                .into_iter()
                .all(|k| !set.contains(k) || k.built())
            {
                assert_eq!(Kernels::parse(&names).unwrap(), set, "{names}");
            }
        }
    }
}
