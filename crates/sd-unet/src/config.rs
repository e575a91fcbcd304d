//! `unet/config.json`: diffusers' `UNet2DConditionModel` configuration.

use std::path::Path;

use sd_core::Result;
use sd_core::config_checks::{
    self as checks, MAX_BLOCKS, MAX_CHANNELS, MAX_KERNEL, MAX_LAYERS, MAX_SAMPLE_SIZE, MAX_VOCAB,
    MAX_WIDTH,
};
use serde::Deserialize;

/// `only_cross_attention`: one flag for every block or one per block.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum FlagPerBlock {
    /// The same flag for every block.
    One(bool),
    /// One flag per block, in down-block order (the up path reads it reversed).
    Each(Vec<bool>),
}

impl Default for FlagPerBlock {
    fn default() -> Self {
        Self::One(false)
    }
}

/// A config value that is either one number for every block or one per block.
#[derive(Debug, Clone, PartialEq)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per block, in down-block order.
    Each(Vec<usize>),
}

impl<'de> Deserialize<'de> for PerBlock {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PerBlock;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number or a list of whole numbers (one per block)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<PerBlock, E> {
                usize::try_from(v)
                    .map(PerBlock::One)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<PerBlock, A::Error> {
                let mut values = Vec::new();
                while let Some(v) = seq.next_element::<usize>()? {
                    values.push(v);
                }
                Ok(PerBlock::Each(values))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// As diffusers writes it: one number, or a list with one per block.
impl serde::Serialize for PerBlock {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::One(v) => s.serialize_u64(*v as u64),
            Self::Each(v) => v.serialize(s),
        }
    }
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

