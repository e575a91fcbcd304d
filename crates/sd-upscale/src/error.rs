//! The error type of `sd-upscale`.

use std::path::PathBuf;

/// Result alias for `sd-upscale`.
pub type Result<T, E = UpscaleError> = std::result::Result<T, E>;

/// What can go wrong loading or running an upscaler: each names the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum UpscaleError {
    /// Reading the weights (an unreadable file, a key or shape that does not fit).
    #[error(transparent)]
    Core(#[from] sd_core::CoreError),
    /// The file holds no upscaler this crate knows.
    #[error("{path}: {reason}")]
    Layout {
        /// The weights file.
        path: PathBuf,
        /// What was looked for and not found.
        reason: String,
    },
    /// A setting out of its range (a tile smaller than its padding, an empty image).
    #[error("{0}")]
    Invalid(String),
}
