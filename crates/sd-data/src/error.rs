use std::path::PathBuf;

/// Result alias for `sd-data`.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// What can go wrong reading training data; each names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data folder is missing, empty or laid out in a way that cannot be read.
    #[error("{}: {reason}", path.display())]
    Layout {
        /// The folder or file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A metadata line that is not what diffusers' imagefolder expects.
    #[error("{}:{line}: {reason}", path.display())]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// The line at fault, counted from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An image that cannot be read (unreadable, truncated, empty, too large).
    #[error(transparent)]
    Image(#[from] sd_core::CoreError),
    /// A transform setting outside its meaning.
    #[error("invalid data setting: {0}")]
    Config(String),
}
