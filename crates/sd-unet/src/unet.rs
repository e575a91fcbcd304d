use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::{conv2d, conv2d_forward, group_norm};
use sd_core::weights::{
    LoadOptions, SafetensorsFile, TensorSnapshot, diffusers_weights_path, load_safetensors,
    module_tensors, reshaped, save_tensors,
};
use sd_core::{CoreError, Result};

use crate::blocks::{BlockSettings, DownBlock, MidBlock, UpBlock};
use crate::conditioning::{TextTimeConditioning, TimeEmbedder, UNetConditioning, check_inputs};
use crate::config::{BlockKind, Resolved, UNet2DConditionConfig};
use crate::embeddings::TimestepEmbedding;

/// diffusers' `UNet2DConditionModel`: predicts the noise (or v) in a latent at a timestep,
/// attending to a text context.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    /// The convolution from the latent's `in_channels` to the first block's width.
    pub conv_in: Conv2d<B>,
    /// The MLP that widens the sinusoidal timestep features.
    pub time_embedding: TimestepEmbedding<B>,
    /// SDXL's `add_embedding`, present with `addition_embed_type: "text_time"`.
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// A learnt time-embedding offset per class (`num_class_embeds`; the x4 upscaler's noise
    /// level), added to the time embedding.
    pub class_embedding: Option<Embedding<B>>,
    /// The down path, narrowest block first.
    pub down_blocks: Vec<DownBlock<B>>,
    /// The block at the lowest resolution; `None` when `mid_block_type` is null.
    pub mid_block: Option<MidBlock<B>>,
    /// The up path, widest block first.
    pub up_blocks: Vec<UpBlock<B>>,
    /// The GroupNorm before `conv_out`.
    pub conv_norm_out: GroupNorm<B>,
    /// The convolution to `out_channels`: the prediction.
    pub conv_out: Conv2d<B>,
    in_channels: usize,
    context_dim: usize,
    time_proj_dim: usize,
    add_time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    /// How many times the latent is halved: its sides must divide by `2^downsamples` unless
    /// the up path is told the skip sizes (it is, as diffusers does).
    downsamples: usize,
    /// The image-prompt tokens the cross-attentions expect at the end of the context: 0
    /// without an IP-Adapter ([`Self::with_ip_adapter`]).
    pub(crate) image_tokens: usize,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// A U-Net with random weights, shaped by `config`.
    pub fn new(config: &UNet2DConditionConfig, device: &B::Device) -> Result<Self> {
        let r = config.resolve().map_err(|reason| CoreError::Config {
            path: "<UNet2DConditionConfig>".into(),
            reason,
        })?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = config.time_embed_dim();
        let down_blocks = down_path(config, &r, device);
        let mid_block = mid_block(config, &r, device);
        let mut prev = ch[n - 1];
        let up_blocks = (0..n)
            .map(|i| {
                // Up block i mirrors down block n−1−i.
                let d = n - 1 - i;
                let skip_in = ch[d.saturating_sub(1)];
                let block = UpBlock::new(
                    block_settings(config, &r, d, r.up[i], r.only_cross[d]),
                    prev,
                    ch[d],
                    skip_in,
                    r.layers[d] + 1,
                    i + 1 < n,
                    device,
                );
                prev = ch[d];
                block
            })
            .collect();
        let (kin, kout) = (config.conv_in_kernel, config.conv_out_kernel);
        Ok(Self {
            conv_in: conv2d(config.in_channels, ch[0], kin, 1, kin / 2, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            add_embedding: add_embedding(config, device),
            class_embedding: class_embedding(config, device),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(config.norm_num_groups, ch[0], config.norm_eps, device),
            conv_out: conv2d(ch[0], config.out_channels, kout, 1, kout / 2, device),
            in_channels: config.in_channels,
            context_dim: r.cross_dims[0],
            time_proj_dim: ch[0],
            add_time_dim: config.addition_time_embed_dim.unwrap_or(0),
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            downsamples: n - 1,
            image_tokens: 0,
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its `variant`, e.g. `fp16`).
    pub fn from_pretrained(
        unet_dir: impl AsRef<Path>,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self> {
        let dir = unet_dir.as_ref();
        let config = UNet2DConditionConfig::from_file(dir.join("config.json"))?;
        let file = SafetensorsFile::open(diffusers_weights_path(dir, variant)?)?;
        Self::new(&config, device)?.load_weights(&file, LoadOptions::default())
    }

    /// Fills the weights from a file in the diffusers layout.
    pub fn load_weights(self, file: &SafetensorsFile, options: LoadOptions) -> Result<Self> {
        load_safetensors(self, file, &|key| Some(key.to_string()), options)
    }

    /// The weights under diffusers' key names (the inverse of [`Self::load_weights`]'s map)
    /// and shapes (the transformers' projections as 1×1 convolutions unless
    /// `use_linear_projection`), read lazily.
    pub fn weight_tensors(&self, config: &UNet2DConditionConfig) -> Vec<(String, TensorSnapshot)> {
        module_tensors(self, &checkpoint_key)
            .into_iter()
            .map(|(key, t)| {
                let conv = key
                    .strip_suffix(".weight")
                    .is_some_and(|m| config.stores_linear_as_conv(m));
                match t.shape.as_slice() {
                    [o, i] if conv => {
                        let shape = vec![*o, *i, 1, 1];
                        (key, reshaped(t, shape))
                    }
                    _ => (key, t),
                }
            })
            .collect()
    }

    /// Saves the weights as diffusers' `diffusion_pytorch_model.safetensors` for a U-Net of
    /// `config` ([`Self::weight_tensors`]), in `dtype`, written atomically.
    pub fn save_weights(
        &self,
        config: &UNet2DConditionConfig,
        path: impl AsRef<Path>,
        dtype: burn::tensor::DType,
    ) -> Result<()> {
        let metadata = std::collections::BTreeMap::from([("format".into(), "pt".into())]);
        save_tensors(self.weight_tensors(config), path, dtype, Some(&metadata))
    }

    /// The weights under the original single-file layout's keys (`model.diffusion_model.…`,
    /// [`crate::diffusers_to_ldm_key`]): the inverse of [`Self::load_single_file`].
    pub fn single_file_tensors(
        &self,
        config: &UNet2DConditionConfig,
    ) -> Result<Vec<(String, TensorSnapshot)>> {
        let crate::PerBlock::One(layers) = config.layers_per_block else {
            return Err(CoreError::Config {
                path: "unet/config.json".into(),
                reason: "single-file checkpoints need one layers_per_block for every block".into(),
            });
        };
        let up: Vec<bool> = config
            .up_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        self.weight_tensors(config)
            .into_iter()
            .map(
                |(key, t)| match crate::diffusers_to_ldm_key(&key, layers, &up) {
                    Some(ldm) => Ok((ldm, t)),
                    None => Err(CoreError::Config {
                        path: "unet/config.json".into(),
                        reason: format!(
                            "the U-Net weight `{key}` has no place in the single-file layout"
                        ),
                    }),
                },
            )
            .collect()
    }

    /// Fills the weights from a single-file checkpoint in the original layout
    /// (`model.diffusion_model.*`); the file's other components are ignored.
    pub fn load_single_file(
        self,
        file: &SafetensorsFile,
        config: &UNet2DConditionConfig,
        options: LoadOptions,
    ) -> Result<Self> {
        let crate::PerBlock::One(layers) = config.layers_per_block else {
            return Err(CoreError::Config {
                path: file.path().into(),
                reason: "single-file checkpoints need one layers_per_block for every block".into(),
            });
        };
        let map = |key: &str| crate::single_file::ldm_to_diffusers_key(key, layers);
        load_safetensors(self, file, &map, options)
    }

    /// The number of parameters (weights and biases).
    pub fn parameter_count(&self) -> usize {
        self.num_params()
    }

    /// `latents`: `[batch, in_channels, h, w]`; `timesteps`: one per sample (fractional allowed);
    /// `context`: `[batch, tokens, cross_attention_dim]`; `text_time`: SDXL's extra
    /// conditioning, required exactly when the config has `addition_embed_type: "text_time"`.
    pub fn forward(
        &self,
        latents: Tensor<B, 4>,
        timesteps: &[f64],
        context: Tensor<B, 3>,
        text_time: Option<&TextTimeConditioning<B>>,
    ) -> Result<Tensor<B, 4>> {
        let cond = UNetConditioning {
            text_time,
            ..UNetConditioning::text(context)
        };
        self.forward_conditioned(latents, timesteps, &cond)
    }

    /// [`Self::forward`] for class-conditional U-Nets (`num_class_embeds`): `class_labels`, one
    /// per sample (the x4 upscaler's noise level), are required exactly when the config has
    /// classes.
    pub fn forward_with_classes(
        &self,
        latents: Tensor<B, 4>,
        timesteps: &[f64],
        context: Tensor<B, 3>,
        text_time: Option<&TextTimeConditioning<B>>,
        class_labels: Option<&[usize]>,
    ) -> Result<Tensor<B, 4>> {
        let cond = UNetConditioning {
            text_time,
            class_labels,
            ..UNetConditioning::text(context)
        };
        self.forward_conditioned(latents, timesteps, &cond)
    }

    /// The time-embedding parts, borrowed.
    pub(crate) fn time_embedder(&self) -> TimeEmbedder<'_, B> {
        TimeEmbedder {
            time_embedding: &self.time_embedding,
            class_embedding: self.class_embedding.as_ref(),
            add_embedding: self.add_embedding.as_ref(),
            time_proj_dim: self.time_proj_dim,
            add_time_dim: self.add_time_dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        }
    }

    /// One prediction under everything in `cond`: the text context, SDXL's and class
    /// conditioning, and ControlNet residuals added to the skip connections and the mid block
    /// (diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`).
    pub fn forward_conditioned(
        &self,
        latents: Tensor<B, 4>,
        timesteps: &[f64],
        cond: &UNetConditioning<'_, B>,
    ) -> Result<Tensor<B, 4>> {
        check_inputs("U-Net", self.in_channels, self.context_dim, &latents, cond)?;
        let [b, _, h, w] = latents.dims();
        let context = cond.context.clone();
        let cdim = self.context_dim;
        let invalid = |m: String| Err(CoreError::InvalidInput(m));
        let device = latents.device();
        let emb = self.time_embedder().embed(timesteps, b, cond, &device)?;
        let context = match (&cond.image_prompt, self.image_tokens) {
            (Some(tokens), n) if n > 0 => {
                let [tb, tn, tw] = tokens.dims();
                if (tb, tn, tw) != (b, n, cdim) {
                    return invalid(format!(
                        "image-prompt tokens [{tb}, {tn}, {tw}] do not fit a batch of {b} and an \
                         IP-Adapter of {n} tokens of width {cdim}"
                    ));
                }
                Tensor::cat(vec![context, tokens.clone()], 1)
            }
            (Some(_), _) => {
                return invalid(
                    "image-prompt tokens for a U-Net without an IP-Adapter attached".into(),
                );
            }
            (None, n) if n > 0 => {
                return invalid(
                    "this U-Net has an IP-Adapter attached: it needs the image prompt's tokens"
                        .into(),
                );
            }
            (None, _) => context,
        };

        let mut x = conv2d_forward(&self.conv_in, latents);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &context, &mut skips);
        }
        if let Some(control) = cond.control {
            skips = add_residuals(skips, &control.down)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, &emb, &context);
        }
        if let Some(control) = cond.control {
            x = add_residuals(vec![x], std::slice::from_ref(&control.mid))?.remove(0);
        }
        // diffusers passes the skip's size to the upsamplers when a side does not divide.
        let uneven = [h, w].iter().any(|s| s % (1 << self.downsamples) != 0);
        for block in &self.up_blocks {
            let take = block.resnets.len();
            if skips.len() < take {
                return invalid("internal: skip connections exhausted".into());
            }
            let size = if uneven && !block.upsamplers.is_empty() {
                let next = &skips[skips.len() - take - 1];
                let [.., sh, sw] = next.dims();
                Some([sh, sw])
            } else {
                None
            };
            x = block.forward(x, &emb, &context, &mut skips, size);
        }
        Ok(conv2d_forward(
            &self.conv_out,
            sd_core::layers::group_norm_silu_2d(&self.conv_norm_out, x),
        ))
    }
}

