//! How much memory a generation will need, estimated from the configs and sizes before any
//! weights are read, so that a run that cannot fit is refused with a sentence instead of dying
//! in the allocator ("memory allocation of N bytes failed", SIGABRT) minutes later.
//!
//! The pipeline holds one large component at a time (see [`crate::generate`]), so the peak is
//! the largest of three stages: the text encoders, the U-Net loop (its weights, the batch's
//! feature maps and attention scores), and the VAE decode (its weights and full-resolution
//! feature maps, or one tile's with tiling). The counts follow diffusers' module layout; they
//! are estimates (within some tens of percent), meant to tell 4 GiB from 400 GiB.

use std::fmt;

use burn::tensor::DType;
use sd_core::layers::MAX_SCORES;

use crate::model::Model;
use crate::pipeline::GenerateOptions;

/// Bytes one value takes in `dtype`.
fn bytes_of(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 8.0,
        DType::F16 | DType::BF16 => 2.0,
        _ => 4.0,
    }
}

/// What the process holds besides the stages' tensors (the binary, the tokenizer, the
/// allocator's free lists), in bytes: measured as the difference between peak RSS and the
/// stage estimate on SD 1.5-size runs (`cargo xtask bench-generate`): 80 MiB at 512² in f32,
/// 130 MiB in f16.
const PROCESS_OVERHEAD: f64 = 150.0 * (1u64 << 20) as f64;

/// The estimated peak of each stage of a generation, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The U-Net's weights, and the ControlNets' beside them.
    pub unet_weights: f64,
    /// The U-Net loop's activations for the whole batch (both guidance halves).
    pub unet_activations: f64,
    /// The VAE half's weights (the decoder, or the encoder for img2img).
    pub vae_weights: f64,
    /// The VAE decode's (and img2img encode's) activations.
    pub vae_activations: f64,
    /// [`MemoryEstimate::vae_activations`] if the decode were tiled.
    pub vae_activations_tiled: f64,
    /// Whether the estimate is for a tiled decode.
    pub tiled: bool,
}

impl MemoryEstimate {
    /// The peak over the stages and the process's own memory, in bytes. On SD 1.5-size
    /// random weights (2 steps, 2-core AVX2 EPYC) it was 2-8 % above the measured peak RSS:
    /// 3.65 GiB for 3.58 measured at 512² in f32, 1.95 for 1.93 in f16, 3.95 for 3.67 at 768²,
    /// 3.95 for 3.65 with two images at 512², 4.25 for 4.0 at 1024² with a tiled decode.
    pub fn peak(&self) -> f64 {
        let vae = if self.tiled {
            self.vae_activations_tiled
        } else {
            self.vae_activations
        };
        (self.unet_weights + self.unet_activations).max(self.vae_weights + vae) + PROCESS_OVERHEAD
    }

    /// The peak the same run would have with a tiled VAE decode.
    pub fn peak_tiled(&self) -> f64 {
        MemoryEstimate {
            tiled: true,
            ..*self
        }
        .peak()
    }
}

/// A byte count in GiB, for messages.
pub struct Gib(pub f64);

impl fmt::Display for Gib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = self.0 / (1u64 << 30) as f64;
        if gib >= 100.0 {
            write!(f, "{gib:.0} GiB")
        } else if gib >= 0.1 {
            write!(f, "{gib:.1} GiB")
        } else {
            write!(f, "{:.0} MiB", self.0 / (1u64 << 20) as f64)
        }
    }
}

