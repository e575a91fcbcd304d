//! OpenCLIP's text towers (SD 2.x's ViT-H, SDXL's ViT-bigG) as single-file checkpoints store
//! them, converted to the transformers layout our CLIP model is built with, and back.

use std::rc::Rc;

use burn::module::ParamId;
use burn::tensor::{DType, TensorData};
use sd_core::CoreError;
use sd_core::weights::{SafetensorsFile, TensorSnapshot};

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
                let t = transpose_bytes(&values, d, p);
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

/// A row-major `[rows, cols]` matrix's bytes as its `[cols, rows]` transpose, whatever the
/// element size.
fn transpose_bytes(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let size = bytes.len() / (rows * cols).max(1);
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (to, from) = ((c * rows + r) * size, (r * cols + c) * size);
            out[to..to + size].copy_from_slice(&bytes[from..from + size]);
        }
    }
    out
}

/// Concatenates same-dtype tensors along their first dimension (row-major data, so their bytes
/// one after another): how OpenCLIP's fused `in_proj` holds q, k and v.
fn stacked(parts: Vec<TensorSnapshot>) -> Result<TensorSnapshot> {
    let first = parts.first().ok_or_else(|| CoreError::Config {
        path: "text_encoder".into(),
        reason: "nothing to stack".into(),
    })?;
    let (dtype, rest) = (first.dtype, first.shape.as_slice()[1..].to_vec());
    if parts
        .iter()
        .any(|p| p.dtype != dtype || p.shape.as_slice()[1..] != rest[..])
    {
        return Err(CoreError::Config {
            path: "text_encoder".into(),
            reason: "q, k and v projections of different shapes or dtypes".into(),
        });
    }
    let rows: usize = parts.iter().map(|p| p.shape.as_slice()[0]).sum();
    let shape: Vec<usize> = std::iter::once(rows).chain(rest).collect();
    let fns: Vec<_> = parts.iter().map(TensorSnapshot::clone_data_fn).collect();
    let target = shape.clone();
    Ok(TensorSnapshot::from_closure(
        Rc::new(move || {
            let mut bytes = Vec::new();
            for f in &fns {
                bytes.extend_from_slice(f()?.as_bytes());
            }
            Ok(TensorData::from_bytes_vec(bytes, target.clone(), dtype))
        }),
        dtype,
        shape.into(),
        Vec::new(),
        Vec::new(),
        ParamId::new(),
    ))
}

/// A 2-D tensor transposed (OpenCLIP's `text_projection` is the transpose of a Linear's
/// weight).
fn transposed(t: TensorSnapshot) -> Result<TensorSnapshot> {
    let [rows, cols] = t.shape.as_slice() else {
        return Err(CoreError::Config {
            path: "text_encoder".into(),
            reason: format!(
                "text_projection has shape {:?}, not 2-D",
                t.shape.as_slice()
            ),
        });
    };
    let (rows, cols, dtype) = (*rows, *cols, t.dtype);
    let data = t.clone_data_fn();
    Ok(TensorSnapshot::from_closure(
        Rc::new(move || {
            let out = transpose_bytes(data()?.as_bytes(), rows, cols);
            Ok(TensorData::from_bytes_vec(out, vec![cols, rows], dtype))
        }),
        dtype,
        vec![cols, rows].into(),
        Vec::new(),
        Vec::new(),
        ParamId::new(),
    ))
}

/// A text encoder's weights in transformers' names (`ClipTextModel::weight_tensors`) as an
/// OpenCLIP text tower under `prefix` (`cond_stage_model.model.` for SD 2.x,
/// `conditioner.embedders.1.model.` for SDXL): the inverse of [`open_clip_to_transformers`].
/// q, k and v are fused into `attn.in_proj_*`, `text_projection` is transposed; OpenCLIP's
/// unused `logit_scale` is not written.
pub fn transformers_to_open_clip(
    tensors: Vec<(String, TensorSnapshot)>,
    prefix: &str,
) -> Result<Vec<(String, TensorSnapshot)>> {
    let mut out = Vec::new();
    // (layer, weight or bias) → q, k, v, in that order once all three are seen.
    let mut fused: std::collections::BTreeMap<(usize, String), [Option<TensorSnapshot>; 3]> =
        Default::default();
    for (key, t) in tensors {
        let unknown = || CoreError::Config {
            path: "text_encoder".into(),
            reason: format!("the text encoder weight `{key}` has no place in OpenCLIP's layout"),
        };
        let rest = key.strip_prefix("text_model.");
        let parts: Vec<&str> = rest.unwrap_or(key.as_str()).split('.').collect();
        let name = match (rest.is_some(), parts.as_slice()) {
            (false, ["text_projection", "weight"]) => {
                out.push((format!("{prefix}text_projection"), transposed(t)?));
                continue;
            }
            (true, ["embeddings", "token_embedding", "weight"]) => "token_embedding.weight".into(),
            (true, ["embeddings", "position_embedding", "weight"]) => "positional_embedding".into(),
            (true, ["final_layer_norm", p]) => format!("ln_final.{p}"),
            (true, ["encoder", "layers", i, tail @ ..]) => {
                let i: usize = i.parse().map_err(|_| unknown())?;
                let block = format!("transformer.resblocks.{i}.");
                match tail {
                    ["layer_norm1", p] => format!("{block}ln_1.{p}"),
                    ["layer_norm2", p] => format!("{block}ln_2.{p}"),
                    ["self_attn", "out_proj", p] => format!("{block}attn.out_proj.{p}"),
                    ["mlp", "fc1", p] => format!("{block}mlp.c_fc.{p}"),
                    ["mlp", "fc2", p] => format!("{block}mlp.c_proj.{p}"),
                    ["self_attn", proj @ ("q_proj" | "k_proj" | "v_proj"), p] => {
                        let slot = ["q_proj", "k_proj", "v_proj"]
                            .iter()
                            .position(|x| x == proj)
                            .unwrap_or(0);
                        fused.entry((i, p.to_string())).or_default()[slot] = Some(t);
                        continue;
                    }
                    _ => return Err(unknown()),
                }
            }
            _ => return Err(unknown()),
        };
        out.push((format!("{prefix}{name}"), t));
    }
    for ((i, p), [q, k, v]) in fused {
        let (Some(q), Some(k), Some(v)) = (q, k, v) else {
            return Err(CoreError::Config {
                path: "text_encoder".into(),
                reason: format!("layer {i} lacks one of its q, k and v projections ({p})"),
            });
        };
        out.push((
            format!("{prefix}transformer.resblocks.{i}.attn.in_proj_{p}"),
            stacked(vec![q, k, v])?,
        ));
    }
    Ok(out)
}
