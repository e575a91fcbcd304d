//! The error type of `sd-lora`.

use std::path::PathBuf;

/// Result alias for `sd-lora`.
pub type Result<T, E = LoraError> = std::result::Result<T, E>;

/// Everything that can go wrong reading or applying a LoRA: each names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file could not be read as safetensors.
    #[error(transparent)]
    Core(#[from] sd_core::CoreError),
    /// A key the file holds is not one of a LoRA format's.
    #[error("{path}: {reason}")]
    Format {
        /// The LoRA file.
        path: PathBuf,
        /// The key at fault and what is wrong with it.
        reason: String,
    },
    /// The file's factors do not fit the model: every problem found (the message shows the
    /// first and counts the rest, on one line).
    #[error("{path}: {component}: {}", summary(problems))]
    Mismatch {
        /// The LoRA file.
        path: PathBuf,
        /// The model the factors were merged into ([`crate::Component::name`]).
        component: String,
        /// One message per layer that does not fit.
        problems: Vec<String>,
    },
    /// `<lora:name:weight>` or `--lora FILE:WEIGHT` could not be read or resolved.
    #[error("{0}")]
    Spec(String),
}

/// The first problem, and how many more there are: one line however many keys are wrong.
pub(crate) fn summary(problems: &[String]) -> String {
    match problems {
        [] => String::new(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first}; and {} more problem(s) like it", rest.len()),
    }
}