/// diffusers' `UNet2DConditionModel` parameter count from its config: ResNets (two 3×3
/// convolutions and the time projection), transformers (projections, self- and
/// cross-attention, GEGLU feed-forward), samplers, time and added embeddings.
pub fn unet_parameters(config: &sd_unet::UNet2DConditionConfig) -> f64 {
    let channels: Vec<f64> = config
        .block_out_channels
        .iter()
        .map(|&c| c as f64)
        .collect();
    let n = channels.len();
    if n == 0 {
        return 0.0;
    }
    let per_block = |p: &sd_unet::PerBlock, default: usize| -> Vec<f64> {
        p.expand(n)
            .unwrap_or_else(|| vec![default; n])
            .into_iter()
            .map(|v| v as f64)
            .collect()
    };
    let layers = per_block(&config.layers_per_block, 2);
    let depth = per_block(&config.transformer_layers_per_block, 1);
    let cross = per_block(&config.cross_attention_dim, 768);
    let temb = 4.0 * channels[0];
    let resnet = |cin: f64, cout: f64| {
        9.0 * cin * cout
            + 9.0 * cout * cout
            + temb * cout
            + if cin != cout { cin * cout } else { 0.0 }
    };
    let transformer = |c: f64, d: f64, t: f64| 2.0 * c * c + t * (18.0 * c * c + 2.0 * c * d);
    let attends =
        |kinds: &[String], i: usize| kinds.get(i).is_some_and(|k| k.contains("CrossAttn"));
    let mut total = temb * channels[0] + temb * temb;
    if let Some(p) = config.projection_class_embeddings_input_dim {
        total += p as f64 * temb + temb * temb;
    }
    let mut cin = channels[0];
    for i in 0..n {
        let c = channels[i];
        for _ in 0..layers[i] as usize {
            total += resnet(cin, c);
            if attends(&config.down_block_types, i) {
                total += transformer(c, cross[i], depth[i]);
            }
            cin = c;
        }
        if i + 1 < n {
            total += 9.0 * c * c;
        }
    }
    let last = channels[n - 1];
    total += 2.0 * resnet(last, last) + transformer(last, cross[n - 1], depth[n - 1]);
    for (u, i) in (0..n).rev().enumerate() {
        let c = channels[i];
        for _ in 0..=layers[i] as usize {
            total += resnet(2.0 * c, c);
            if attends(&config.up_block_types, u) {
                total += transformer(c, cross[i], depth[i]);
            }
        }
        if i > 0 {
            total += 9.0 * c * c;
        }
    }
    total
}

/// One VAE half's parameter count (the decoder's, the larger: one ResNet more a level).
pub fn vae_half_parameters(config: &sd_core::AutoencoderKlConfig) -> f64 {
    let layers = config.layers_per_block as f64 + 1.0;
    let levels: f64 = config
        .block_out_channels
        .iter()
        .map(|&c| {
            let c = c as f64;
            layers * 18.0 * c * c + 9.0 * c * c
        })
        .sum();
    let top = config.block_out_channels.iter().copied().max().unwrap_or(0) as f64;
    levels + 40.0 * top * top
}

