use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use sd_core::layers::{conv2d, conv2d_forward, group_norm};
use sd_core::weights::{
    LoadOptions, SafetensorsFile, TensorSnapshot, diffusers_weights_path, load_safetensors,
    module_tensors, reshaped, save_tensors,
};
use sd_core::{CoreError, Result};

use crate::blocks::{BlockSettings, DownBlock, MidBlock, UpBlock};
use crate::config::{BlockKind, UNet2DConditionConfig};
use crate::embeddings::{TimestepEmbedding, timestep_embedding};

/// SDXL's extra conditioning: the pooled text embedding and the six size/crop time ids
/// (original height, width, crop top, left, target height, width).
#[derive(Debug, Clone)]
pub struct TextTimeConditioning<B: Backend> {
    /// `[batch, pooled dim]`.
    pub text_embeds: Tensor<B, 2>,
    /// `[batch, 6]` as numbers (pixels).
    pub time_ids: Vec<[f64; 6]>,
}

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
        let settings = |i: usize, kind: BlockKind, only_cross: bool| BlockSettings {
            temb,
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
        };
        let mut cin = ch[0];
        let down_blocks = (0..n)
            .map(|i| {
                let last = i + 1 == n;
                let block = DownBlock::new(
                    settings(i, r.down[i], r.only_cross[i]),
                    cin,
                    ch[i],
                    r.layers[i],
                    (!last).then_some(config.downsample_padding),
                    device,
                );
                cin = ch[i];
                block
            })
            .collect();
        let mid_block = config.mid_block_type.as_ref().map(|_| {
            let kind = if r.mid_attention {
                BlockKind::CrossAttention
            } else {
                BlockKind::Plain
            };
            MidBlock::new(
                settings(n - 1, kind, r.mid_only_cross),
                ch[n - 1],
                config.mid_block_scale_factor,
                device,
            )
        });
        let mut prev = ch[n - 1];
        let up_blocks = (0..n)
            .map(|i| {
                // Up block i mirrors down block n−1−i.
                let d = n - 1 - i;
                let skip_in = ch[d.saturating_sub(1)];
                let block = UpBlock::new(
                    settings(d, r.up[i], r.only_cross[d]),
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
        let add_embedding = config.needs_text_time().then(|| {
            TimestepEmbedding::new(
                config.projection_class_embeddings_input_dim.unwrap_or(0),
                temb,
                device,
            )
        });
        let (kin, kout) = (config.conv_in_kernel, config.conv_out_kernel);
        Ok(Self {
            conv_in: conv2d(config.in_channels, ch[0], kin, 1, kin / 2, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            add_embedding,
            class_embedding: config
                .num_class_embeds
                .map(|classes| EmbeddingConfig::new(classes, temb).init(device)),
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
        load_safetensors(self, file, &diffusers_key, options)
    }

    /// The weights under diffusers' key names (the inverse of [`Self::load_weights`]'s map)
    /// and shapes (the transformers' projections as 1×1 convolutions unless
    /// `use_linear_projection`), read lazily.
    pub fn weight_tensors(&self, config: &UNet2DConditionConfig) -> Vec<(String, TensorSnapshot)> {
        module_tensors(self, &checkpoint_key)
            .into_iter()
            .map(|(key, t)| {
                let projection =
                    key.ends_with(".proj_in.weight") || key.ends_with(".proj_out.weight");
                match t.shape.as_slice() {
                    [o, i] if projection && !config.use_linear_projection => {
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
        let map = |key: &str| {
            crate::single_file::ldm_to_diffusers_key(key, layers).and_then(|k| diffusers_key(&k))
        };
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
        self.forward_with_classes(latents, timesteps, context, text_time, None)
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
        let [b, c, h, w] = latents.dims();
        let [cb, _, cdim] = context.dims();
        let invalid = |m: String| Err(CoreError::InvalidInput(m));
        if c != self.in_channels {
            return invalid(format!(
                "the U-Net takes {} latent channels, got {c}",
                self.in_channels
            ));
        }
        if cb != b || cdim != self.context_dim {
            return invalid(format!(
                "context [{cb}, _, {cdim}] does not fit latents of batch {b} and a U-Net with \
                 cross_attention_dim {}",
                self.context_dim
            ));
        }
        if timesteps.len() != b && timesteps.len() != 1 {
            return invalid(format!("{} timesteps for a batch of {b}", timesteps.len()));
        }
        if h == 0 || w == 0 {
            return invalid("empty latent".into());
        }
        let device = latents.device();
        let t: Vec<f64> = if timesteps.len() == 1 {
            vec![timesteps[0]; b]
        } else {
            timesteps.to_vec()
        };
        let t_emb = timestep_embedding::<B>(
            &t,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            &device,
        );
        let mut emb = self.time_embedding.forward(t_emb);
        match (&self.class_embedding, class_labels) {
            (Some(table), Some(labels)) => {
                let classes = table.weight.dims()[0];
                if labels.len() != b {
                    return invalid(format!("{} class labels for a batch of {b}", labels.len()));
                }
                if let Some(bad) = labels.iter().find(|&&l| l >= classes) {
                    return invalid(format!(
                        "class label {bad} is outside the U-Net's {classes} classes"
                    ));
                }
                let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
                let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b]), &device);
                let class_emb = table.forward(ids.unsqueeze::<2>()).reshape([b as i32, -1]);
                emb = emb + class_emb;
            }
            (Some(_), None) => {
                return invalid(
                    "this U-Net is class-conditional (num_class_embeds): it needs class labels"
                        .into(),
                );
            }
            (None, Some(_)) => return invalid("this U-Net takes no class labels".into()),
            (None, None) => {}
        }
        match (&self.add_embedding, text_time) {
            (Some(add), Some(tt)) => {
                if tt.time_ids.len() != b || tt.text_embeds.dims()[0] != b {
                    return invalid(format!("SDXL conditioning is not for a batch of {b}"));
                }
                let flat: Vec<f64> = tt.time_ids.iter().flatten().copied().collect();
                let time_embeds = timestep_embedding::<B>(
                    &flat,
                    self.add_time_dim,
                    self.flip_sin_to_cos,
                    self.freq_shift,
                    &device,
                )
                .reshape([b as i32, -1]);
                let add_in = Tensor::cat(vec![tt.text_embeds.clone(), time_embeds], 1);
                let expected = add.linear_1.weight.dims()[0];
                if add_in.dims()[1] != expected {
                    return invalid(format!(
                        "SDXL add-embedding input is {} wide (pooled text + 6 time ids), the U-Net expects {expected}",
                        add_in.dims()[1]
                    ));
                }
                emb = emb + add.forward(add_in);
            }
            (Some(_), None) => {
                return invalid(
                    "this is an SDXL U-Net: it needs the pooled text embedding and the time ids"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return invalid("this U-Net takes no SDXL text/time conditioning".into());
            }
            (None, None) => {}
        }

        let mut x = conv2d_forward(&self.conv_in, latents);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &context, &mut skips);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, &emb, &context);
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

/// diffusers' feed-forward keys (`ff.net.0.proj`, `ff.net.2`) onto [`crate::FeedForward`]'s.
/// A module path as diffusers names the parameter: the inverse of the key map the weights load
/// through, and what LoRA files name the weights they adapt by.
pub fn checkpoint_key(path: &str) -> Option<String> {
    Some(
        path.replace(".ff.geglu.", ".ff.net.0.proj.")
            .replace(".ff.proj_out.", ".ff.net.2."),
    )
}

fn diffusers_key(key: &str) -> Option<String> {
    Some(
        key.replace(".ff.net.0.proj.", ".ff.geglu.")
            .replace(".ff.net.2.", ".ff.proj_out."),
    )
}
