//! The bounds every step of a prompt's path checks, and the error that names them.
//!
//! Prompts are bounded ([`MAX_PROMPT_CHARS`], [`MAX_CHUNKS`], [`MAX_NESTING`], [`MAX_WEIGHT`])
//! so that no prompt can make the tokenizer or the text encoder run away or overflow: past a
//! bound the prompt is refused with a [`PromptError`] that names the bound.

use sd_core::CoreError;

/// The longest sequence the CLIP text encoders take, start and end tokens included.
pub const MAX_LENGTH: usize = 77;

/// Tokens per chunk between the start and end tokens.
pub const CHUNK_TOKENS: usize = MAX_LENGTH - 2;

/// The longest prompt read, in characters (Unicode scalar values). 20,000 characters of
/// English are about 5,000 tokens, past [`MAX_CHUNKS`] already; the bound refuses a pasted file
/// before any tokenizing is done on it.
pub const MAX_PROMPT_CHARS: usize = 20_000;

/// The most 75-token chunks a prompt may make (2,400 tokens). A1111 has no limit, but every
/// chunk is one more text-encoder call and 77 more cross-attention keys in every U-Net step, so
/// an unbounded prompt is an unbounded run.
pub const MAX_CHUNKS: usize = 32;

/// How deep brackets may nest (round and square together, open ones counted until they close or
/// the prompt ends). 100 is far past any emphasis a person writes (`(((word)))` is 3); deeper
/// nesting only multiplies weights towards overflow (1.1¹⁰⁰⁰ ≈ 2.5·10⁴¹ is infinite as an f32)
/// and makes A1111's `multiply_range` quadratic.
pub const MAX_NESTING: usize = 100;

/// The largest absolute attention weight a piece of text may end up with, after the weights of
/// all the brackets around it are multiplied. A1111 users write weights up to about 2; 100
/// already drowns every other token after A1111's mean renormalisation, and keeps the weighted
/// embeddings far inside f16's range (65,504), so the bound refuses only mistakes and
/// overflow (`(cat:1000000000000000000000000000000000000000)` is infinite as an f32).
pub const MAX_WEIGHT: f64 = 100.0;

/// A prompt past one of the bounds of this module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// More than [`MAX_PROMPT_CHARS`] characters.
    #[error("the prompt has {chars} characters; at most {max} are read", max = MAX_PROMPT_CHARS)]
    TooLong {
        /// The prompt's length in characters.
        chars: usize,
    },
    /// More than [`MAX_CHUNKS`] chunks of 75 tokens.
    #[error(
        "the prompt makes {chunks} chunks of {per} tokens ({tokens} tokens); at most {max} \
         chunks are encoded",
        per = CHUNK_TOKENS,
        max = MAX_CHUNKS
    )]
    TooManyChunks {
        /// How many chunks the prompt makes.
        chunks: usize,
        /// How many tokens it has.
        tokens: usize,
    },
    /// Brackets nested deeper than [`MAX_NESTING`].
    #[error(
        "the prompt nests brackets {depth} deep; at most {max} levels are read",
        max = MAX_NESTING
    )]
    TooDeep {
        /// The deepest nesting in the prompt.
        depth: usize,
    },
    /// A weight that is not finite or is larger than [`MAX_WEIGHT`] in absolute value.
    #[error(
        "the prompt weights `{text}` by {shown}; a weight must be finite and at most {max} in \
         absolute value (the weights of nested brackets multiply)",
        shown = number(.weight),
        max = MAX_WEIGHT
    )]
    Weight {
        /// The start of the weighted text.
        text: String,
        /// Its weight, all brackets around it multiplied.
        weight: f64,
    },
}

impl From<PromptError> for CoreError {
    fn from(e: PromptError) -> Self {
        CoreError::InvalidInput(e.to_string())
    }
}

/// A weight in a message: plain for ordinary sizes, in exponent form for huge or tiny ones
/// (1e39 rather than forty digits).
fn number(x: &f64) -> String {
    let x = *x;
    if x.is_finite() && x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Refuses a prompt longer than [`MAX_PROMPT_CHARS`].
pub(crate) fn check_length(prompt: &str) -> std::result::Result<(), PromptError> {
    // Bytes bound characters from above: only count when the bytes might be too many.
    if prompt.len() > MAX_PROMPT_CHARS {
        let chars = prompt.chars().count();
        if chars > MAX_PROMPT_CHARS {
            return Err(PromptError::TooLong { chars });
        }
    }
    Ok(())
}
