//! Super-resolution after the decoder, the seed article's last inference stage: "pass it
//! through super-resolution networks".
//!
//! Real-ESRGAN (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with
//! Pure Synthetic Data") ships two generators, both here with the released files' key names:
//!
//! - [`RrdbNet`]: ESRGAN's generator (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution
//!   Generative Adversarial Networks", §3.1): residual-in-residual dense blocks, then nearest
//!   ×2 upsampling twice (`RealESRGAN_x4plus`, and the ×2 model with a pixel-unshuffled input).
//! - [`SrVggNetCompact`]: the compact VGG-style network of `realesr-general-x4v3` and the
//!   anime-video models: plain 3×3 convolutions with PReLU, a pixel shuffle, plus the nearest
//!   upsampled input.
//!
//! [`Upscaler::load`] tells them apart from the file's keys (`.pth` read without running pickle
//! code, or `.safetensors`); [`Upscaler::upscale`] runs one on an image in tiles, as
//! Real-ESRGAN's `RealESRGANer.tile_process` does, so that memory stays bounded at any size.

mod compact;
mod error;
mod ops;
mod rrdb;
mod tile;
mod upscaler;

pub use compact::{SrVggNetCompact, SrVggNetCompactConfig};
pub use error::{Result, UpscaleError};
pub use rrdb::{RrdbNet, RrdbNetConfig};
pub use tile::TileOptions;
pub use upscaler::Upscaler;
