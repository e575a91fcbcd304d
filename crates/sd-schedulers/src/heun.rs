//! Heun's method (Karras et al. 2022, Algorithm 1 without churn): an Euler step to σ_{i+1},
//! then a second model call there and the average of the two slopes. Two model calls per step:
//! the timesteps list every inner σ twice.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{FinalSigmasType, SchedulerConfig};
use crate::error::Result;
use crate::euler::SigmaSchedule;
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "HeunDiscreteScheduler";

/// The first half of a Heun step, kept for the second.
#[derive(Debug, Clone)]
struct FirstHalf<B: Backend> {
    derivative: Tensor<B, 4>,
    dt: f64,
    sample: Tensor<B, 4>,
}

/// diffusers' `HeunDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler<B: Backend> {
    schedule: SigmaSchedule,
    /// σ per entry of `timesteps`, then 0.
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    first: Option<FirstHalf<B>>,
    progress: Progress,
}

impl<B: Backend> HeunDiscreteScheduler<B> {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, NAME)?,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            first: None,
            progress: Progress::default(),
        })
    }

    /// The σ per model call, then the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// `[a, b, c, d]` → `[a, b, b, c, c, d]`, diffusers' `repeat_interleave` layout.
fn interleave(values: &[f64], keep_last_single: bool) -> Vec<f64> {
    let n = values.len();
    let mut out = vec![values[0]];
    let inner_end = if keep_last_single { n - 1 } else { n };
    for &v in &values[1..inner_end] {
        out.extend([v, v]);
    }
    if keep_last_single && n > 1 {
        out.push(values[n - 1]);
    }
    out
}

impl<B: Backend> Scheduler<B> for HeunDiscreteScheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.schedule
            .set_timesteps(steps, true, Some(FinalSigmasType::Zero))?;
        self.sigmas = interleave(&self.schedule.sigmas, true);
        self.timesteps = interleave(&self.schedule.timesteps, false);
        self.first = None;
        self.progress.reset(self.timesteps.len());
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma()
    }

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        self.progress.begin_at(index)
    }

    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let sigma = crate::at(&self.sigmas, self.progress.index, "sigmas")?;
        Ok(crate::noise_ve(original, noise, sigma))
    }

    fn step_index(&self) -> usize {
        self.progress.index
    }

    fn scale_model_input(&self, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        match self.sigmas.get(self.progress.index) {
            Some(&sigma) => {
                let s = sigma as f32;
                sample / f64::from((s * s + 1.0).sqrt())
            }
            None => sample,
        }
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        let i = self.progress.current()?;
        let (prev_sample, x0) = match self.first.take() {
            None => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 =
                    self.clip(
                        self.schedule
                            .denoised(model_output, sample.clone(), sigma, NAME)?,
                    );
                let derivative = (sample.clone() - x0.clone()) / sigma;
                let dt = f64::from(next as f32 - sigma as f32);
                let prev = sample.clone() + derivative.clone() * dt;
                self.first = Some(FirstHalf {
                    derivative,
                    dt,
                    sample,
                });
                (prev, x0)
            }
            Some(first) => {
                // The slope at σ_{i+1}, averaged with the one at σ_i.
                let sigma_next = self.sigmas[i];
                let x0 = self.clip(self.schedule.denoised(
                    model_output,
                    sample.clone(),
                    sigma_next,
                    NAME,
                )?);
                let derivative = (sample - x0.clone()) / sigma_next;
                let derivative = (first.derivative + derivative) / 2.0;
                (first.sample + derivative * first.dt, x0)
            }
        };
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}

impl<B: Backend> HeunDiscreteScheduler<B> {
    fn clip(&self, x0: Tensor<B, 4>) -> Tensor<B, 4> {
        let config = &self.schedule.config;
        if config.clip_sample.unwrap_or(false) {
            x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        } else {
            x0
        }
    }
}
