//! DDIM (Song et al. 2021, eq. 12): a non-Markovian sampler that is deterministic for η = 0.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::{SchedulerConfig, TimestepSpacing};
use crate::error::Result;
use crate::sigmas::{alphas_cumprod, check_steps, integer_timesteps};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

/// diffusers' `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    /// `ᾱ` past the last step: 1 with `set_alpha_to_one`, else `ᾱ_0`.
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    stride: usize,
    progress: Progress,
}

impl DdimScheduler {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.reject_unsupported("DDIMScheduler")?;
        let alphas_cumprod = alphas_cumprod(&config, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            stride: 0,
            progress: Progress::default(),
        })
    }
}

impl<B: Backend> Scheduler<B> for DdimScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(steps, train)?;
        let spacing = self.config.spacing_or(TimestepSpacing::Leading);
        self.timesteps = integer_timesteps(spacing, steps, train, self.config.steps_offset)?;
        self.stride = train / steps;
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
        // diffusers steps back by T / n whatever the spacing.
        let prev_t = t as i64 - self.stride as i64;
        let alpha_t = self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                (sample.clone() - model_output.clone() * beta_t.sqrt()) / alpha_t.sqrt(),
                model_output,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                (sample - model_output * alpha_t.sqrt()) / beta_t.sqrt(),
            ),
            PredictionType::VPrediction => (
                sample.clone() * alpha_t.sqrt() - model_output.clone() * beta_t.sqrt(),
                model_output * alpha_t.sqrt() + sample * beta_t.sqrt(),
            ),
        };
        let x0 = self.config.limit_x0(x0, true);
        // σ_t(η) of eq. 16.
        let variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.config.eta * variance.sqrt();
        let direction = eps * (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let mut prev = x0.clone() * alpha_prev.sqrt() + direction;
        if self.config.eta > 0.0 {
            let z = noise.standard_normal(prev.dims(), &prev.device());
            prev = prev + z * std_dev;
        }
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}
