//! The forward diffusion process (Ho et al. 2020, sec. 2): `q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)`.
//!
//! [`NoiseSchedule`] holds the betas and `ᾱ_t` (`alphas_cumprod`) on the host in f64 and noises
//! batches of latents at per-sample timesteps; it lives in `sd_core::noise_schedule`, because
//! the samplers (`sd-schedulers`) read the same schedule, and is re-exported here with the
//! seeded [`noise`]. [`training`] has the targets and loss weights a training loop needs.

mod error;
pub mod training;

pub use error::{DiffusionError, Result};
pub use sd_core::noise;
pub use sd_core::noise_schedule::{
    BetaSchedule, NoiseSchedule, NoiseScheduleConfig, PredictionType, rescale_zero_terminal_snr,
};
