//! The original (CompVis/LDM) single-file layout: `model.diffusion_model.input_blocks.N.M…`
//! keys mapped onto diffusers' names, as diffusers' `convert_ldm_unet_checkpoint` maps them.

/// The prefix of the U-Net's tensors in a single-file checkpoint.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";

/// ResNet sub-layer names: LDM's sequential indices onto diffusers' names.
fn resnet(rest: &str) -> String {
    rest.replace("in_layers.0", "norm1")
        .replace("in_layers.2", "conv1")
        .replace("out_layers.0", "norm2")
        .replace("out_layers.3", "conv2")
        .replace("emb_layers.1", "time_emb_proj")
        .replace("skip_connection", "conv_shortcut")
}

/// The diffusers key of a single-file U-Net key, for a U-Net with `layers_per_block` ResNets per
/// down block; `None` for tensors that are not the U-Net's (the VAE's, the text encoder's).
pub fn ldm_to_diffusers_key(key: &str, layers_per_block: usize) -> Option<String> {
    let key = key.strip_prefix(LDM_UNET_PREFIX)?;
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in fixed {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    let mut parts = key.splitn(4, '.');
    let (group, index, sub, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let index: usize = index.parse().ok()?;
    let per = layers_per_block + 1;
    Some(match (group, sub) {
        ("input_blocks", "0") if index >= 1 => {
            let (b, j) = ((index - 1) / per, (index - 1) % per);
            match rest.strip_prefix("op.") {
                Some(param) => format!("down_blocks.{b}.downsamplers.0.conv.{param}"),
                None => format!("down_blocks.{b}.resnets.{j}.{}", resnet(rest)),
            }
        }
        ("input_blocks", "1") if index >= 1 => {
            let (b, j) = ((index - 1) / per, (index - 1) % per);
            format!("down_blocks.{b}.attentions.{j}.{rest}")
        }
        // `middle_block.N.<layer>…`: the third part is already the layer's name.
        ("middle_block", _) => {
            let inner = format!("{sub}.{rest}");
            match index {
                0 => format!("mid_block.resnets.0.{}", resnet(&inner)),
                1 => format!("mid_block.attentions.0.{inner}"),
                2 => format!("mid_block.resnets.1.{}", resnet(&inner)),
                _ => return None,
            }
        }
        ("output_blocks", "0") => {
            let (b, j) = (index / per, index % per);
            format!("up_blocks.{b}.resnets.{j}.{}", resnet(rest))
        }
        ("output_blocks", "1") if rest.starts_with("conv.") => {
            format!("up_blocks.{}.upsamplers.0.{rest}", index / per)
        }
        ("output_blocks", "1") => {
            let (b, j) = (index / per, index % per);
            format!("up_blocks.{b}.attentions.{j}.{rest}")
        }
        ("output_blocks", "2") => format!("up_blocks.{}.upsamplers.0.{rest}", index / per),
        _ => return None,
    })
}

/// diffusers' ResNet sub-layer names back onto LDM's sequential indices.
fn ldm_resnet(rest: &str) -> String {
    let (layer, param) = rest.split_once('.').unwrap_or((rest, ""));
    let layer = match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    format!("{layer}.{param}")
}

/// The single-file key (`model.diffusion_model.…`) of a diffusers U-Net key: the inverse of
/// [`ldm_to_diffusers_key`], as diffusers' `convert_diffusers_to_original_stable_diffusion.py`
/// writes it. `up_has_attention[b]` says whether up block `b` has transformers (the upsampler
/// then sits third in its `output_blocks` entry rather than second). `None` for a key that is
/// not a U-Net weight of that layout.
pub fn diffusers_to_ldm_key(
    key: &str,
    layers_per_block: usize,
    up_has_attention: &[bool],
) -> Option<String> {
    let fixed = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (from, to) in fixed {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{LDM_UNET_PREFIX}{to}{rest}"));
        }
    }
    let per = layers_per_block + 1;
    let mut parts = key.splitn(4, '.');
    let (group, first, second, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next());
    let ldm = match group {
        "mid_block" => {
            let j: usize = second.parse().ok()?;
            let rest = rest?;
            match (first, j) {
                ("resnets", 0 | 1) => format!("middle_block.{}.{}", 2 * j, ldm_resnet(rest)),
                ("attentions", 0) => format!("middle_block.1.{rest}"),
                _ => return None,
            }
        }
        "down_blocks" | "up_blocks" => {
            let b: usize = first.parse().ok()?;
            let mut tail = rest?.splitn(2, '.');
            let (j, rest) = (tail.next()?.parse::<usize>().ok()?, tail.next()?);
            let down = group == "down_blocks";
            match second {
                "resnets" | "attentions" if j < per => {
                    let index = if down { 1 + b * per + j } else { b * per + j };
                    let (list, sub) = (if down { "input" } else { "output" }, second);
                    if sub == "resnets" {
                        format!("{list}_blocks.{index}.0.{}", ldm_resnet(rest))
                    } else {
                        format!("{list}_blocks.{index}.1.{rest}")
                    }
                }
                "downsamplers" if down && j == 0 => {
                    let param = rest.strip_prefix("conv.")?;
                    format!("input_blocks.{}.0.op.{param}", 1 + b * per + per - 1)
                }
                "upsamplers" if !down && j == 0 => {
                    let slot = if *up_has_attention.get(b)? { 2 } else { 1 };
                    format!("output_blocks.{}.{slot}.{rest}", b * per + per - 1)
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{LDM_UNET_PREFIX}{ldm}"))
}

/// A kohya LoRA module name in the original layout (SDXL LoRAs from kohya's sd-scripts:
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q`, the `lora_unet_` prefix removed) as
/// the same name in diffusers' layout, underscored as kohya writes it
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`). `None` for names outside
/// the original layout.
pub fn kohya_ldm_to_diffusers(name: &str, layers_per_block: usize) -> Option<String> {
    let (group, rest) = [
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embed",
        "out",
    ]
    .iter()
    .find_map(|g| name.strip_prefix(g)?.strip_prefix('_').map(|r| (*g, r)))?;
    let number = |s: &str| -> Option<(String, String)> {
        let (n, tail) = s.split_once('_').unwrap_or((s, ""));
        n.parse::<usize>().ok()?;
        Some((n.to_string(), tail.to_string()))
    };
    // The layer's own name, with the sequential indices of ResNet sub-layers dotted again so
    // that the single-file map renames them.
    let layer = |tail: &str| match tail.rsplit_once('_') {
        Some((seq, n))
            if ["in_layers", "out_layers", "emb_layers"].contains(&seq)
                && n.parse::<usize>().is_ok() =>
        {
            format!("{seq}.{n}")
        }
        _ => tail.to_string(),
    };
    let key = match group {
        "input_blocks" | "output_blocks" => {
            let (index, tail) = number(rest)?;
            let (sub, tail) = number(&tail)?;
            format!("{group}.{index}.{sub}.{}", layer(&tail))
        }
        "middle_block" => {
            let (index, tail) = number(rest)?;
            format!("{group}.{index}.{}", layer(&tail))
        }
        // `time_embed_0`, `out_2`: whole layers.
        _ => {
            let (index, tail) = number(rest)?;
            if !tail.is_empty() {
                return None;
            }
            format!("{group}.{index}")
        }
    };
    let mapped = ldm_to_diffusers_key(&format!("{LDM_UNET_PREFIX}{key}.weight"), layers_per_block)?;
    Some(mapped.strip_suffix(".weight")?.replace('.', "_"))
}

#[cfg(test)]
mod tests {
    use super::ldm_to_diffusers_key as map;

    #[test]
    fn maps_kohya_sdxl_names() {
        let cases = [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_8_1_proj_in",
                "down_blocks_2_attentions_1_proj_in",
            ),
            (
                "middle_block_1_transformer_blocks_3_ff_net_2",
                "mid_block_attentions_0_transformer_blocks_3_ff_net_2",
            ),
            ("middle_block_2_in_layers_2", "mid_block_resnets_1_conv1"),
            (
                "input_blocks_1_0_out_layers_3",
                "down_blocks_0_resnets_0_conv2",
            ),
            (
                "input_blocks_4_0_skip_connection",
                "down_blocks_1_resnets_0_conv_shortcut",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "output_blocks_2_1_transformer_blocks_0_attn2_to_k",
                "up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_k",
            ),
            ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
            (
                "output_blocks_0_0_emb_layers_1",
                "up_blocks_0_resnets_0_time_emb_proj",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
        ];
        for (kohya, diffusers) in cases {
            assert_eq!(
                super::kohya_ldm_to_diffusers(kohya, 2).as_deref(),
                Some(diffusers),
                "{kohya}"
            );
        }
        assert_eq!(
            super::kohya_ldm_to_diffusers("down_blocks_0_attentions_0_proj_in", 2),
            None
        );
    }

    #[test]
    fn writes_the_layout_it_reads() {
        // SD 1.5's down blocks: attention in the first three, none in the last; up blocks the
        // other way round.
        let up = [false, true, true, true];
        let p = |k: &str| format!("model.diffusion_model.{k}");
        let cases = [
            "time_embed.2.bias",
            "label_emb.0.0.weight",
            "input_blocks.0.0.weight",
            "input_blocks.1.0.in_layers.0.weight",
            "input_blocks.2.1.proj_in.weight",
            "input_blocks.3.0.op.bias",
            "input_blocks.4.0.skip_connection.weight",
            "input_blocks.11.0.emb_layers.1.weight",
            "middle_block.0.out_layers.3.weight",
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            "middle_block.2.emb_layers.1.weight",
            "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.bias",
            "output_blocks.5.1.norm.weight",
            "output_blocks.11.0.skip_connection.bias",
            "out.0.weight",
            "out.2.weight",
        ];
        for ldm in cases {
            let diffusers = map(&p(ldm), 2).unwrap();
            assert_eq!(
                super::diffusers_to_ldm_key(&diffusers, 2, &up).as_deref(),
                Some(p(ldm).as_str()),
                "{diffusers}"
            );
        }
        for other in [
            "down_blocks.0.resnets.3.conv1.weight",
            "up_blocks.0.downsamplers.0.conv.weight",
            "mid_block.attentions.1.norm.weight",
            "up_blocks.9.upsamplers.0.conv.weight",
            "text_model.final_layer_norm.weight",
        ] {
            assert_eq!(super::diffusers_to_ldm_key(other, 2, &up), None, "{other}");
        }
    }

    #[test]
    fn maps_the_sd15_layout() {
        let p = |k: &str| format!("model.diffusion_model.{k}");
        let cases = [
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.bias",
                "down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(map(&p(ldm), 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(map("first_stage_model.decoder.conv_in.weight", 2), None);
    }
}
