//! The encoder half of Stable Diffusion's VAE (diffusers `AutoencoderKL`): images in `[-1, 1]`
//! to a diagonal Gaussian over latents (Kingma & Welling 2014; Rombach et al. 2022, sec. 3.1).

mod encoder;
mod gaussian;

pub use encoder::{DownEncoderBlock2d, Encoder, VaeEncoder};
pub use gaussian::DiagonalGaussian;
pub use sd_core::{AutoencoderKlConfig, CoreError, Result};
