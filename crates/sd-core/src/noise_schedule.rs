//! The noise schedule of the forward process (Ho et al. 2020, sec. 2): the betas, `ᾱ_t`
//! (`alphas_cumprod`) and what follows from them (`add_noise`, velocity, SNR). Shared by the
//! training side (`sd-diffusion`, which re-exports it) and the samplers (`sd-schedulers`), so
//! that neither stage crate depends on the other.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;

use crate::error::{CoreError, Result};

/// How the betas grow over the training timesteps (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Evenly spaced betas from `beta_start` to `beta_end` (Ho et al. 2020).
    Linear,
    /// Evenly spaced square roots of betas, squared: Stable Diffusion's schedule.
    ScaledLinear,
    /// Betas from the cosine `ᾱ(t)` (Nichol & Dhariwal 2021, eq. 17), capped at 0.999.
    SquaredcosCapV2,
}

/// What the denoiser predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε (Ho et al. 2020).
    #[default]
    Epsilon,
    /// The velocity `v = √ᾱ ε − √(1 − ᾱ) x_0` (Salimans & Ho 2022, sec. 4): SD 2.x 768.
    VPrediction,
    /// The clean sample `x_0` itself.
    Sample,
}

/// The fields of a diffusers scheduler config that define the training noise schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct NoiseScheduleConfig {
    /// The number of training timesteps (1000 in Stable Diffusion).
    pub num_train_timesteps: usize,
    /// β at the first timestep.
    pub beta_start: f64,
    /// β at the last timestep.
    pub beta_end: f64,
    /// How the betas grow from `beta_start` to `beta_end`.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale to zero terminal SNR (Lin et al. 2023, Algorithm 1).
    pub rescale_betas_zero_snr: bool,
}

impl Default for NoiseScheduleConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

impl NoiseScheduleConfig {
    /// Stable Diffusion's schedule: `scaled_linear` from 0.00085 to 0.012 over 1000 steps.
    pub fn stable_diffusion() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..Self::default()
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`, computed the way PyTorch does (in f32, from
/// both ends towards the middle) so that the betas agree with diffusers to the last bit.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// Betas for the cosine schedule (Nichol & Dhariwal 2021, eq. 17), `1 − ᾱ(t₂)/ᾱ(t₁)` capped at
/// 0.999; in f64, as diffusers' `betas_for_alpha_bar` computes them in Python floats.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1): shift
/// `√ᾱ` so its last value is 0, scale it so its first value is unchanged, and convert back.
/// Computed in float32 with a double-precision product, as diffusers' tensor code does it, so
/// that the schedules agree to the last bit where the samplers are most sensitive (σ near ᾱ = 0).
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut cumprod = 1.0f64;
    let mut sqrt_bar: Vec<f32> = betas
        .iter()
        .map(|b| {
            cumprod *= f64::from(1.0f32 - *b as f32);
            (cumprod as f32).sqrt()
        })
        .collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(f64::from(1.0f32 - bar[0]));
    out.extend(bar.windows(2).map(|w| f64::from(1.0f32 - w[1] / w[0])));
    out
}

/// The training noise schedule: `β_t` and `ᾱ_t = Π_{s≤t} (1 − β_s)`, in f64 on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// `β_t` per training timestep.
    pub betas: Vec<f64>,
    /// `ᾱ_t` per training timestep.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule `config` describes; an error when it has no timesteps, the wrong number of
    /// `trained_betas` or a beta outside `[0, 1]`.
    pub fn new(config: &NoiseScheduleConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err(CoreError::InvalidSchedule(
                "num_train_timesteps is 0".into(),
            ));
        }
        let mut betas: Vec<f64> = match (&config.trained_betas, config.beta_schedule) {
            (Some(betas), _) => {
                if betas.len() != n {
                    return Err(CoreError::InvalidSchedule(format!(
                        "trained_betas has {} values for {n} timesteps",
                        betas.len()
                    )));
                }
                betas.clone()
            }
            // diffusers builds betas in float32; keep those values, then work in f64.
            (None, BetaSchedule::Linear) => linspace_f32(config.beta_start, config.beta_end, n)
                .into_iter()
                .map(f64::from)
                .collect(),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| f64::from(b * b))
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => cosine_betas(n),
        };
        if let Some(b) = betas
            .iter()
            .find(|b| !(0.0..=1.0).contains(*b) || b.is_nan())
        {
            return Err(CoreError::InvalidSchedule(format!(
                "beta {b} is outside [0, 1]"
            )));
        }
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        // diffusers keeps betas and `1 − β` in float32 and accumulates the product in double
        // (PyTorch's `cumprod` accumulator): the same here, so that both schedules agree to
        // float32 rounding, while ᾱ itself stays in f64.
        for b in &mut betas {
            *b = f64::from(*b as f32);
        }
        let mut cumprod = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                cumprod *= f64::from(1.0f32 - *b as f32);
                cumprod
            })
            .collect();
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// The number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// `ᾱ_t`, checked.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(CoreError::TimestepOutOfRange {
                timestep: t,
                num_train_timesteps: self.num_train_timesteps(),
            })
    }

    /// Signal-to-noise ratio `ᾱ_t / (1 − ᾱ_t)` (Kingma et al. 2021).
    pub fn snr(&self, t: usize) -> Result<f64> {
        let a = self.alpha_bar(t)?;
        Ok(a / (1.0 - a))
    }

    /// Per-sample `[b, 1, 1, 1]` coefficients `(√ᾱ_t, √(1 − ᾱ_t))` for `timesteps`.
    fn coefficients<B: Backend>(
        &self,
        timesteps: &[usize],
        batch: usize,
        device: &B::Device,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        if timesteps.len() != batch {
            return Err(CoreError::Shape(format!(
                "{} timesteps for a batch of {batch}",
                timesteps.len()
            )));
        }
        let mut signal = Vec::with_capacity(batch);
        let mut noise = Vec::with_capacity(batch);
        for &t in timesteps {
            let a = self.alpha_bar(t)?;
            signal.push(a.sqrt() as f32);
            noise.push((1.0 - a).sqrt() as f32);
        }
        let tensor = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [batch, 1, 1, 1]), device);
        Ok((tensor(signal), tensor(noise)))
    }

    fn check_shapes<B: Backend>(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> Result<()> {
        if a.dims() != b.dims() {
            return Err(CoreError::Shape(format!(
                "sample {:?} and noise {:?} differ",
                a.dims(),
                b.dims()
            )));
        }
        Ok(())
    }

    /// `x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε` (Ho et al. 2020, eq. 4), one timestep per sample.
    pub fn add_noise<B: Backend>(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[usize],
    ) -> Result<Tensor<B, 4>> {
        Self::check_shapes(&x0, &noise)?;
        let (signal, sigma) = self.coefficients::<B>(timesteps, x0.dims()[0], &x0.device())?;
        Ok(x0 * signal + noise * sigma)
    }

    /// The v-prediction target `v = √ᾱ_t ε − √(1 − ᾱ_t) x_0` (Salimans & Ho 2022, sec. 4).
    pub fn velocity<B: Backend>(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: &[usize],
    ) -> Result<Tensor<B, 4>> {
        Self::check_shapes(&x0, &noise)?;
        let (signal, sigma) = self.coefficients::<B>(timesteps, x0.dims()[0], &x0.device())?;
        Ok(noise * signal - x0 * sigma)
    }
}
