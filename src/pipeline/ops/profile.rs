//! A per-op profile of renders (`t2i bench --profile`, or `T2I_PROFILE=1` for any subcommand that
//! renders): wall time and calls per op category and pipeline phase. Off by default, and then an op
//! pays one relaxed atomic load.
//!
//! When on, every op synchronises its device before and after it runs (candle's CUDA and Metal ops
//! are asynchronous), so each op's time is its own and not the queue's before it. That serialises
//! the device: a profiled render is slower than an unprofiled one, and its op times add up to
//! less than the phase time (the rest, reported as "other", is candle's element-wise ops, layer
//! norms, resizes and concatenations between the ops, plus the synchronisation itself).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;

/// The op categories of [`super`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Conv2d,
    Linear,
    GroupNorm,
    Geglu,
    Attention,
    /// A per-channel bias or residual added between ops (a residual fused into a convolution
    /// counts as the convolution).
    Add,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Self::Conv2d,
        Self::Linear,
        Self::GroupNorm,
        Self::Geglu,
        Self::Attention,
        Self::Add,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Conv2d => "conv2d",
            Self::Linear => "linear",
            Self::GroupNorm => "group_norm",
            Self::Geglu => "geglu",
            Self::Attention => "attention",
            Self::Add => "add",
        }
    }
}

/// The phases of a render the ops are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    TextEncode,
    Denoise,
    VaeDecode,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Self::TextEncode, Self::Denoise, Self::VaeDecode];

    pub fn name(self) -> &'static str {
        match self {
            Self::TextEncode => "text_encode",
            Self::Denoise => "denoise",
            Self::VaeDecode => "vae_decode",
        }
    }
}

/// Time and calls of one op in one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTotal {
    pub time: Duration,
    pub calls: u64,
}

/// Totals by phase, then op, in the order of [`Phase::ALL`] and [`Op::ALL`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile(pub [[OpTotal; 6]; 3]);

impl Profile {
    pub fn get(&self, phase: Phase, op: Op) -> OpTotal {
        self.0[phase as usize][op as usize]
    }

    /// Everything the ops took in `phase`.
    pub fn phase_total(&self, phase: Phase) -> Duration {
        self.0[phase as usize].iter().map(|t| t.time).sum()
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The phase ops are counted in now (a render runs on one thread; ops do not nest phases).
static CURRENT: AtomicUsize = AtomicUsize::new(Phase::TextEncode as usize);
static TOTALS: Mutex<[[OpTotal; 6]; 3]> = Mutex::new(
    [[OpTotal {
        time: Duration::ZERO,
        calls: 0,
    }; 6]; 3],
);

/// Turns profiling on or off for the process; `T2I_PROFILE=1` turns it on at the first render.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Reads `T2I_PROFILE` (`1`, `true`, `yes`, `on`); called once when a pipeline loads.
pub fn enable_from_env() {
    let on = std::env::var("T2I_PROFILE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false);
    if on {
        set_enabled(true);
    }
}

/// Totals so far, and zero them.
pub fn take() -> Profile {
    let mut t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    Profile(std::mem::take(&mut *t))
}

/// Counts the ops run until the guard drops in `phase`.
pub fn phase(phase: Phase) -> PhaseGuard {
    let previous = CURRENT.swap(phase as usize, Ordering::Relaxed);
    PhaseGuard(previous)
}

pub struct PhaseGuard(usize);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        CURRENT.store(self.0, Ordering::Relaxed);
    }
}

/// A running op, timed when profiling is on.
pub(super) struct Span {
    op: Op,
    device: Device,
    start: Instant,
}

/// Starts timing `op` on `device` (after the device has finished what was queued before it).
pub(super) fn span(op: Op, device: &Device) -> Option<Span> {
    if !is_enabled() {
        return None;
    }
    let _ = device.synchronize();
    Some(Span {
        op,
        device: device.clone(),
        start: Instant::now(),
    })
}

impl Drop for Span {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        let time = self.start.elapsed();
        let phase = CURRENT.load(Ordering::Relaxed).min(Phase::ALL.len() - 1);
        let mut t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut t[phase][self.op as usize];
        slot.time += time;
        slot.calls += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_count_in_the_current_phase_only_when_enabled() {
        let dev = Device::Cpu;
        let _ = take();
        assert!(span(Op::Conv2d, &dev).is_none(), "off by default");
        set_enabled(true);
        {
            let _p = phase(Phase::VaeDecode);
            drop(span(Op::Conv2d, &dev));
            drop(span(Op::Conv2d, &dev));
            let _p = phase(Phase::Denoise);
            drop(span(Op::Attention, &dev));
        }
        set_enabled(false);
        // Other tests' ops may run while this one has profiling on: at least ours are counted.
        let p = take();
        assert!(p.get(Phase::VaeDecode, Op::Conv2d).calls >= 2);
        assert!(p.get(Phase::Denoise, Op::Attention).calls >= 1);
        assert!(p.phase_total(Phase::VaeDecode) > Duration::ZERO);
    }
}
