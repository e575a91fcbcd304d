//! diffusers' `ControlNetModel` (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to
//! Text-to-Image Diffusion Models"): a trainable copy of the U-Net's down path and mid block
//! that also reads a conditioning image (edges, depth, pose) through a small convolutional
//! encoder, and hands the U-Net one residual per skip connection and one for the mid block,
//! each through a zero-initialised 1×1 convolution (sec. 3.1, eq. 2; sec. 3.2 for the U-Net).

use std::path::Path;

use burn::module::Module;
use burn::nn::Embedding;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use sd_core::config_checks::{self as checks, MAX_CHANNELS};
use sd_core::layers::{conv2d, conv2d_forward, silu};
use sd_core::weights::{LoadOptions, SafetensorsFile, diffusers_weights_path, load_safetensors};
use sd_core::{CoreError, Result};

use crate::blocks::{DownBlock, MidBlock};
use crate::conditioning::{ControlResiduals, TimeEmbedder, UNetConditioning, check_inputs};
use crate::config::UNet2DConditionConfig;
use crate::embeddings::TimestepEmbedding;
use crate::unet::{add_embedding, class_embedding, down_path, mid_block};

/// The fields a ControlNet adds to the U-Net's (`controlnet/config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ControlNetExtras {
    /// Channels of the conditioning image (3: RGB).
    pub conditioning_channels: usize,
    /// The conditioning encoder's widths; each step after the first halves the image, so the
    /// image is `2^(len − 1)` times the latent (the VAE's factor).
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Pool each residual to one value per channel (the "shuffle" ControlNets); implies guess
    /// mode in the pipeline.
    pub global_pool_conditions: bool,
    /// `rgb`, or `bgr` for ControlNets trained on BGR images (the image's channels are flipped).
    pub controlnet_conditioning_channel_order: String,
}

impl Default for ControlNetExtras {
    fn default() -> Self {
        Self {
            conditioning_channels: 3,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
            controlnet_conditioning_channel_order: "rgb".into(),
        }
    }
}

/// diffusers' `ControlNetModel` configuration: the U-Net fields of the copied half, plus
/// [`ControlNetExtras`].
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetConfig {
    /// The U-Net fields (the up path's read as the mirror of the down path's, which the
    /// ControlNet does not have).
    pub unet: UNet2DConditionConfig,
    /// The ControlNet's own fields.
    pub extras: ControlNetExtras,
}

impl ControlNetConfig {
    /// The fields a file must name: the shape of the copied down path.
    pub const REQUIRED: &'static [&'static [&'static str]] = &[
        &["in_channels"],
        &["block_out_channels"],
        &["down_block_types"],
        &["layers_per_block"],
        &["cross_attention_dim"],
        &["attention_head_dim", "num_attention_heads"],
    ];

