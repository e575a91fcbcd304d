//! Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 2 without
//! churn): `x ← x + (σ_{i+1} − σ_i) · (x − x̂_0) / σ_i`.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{FinalSigmasType, SchedulerConfig, TimestepSpacing};
use crate::error::Result;
use crate::sigmas::{
    alphas_cumprod, check_steps, exponential, interp, karras, log_sigmas, sigma_to_t,
    spaced_timesteps, to_f32, train_sigmas,
};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

/// The σ schedule the Euler-type samplers share: training sigmas interpolated at the spaced
/// timesteps, optionally redistributed as Karras sigmas, then the final σ.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub config: SchedulerConfig,
    pub train_sigmas: Vec<f64>,
    pub alpha0: f64,
    pub timesteps: Vec<f64>,
    /// One more than the timesteps: the σ after the last step.
    pub sigmas: Vec<f64>,
}

impl SigmaSchedule {
    pub fn new(config: SchedulerConfig, name: &'static str) -> Result<Self> {
        config.reject_unsupported(name)?;
        let ac = alphas_cumprod(&config, true)?;
        Ok(Self {
            train_sigmas: train_sigmas(&ac),
            alpha0: ac[0],
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn set_timesteps(
        &mut self,
        steps: usize,
        karras_allowed: bool,
        final_sigma: Option<FinalSigmasType>,
    ) -> Result<()> {
        let c = &self.config;
        check_steps(steps, c.num_train_timesteps)?;
        let spacing = c.spacing_or(TimestepSpacing::Linspace);
        let mut timesteps =
            spaced_timesteps(spacing, steps, c.num_train_timesteps, c.steps_offset)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t, &self.train_sigmas))
            .collect();
        if karras_allowed && (c.use_karras_sigmas || c.use_exponential_sigmas) {
            let logs = log_sigmas(&self.train_sigmas);
            let min = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let max = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if c.use_karras_sigmas {
                karras(min, max, steps)
            } else {
                exponential(min, max, steps)
            };
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
        }
        let last = match final_sigma.unwrap_or(FinalSigmasType::Zero) {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => {
                let a = self.alpha0 as f32;
                f64::from(((1.0 - a) / a).sqrt())
            }
        };
        sigmas.push(last);
        self.sigmas = to_f32(sigmas);
        self.timesteps = to_f32(timesteps);
        Ok(())
    }

    /// diffusers' `init_noise_sigma`: σ_max, or `√(σ_max² + 1)` for `leading` spacing.
    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0, f64::max);
        match self.config.spacing_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    /// The input of a σ-parameterised denoiser: `x / √(σ² + 1)`.
    pub fn scale<B: Backend>(&self, sample: Tensor<B, 4>, index: usize) -> Tensor<B, 4> {
        match self.sigmas.get(index) {
            Some(&sigma) => {
                let s = sigma as f32;
                sample / f64::from((s * s + 1.0).sqrt())
            }
            None => sample,
        }
    }

    /// `x̂_0` from the model output at σ (ε- or v-parameterised).
    pub fn denoised<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        sigma: f64,
        scheduler: &'static str,
    ) -> Result<Tensor<B, 4>> {
        use sd_core::noise_schedule::PredictionType::*;
        // Scalars in float32, in diffusers' order of operations: with zero terminal SNR σ_max is
        // 4096 and the step cancels large terms, so the roundings must be the same ones.
        let s = sigma as f32;
        match self.config.prediction_type {
            Epsilon => Ok(sample - model_output * sigma),
            VPrediction => {
                let denominator = s * s + 1.0;
                let c_out = -s / denominator.sqrt();
                Ok(model_output * f64::from(c_out) + sample / f64::from(denominator))
            }
            Sample => Err(crate::SchedulerError::Unsupported {
                scheduler,
                field: "prediction_type",
                value: "sample".into(),
            }),
        }
    }
}

/// `x + (x − x̂_0)/σ · (σ_to − σ)`, with diffusers' float32 roundings (see `denoised`).
pub(crate) fn euler_update<B: Backend>(
    sample: Tensor<B, 4>,
    x0: Tensor<B, 4>,
    sigma: f64,
    sigma_to: f64,
) -> Tensor<B, 4> {
    let dt = sigma_to as f32 - sigma as f32;
    let derivative = (sample.clone() - x0) / sigma;
    sample + derivative * f64::from(dt)
}

/// diffusers' `EulerDiscreteScheduler` (no churn).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    schedule: SigmaSchedule,
    progress: Progress,
}

impl EulerDiscreteScheduler {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, "EulerDiscreteScheduler")?,
            progress: Progress::default(),
        })
    }

    /// The σ at each timestep, then the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl<B: Backend> Scheduler<B> for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let final_sigma = self.schedule.config.final_sigmas_type;
        self.schedule.set_timesteps(steps, true, final_sigma)?;
        self.progress.reset(self.schedule.timesteps.len());
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma()
    }

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        self.progress.begin_at(index)
    }

    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let sigma = crate::at(&self.schedule.sigmas, self.progress.index, "sigmas")?;
        Ok(crate::noise_ve(original, noise, sigma))
    }

    fn step_index(&self) -> usize {
        self.progress.index
    }

    fn scale_model_input(&self, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        self.schedule.scale(sample, self.progress.index)
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        let i = self.progress.current()?;
        let (sigma, next) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let x0 = self.schedule.denoised(
            model_output,
            sample.clone(),
            sigma,
            "EulerDiscreteScheduler",
        )?;
        let prev = euler_update(sample, x0.clone(), sigma, next);
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}
