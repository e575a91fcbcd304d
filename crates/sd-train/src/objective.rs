//! The denoising objective of diffusers' `train_text_to_image.py` (Ho et al. 2020, eq. 14,
//! with the target chosen by the prediction type): noise latents at random timesteps and
//! regress the U-Net's output onto ε, v or x₀.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_diffusion::training::{min_snr_weights, target};
use sd_diffusion::{NoiseSchedule, PredictionType};
use sd_unet::{TextTimeConditioning, UNet2DConditionModel};

use crate::error::{Result, TrainError};
use crate::precision::to_dtype;

/// One batch's inputs to the objective. The random parts (noise, timesteps, perturbation) are
/// drawn by the caller, so that a run is reproducible and can replay the reference's draws.
#[derive(Debug, Clone)]
pub struct DenoisingBatch<B: Backend> {
    /// Clean latents `x₀` (the VAE posterior sample × scaling factor).
    pub latents: Tensor<B, 4>,
    /// The text encoder's hidden states `[b, tokens, width]`.
    pub context: Tensor<B, 3>,
    /// ε, offset noise already added.
    pub noise: Tensor<B, 4>,
    /// One training timestep per sample.
    pub timesteps: Vec<usize>,
    /// Input perturbation (Ning et al. 2023): extra noise, already scaled, added to ε where
    /// the latents are noised but not to the target.
    pub perturbation: Option<Tensor<B, 4>>,
    /// Channels the U-Net reads after the noisy latents, not noised: an inpainting U-Net's
    /// mask (1 where the image is to be filled in, at latent resolution) and masked-image
    /// latents, `[b, 1 + latent channels, h, w]`, as diffusers' inpainting pipeline and its
    /// training scripts (`torch.cat([noisy_latents, mask, masked_latents], dim=1)`).
    pub conditioning: Option<Tensor<B, 4>>,
    /// SDXL's added conditioning (`added_cond_kwargs`): the second text encoder's pooled
    /// embedding and each image's size and crop ids.
    pub text_time: Option<TextTimeConditioning<B>>,
}

/// What the U-Net learns and how the loss is weighted.
#[derive(Debug, Clone)]
pub struct DenoisingObjective {
    /// The training noise schedule the latents are noised with.
    pub schedule: NoiseSchedule,
    /// What the U-Net predicts, and so the regression target.
    pub prediction: PredictionType,
    /// Min-SNR-γ weighting (Hang et al. 2023); `None` for the plain mean squared error.
    pub snr_gamma: Option<f64>,
}

impl DenoisingObjective {
    /// The loss of one batch (a scalar): the mean squared error in f32 between the U-Net's
    /// prediction and the target, per sample weighted by Min-SNR-γ when set.
    pub fn loss<B: Backend>(
        &self,
        unet: &UNet2DConditionModel<B>,
        batch: DenoisingBatch<B>,
    ) -> Result<Tensor<B, 1>> {
        let DenoisingBatch {
            latents,
            context,
            noise,
            timesteps,
            perturbation,
            conditioning,
            text_time,
        } = batch;
        let b = latents.dims()[0];
        if timesteps.len() != b {
            return Err(TrainError::Config(format!(
                "{} timesteps for a batch of {b}",
                timesteps.len()
            )));
        }
        let latents_dtype = latents.dtype();
        let input_noise = match perturbation {
            Some(p) => noise.clone() + p,
            None => noise.clone(),
        };
        let noisy = self
            .schedule
            .add_noise(latents.clone(), input_noise, &timesteps)?;
        let noisy = match conditioning {
            Some(c) => Tensor::cat(vec![noisy, c], 1),
            None => noisy,
        };
        let goal = target(&self.schedule, self.prediction, latents, noise, &timesteps)?;
        let t: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        // The U-Net computes in its weights' dtype (a bf16 copy under mixed precision); the
        // loss is taken in the latents' (f32), as diffusers' `model_pred.float()`.
        let compute = unet.conv_in.weight.dtype();
        let text_time = text_time.map(|tt| TextTimeConditioning {
            text_embeds: to_dtype(tt.text_embeds, compute),
            time_ids: tt.time_ids,
        });
        let prediction = unet.forward(
            to_dtype(noisy, compute),
            &t,
            to_dtype(context, compute),
            text_time.as_ref(),
        )?;
        let prediction = to_dtype(prediction, latents_dtype);
        let squared = (prediction - goal).powi_scalar(2);
        Ok(match self.snr_gamma {
            None => squared.mean(),
            Some(gamma) => {
                let weights = min_snr_weights(&self.schedule, self.prediction, &timesteps, gamma)?;
                let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
                let weights = Tensor::<B, 1>::from_floats(weights.as_slice(), &squared.device());
                let per_sample = squared.reshape([b as i32, -1]).mean_dim(1).reshape([b]);
                (per_sample * weights).mean()
            }
        })
    }
}
