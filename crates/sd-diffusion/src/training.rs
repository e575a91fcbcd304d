//! What a training loop needs from the forward process: random timesteps and noise, the
//! regression target for each prediction type, and Min-SNR-γ loss weights.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rand::{Rng, RngExt};

use crate::error::Result;
use crate::{NoiseSchedule, PredictionType};

/// Re-exported for training loops: the one seeded noise function, [`crate::noise`].
pub use crate::noise::host_noise;

/// What the denoiser is trained to output for `x_t` made from `x0` and `noise` at `timesteps`.
pub fn target<B: Backend>(
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    x0: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    timesteps: &[usize],
) -> Result<Tensor<B, 4>> {
    match prediction {
        PredictionType::Epsilon => Ok(noise),
        PredictionType::VPrediction => Ok(schedule.velocity(x0, noise, timesteps)?),
        PredictionType::Sample => Ok(x0),
    }
}

/// Min-SNR-γ loss weights (Hang et al. 2023, eq. 12), as diffusers' training scripts compute
/// them: `min(SNR, γ) / SNR` for ε-prediction, `min(SNR, γ) / (SNR + 1)` for v-prediction and
/// `min(SNR, γ)` for x₀-prediction.
pub fn min_snr_weights(
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    timesteps: &[usize],
    gamma: f64,
) -> Result<Vec<f64>> {
    if gamma.is_nan() || gamma <= 0.0 {
        return Err(sd_core::CoreError::InvalidSchedule(format!(
            "Min-SNR gamma must be positive, got {gamma}"
        ))
        .into());
    }
    timesteps
        .iter()
        .map(|&t| {
            let snr = schedule.snr(t)?;
            let clipped = snr.min(gamma);
            Ok(match prediction {
                PredictionType::Epsilon => clipped / snr,
                PredictionType::VPrediction => clipped / (snr + 1.0),
                PredictionType::Sample => clipped,
            })
        })
        .collect()
}

/// `batch` training timesteps drawn uniformly from `0..num_train_timesteps`.
pub fn sample_timesteps(schedule: &NoiseSchedule, batch: usize, rng: &mut impl Rng) -> Vec<usize> {
    sample_timesteps_in(0..schedule.num_train_timesteps(), batch, rng)
}

/// `batch` training timesteps drawn uniformly from `range` (kohya's `--min_timestep` /
/// `--max_timestep`: `torch.randint(min, max)`), to train only the noise levels a stage needs.
pub fn sample_timesteps_in(
    range: std::ops::Range<usize>,
    batch: usize,
    rng: &mut impl Rng,
) -> Vec<usize> {
    (0..batch)
        .map(|_| rng.random_range(range.clone()))
        .collect()
}

/// Offset noise (Guttenberg 2023): `noise + offset · n` with `n ~ N(0, 1)` per sample and
/// channel, constant over the image, so that the model learns to change overall brightness.
pub fn offset_noise<B: Backend>(
    noise: Tensor<B, 4>,
    offset: f64,
    rng: &mut impl Rng,
) -> Tensor<B, 4> {
    let [b, c, _, _] = noise.dims();
    let shift = host_noise::<B, 4>([b, c, 1, 1], rng, &noise.device());
    noise + shift * offset
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn timesteps_stay_in_their_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let drawn = sample_timesteps_in(990..1000, 500, &mut rng);
        assert!(drawn.iter().all(|t| (990..1000).contains(t)));
        assert!(drawn.contains(&990) && drawn.contains(&999));
    }
}
