//! Diffusion samplers behind one trait, following diffusers' contract: configure from
//! `scheduler_config.json`, [`Scheduler::set_timesteps`], then for each timestep scale the
//! model input, call the model, and [`Scheduler::step`].
//!
//! ```
//! use burn::tensor::Tensor;
//! use sd_core::backend::DefaultBackend as B;
//! use sd_schedulers::{HostNoise, NoiseSource, SchedulerConfig};
//!
//! # fn main() -> sd_schedulers::Result<()> {
//! // Stable Diffusion 1.5's `scheduler_config.json`, abridged.
//! let config = SchedulerConfig::from_json(
//!     r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}"#,
//! )?;
//! // A stand-in for the U-Net: it predicts no noise at all.
//! let unet = |latents: Tensor<B, 4>, _t: f64| latents.zeros_like();
//! let device = Default::default();
//! let mut noise_source = HostNoise::new(42);
//! let noise = NoiseSource::<B>::standard_normal(&mut noise_source, [1, 4, 8, 8], &device);
//!
//! let mut scheduler = sd_schedulers::from_name::<B>("DPM++ 2M Karras", config)?;
//! scheduler.set_timesteps(20)?;
//! let mut latents = noise * scheduler.init_noise_sigma();
//! for t in scheduler.timesteps().to_vec() {
//!     let eps = unet(scheduler.scale_model_input(latents.clone()), t);
//!     latents = scheduler.step(eps, latents, &mut noise_source)?.prev_sample;
//! }
//! assert_eq!(latents.dims(), [1, 4, 8, 8]);
//! # Ok(())
//! # }
//! ```
//!
//! Each sampler's arithmetic is host math on a few scalars plus one tensor update per step.

mod config;
mod ddim;
mod ddpm;
mod dpm_solver_multistep;
mod dpm_solver_singlestep;
mod error;
mod euler;
mod euler_ancestral;
mod heun;
mod kdpm2;
mod lcm;
mod lms;
mod names;
mod noise;
mod pndm;
mod sigmas;
mod unipc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

pub use config::{FinalSigmasType, SchedulerConfig, TimestepSpacing};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver_multistep::DpmSolverMultistepScheduler;
pub use dpm_solver_singlestep::DpmSolverSinglestepScheduler;
pub use error::{Result, SchedulerError};
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use heun::HeunDiscreteScheduler;
pub use kdpm2::Kdpm2Scheduler;
pub use lcm::LcmScheduler;
pub use lms::LmsDiscreteScheduler;
pub use names::{SamplerKind, from_config, from_name, known_names};
pub use noise::{HostNoise, NoiseSource, ReplayNoise};
pub use pndm::PndmScheduler;
pub use sd_core::noise_schedule::PredictionType;
pub use unipc::UniPcMultistepScheduler;

/// What one sampler step returns.
#[derive(Debug, Clone)]
pub struct StepOutput<B: Backend> {
    /// The sample at the next timestep.
    pub prev_sample: Tensor<B, 4>,
    /// The model's estimate of the clean sample at this step (for previews).
    pub pred_original_sample: Tensor<B, 4>,
}

/// A diffusion sampler (diffusers' `SchedulerMixin` contract).
pub trait Scheduler<B: Backend> {
    /// Lays out `steps` inference steps and resets the sampler's state.
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;

    /// The timesteps to call the model at, in order (fractional for Karras sigmas).
    fn timesteps(&self) -> &[f64];

    /// How many entries of [`Scheduler::timesteps`] one inference step takes (2 for Heun).
    fn order(&self) -> usize {
        1
    }

    /// The standard deviation to scale the initial noise by.
    fn init_noise_sigma(&self) -> f64;

    /// Starts at entry `index` of the timesteps instead of the first (img2img, see
    /// [`img2img_start`]).
    fn set_begin_index(&mut self, index: usize) -> Result<()>;

    /// The index of the timestep the next [`Scheduler::step`] is for.
    fn step_index(&self) -> usize;

    /// Scales the sample for the model at the current timestep (identity for DDIM and DPM).
    fn scale_model_input(&self, sample: Tensor<B, 4>) -> Tensor<B, 4>;

    /// Noises clean latents to the level of the timestep the next [`Scheduler::step`] is for
    /// (diffusers' `add_noise` at the current step index): where img2img starts after
    /// [`Scheduler::set_begin_index`], and how inpainting re-noises the kept region.
    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>>;

    /// One step back in time from the model output at the current timestep.
    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>>;
}

/// `√ᾱ·x + √(1 − ᾱ)·ε` (Ho et al. 2020, eq. 4), with ᾱ rounded to f32 as diffusers does.
pub(crate) fn noise_vp<B: Backend>(
    original: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    alpha_bar: f64,
) -> Tensor<B, 4> {
    let a = alpha_bar as f32;
    original * f64::from(a.sqrt()) + noise * f64::from((1.0 - a).sqrt())
}

/// `x + σ·ε`: the k-diffusion samplers' latents live at scale `√(σ² + 1)`.
pub(crate) fn noise_ve<B: Backend>(
    original: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    sigma: f64,
) -> Tensor<B, 4> {
    original + noise * f64::from(sigma as f32)
}

/// `α_t·x + σ_t·ε` with `α_t = 1/√(σ² + 1)`, `σ_t = σ·α_t`: the DPM-Solver and UniPC form.
pub(crate) fn noise_sigma_vp<B: Backend>(
    original: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    sigma: f64,
) -> Tensor<B, 4> {
    let s = sigma as f32;
    let alpha_t = 1.0 / (s * s + 1.0).sqrt();
    original * f64::from(alpha_t) + noise * f64::from(s * alpha_t)
}

/// The entry at the current step index, or an error past the end.
pub(crate) fn at(values: &[f64], index: usize, what: &str) -> Result<f64> {
    values.get(index).copied().ok_or_else(|| {
        SchedulerError::State(format!(
            "add_noise at step {index}, past the {} {what}",
            values.len()
        ))
    })
}

/// Where an img2img run of `steps` steps starts for `strength` in `[0, 1]`, as diffusers'
/// pipelines compute it: the index into the timesteps (multiply by the sampler's order).
pub fn img2img_start(steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(SchedulerError::InvalidSteps(format!(
            "strength {strength} is outside [0, 1]"
        )));
    }
    let init = ((steps as f64 * strength) as usize).min(steps);
    Ok(steps - init)
}

/// The shared step counter: where the next step is, with the checks every sampler needs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    pub index: usize,
    pub len: usize,
    pub ready: bool,
}

impl Progress {
    pub fn reset(&mut self, len: usize) {
        *self = Self {
            index: 0,
            len,
            ready: true,
        };
    }

    pub fn begin_at(&mut self, index: usize) -> Result<()> {
        if !self.ready {
            return Err(SchedulerError::State(
                "set_timesteps must be called before set_begin_index".into(),
            ));
        }
        if index > self.len {
            return Err(SchedulerError::InvalidSteps(format!(
                "begin index {index} is past the {} timesteps",
                self.len
            )));
        }
        self.index = index;
        Ok(())
    }

    /// The index of the step about to run; an error before `set_timesteps` or past the end.
    pub fn current(&self) -> Result<usize> {
        if !self.ready {
            return Err(SchedulerError::State(
                "step called before set_timesteps".into(),
            ));
        }
        if self.index >= self.len {
            return Err(SchedulerError::State(format!(
                "step called after the last of {} timesteps",
                self.len
            )));
        }
        Ok(self.index)
    }
}
