//! Conditioning: the CLIP text encoders that turn token ids into the U-Net's cross-attention
//! context (Radford et al. 2021), as transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection` compute them; and the CLIP image tower with its image
//! processor, which turns images into embeddings (the CLIP score, IP-Adapter image prompts).
//!
//! A prompt takes one path, a module per step, each using only the steps before it:
//! [`limits`](crate::MAX_PROMPT_CHARS) (the bounds every step checks) → `syntax` (A1111's
//! weights and `BREAK` read into weighted text) → `tokenizer` (CLIP's BPE ids) → `chunks`
//! (77-token chunks with a weight per id, a batch padded to one chunk count) → `encode` (one
//! tokenizer and text encoder, [`ClipStage`]: the chosen hidden state per chunk, weights
//! applied) → `conditioner` (the family's wiring of one or two stages, [`ClipConditioner`]).

mod chunks;
mod clip;
mod conditioner;
mod encode;
pub mod image_processor;
mod limits;
mod open_clip;
mod presets;
mod syntax;
mod tokenizer;
mod vision;

pub use chunks::{COMMA_BACKTRACK, PromptTokens, tokenize_prompt};
pub use clip::{
    ClipAttention, ClipEncoderLayer, ClipMlp, ClipTextConfig, ClipTextModel, ClipTextOutput,
    HiddenAct, text_checkpoint_key,
};
pub use conditioner::{ClipConditioner, Conditioner, Conditioning, TextWiring, padding_of};
pub use encode::{ClipStage, LayerChoice};
pub use limits::{
    CHUNK_TOKENS, MAX_CHUNKS, MAX_LENGTH, MAX_NESTING, MAX_PROMPT_CHARS, MAX_WEIGHT, PromptError,
};
pub use open_clip::{open_clip_to_transformers, transformers_to_open_clip};
pub use syntax::{PromptSyntax, Weighted, parse_weights};
pub use tokenizer::{ClipTokenizer, Padding};
pub use vision::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput};
