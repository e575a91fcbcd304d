//! DPM-Solver-2 in k-diffusion's form (Karras et al. 2022, Algorithm 2's second-order variant;
//! k-diffusion `sample_dpm_2`): an Euler step to the geometric midpoint σ_mid = √(σ_i σ_{i+1}),
//! a model call there, and the full step with the midpoint slope. The ancestral variant
//! (`sample_dpm_2_ancestral`) steps down to σ_down and adds noise of scale σ_up.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{FinalSigmasType, SchedulerConfig};
use crate::error::Result;
use crate::euler::SigmaSchedule;
use crate::sigmas::{log_sigmas, sigma_to_t, to_f32};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

/// diffusers' `KDPM2DiscreteScheduler` (`ancestral: false`) and
/// `KDPM2AncestralDiscreteScheduler` (`ancestral: true`).
#[derive(Debug, Clone)]
pub struct Kdpm2Scheduler<B: Backend> {
    name: &'static str,
    ancestral: bool,
    schedule: SigmaSchedule,
    /// Per model call, diffusers' interleaved layout: `[σ0, σ1, σ1, …, 0, 0, 0]`.
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    /// For the ancestral variant: σ_up and σ_down per step, interleaved the same way.
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    timesteps: Vec<f64>,
    /// The sample the current step started from, between its two model calls.
    first_sample: Option<Tensor<B, 4>>,
    progress: Progress,
}

fn interleave(values: &[f64]) -> Vec<f64> {
    let mut out = vec![values[0]];
    for &v in &values[1..] {
        out.extend([v, v]);
    }
    out.push(values[values.len() - 1]);
    out
}

/// `exp(lerp(ln a, ln b, ½))` in float32: the geometric mean diffusers computes, with PyTorch's
/// `lerp` formula for weight ½ (`end − (end − start)·½`), so that a zero σ gives 0 as there.
fn geometric_mean(a: f64, b: f64) -> f64 {
    let (start, end) = ((a as f32).ln(), (b as f32).ln());
    f64::from((end - (end - start) * 0.5).exp())
}

impl<B: Backend> Kdpm2Scheduler<B> {
    /// The sampler `config` describes, the ancestral variant when `ancestral`; an error when the
    /// config sets a field it does not implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig, ancestral: bool) -> Result<Self> {
        let name = if ancestral {
            "KDPM2AncestralDiscreteScheduler"
        } else {
            "KDPM2DiscreteScheduler"
        };
        Ok(Self {
            name,
            ancestral,
            schedule: SigmaSchedule::new(config, name)?,
            sigmas: Vec::new(),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            timesteps: Vec::new(),
            first_sample: None,
            progress: Progress::default(),
        })
    }

    fn in_first_order(&self) -> bool {
        self.first_sample.is_none()
    }
}

impl<B: Backend> Scheduler<B> for Kdpm2Scheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.schedule
            .set_timesteps(steps, true, Some(FinalSigmasType::Zero))?;
        // diffusers' KDPM2 samplers round the Karras timesteps (their σ stay unrounded).
        if self.schedule.config.use_karras_sigmas {
            for t in &mut self.schedule.timesteps {
                *t = t.round_ties_even();
            }
        }
        // σ_0 … σ_{n−1}, 0.
        let base = self.schedule.sigmas.clone();
        let n = base.len() - 1;
        let logs = log_sigmas(&self.schedule.train_sigmas);
        let mid_t = |s: f64| f64::from(sigma_to_t(s, &logs) as f32);
        let t = &self.schedule.timesteps;
        let mut timesteps = vec![t[0]];
        let (mut ups, mut downs) = (vec![0.0; n + 1], vec![0.0; n + 1]);
        let interpol: Vec<f64> = if self.ancestral {
            // Per step: σ_up, σ_down towards σ_{i+1}, and the midpoint between σ_i and σ_down.
            for i in 0..=n {
                let (f, next) = (
                    base[i] as f32,
                    base.get(i + 1).copied().unwrap_or(0.0) as f32,
                );
                let up = (next * next * (f * f - next * next) / (f * f)).sqrt();
                ups[i] = f64::from(up);
                downs[i] = if i == n {
                    0.0
                } else {
                    f64::from((next * next - up * up).sqrt())
                };
            }
            let mut mid: Vec<f64> = (0..=n).map(|i| geometric_mean(base[i], downs[i])).collect();
            for m in mid.iter_mut().skip(n.saturating_sub(1)) {
                *m = 0.0;
            }
            for k in 1..n {
                timesteps.extend([mid_t(mid[k - 1]), t[k]]);
            }
            mid
        } else {
            // The midpoint between σ_{i−1} and σ_i, at index i.
            let mid: Vec<f64> = (0..=n)
                .map(|i| geometric_mean(base[i], base[if i == 0 { n } else { i - 1 }]))
                .collect();
            for k in 1..n {
                timesteps.extend([mid_t(mid[k]), t[k]]);
            }
            mid
        };
        self.timesteps = to_f32(timesteps);
        self.sigmas = interleave(&base);
        self.sigmas_interpol = interleave(&interpol);
        self.sigmas_up = interleave(&ups);
        self.sigmas_down = interleave(&downs);
        self.first_sample = None;
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
        let i = self.progress.index;
        let sigma = if self.in_first_order() {
            self.sigmas.get(i)
        } else if self.ancestral {
            self.sigmas_interpol.get(i.wrapping_sub(1))
        } else {
            self.sigmas_interpol.get(i)
        };
        match sigma {
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
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        let i = self.progress.current()?;
        let (prev_sample, x0) = match self.first_sample.take() {
            None => {
                let sigma = self.sigmas[i];
                // The ancestral tables hold each step's midpoint at the step's own index.
                let sigma_mid = self.sigmas_interpol[if self.ancestral { i } else { i + 1 }];
                let x0 = self
                    .schedule
                    .denoised(model_output, sample.clone(), sigma, self.name)?;
                let derivative = (sample.clone() - x0.clone()) / sigma;
                let dt = f64::from(sigma_mid as f32 - sigma as f32);
                let prev = sample.clone() + derivative * dt;
                self.first_sample = Some(sample);
                (prev, x0)
            }
            Some(start) => {
                let sigma = self.sigmas[i - 1];
                let sigma_mid = self.sigmas_interpol[if self.ancestral { i - 1 } else { i }];
                let x0 =
                    self.schedule
                        .denoised(model_output, sample.clone(), sigma_mid, self.name)?;
                let derivative = (sample - x0.clone()) / sigma_mid;
                if self.ancestral {
                    let (up, down) = (self.sigmas_up[i - 1], self.sigmas_down[i - 1]);
                    let dt = f64::from(down as f32 - sigma as f32);
                    let prev = start + derivative * dt;
                    let z = noise.standard_normal(prev.dims(), &prev.device());
                    (prev + z * up, x0)
                } else {
                    let dt = f64::from(self.sigmas[i] as f32 - sigma as f32);
                    (start + derivative * dt, x0)
                }
            }
        };
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}
