use std::path::PathBuf;

/// Everything that can go wrong between a model path and an image.
#[derive(Debug, thiserror::Error)]
pub enum SdError {
    /// Reading weights, configs or images, or a model refusing its input.
    #[error(transparent)]
    Core(#[from] sd_core::CoreError),
    /// A LoRA file that cannot be read or does not fit the model.
    #[error(transparent)]
    Lora(#[from] sd_lora::LoraError),
    /// A sampler name, configuration or step count that does not work.
    #[error(transparent)]
    Scheduler(#[from] sd_schedulers::SchedulerError),
    /// A model that cannot be found or is not laid out as expected.
    #[error("{path}: {reason}")]
    Model {
        /// The model folder or file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// An output that cannot be written where asked (a model folder over one that holds
    /// something), or that failed while being written.
    #[error("{path}: {reason}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// Why it cannot be written there, or what failed.
        reason: String,
    },
    /// Generation settings that cannot be used together or are out of range.
    #[error("{0}")]
    InvalidOptions(String),
    /// A stage's output went NaN or infinite (damaged weights loaded unchecked, an overflow in
    /// half precision): the run stops there instead of writing a black image.
    #[error(
        "{0} produced NaN or infinite values; the weights may be damaged (load them without \
         --skip-weight-check) or overflow in half precision (try --dtype f32)"
    )]
    NonFinite(String),
    /// The step callback asked to stop.
    #[error("cancelled at step {0}")]
    Cancelled(usize),
}

/// Result alias for `sd`.
pub type Result<T> = std::result::Result<T, SdError>;

pub(crate) fn model_error(path: impl Into<PathBuf>, reason: impl Into<String>) -> SdError {
    SdError::Model {
        path: path.into(),
        reason: reason.into(),
    }
}

pub(crate) fn output_error(path: impl Into<PathBuf>, reason: impl Into<String>) -> SdError {
    SdError::Output {
        path: path.into(),
        reason: reason.into(),
    }
}
