//! PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"): a few pseudo
//! Runge–Kutta steps (PRK) to start, then the pseudo linear multistep method (PLMS, eq. 12) with
//! up to four previous noise estimates. Stable Diffusion 1.x ships it with `skip_prk_steps`.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::{SchedulerConfig, TimestepSpacing};
use crate::error::{Result, SchedulerError};
use crate::sigmas::{alphas_cumprod, check_steps, integer_timesteps};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "PNDMScheduler";

/// diffusers' `PNDMScheduler`.
#[derive(Debug, Clone)]
pub struct PndmScheduler<B: Backend> {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// `T / n`, the PLMS step in training timesteps.
    stride: usize,
    prk_len: usize,
    timesteps: Vec<f64>,
    /// Previous noise estimates, oldest first (at most 4).
    ets: Vec<Tensor<B, 4>>,
    /// The running RK4 combination during PRK steps.
    rk_sum: Option<Tensor<B, 4>>,
    /// The sample a PRK stage or the first PLMS pair starts from.
    base_sample: Option<Tensor<B, 4>>,
    progress: Progress,
    /// Where the run started (img2img).
    begin: usize,
}

impl<B: Backend> PndmScheduler<B> {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.reject_unsupported(NAME)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::Unsupported {
                scheduler: NAME,
                field: "prediction_type",
                value: "sample".into(),
            });
        }
        let alphas_cumprod = alphas_cumprod(&config, false)?;
        // PNDM's own default for `set_alpha_to_one` is false.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            stride: 0,
            prk_len: 0,
            timesteps: Vec::new(),
            ets: Vec::new(),
            rk_sum: None,
            base_sample: None,
            progress: Progress::default(),
            begin: 0,
        })
    }

    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// x_{t−δ} from x_t and ε (eq. 11 of the PNDM paper, as diffusers' `_get_prev_sample`).
    fn prev_sample(
        &self,
        sample: Tensor<B, 4>,
        t: i64,
        prev_t: i64,
        eps: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let (a_t, a_prev) = (self.alpha(t), self.alpha(prev_t));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => eps * a_t.sqrt() + sample.clone() * b_t.sqrt(),
            _ => eps,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denominator = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        sample * sample_coeff - eps * ((a_prev - a_t) / denominator)
    }

    fn x0(&self, sample: Tensor<B, 4>, t: i64, output: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.alpha(t);
        match self.config.prediction_type {
            PredictionType::VPrediction => sample * a.sqrt() - output * (1.0 - a).sqrt(),
            _ => (sample - output * (1.0 - a).sqrt()) / a.sqrt(),
        }
    }
}

impl<B: Backend> Scheduler<B> for PndmScheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(steps, train)?;
        if !self.config.skip_prk_steps && steps < 4 {
            return Err(SchedulerError::InvalidSteps(format!(
                "PNDM's Runge–Kutta warm-up needs at least 4 steps, got {steps} \
                 (set skip_prk_steps, as Stable Diffusion's config does)"
            )));
        }
        let spacing = self.config.spacing_or(TimestepSpacing::Leading);
        // Ascending, as diffusers' `_timesteps`.
        let mut base = integer_timesteps(spacing, steps, train, self.config.steps_offset)?;
        base.reverse();
        let n = base.len();
        let (prk, plms): (Vec<f64>, Vec<f64>) = if self.config.skip_prk_steps {
            // [t_{n−1}, t_{n−2}, t_{n−2}, t_{n−3}, …, t_0]: the second entry is repeated for the
            // two-call start of PLMS.
            let mut plms: Vec<f64> = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            // Each of the last four timesteps and its half step, RK4 stages.
            let half = (train / steps / 2) as f64;
            let tail = &base[n.saturating_sub(4)..];
            let pairs: Vec<f64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<f64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = if doubled.len() >= 2 {
                doubled[1..doubled.len() - 1].to_vec()
            } else {
                Vec::new()
            };
            prk.reverse();
            let mut plms = base[..n.saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.prk_len = prk.len();
        self.timesteps = prk.into_iter().chain(plms).collect();
        self.stride = train / steps;
        self.ets.clear();
        self.rk_sum = None;
        self.base_sample = None;
        self.progress.reset(self.timesteps.len());
        self.begin = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        self.progress.begin_at(index)?;
        self.begin = index;
        Ok(())
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
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        // diffusers' PNDM counts its own steps from 0 wherever the run starts (img2img), and
        // takes the timestep from the caller.
        let index = self.progress.current()?;
        let counter = index - self.begin;
        let t = self.timesteps[index] as i64;
        let x0 = self.x0(sample.clone(), t, model_output.clone());
        let stride = self.stride as i64;
        let prev_sample = if counter < self.prk_len && !self.config.skip_prk_steps {
            // RK4 over two half steps: weights 1/6, 1/3, 1/3, 1/6.
            let diff = if counter % 2 == 1 { 0 } else { stride / 2 };
            let prev_t = t - diff;
            let base_t = self.timesteps[self.begin + counter / 4 * 4] as i64;
            let eps = match counter % 4 {
                0 => {
                    self.rk_sum = Some(model_output.clone() / 6.0);
                    self.ets.push(model_output.clone());
                    self.base_sample = Some(sample.clone());
                    model_output
                }
                1 | 2 => {
                    let sum = self.rk_sum.take().expect("set at stage 0");
                    self.rk_sum = Some(sum + model_output.clone() / 3.0);
                    model_output
                }
                _ => self.rk_sum.take().expect("set at stage 0") + model_output / 6.0,
            };
            let start = self.base_sample.clone().unwrap_or(sample);
            self.prev_sample(start, base_t, prev_t, eps)
        } else {
            let mut t = t;
            let mut prev_t = t - stride;
            if counter != 1 {
                if self.ets.len() > 3 {
                    self.ets.remove(0);
                }
                self.ets.push(model_output.clone());
            } else {
                prev_t = t;
                t += stride;
            }
            let e = &self.ets;
            let k = e.len();
            let (eps, start) = if k == 1 && counter == 0 {
                self.base_sample = Some(sample.clone());
                (model_output, sample)
            } else if k == 1 && counter == 1 {
                let start = self.base_sample.take().expect("kept at step 0");
                ((model_output + e[0].clone()) / 2.0, start)
            } else if k == 2 {
                ((e[1].clone() * 3.0 - e[0].clone()) / 2.0, sample)
            } else if k == 3 {
                (
                    (e[2].clone() * 23.0 - e[1].clone() * 16.0 + e[0].clone() * 5.0) / 12.0,
                    sample,
                )
            } else {
                (
                    (e[3].clone() * 55.0 - e[2].clone() * 59.0 + e[1].clone() * 37.0
                        - e[0].clone() * 9.0)
                        / 24.0,
                    sample,
                )
            };
            self.prev_sample(start, t, prev_t, eps)
        };
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}