/// `states[i] + residuals[i]`, each residual of the state's shape or pooled to `[b, c, 1, 1]`
/// (a ControlNet with `global_pool_conditions`).
fn add_residuals<B: Backend>(
    states: Vec<Tensor<B, 4>>,
    residuals: &[Tensor<B, 4>],
) -> Result<Vec<Tensor<B, 4>>> {
    if states.len() != residuals.len() {
        return Err(CoreError::InvalidInput(format!(
            "{} ControlNet residuals for a U-Net with {} skip connections",
            residuals.len(),
            states.len()
        )));
    }
    states
        .into_iter()
        .zip(residuals)
        .enumerate()
        .map(|(i, (state, residual))| {
            let [sb, sc, sh, sw] = state.dims();
            let [rb, rc, rh, rw] = residual.dims();
            if rb != sb || rc != sc || !((rh, rw) == (sh, sw) || (rh, rw) == (1, 1)) {
                return Err(CoreError::InvalidInput(format!(
                    "ControlNet residual {i} is [{rb}, {rc}, {rh}, {rw}], the U-Net's state there \
                     is [{sb}, {sc}, {sh}, {sw}]"
                )));
            }
            Ok(state + residual.clone())
        })
        .collect()
}

/// The settings of block `i` of `kind`, shared by the U-Net and the ControlNet.
pub(crate) fn block_settings(
    config: &UNet2DConditionConfig,
    r: &Resolved,
    i: usize,
    kind: BlockKind,
    only_cross: bool,
) -> BlockSettings {
    BlockSettings {
        temb: config.time_embed_dim(),
        groups: config.norm_num_groups,
        eps: config.norm_eps,
        attention: (kind == BlockKind::CrossAttention).then(|| {
            (
                r.heads[i],
                r.transformer_layers[i],
                r.cross_dims[i],
                only_cross,
            )
        }),
    }
}

