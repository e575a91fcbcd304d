//! DPM-Solver++ single-step (Lu et al. 2022, "DPM-Solver++", Algorithm 1): second-order steps
//! made of two model calls, a first-order step to an intermediate σ and the second-order update
//! over both from the group's start ("DPM++ 2S"), ODE or SDE.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::{FinalSigmasType, SchedulerConfig, TimestepSpacing};
use crate::dpm_solver_multistep::{
    Algorithm, FinalSigmaMin, Update, alpha_sigma, dpm_solver_pp_update, multistep_schedule,
    solver_variant, unclipped_timesteps,
};
use crate::error::Result;
use crate::sigmas::{alphas_cumprod, check_steps, train_sigmas};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "DPMSolverSinglestepScheduler";

/// diffusers' `DPMSolverSinglestepScheduler` with `algorithm_type` `dpmsolver++` or
/// `sde-dpmsolver++` and `solver_order` 1 or 2.
#[derive(Debug, Clone)]
pub struct DpmSolverSinglestepScheduler<B: Backend> {
    config: SchedulerConfig,
    algorithm: Algorithm,
    heun: bool,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The solver order of each step (1, 2, 1, 2, …, ending in first order).
    orders: Vec<usize>,
    /// The data predictions of the previous step and this one.
    previous: Option<Tensor<B, 4>>,
    /// Where the current single-step group started.
    group_start: Option<Tensor<B, 4>>,
    progress: Progress,
}

impl<B: Backend> DpmSolverSinglestepScheduler<B> {
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
            orders: Vec::new(),
            previous: None,
            group_start: None,
            progress: Progress::default(),
        })
    }

    /// diffusers' `get_order_list` for orders 1 and 2.
    fn order_list(&self, steps: usize) -> Vec<usize> {
        let c = &self.config;
        let final_zero =
            c.final_sigmas_type.unwrap_or(FinalSigmasType::Zero) == FinalSigmasType::Zero;
        // diffusers turns lower_order_final on when the steps do not divide into groups, or the
        // last σ is 0.
        let lower_order_final =
            c.lower_order_final || !steps.is_multiple_of(c.solver_order) || final_zero;
        let mut orders: Vec<usize> = match (c.solver_order, lower_order_final) {
            (1, _) => vec![1; steps],
            (_, true) if steps.is_multiple_of(2) => [1, 2]
                .repeat(steps / 2 - 1)
                .into_iter()
                .chain([1, 1])
                .collect(),
            (_, true) => [1, 2].repeat(steps / 2).into_iter().chain([1]).collect(),
            (_, false) => [1, 2].repeat(steps / 2),
        };
        if final_zero && let Some(last) = orders.last_mut() {
            *last = 1;
        }
        orders
    }
}

impl<B: Backend> Scheduler<B> for DpmSolverSinglestepScheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.config.num_train_timesteps)?;
        let last = unclipped_timesteps(&self.config, &self.alphas_cumprod);
        // The single-step solver always spaces its timesteps evenly.
        let config = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Linspace),
            ..self.config.clone()
        };
        let (timesteps, sigmas) = multistep_schedule(
            &config,
            &self.train_sigmas,
            steps,
            last,
            FinalSigmaMin::TrainingMinimum,
        )?;
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.orders = self.order_list(steps);
        self.previous = None;
        self.group_start = None;
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
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (sample.clone() - model_output * sigma_s0) / alpha_s0,
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample.clone() * alpha_s0 - model_output * sigma_s0,
        };
        let x0 = self.config.threshold(x0);
        let z = match self.algorithm {
            Algorithm::Sde => Some(noise.standard_normal(sample.dims(), &sample.device())),
            Algorithm::Ode => None,
        };
        let mut order = self.orders.get(i).copied().unwrap_or(1);
        if order == 2 && self.previous.is_none() {
            order = 1;
        }
        if order == 1 {
            self.group_start = Some(sample.clone());
        }
        let start = self.group_start.clone().unwrap_or(sample);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda = |alpha: f64, sigma: f64| alpha.ln() - sigma.ln();
        let lambda_t = lambda(alpha_t, sigma_t);
        let update = if order == 1 {
            Update {
                sample: start,
                d0: x0.clone(),
                d1: None,
                alpha_t,
                sigma_t,
                sigma_s: sigma_s0,
                h: lambda_t - lambda(alpha_s0, sigma_s0),
                noise: z,
            }
        } else {
            // Second order over the group: from σ_{i−1} (where it started) to σ_{i+1}, with the
            // prediction there as D0 and the slope to this one as D1.
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h = lambda_t - lambda_s1;
            let r0 = (lambda(alpha_s0, sigma_s0) - lambda_s1) / h;
            let m1 = self.previous.clone().expect("checked above");
            Update {
                sample: start,
                d0: m1.clone(),
                d1: Some((x0.clone() - m1) / r0),
                alpha_t,
                sigma_t,
                sigma_s: sigma_s1,
                h,
                noise: z,
            }
        };
        let prev_sample = dpm_solver_pp_update(self.algorithm, self.heun, update);
        self.previous = Some(x0.clone());
        self.progress.index += 1;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: x0,
        })
    }
}
