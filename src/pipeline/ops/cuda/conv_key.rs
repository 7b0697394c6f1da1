//! What a cached cuDNN convolution plan is keyed on (`conv.rs`): everything that shapes its
//! descriptors and so its algorithm choice and workspace size — input and filter dims, padding,
//! stride, dilation and dtype. Bias and residual do not change the descriptors (they are applied
//! per call), so they are not in the key. Plain numbers, so it is tested without a GPU.

use candle_core::DType;
use candle_nn::Conv2dConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvKey {
    /// Input `(N, C, H, W)`.
    pub x: [i32; 4],
    /// Filter `(K, C, R, S)`.
    pub w: [i32; 4],
    pub pad: i32,
    pub stride: i32,
    pub dilation: i32,
    pub dtype: DType,
}

impl ConvKey {
    /// The key of convolving `x` `(N, C, H, W)` with `w` `(K, C, R, S)`; `None` when cuDNN's
    /// legacy API cannot take it as one call: grouped, channel counts that disagree, dims over
    /// `i32`, a non-float dtype, or an empty output.
    pub fn new(
        x: (usize, usize, usize, usize),
        w: (usize, usize, usize, usize),
        cfg: &Conv2dConfig,
        dtype: DType,
    ) -> Option<ConvKey> {
        if cfg.groups != 1 || x.1 != w.1 || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        {
            return None;
        }
        let int = |v: usize| i32::try_from(v).ok().filter(|&v| v > 0);
        let key = ConvKey {
            x: [int(x.0)?, int(x.1)?, int(x.2)?, int(x.3)?],
            w: [int(w.0)?, int(w.1)?, int(w.2)?, int(w.3)?],
            pad: i32::try_from(cfg.padding).ok()?,
            stride: int(cfg.stride)?,
            dilation: int(cfg.dilation)?,
            dtype,
        };
        let (n, k, oh, ow) = key.out_dims()?;
        // cuDNN indexes with 32-bit integers in places: keep every tensor under 2³¹ elements.
        let fits = [x.0 * x.1 * x.2 * x.3, n * k * oh * ow]
            .iter()
            .all(|&e| e < 1 << 31);
        fits.then_some(key)
    }

    /// The output `(N, K, H', W')`, as candle's `ParamsConv2D::out_dims` computes it; `None` when
    /// the filter does not fit the padded input.
    pub fn out_dims(&self) -> Option<(usize, usize, usize, usize)> {
        let out = |i: i32, k: i32| {
            let span = self.dilation * (k - 1) + 1;
            let padded = i + 2 * self.pad;
            (padded >= span).then(|| ((padded - span) / self.stride + 1) as usize)
        };
        Some((
            self.x[0] as usize,
            self.w[0] as usize,
            out(self.x[2], self.w[2])?,
            out(self.x[3], self.w[3])?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn cfg(padding: usize, stride: usize) -> Conv2dConfig {
        Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        }
    }

    #[test]
    fn output_dims_match_candles_convolution() {
        let dev = Device::Cpu;
        // 3×3 same, stride 2 (the UNet's downsamplers), 1×1, unpadded, odd sizes, dilation 2.
        let cases = [
            ((2, 3, 9, 9), (4, 3, 3, 3), cfg(1, 1), 1),
            ((1, 3, 9, 8), (2, 3, 3, 3), cfg(1, 2), 1),
            ((2, 5, 7, 6), (3, 5, 1, 1), cfg(0, 1), 1),
            ((1, 2, 8, 8), (2, 2, 3, 3), cfg(0, 1), 1),
            ((1, 2, 11, 10), (2, 2, 3, 3), cfg(2, 3), 2),
        ];
        for (x, w, mut c, dilation) in cases {
            c.dilation = dilation;
            let key = ConvKey::new(x, w, &c, DType::F32).unwrap();
            let xt = Tensor::zeros(x, DType::F32, &dev).unwrap();
            let wt = Tensor::zeros(w, DType::F32, &dev).unwrap();
            let y = xt
                .conv2d(&wt, c.padding, c.stride, c.dilation, c.groups)
                .unwrap();
            assert_eq!(
                key.out_dims().unwrap(),
                y.dims4().unwrap(),
                "{x:?} {w:?} {c:?}"
            );
        }
    }

    #[test]
    fn every_descriptor_input_is_in_the_key() {
        let base = ConvKey::new(
            (2, 320, 128, 128),
            (320, 320, 3, 3),
            &cfg(1, 1),
            DType::BF16,
        );
        let base = base.unwrap();
        let variants = [
            ConvKey::new(
                (4, 320, 128, 128),
                (320, 320, 3, 3),
                &cfg(1, 1),
                DType::BF16,
            ),
            ConvKey::new((2, 320, 64, 128), (320, 320, 3, 3), &cfg(1, 1), DType::BF16),
            ConvKey::new(
                (2, 320, 128, 128),
                (640, 320, 3, 3),
                &cfg(1, 1),
                DType::BF16,
            ),
            ConvKey::new(
                (2, 320, 128, 128),
                (320, 320, 1, 1),
                &cfg(0, 1),
                DType::BF16,
            ),
            ConvKey::new(
                (2, 320, 128, 128),
                (320, 320, 3, 3),
                &cfg(1, 2),
                DType::BF16,
            ),
            ConvKey::new(
                (2, 320, 128, 128),
                (320, 320, 3, 3),
                &cfg(0, 1),
                DType::BF16,
            ),
            ConvKey::new((2, 320, 128, 128), (320, 320, 3, 3), &cfg(1, 1), DType::F16),
        ];
        let mut seen = std::collections::HashSet::from([base]);
        for v in variants {
            assert!(seen.insert(v.unwrap()), "{v:?} collides");
        }
        let again = ConvKey::new(
            (2, 320, 128, 128),
            (320, 320, 3, 3),
            &cfg(1, 1),
            DType::BF16,
        );
        assert_eq!(again, Some(base));
    }

    #[test]
    fn what_one_legacy_call_cannot_take_has_no_key() {
        let x = (1, 4, 8, 8);
        let grouped = Conv2dConfig {
            groups: 2,
            ..cfg(1, 1)
        };
        assert!(ConvKey::new(x, (4, 2, 3, 3), &grouped, DType::F32).is_none());
        assert!(ConvKey::new(x, (4, 3, 3, 3), &cfg(1, 1), DType::F32).is_none());
        assert!(ConvKey::new(x, (4, 4, 3, 3), &cfg(1, 1), DType::U8).is_none());
        assert!(ConvKey::new(x, (4, 4, 11, 11), &cfg(0, 1), DType::F32).is_none());
        assert!(ConvKey::new((1, 4, 1 << 31, 1), (4, 4, 1, 1), &cfg(0, 1), DType::F32).is_none());
        assert!(
            ConvKey::new(
                (64, 512, 1024, 1024),
                (512, 512, 3, 3),
                &cfg(1, 1),
                DType::BF16
            )
            .is_none()
        );
    }
}
