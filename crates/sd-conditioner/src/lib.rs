//! Conditioning: the CLIP text encoders that turn token ids into the U-Net's cross-attention
//! context (Radford et al. 2021), as transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection` compute them; and the CLIP image tower with its image
//! processor, which turns images into embeddings (the CLIP score, IP-Adapter image prompts).

mod clip;
mod conditioner;
pub mod image_processor;
mod open_clip;
mod presets;
mod prompt;
mod tokenizer;
mod vision;

pub use clip::{
    ClipEncoderLayer, ClipTextConfig, ClipTextModel, ClipTextOutput, HiddenAct, text_checkpoint_key,
};
pub use conditioner::{
    ClipConditioner, ClipStage, Conditioner, Conditioning, LayerChoice, PromptSyntax, TextWiring,
    padding_of,
};
pub use open_clip::{open_clip_to_transformers, transformers_to_open_clip};
pub use prompt::{
    CHUNK_TOKENS, COMMA_BACKTRACK, MAX_CHUNKS, MAX_NESTING, MAX_PROMPT_CHARS, MAX_WEIGHT,
    PromptError, PromptTokens, Weighted, parse_weights, tokenize_prompt,
};
pub use tokenizer::{ClipTokenizer, MAX_LENGTH, Padding};
pub use vision::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput};
