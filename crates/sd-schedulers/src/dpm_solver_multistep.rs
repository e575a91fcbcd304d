//! DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2), in its ODE form
//! ("DPM++ 2M") and its SDE form ("DPM++ 2M SDE"), first or second order, with optional Karras
//! sigmas. Works in `λ = log(α/σ)`, on data predictions `x̂_0`.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::{FinalSigmasType, SchedulerConfig, TimestepSpacing};
use crate::error::{Result, SchedulerError};
use crate::sigmas::{
    alphas_cumprod, check_steps, exponential, interp, karras, linspace, log_sigmas, sigma_to_t,
    to_f32, train_sigmas,
};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "DPMSolverMultistepScheduler";

/// Which DPM-Solver++ variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// `dpmsolver++`: the probability-flow ODE.
    Ode,
    /// `sde-dpmsolver++`: the SDE, with fresh noise each step.
    Sde,
}

/// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type` `dpmsolver++` or
/// `sde-dpmsolver++` and `solver_order` 1 or 2.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler<B: Backend> {
    config: SchedulerConfig,
    algorithm: Algorithm,
    heun: bool,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The data predictions of the previous step and of this one.
    previous: Option<Tensor<B, 4>>,
    lower_order_nums: usize,
    progress: Progress,
}

impl<B: Backend> DpmSolverMultistepScheduler<B> {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let (algorithm, heun) = solver_variant(&config, NAME)?;
        let alphas_cumprod = alphas_cumprod(&config, true)?;
        Ok(Self {
            train_sigmas: train_sigmas(&alphas_cumprod),
            alphas_cumprod,
            config,
            algorithm,
            heun,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            previous: None,
            lower_order_nums: 0,
            progress: Progress::default(),
        })
    }

    /// The σ at each timestep, then the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// The DPM-Solver++ variant a config asks for: `algorithm_type` `dpmsolver++` (ODE) or
/// `sde-dpmsolver++`, `solver_type` midpoint or Heun (true), `solver_order` 1 or 2. Checks the
/// config for `scheduler` on the way.
pub(crate) fn solver_variant(
    config: &SchedulerConfig,
    scheduler: &'static str,
) -> Result<(Algorithm, bool)> {
    config.reject_unsupported(scheduler)?;
    let unsupported = |field, value: &str| SchedulerError::Unsupported {
        scheduler,
        field,
        value: value.into(),
    };
    let algorithm = match config.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
        "dpmsolver++" => Algorithm::Ode,
        "sde-dpmsolver++" => Algorithm::Sde,
        other => return Err(unsupported("algorithm_type", other)),
    };
    let heun = match config.solver_type.as_deref().unwrap_or("midpoint") {
        "midpoint" => false,
        "heun" => true,
        other => return Err(unsupported("solver_type", other)),
    };
    if !(1..=2).contains(&config.solver_order) {
        return Err(unsupported(
            "solver_order",
            &config.solver_order.to_string(),
        ));
    }
    Ok((algorithm, heun))
}

/// The inputs of one DPM-Solver++ update from σ_s to σ_t (VP α and σ, `h = λ_t − λ_s`).
pub(crate) struct Update<B: Backend> {
    pub sample: Tensor<B, 4>,
    /// The data prediction the step is based on.
    pub d0: Tensor<B, 4>,
    /// The scaled difference to an earlier prediction, for second order.
    pub d1: Option<Tensor<B, 4>>,
    pub alpha_t: f64,
    pub sigma_t: f64,
    pub sigma_s: f64,
    pub h: f64,
    /// Fresh noise, for the SDE variant.
    pub noise: Option<Tensor<B, 4>>,
}