    /// The field name of block `i`'s value: `name` for one value, `name[i]` for a list.
    fn field(&self, name: &str, i: usize) -> String {
        match self {
            Self::One(_) => name.to_string(),
            Self::Each(_) => format!("{name}[{i}]"),
        }
    }
}

/// diffusers' `UNet2DConditionModel` configuration, with its field names and defaults, for the
/// parts Stable Diffusion 1.x, 2.x, XL, inpainting and Turbo use.
///
/// A file must name the fields that set the shape ([`UNet2DConditionConfig::REQUIRED`]); every
/// value is checked by [`UNet2DConditionConfig::validate`] before anything is built. The bounds
/// are `sd_core::vae_config::checks`' constants.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent channels in (4, or 9 for inpainting): 1 to `MAX_CHANNELS`.
    pub in_channels: usize,
    /// Latent channels out: 1 to `MAX_CHANNELS`.
    pub out_channels: usize,
    /// Whether the timestep features are cos-first.
    pub flip_sin_to_cos: bool,
    /// `s` in the timestep frequencies `10000^(−k / (half − s))`: 0 to 1, below half the first
    /// block's channels.
    pub freq_shift: f64,
    /// `DownBlock2D` or `CrossAttnDownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D` or none.
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// Channels per level: 1 to `MAX_BLOCKS` entries, each a multiple of `norm_num_groups` and
    /// at most `MAX_CHANNELS`.
    pub block_out_channels: Vec<usize>,
    /// ResNets per down block (up blocks have one more): 1 to `MAX_LAYERS` each.
    pub layers_per_block: PerBlock,
    /// The padding of the downsampling convolutions: 1, or 0 for diffusers' asymmetric padding.
    pub downsample_padding: usize,
    /// The mid block's ResNet output divisor: above 0, at most `MAX_FACTOR`.
    pub mid_block_scale_factor: f64,
    /// The activation: only `silu`.
    pub act_fn: String,
    /// GroupNorm groups: at least 1, dividing every entry of `block_out_channels`.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon: above 0 and below 1.
    pub norm_eps: f64,
    /// The text context width per block: 1 to `MAX_CHANNELS`.
    pub cross_attention_dim: PerBlock,
    /// Transformer layers per cross-attention block: 1 to `MAX_LAYERS`.
    pub transformer_layers_per_block: PerBlock,
    /// In SD 1.x/2.x configs this is really the number of heads (a historic naming slip in
    /// diffusers); [`Self::num_attention_heads`] overrides it when present. At least 1,
    /// dividing the block's channels.
    pub attention_head_dim: PerBlock,
    /// Heads per block, when given (overrides `attention_head_dim`): at least 1, dividing the
    /// block's channels.
    pub num_attention_heads: Option<PerBlock>,
    /// Linear (SD 2.x, XL) rather than 1×1-convolution projections around the transformers.
    pub use_linear_projection: bool,
    /// Attention scores in f32 (SD 2.1).
    pub upcast_attention: bool,
    /// Blocks whose first attention attends to the context too instead of to the pixels (the x4
    /// upscaler's `[true, true, true, false]`).
    pub only_cross_attention: FlagPerBlock,
    /// Not supported: must be null.
    pub class_embed_type: Option<String>,
    /// Whether a class embedding is concatenated to the time embedding rather than added: only
    /// read with a class embedding (not supported), kept so that the config writes back whole.
    pub class_embeddings_concat: bool,
    /// `text_time` (SDXL) or null.
    pub addition_embed_type: Option<String>,
    /// SDXL: the width of each size/crop time id's features: 1 to `MAX_CHANNELS`.
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: the pooled text embedding plus the six time ids' features: 1 to `MAX_WIDTH`.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Only `default`.
    pub resnet_time_scale_shift: String,
    /// Only `positional`.
    pub time_embedding_type: String,
    /// Not supported (LCM's guidance embedding): must be null.
    pub time_cond_proj_dim: Option<usize>,
    /// Not supported: must be null.
    pub encoder_hid_dim: Option<usize>,
    /// Not supported: must be null.
    pub encoder_hid_dim_type: Option<String>,
    /// `conv_in`'s kernel side: odd, at most `MAX_KERNEL`.
    pub conv_in_kernel: usize,
    /// `conv_out`'s kernel side: odd, at most `MAX_KERNEL`.
    pub conv_out_kernel: usize,
    /// Not supported: must be false.
    pub dual_cross_attention: bool,
    /// Whether the input is mapped to `2x − 1` first.
    pub center_input_sample: bool,
    /// The latent side the model was trained at (64 for SD 1.x, 96 for SD 2.x 768², 128 for
    /// SDXL): pipelines default the image size to it times the VAE factor. 1 to
    /// `MAX_SAMPLE_SIZE`.
    pub sample_size: usize,
    /// Dropout (training only): 0 to 1.
    pub dropout: f64,
    /// The heads of the `text_image` addition embedding (unused here): 1 to `MAX_CHANNELS`.
    pub addition_embed_type_num_heads: usize,
    /// The output divisor of the ResNets of `ResnetDownsampleBlock2D`-style blocks (unused by
    /// the supported blocks): above 0, at most `MAX_FACTOR`.
    pub resnet_out_scale_factor: f64,
    /// Whether the ResNets of `ResnetDownsampleBlock2D`-style blocks skip the time embedding's
    /// activation (unused by the supported blocks), kept so that the config writes back whole.
    pub resnet_skip_time_act: bool,
    /// Only `default`.
    pub attention_type: String,
    /// Class-conditional U-Nets (the x4 upscaler's noise level): a learnt embedding per class
    /// added to the time embedding.
    pub num_class_embeds: Option<usize>,
    /// The time embedding width when not 4 × the first block's: only that width is supported.
    pub time_embedding_dim: Option<usize>,
    /// Not supported: must be null.
    pub time_embedding_act_fn: Option<String>,
    /// Not supported: must be null.
    pub timestep_post_act: Option<String>,
    /// Not supported: must be null.
    pub cross_attention_norm: Option<String>,
    /// Not supported (true): must be null or false.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Not supported: must be null.
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
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
            only_cross_attention: FlagPerBlock::One(false),
            class_embed_type: None,
            class_embeddings_concat: false,
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
            dropout: 0.0,
            addition_embed_type_num_heads: 64,
            resnet_out_scale_factor: 1.0,
            resnet_skip_time_act: false,
            attention_type: "default".into(),
            num_class_embeds: None,
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            cross_attention_norm: None,
            mid_block_only_cross_attention: None,
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim_type: None,
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
    /// Per down block: its transformers' first attention attends to the context.
    pub only_cross: Vec<bool>,
    /// The same for the mid block.
    pub mid_only_cross: bool,
}

