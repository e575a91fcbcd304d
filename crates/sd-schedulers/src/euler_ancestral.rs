//! Euler ancestral: an Euler step down to `σ_down`, then fresh noise of scale `σ_up` so that the
//! marginal at `σ_{i+1}` is right (Karras et al. 2022; k-diffusion's `sample_euler_ancestral`).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{FinalSigmasType, SchedulerConfig};
use crate::error::Result;
use crate::euler::{SigmaSchedule, euler_update};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

/// diffusers' `EulerAncestralDiscreteScheduler` ("Euler a").
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    schedule: SigmaSchedule,
    progress: Progress,
}

impl EulerAncestralDiscreteScheduler {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, "EulerAncestralDiscreteScheduler")?,
            progress: Progress::default(),
        })
    }

    /// The σ at each timestep, then the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl<B: Backend> Scheduler<B> for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        // diffusers' Euler ancestral has no Karras option and always ends at σ = 0.
        self.schedule
            .set_timesteps(steps, false, Some(FinalSigmasType::Zero))?;
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
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        let i = self.progress.current()?;
        let (from, to) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let x0 = self.schedule.denoised(
            model_output,
            sample.clone(),
            from,
            "EulerAncestralDiscreteScheduler",
        )?;
        let (f, t) = (from as f32, to as f32);
        let sigma_up = (t * t * (f * f - t * t) / (f * f)).sqrt();
        let sigma_down = (t * t - sigma_up * sigma_up).sqrt();
        let prev = euler_update(sample, x0.clone(), from, f64::from(sigma_down));
        let sigma_up = f64::from(sigma_up);
        let z = noise.standard_normal(prev.dims(), &prev.device());
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample: prev + z * sigma_up,
            pred_original_sample: x0,
        })
    }
}