/// DPM-Solver++ (Lu et al. 2022, eqs. 8–10 and Algorithm 2) and its SDE form, first order, or
/// second order with `d1` (midpoint or Heun-type coefficient).
pub(crate) fn dpm_solver_pp_update<B: Backend>(
    algorithm: Algorithm,
    heun: bool,
    u: Update<B>,
) -> Tensor<B, 4> {
    // σ_t / σ_s is 0 at the final σ = 0, where h is infinite.
    let ratio = u.sigma_t / u.sigma_s;
    let h = u.h;
    match algorithm {
        Algorithm::Ode => {
            let em1 = (-h).exp() - 1.0;
            let mut x = u.sample * ratio - u.d0 * (u.alpha_t * em1);
            if let Some(d1) = u.d1 {
                let k = if heun {
                    u.alpha_t * (em1 / h + 1.0)
                } else {
                    -0.5 * u.alpha_t * em1
                };
                x = x + d1 * k;
            }
            x
        }
        Algorithm::Sde => {
            let e2 = 1.0 - (-2.0 * h).exp();
            let mut x = u.sample * (ratio * (-h).exp()) + u.d0 * (u.alpha_t * e2);
            if let Some(d1) = u.d1 {
                let k = if heun {
                    u.alpha_t * (e2 / (-2.0 * h) + 1.0)
                } else {
                    0.5 * u.alpha_t * e2
                };
                x = x + d1 * k;
            }
            x + u.noise.expect("drawn for the SDE") * (u.sigma_t * e2.sqrt())
        }
    }
}

/// How many training timesteps are left when those whose λ falls below `lambda_min_clipped` are
/// clipped away (all of them by default).
pub(crate) fn unclipped_timesteps(config: &SchedulerConfig, alphas_cumprod: &[f64]) -> usize {
    let train = config.num_train_timesteps;
    let Some(min) = config.lambda_min_clipped.filter(|m| m.is_finite()) else {
        return train;
    };
    // λ_t = log √ᾱ − log √(1 − ᾱ), in float32 as diffusers computes it; `searchsorted` on the
    // ascending (flipped) table counts the λ below the clip.
    let clipped = alphas_cumprod
        .iter()
        .filter(|&&a| {
            let a = a as f32;
            f64::from(a.sqrt().ln() - (1.0 - a).sqrt().ln()) < min
        })
        .count();
    train - clipped
}

/// What `final_sigmas_type = "sigma_min"` means: DPM-Solver takes the smallest training σ,
/// UniPC the last σ of its (Karras or exponential) schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigmaMin {
    TrainingMinimum,
    ScheduleLast,
}

/// The timesteps (integers, largest first) and σ (one more, the final one) of the multistep
/// solvers, DPM-Solver++ and UniPC, as diffusers lays them out up to `last` (the training
/// timesteps not clipped away).
pub(crate) fn multistep_schedule(
    c: &SchedulerConfig,
    train_sigmas: &[f64],
    steps: usize,
    last: usize,
    final_sigma_min: FinalSigmaMin,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let train = c.num_train_timesteps;
    let mut timesteps: Vec<f64> = match c.spacing_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> = linspace(0.0, (last - 1) as f64, steps + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            t.reverse();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last / (steps + 1);
            let first = steps * ratio + c.steps_offset;
            // A large offset puts the first step past the schedule (σ would be read beyond the
            // table and the run would turn NaN): refused, as the other samplers refuse it.
            if first >= train {
                return Err(SchedulerError::InvalidSteps(format!(
                    "with steps_offset {}, {steps} steps start at timestep {first}, past the \
                     {train} training timesteps",
                    c.steps_offset
                )));
            }
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + c.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let step = train as f64 / steps as f64;
            let len = (last as f64 / step).ceil() as usize;
            (0..len)
                .map(|i| (last as f64 - i as f64 * step).round_ties_even() - 1.0)
                .collect()
        }
    };
    let (min, max) = (train_sigmas[0], train_sigmas[train_sigmas.len() - 1]);
    let logs = log_sigmas(train_sigmas);
    let mut sigmas: Vec<f64> = if c.use_karras_sigmas {
        // These solvers have no sigma_min/sigma_max fields: the training range.
        let ks = karras(min, max, steps);
        timesteps = ks
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                if c.beta_schedule == sd_core::noise_schedule::BetaSchedule::SquaredcosCapV2 {
                    t
                } else {
                    t.round_ties_even()
                }
            })
            .collect();
        ks
    } else if c.use_exponential_sigmas {
        let es = exponential(min, max, steps);
        timesteps = es.iter().map(|&s| sigma_to_t(s, &logs)).collect();
        es
    } else {
        timesteps.iter().map(|&t| interp(t, train_sigmas)).collect()
    };
    let final_sigma = match c.final_sigmas_type.unwrap_or(FinalSigmasType::Zero) {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin => match final_sigma_min {
            FinalSigmaMin::TrainingMinimum => min,
            FinalSigmaMin::ScheduleLast if c.use_karras_sigmas || c.use_exponential_sigmas => {
                sigmas[sigmas.len() - 1]
            }
            FinalSigmaMin::ScheduleLast => min,
        },
    };
    sigmas.push(final_sigma);
    // diffusers stores these timesteps as int64 (truncating any it did not round).
    Ok((
        timesteps.into_iter().map(f64::trunc).collect(),
        to_f32(sigmas),
    ))
}

