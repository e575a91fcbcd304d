//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"): a multistep
//! predictor (UniP) and, after each model call, a corrector (UniC) that reuses that call, in
//! log-SNR on data (or noise) predictions, with the B(h) variants `bh1` and `bh2`.

use std::collections::VecDeque;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::noise_schedule::PredictionType;

use crate::config::SchedulerConfig;
use crate::dpm_solver_multistep::{FinalSigmaMin, alpha_sigma, multistep_schedule};
use crate::error::{Result, SchedulerError};
use crate::sigmas::{alphas_cumprod, check_steps, train_sigmas};
use crate::{NoiseSource, Progress, Scheduler, StepOutput};

const NAME: &str = "UniPCMultistepScheduler";

/// diffusers' `UniPCMultistepScheduler` (without `solver_p`).
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler<B: Backend> {
    config: SchedulerConfig,
    bh2: bool,
    predict_x0: bool,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The last `solver_order` converted model outputs, oldest first.
    outputs: VecDeque<Tensor<B, 4>>,
    last_sample: Option<Tensor<B, 4>>,
    this_order: usize,
    lower_order_nums: usize,
    progress: Progress,
}

/// λ = log α − log σ of a k-diffusion σ.
fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    alpha.ln() - sigma_t.ln()
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// The coefficients shared by the predictor and the corrector: `h`, `φ₁(h)·h`, `B(h)`, and the
/// system `R ρ = b` of the order conditions (Zhao et al. 2023, eq. 8).
struct Coefficients {
    h_phi_1: f64,
    b_h: f64,
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl<B: Backend> UniPcMultistepScheduler<B> {
    /// The sampler `config` describes; an error when the config sets a field this sampler does not
    /// implement or its noise schedule is invalid.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.reject_unsupported(NAME)?;
        let bh2 = match config.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => false,
            // diffusers maps the DPM-Solver names onto bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            other => {
                return Err(SchedulerError::Unsupported {
                    scheduler: NAME,
                    field: "solver_type",
                    value: other.into(),
                });
            }
        };
        if config.solver_order == 0 {
            return Err(SchedulerError::Unsupported {
                scheduler: NAME,
                field: "solver_order",
                value: "0".into(),
            });
        }
        let ac = alphas_cumprod(&config, true)?;
        Ok(Self {
            predict_x0: config.predict_x0.unwrap_or(true),
            train_sigmas: train_sigmas(&ac),
            config,
            bh2,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            outputs: VecDeque::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            progress: Progress::default(),
        })
    }

    /// The model output as the data (x̂₀) or noise prediction the solver works on.
    fn convert(&self, output: Tensor<B, 4>, sample: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4> {
        let (alpha, sigma_t) = alpha_sigma(sigma);
        let converted = match (self.predict_x0, self.config.prediction_type) {
            (true, PredictionType::Epsilon) => (sample.clone() - output * sigma_t) / alpha,
            (true, PredictionType::Sample) => output,
            (true, PredictionType::VPrediction) => sample.clone() * alpha - output * sigma_t,
            (false, PredictionType::Epsilon) => output,
            (false, PredictionType::Sample) => (sample.clone() - output * alpha) / sigma_t,
            (false, PredictionType::VPrediction) => output * alpha + sample.clone() * sigma_t,
        };
        match (self.config.thresholding, self.predict_x0) {
            (false, _) => converted,
            (true, true) => self.config.threshold(converted),
            // Threshold the data prediction the noise prediction implies, and convert back.
            (true, false) => {
                let x0 = (sample.clone() - converted * sigma_t) / alpha;
                let x0 = self.config.threshold(x0);
                (sample - x0 * alpha) / sigma_t
            }
        }
    }

    /// Coefficients for a step from σ `s0` to σ `t` of the given order, with the ratios
    /// `r_k = (λ_{s_k} − λ_{s0}) / h` of the earlier points.
    fn coefficients(&self, h: f64, rks: &[f64], order: usize) -> Coefficients {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let (mut r, mut b) = (Vec::new(), Vec::new());
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { h_phi_1, b_h, r, b }
    }

    /// The update shared by UniP and UniC from `x` at σ `s0` to σ `t` with the newest output
    /// `m0`: `x_t = (σ_t/σ_s0) x − α_t φ₁ m0 − α_t B(h) · residual` (data prediction).
    fn update(
        &self,
        x: Tensor<B, 4>,
        m0: Tensor<B, 4>,
        s0: f64,
        t: f64,
        c: &Coefficients,
        residual: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let (alpha_t, sigma_t) = alpha_sigma(t);
        let (alpha_s0, sigma_s0) = alpha_sigma(s0);
        let (base, scale) = if self.predict_x0 {
            (
                x * (sigma_t / sigma_s0) - m0 * (alpha_t * c.h_phi_1),
                alpha_t,
            )
        } else {
            (
                x * (alpha_t / alpha_s0) - m0 * (sigma_t * c.h_phi_1),
                sigma_t,
            )
        };
        match residual {
            Some(res) => base - res * (scale * c.b_h),
            None => base,
        }
    }

    /// The differences `D1_k = (m_k − m0) / r_k` to the earlier outputs and their ratios, for the
    /// points at σ indices `index_of(k)`, k = 1..order.
    fn history(
        &self,
        order: usize,
        s0: f64,
        h: f64,
        index_of: impl Fn(usize) -> usize,
    ) -> (Vec<f64>, Vec<Tensor<B, 4>>) {
        let m0 = self
            .outputs
            .back()
            .expect("an output before any step")
            .clone();
        let n = self.outputs.len();
        let (mut rks, mut d1s) = (Vec::new(), Vec::new());
        for k in 1..order {
            let rk = (lambda(self.sigmas[index_of(k)]) - lambda(s0)) / h;
            rks.push(rk);
            d1s.push((self.outputs[n - 1 - k].clone() - m0.clone()) / rk);
        }
        rks.push(1.0);
        (rks, d1s)
    }

    /// UniP: from `x` at σ_i to σ_{i+1}.
    fn predict(&self, x: Tensor<B, 4>, i: usize, order: usize) -> Tensor<B, 4> {
        let (s0, t) = (self.sigmas[i], self.sigmas[i + 1]);
        let h = lambda(t) - lambda(s0);
        let (rks, d1s) = self.history(order, s0, h, |k| i - k);
        let c = self.coefficients(h, &rks, order);
        let residual = if d1s.is_empty() {
            None
        } else {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let m = order - 1;
                let r = c.r[..m].iter().map(|row| row[..m].to_vec()).collect();
                solve(r, c.b[..m].to_vec())
            };
            Some(weighted(&rhos, &d1s))
        };
        let m0 = self.outputs.back().expect("pushed").clone();
        self.update(x, m0, s0, t, &c, residual)
    }

    /// UniC: corrects the sample at σ_i with the model output `m_t` just computed there.
    fn correct(
        &self,
        m_t: Tensor<B, 4>,
        last: Tensor<B, 4>,
        i: usize,
        order: usize,
    ) -> Tensor<B, 4> {
        let (s0, t) = (self.sigmas[i - 1], self.sigmas[i]);
        let h = lambda(t) - lambda(s0);
        let (rks, d1s) = self.history(order, s0, h, |k| i - (k + 1));
        let c = self.coefficients(h, &rks, order);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(c.r.clone(), c.b.clone())
        };
        let m0 = self.outputs.back().expect("kept").clone();
        let d1_t = m_t - m0.clone();
        let mut residual = d1_t * rhos[rhos.len() - 1];
        if !d1s.is_empty() {
            residual = residual + weighted(&rhos[..rhos.len() - 1], &d1s);
        }
        self.update(last, m0, s0, t, &c, Some(residual))
    }
}

