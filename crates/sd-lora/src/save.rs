//! Writing a LoRA in kohya's layout, the one A1111, ComfyUI and stable-diffusion.cpp load, or in
//! diffusers' (`save_lora_weights`'), the one `load_lora_weights` reads.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use burn::tensor::{DType, TensorData};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::error::{LoraError, Result};
use crate::file::{Component, LoraFile, LoraLayer, ModuleName};

/// The kohya key stem of a layer: the component's prefix and the module path with `_` for `.`
/// (text encoders under `text_model.`, as kohya's sd-scripts names them). SD 1.x / 2.x files
/// call their one text encoder `lora_te_`; files with a second (SDXL) use `lora_te1_`/`lora_te2_`.
fn kohya_stem(layer: &LoraLayer, two_text_encoders: bool) -> String {
    let prefix = match (layer.component, two_text_encoders) {
        (Component::Unet, _) => "lora_unet_",
        (Component::TextEncoder, false) => "lora_te_",
        (Component::TextEncoder, true) => "lora_te1_",
        (Component::TextEncoder2, _) => "lora_te2_",
    };
    let module = match &layer.module {
        ModuleName::Underscored(m) => m.clone(),
        ModuleName::Dotted(m) => {
            let m = match layer.component {
                Component::Unet => m.clone(),
                _ if m.starts_with("text_model.") => m.clone(),
                _ => format!("text_model.{m}"),
            };
            m.replace('.', "_")
        }
    };
    format!("{prefix}{module}")
}

fn bytes_of(data: &TensorData, dtype: DType) -> Result<Vec<u8>> {
    let converted = data.clone().convert_dtype(dtype);
    Ok(converted.as_bytes().to_vec())
}

impl LoraFile {
    /// Writes the layers in kohya's layout (`.lora_down.weight`, `.lora_up.weight`, `.alpha`),
    /// the factors in `dtype` (F16 as kohya saves them, F32 or BF16), with kohya's
    /// `ss_network_module`, `ss_network_dim` and `ss_network_alpha` metadata (the first layer's;
    /// kohya's own files have one rank and alpha), atomically.
    pub fn save_kohya(&self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let path = path.as_ref();
        let st_dtype = safetensors_dtype(path, dtype)?;
        let two = self
            .layers
            .iter()
            .any(|l| l.component == Component::TextEncoder2);
        let mut buffers: BTreeMap<String, (Vec<usize>, Vec<u8>, Dtype)> = BTreeMap::new();
        for layer in &self.layers {
            let stem = kohya_stem(layer, two);
            if buffers.contains_key(&format!("{stem}.alpha")) {
                return Err(LoraError::Spec(format!(
                    "{}: two layers would both be written as `{stem}`",
                    path.display()
                )));
            }
            for (suffix, data) in [
                ("lora_down.weight", &layer.down),
                ("lora_up.weight", &layer.up),
            ] {
                let shape: Vec<usize> = data.shape.iter().copied().collect();
                buffers.insert(
                    format!("{stem}.{suffix}"),
                    (shape, bytes_of(data, dtype)?, st_dtype),
                );
            }
            let alpha = layer.alpha.unwrap_or(layer.rank() as f32);
            buffers.insert(
                format!("{stem}.alpha"),
                (Vec::new(), alpha.to_le_bytes().to_vec(), Dtype::F32),
            );
        }
        let mut metadata = std::collections::HashMap::from([(
            "ss_network_module".to_string(),
            "networks.lora".to_string(),
        )]);
        if let Some(first) = self.layers.first() {
            metadata.insert("ss_network_dim".into(), first.rank().to_string());
            let alpha = first.alpha.unwrap_or(first.rank() as f32);
            metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
        }
        write(path, &buffers, metadata)
    }

