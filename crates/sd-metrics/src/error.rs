use std::path::PathBuf;

/// Everything that can go wrong while computing a metric, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A statistics file (`.npz`) that cannot be read or written.
    #[error("{path}: {reason}")]
    Stats {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Two inputs whose sizes do not fit together (feature widths, matrix shapes).
    #[error("{0}")]
    Shape(String),
    /// Too few samples for the statistic asked for.
    #[error("{0}")]
    TooFew(String),
    /// A result that is not a finite number (NaN or infinite features, a failed decomposition).
    #[error("{0}")]
    NotFinite(String),
    /// Network weights that cannot be read or do not fit the network.
    #[error(transparent)]
    Weights(#[from] sd_core::CoreError),
    /// An image file that cannot be read.
    #[error("{path}: {reason}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A weights file in PyTorch's format that cannot be read.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, MetricsError>;
