//! Single-file checkpoints in the original (CompVis / Stability) layout: which family a file
//! is, the published configs for it, and the key maps of the VAE and the OpenCLIP text
//! encoders (the U-Net's is in `sd-unet`).

use burn::tensor::DType;
use sd_conditioner::{ClipTextConfig, HiddenAct};
use sd_core::AutoencoderKlConfig;
use sd_core::weights::SafetensorsFile;
use sd_schedulers::SchedulerConfig;
use sd_unet::UNet2DConditionConfig;

use crate::error::{Result, model_error};
use crate::model::ModelFamily;

const UNET_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// Where a text encoder's weights live in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPrefix {
    pub prefix: String,
    /// OpenCLIP's layout (fused `in_proj` attention) rather than transformers'.
    pub open_clip: bool,
}

/// What the keys of a checkpoint say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointLayout {
    pub family: ModelFamily,
    pub unet_in_channels: usize,
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

/// The text encoder configs of a family, in pipeline order.
pub fn text_configs(family: ModelFamily) -> Vec<ClipTextConfig> {
    let clip_l = ClipTextConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        projection_dim: 768,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        hidden_act: HiddenAct::QuickGelu,
        ..ClipTextConfig::default()
    };
    match family {
        ModelFamily::Sd1 => vec![clip_l],
        // OpenCLIP ViT-H without its last layer: SD 2.x conditions on the penultimate one.
        ModelFamily::Sd2 => vec![ClipTextConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 512,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: HiddenAct::Gelu,
            ..ClipTextConfig::default()
        }],
        ModelFamily::Sdxl => vec![
            clip_l,
            ClipTextConfig {
                hidden_size: 1280,
                intermediate_size: 5120,
                projection_dim: 1280,
                num_hidden_layers: 32,
                num_attention_heads: 20,
                hidden_act: HiddenAct::Gelu,
                ..ClipTextConfig::default()
            },
        ],
    }
}

/// The diffusers key of an original-layout VAE key (`first_stage_model.*`), for a VAE of
/// `blocks` resolution levels (the decoder's `up.k` counts from the bottom).
pub fn ldm_vae_key(key: &str, blocks: usize) -> Option<String> {
    let rest = key.strip_prefix("first_stage_model.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    let resnet = |r: &[&str]| r.join(".").replace("nin_shortcut", "conv_shortcut");
    let mapped = match parts.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => rest.to_string(),
        ["encoder" | "decoder", "conv_in" | "conv_out", ..] => rest.to_string(),
        [half @ ("encoder" | "decoder"), "norm_out", tail @ ..] => {
            format!("{half}.conv_norm_out.{}", tail.join("."))
        }
        ["encoder", "down", i, "block", j, tail @ ..] => {
            format!("encoder.down_blocks.{i}.resnets.{j}.{}", resnet(tail))
        }
        ["encoder", "down", i, "downsample", "conv", tail @ ..] => {
            format!(
                "encoder.down_blocks.{i}.downsamplers.0.conv.{}",
                tail.join(".")
            )
        }
        ["decoder", "up", k, "block", j, tail @ ..] => {
            let i = blocks.checked_sub(1 + k.parse::<usize>().ok()?)?;
            format!("decoder.up_blocks.{i}.resnets.{j}.{}", resnet(tail))
        }
        ["decoder", "up", k, "upsample", "conv", tail @ ..] => {
            let i = blocks.checked_sub(1 + k.parse::<usize>().ok()?)?;
            format!("decoder.up_blocks.{i}.upsamplers.0.conv.{}", tail.join("."))
        }
        [
            half @ ("encoder" | "decoder"),
            "mid",
            block @ ("block_1" | "block_2"),
            tail @ ..,
        ] => {
            let j = if *block == "block_1" { 0 } else { 1 };
            format!("{half}.mid_block.resnets.{j}.{}", resnet(tail))
        }
        [
            half @ ("encoder" | "decoder"),
            "mid",
            "attn_1",
            layer,
            tail @ ..,
        ] => {
            let layer = match *layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("{half}.mid_block.attentions.0.{layer}.{}", tail.join("."))
        }
        _ => return None,
    };
    Some(mapped)
}

