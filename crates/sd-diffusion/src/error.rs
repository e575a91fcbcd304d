/// Result alias for `sd-diffusion`.
pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

/// What can go wrong in `sd-diffusion`.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A schedule configuration that cannot produce a valid schedule.
    #[error("invalid noise schedule: {0}")]
    InvalidSchedule(String),
    /// A timestep outside `0..num_train_timesteps`.
    #[error("timestep {timestep} is outside 0..{num_train_timesteps}")]
    TimestepOutOfRange {
        /// The timestep asked for.
        timestep: usize,
        /// The schedule's number of training timesteps.
        num_train_timesteps: usize,
    },
    /// Tensors or timestep lists whose sizes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
}
