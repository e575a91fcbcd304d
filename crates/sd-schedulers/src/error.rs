/// Result alias for `sd-schedulers`.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;

/// What can go wrong in `sd-schedulers`.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A `scheduler_config.json` that cannot be read or parsed.
    #[error("{path}: {reason}")]
    Config {
        /// The file (`<json>` for text parsed without one).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A sampler name that is neither a diffusers class nor a known alias.
    #[error("unknown scheduler `{name}`; known: {known}")]
    UnknownScheduler {
        /// The name asked for.
        name: String,
        /// Every accepted name, comma-separated.
        known: String,
    },
    /// A configuration value this sampler does not support.
    #[error("{scheduler}: unsupported {field} `{value}`")]
    Unsupported {
        /// The diffusers class, e.g. `DDIMScheduler`.
        scheduler: &'static str,
        /// The configuration field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// A step count or strength that cannot be used.
    #[error("{0}")]
    InvalidSteps(String),
    /// `step` called before `set_timesteps`, or after the last step.
    #[error("{0}")]
    State(String),
    /// The training noise schedule is invalid.
    #[error(transparent)]
    Schedule(#[from] sd_core::CoreError),
}