impl UNet2DConditionConfig {
    /// Whether the checkpoint holds `module`'s weight (`down_blocks.0.attentions.0.proj_in`) as
    /// a 1×1 convolution, `[out, in, 1, 1]`, where this crate keeps a linear layer: the
    /// transformers' `proj_in`/`proj_out` unless `use_linear_projection` (SD 1.x). Writers of
    /// that weight, and of LoRA factors for it, use the convolution's shape.
    pub fn stores_linear_as_conv(&self, module: &str) -> bool {
        !self.use_linear_projection
            && (module.ends_with(".proj_in") || module.ends_with(".proj_out"))
    }

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

    /// The fields a `config.json` must name: those that set the U-Net's shape and have no
    /// default a real config relies on (every config diffusers has written carries them; the
    /// heads may be given either way). The others default as in diffusers.
    pub const REQUIRED: &'static [&'static [&'static str]] = &[
        &["in_channels"],
        &["out_channels"],
        &["block_out_channels"],
        &["down_block_types"],
        &["up_block_types"],
        &["layers_per_block"],
        &["cross_attention_dim"],
        &["attention_head_dim", "num_attention_heads"],
    ];

    /// The `config.json` diffusers writes for this U-Net (`_class_name`, `_diffusers_version`
    /// and every field under its diffusers name), so that `from_pretrained` opens it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("_class_name".into(), "UNet2DConditionModel".into());
            map.insert(
                "_diffusers_version".into(),
                sd_core::DIFFUSERS_VERSION.into(),
            );
        }
        value
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        checks::read_config(
            path.as_ref(),
            Self::REQUIRED,
            "UNet2DConditionModel config",
            Self::validate,
        )
    }

    /// Checks every field against its meaning and bounds (see the field docs), and the
    /// combinations the model is built from (list lengths, heads and groups dividing the
    /// channels); returns the first problem found, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.resolve().map(|_| ())
    }

    /// The time embedding width (4 × the first block's).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels.first().copied().unwrap_or(0) * 4
    }

    /// Whether the model needs SDXL's pooled text embedding and size/crop time ids.
    pub fn needs_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Checks the config (see [`Self::validate`]) and expands its per-block values; the first
    /// problem is the error.
    pub(crate) fn resolve(&self) -> std::result::Result<Resolved, String> {
        checks::sizes(
            "block_out_channels",
            &self.block_out_channels,
            MAX_CHANNELS,
            MAX_BLOCKS,
        )?;
        let n = self.block_out_channels.len();
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
        let per = |name: &str, v: &PerBlock, max: usize| {
            let values = v
                .expand(n)
                .ok_or_else(|| format!("{name} must have one value or one per block ({n})"))?;
            for (i, &x) in values.iter().enumerate() {
                checks::size(&v.field(name, i), x, max)?;
            }
            Ok::<_, String>(values)
        };
        let layers = per("layers_per_block", &self.layers_per_block, MAX_LAYERS)?;
        per("attention_head_dim", &self.attention_head_dim, MAX_CHANNELS)?;
        let (heads_field, heads) = match &self.num_attention_heads {
            Some(h) => ("num_attention_heads", h),
            None => ("attention_head_dim", &self.attention_head_dim),
        };
        let head_counts = per(heads_field, heads, MAX_CHANNELS)?;
        let cross_dims = per(
            "cross_attention_dim",
            &self.cross_attention_dim,
            MAX_CHANNELS,
        )?;
        let transformer_layers = per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
            MAX_LAYERS,
        )?;
        checks::size("in_channels", self.in_channels, MAX_CHANNELS)?;
        checks::size("out_channels", self.out_channels, MAX_CHANNELS)?;
        checks::size("norm_num_groups", self.norm_num_groups, MAX_CHANNELS)?;
        checks::size("sample_size", self.sample_size, MAX_SAMPLE_SIZE)?;
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            checks::size(field, k, MAX_KERNEL)?;
            if k.is_multiple_of(2) {
                return Err(format!("field `{field}` is {k}; it must be odd"));
            }
        }
        checks::at_most("downsample_padding", self.downsample_padding, 1)?;
        checks::size(
            "addition_embed_type_num_heads",
            self.addition_embed_type_num_heads,
            MAX_CHANNELS,
        )?;
        checks::optional_size(
            "addition_time_embed_dim",
            self.addition_time_embed_dim,
            MAX_CHANNELS,
        )?;
        checks::optional_size(
            "projection_class_embeddings_input_dim",
            self.projection_class_embeddings_input_dim,
            MAX_WIDTH,
        )?;
        checks::optional_size("time_embedding_dim", self.time_embedding_dim, MAX_WIDTH)?;
        checks::optional_size("time_cond_proj_dim", self.time_cond_proj_dim, MAX_WIDTH)?;
        checks::optional_size("encoder_hid_dim", self.encoder_hid_dim, MAX_WIDTH)?;
        checks::optional_size("num_class_embeds", self.num_class_embeds, MAX_VOCAB)?;
        checks::number("freq_shift", self.freq_shift, (0.0, false), (1.0, false))?;
        // The timestep features divide by `half − freq_shift`: it must stay positive.
        for (what, width) in [
            ("block_out_channels[0]", Some(self.block_out_channels[0])),
            ("addition_time_embed_dim", self.addition_time_embed_dim),
        ] {
            if let Some(half) = width.map(|w| w / 2).filter(|h| *h >= 1)
                && self.freq_shift >= half as f64
            {
                return Err(format!(
                    "field `freq_shift` is {}; it must be below half of {what} ({half})",
                    self.freq_shift
                ));
            }
        }
        checks::factor("mid_block_scale_factor", self.mid_block_scale_factor)?;
        checks::factor("resnet_out_scale_factor", self.resnet_out_scale_factor)?;
        checks::open_unit("norm_eps", self.norm_eps)?;
        checks::probability("dropout", self.dropout)?;
        let g = self.norm_num_groups;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if !c.is_multiple_of(g) {
                return Err(format!(
                    "field `block_out_channels[{i}]` is {c}, not a positive multiple of \
                     norm_num_groups {g}"
                ));
            }
            let h = head_counts[i];
            if !c.is_multiple_of(h) {
                return Err(format!(
                    "field `{}`: block {i}: {c} channels do not split into {h} heads",
                    heads.field(heads_field, i)
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
        if self.attention_type != "default" {
            return Err(unsupported("attention_type", self.attention_type.clone()));
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
        if self.dual_cross_attention {
            return Err("dual_cross_attention is not supported".into());
        }
        let only_cross = match &self.only_cross_attention {
            FlagPerBlock::One(v) => vec![*v; n],
            FlagPerBlock::Each(v) if v.len() == n => v.clone(),
            FlagPerBlock::Each(_) => {
                return Err(format!(
                    "only_cross_attention must be one flag or one per block ({n})"
                ));
            }
        };
        // diffusers: the mid block follows a single flag, and is plain self-attention when the
        // flags are per block.
        let mid_only_cross = self
            .mid_block_only_cross_attention
            .unwrap_or(matches!(self.only_cross_attention, FlagPerBlock::One(true)));
        if self.class_embeddings_concat {
            return Err(unsupported("class_embeddings_concat", "true".into()));
        }
        if let Some(d) = self
            .time_embedding_dim
            .filter(|d| *d != self.time_embed_dim())
        {
            return Err(format!(
                "unsupported time_embedding_dim `{d}` (only 4 × block_out_channels[0], {})",
                self.time_embed_dim()
            ));
        }
        if self.num_class_embeds.is_some() && self.class_embed_type.is_some() {
            return Err("num_class_embeds with a class_embed_type is not supported".into());
        }
        for (field, value) in [
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("cross_attention_norm", &self.cross_attention_norm),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
        ] {
            if let Some(v) = value {
                return Err(unsupported(field, v.clone()));
            }
        }
        if let Some(v) = &self.reverse_transformer_layers_per_block {
            return Err(unsupported(
                "reverse_transformer_layers_per_block",
                v.to_string(),
            ));
        }
        Ok(Resolved {
            down,
            up,
            layers,
            heads: head_counts,
            cross_dims,
            transformer_layers,
            mid_attention,
            only_cross,
            mid_only_cross,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_presets_are_valid() {
        for config in [
            UNet2DConditionConfig::sd15(),
            UNet2DConditionConfig::sd21(),
            UNet2DConditionConfig::sdxl(),
        ] {
            config.validate().unwrap();
        }
    }

    #[test]
    fn a_config_without_its_shape_is_refused() {
        let err = checks::parse::<UNet2DConditionConfig>("{}", UNet2DConditionConfig::REQUIRED)
            .unwrap_err();
        assert!(
            err.contains("missing required field `in_channels`"),
            "{err}"
        );
        let heads_missing = r#"{"in_channels": 4, "out_channels": 4,
            "block_out_channels": [32], "down_block_types": ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 32,
            "attention_head_dim": null}"#;
        let err =
            checks::parse::<UNet2DConditionConfig>(heads_missing, UNet2DConditionConfig::REQUIRED)
                .unwrap_err();
        assert!(
            err.contains("`attention_head_dim` or `num_attention_heads`"),
            "{err}"
        );
    }

    #[test]
    fn sizes_out_of_bounds_name_the_field() {
        let mut config = UNet2DConditionConfig::sd15();
        config.block_out_channels[1] = 0;
        assert_eq!(
            config.validate().unwrap_err(),
            "field `block_out_channels[1]` is 0; it must be at least 1"
        );
        let mut config = UNet2DConditionConfig::sdxl();
        config.transformer_layers_per_block = PerBlock::Each(vec![1, 2, 1_000_000_000]);
        assert_eq!(
            config.validate().unwrap_err(),
            "field `transformer_layers_per_block[2]` is 1000000000; it must be at most 256"
        );
        let mut config = UNet2DConditionConfig::sd15();
        config.norm_eps = 0.0;
        assert_eq!(
            config.validate().unwrap_err(),
            "field `norm_eps` is 0; it must be above 0 and below 1"
        );
        let mut config = UNet2DConditionConfig::sd15();
        config.block_out_channels = vec![32; 9];
        assert!(config.validate().unwrap_err().contains("at most 8"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err =
            checks::parse::<UNet2DConditionConfig>(r#"{"sample_size": "x"}"#, &[]).unwrap_err();
        assert!(
            err.starts_with("field `sample_size`: invalid type"),
            "{err}"
        );
        let err = checks::parse::<UNet2DConditionConfig>(r#"{"attention_head_dim": -1}"#, &[])
            .unwrap_err();
        assert!(err.starts_with("field `attention_head_dim`:"), "{err}");
        assert!(err.contains("a whole number or a list"), "{err}");
        let config: UNet2DConditionConfig =
            checks::parse(r#"{"attention_head_dim": [5, 10, 20]}"#, &[]).unwrap();
        assert_eq!(config.attention_head_dim, PerBlock::Each(vec![5, 10, 20]));
    }
}