    /// Writes the layers in diffusers' layout, as `save_lora_weights` does with PEFT's key
    /// names: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.` and
    /// `text_encoder_2.` with the module path as transformers 5 names it, without
    /// `text_model.`), each component's rank, alpha and modules in the header's
    /// `lora_adapter_metadata` (so that an alpha other than the rank survives), atomically.
    pub fn save_diffusers(&self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let path = path.as_ref();
        let st_dtype = safetensors_dtype(path, dtype)?;
        let mut buffers: BTreeMap<String, (Vec<usize>, Vec<u8>, Dtype)> = BTreeMap::new();
        let mut config: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for layer in &self.layers {
            let ModuleName::Dotted(module) = &layer.module else {
                return Err(LoraError::Spec(format!(
                    "{}: `{}` names its module kohya's way, which diffusers' layout cannot \
                     spell; save it with --lora-format kohya",
                    path.display(),
                    layer.key
                )));
            };
            let prefix = match layer.component {
                Component::Unet => "unet",
                Component::TextEncoder => "text_encoder",
                Component::TextEncoder2 => "text_encoder_2",
            };
            let module = module.strip_prefix("text_model.").unwrap_or(module);
            for (suffix, data) in [("lora_A.weight", &layer.down), ("lora_B.weight", &layer.up)] {
                let shape: Vec<usize> = data.shape.iter().copied().collect();
                buffers.insert(
                    format!("{prefix}.{module}.{suffix}"),
                    (shape, bytes_of(data, dtype)?, st_dtype),
                );
            }
            let alpha = layer.alpha.unwrap_or(layer.rank() as f32);
            let first = !config.contains_key(&format!("{prefix}.r"));
            if first {
                config.insert(format!("{prefix}.r"), layer.rank().into());
                config.insert(format!("{prefix}.lora_alpha"), f64::from(alpha).into());
                config.insert(format!("{prefix}.bias"), "none".into());
                config.insert(format!("{prefix}.lora_dropout"), 0.0.into());
                config.insert(format!("{prefix}.use_dora"), false.into());
                config.insert(
                    format!("{prefix}.target_modules"),
                    Vec::<String>::new().into(),
                );
            } else if config[&format!("{prefix}.r")] != layer.rank()
                || config[&format!("{prefix}.lora_alpha")] != f64::from(alpha)
            {
                return Err(LoraError::Spec(format!(
                    "{}: `{}` has another rank or alpha than the first layer of {}; diffusers' \
                     layout holds one per model",
                    path.display(),
                    layer.key,
                    layer.component.name()
                )));
            }
            if let Some(serde_json::Value::Array(list)) =
                config.get_mut(&format!("{prefix}.target_modules"))
            {
                list.push(module.into());
            }
        }
        let adapter = serde_json::to_string_pretty(&config)
            .map_err(|e| LoraError::Spec(format!("{}: {e}", path.display())))?;
        let metadata = std::collections::HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("lora_adapter_metadata".to_string(), adapter),
        ]);
        write(path, &buffers, metadata)
    }
}

fn safetensors_dtype(path: &Path, dtype: DType) -> Result<Dtype> {
    match dtype {
        DType::F32 => Ok(Dtype::F32),
        DType::F16 => Ok(Dtype::F16),
        DType::BF16 => Ok(Dtype::BF16),
        other => Err(LoraError::Spec(format!(
            "{}: LoRA factors are saved in f32, f16 or bf16, not {other:?}",
            path.display()
        ))),
    }
}

/// Serialises the tensors with the header's metadata and writes the file atomically.
fn write(
    path: &Path,
    buffers: &BTreeMap<String, (Vec<usize>, Vec<u8>, Dtype)>,
    metadata: std::collections::HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(k, (shape, bytes, dt))| {
            TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| LoraError::Spec(format!("`{k}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| LoraError::Spec(format!("{}: {e}", path.display())))?;
    let bytes = sorted_header(bytes);
    sd_core::files::write_atomic(path, |out| out.write_all(&bytes).map_err(|e| e.to_string()))?;
    Ok(())
}

/// `bytes` (a serialised safetensors file) with its JSON header's keys in sorted order.
///
/// `safetensors::serialize` takes the metadata as a `HashMap` and writes it in that map's
/// order, which changes from one map to the next: the same LoRA saved twice gave different
/// bytes. Sorting the header's keys changes no character, only their order, so the header
/// keeps its length and every tensor its offset; a header that would not (it cannot happen
/// with serde_json's compact form on both sides) is left as it was.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else {
        return bytes;
    };
    // serde_json's maps are B-trees here (no `preserve_order`): parsing sorts the keys.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else {
        return bytes;
    };
    let Ok(sorted) = serde_json::to_vec(&value) else {
        return bytes;
    };
    let padding = header.iter().rev().take_while(|&&b| b == b' ').count();
    if sorted.len() != n - padding {
        return bytes;
    }
    bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
    bytes
}
