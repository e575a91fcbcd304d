//! Linear multistep (k-diffusion's `sample_lms`): x ← x + Σ_j c_j · d_{i−j}, where the d are
//! the last (up to four) slopes `(x − x̂_0)/σ` and c_j integrates the j-th Lagrange basis
//! polynomial through those σ over [σ_i, σ_{i+1}].

use std::collections::VecDeque;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{FinalSigmasType, SchedulerConfig};
use crate::error::Result;
use crate::euler::SigmaSchedule;
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "LMSDiscreteScheduler";
/// diffusers' default `order` argument of `step`.
const ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler<B: Backend> {
    schedule: SigmaSchedule,
    /// The last slopes, oldest first.
    derivatives: VecDeque<Tensor<B, 4>>,
    progress: Progress,
}

impl<B: Backend> LmsDiscreteScheduler<B> {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, NAME)?,
            derivatives: VecDeque::new(),
            progress: Progress::default(),
        })
    }

    /// ∫_{σ_i}^{σ_{i+1}} Π_{k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k}) dτ. The integrand is a
    /// polynomial of degree < 4, which 4-point Gauss–Legendre integrates exactly.
    fn coefficient(&self, order: usize, i: usize, j: usize) -> f64 {
        let s = &self.schedule.sigmas;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != j)
                .map(|k| (tau - s[i - k]) / (s[i - j] - s[i - k]))
                .product::<f64>()
        };
        const NODES: [(f64, f64); 4] = [
            (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
            (-0.339_981_043_584_856_26, 0.652_145_154_862_546_1),
            (0.339_981_043_584_856_26, 0.652_145_154_862_546_1),
            (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        ];
        let (a, b) = (s[i], s[i + 1]);
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        NODES
            .iter()
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl<B: Backend> Scheduler<B> for LmsDiscreteScheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.schedule
            .set_timesteps(steps, true, Some(FinalSigmasType::Zero))?;
        self.derivatives.clear();
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
        let sigma = self.schedule.sigmas[i];
        let x0 = self
            .schedule
            .denoised(model_output, sample.clone(), sigma, NAME)?;
        self.derivatives
            .push_back((sample.clone() - x0.clone()) / sigma);
        if self.derivatives.len() > ORDER {
            self.derivatives.pop_front();
        }
        let order = (i + 1).min(ORDER);
        let mut prev = sample;
        for (j, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            prev = prev + derivative.clone() * self.coefficient(order, i, j);
        }
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }
}
