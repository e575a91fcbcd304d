//! OpenCLIP's text towers (SD 2.x's ViT-H, SDXL's ViT-bigG) as single-file checkpoints store
//! them, converted to the transformers layout our CLIP model is built with.

use burn::tensor::DType;
use sd_core::CoreError;
use sd_core::weights::SafetensorsFile;

use sd_core::Result;

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
                    _ => {
                        return Err(CoreError::Safetensors {
                            path: file.path().to_path_buf(),
                            reason: "text_projection is not 2-D".into(),
                        });
                    }
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
                .map_err(|e| CoreError::Safetensors {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "converting OpenCLIP's `{prefix}` tensors to `{k}` (shape {s:?}): {e}"
                    ),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let serialized = safetensors::serialize(views, None).map_err(|e| CoreError::Safetensors {
        path: file.path().to_path_buf(),
        reason: e.to_string(),
    })?;
    SafetensorsFile::from_bytes(format!("{} ({prefix}*)", file.path().display()), serialized)
}