/// An OpenCLIP text tower (`{prefix}transformer.resblocks.N.attn.in_proj_weight`, ...) as a
/// transformers `CLIPTextModelWithProjection` state dict, in memory: the fused attention
/// projection is split into q, k and v, and `text_projection` is transposed (or left out when
/// the model has none: SD 2.x conditions on hidden states only). Layers from `layers` on are
/// left out (SD 2.x uses 23 of ViT-H's 24); so is `logit_scale`.
pub fn open_clip_to_transformers(
    file: &SafetensorsFile,
    prefix: &str,
    layers: usize,
    with_projection: bool,
) -> Result<SafetensorsFile> {
    // Tensors keep the file's dtype (the loader casts once, to the compute dtype): raw
    // little-endian bytes, `size` bytes an element.
    let mut out: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = Vec::new();
    let read = |key: &str, dtype: DType| -> Result<(Vec<u8>, safetensors::Dtype)> {
        let stored = match dtype {
            DType::F64 => safetensors::Dtype::F64,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            _ => safetensors::Dtype::F32,
        };
        let dtype = if stored == safetensors::Dtype::F32 {
            DType::F32
        } else {
            dtype
        };
        Ok((file.tensor_data(key, dtype)?.as_bytes().to_vec(), stored))
    };
    for entry in file.entries() {
        let Some(rest) = entry.key.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let shape = entry.shape.clone();
        let layer_key = |i: &str, name: &str| format!("text_model.encoder.layers.{i}.{name}");
        match parts.as_slice() {
            ["token_embedding", "weight"] => {
                let (bytes, dtype) = read(&entry.key, entry.dtype)?;
                out.push((
                    "text_model.embeddings.token_embedding.weight".into(),
                    bytes,
                    shape,
                    dtype,
                ))
            }
            ["positional_embedding"] => {
                let (bytes, dtype) = read(&entry.key, entry.dtype)?;
                out.push((
                    "text_model.embeddings.position_embedding.weight".into(),
                    bytes,
                    shape,
                    dtype,
                ))
            }
            ["ln_final", p] => {
                let (bytes, dtype) = read(&entry.key, entry.dtype)?;
                out.push((
                    format!("text_model.final_layer_norm.{p}"),
                    bytes,
                    shape,
                    dtype,
                ))
            }
            ["text_projection"] if with_projection => {
                // OpenCLIP multiplies `x @ P` with P [width, proj]; a Linear holds Pᵀ.
                let (d, p) = match shape.as_slice() {
                    [d, p] => (*d, *p),
                    _ => return Err(model_error(file.path(), "text_projection is not 2-D")),
                };
                let (values, dtype) = read(&entry.key, entry.dtype)?;
                let size = values.len() / (d * p).max(1);
                let mut t = vec![0u8; values.len()];
                for r in 0..d {
                    for c in 0..p {
                        let (to, from) = ((c * d + r) * size, (r * p + c) * size);
                        t[to..to + size].copy_from_slice(&values[from..from + size]);
                    }
                }
                out.push(("text_projection.weight".into(), t, vec![p, d], dtype));
            }
            ["transformer", "resblocks", i, tail @ ..] => {
                if i.parse::<usize>().map_or(true, |i| i >= layers) {
                    continue;
                }
                let name = match tail {
                    ["ln_1", p] => format!("layer_norm1.{p}"),
                    ["ln_2", p] => format!("layer_norm2.{p}"),
                    ["attn", "out_proj", p] => format!("self_attn.out_proj.{p}"),
                    ["mlp", "c_fc", p] => format!("mlp.fc1.{p}"),
                    ["mlp", "c_proj", p] => format!("mlp.fc2.{p}"),
                    ["attn", fused @ ("in_proj_weight" | "in_proj_bias")] => {
                        let (values, dtype) = read(&entry.key, entry.dtype)?;
                        let third = values.len() / 3;
                        let part = if *fused == "in_proj_weight" {
                            "weight"
                        } else {
                            "bias"
                        };
                        let mut sub_shape = shape.clone();
                        sub_shape[0] /= 3;
                        for (n, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            out.push((
                                layer_key(i, &format!("self_attn.{proj}.{part}")),
                                values[n * third..(n + 1) * third].to_vec(),
                                sub_shape.clone(),
                                dtype,
                            ));
                        }
                        continue;
                    }
                    _ => continue,
                };
                let (bytes, dtype) = read(&entry.key, entry.dtype)?;
                out.push((layer_key(i, &name), bytes, shape, dtype));
            }
            _ => {}
        }
    }
    let views = out
        .iter()
        .map(|(k, b, s, dtype)| {
            safetensors::tensor::TensorView::new(*dtype, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| {
                    model_error(
                        file.path(),
                        format!(
                            "converting OpenCLIP's `{prefix}` tensors to `{k}` (shape {s:?}): {e}"
                        ),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let serialized =
        safetensors::serialize(views, None).map_err(|e| model_error(file.path(), e.to_string()))?;
    Ok(SafetensorsFile::from_bytes(
        format!("{} ({prefix}*)", file.path().display()),
        serialized,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_keys_map_to_diffusers() {
        let cases = [
            (
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "first_stage_model.decoder.up.3.block.2.conv1.bias",
                "decoder.up_blocks.0.resnets.2.conv1.bias",
            ),
            (
                "first_stage_model.decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "first_stage_model.encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "first_stage_model.decoder.mid.block_2.norm1.weight",
                "decoder.mid_block.resnets.1.norm1.weight",
            ),
            (
                "first_stage_model.decoder.norm_out.bias",
                "decoder.conv_norm_out.bias",
            ),
            (
                "first_stage_model.post_quant_conv.weight",
                "post_quant_conv.weight",
            ),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(ldm_vae_key(ldm, 4).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(ldm_vae_key("model.diffusion_model.x", 4), None);
        assert_eq!(
            ldm_vae_key("first_stage_model.decoder.up.9.block.0.x", 4),
            None
        );
    }
}
