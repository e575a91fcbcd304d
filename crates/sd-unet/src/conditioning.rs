//! What steers one denoising step besides the latent and the timestep, in one description that
//! the U-Net and the ControlNet both read: the text context, SDXL's pooled text and size ids,
//! class labels (the x4 upscaler's noise level) and ControlNet residuals. A new kind of
//! conditioning is one more field here, not one more argument through every pipeline.

use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use sd_core::layers::to_dtype;
use sd_core::{CoreError, Result};

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

/// A ControlNet's output for one step (Zhang et al. 2023, sec. 3.2): one residual per skip
/// connection of the U-Net's down path (the `conv_in` output first) and one for the mid block,
/// already scaled. Several ControlNets add up ([`ControlResiduals::sum`]).
#[derive(Debug, Clone)]
pub struct ControlResiduals<B: Backend> {
    /// One per skip connection, in the order the down path produces them.
    pub down: Vec<Tensor<B, 4>>,
    /// Added to the mid block's output.
    pub mid: Tensor<B, 4>,
}

impl<B: Backend> ControlResiduals<B> {
    /// The sum of two ControlNets' residuals (diffusers' `MultiControlNetModel`).
    pub fn sum(self, other: Self) -> Result<Self> {
        if self.down.len() != other.down.len() {
            return Err(CoreError::InvalidInput(format!(
                "ControlNets with {} and {} residuals cannot be combined",
                self.down.len(),
                other.down.len()
            )));
        }
        Ok(Self {
            down: self
                .down
                .into_iter()
                .zip(other.down)
                .map(|(a, b)| a + b)
                .collect(),
            mid: self.mid + other.mid,
        })
    }

    /// Every residual times `factor`.
    pub fn scale(self, factor: f64) -> Self {
        Self {
            down: self.down.into_iter().map(|d| d * factor).collect(),
            mid: self.mid * factor,
        }
    }

    /// `[zeros; residuals]` along the batch: guess mode under classifier-free guidance runs the
    /// ControlNet on the conditional half only, and the unconditional half gets nothing.
    pub fn behind_zeros(self) -> Self {
        let pad = |t: Tensor<B, 4>| Tensor::cat(vec![t.zeros_like(), t], 0);
        Self {
            down: self.down.into_iter().map(pad).collect(),
            mid: pad(self.mid),
        }
    }
}

/// Everything besides the latent and the timestep that steers one U-Net (or ControlNet)
/// evaluation.
#[derive(Debug, Clone)]
pub struct UNetConditioning<'a, B: Backend> {
    /// The text encoders' hidden states, `[batch, tokens, cross_attention_dim]`.
    pub context: Tensor<B, 3>,
    /// SDXL's pooled text embedding and size ids; required exactly when the model has
    /// `addition_embed_type: "text_time"`.
    pub text_time: Option<&'a TextTimeConditioning<B>>,
    /// One class per sample for class-conditional models (`num_class_embeds`).
    pub class_labels: Option<&'a [usize]>,
    /// ControlNet residuals to add to the skip connections and the mid block (U-Net only).
    pub control: Option<&'a ControlResiduals<B>>,
    /// IP-Adapter image-prompt tokens `[batch, tokens, cross_attention_dim]`
    /// ([`crate::IpAdapter::image_tokens`]), for a U-Net with the adapter attached (U-Net
    /// only).
    pub image_prompt: Option<Tensor<B, 3>>,
}

impl<'a, B: Backend> UNetConditioning<'a, B> {
    /// Text alone.
    pub fn text(context: Tensor<B, 3>) -> Self {
        Self {
            context,
            text_time: None,
            class_labels: None,
            control: None,
            image_prompt: None,
        }
    }
}

/// Checks `latents` and `cond`'s context against a model (`what`: "U-Net", "ControlNet")
/// taking `in_channels` latent channels and a context `context_dim` wide.
pub(crate) fn check_inputs<B: Backend>(
    what: &str,
    in_channels: usize,
    context_dim: usize,
    latents: &Tensor<B, 4>,
    cond: &UNetConditioning<'_, B>,
) -> Result<()> {
    let [b, c, h, w] = latents.dims();
    let [cb, _, cdim] = cond.context.dims();
    let invalid = |m: String| Err(CoreError::InvalidInput(m));
    if c != in_channels {
        return invalid(format!(
            "the {what} takes {in_channels} latent channels, got {c}"
        ));
    }
    if cb != b || cdim != context_dim {
        return invalid(format!(
            "context [{cb}, _, {cdim}] does not fit latents of batch {b} and a {what} with \
             cross_attention_dim {context_dim}"
        ));
    }
    if h == 0 || w == 0 {
        return invalid("empty latent".into());
    }
    Ok(())
}

/// The time-embedding half of a U-Net or ControlNet: the parts that turn the timestep, class
/// label and SDXL's text/size conditioning into the embedding every ResNet adds.
pub(crate) struct TimeEmbedder<'m, B: Backend> {
    pub time_embedding: &'m TimestepEmbedding<B>,
    pub class_embedding: Option<&'m Embedding<B>>,
    pub add_embedding: Option<&'m TimestepEmbedding<B>>,
    pub time_proj_dim: usize,
    pub add_time_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl<B: Backend> TimeEmbedder<'_, B> {
    /// `[batch, time embedding width]` for a batch of `b`; `timesteps` has one entry or `b`.
    pub fn embed(
        &self,
        timesteps: &[f64],
        b: usize,
        cond: &UNetConditioning<'_, B>,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let invalid = |m: String| Err(CoreError::InvalidInput(m));
        if timesteps.len() != b && timesteps.len() != 1 {
            return invalid(format!("{} timesteps for a batch of {b}", timesteps.len()));
        }
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
            device,
        );
        // The sinusoids are computed in f32 and cast to the layers' dtype, as diffusers'
        // `t_emb.to(dtype=sample.dtype)` (a bf16 copy under mixed-precision training). The
        // bias's: the weight may be held narrower than the arithmetic (f16 matrices).
        let linear_1 = &self.time_embedding.linear_1;
        let dtype = match &linear_1.bias {
            Some(bias) => bias.dtype(),
            None => linear_1.weight.dtype(),
        };
        let mut emb = self.time_embedding.forward(to_dtype(t_emb, dtype));
        match (self.class_embedding, cond.class_labels) {
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
                let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b]), device);
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
        match (self.add_embedding, cond.text_time) {
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
                    device,
                )
                .reshape([b as i32, -1]);
                let add_in = Tensor::cat(
                    vec![
                        to_dtype(tt.text_embeds.clone(), dtype),
                        to_dtype(time_embeds, dtype),
                    ],
                    1,
                );
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
        Ok(emb)
    }
}
