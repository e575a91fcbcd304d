//! The Stable Diffusion families: what detection reports and what the loaders and pipelines
//! branch on.

/// The model families, which differ in how prompts are encoded and in their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 512².
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, `!` padding, 768² v-prediction or
    /// 512² ε-prediction.
    Sd2,
    /// Stable Diffusion XL: two text encoders, size and crop conditioning, 1024².
    Sdxl,
}

impl ModelFamily {
    /// The family's name for messages: `SD 1.x`, `SD 2.x` or `SDXL`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
            Self::Sdxl => "SDXL",
        }
    }
}
