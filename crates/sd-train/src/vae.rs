//! The autoencoder's training objective, as the latent diffusion paper's first stage trains it
//! (Rombach et al. 2022, sec. 3 and app. G; `LPIPSWithDiscriminator` of its code with the
//! perceptual and adversarial terms off and the learned log-variance at 0): a reconstruction
//! term summed over pixels plus a small KL term pulling the posterior towards N(0, I), both
//! summed per image and averaged over the batch.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The pixel-wise reconstruction penalty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reconstruction {
    /// `|x − x̂|`, the paper's choice (sharper than L2).
    #[default]
    L1,
    /// `(x − x̂)²`.
    L2,
}

/// The objective's weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeObjective {
    /// The pixel-wise reconstruction penalty.
    pub reconstruction: Reconstruction,
    /// The KL term's weight (1e-6 in the paper's KL-regularised autoencoders).
    pub kl_weight: f64,
}

/// One batch's losses (scalars): the total to minimise and its two terms.
#[derive(Debug, Clone)]
pub struct VaeLosses<B: Backend> {
    /// The loss minimised: `reconstruction + kl_weight · kl`.
    pub total: Tensor<B, 1>,
    /// The reconstruction penalty, summed over pixels and averaged over the batch.
    pub reconstruction: Tensor<B, 1>,
    /// The posterior's KL divergence to the standard normal, averaged over the batch.
    pub kl: Tensor<B, 1>,
}

impl VaeObjective {
    /// Encodes `images` (`[b, c, h, w]` in `[-1, 1]`), samples the posterior with `noise`
    /// (standard normal, the latent's shape), decodes and scores the reconstruction.
    pub fn losses<B: Backend>(
        &self,
        encoder: &VaeEncoder<B>,
        decoder: &VaeDecoder<B>,
        images: Tensor<B, 4>,
        noise: Tensor<B, 4>,
    ) -> Result<VaeLosses<B>> {
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return Err(TrainError::Config(format!(
                "the KL weight must be ≥ 0, got {}",
                self.kl_weight
            )));
        }
        let b = images.dims()[0];
        let posterior = encoder.encode(images.clone())?;
        let reconstructed = decoder.forward(posterior.sample(noise));
        let difference = images - reconstructed;
        let per_pixel = match self.reconstruction {
            Reconstruction::L1 => difference.abs(),
            Reconstruction::L2 => difference.powi_scalar(2),
        };
        let reconstruction = per_pixel.sum().div_scalar(b as f64);
        let kl = posterior.kl().sum().div_scalar(b as f64);
        let total = reconstruction.clone() + kl.clone().mul_scalar(self.kl_weight);
        Ok(VaeLosses {
            total,
            reconstruction,
            kl,
        })
    }
}
