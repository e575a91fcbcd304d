//! The conditional U-Net of Stable Diffusion (Ronneberger et al. 2015; Rombach et al. 2022,
//! sec. 3.3): diffusers' `UNet2DConditionModel` for SD 1.x, 2.x, XL and inpainting configs,
//! built from `sd-core`'s layers, and the `ControlNetModel` that steers it from an image.

mod blocks;
mod conditioning;
mod config;
mod controlnet;
mod embeddings;
mod ip_adapter;
mod single_file;
mod transformer;
mod unet;

pub use blocks::{DownBlock, MidBlock, UpBlock};
pub use conditioning::{ControlResiduals, TextTimeConditioning, UNetConditioning};
pub use config::{BlockKind, FlagPerBlock, PerBlock, UNet2DConditionConfig};
pub use controlnet::{
    ControlNetConditioningEmbedding, ControlNetConfig, ControlNetExtras, ControlNetModel,
    controlnet_ldm_key, ldm_controlnet_key,
};
pub use embeddings::{TimestepEmbedding, timestep_embedding};
pub use ip_adapter::{ImageProjection, IpAdapter};
pub use single_file::{
    LDM_UNET_PREFIX, diffusers_to_ldm_key, kohya_ldm_to_diffusers, ldm_to_diffusers_key,
};
pub use transformer::{
    Attention, BasicTransformerBlock, FeedForward, Geglu, IpAttention, Transformer2d,
};
pub use unet::{UNet2DConditionModel, checkpoint_key};
