//! Writing a LoRA in kohya's layout, the one A1111, ComfyUI and stable-diffusion.cpp load.

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
        let st_dtype = match dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            other => {
                return Err(LoraError::Spec(format!(
                    "{}: LoRA factors are saved in f32, f16 or bf16, not {other:?}",
                    path.display()
                )));
            }
        };
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
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(k, (shape, bytes, dt))| {
                TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| LoraError::Spec(format!("`{k}`: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut metadata = std::collections::HashMap::from([(
            "ss_network_module".to_string(),
            "networks.lora".to_string(),
        )]);
        if let Some(first) = self.layers.first() {
            metadata.insert("ss_network_dim".into(), first.rank().to_string());
            let alpha = first.alpha.unwrap_or(first.rank() as f32);
            metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
        }
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| LoraError::Spec(format!("{}: {e}", path.display())))?;
        sd_core::files::write_atomic(path, |out| out.write_all(&bytes).map_err(|e| e.to_string()))?;
        Ok(())
    }
}
