//! `unet/config.json`: diffusers' `UNet2DConditionModel` configuration.

use std::path::Path;

use sd_core::{CoreError, Result};
use serde::Deserialize;

/// A config value that is either one number for every block or one per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks; `None` when a list has another length.
    pub fn expand(&self, n: usize) -> Option<Vec<usize>> {
        match self {
            Self::One(v) => Some(vec![*v; n]),
            Self::Each(v) if v.len() == n => Some(v.clone()),
            Self::Each(_) => None,
        }
    }
}

/// diffusers' `UNet2DConditionModel` configuration, with its field names and defaults, for the
/// parts Stable Diffusion 1.x, 2.x, XL, inpainting and Turbo use.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    pub transformer_layers_per_block: PerBlock,
    /// In SD 1.x/2.x configs this is really the number of heads (a historic naming slip in
    /// diffusers); [`Self::num_attention_heads`] overrides it when present.
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub only_cross_attention: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_cond_proj_dim: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub dual_cross_attention: bool,
    pub center_input_sample: bool,
    /// The latent side the model was trained at (64 for SD 1.x, 96 for SD 2.x 768², 128 for
    /// SDXL): pipelines default the image size to it times the VAE factor.
    pub sample_size: usize,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            only_cross_attention: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_cond_proj_dim: None,
            encoder_hid_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            dual_cross_attention: false,
            center_input_sample: false,
            sample_size: 64,
        }
    }
}

/// A down or up block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// ResNets only (`DownBlock2D`, `UpBlock2D`).
    Plain,
    /// ResNets each followed by a transformer (`CrossAttnDownBlock2D`, `CrossAttnUpBlock2D`).
    CrossAttention,
}

/// The per-block numbers the model is built from, checked.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub down: Vec<BlockKind>,
    pub up: Vec<BlockKind>,
    pub layers: Vec<usize>,
    pub heads: Vec<usize>,
    pub cross_dims: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub mid_attention: bool,
}

impl UNet2DConditionConfig {
    /// Stable Diffusion 1.5's U-Net.
    pub fn sd15() -> Self {
        Self {
            cross_attention_dim: PerBlock::One(768),
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1's U-Net (linear projections, heads of 64 channels, upcast attention).
    pub fn sd21() -> Self {
        Self {
            cross_attention_dim: PerBlock::One(1024),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            sample_size: 96,
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// Stable Diffusion XL's U-Net.
    pub fn sdxl() -> Self {
        Self {
            down_block_types: [
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![320, 640, 1280],
            cross_attention_dim: PerBlock::One(2048),
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            sample_size: 128,
            ..Self::default()
        }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::Io {
            path: path.into(),
            source: e,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| CoreError::Config {
            path: path.into(),
            reason: format!("invalid UNet2DConditionModel config: {e}"),
        })?;
        config.resolve().map_err(|reason| CoreError::Config {
            path: path.into(),
            reason,
        })?;
        Ok(config)
    }

    /// The time embedding width (4 × the first block's).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels.first().copied().unwrap_or(0) * 4
    }

    /// Whether the model needs SDXL's pooled text embedding and size/crop time ids.
    pub fn needs_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Checks the config and expands its per-block values; the first problem is the error.
    pub(crate) fn resolve(&self) -> std::result::Result<Resolved, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        let kind = |t: &str, plain: &str, cross: &str| {
            if t == plain {
                Ok(BlockKind::Plain)
            } else if t == cross {
                Ok(BlockKind::CrossAttention)
            } else {
                Err(format!(
                    "unsupported block type `{t}` (expected {plain} or {cross})"
                ))
            }
        };
        let down = self
            .down_block_types
            .iter()
            .map(|t| kind(t, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let up = self
            .up_block_types
            .iter()
            .map(|t| kind(t, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if down.len() != n || up.len() != n {
            return Err(format!(
                "block_out_channels has {n} entries, down_block_types {} and up_block_types {}",
                down.len(),
                up.len()
            ));
        }
        let mid_attention = match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            Some("UNetMidBlock2D") | None => false,
            Some(other) => return Err(format!("unsupported mid_block_type `{other}`")),
        };
        let per = |name: &str, v: &PerBlock| {
            v.expand(n)
                .ok_or_else(|| format!("{name} must have one value or one per block ({n})"))
        };
        let layers = per("layers_per_block", &self.layers_per_block)?;
        let heads = per(
            "num_attention_heads",
            self.num_attention_heads
                .as_ref()
                .unwrap_or(&self.attention_head_dim),
        )?;
        let cross_dims = per("cross_attention_dim", &self.cross_attention_dim)?;
        let transformer_layers = per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        let g = self.norm_num_groups;
        if g == 0 {
            return Err("norm_num_groups is 0".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || !c.is_multiple_of(g) {
                return Err(format!(
                    "block_out_channels entry {c} is not a positive multiple of norm_num_groups {g}"
                ));
            }
            if heads[i] == 0 || !c.is_multiple_of(heads[i]) {
                return Err(format!(
                    "block {i}: {c} channels do not split into {} heads",
                    heads[i]
                ));
            }
        }
        let unsupported = |field: &str, value: String| format!("unsupported {field} `{value}`");
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", self.act_fn.clone()));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                self.time_embedding_type.clone(),
            ));
        }
        if let Some(c) = &self.class_embed_type {
            return Err(unsupported("class_embed_type", c.clone()));
        }
        if let Some(t) = self
            .addition_embed_type
            .as_deref()
            .filter(|t| *t != "text_time")
        {
            return Err(unsupported("addition_embed_type", t.into()));
        }
        if self.needs_text_time()
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return Err(
                "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim"
                    .into(),
            );
        }
        if self.time_cond_proj_dim.is_some() || self.encoder_hid_dim.is_some() {
            return Err("time_cond_proj_dim and encoder_hid_dim are not supported".into());
        }
        if self.only_cross_attention || self.dual_cross_attention {
            return Err("only_cross_attention and dual_cross_attention are not supported".into());
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        Ok(Resolved {
            down,
            up,
            layers,
            heads,
            cross_dims,
            transformer_layers,
            mid_attention,
        })
    }
}
