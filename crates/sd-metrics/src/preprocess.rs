//! Images to the Inception's input, exactly as each reference package prepares them. The two
//! differ, and FID moves with the difference, so both are here:
//!
//! - pytorch-fid ([`Preprocess::PytorchFid`]): `ToTensor` (`u8 / 255` in f32), PyTorch's
//!   bilinear `interpolate` to 299² (`align_corners=False`, no antialiasing: source
//!   `(dst + ½)·scale − ½`, clamped at 0), then `2x − 1`.
//! - torch-fidelity ([`Preprocess::TorchFidelity`]): the `u8` values as f32, its
//!   TensorFlow-1-style bilinear resize (source `dst·scale`, no half-pixel offset), then
//!   `(x − 128) / 128`.
//! - clean-fid ([`Preprocess::CleanFid`], Parmar et al. 2022, "On aliased resizing and
//!   surprising subtleties in GAN evaluation"): each channel as a float image resized by PIL's
//!   antialiased bicubic filter ([`pil_bicubic`]), clipped to `[0, 255]`, then
//!   `(x − 128) / 128` as its TensorFlow Inception does.
//!
//! Both resizes are written out here rather than taken from Burn: their sample positions and
//! f32 rounding are what parity hangs on.

use crate::inception::INPUT_SIZE;
use sd_conditioner::image_processor::pil_coefficients;
pub use sd_conditioner::image_processor::{
    CLIP_MEAN, CLIP_SIZE, CLIP_STD, clip_crop, clip_input, pil_bicubic_rgb8,
};

/// Which package's input preparation to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// pytorch-fid's: the FID everyone quotes.
    PytorchFid,
    /// torch-fidelity's: its KID and Inception Score.
    TorchFidelity,
    /// clean-fid's `clean` mode: PIL's antialiased bicubic resize in float.
    CleanFid,
}

/// `Image.fromarray(channel, mode="F").resize((to_w, to_h), Image.BICUBIC)`: Pillow's
/// separable resampling of a float image, the horizontal pass first, each pass summing in f64
/// and storing f32, a pass skipped when its side does not change.
pub fn pil_bicubic(
    channel: &[f32],
    width: usize,
    height: usize,
    to_w: usize,
    to_h: usize,
) -> Vec<f32> {
    let mut image = channel.to_vec();
    let mut w = width;
    if to_w != width {
        let coefficients = pil_coefficients(width, to_w);
        let mut out = vec![0.0f32; to_w * height];
        for y in 0..height {
            let row = &image[y * width..(y + 1) * width];
            for (xx, (xmin, k)) in coefficients.iter().enumerate() {
                let mut ss = 0.0f64;
                for (i, w) in k.iter().enumerate() {
                    ss += row[xmin + i] as f64 * w;
                }
                out[y * to_w + xx] = ss as f32;
            }
        }
        image = out;
        w = to_w;
    }
    if to_h != height {
        let coefficients = pil_coefficients(height, to_h);
        let mut out = vec![0.0f32; w * to_h];
        for (yy, (ymin, k)) in coefficients.iter().enumerate() {
            for x in 0..w {
                let mut ss = 0.0f64;
                for (i, weight) in k.iter().enumerate() {
                    ss += image[(ymin + i) * w + x] as f64 * weight;
                }
                out[yy * w + x] = ss as f32;
            }
        }
        image = out;
    }
    image
}

/// Sample positions and weights of a 1-D linear resize from `from` to `to` samples.
struct Taps {
    low: Vec<usize>,
    high: Vec<usize>,
    weight_high: Vec<f32>,
}

impl Taps {
    /// PyTorch's `area_pixel_compute_source_index` for `align_corners=False`.
    fn pytorch(from: usize, to: usize) -> Self {
        let scale = from as f32 / to as f32;
        Self::from_positions(
            from,
            (0..to).map(|d| (scale * (d as f32 + 0.5) - 0.5).max(0.0)),
        )
    }

    /// torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (`align_corners=False`):
    /// `arange(to) · scale` in f32.
    fn tensorflow1(from: usize, to: usize) -> Self {
        let scale = (from as f64 / to as f64) as f32;
        Self::from_positions(from, (0..to).map(|d| d as f32 * scale))
    }

