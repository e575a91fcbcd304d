/// Result alias for `sd-train`.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What can go wrong in `sd-train`.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A hyper-parameter outside its meaning (a negative learning rate, β ≥ 1, ...).
    #[error("invalid training setting: {0}")]
    Config(String),
    /// Saved state that does not fit the model it is restored into.
    #[error("training state does not fit the model: {0}")]
    State(String),
    /// The loss or the gradients stopped being finite.
    #[error("{0}")]
    NonFinite(String),
    /// The run was asked to stop ([`crate::request_stop`]) and checkpointed.
    #[error("stopped after step {step}; checkpoint {}: continue with --resume latest", checkpoint.display())]
    Stopped {
        /// The last step taken.
        step: u64,
        /// The checkpoint folder written on stopping.
        checkpoint: std::path::PathBuf,
    },
    /// A data-parallel peer could not be reached or stopped answering.
    #[error("data-parallel training: {0}")]
    Parallel(String),
    /// Reading or writing the run's files.
    #[error("{0}")]
    Io(String),
    /// An error from the forward process.
    #[error(transparent)]
    Diffusion(#[from] sd_diffusion::DiffusionError),
    /// An error from a model or from weights I/O.
    #[error(transparent)]
    Core(#[from] sd_core::CoreError),
    /// An error from the data folder.
    #[error(transparent)]
    Data(#[from] sd_data::DataError),
    /// An error from loading the model.
    #[error(transparent)]
    Model(#[from] sd::SdError),
    /// An error from a LoRA's targets or files.
    #[error(transparent)]
    Lora(#[from] sd_lora::LoraError),
}
