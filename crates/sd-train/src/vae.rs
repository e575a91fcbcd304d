//! The autoencoder's training objective, as the latent diffusion paper's first stage trains it
//! (Rombach et al. 2022, sec. 3 and app. G; `LPIPSWithDiscriminator` of its code with the
//! perceptual and adversarial terms off and the learned log-variance at 0): a reconstruction
//! term summed over pixels plus a small KL term pulling the posterior towards N(0, I), both
//! summed per image and averaged over the batch; optionally, from a given step, the paper's
//! adversarial term against a [`PatchDiscriminator`], weighted adaptively.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use sd_core::layers::conv2d_forward;
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;
use serde::{Deserialize, Serialize};

use crate::discriminator::{PatchDiscriminator, generator_hinge_loss};
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
        self.check()?;
        let b = images.dims()[0];
        let posterior = encoder.encode(images.clone())?;
        let reconstructed = decoder.forward(posterior.sample(noise));
        let reconstruction = self.penalty(images, reconstructed);
        let kl = posterior.kl().sum().div_scalar(b as f64);
        let total = reconstruction.clone() + kl.clone().mul_scalar(self.kl_weight);
        Ok(VaeLosses {
            total,
            reconstruction,
            kl,
        })
    }
}

/// One batch's losses with the adversarial term, as the latent diffusion code's
/// `LPIPSWithDiscriminator` computes the generator's (autoencoder's) side.
#[derive(Debug, Clone)]
pub struct AdversarialLosses<B: Backend> {
    /// What to call `backward` on: its gradient with respect to the autoencoder's parameters
    /// is that of [`Self::total`] (the adaptive weight held constant, as the reference
    /// detaches it); its value is not the loss.
    pub objective: Tensor<B, 1>,
    /// `reconstruction + kl_weight · kl + adversarial_weight · generator`.
    pub total: f64,
    /// The reconstruction penalty, summed over pixels and averaged over the batch.
    pub reconstruction: f64,
    /// The posterior's KL divergence to the standard normal, averaged over the batch.
    pub kl: f64,
    /// The generator's hinge term, `−mean(D(x̂))`.
    pub generator: f64,
    /// The weight the generator's term got: `factor · weight · clamp(‖∇_W rec‖ / (‖∇_W g‖ +
    /// 10⁻⁴), 0, 10⁴)`, `W` the decoder's last convolution weight (`decoder.conv_out`).
    pub adversarial_weight: f64,
}

/// The L2 norm of a tensor, in f64.
fn norm<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    use burn::tensor::ElementConversion;
    t.powi_scalar(2).sum().into_scalar().elem::<f64>().sqrt()
}

impl VaeObjective {
    /// Refuses a KL weight outside its meaning.
    fn check(&self) -> Result<()> {
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return Err(TrainError::Config(format!(
                "the KL weight must be ≥ 0, got {}",
                self.kl_weight
            )));
        }
        Ok(())
    }

    /// The reconstruction penalty, summed over pixels and averaged over the batch.
    fn penalty<B: Backend>(
        &self,
        images: Tensor<B, 4>,
        reconstructed: Tensor<B, 4>,
    ) -> Tensor<B, 1> {
        let b = images.dims()[0];
        let difference = images - reconstructed;
        let per_pixel = match self.reconstruction {
            Reconstruction::L1 => difference.abs(),
            Reconstruction::L2 => difference.powi_scalar(2),
        };
        per_pixel.sum().div_scalar(b as f64)
    }

    /// [`Self::losses`] plus the adversarial term against `discriminator` (its weights are
    /// not trained by this loss), scaled by `factor` and by the adaptive weight (`weight`
    /// times the ratio of the two terms' gradient norms at the decoder's last layer, which
    /// keeps the adversarial gradient on the scale of the reconstruction's; paper's code:
    /// `calculate_adaptive_weight`).
    ///
    /// The two terms' gradients at the decoder's output and at its last layer come from small
    /// backward passes of their own; the returned objective then carries their weighted sum
    /// back through the autoencoder in one pass.
    #[allow(clippy::too_many_arguments)]
    pub fn adversarial_losses<B: AutodiffBackend>(
        &self,
        encoder: &VaeEncoder<B>,
        decoder: &VaeDecoder<B>,
        discriminator: &PatchDiscriminator<B>,
        weight: f64,
        factor: f64,
        images: Tensor<B, 4>,
        noise: Tensor<B, 4>,
    ) -> Result<AdversarialLosses<B>> {
        self.check()?;
        use burn::tensor::ElementConversion;
        let b = images.dims()[0];
        let posterior = encoder.encode(images.clone())?;
        let features = decoder.features(posterior.sample(noise));
        let conv_out = &decoder.decoder.conv_out;
        let reconstructed = conv2d_forward(conv_out, features.clone());
        let kl = posterior.kl().sum().div_scalar(b as f64);

        // Each term's gradient at the image x̂, from its own graph on a detached copy.
        let leaf = || reconstructed.clone().detach().require_grad();
        let x = leaf();
        let rec = self.penalty(images, x.clone());
        let rec_value: f64 = rec.clone().into_scalar().elem();
        let grads = rec.backward();
        let rec_grad = x.grad(&grads).ok_or_else(no_gradient)?;
        let x = leaf();
        let generator = generator_hinge_loss(discriminator.clone().no_grad().forward(x.clone()));
        let generator_value: f64 = generator.clone().into_scalar().elem();
        let grads = generator.backward();
        let generator_grad = x.grad(&grads).ok_or_else(no_gradient)?;

        // Their gradients at `conv_out.weight`: that convolution again, on the detached
        // features, its weight a fresh leaf.
        let weight_grad_norm = |upstream: &Tensor<B::InnerBackend, 4>| -> Result<f64> {
            let mut conv = conv_out.clone();
            conv.weight = conv.weight.map(|w| w.detach().require_grad());
            conv.bias = conv.bias.map(|b| b.map(|t| t.detach()));
            let y = conv2d_forward(&conv, features.clone().detach());
            let grads = (y * Tensor::from_inner(upstream.clone())).sum().backward();
            Ok(norm(
                conv.weight.val().grad(&grads).ok_or_else(no_gradient)?,
            ))
        };
        let ratio = weight_grad_norm(&rec_grad)? / (weight_grad_norm(&generator_grad)? + 1e-4);
        let adversarial_weight = factor * weight * ratio.clamp(0.0, 1e4);

        let upstream = rec_grad + generator_grad.mul_scalar(adversarial_weight);
        let objective = (reconstructed * Tensor::from_inner(upstream)).sum()
            + kl.clone().mul_scalar(self.kl_weight);
        let kl_value: f64 = kl.into_scalar().elem();
        Ok(AdversarialLosses {
            objective,
            total: rec_value + self.kl_weight * kl_value + adversarial_weight * generator_value,
            reconstruction: rec_value,
            kl: kl_value,
            generator: generator_value,
            adversarial_weight,
        })
    }
}

fn no_gradient() -> TrainError {
    TrainError::State("the adversarial weight's gradient did not reach the image".into())
}
