//! Loading either generator from its released file, told apart by the keys.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_core::weights::{LoadOptions, SafetensorsFile, TensorEntry, load_safetensors};

use crate::compact::{SrVggNetCompact, SrVggNetCompactConfig};
use crate::error::{Result, UpscaleError};
use crate::rrdb::{RrdbNet, RrdbNetConfig};
use crate::tile::{TileOptions, upscale_tiled};

/// A loaded super-resolution network.
#[derive(Debug)]
pub enum Upscaler<B: Backend> {
    /// ESRGAN's RRDB generator (`RealESRGAN_x4plus`, `RealESRGAN_x2plus`, the anime 6-block one).
    Rrdb(Box<RrdbNet<B>>, RrdbNetConfig),
    /// The compact SRVGG network (`realesr-general-x4v3`, `realesr-animevideov3`).
    Compact(SrVggNetCompact<B>, SrVggNetCompactConfig),
}

/// The key prefix of a released file: BasicSR saves `{"params_ema": …}` (or `"params"`), which
/// the reader flattens into `params_ema.…`; a bare state dict has none.
fn prefix_of(file: &SafetensorsFile) -> &'static str {
    let has = |p: &str| file.entries().iter().any(|e| e.key.starts_with(p));
    if has("params_ema.") {
        "params_ema."
    } else if has("params.") {
        "params."
    } else {
        ""
    }
}

impl<B: Backend> Upscaler<B> {
    /// Reads a Real-ESRGAN model (`.pth` as released, read without running pickle code, or
    /// `.safetensors` with the same keys), its shape from the weights. Strict: every weight
    /// with its shape, nothing else (BasicSR's `params` beside `params_ema` is left out).
    pub fn load(path: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::load_in(path, burn::tensor::DType::F32, device)
    }

