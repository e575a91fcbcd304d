use std::path::Path;

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::{
    MidBlock2d, MidBlock2dConfig, ResnetBlock2d, ResnetBlock2dConfig, Upsample2d, Upsample2dConfig,
    conv2d, conv2d_forward, group_norm,
};
use sd_core::vae_config::VAE_NORM_EPS as EPS;
use sd_core::weights::{LoadOptions, SafetensorsFile, keep_prefixes, load_safetensors};
use sd_core::{AutoencoderKlConfig, CoreError, Result};

use crate::Tiling;

/// ResNet blocks at one resolution, then a ×2 upsample (diffusers `UpDecoderBlock2D`).
#[derive(Module, Debug)]
pub struct UpDecoderBlock2d<B: Backend> {
    /// The ResNet blocks at this resolution (`layers_per_block + 1` of them).
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// Empty in the last block.
    pub upsamplers: Vec<Upsample2d<B>>,
}

impl<B: Backend> UpDecoderBlock2d<B> {
    /// `x`: `[batch, channels, h, w]`; returns the block's output, twice the size unless it is the
    /// last block.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x, None));
        self.upsamplers.iter().fold(x, |x, u| u.forward(x))
    }
}

/// diffusers `Decoder`: `conv_in`, mid block, up blocks, GroupNorm–SiLU–`conv_out`.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// The 3×3 convolution from `latent_channels` to the widest block.
    pub conv_in: Conv2d<B>,
    /// The ResNet–attention–ResNet block at the lowest resolution.
    pub mid_block: MidBlock2d<B>,
    /// The up blocks, widest first.
    pub up_blocks: Vec<UpDecoderBlock2d<B>>,
    /// The GroupNorm before `conv_out`.
    pub conv_norm_out: GroupNorm<B>,
    /// The 3×3 convolution to `out_channels` (the image's channels).
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Self {
        let groups = config.norm_num_groups;
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let first = reversed[0];
        let mut input = first;
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &output)| {
                // One more resnet per block than the encoder has.
                let resnets = ResnetBlock2dConfig::new(input, output, groups, EPS)
                    .init_stack(config.layers_per_block + 1, device);
                let upsamplers = if i + 1 < reversed.len() {
                    vec![
                        Upsample2dConfig {
                            in_channels: output,
                            out_channels: output,
                        }
                        .init(device),
                    ]
                } else {
                    Vec::new()
                };
                input = output;
                UpDecoderBlock2d {
                    resnets,
                    upsamplers,
                }
            })
            .collect();
        let out_width = config.block_out_channels[0];
        Self {
            conv_in: conv2d(config.latent_channels, first, 3, 1, 1, device),
            mid_block: MidBlock2dConfig {
                channels: first,
                groups,
                eps: EPS,
                add_attention: config.mid_block_add_attention,
                temb_channels: None,
            }
            .init(device),
            up_blocks,
            conv_norm_out: group_norm(groups, out_width, EPS, device),
            conv_out: conv2d(out_width, config.out_channels, 3, 1, 1, device),
        }
    }

    /// `z`: latents `[batch, latent_channels, h, w]` after `post_quant_conv`; returns the image
    /// `[batch, out_channels, f·h, f·w]`, `f` the upsampling factor.
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d_forward(&self.conv_out, self.features(z))
    }

    /// What `conv_out` reads: everything before it, the last GroupNorm and SiLU included.
    /// Training needs it apart where a loss is weighed by its gradient at `conv_out`'s weight
    /// (the latent diffusion autoencoder's adaptive adversarial weight).
    pub fn features(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = conv2d_forward(&self.conv_in, z);
        let x = self.mid_block.forward(x, None);
        let x = self.up_blocks.iter().fold(x, |x, block| block.forward(x));
        sd_core::layers::group_norm_silu_2d(&self.conv_norm_out, x)
    }
}

/// The decoder half of `AutoencoderKL`: the 1×1 `post_quant_conv`, then [`Decoder`]. Its
/// parameter names are those of the diffusers state dict (`decoder.*`, `post_quant_conv.*`).
#[derive(Module, Debug)]
pub struct VaeDecoder<B: Backend> {
    /// The 1×1 convolution on the latents before the decoder; `None` when `use_post_quant_conv` is
    /// false.
    pub post_quant_conv: Option<Conv2d<B>>,
    /// The decoder proper (`decoder.*`).
    pub decoder: Decoder<B>,
    latent_channels: usize,
    scaling_factor: f64,
    shift_factor: f64,
    /// Side of a decoded tile in pixels (`sample_size`).
    sample_tile: usize,
    upsample_factor: usize,
    /// Tile large latents on [`VaeDecoder::decode`].
    tiled: bool,
}

impl<B: Backend> VaeDecoder<B> {
    /// The keys of a diffusers VAE file that this half takes.
    pub const WEIGHT_PREFIXES: &[&str] = &["decoder.", "post_quant_conv."];

    /// A decoder with random weights, shaped by `config`.
    pub fn new(config: &AutoencoderKlConfig, device: &B::Device) -> Result<Self> {
        config.check()?;
        let latent = config.latent_channels;
        Ok(Self {
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv2d(latent, latent, 1, 1, 0, device)),
            decoder: Decoder::new(config, device),
            latent_channels: latent,
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
            sample_tile: config.sample_size,
            upsample_factor: config.downsample_factor(),
            tiled: false,
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its `variant`, e.g. `fp16`), taking the `decoder.*` and `post_quant_conv.*` tensors.
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

    /// Decode latents larger than one tile in overlapping tiles (diffusers' `enable_tiling`).
    pub fn with_tiling(mut self, tiled: bool) -> Self {
        self.tiled = tiled;
        self
    }

    /// The model space → latent: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        z / self.scaling_factor + self.shift_factor
    }

    /// The tile geometry diffusers uses for this VAE.
    pub fn tiling(&self) -> Tiling {
        Tiling::new(self.sample_tile, self.upsample_factor)
    }

    /// `latents` (unscaled, as [`VaeDecoder::unscale_latents`] gives them): `[batch, latent, h, w]`.
    /// Returns images `[batch, out_channels, h·f, w·f]` in about `[-1, 1]`. With tiling on and a
    /// latent larger than a tile, decodes in tiles.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check(&latents)?;
        let [.., h, w] = latents.dims();
        let tile = self.tiling().latent_tile;
        if self.tiled && (h > tile || w > tile) {
            Ok(self.tiling().decode(latents, |t| self.forward(t)))
        } else {
            Ok(self.forward(latents))
        }
    }

    /// Always decodes in overlapping tiles blended together (diffusers' `tiled_decode`): memory
    /// is bounded by one tile whatever the image size.
    pub fn decode_tiled(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check(&latents)?;
        Ok(self.tiling().decode(latents, |t| self.forward(t)))
    }

    /// The decoder without input checks (for training loops).
    pub fn forward(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d_forward(&self.decoder.conv_out, self.features(latents))
    }

    /// [`Self::forward`] up to the input of the last convolution (`decoder.conv_out`), which
    /// maps it to the image.
    pub fn features(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv2d_forward(conv, latents),
            None => latents,
        };
        self.decoder.features(z)
    }

    fn check(&self, latents: &Tensor<B, 4>) -> Result<()> {
        let [b, c, h, w] = latents.dims();
        if c != self.latent_channels || b == 0 || h == 0 || w == 0 {
            return Err(CoreError::InvalidInput(format!(
                "the VAE decoder takes latents [batch, {}, h, w], got [{b}, {c}, {h}, {w}]",
                self.latent_channels
            )));
        }
        Ok(())
    }
}