/// The threads attention chunks run on at once, each with its own score block.
fn attention_threads() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// Estimates a generation's peak memory from the model's configs and the options (checked
/// sizes: call after [`GenerateOptions::size`] succeeds).
pub fn estimate(model: &Model, options: &GenerateOptions, size: (usize, usize)) -> MemoryEstimate {
    let s = bytes_of(model.dtype());
    let s_vae = bytes_of(model.vae_dtype());
    // Weights may be held narrower than the arithmetic (f16 matrices under f32 on the CPU).
    let (s_weights, s_vae_weights) = (
        bytes_of(model.matrix_dtype()),
        bytes_of(model.vae_matrix_dtype()),
    );
    let (w, h) = (size.0 as f64, size.1 as f64);
    let f = model.vae_scale_factor().max(1) as f64;
    let images = options.num_images as f64;
    let batch = images
        * if options.guidance.scale > 1.0 {
            2.0
        } else {
            1.0
        };
    let unet = model.unet_config();
    let c0 = unet.block_out_channels.first().copied().unwrap_or(0) as f64;
    // With U-Net tiles, one tile's feature maps at a time.
    let tokens = match &options.latent_tiling {
        Some(t) => ((w / f).min(t.tile as f64)) * ((h / f).min(t.tile as f64)),
        None => (w / f) * (h / f),
    };
    let scores_cap = MAX_SCORES as f64 * attention_threads();
    // Feature maps at the first level (the input, the skip connections kept for the up path,
    // a ResNet's norm and convolution outputs, the feed-forward's 8c-wide GEGLU input), and the
    // attention scores, which the attention kernels compute in blocks of at most MAX_SCORES.
    let unet_activations =
        16.0 * batch * c0 * tokens * s + (batch * tokens * tokens).min(scores_cap) * 4.0;
    let vae = model.vae_config();
    let v0 = vae.block_out_channels.first().copied().unwrap_or(0) as f64;
    // Full-resolution maps of the last up block (input, norm, convolution, residual, the
    // upsampler's output a level up), the mid block's attention over latent tokens, and the
    // image itself in f32.
    let decode = |side_w: f64, side_h: f64, n: f64| {
        6.0 * n * v0 * side_w * side_h * s_vae
            + (n * (side_w / f) * (side_h / f) * (side_w / f) * (side_h / f)).min(scores_cap) * 4.0
    };
    let image = 4.0 * images * 3.0 * w * h * 4.0;
    let tile = (vae.sample_size.max(1) as f64).min(w.max(h));
    // A ControlNet copies the down path and the mid block: about 0.42 of its U-Net (361 M of
    // SD 1.5's 860 M).
    let controlnets: f64 = options
        .controls
        .iter()
        .map(|c| 0.42 * unet_parameters(&c.net.config().unet) * s_weights)
        .sum();
    MemoryEstimate {
        unet_weights: unet_parameters(unet) * s_weights + controlnets,
        unet_activations,
        vae_weights: vae_half_parameters(vae) * s_vae_weights,
        vae_activations: decode(w, h, images) + image,
        vae_activations_tiled: decode(tile, tile, images) + image,
        tiled: options.vae_tiling,
    }
}

/// Memory this process may still take: the smaller of the system's `MemAvailable` and the
/// room left under the cgroup's `memory.max`; `None` where neither can be read.
pub fn available_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kb| kb * 1024.0)
        });
    let cgroup = (|| {
        let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
        let max = max.trim().parse::<f64>().ok()?;
        let current = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
            .ok()
            .and_then(|c| c.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Some((max - current).max(0.0))
    })();
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a memory size as `--max-memory` takes it: bytes, or a number with a `K`, `M`, `G` or
/// `T` suffix (powers of 1024; `GiB`, `GB` and `G` alike).
pub fn parse_size(text: &str) -> Option<f64> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let digits = upper.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &upper[digits.len()..];
    let scale = match unit {
        "" | "B" => 1.0,
        "K" | "KB" | "KIB" => 1024.0,
        "M" | "MB" | "MIB" => 1024.0 * 1024.0,
        "G" | "GB" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TB" | "TIB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let value: f64 = digits.trim().parse().ok()?;
    (value.is_finite() && value > 0.0).then_some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_are_near_the_published_ones() {
        // SD 1.5's U-Net has 859.5 M parameters, SDXL's 2567 M; SD 1.5's VAE decoder 49.5 M.
        let sd15 = unet_parameters(&sd_unet::UNet2DConditionConfig::sd15()) / 1e6;
        assert!((700.0..1000.0).contains(&sd15), "{sd15}");
        let sdxl = unet_parameters(&sd_unet::UNet2DConditionConfig::sdxl()) / 1e6;
        assert!((2100.0..3000.0).contains(&sdxl), "{sdxl}");
        let vae = vae_half_parameters(&sd_core::AutoencoderKlConfig::sd15()) / 1e6;
        assert!((35.0..70.0).contains(&vae), "{vae}");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("16G"), Some(16.0 * (1u64 << 30) as f64));
        assert_eq!(parse_size("512MiB"), Some(512.0 * (1u64 << 20) as f64));
        assert_eq!(parse_size("1000"), Some(1000.0));
        assert_eq!(parse_size("1.5 GB"), Some(1.5 * (1u64 << 30) as f64));
        for bad in ["", "G", "-1G", "0", "12Q", "nan", "inf"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