    fn from_positions(from: usize, positions: impl Iterator<Item = f32>) -> Self {
        let (mut low, mut high, mut weight_high) = (Vec::new(), Vec::new(), Vec::new());
        for p in positions {
            let l = (p as usize).min(from - 1);
            low.push(l);
            high.push((l + 1).min(from - 1));
            weight_high.push(p - l as f32);
        }
        Self {
            low,
            high,
            weight_high,
        }
    }
}

/// `rgb` (`height × width × 3` bytes, row-major) as the Inception's input: `3 × 299 × 299`
/// values, channel-major.
pub fn inception_input(rgb: &[u8], width: usize, height: usize, how: Preprocess) -> Vec<f32> {
    let n = INPUT_SIZE;
    let mut out = vec![0.0f32; 3 * n * n];
    match how {
        Preprocess::PytorchFid => {
            let (ty, tx) = (Taps::pytorch(height, n), Taps::pytorch(width, n));
            for c in 0..3 {
                let at = |y: usize, x: usize| rgb[(y * width + x) * 3 + c] as f32 / 255.0;
                for oy in 0..n {
                    let (y0, y1, h1) = (ty.low[oy], ty.high[oy], ty.weight_high[oy]);
                    let h0 = 1.0 - h1;
                    for ox in 0..n {
                        let (x0, x1, w1) = (tx.low[ox], tx.high[ox], tx.weight_high[ox]);
                        let w0 = 1.0 - w1;
                        let v = h0 * (w0 * at(y0, x0) + w1 * at(y0, x1))
                            + h1 * (w0 * at(y1, x0) + w1 * at(y1, x1));
                        out[(c * n + oy) * n + ox] = 2.0 * v - 1.0;
                    }
                }
            }
        }
        Preprocess::TorchFidelity => {
            let (ty, tx) = (Taps::tensorflow1(height, n), Taps::tensorflow1(width, n));
            for c in 0..3 {
                let at = |y: usize, x: usize| rgb[(y * width + x) * 3 + c] as f32;
                for oy in 0..n {
                    let (y0, y1, dy) = (ty.low[oy], ty.high[oy], ty.weight_high[oy]);
                    for ox in 0..n {
                        let (x0, x1, dx) = (tx.low[ox], tx.high[ox], tx.weight_high[ox]);
                        let top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * dx;
                        let bottom = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * dx;
                        let v = top + (bottom - top) * dy;
                        out[(c * n + oy) * n + ox] = (v - 128.0) / 128.0;
                    }
                }
            }
        }
        Preprocess::CleanFid => {
            for c in 0..3 {
                let channel: Vec<f32> =
                    (0..width * height).map(|i| rgb[i * 3 + c] as f32).collect();
                let resized = pil_bicubic(&channel, width, height, n, n);
                for (i, v) in resized.into_iter().enumerate() {
                    out[c * n * n + i] = (v.clamp(0.0, 255.0) - 128.0) / 128.0;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_of_the_input_size_is_only_rescaled() {
        let n = INPUT_SIZE;
        let rgb: Vec<u8> = (0..n * n * 3).map(|i| (i * 7 % 256) as u8).collect();
        let fid = inception_input(&rgb, n, n, Preprocess::PytorchFid);
        let fidelity = inception_input(&rgb, n, n, Preprocess::TorchFidelity);
        for (i, px) in [0usize, 5, n * n * 3 - 1].into_iter().enumerate() {
            let (y, x, c) = (px / 3 / n, px / 3 % n, px % 3);
            let v = rgb[px] as f32;
            let at = (c * n + y) * n + x;
            assert_eq!(fid[at], 2.0 * (v / 255.0) - 1.0, "{i}");
            assert_eq!(fidelity[at], (v - 128.0) / 128.0, "{i}");
        }
    }

    #[test]
    fn upscaling_samples_where_pytorch_does() {
        // 2 → 4 with align_corners=False: positions (d + ½)/2 − ½ = −¼ (clamped to 0), ¼, ¾, 1¼
        // (past the last sample: both taps on it).
        let taps = Taps::pytorch(2, 4);
        assert_eq!(taps.low, [0, 0, 0, 1]);
        assert_eq!(taps.high, [1, 1, 1, 1]);
        assert_eq!(taps.weight_high, [0.0, 0.25, 0.75, 0.25]);
        // TensorFlow 1: d · ½.
        let taps = Taps::tensorflow1(2, 4);
        assert_eq!(taps.low, [0, 0, 1, 1]);
        assert_eq!(taps.weight_high, [0.0, 0.5, 0.0, 0.5]);
    }
}
