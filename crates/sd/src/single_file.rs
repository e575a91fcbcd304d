//! Single-file checkpoints in the original (CompVis / Stability) layout: which family a file
//! is, the published configs for it, and the key maps of the VAE and the OpenCLIP text
//! encoders (the U-Net's is in `sd-unet`).

use sd_conditioner::ClipTextConfig;
use sd_core::AutoencoderKlConfig;
use sd_core::weights::SafetensorsFile;
use sd_schedulers::SchedulerConfig;
use sd_unet::UNet2DConditionConfig;

use crate::error::{Result, model_error};
use crate::family::ModelFamily;

const UNET_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// Where a text encoder's weights live in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPrefix {
    /// The key prefix, e.g. `cond_stage_model.transformer.`.
    pub prefix: String,
    /// OpenCLIP's layout (fused `in_proj` attention) rather than transformers'.
    pub open_clip: bool,
}

/// What the keys of a checkpoint say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointLayout {
    /// The model family the keys tell.
    pub family: ModelFamily,
    /// The U-Net's input channels, from its first convolution: 4, or 9 for inpainting.
    pub unet_in_channels: usize,
    /// Where each text encoder's weights live, in the family's order.
    pub text_prefixes: Vec<TextPrefix>,
}

/// Detects the family from the keys, as diffusers' `infer_diffusers_model_type` and
/// stable-diffusion.cpp do: the text encoders' prefixes tell SD 1.x (transformers CLIP), 2.x
/// (OpenCLIP) and XL (two embedders); the U-Net's first convolution tells inpainting.
pub fn detect(file: &SafetensorsFile) -> Result<CheckpointLayout> {
    let has = |prefix: &str| file.entries().iter().any(|e| e.key.starts_with(prefix));
    let unet_in = file
        .entries()
        .iter()
        .find(|e| e.key == UNET_IN)
        .ok_or_else(|| {
            model_error(
                file.path(),
                format!("not a Stable Diffusion checkpoint: no `{UNET_IN}`"),
            )
        })?;
    let unet_in_channels = unet_in.shape.get(1).copied().unwrap_or(0);
    let text = |prefix: &str, open_clip: bool| TextPrefix {
        prefix: prefix.to_string(),
        open_clip,
    };
    let (family, text_prefixes) = if has("conditioner.embedders.1.model.") {
        if !has("conditioner.embedders.0.transformer.") {
            return Err(model_error(
                file.path(),
                "an SDXL refiner checkpoint (one OpenCLIP text encoder) is not supported",
            ));
        }
        (
            ModelFamily::Sdxl,
            vec![
                text("conditioner.embedders.0.transformer.", false),
                text("conditioner.embedders.1.model.", true),
            ],
        )
    } else if has("cond_stage_model.model.") {
        (
            ModelFamily::Sd2,
            vec![text("cond_stage_model.model.", true)],
        )
    } else if has("cond_stage_model.transformer.") {
        (
            ModelFamily::Sd1,
            vec![text("cond_stage_model.transformer.", false)],
        )
    } else {
        return Err(model_error(
            file.path(),
            "no text encoder in the checkpoint (expected `cond_stage_model.*` or \
             `conditioner.embedders.*` keys)",
        ));
    };
    Ok(CheckpointLayout {
        family,
        unet_in_channels,
        text_prefixes,
    })
}

const SD15_SCHEDULER: &str = r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085,
 "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
 "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false}"#;
const SD21_SCHEDULER: &str = r#"{"_class_name": "DDIMScheduler", "beta_start": 0.00085,
 "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
 "set_alpha_to_one": false, "steps_offset": 1, "clip_sample": false,
 "prediction_type": "v_prediction"}"#;
const SDXL_SCHEDULER: &str = r#"{"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085,
 "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
 "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear"}"#;

/// The published U-Net, VAE and scheduler configs of a family. SD 2.x is taken as the 768²
/// v-prediction model (2.0 / 2.1), as stable-diffusion.cpp does; pass a config folder for 2.x
/// base.
pub fn default_configs(
    layout: &CheckpointLayout,
) -> (UNet2DConditionConfig, AutoencoderKlConfig, SchedulerConfig) {
    let (mut unet, vae, scheduler) = match layout.family {
        ModelFamily::Sd1 => (
            UNet2DConditionConfig::sd15(),
            AutoencoderKlConfig::sd15(),
            SD15_SCHEDULER,
        ),
        ModelFamily::Sd2 => (
            UNet2DConditionConfig::sd21(),
            AutoencoderKlConfig::sd15(),
            SD21_SCHEDULER,
        ),
        ModelFamily::Sdxl => (
            UNet2DConditionConfig::sdxl(),
            AutoencoderKlConfig::sdxl(),
            SDXL_SCHEDULER,
        ),
    };
    unet.in_channels = layout.unet_in_channels;
    let scheduler = SchedulerConfig::from_json(scheduler).unwrap_or_default();
    (unet, vae, scheduler)
}

/// The text encoder configs of a family, in pipeline order (`sd-conditioner`'s presets).
pub fn text_configs(family: ModelFamily) -> Vec<ClipTextConfig> {
    match family {
        ModelFamily::Sd1 => vec![ClipTextConfig::clip_vit_l()],
        ModelFamily::Sd2 => vec![ClipTextConfig::open_clip_vit_h_penultimate()],
        ModelFamily::Sdxl => vec![
            ClipTextConfig::clip_vit_l(),
            ClipTextConfig::open_clip_vit_bigg(),
        ],
    }
}