    /// [`Self::load`] with the weights in `dtype` (f16 or bf16 halve the memory; the image is
    /// computed in the same dtype and returned as 8 bits).
    pub fn load_in(
        path: impl AsRef<Path>,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let what = if path.join("model_index.json").is_file() {
                "a diffusers folder (the Stable Diffusion x4 upscaler runs through \
                 `sd::upscale_x4_with_noise`, or `sd upscale --model DIR`)"
            } else {
                "a folder"
            };
            return Err(UpscaleError::Layout {
                path: path.to_path_buf(),
                reason: format!("{what}: give a Real-ESRGAN .pth or .safetensors file"),
            });
        }
        let file = SafetensorsFile::open_any(path)?;
        let prefix = prefix_of(&file);
        let entry = |key: &str| -> Option<&TensorEntry> {
            file.entries()
                .iter()
                .find(|e| e.key == format!("{prefix}{key}"))
        };
        let layout = |reason: String| UpscaleError::Layout {
            path: path.to_path_buf(),
            reason,
        };
        let shape4 = |key: &str| -> Result<[usize; 4]> {
            let e = entry(key).ok_or_else(|| layout(format!("no `{prefix}{key}`")))?;
            e.shape.as_slice().try_into().map_err(|_| {
                layout(format!(
                    "`{}` has shape {:?}, not a 4-D convolution",
                    e.key, e.shape
                ))
            })
        };
        let options = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        // BasicSR files keep `params` beside `params_ema`: keys outside the prefix are left out.
        let strip = |key: &str| key.strip_prefix(prefix).map(str::to_string);
        if entry("conv_first.weight").is_some() {
            let [features, first_in, _, _] = shape4("conv_first.weight")?;
            let [out_channels, ..] = shape4("conv_last.weight")?;
            let [growth, ..] = shape4("body.0.rdb1.conv1.weight")?;
            let blocks = block_count(file.entries(), &format!("{prefix}body."));
            let unshuffle_sq = first_in / out_channels.max(1);
            let scale = match (unshuffle_sq, first_in % out_channels.max(1)) {
                (1, 0) => 4,
                (4, 0) => 2,
                (16, 0) => 1,
                _ => {
                    return Err(layout(format!(
                        "conv_first takes {first_in} channels for {out_channels} out: not the \
                         ×4, ×2 (pixel-unshuffled by 2) or ×1 (by 4) RRDBNet"
                    )));
                }
            };
            let config = RrdbNetConfig {
                in_channels: out_channels,
                out_channels,
                scale,
                features,
                blocks,
                growth,
            };
            let net = load_safetensors(RrdbNet::new(&config, device), &file, &strip, options)?;
            return Ok(Self::Rrdb(Box::new(net), config));
        }
        if entry("body.0.weight").is_some() {
            let [features, in_channels, _, _] = shape4("body.0.weight")?;
            let last = block_count(file.entries(), &format!("{prefix}body.")).saturating_sub(1);
            if last < 2 || !last.is_multiple_of(2) || entry("body.1.weight").is_none() {
                return Err(layout(
                    "`body.*` is not SRVGGNetCompact's alternation of convolutions and PReLUs"
                        .into(),
                ));
            }
            let [out, ..] = shape4(&format!("body.{last}.weight"))?;
            let scale = (1..=8)
                .find(|s| in_channels * s * s == out)
                .ok_or_else(|| {
                    layout(format!(
                        "the last convolution makes {out} channels from {in_channels}: not \
                         channels × scale²"
                    ))
                })?;
            let config = SrVggNetCompactConfig {
                in_channels,
                out_channels: in_channels,
                features,
                convs: last / 2 - 1,
                scale,
            };
            let key = |k: &str| strip(k).and_then(|k| SrVggNetCompact::<B>::module_path(&k));
            let net =
                load_safetensors(SrVggNetCompact::new(&config, device), &file, &key, options)?;
            return Ok(Self::Compact(net, config));
        }
        Err(layout(format!(
            "neither `{prefix}conv_first.weight` (RRDBNet) nor `{prefix}body.0.weight` \
             (SRVGGNetCompact): not a Real-ESRGAN model"
        )))
    }

    /// The upscaling factor.
    pub fn scale(&self) -> usize {
        match self {
            Self::Rrdb(_, c) => c.scale,
            Self::Compact(_, c) => c.scale,
        }
    }

    /// What the image's sides are padded to a multiple of (the pixel unshuffle's factor).
    pub fn modulo(&self) -> usize {
        match self {
            Self::Rrdb(_, c) => c.unshuffle(),
            Self::Compact(..) => 1,
        }
    }

    /// A short name for messages and the PNG's parameters (`RRDBNet x4, 23 blocks`).
    pub fn describe(&self) -> String {
        match self {
            Self::Rrdb(_, c) => format!("RRDBNet x{}, {} blocks", c.scale, c.blocks),
            Self::Compact(_, c) => format!("SRVGGNetCompact x{}, {} convs", c.scale, c.convs),
        }
    }

    /// About how many bytes of f32 activations one run over a `w × h` input holds at its peak
    /// (the widest moment: RRDBNet's ×4 features beside their convolution's output, or the
    /// dense blocks' concatenations; the compact network's pixel-shuffled output beside its
    /// input's upsampling). An estimate for refusing what cannot fit, not a measurement.
    pub fn peak_activation_bytes(&self, w: usize, h: usize) -> f64 {
        let px = (w * h) as f64;
        match self {
            Self::Rrdb(_, c) => {
                let (f, g, s) = (c.features as f64, c.growth as f64, c.scale as f64);
                let u = c.unshuffle() as f64;
                let low = px / (u * u) * (3.0 * f + 8.0 * g);
                let high = px * s * s * (2.0 * f + 3.0);
                4.0 * low.max(high)
            }
            Self::Compact(_, c) => {
                let (f, s) = (c.features as f64, c.scale as f64);
                4.0 * (px * 2.0 * f).max(px * s * s * 3.0 * 3.0)
            }
        }
    }

    /// About how many bytes [`Self::upscale`] needs for a `w × h` image with these tiles: the
    /// peak of one tile's run (with its context) plus the padded input and the whole output
    /// in f32, and the 8-bit result.
    pub fn estimate_bytes(&self, w: usize, h: usize, options: &TileOptions) -> f64 {
        let s = self.scale() as f64;
        let (tw, th) = if options.tile == 0 {
            (
                w + options.pre_pad + self.modulo(),
                h + options.pre_pad + self.modulo(),
            )
        } else {
            let side = options.tile + 2 * options.tile_pad;
            (
                side.min(w + options.pre_pad + self.modulo()),
                side.min(h + options.pre_pad + self.modulo()),
            )
        };
        let px = (w * h) as f64;
        self.peak_activation_bytes(tw, th) + 4.0 * 3.0 * px * (1.0 + s * s) + 3.0 * px * s * s
    }

    /// The dtype the network computes in.
    pub fn dtype(&self) -> burn::tensor::DType {
        match self {
            Self::Rrdb(net, _) => net.dtype(),
            Self::Compact(net, _) => net.dtype(),
        }
    }

    /// The network on `[N, C, H, W]` in `[0, 1]`, unclamped.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Rrdb(net, _) => net.forward(x),
            Self::Compact(net, _) => net.forward(x),
        }
    }

    /// Upscales an image as Real-ESRGAN's `RealESRGANer.enhance` does: to `[0, 1]`, padded,
    /// run in tiles, clamped and rounded to 8 bits. `progress(done, total)` sees each tile.
    pub fn upscale(
        &self,
        image: &image::RgbImage,
        options: &TileOptions,
        device: &B::Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<image::RgbImage> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        if w == 0 || h == 0 {
            return Err(UpscaleError::Invalid("the image is empty".into()));
        }
        let mut planar = vec![0f32; 3 * h * w];
        for (x, y, pixel) in image.enumerate_pixels() {
            for c in 0..3 {
                planar[c * h * w + y as usize * w + x as usize] = f32::from(pixel[c]) / 255.0;
            }
        }
        let dtype = self.dtype();
        let x =
            Tensor::<B, 4>::from_data(TensorData::new(planar, [1, 3, h, w]), device).cast(dtype);
        let out = upscale_tiled(
            |t| self.forward(t),
            self.scale(),
            self.modulo(),
            x,
            options,
            progress,
        )?;
        let [_, _, oh, ow] = out.dims();
        let values: Vec<f32> = out
            .clamp(0.0, 1.0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| UpscaleError::Invalid(format!("{e:?}")))?;
        let plane = oh * ow;
        Ok(image::RgbImage::from_fn(ow as u32, oh as u32, |x, y| {
            let i = y as usize * ow + x as usize;
            image::Rgb(std::array::from_fn(|c| {
                (values[c * plane + i] * 255.0).round() as u8
            }))
        }))
    }
}

/// How many distinct `N` follow `prefix` in the keys (`body.N.…`).
fn block_count(entries: &[TensorEntry], prefix: &str) -> usize {
    entries
        .iter()
        .filter_map(|e| {
            e.key
                .strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .last()
        .map_or(0, |&n| n + 1)
}
