//! The VAE's keys in the original single-file layout (`first_stage_model.*`, CompVis /
//! Stability checkpoints) mapped to diffusers' names, which the VAE halves are built with: the
//! half of the weight contract that both `sd-encoder` and `sd-decoder` read through, and its
//! inverse for writing single files.

use crate::weights::{TensorSnapshot, reshaped};
use crate::{CoreError, Result};

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

/// The original-layout key (`first_stage_model.…`) of a diffusers VAE key: the inverse of
/// [`ldm_vae_key`], for a VAE of `blocks` resolution levels. `None` for a key that is not a
/// VAE weight of that layout.
pub fn diffusers_to_ldm_vae_key(key: &str, blocks: usize) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    let resnet = |r: &[&str]| r.join(".").replace("conv_shortcut", "nin_shortcut");
    let level = |i: &str| -> Option<usize> { blocks.checked_sub(1 + i.parse::<usize>().ok()?) };
    let mapped = match parts.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => key.to_string(),
        ["encoder" | "decoder", "conv_in" | "conv_out", ..] => key.to_string(),
        [half @ ("encoder" | "decoder"), "conv_norm_out", tail @ ..] => {
            format!("{half}.norm_out.{}", tail.join("."))
        }
        ["encoder", "down_blocks", i, "resnets", j, tail @ ..] => {
            format!("encoder.down.{i}.block.{j}.{}", resnet(tail))
        }
        [
            "encoder",
            "down_blocks",
            i,
            "downsamplers",
            "0",
            "conv",
            tail @ ..,
        ] => {
            format!("encoder.down.{i}.downsample.conv.{}", tail.join("."))
        }
        ["decoder", "up_blocks", i, "resnets", j, tail @ ..] => {
            format!("decoder.up.{}.block.{j}.{}", level(i)?, resnet(tail))
        }
        [
            "decoder",
            "up_blocks",
            i,
            "upsamplers",
            "0",
            "conv",
            tail @ ..,
        ] => {
            format!("decoder.up.{}.upsample.conv.{}", level(i)?, tail.join("."))
        }
        [
            half @ ("encoder" | "decoder"),
            "mid_block",
            "resnets",
            j @ ("0" | "1"),
            tail @ ..,
        ] => {
            let block = if *j == "0" { "block_1" } else { "block_2" };
            format!("{half}.mid.{block}.{}", resnet(tail))
        }
        [
            half @ ("encoder" | "decoder"),
            "mid_block",
            "attentions",
            "0",
            tail @ ..,
        ] => {
            let (layer, tail) = match tail {
                ["group_norm", t @ ..] => ("norm", t),
                ["to_q", t @ ..] => ("q", t),
                ["to_k", t @ ..] => ("k", t),
                ["to_v", t @ ..] => ("v", t),
                ["to_out", "0", t @ ..] => ("proj_out", t),
                _ => return None,
            };
            format!("{half}.mid.attn_1.{layer}.{}", tail.join("."))
        }
        _ => return None,
    };
    Some(format!("first_stage_model.{mapped}"))
}

/// Both VAE halves' weights (diffusers' keys, as `VaeEncoder::weight_tensors` and
/// `VaeDecoder::weight_tensors` give them) under the original layout's keys, for a VAE of
/// `blocks` levels: the inverse of the halves' `load_single_file`. The mid-block attention's
/// projections become the 1×1 convolutions (`[c, c, 1, 1]`) the original layout holds.
pub fn vae_single_file_tensors(
    tensors: Vec<(String, TensorSnapshot)>,
    blocks: usize,
) -> Result<Vec<(String, TensorSnapshot)>> {
    tensors
        .into_iter()
        .map(|(key, t)| {
            let ldm = diffusers_to_ldm_vae_key(&key, blocks).ok_or_else(|| CoreError::Config {
                path: "vae/config.json".into(),
                reason: format!("the VAE weight `{key}` has no place in the single-file layout"),
            })?;
            let projection = [".q.weight", ".k.weight", ".v.weight", ".proj_out.weight"]
                .iter()
                .any(|s| ldm.contains(".attn_1") && ldm.ends_with(s));
            Ok(match t.shape.as_slice() {
                [o, i] if projection => {
                    let shape = vec![*o, *i, 1, 1];
                    (ldm, reshaped(t, shape))
                }
                _ => (ldm, t),
            })
        })
        .collect()
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
            assert_eq!(
                diffusers_to_ldm_vae_key(diffusers, 4).as_deref(),
                Some(ldm),
                "{diffusers}"
            );
        }
        for other in [
            "decoder.up_blocks.4.resnets.0.conv1.weight",
            "encoder.mid_block.attentions.0.to_out.1.weight",
            "unet.conv_in.weight",
        ] {
            assert_eq!(diffusers_to_ldm_vae_key(other, 4), None, "{other}");
        }
        assert_eq!(ldm_vae_key("model.diffusion_model.x", 4), None);
        assert_eq!(
            ldm_vae_key("first_stage_model.decoder.up.9.block.0.x", 4),
            None
        );
    }
}
