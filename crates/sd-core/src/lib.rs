//! Shared foundation of the `sd` workspace.
//!
//! - [`backend`]: the Burn backends compiled in (cargo features `flex`, `ndarray`, `wgpu`, `cuda`).
//! - [`layers`]: building blocks shared by the VAE halves and the U-Net.
//! - [`config_checks`]: reading component configs and checking every field's value.
//! - [`files`]: inputs that must be regular files, outputs written atomically.
//! - [`weights`]: strict safetensors loading with diffusers key names.
//! - [`image_io`]: images to and from tensors in `[-1, 1]`.
//! - [`kernel_cache`]: where the GPU backends keep the kernels they compile, between runs.
//! - [`noise_schedule`]: the betas and `ᾱ_t` of the forward process, shared by its training
//!   side (`sd-diffusion`) and the samplers (`sd-schedulers`); [`noise`]: the seeded noise both
//!   draw.
//! - [`optim`]: the optimiser's passes over every parameter (AdamW's update, norms, scaling).
//! - [`vae_config`]: the `AutoencoderKL` configuration both VAE halves are built from.
//! - [`vae_keys`]: the VAE's original single-file key names mapped to diffusers'.
//!
//! Every model is generic over `B: Backend` so that it also trains on `Autodiff<B>`. The fused
//! CPU kernels live in `sd-kernels` (with all of the libraries' pointer code); the layer entry
//! points here (`layers::conv2d_forward`, `layers::linear_forward`, …) are the only callers,
//! and take Burn's ops for every other backend.

#![forbid(unsafe_code)]

pub mod backend;
pub mod config_checks;
pub mod error;
pub mod files;
pub mod image_io;
pub mod kernel_cache;
pub mod layers;
pub mod noise;
pub mod noise_schedule;
pub mod optim;
pub mod vae_config;
pub mod vae_keys;
pub mod weights;

pub use error::{CoreError, Result};

/// The diffusers version written into the configs we save (`_diffusers_version`): the one the
/// fixtures are generated and checked with.
pub const DIFFUSERS_VERSION: &str = "0.42.1";
pub use vae_config::AutoencoderKlConfig;
