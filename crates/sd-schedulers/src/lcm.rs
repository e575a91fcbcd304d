//! Latent consistency models (Luo et al. 2023, Algorithm 1; Song et al. 2023): each step maps
//! the sample straight to a clean estimate with the consistency boundary scalings, then noises it
//! again to the next timestep. For LCM and LCM-LoRA models, 1–8 steps.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::SchedulerConfig;
use crate::error::{Result, SchedulerError};
use crate::sigmas::{alphas_cumprod, check_steps, linspace};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "LCMScheduler";

/// diffusers' `LCMScheduler`.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    progress: Progress,
}

impl LcmScheduler {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.reject_unsupported(NAME)?;
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
            progress: Progress::default(),
        })
    }

    /// `(c_skip, c_out)` of the consistency parameterisation (Song et al. 2023, eq. 7), σ_data
    /// 0.5, with the timestep scaled by `timestep_scaling`.
    fn scalings(&self, t: f64) -> (f64, f64) {
        let sigma_data: f64 = 0.5;
        let scaled = t * self.config.timestep_scaling;
        let denominator = scaled * scaled + sigma_data * sigma_data;
        (
            sigma_data * sigma_data / denominator,
            scaled / denominator.sqrt(),
        )
    }
}

impl<B: Backend> Scheduler<B> for LcmScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(steps, train)?;
        let original = self.config.original_inference_steps;
        if original == 0 || original > train {
            return Err(SchedulerError::InvalidSteps(format!(
                "original_inference_steps {original} must be in 1..={train}"
            )));
        }
        if steps > original {
            return Err(SchedulerError::InvalidSteps(format!(
                "{steps} steps is more than the {original} original_inference_steps LCM was distilled with"
            )));
        }
        // The teacher's timesteps, largest first, sampled evenly by index.
        let k = train / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let positions = linspace(0.0, origin.len() as f64, steps + 1);
        self.timesteps = positions[..steps]
            .iter()
            .map(|p| origin[p.floor() as usize] as f64)
            .collect();
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
        let t = self.timesteps[i];
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(t);
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev_t >= 0.0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (c_skip, c_out) = self.scalings(t);
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => {
                (sample.clone() - model_output * (1.0 - a_t).sqrt()) / a_t.sqrt()
            }
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                sample.clone() * a_t.sqrt() - model_output * (1.0 - a_t).sqrt()
            }
        };
        let x0 = self.config.limit_x0(x0, false);
        let denoised = x0 * c_out + sample * c_skip;
        let prev_sample = if i + 1 < self.timesteps.len() {
            let z = noise.standard_normal(denoised.dims(), &denoised.device());
            denoised.clone() * a_prev.sqrt() + z * (1.0 - a_prev).sqrt()
        } else {
            denoised.clone()
        };
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: denoised,
        })
    }
}