/// `Σ_k ρ_k D_k`.
fn weighted<B: Backend>(rhos: &[f64], ds: &[Tensor<B, 4>]) -> Tensor<B, 4> {
    rhos.iter()
        .zip(ds)
        .map(|(rho, d)| d.clone() * *rho)
        .reduce(|a, b| a + b)
        .expect("at least one term")
}

impl<B: Backend> Scheduler<B> for UniPcMultistepScheduler<B> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        check_steps(steps, train)?;
        let (timesteps, sigmas) = multistep_schedule(
            &self.config,
            &self.train_sigmas,
            steps,
            train,
            FinalSigmaMin::ScheduleLast,
        )?;
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.outputs.clear();
        self.last_sample = None;
        self.this_order = 0;
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
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<StepOutput<B>> {
        let i = self.progress.current()?;
        let order = self.config.solver_order;
        let converted = self.convert(model_output, sample.clone(), self.sigmas[i]);
        let use_corrector = i > 0
            && !self.config.disable_corrector.contains(&(i - 1))
            && self.last_sample.is_some();
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(converted.clone(), last.clone(), i, self.this_order),
            _ => sample,
        };
        self.outputs.push_back(converted.clone());
        if self.outputs.len() > order {
            self.outputs.pop_front();
        }
        let this_order = if self.config.lower_order_final {
            order.min(self.timesteps.len() - i)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev_sample = self.predict(sample, i, self.this_order);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.progress.index += 1;
        let pred_original_sample = if self.predict_x0 {
            converted
        } else {
            let (alpha, sigma_t) = alpha_sigma(self.sigmas[i]);
            (self.last_sample.clone().expect("set above") - converted * sigma_t) / alpha
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
