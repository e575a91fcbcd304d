//! CLIP's image processor (transformers' `CLIPImageProcessor` on its PIL path): the shortest
//! side resized to 224 by Pillow's 8-bit bicubic, the centre 224² cropped, then normalised by
//! CLIP's mean and standard deviation. Shared by what embeds images with the vision tower: the
//! CLIP score (sd-metrics) and IP-Adapter image prompts (sd).
//!
//! Pillow's resampling is written out here rather than taken from an image crate: its
//! fixed-point rounding moves CLIP embeddings, and parity hangs on it.

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
pub fn pil_coefficients(from: usize, to: usize) -> Vec<(usize, Vec<f64>)> {
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

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Whose 8-bit bicubic resize to reproduce: the two agree on the kernel, the sample positions
/// and the order of the passes, and differ in the fixed-point precision of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampler {
    /// Pillow's `ImagingResample`: weights scaled by 2²² (transformers' `CLIPImageProcessorPil`,
    /// torchmetrics' CLIP score).
    Pillow,
    /// PyTorch's antialiased `interpolate` on `uint8` (torchvision's `resize`, what
    /// transformers 5's default `CLIPImageProcessor` and so diffusers' IP-Adapter use): the
    /// weights in int16, at the largest precision (at most 22 bits) that keeps the largest
    /// weight of the pass below 2¹⁵ (`_compute_index_ranges_int16_weights`).
    Torchvision,
}

impl Resampler {
    fn precision(self, coefficients: &[(usize, Vec<f64>)]) -> u32 {
        match self {
            Self::Pillow => PRECISION_BITS,
            Self::Torchvision => {
                let w_max = coefficients
                    .iter()
                    .flat_map(|(_, k)| k.iter().copied())
                    .fold(0.0f64, f64::max);
                (0..22)
                    .find(|p| (0.5 + w_max * f64::from(1u32 << (p + 1))) as i32 >= 1 << 15)
                    .unwrap_or(22)
            }
        }
    }
}

/// `Image.resize((to_w, to_h), Image.BICUBIC)` on an 8-bit RGB image (interleaved): Pillow's
/// `ImagingResample` for 8 bits per channel ([`bicubic_rgb8`] with [`Resampler::Pillow`]).
pub fn pil_bicubic_rgb8(
    rgb: &[u8],
    width: usize,
    height: usize,
    to_w: usize,
    to_h: usize,
) -> Vec<u8> {
    bicubic_rgb8(rgb, width, height, to_w, to_h, Resampler::Pillow)
}

/// An antialiased 8-bit bicubic resize of an RGB image (interleaved) as `resampler` computes
/// it: the weights become integers scaled by 2^precision (rounded away from zero), each pass
/// sums from ½ in 32-bit integers and clips to `[0, 255]` into an 8-bit image, the horizontal
/// pass first, a pass skipped when its side does not change. This differs from
/// [`pil_coefficients`]' float path by a level here and there, which moves CLIP embeddings.
pub fn bicubic_rgb8(
    rgb: &[u8],
    width: usize,
    height: usize,
    to_w: usize,
    to_h: usize,
    resampler: Resampler,
) -> Vec<u8> {
    let fixed = |coefficients: Vec<(usize, Vec<f64>)>| -> (u32, Vec<(usize, Vec<i32>)>) {
        let precision = resampler.precision(&coefficients);
        let scaled = coefficients
            .into_iter()
            .map(|(first, k)| {
                let k = k
                    .iter()
                    .map(|&w| {
                        let v = w * f64::from(1u32 << precision);
                        (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                    })
                    .collect();
                (first, k)
            })
            .collect();
        (precision, scaled)
    };
    let clip8 = |ss: i32, precision: u32| (ss >> precision).clamp(0, 255) as u8;
    let mut image = rgb.to_vec();
    let mut w = width;
    if to_w != width {
        let (precision, coefficients) = fixed(pil_coefficients(width, to_w));
        let mut out = vec![0u8; to_w * height * 3];
        for y in 0..height {
            let row = &image[y * width * 3..(y + 1) * width * 3];
            for (xx, (xmin, k)) in coefficients.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i32 = 1 << (precision - 1);
                    for (i, weight) in k.iter().enumerate() {
                        ss += i32::from(row[(xmin + i) * 3 + c]) * weight;
                    }
                    out[(y * to_w + xx) * 3 + c] = clip8(ss, precision);
                }
            }
        }
        image = out;
        w = to_w;
    }
    if to_h != height {
        let (precision, coefficients) = fixed(pil_coefficients(height, to_h));
        let mut out = vec![0u8; w * to_h * 3];
        for (yy, (ymin, k)) in coefficients.iter().enumerate() {
            for x in 0..w {
                for c in 0..3 {
                    let mut ss: i32 = 1 << (precision - 1);
                    for (i, weight) in k.iter().enumerate() {
                        ss += i32::from(image[((ymin + i) * w + x) * 3 + c]) * weight;
                    }
                    out[(yy * w + x) * 3 + c] = clip8(ss, precision);
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

/// `CLIPImageProcessor`'s resize and crop on its PIL backend ([`clip_crop_with`] and
/// [`Resampler::Pillow`]).
pub fn clip_crop(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    clip_crop_with(rgb, width, height, Resampler::Pillow)
}

/// `CLIPImageProcessor`'s resize and crop: the shortest side to 224 by `resampler`'s 8-bit
/// bicubic (the other `int(224 · long / short)`), then the centre 224² (offsets
/// `(side − 224) // 2` on the PIL backend; torchvision's `center_crop` rounds half to even).
/// Interleaved 8-bit RGB in and out.
pub fn clip_crop_with(rgb: &[u8], width: usize, height: usize, resampler: Resampler) -> Vec<u8> {
    let (to_w, to_h) = if width <= height {
        (CLIP_SIZE, CLIP_SIZE * height / width)
    } else {
        (CLIP_SIZE * width / height, CLIP_SIZE)
    };
    let resized = bicubic_rgb8(rgb, width, height, to_w, to_h, resampler);
    let offset = |side: usize| match resampler {
        Resampler::Pillow => (side - CLIP_SIZE) / 2,
        Resampler::Torchvision => ((side - CLIP_SIZE) as f64 / 2.0).round_ties_even() as usize,
    };
    let (top, left) = (offset(to_h), offset(to_w));
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
