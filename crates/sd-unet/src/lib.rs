//! The conditional U-Net of Stable Diffusion (Ronneberger et al. 2015; Rombach et al. 2022,
//! sec. 3.3): diffusers' `UNet2DConditionModel` for SD 1.x, 2.x, XL and inpainting configs,
//! built from `sd-core`'s layers.

mod blocks;
mod config;
mod embeddings;
mod single_file;
mod transformer;
mod unet;

pub use blocks::{DownBlock, MidBlock, UpBlock};
pub use config::{BlockKind, FlagPerBlock, PerBlock, UNet2DConditionConfig};
pub use embeddings::{TimestepEmbedding, timestep_embedding};
pub use single_file::{
    LDM_UNET_PREFIX, diffusers_to_ldm_key, kohya_ldm_to_diffusers, ldm_to_diffusers_key,
};
pub use transformer::{Attention, BasicTransformerBlock, FeedForward, Transformer2d};
pub use unet::{TextTimeConditioning, UNet2DConditionModel, checkpoint_key};