/// `(α_t, σ_t)` of the VP process for a k-diffusion σ: `α = 1/√(σ² + 1)`, `σ_t = σ α`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

impl<B: Backend> Scheduler<B> for DpmSolverMultistepScheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.config.num_train_timesteps)?;
        let last = unclipped_timesteps(&self.config, &self.alphas_cumprod);
        // `lambda_min_clipped` can clip away every training step: nothing is left to sample.
        if last < 2 {
            return Err(SchedulerError::InvalidSteps(format!(
                "lambda_min_clipped {:?} leaves {last} of the {} training timesteps to sample from",
                self.config.lambda_min_clipped, self.config.num_train_timesteps
            )));
        }
        let (timesteps, sigmas) = multistep_schedule(
            &self.config,
            &self.train_sigmas,
            steps,
            last,
            FinalSigmaMin::TrainingMinimum,
        )?;
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.previous = None;
        self.lower_order_nums = 0;
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
        let sigma = crate::at(&self.sigmas, self.progress.index, "sigmas")?;
        Ok(crate::noise_sigma_vp(original, noise, sigma))
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
        let n = self.timesteps.len();
        let c = &self.config;
        let final_zero =
            c.final_sigmas_type.unwrap_or(FinalSigmasType::Zero) == FinalSigmasType::Zero;
        let lower_order_final =
            i == n - 1 && (c.euler_at_final || (c.lower_order_final && n < 15) || final_zero);

        // The data prediction x̂_0 at σ_s0 (the model output converted, eq. 9 of DPM-Solver++).
        let sigma_s0 = self.sigmas[i];
        let (alpha_s0, sigma_t_s0) = alpha_sigma(sigma_s0);
        let x0 = match c.prediction_type {
            PredictionType::Epsilon => (sample.clone() - model_output * sigma_t_s0) / alpha_s0,
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample.clone() * alpha_s0 - model_output * sigma_t_s0,
        };
        let x0 = c.threshold(x0);

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda = |alpha: f64, sigma: f64| alpha.ln() - sigma.ln();
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_t_s0);
        let h = lambda_t - lambda_s0;

        let z = match self.algorithm {
            Algorithm::Sde => Some(noise.standard_normal(sample.dims(), &sample.device())),
            Algorithm::Ode => None,
        };
        let first_order = c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        // D1 = (x̂_0 − x̂_0_prev) / r0 for the second-order update.
        let d1 = match (&self.previous, first_order) {
            (Some(prev), false) => {
                let (alpha_s1, sigma_t_s1) = alpha_sigma(self.sigmas[i - 1]);
                let r0 = (lambda_s0 - lambda(alpha_s1, sigma_t_s1)) / h;
                Some((x0.clone() - prev.clone()) / r0)
            }
            _ => None,
        };
        let prev_sample = dpm_solver_pp_update(
            self.algorithm,
            self.heun,
            Update {
                sample,
                d0: x0.clone(),
                d1,
                alpha_t,
                sigma_t,
                sigma_s: sigma_t_s0,
                h,
                noise: z,
            },
        );
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        self.previous = Some(x0.clone());
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}
