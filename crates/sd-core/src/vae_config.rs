//! `vae/config.json`: diffusers' `AutoencoderKL` configuration.

use std::path::Path;

use serde::Deserialize;

use crate::error::{CoreError, Result};
use crate::weights::{SafetensorsFile, diffusers_weights_path};

/// The GroupNorm epsilon of every norm in the VAE, fixed in diffusers' `Encoder`/`Decoder`.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// diffusers' `AutoencoderKL` configuration, read from `vae/config.json` with the same field
/// names and defaults. Both VAE halves are built from it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKlConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// The training resolution; tiled decoding cuts latents into tiles of this size (÷ 2^(n-1)).
    #[serde(deserialize_with = "sample_size")]
    pub sample_size: usize,
    /// Latents are multiplied by this after encoding (SD 1.x/2.x 0.18215, SDXL 0.13025).
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3 and Flux VAEs); absent for SD 1.x/2.x/XL.
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    /// The VAE overflows in f16 and must run in f32 (the SDXL VAE).
    pub force_upcast: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKlConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            force_upcast: true,
            mid_block_add_attention: true,
        }
    }
}

fn sample_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Many(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::One(n) => Ok(n),
        Size::Many(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

impl AutoencoderKlConfig {
    /// The VAE of Stable Diffusion 1.x and 2.x.
    pub fn sd15() -> Self {
        let blocks = 4;
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); blocks],
            up_block_types: vec!["UpDecoderBlock2D".into(); blocks],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 512,
            ..Self::default()
        }
    }

    /// The VAE of Stable Diffusion XL: the SD 1.x shape with another scaling factor, run in f32.
    pub fn sdxl() -> Self {
        Self {
            sample_size: 1024,
            scaling_factor: 0.13025,
            ..Self::sd15()
        }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| CoreError::config(path, format!("invalid AutoencoderKL config: {e}")))?;
        config
            .validate()
            .map_err(|reason| CoreError::config(path, reason))?;
        Ok(config)
    }

    /// Reads a diffusers `vae/` folder: its `config.json` and its weights file
    /// (`diffusion_pytorch_model[.{variant}].safetensors`), both validated.
    pub fn load_folder(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
    ) -> Result<(Self, SafetensorsFile)> {
        let dir = dir.as_ref();
        let config = Self::from_file(dir.join("config.json"))?;
        let file = SafetensorsFile::open(diffusers_weights_path(dir, variant)?)?;
        Ok((config, file))
    }

    /// [`AutoencoderKlConfig::validate`] as a [`CoreError`], for configs built in code.
    pub fn check(&self) -> Result<()> {
        self.validate()
            .map_err(|reason| CoreError::config("<AutoencoderKlConfig>", reason))
    }

    /// Checks what the layers would otherwise assert on; returns the first problem found.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "block_out_channels has {n} entries but down_block_types has {} and up_block_types {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!(
                "unsupported down block type `{t}` (expected DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(format!(
                "unsupported up block type `{t}` (expected UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "unsupported act_fn `{}` (expected silu)",
                self.act_fn
            ));
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return Err("norm_num_groups is 0".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c == 0 || **c % g != 0)
        {
            return Err(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {g}"
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err("in_channels, out_channels and latent_channels must be positive".into());
        }
        if self.layers_per_block == 0 {
            return Err("layers_per_block is 0".into());
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            return Err(format!(
                "scaling_factor {} is not usable",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// How many pixels one latent covers along each side: `2^(blocks - 1)` (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Latent → model space: `(z - shift) * scale`.
    pub fn scale_latents<B: burn::tensor::backend::Backend>(
        &self,
        z: burn::tensor::Tensor<B, 4>,
    ) -> burn::tensor::Tensor<B, 4> {
        (z - self.shift_factor.unwrap_or(0.0)) * self.scaling_factor
    }

    /// Model space → latent: `z / scale + shift`.
    pub fn unscale_latents<B: burn::tensor::backend::Backend>(
        &self,
        z: burn::tensor::Tensor<B, 4>,
    ) -> burn::tensor::Tensor<B, 4> {
        z / self.scaling_factor + self.shift_factor.unwrap_or(0.0)
    }
}