/// The down path of a U-Net (or of its ControlNet copy).
pub(crate) fn down_path<B: Backend>(
    config: &UNet2DConditionConfig,
    r: &Resolved,
    device: &B::Device,
) -> Vec<DownBlock<B>> {
    let ch = &config.block_out_channels;
    let n = ch.len();
    let mut cin = ch[0];
    (0..n)
        .map(|i| {
            let last = i + 1 == n;
            let block = DownBlock::new(
                block_settings(config, r, i, r.down[i], r.only_cross[i]),
                cin,
                ch[i],
                r.layers[i],
                (!last).then_some(config.downsample_padding),
                device,
            );
            cin = ch[i];
            block
        })
        .collect()
}

/// The mid block, `None` when `mid_block_type` is null.
pub(crate) fn mid_block<B: Backend>(
    config: &UNet2DConditionConfig,
    r: &Resolved,
    device: &B::Device,
) -> Option<MidBlock<B>> {
    let n = config.block_out_channels.len();
    config.mid_block_type.as_ref().map(|_| {
        let kind = if r.mid_attention {
            BlockKind::CrossAttention
        } else {
            BlockKind::Plain
        };
        MidBlock::new(
            block_settings(config, r, n - 1, kind, r.mid_only_cross),
            config.block_out_channels[n - 1],
            config.mid_block_scale_factor,
            device,
        )
    })
}

/// SDXL's `add_embedding`, present with `addition_embed_type: "text_time"`.
pub(crate) fn add_embedding<B: Backend>(
    config: &UNet2DConditionConfig,
    device: &B::Device,
) -> Option<TimestepEmbedding<B>> {
    config.needs_text_time().then(|| {
        TimestepEmbedding::new(
            config.projection_class_embeddings_input_dim.unwrap_or(0),
            config.time_embed_dim(),
            device,
        )
    })
}

/// The class embedding table of class-conditional models.
pub(crate) fn class_embedding<B: Backend>(
    config: &UNet2DConditionConfig,
    device: &B::Device,
) -> Option<Embedding<B>> {
    config
        .num_class_embeds
        .map(|classes| EmbeddingConfig::new(classes, config.time_embed_dim()).init(device))
}

/// A module path as diffusers names the parameter, and what LoRA files name the weights they
/// adapt by: the path itself, since the module tree is diffusers' key tree.
pub fn checkpoint_key(path: &str) -> Option<String> {
    Some(path.to_string())
}
