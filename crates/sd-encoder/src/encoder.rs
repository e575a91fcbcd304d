use std::path::Path;

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::{
    Downsample2d, Downsample2dConfig, MidBlock2d, MidBlock2dConfig, ResnetBlock2d,
    ResnetBlock2dConfig, conv2d, conv2d_forward, group_norm,
};
use sd_core::vae_config::VAE_NORM_EPS as EPS;
use sd_core::weights::{LoadOptions, SafetensorsFile, keep_prefixes, load_safetensors};
use sd_core::{AutoencoderKlConfig, CoreError, Result};

use crate::DiagonalGaussian;

/// ResNet blocks at one resolution, then a stride-2 downsample (diffusers `DownEncoderBlock2D`).
#[derive(Module, Debug)]
pub struct DownEncoderBlock2d<B: Backend> {
    /// The ResNet blocks at this resolution (`layers_per_block` of them).
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// Empty in the last block.
    pub downsamplers: Vec<Downsample2d<B>>,
}

impl<B: Backend> DownEncoderBlock2d<B> {
    /// `x`: `[batch, channels, h, w]`; returns the block's output, half the size unless it is the
    /// last block.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x, None));
        self.downsamplers.iter().fold(x, |x, d| d.forward(x))
    }
}

/// diffusers `Encoder`: `conv_in`, down blocks, mid block, GroupNorm–SiLU–`conv_out`.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// The 3×3 convolution from the image's `in_channels` to the first block's width.
    pub conv_in: Conv2d<B>,
    /// The down blocks, narrowest first.
    pub down_blocks: Vec<DownEncoderBlock2d<B>>,
    /// The ResNet–attention–ResNet block at the lowest resolution.
    pub mid_block: MidBlock2d<B>,
    /// The GroupNorm before `conv_out`.
    pub conv_norm_out: GroupNorm<B>,
    /// The 3×3 convolution to `2 · latent_channels`: the mean and log-variance.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Self {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let last = *channels.last().unwrap_or(&config.in_channels);
        let mut input = channels[0];
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &output)| {
                let resnets = ResnetBlock2dConfig::new(input, output, groups, EPS)
                    .init_stack(config.layers_per_block, device);
                let downsamplers = if i + 1 < channels.len() {
                    vec![
                        Downsample2dConfig {
                            in_channels: output,
                            out_channels: output,
                            padding: 0,
                        }
                        .init(device),
                    ]
                } else {
                    Vec::new()
                };
                input = output;
                DownEncoderBlock2d {
                    resnets,
                    downsamplers,
                }
            })
            .collect();
        Self {
            conv_in: conv2d(config.in_channels, channels[0], 3, 1, 1, device),
            down_blocks,
            mid_block: MidBlock2dConfig {
                channels: last,
                groups,
                eps: EPS,
                add_attention: config.mid_block_add_attention,
                temb_channels: None,
            }
            .init(device),
            conv_norm_out: group_norm(groups, last, EPS, device),
            // `double_z`: mean and log-variance.
            conv_out: conv2d(last, 2 * config.latent_channels, 3, 1, 1, device),
        }
    }

    /// `x`: images `[batch, in_channels, h, w]`; returns the moments `[batch, 2·latent_channels,
    /// h/f, w/f]` before `quant_conv`, `f` the downsampling factor.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = conv2d_forward(&self.conv_in, x);
        let x = self.down_blocks.iter().fold(x, |x, block| block.forward(x));
        let x = self.mid_block.forward(x, None);
        conv2d_forward(
            &self.conv_out,
            sd_core::layers::group_norm_silu_2d(&self.conv_norm_out, x),
        )
    }
}

