//! `vae/config.json`: diffusers' `AutoencoderKL` configuration.

use std::path::Path;

use serde::Deserialize;

use crate::error::{CoreError, Result};
use crate::weights::{SafetensorsFile, diffusers_weights_path};

/// The GroupNorm epsilon of every norm in the VAE, fixed in diffusers' `Encoder`/`Decoder`.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// diffusers' `AutoencoderKL` configuration, read from `vae/config.json` with the same field
/// names and defaults. Both VAE halves are built from it.
///
/// A file must name the fields that set the shape ([`AutoencoderKlConfig::REQUIRED`]); every
/// value is checked by [`AutoencoderKlConfig::validate`] before anything is built.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct AutoencoderKlConfig {
    /// Image channels in (3, RGB); at most [`MAX_CHANNELS`](crate::config_checks::MAX_CHANNELS).
    pub in_channels: usize,
    /// Image channels out (3, RGB); at most [`MAX_CHANNELS`](crate::config_checks::MAX_CHANNELS).
    pub out_channels: usize,
    /// One `DownEncoderBlock2D` per resolution level.
    pub down_block_types: Vec<String>,
    /// One `UpDecoderBlock2D` per resolution level.
    pub up_block_types: Vec<String>,
    /// The channels of each level: 1 to [`MAX_BLOCKS`](crate::config_checks::MAX_BLOCKS) entries, each a multiple of
    /// `norm_num_groups` and at most [`MAX_CHANNELS`](crate::config_checks::MAX_CHANNELS).
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block (the decoder has one more): 1 to [`MAX_LAYERS`](crate::config_checks::MAX_LAYERS).
    pub layers_per_block: usize,
    /// The activation: only `silu`.
    pub act_fn: String,
    /// Channels of the latent: 1 to [`MAX_CHANNELS`](crate::config_checks::MAX_CHANNELS).
    pub latent_channels: usize,
    /// GroupNorm groups: at least 1, dividing every entry of `block_out_channels`.
    pub norm_num_groups: usize,
    /// The training resolution; tiled decoding cuts latents into tiles of this size (÷ 2^(n-1)).
    /// 1 to [`MAX_SAMPLE_SIZE`](crate::config_checks::MAX_SAMPLE_SIZE).
    #[serde(deserialize_with = "sample_size")]
    pub sample_size: usize,
    /// Latents are multiplied by this after encoding (SD 1.x/2.x 0.18215, SDXL 0.13025): above
    /// 0 and at most [`MAX_FACTOR`](crate::config_checks::MAX_FACTOR).
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3 and Flux VAEs); absent for SD 1.x/2.x/XL.
    /// Finite, at most [`MAX_FACTOR`](crate::config_checks::MAX_FACTOR) either way.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics (Playground v2.5): not supported, must be absent.
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent statistics (Playground v2.5): not supported, must be absent.
    pub latents_std: Option<Vec<f64>>,
    /// Whether the encoder ends in a 1×1 `quant_conv`.
    pub use_quant_conv: bool,
    /// Whether the decoder starts with a 1×1 `post_quant_conv`.
    pub use_post_quant_conv: bool,
    /// The VAE overflows in f16 and must run in f32 (the SDXL VAE).
    pub force_upcast: bool,
    /// Whether the middle blocks have their attention layer.
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
            latents_mean: None,
            latents_std: None,
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
    /// The `config.json` diffusers writes for this VAE (`_class_name`, `_diffusers_version`
    /// and every field under its diffusers name), so that `from_pretrained` opens it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("_class_name".into(), "AutoencoderKL".into());
            map.insert("_diffusers_version".into(), crate::DIFFUSERS_VERSION.into());
        }
        value
    }

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

    /// The fields a `config.json` must name: those that set the VAE's shape, present in every
    /// config diffusers has written. The others default as in diffusers.
    pub const REQUIRED: &'static [&'static [&'static str]] = &[
        &["in_channels"],
        &["out_channels"],
        &["block_out_channels"],
        &["down_block_types"],
        &["up_block_types"],
        &["layers_per_block"],
        &["latent_channels"],
    ];

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::config_checks::read_config(
            path.as_ref(),
            Self::REQUIRED,
            "AutoencoderKL config",
            Self::validate,
        )
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

    /// Checks every field against its meaning and bounds (see the field docs and [`config_checks`](crate::config_checks));
    /// returns the first problem found, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use crate::config_checks::{MAX_BLOCKS, MAX_CHANNELS, MAX_LAYERS, MAX_SAMPLE_SIZE};
        crate::config_checks::sizes(
            "block_out_channels",
            &self.block_out_channels,
            MAX_CHANNELS,
            MAX_BLOCKS,
        )?;
        let n = self.block_out_channels.len();
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
        crate::config_checks::size("in_channels", self.in_channels, MAX_CHANNELS)?;
        crate::config_checks::size("out_channels", self.out_channels, MAX_CHANNELS)?;
        crate::config_checks::size("latent_channels", self.latent_channels, MAX_CHANNELS)?;
        crate::config_checks::size("layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        crate::config_checks::size("norm_num_groups", self.norm_num_groups, MAX_CHANNELS)?;
        crate::config_checks::size("sample_size", self.sample_size, MAX_SAMPLE_SIZE)?;
        let g = self.norm_num_groups;
        for (i, c) in self.block_out_channels.iter().enumerate() {
            if !c.is_multiple_of(g) {
                return Err(format!(
                    "field `block_out_channels[{i}]` is {c}, not a positive multiple of \
                     norm_num_groups {g}"
                ));
            }
        }
        crate::config_checks::factor("scaling_factor", self.scaling_factor)?;
        if let Some(shift) = self.shift_factor {
            crate::config_checks::number(
                "shift_factor",
                shift,
                (-crate::config_checks::MAX_FACTOR, false),
                (crate::config_checks::MAX_FACTOR, false),
            )?;
        }
        for (field, value) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if value.is_some() {
                return Err(format!(
                    "unsupported field `{field}`: per-channel latent statistics are not \
                     implemented (it must be null or absent)"
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_presets_are_valid() {
        AutoencoderKlConfig::sd15().validate().unwrap();
        AutoencoderKlConfig::sdxl().validate().unwrap();
    }

    #[test]
    fn configs_name_the_field_at_fault() {
        let err =
            crate::config_checks::parse::<AutoencoderKlConfig>("{}", AutoencoderKlConfig::REQUIRED)
                .unwrap_err();
        assert!(
            err.contains("missing required field `in_channels`"),
            "{err}"
        );
        let err =
            crate::config_checks::parse::<AutoencoderKlConfig>(r#"{"scaling_factor": "x"}"#, &[])
                .unwrap_err();
        assert!(
            err.starts_with("field `scaling_factor`: invalid type"),
            "{err}"
        );
        let err = crate::config_checks::parse::<AutoencoderKlConfig>(
            r#"{"block_out_channels": [64, -1]}"#,
            &[],
        )
        .unwrap_err();
        assert!(
            err.starts_with("field `block_out_channels[1]`: invalid value"),
            "{err}"
        );
        let err = crate::config_checks::parse::<AutoencoderKlConfig>("[1]", &[]).unwrap_err();
        assert!(err.contains("expected a JSON object"), "{err}");
        let mut config = AutoencoderKlConfig::sd15();
        config.scaling_factor = 1e9;
        assert_eq!(
            config.validate().unwrap_err(),
            "field `scaling_factor` is 1000000000; it must be above 0 and at most 100"
        );
        config = AutoencoderKlConfig::sd15();
        config.latent_channels = 0;
        assert_eq!(
            config.validate().unwrap_err(),
            "field `latent_channels` is 0; it must be at least 1"
        );
    }
}