    /// Parses a `config.json` already read; errors name the field.
    pub fn from_json(mut value: serde_json::Value) -> std::result::Result<Self, String> {
        let Some(map) = value.as_object_mut() else {
            return Err("expected a JSON object".into());
        };
        // The U-Net config's up path is the down path mirrored; the ControlNet has none.
        if let Some(serde_json::Value::Array(down)) = map.get("down_block_types").cloned() {
            let up: Vec<serde_json::Value> = down
                .iter()
                .rev()
                .map(|t| t.as_str().unwrap_or_default().replace("Down", "Up").into())
                .collect();
            map.insert("up_block_types".into(), up.into());
        }
        if let Some(c) = map.get("in_channels").cloned() {
            map.insert("out_channels".into(), c);
        }
        let unet: UNet2DConditionConfig =
            checks::from_value(value.clone(), Self::REQUIRED).map_err(|e| e.to_string())?;
        let extras: ControlNetExtras = checks::from_value(value, &[]).map_err(|e| e.to_string())?;
        let config = Self { unet, extras };
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates `controlnet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = sd_core::files::read_regular_to_string(path)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CoreError::config(path, format!("invalid ControlNetModel config: {e}")))?;
        Self::from_json(value).map_err(|reason| CoreError::config(path, reason))
    }

    /// Checks the U-Net fields as the U-Net does, then the ControlNet's own.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.unet.validate()?;
        if self.unet.mid_block_type.is_none() {
            return Err("mid_block_type: a ControlNet needs a mid block".into());
        }
        let e = &self.extras;
        checks::size(
            "conditioning_channels",
            e.conditioning_channels,
            MAX_CHANNELS,
        )?;
        checks::sizes(
            "conditioning_embedding_out_channels",
            &e.conditioning_embedding_out_channels,
            MAX_CHANNELS,
            8,
        )?;
        match e.controlnet_conditioning_channel_order.as_str() {
            "rgb" | "bgr" => Ok(()),
            other => Err(format!(
                "controlnet_conditioning_channel_order: `{other}` is neither `rgb` nor `bgr`"
            )),
        }
    }

    /// How many times larger than the latent the conditioning image is.
    pub fn image_factor(&self) -> usize {
        1 << (self.extras.conditioning_embedding_out_channels.len() - 1)
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: the conditioning image to the first block's
/// width at latent resolution (conv, then pairs of a conv and a stride-2 conv, SiLU between,
/// and a zero-initialised output conv).
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding<B: Backend> {
    /// The image's channels to the first width.
    pub conv_in: Conv2d<B>,
    /// A same-width conv then a stride-2 conv to the next width, per step.
    pub blocks: Vec<Conv2d<B>>,
    /// The last width to the U-Net's first block's (zero at initialisation).
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> ControlNetConditioningEmbedding<B> {
    fn new(image_channels: usize, widths: &[usize], out: usize, device: &B::Device) -> Self {
        let blocks = widths
            .windows(2)
            .flat_map(|w| {
                [
                    conv2d(w[0], w[0], 3, 1, 1, device),
                    conv2d(w[0], w[1], 3, 2, 1, device),
                ]
            })
            .collect();
        let last = *widths.last().unwrap_or(&1);
        Self {
            conv_in: conv2d(image_channels, widths[0], 3, 1, 1, device),
            blocks,
            conv_out: conv2d(last, out, 3, 1, 1, device),
        }
    }

    /// `image`: `[batch, channels, H, W]` in [0, 1]; returns `[batch, out, H / f, W / f]`.
    pub fn forward(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = silu(conv2d_forward(&self.conv_in, image));
        for block in &self.blocks {
            x = silu(conv2d_forward(block, x));
        }
        conv2d_forward(&self.conv_out, x)
    }
}

/// diffusers' `ControlNetModel`: the U-Net's down path and mid block, a conditioning-image
/// encoder added after `conv_in`, and a zero convolution per output.
#[derive(Module, Debug)]
pub struct ControlNetModel<B: Backend> {
    /// As the U-Net's.
    pub conv_in: Conv2d<B>,
    /// As the U-Net's.
    pub time_embedding: TimestepEmbedding<B>,
    /// As the U-Net's (SDXL).
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// As the U-Net's (class-conditional models).
    pub class_embedding: Option<Embedding<B>>,
    /// The conditioning image's encoder.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding<B>,
    /// The copy of the U-Net's down path.
    pub down_blocks: Vec<DownBlock<B>>,
    /// One 1×1 convolution per skip connection.
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    /// The copy of the U-Net's mid block.
    pub mid_block: Option<MidBlock<B>>,
    /// The mid block's 1×1 convolution.
    pub controlnet_mid_block: Conv2d<B>,
    in_channels: usize,
    context_dim: usize,
    time_proj_dim: usize,
    add_time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    image_channels: usize,
    image_factor: usize,
    bgr: bool,
    global_pool: bool,
}

impl<B: Backend> ControlNetModel<B> {
    /// A ControlNet with random weights, shaped by `config`.
    pub fn new(config: &ControlNetConfig, device: &B::Device) -> Result<Self> {
        config.validate().map_err(|reason| CoreError::Config {
            path: "<ControlNetConfig>".into(),
            reason,
        })?;
        let u = &config.unet;
        let r = u.resolve().map_err(|reason| CoreError::Config {
            path: "<ControlNetConfig>".into(),
            reason,
        })?;
        let ch = &u.block_out_channels;
        let n = ch.len();
        // One zero convolution per skip: conv_in's output, each ResNet's, each downsampler's.
        let mut skip_widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            skip_widths.extend(std::iter::repeat_n(c, r.layers[i]));
            if i + 1 < n {
                skip_widths.push(c);
            }
        }
        let zero_conv = |c: usize| conv2d(c, c, 1, 1, 0, device);
        Ok(Self {
            conv_in: conv2d(
                u.in_channels,
                ch[0],
                u.conv_in_kernel,
                1,
                u.conv_in_kernel / 2,
                device,
            ),
            time_embedding: TimestepEmbedding::new(ch[0], u.time_embed_dim(), device),
            add_embedding: add_embedding(u, device),
            class_embedding: class_embedding(u, device),
            controlnet_cond_embedding: ControlNetConditioningEmbedding::new(
                config.extras.conditioning_channels,
                &config.extras.conditioning_embedding_out_channels,
                ch[0],
                device,
            ),
            down_blocks: down_path(u, &r, device),
            controlnet_down_blocks: skip_widths.into_iter().map(zero_conv).collect(),
            mid_block: mid_block(u, &r, device),
            controlnet_mid_block: zero_conv(ch[n - 1]),
            in_channels: u.in_channels,
            context_dim: r.cross_dims[0],
            time_proj_dim: ch[0],
            add_time_dim: u.addition_time_embed_dim.unwrap_or(0),
            flip_sin_to_cos: u.flip_sin_to_cos,
            freq_shift: u.freq_shift,
            image_channels: config.extras.conditioning_channels,
            image_factor: config.image_factor(),
            bgr: config.extras.controlnet_conditioning_channel_order == "bgr",
            global_pool: config.extras.global_pool_conditions,
        })
    }

    /// Loads a diffusers `controlnet/` folder: `config.json` and
    /// `diffusion_pytorch_model.safetensors` (or its `variant`).
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        options: LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ControlNetConfig::from_file(dir.join("config.json"))?;
        let file = SafetensorsFile::open(diffusers_weights_path(dir, variant)?)?;
        Self::new(&config, device)?.load_weights(&file, options)
    }

    /// Fills the weights from a file in the diffusers layout.
    pub fn load_weights(self, file: &SafetensorsFile, options: LoadOptions) -> Result<Self> {
        load_safetensors(self, file, &|key| Some(key.to_string()), options)
    }

    /// Fills the weights from a ControlNet in the original layout (`control_*.safetensors`,
    /// keys under `control_model.`; [`ldm_controlnet_key`]).
    pub fn load_single_file(
        self,
        file: &SafetensorsFile,
        config: &ControlNetConfig,
        options: LoadOptions,
    ) -> Result<Self> {
        let crate::PerBlock::One(layers) = config.unet.layers_per_block else {
            return Err(CoreError::Config {
                path: file.path().into(),
                reason: "single-file ControlNets need one layers_per_block for every block".into(),
            });
        };
        let steps = config.extras.conditioning_embedding_out_channels.len() - 1;
        let map = |key: &str| ldm_controlnet_key(key, layers, steps);
        load_safetensors(self, file, &map, options)
    }

    /// Whether the ControlNet pools its residuals (`global_pool_conditions`): the pipeline then
    /// runs it in guess mode.
    pub fn pools(&self) -> bool {
        self.global_pool
    }

    /// How many times larger than the latent the conditioning image must be.
    pub fn image_factor(&self) -> usize {
        self.image_factor
    }

    /// The residuals for one step: `latents` `[batch, in_channels, h, w]`, `image` the
    /// conditioning image `[batch, channels, h·f, w·f]` in [0, 1], `cond` the same
    /// conditioning the U-Net gets (its `control` is ignored). Every residual is multiplied
    /// by `scale`; in `guess_mode` the skips get 10^(−1 … 0) of it, shallowest least (diffusers'
    /// `logspace(-1, 0)`, for prompts that do not describe the image).
    pub fn forward(
        &self,
        latents: Tensor<B, 4>,
        timesteps: &[f64],
        cond: &UNetConditioning<'_, B>,
        image: Tensor<B, 4>,
        scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals<B>> {
        check_inputs(
            "ControlNet",
            self.in_channels,
            self.context_dim,
            &latents,
            cond,
        )?;
        let [b, c, h, w] = latents.dims();
        let [ib, ic, ih, iw] = image.dims();
        let context = cond.context.clone();
        let invalid = |m: String| Err(CoreError::InvalidInput(m));
        let f = self.image_factor;
        if ib != b || ic != self.image_channels || ih != h * f || iw != w * f {
            return invalid(format!(
                "the conditioning image is [{ib}, {ic}, {ih}, {iw}]; for latents [{b}, {c}, {h}, \
                 {w}] this ControlNet needs [{b}, {}, {}, {}]",
                self.image_channels,
                h * f,
                w * f
            ));
        }
        let device = latents.device();
        let embedder = TimeEmbedder {
            time_embedding: &self.time_embedding,
            class_embedding: self.class_embedding.as_ref(),
            add_embedding: self.add_embedding.as_ref(),
            time_proj_dim: self.time_proj_dim,
            add_time_dim: self.add_time_dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        };
        let emb = embedder.embed(timesteps, b, cond, &device)?;
        let image = if self.bgr { image.flip([1]) } else { image };
        let mut x =
            conv2d_forward(&self.conv_in, latents) + self.controlnet_cond_embedding.forward(image);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &context, &mut skips);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, &emb, &context);
        }
        if skips.len() != self.controlnet_down_blocks.len() {
            return invalid(format!(
                "internal: {} skips for {} zero convolutions",
                skips.len(),
                self.controlnet_down_blocks.len()
            ));
        }
        let n = skips.len();
        // diffusers: torch.logspace(-1, 0, n + 1) · scale in guess mode (unless pooled).
        let factor = |i: usize| -> f64 {
            if guess_mode && !self.global_pool {
                10f64.powf(-1.0 + i as f64 / n as f64) * scale
            } else {
                scale
            }
        };
        let pool = |t: Tensor<B, 4>| {
            if self.global_pool {
                t.mean_dim(2).mean_dim(3)
            } else {
                t
            }
        };
        let down = skips
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .enumerate()
            .map(|(i, (s, conv))| pool(conv2d_forward(conv, s) * factor(i)))
            .collect();
        let mid = pool(conv2d_forward(&self.controlnet_mid_block, x) * factor(n));
        Ok(ControlResiduals { down, mid })
    }
}

/// A key of a ControlNet in the original layout (lllyasviel's `cldm`: `control_model.` then
/// `input_hint_block.{0, 2, …}`, `zero_convs.{i}.0`, `middle_block_out.0`, and the U-Net's own
/// names for the copied blocks) as diffusers names it; `steps` is the number of stride-2 steps
/// of the hint encoder. `None` for keys that are not the ControlNet's.
pub fn ldm_controlnet_key(key: &str, layers_per_block: usize, steps: usize) -> Option<String> {
    let key = key.strip_prefix("control_model.").unwrap_or(key);
    if let Some(rest) = key.strip_prefix("input_hint_block.") {
        // A Sequential of conv, SiLU, (conv, SiLU, conv, SiLU) × steps, conv: convs at even
        // indices.
        let (index, param) = rest.split_once('.')?;
        let index: usize = index.parse().ok()?;
        if index % 2 == 1 {
            return None;
        }
        let conv = index / 2;
        let name = if conv == 0 {
            "conv_in".to_string()
        } else if conv <= 2 * steps {
            format!("blocks.{}", conv - 1)
        } else if conv == 2 * steps + 1 {
            "conv_out".to_string()
        } else {
            return None;
        };
        return Some(format!("controlnet_cond_embedding.{name}.{param}"));
    }
    if let Some(rest) = key.strip_prefix("zero_convs.") {
        let (index, param) = rest.split_once(".0.")?;
        return Some(format!("controlnet_down_blocks.{index}.{param}"));
    }
    if let Some(param) = key.strip_prefix("middle_block_out.0.") {
        return Some(format!("controlnet_mid_block.{param}"));
    }
    crate::single_file::ldm_to_diffusers_key(
        &format!("{}{key}", crate::LDM_UNET_PREFIX),
        layers_per_block,
    )
}

/// The inverse of [`ldm_controlnet_key`]: a diffusers ControlNet key in the original layout.
pub fn controlnet_ldm_key(key: &str, layers_per_block: usize, steps: usize) -> Option<String> {
    let ldm = if let Some(rest) = key.strip_prefix("controlnet_cond_embedding.") {
        let (name, param) = rest.split_once('.')?;
        let conv = match name {
            "conv_in" => 0,
            "conv_out" => 2 * steps + 1,
            "blocks" => {
                let (i, param2) = param.split_once('.')?;
                let i: usize = i.parse().ok()?;
                return Some(format!(
                    "control_model.input_hint_block.{}.{param2}",
                    2 * (i + 1)
                ));
            }
            _ => return None,
        };
        format!("input_hint_block.{}.{param}", 2 * conv)
    } else if let Some(rest) = key.strip_prefix("controlnet_down_blocks.") {
        let (index, param) = rest.split_once('.')?;
        format!("zero_convs.{index}.0.{param}")
    } else if let Some(param) = key.strip_prefix("controlnet_mid_block.") {
        format!("middle_block_out.0.{param}")
    } else {
        let ldm = crate::single_file::diffusers_to_ldm_key(key, layers_per_block, &[])?;
        ldm.strip_prefix(crate::LDM_UNET_PREFIX)?.to_string()
    };
    Some(format!("control_model.{ldm}"))
}