/// The encoder half of `AutoencoderKL`: [`Encoder`] then the 1×1 `quant_conv`. Its parameter
/// names are those of the diffusers state dict (`encoder.*`, `quant_conv.*`).
#[derive(Module, Debug)]
pub struct VaeEncoder<B: Backend> {
    /// The encoder proper (`encoder.*`).
    pub encoder: Encoder<B>,
    /// The 1×1 convolution on the moments after the encoder; `None` when `use_quant_conv` is false.
    pub quant_conv: Option<Conv2d<B>>,
    in_channels: usize,
    downsample_factor: usize,
    scaling_factor: f64,
    shift_factor: f64,
}

impl<B: Backend> VaeEncoder<B> {
    /// The keys of a diffusers VAE file that this half takes.
    pub const WEIGHT_PREFIXES: &[&str] = &["encoder.", "quant_conv."];

    /// An encoder with random weights, shaped by `config`.
    pub fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Result<Self> {
        config.check()?;
        let latent2 = 2 * config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(config, device),
            quant_conv: config
                .use_quant_conv
                .then(|| conv2d(latent2, latent2, 1, 1, 0, device)),
            in_channels: config.in_channels,
            downsample_factor: config.downsample_factor(),
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its `variant`, e.g. `fp16`), taking the `encoder.*` and `quant_conv.*` tensors.
    pub fn from_pretrained(
        vae_dir: impl AsRef<Path>,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let (config, file) = AutoencoderKlConfig::load_folder(vae_dir, variant)?;
        Self::new(&config, device)?.load_weights(&file, LoadOptions::default())
    }

    /// The weights under diffusers' key names (PyTorch layout), for
    /// [`sd_core::weights::save_tensors`]: with the other half's, they make diffusers' one
    /// `vae/diffusion_pytorch_model.safetensors`.
    pub fn weight_tensors(&self) -> Vec<(String, sd_core::weights::TensorSnapshot)> {
        sd_core::weights::module_tensors(self, &|k| Some(k.to_string()))
    }

    /// Fills the weights from a single-file checkpoint in the original layout
    /// (`first_stage_model.*`, mapped by [`sd_core::vae_keys::ldm_vae_key`] for a VAE of
    /// `blocks` levels); the file's other components are ignored.
    pub fn load_single_file(
        self,
        file: &SafetensorsFile,
        blocks: usize,
        options: LoadOptions,
    ) -> Result<Self> {
        let map = |key: &str| {
            let key = sd_core::vae_keys::ldm_vae_key(key, blocks)?;
            Self::WEIGHT_PREFIXES
                .iter()
                .any(|p| key.starts_with(p))
                .then_some(key)
        };
        load_safetensors(self, file, &map, options)
    }

    /// Fills the weights from a file in the diffusers layout; other components' keys are ignored.
    pub fn load_weights(self, file: &SafetensorsFile, options: LoadOptions) -> Result<Self> {
        load_safetensors(self, file, &keep_prefixes(Self::WEIGHT_PREFIXES), options)
    }

    /// `images`: `[batch, in_channels, h, w]` in `[-1, 1]`, `h` and `w` multiples of the
    /// down-sampling factor. Returns the posterior over latents (unscaled).
    pub fn encode(&self, images: Tensor<B, 4>) -> Result<DiagonalGaussian<B>> {
        let [_, c, h, w] = images.dims();
        if c != self.in_channels {
            return Err(CoreError::InvalidInput(format!(
                "the VAE encoder takes {} channels, got {c}",
                self.in_channels
            )));
        }
        sd_core::image_io::check_image_size(w, h, self.downsample_factor)?;
        Ok(DiagonalGaussian::from_moments(self.forward(images)))
    }

    /// The raw moments `[batch, 2·latent, h/f, w/f]`, without input checks (for training loops
    /// that have already checked their batches).
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let moments = self.encoder.forward(images);
        match &self.quant_conv {
            Some(conv) => conv2d_forward(conv, moments),
            None => moments,
        }
    }

    /// Latent → the diffusion model's space: `(z − shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        (z - self.shift_factor) * self.scaling_factor
    }

    /// How many pixels one latent covers along each side (8 for Stable Diffusion).
    pub fn downsample_factor(&self) -> usize {
        self.downsample_factor
    }
}
