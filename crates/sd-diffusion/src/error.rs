/// Result alias for `sd-diffusion`.
pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

/// What can go wrong in `sd-diffusion`.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// The noise schedule refused a configuration or a timestep (`sd_core::noise_schedule`).
    #[error(transparent)]
    Schedule(#[from] sd_core::CoreError),
    /// Tensors or timestep lists whose sizes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
}
