//! Step 4 of a prompt's path: one tokenizer and text encoder (a [`ClipStage`]) turn prompts
//! into a context: the chunks of step 3 through the encoder one chunk at a time, the chosen
//! hidden state of each, A1111's weights applied, the chunks concatenated along the sequence.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::{CoreError, Result};

use crate::chunks::chunk_prompts;
use crate::clip::ClipTextModel;
use crate::syntax::PromptSyntax;
use crate::tokenizer::ClipTokenizer;

/// Which hidden state of a CLIP text encoder becomes the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerChoice {
    /// Layers dropped from the end: 0 is the last layer.
    pub skip: usize,
    /// Apply the final LayerNorm to that layer's output (SD 1.x/2.x do; SDXL does not).
    pub final_norm: bool,
}

/// One CLIP tokenizer and text encoder.
pub struct ClipStage<B: Backend> {
    /// The tokenizer whose ids the encoder takes.
    pub tokenizer: ClipTokenizer,
    /// The text encoder.
    pub model: ClipTextModel<B>,
    /// Which of its hidden states becomes the context.
    pub layer: LayerChoice,
}

impl<B: Backend> ClipStage<B> {
    /// The context `[batch, 77·chunks, dim]` of prompts read with `syntax` and, from the first
    /// chunk, the projected pooled embedding.
    pub(crate) fn encode(
        &self,
        syntax: PromptSyntax,
        prompts: &[&str],
    ) -> Result<(Tensor<B, 3>, Option<Tensor<B, 2>>)> {
        let tokens = chunk_prompts(&self.tokenizer, syntax, prompts)?;
        let chunks = tokens.first().map_or(0, |t| t.chunks.len());
        let mut per_chunk = Vec::with_capacity(chunks);
        let mut pooled = None;
        for k in 0..chunks {
            let ids: Vec<Vec<u32>> = tokens.iter().map(|t| t.chunks[k].clone()).collect();
            let out = self.model.forward(&ids)?;
            let layers = out.hidden_states.len();
            if self.layer.skip + 1 >= layers {
                return Err(CoreError::InvalidInput(format!(
                    "clip skip {} leaves no layer of a {}-layer text encoder",
                    self.layer.skip,
                    layers - 1
                )));
            }
            let z = if self.layer.skip == 0 && self.layer.final_norm {
                out.last_hidden_state
            } else {
                let h = out.hidden_states[layers - 1 - self.layer.skip].clone();
                if self.layer.final_norm {
                    sd_core::layers::layer_norm(&self.model.text_model.final_layer_norm, h)
                } else {
                    h
                }
            };
            let weights: Vec<&Vec<f64>> = tokens.iter().map(|t| &t.weights[k]).collect();
            per_chunk.push(apply_weights(z, &weights));
            if k == 0 {
                pooled = out.text_embeds;
            }
        }
        Ok((Tensor::cat(per_chunk, 1), pooled))
    }
}

/// A1111's emphasis: scale each token's embedding by its weight, then rescale the whole so its
/// mean is what it was before. Rows whose weights are all 1 are left untouched.
fn apply_weights<B: Backend>(z: Tensor<B, 3>, weights: &[&Vec<f64>]) -> Tensor<B, 3> {
    if weights.iter().all(|w| w.iter().all(|&x| x == 1.0)) {
        return z;
    }
    let [b, n, _] = z.dims();
    let device = z.device();
    let flat: Vec<f32> = weights
        .iter()
        .flat_map(|w| w.iter().map(|&x| x as f32))
        .collect();
    let multipliers = Tensor::<B, 1>::from_floats(flat.as_slice(), &device).reshape([b, n, 1]);
    let original_mean = z.clone().mean_dim(2).mean_dim(1);
    let weighted = z * multipliers;
    let new_mean = weighted.clone().mean_dim(2).mean_dim(1);
    weighted * (original_mean / new_mean)
}
