//! The decoder half of Stable Diffusion's VAE (diffusers `AutoencoderKL`): latents back to
//! images in `[-1, 1]`, whole or in blended tiles for large images.

mod decoder;
mod tiling;

pub use decoder::{Decoder, UpDecoderBlock2d, VaeDecoder};
pub use sd_core::{AutoencoderKlConfig, CoreError, Result};
pub use tiling::Tiling;
