//! Step 5 of a prompt's path: the model family's wiring of its text encoders, as diffusers'
//! pipelines wire them: SD 1.x and 2.x take one encoder's last hidden state, SDXL
//! concatenates two encoders' penultimate hidden states and adds the second one's projected
//! pooled embedding.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::weights::LoadOptions;
use sd_core::{CoreError, Result};

use crate::clip::ClipTextModel;
use crate::encode::{ClipStage, LayerChoice};
use crate::syntax::PromptSyntax;
use crate::tokenizer::{ClipTokenizer, Padding};

/// What a conditioner gives the U-Net.
#[derive(Debug, Clone)]
pub struct Conditioning<B: Backend> {
    /// The cross-attention context: `[batch, tokens, dim]`.
    pub context: Tensor<B, 3>,
    /// SDXL's pooled text embedding: `[batch, dim]`.
    pub pooled: Option<Tensor<B, 2>>,
}

impl<B: Backend> Conditioning<B> {
    /// The same shapes filled with zeros (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Self {
        Self {
            context: self.context.zeros_like(),
            pooled: self.pooled.as_ref().map(Tensor::zeros_like),
        }
    }

    /// Stacks conditionings along the batch axis (e.g. `[unconditional; conditional]` for
    /// classifier-free guidance). Their token counts must agree.
    pub fn cat(parts: Vec<Self>) -> Result<Self> {
        let tokens = parts.first().map(|p| p.context.dims()[1]);
        if parts.iter().any(|p| Some(p.context.dims()[1]) != tokens) {
            return Err(CoreError::InvalidInput(
                "conditionings of different lengths cannot be batched".into(),
            ));
        }
        let pooled: Option<Vec<_>> = parts.iter().map(|p| p.pooled.clone()).collect();
        Ok(Self {
            context: Tensor::cat(parts.into_iter().map(|p| p.context).collect(), 0),
            pooled: pooled.map(|p| Tensor::cat(p, 0)),
        })
    }

    /// Repeats every sample `n` times along the batch axis (several images per prompt).
    pub fn repeat(self, n: usize) -> Self {
        let repeat2 = |t: Tensor<B, 2>| {
            let [b, d] = t.dims();
            t.unsqueeze_dim::<3>(1).repeat_dim(1, n).reshape([b * n, d])
        };
        let [b, s, d] = self.context.dims();
        Self {
            context: self
                .context
                .unsqueeze_dim::<4>(1)
                .repeat_dim(1, n)
                .reshape([b * n, s, d]),
            pooled: self.pooled.map(repeat2),
        }
    }
}

/// Turns prompts into conditioning. Every prompt of one call gets the same number of tokens, so
/// a negative prompt batched with its prompt lines up with it.
pub trait Conditioner<B: Backend> {
    /// The conditioning of each prompt, stacked along the batch axis in their order.
    fn encode(&self, prompts: &[&str]) -> Result<Conditioning<B>>;
}

/// Which model family's wiring to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextWiring {
    /// One encoder's (SD 1.x, 2.x); `clip_skip` n takes the output of the n-th layer from the
    /// end, through the final LayerNorm (diffusers' `clip_skip`).
    Single {
        /// Layers dropped from the end (0: the last layer's output).
        clip_skip: usize,
    },
    /// SDXL's two encoders: penultimate hidden states (further back with `clip_skip`),
    /// concatenated on the feature axis; pooled from the second encoder's projection.
    Dual {
        /// Layers dropped from the end beyond the penultimate one.
        clip_skip: usize,
    },
}

/// The CLIP text conditioner of Stable Diffusion 1.x, 2.x and XL.
pub struct ClipConditioner<B: Backend> {
    stages: Vec<ClipStage<B>>,
    syntax: PromptSyntax,
}

/// The padding token a `tokenizer/` folder asks for (`pad_token` in `special_tokens_map.json`
/// or `tokenizer_config.json`): `!` for SD 2.x and SDXL's second tokenizer, else end-of-text.
pub fn padding_of(tokenizer_dir: &Path) -> Padding {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = sd_core::files::read_regular_to_string(tokenizer_dir.join(name)) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let pad = &json["pad_token"];
        let pad = pad.as_str().or_else(|| pad["content"].as_str());
        if let Some(pad) = pad {
            return if pad == "!" {
                Padding::Exclamation
            } else {
                Padding::EndOfText
            };
        }
    }
    Padding::EndOfText
}

impl<B: Backend> ClipConditioner<B> {
    /// The stages and the prompt syntax, for changing a stage's model (merging a LoRA into
    /// it) and building the conditioner again with [`Self::new`].
    pub fn into_parts(self) -> (Vec<ClipStage<B>>, PromptSyntax) {
        (self.stages, self.syntax)
    }

