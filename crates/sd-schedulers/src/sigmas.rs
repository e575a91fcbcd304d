//! Timestep spacing and sigma schedules shared by the samplers, computed on the host in f64 with
//! the float32 roundings diffusers applies, so that both pick the same timesteps and sigmas.

use sd_core::noise_schedule::NoiseSchedule;

use crate::config::{SchedulerConfig, TimestepSpacing};
use crate::error::{Result, SchedulerError};

/// `ᾱ_t` of the config's training schedule. With zero-terminal-SNR rescaling the last value is
/// 0, which makes σ infinite; the k-diffusion samplers replace it with `2⁻²⁴` as diffusers does.
pub(crate) fn alphas_cumprod(config: &SchedulerConfig, floor_terminal: bool) -> Result<Vec<f64>> {
    let mut ac = NoiseSchedule::new(&config.noise_schedule())?.alphas_cumprod;
    if floor_terminal
        && config.rescale_betas_zero_snr
        && let Some(last) = ac.last_mut()
    {
        *last = 2f64.powi(-24);
    }
    Ok(ac)
}

/// `σ_t = √((1 − ᾱ_t) / ᾱ_t)` per training timestep, in float32 arithmetic like diffusers'
/// tensor expression.
pub(crate) fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect()
}

/// Checks a step count against the training schedule.
pub(crate) fn check_steps(steps: usize, train: usize) -> Result<()> {
    if steps == 0 {
        return Err(SchedulerError::InvalidSteps(
            "the number of inference steps must be at least 1".into(),
        ));
    }
    if steps > train {
        return Err(SchedulerError::InvalidSteps(format!(
            "{steps} inference steps is more than the {train} training timesteps"
        )));
    }
    Ok(())
}

/// `np.arange(start, 0, -step)`: numpy's length rule `ceil((stop − start) / step)`.
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start - i as f64 * step).collect()
}

/// `np.linspace(start, stop, num)` in f64.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// Inference timesteps, largest first, as the k-diffusion style samplers (Euler and friends)
/// compute them: float32 values, not necessarily integers for `linspace`.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    train: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    let f32_round = |v: f64| f64::from(v as f32);
    let timesteps: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(f32_round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => arange_down(train as f64, train as f64 / steps as f64)
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    };
    // `leading` spacing shifts every step by `steps_offset`: with a large offset the first
    // step lands past the schedule (diffusers then fails indexing `alphas_cumprod`).
    if let Some(&first) = timesteps.first()
        && first >= train as f64
    {
        return Err(SchedulerError::InvalidSteps(format!(
            "with steps_offset {steps_offset}, {steps} steps start at timestep {first}, past the \
             {train} training timesteps"
        )));
    }
    Ok(timesteps)
}

/// Integer inference timesteps, largest first, as DDIM and DDPM compute them.
pub(crate) fn integer_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    train: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    match spacing {
        TimestepSpacing::Linspace => Ok(linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(f64::round_ties_even)
            .collect()),
        other => spaced_timesteps(other, steps, train, steps_offset),
    }
}

/// `np.interp(x, arange(len), values)`: linear interpolation of a per-timestep table.
pub(crate) fn interp(x: f64, values: &[f64]) -> f64 {
    let last = values.len() - 1;
    if x <= 0.0 {
        return values[0];
    }
    if x >= last as f64 {
        return values[last];
    }
    let j = x.floor() as usize;
    let slope = values[j + 1] - values[j];
    slope * (x - j as f64) + values[j]
}

/// The Karras et al. (2022, eq. 5) schedule with ρ = 7 between `sigma_max` and `sigma_min`.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// σ evenly spaced in log σ from `sigma_max` down to `sigma_min` (diffusers'
/// `use_exponential_sigmas`).
pub(crate) fn exponential(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `log σ` of the training table, in float32 as diffusers takes it, for [`sigma_to_t`].
pub(crate) fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|s| f64::from((*s as f32).ln()))
        .collect()
}

/// The fractional training timestep whose σ is `sigma`, interpolating `log σ` linearly between
/// the two neighbouring training timesteps (diffusers' `_sigma_to_t`); `log_sigmas` from
/// [`log_sigmas`].
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas.iter().filter(|l| log_sigma - **l >= 0.0).count();
    let low_idx = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Rounds to float32, as diffusers stores sigmas and timesteps.
pub(crate) fn to_f32(values: Vec<f64>) -> Vec<f64> {
    values.into_iter().map(|v| f64::from(v as f32)).collect()
}
