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

/// PIL's bicubic kernel (Keys 1981 with `a = −½`), `bicubic_filter` in Pillow's Resample.c.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs`: per output sample, the first input sample and the normalised
/// weights. Downscaling widens the kernel by the scale (that is the antialiasing).
fn pil_coefficients(from: usize, to: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = from as f64 / to as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..to)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's truncating casts, as Pillow rounds.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(from as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            (xmin, weights)
        })
        .collect()
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

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// `Image.resize((to_w, to_h), Image.BICUBIC)` on an 8-bit RGB image (interleaved): Pillow's
/// `ImagingResample` for 8 bits per channel. The weights become integers scaled by 2²² (rounded
/// away from zero), each pass sums from ½ in 32-bit integers and clips to `[0, 255]` into an
/// 8-bit image, the horizontal pass first, a pass skipped when its side does not change. This
/// differs from [`pil_bicubic`]'s float path by a level here and there, which moves CLIP
/// embeddings.
pub fn pil_bicubic_rgb8(
    rgb: &[u8],
    width: usize,
    height: usize,
    to_w: usize,
    to_h: usize,
) -> Vec<u8> {
    let fixed = |k: &[f64]| -> Vec<i32> {
        k.iter()
            .map(|&w| {
                let v = w * f64::from(1u32 << PRECISION_BITS);
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect()
    };
    let clip8 = |ss: i32| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
    let mut image = rgb.to_vec();
    let mut w = width;
    if to_w != width {
        let coefficients: Vec<(usize, Vec<i32>)> = pil_coefficients(width, to_w)
            .into_iter()
            .map(|(xmin, k)| (xmin, fixed(&k)))
            .collect();
        let mut out = vec![0u8; to_w * height * 3];
        for y in 0..height {
            let row = &image[y * width * 3..(y + 1) * width * 3];
            for (xx, (xmin, k)) in coefficients.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, weight) in k.iter().enumerate() {
                        ss += i32::from(row[(xmin + i) * 3 + c]) * weight;
                    }
                    out[(y * to_w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        image = out;
        w = to_w;
    }
    if to_h != height {
        let coefficients: Vec<(usize, Vec<i32>)> = pil_coefficients(height, to_h)
            .into_iter()
            .map(|(ymin, k)| (ymin, fixed(&k)))
            .collect();
        let mut out = vec![0u8; w * to_h * 3];
        for (yy, (ymin, k)) in coefficients.iter().enumerate() {
            for x in 0..w {
                for c in 0..3 {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, weight) in k.iter().enumerate() {
                        ss += i32::from(image[((ymin + i) * w + x) * 3 + c]) * weight;
                    }
                    out[(yy * w + x) * 3 + c] = clip8(ss);
                }
            }
        }
        image = out;
    }
    image
}

/// CLIP's input side (`CLIPImageProcessor`'s `crop_size`).
pub const CLIP_SIZE: usize = 224;
/// CLIP's per-channel mean (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// `CLIPImageProcessor`'s resize and crop (its PIL backend): the shortest side to 224 by
/// [`pil_bicubic_rgb8`] (the other `int(224 · long / short)`), then the centre 224² (offsets
/// `(side − 224) // 2`). Interleaved 8-bit RGB in and out.
pub fn clip_crop(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let (to_w, to_h) = if width <= height {
        (CLIP_SIZE, CLIP_SIZE * height / width)
    } else {
        (CLIP_SIZE * width / height, CLIP_SIZE)
    };
    let resized = pil_bicubic_rgb8(rgb, width, height, to_w, to_h);
    let (top, left) = ((to_h - CLIP_SIZE) / 2, (to_w - CLIP_SIZE) / 2);
    let mut out = Vec::with_capacity(CLIP_SIZE * CLIP_SIZE * 3);
    for y in top..top + CLIP_SIZE {
        out.extend_from_slice(&resized[(y * to_w + left) * 3..(y * to_w + left + CLIP_SIZE) * 3]);
    }
    out
}

/// A [`clip_crop`] as the vision tower's input: `[3, 224, 224]` channel-first, `v / 255` then
/// `(x − mean) / std` per channel, in f32 as the processor computes it.
pub fn clip_input(crop: &[u8]) -> Vec<f32> {
    let plane = CLIP_SIZE * CLIP_SIZE;
    let mut out = vec![0f32; 3 * plane];
    for (i, pixel) in crop.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = (f64::from(pixel[c]) * (1.0 / 255.0)) as f32;
            out[c * plane + i] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
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
