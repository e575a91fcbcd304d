//! The published text tower configs, for single-file checkpoints that carry no config: what
//! diffusers' `from_single_file` fetches from the hub, here built in.

use crate::clip::{ClipTextConfig, HiddenAct};

impl ClipTextConfig {
    /// OpenAI CLIP ViT-L/14's text tower (SD 1.x; SDXL's first encoder).
    pub fn clip_vit_l() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            hidden_act: HiddenAct::QuickGelu,
            ..Self::default()
        }
    }

    /// OpenCLIP ViT-H/14's text tower without its last layer: SD 2.x conditions on the
    /// penultimate one, so diffusers' SD 2 configs have 23 layers.
    pub fn open_clip_vit_h_penultimate() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 512,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: HiddenAct::Gelu,
            ..Self::default()
        }
    }

    /// OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder, with its projection).
    pub fn open_clip_vit_bigg() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: HiddenAct::Gelu,
            ..Self::default()
        }
    }
}