    /// From loaded stages: one (SD 1.x/2.x) or two (SDXL, the projected one second). Refuses a
    /// tokenizer with ids past its encoder's token embeddings, naming the tokenizer's file.
    pub fn new(stages: Vec<ClipStage<B>>, syntax: PromptSyntax) -> Result<Self> {
        if stages.is_empty() || stages.len() > 2 {
            return Err(CoreError::InvalidInput(format!(
                "a CLIP conditioner has one or two text encoders, got {}",
                stages.len()
            )));
        }
        if stages.len() == 2 && stages[1].model.text_projection.is_none() {
            return Err(CoreError::InvalidInput(
                "SDXL's second text encoder needs its text_projection".into(),
            ));
        }
        for stage in &stages {
            // The shape alone: a lazily initialised embedding stays uninitialised.
            let shape = stage
                .model
                .text_model
                .embeddings
                .token_embedding
                .weight
                .lazy_shape();
            if let Some(&rows) = shape.as_slice().first() {
                stage.tokenizer.check_fits(rows)?;
            }
        }
        Ok(Self { stages, syntax })
    }

    /// Loads the text encoders of a diffusers folder (`tokenizer/`, `text_encoder/`, and for
    /// [`TextWiring::Dual`] `tokenizer_2/`, `text_encoder_2/`). A missing tokenizer folder falls
    /// back to the built-in CLIP vocabulary.
    pub fn from_diffusers(
        root: impl AsRef<Path>,
        wiring: TextWiring,
        syntax: PromptSyntax,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_diffusers_with(root, wiring, syntax, LoadOptions::default(), device)
    }

    /// [`ClipConditioner::from_diffusers`] with load options (e.g. the compute dtype).
    pub fn from_diffusers_with(
        root: impl AsRef<Path>,
        wiring: TextWiring,
        syntax: PromptSyntax,
        options: LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let root = root.as_ref();
        let load = |suffix: &str, layer: LayerChoice| -> Result<ClipStage<B>> {
            let tok_dir = root.join(format!("tokenizer{suffix}"));
            let padding = padding_of(&tok_dir);
            let tokenizer = if tok_dir.is_dir() {
                ClipTokenizer::from_folder(&tok_dir, padding)?
            } else {
                ClipTokenizer::embedded(padding)?
            };
            let model = ClipTextModel::from_pretrained_with(
                root.join(format!("text_encoder{suffix}")),
                options,
                device,
            )?;
            Ok(ClipStage {
                tokenizer,
                model,
                layer,
            })
        };
        let stages = match wiring {
            TextWiring::Single { clip_skip } => vec![load(
                "",
                LayerChoice {
                    skip: clip_skip,
                    final_norm: true,
                },
            )?],
            TextWiring::Dual { clip_skip } => {
                let layer = LayerChoice {
                    skip: 1 + clip_skip,
                    final_norm: false,
                };
                vec![load("", layer)?, load("_2", layer)?]
            }
        };
        Self::new(stages, syntax)
    }

    /// The tokenizer and text encoder stages, in the order their contexts are concatenated.
    pub fn stages(&self) -> &[ClipStage<B>] {
        &self.stages
    }
}

impl<B: Backend> Conditioner<B> for ClipConditioner<B> {
    fn encode(&self, prompts: &[&str]) -> Result<Conditioning<B>> {
        if prompts.is_empty() {
            return Err(CoreError::InvalidInput("no prompt to encode".into()));
        }
        let mut contexts = Vec::with_capacity(self.stages.len());
        let mut pooled = None;
        for stage in &self.stages {
            let (context, p) = stage.encode(self.syntax, prompts)?;
            contexts.push(context);
            pooled = p;
        }
        if contexts
            .iter()
            .any(|c| c.dims()[1] != contexts[0].dims()[1])
        {
            return Err(CoreError::InvalidInput(
                "the two tokenizers split the prompt into different numbers of chunks".into(),
            ));
        }
        if self.stages.len() == 1 {
            // SD 1.x/2.x take no pooled embedding.
            pooled = None;
        }
        Ok(Conditioning {
            context: Tensor::cat(contexts, 2),
            pooled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClipTextConfig;

    type B = sd_core::backend::DefaultBackend;

    fn stage(tokenizer: ClipTokenizer) -> ClipStage<B> {
        let config = ClipTextConfig {
            vocab_size: 1000,
            hidden_size: 8,
            intermediate_size: 16,
            projection_dim: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            eos_token_id: 2,
            ..Default::default()
        };
        let device = Default::default();
        ClipStage {
            tokenizer,
            model: ClipTextModel::new(&config, false, &device).unwrap(),
            layer: LayerChoice {
                skip: 0,
                final_norm: true,
            },
        }
    }

    /// A tokenizer whose ids the encoder has no embedding for is refused when the conditioner
    /// is built, naming the tokenizer's file, rather than when a prompt happens to use one.
    #[test]
    fn a_tokenizer_with_ids_past_the_encoder_is_refused_by_name() {
        let embedded = ClipTokenizer::embedded(Padding::EndOfText).unwrap();
        let err = match ClipConditioner::new(vec![stage(embedded)], PromptSyntax::Weighted) {
            Ok(_) => panic!("a 49408-id vocabulary fits no 1000-id encoder"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.starts_with(
                "<built-in CLIP vocabulary>/vocab.json: token `<|endoftext|>` has id 49407"
            ),
            "{err}"
        );
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/pipeline/tiny_sd1/model/tokenizer");
        let tiny = ClipTokenizer::from_folder(&tiny, Padding::EndOfText).unwrap();
        assert!(ClipConditioner::new(vec![stage(tiny)], PromptSyntax::Weighted).is_ok());
    }
}
