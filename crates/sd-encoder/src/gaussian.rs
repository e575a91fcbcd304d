use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// The posterior `q(z | x) = N(mean, exp(logvar))` the encoder predicts, per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// The mean: `[batch, latent_channels, h, w]`.
    pub mean: Tensor<B, 4>,
    /// Clamped to `[-30, 20]`, as diffusers does, so that `exp` neither underflows to a zero
    /// standard deviation nor overflows.
    pub logvar: Tensor<B, 4>,
    /// The standard deviation, `exp(logvar / 2)`.
    pub std: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Splits the encoder's `[batch, 2·latent, h, w]` moments into mean and log-variance.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let [b, c, h, w] = moments.dims();
        let half = c / 2;
        let mean = moments.clone().slice([0..b, 0..half, 0..h, 0..w]);
        let logvar = moments
            .slice([0..b, half..c, 0..h, 0..w])
            .clamp(-30.0, 20.0);
        let std = (logvar.clone() * 0.5).exp();
        Self { mean, logvar, std }
    }

    /// A sample `mean + std · noise` (the reparameterisation trick), with standard normal
    /// `noise` of the mean's shape from the caller so that seeds are under the caller's control.
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + self.std.clone() * noise
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    /// KL divergence to the standard normal, summed over `[1, 2, 3]` (the VAE's training loss).
    pub fn kl(&self) -> Tensor<B, 1> {
        let var = self.logvar.clone().exp();
        let terms = self.mean.clone().powi_scalar(2) + var - 1.0 - self.logvar.clone();
        let [b, ..] = terms.dims();
        (terms.reshape([b as i32, -1]).sum_dim(1) * 0.5).reshape([b])
    }
}
