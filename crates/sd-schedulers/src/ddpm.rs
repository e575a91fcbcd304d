//! DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 and eq. 7), on any subset of the
//! training timesteps.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::{SchedulerConfig, TimestepSpacing};
use crate::error::{Result, SchedulerError};
use crate::sigmas::{alphas_cumprod, check_steps, integer_timesteps};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

/// The posterior variance diffusers' `variance_type` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    /// β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t (`fixed_small`, `fixed_small_log`).
    Small,
    /// β_t (`fixed_large`).
    Large,
}

/// diffusers' `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    variance: Variance,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    progress: Progress,
}

impl DdpmScheduler {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.reject_unsupported("DDPMScheduler")?;
        let variance = match config.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" | "fixed_small_log" => Variance::Small,
            "fixed_large" => Variance::Large,
            other => {
                return Err(SchedulerError::Unsupported {
                    scheduler: "DDPMScheduler",
                    field: "variance_type",
                    value: other.into(),
                });
            }
        };
        Ok(Self {
            alphas_cumprod: alphas_cumprod(&config, false)?,
            config,
            variance,
            timesteps: Vec::new(),
            progress: Progress::default(),
        })
    }
}

impl<B: Backend> Scheduler<B> for DdpmScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(steps, train)?;
        let spacing = self.config.spacing_or(TimestepSpacing::Leading);
        self.timesteps = integer_timesteps(spacing, steps, train, self.config.steps_offset)?;
        self.progress.reset(self.timesteps.len());
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        self.progress.begin_at(index)
    }

    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let t = crate::at(&self.timesteps, self.progress.index, "timesteps")?;
        let alpha_bar = crate::at(&self.alphas_cumprod, t as usize, "training timesteps")?;
        Ok(crate::noise_vp(original, noise, alpha_bar))
    }

    fn step_index(&self) -> usize {
        self.progress.index
    }

    fn scale_model_input(&self, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        sample
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        let i = self.progress.current()?;
        let t = self.timesteps[i] as usize;
        let a_t = self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)];
        let a_prev = match self.timesteps.get(i + 1) {
            Some(&prev) => self.alphas_cumprod[prev as usize],
            None => 1.0,
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let current_alpha = a_t / a_prev;
        let current_beta = 1.0 - current_alpha;
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (sample.clone() - model_output * b_t.sqrt()) / a_t.sqrt(),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample.clone() * a_t.sqrt() - model_output * b_t.sqrt(),
        };
        let x0 = self.config.limit_x0(x0, true);
        // The mean of q(x_{t−1} | x_t, x̂_0) (eq. 7).
        let mut prev = x0.clone() * (a_prev.sqrt() * current_beta / b_t)
            + sample * (current_alpha.sqrt() * b_prev / b_t);
        if t > 0 {
            let variance = match self.variance {
                Variance::Small => (b_prev / b_t * current_beta).max(1e-20),
                Variance::Large => current_beta,
            };
            let z = noise.standard_normal(prev.dims(), &prev.device());
            prev = prev + z * variance.sqrt();
        }
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}
