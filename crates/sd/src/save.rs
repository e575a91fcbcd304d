//! Writing a model out as a diffusers folder that diffusers' `from_pretrained` opens unchanged:
//! `model_index.json` and one folder per component, each config as diffusers or transformers
//! writes it, each weights file in their key names and layout.
//!
//! The folder is built beside its destination under a temporary name and renamed into place
//! once complete, so that a failure (a damaged weight, a full disk, Ctrl-C) leaves no
//! half-written model that would load with missing parts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use sd_conditioner::{ClipTokenizer, MAX_LENGTH, Padding};
use sd_core::CoreError;
use sd_core::weights::save_tensors;
use serde_json::{Value, json};

use crate::error::{Result, SdError, model_error, output_error};
use crate::family::ModelFamily;
use crate::model::{Model, TokenizerSource, text_encoder_folder};

/// The weights file of a diffusers component (`unet/`, `vae/`).
const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// The files a CLIP tokenizer folder is read from: copied from a tokenizer folder, and nothing
/// else (a folder may hold anything beside them).
const TOKENIZER_FILES: &[&str] = &[
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// The folder `path` lands in (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Checks that `out` can receive a new model folder: it is absent (in a folder that exists) or
/// an empty folder. Anything else is refused rather than merged into or replaced: a model
/// folder's contents must all come from one model.
pub fn check_model_output(out: &Path) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(|e| CoreError::io(out, e))?;
            if entries.next().is_some() {
                return Err(output_error(
                    out,
                    "exists and is not empty; give a new (or empty) folder to write the model \
                     into",
                ));
            }
            Ok(())
        }
        Ok(_) => Err(output_error(
            out,
            "exists and is not a folder; give a new (or empty) folder to write the model into",
        )),
        // Absent: its folder must exist and be a folder.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(sd_core::files::check_output_path(out)?)
        }
        Err(e) => Err(CoreError::io(out, e).into()),
    }
}

/// transformers' name of a dtype, as `config.json`'s `dtype` holds it.
fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// A JSON file as diffusers and transformers write them: keys sorted, two-space indent, a
/// final newline.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = match value.as_object() {
        Some(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            serde_json::to_string_pretty(&sorted)
        }
        None => serde_json::to_string_pretty(value),
    }
    .map_err(|e| output_error(path, e.to_string()))?;
    write_bytes(path, format!("{text}\n").as_bytes())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(sd_core::files::write_atomic(path, |f| {
        f.write_all(bytes).map_err(|e| e.to_string())
    })?)
}

/// Creates the component folder `name` under `dir`.
fn component_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::create_dir(&path).map_err(|e| CoreError::io(&path, e))?;
    Ok(path)
}

/// Writes a `tokenizer/` folder: a folder's tokenizer files as they are, or the built-in
/// vocabulary with the config and special tokens transformers' `CLIPTokenizer` reads (the
/// pad token is what tells SD 2.x's `!` padding from end-of-text).
fn write_tokenizer(source: &TokenizerSource, dir: &Path) -> Result<()> {
    // The files must make a tokenizer here first: a folder that does not load is not copied.
    source.open()?;
    match source {
        TokenizerSource::Folder(from) => {
            for name in TOKENIZER_FILES {
                let file = from.join(name);
                if std::fs::symlink_metadata(&file).is_ok() {
                    write_bytes(&dir.join(name), &sd_core::files::read_regular(&file)?)?;
                }
            }
        }
        TokenizerSource::Embedded(padding) => {
            for (name, text) in ClipTokenizer::embedded_files() {
                write_bytes(&dir.join(name), text.as_bytes())?;
            }
            let pad = match padding {
                Padding::EndOfText => "<|endoftext|>",
                Padding::Exclamation => "!",
            };
            let special = json!({
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad,
                "unk_token": "<|endoftext|>",
            });
            write_json(&dir.join("special_tokens_map.json"), &special)?;
            let mut config = special;
            config["model_max_length"] = MAX_LENGTH.into();
            config["tokenizer_class"] = "CLIPTokenizer".into();
            config["do_lower_case"] = true.into();
            config["errors"] = "replace".into();
            config["add_prefix_space"] = false.into();
            write_json(&dir.join("tokenizer_config.json"), &config)?;
        }
    }
    Ok(())
}

impl Model {
    /// Writes the model as a diffusers folder at `out`, its weights in `dtype` (`F32`, `F16`
    /// or `BF16`): `model_index.json`, `unet/`, `vae/` (both halves in one file, as diffusers
    /// keeps them), `text_encoder/` (and SDXL's `text_encoder_2/`), their tokenizers and
    /// `scheduler/`. Each component is loaded with the model's own loaders, one at a time, in
    /// f32 (half-precision weights widen exactly, so writing the source's dtype gives back its
    /// bytes), and written before the next is loaded.
    ///
    /// `out` must not exist (its folder must) or be an empty folder. The folder is written
    /// under a temporary name beside it and renamed into place when complete; on any error it
    /// is removed and `out` is left as it was.
    pub fn save<B: Backend>(&self, out: &Path, dtype: DType, device: &B::Device) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(SdError::InvalidOptions(format!(
                "weights are written in f32, f16 or bf16, not {dtype:?}"
            )));
        }
        check_model_output(out)?;
        let Some(name) = out.file_name() else {
            return Err(output_error(out, "names no folder to write the model into"));
        };
        let scheduler_class = self.scheduler_config().class_name.clone().ok_or_else(|| {
            model_error(
                self.path(),
                "the scheduler config has no `_class_name`, which diffusers needs to load it",
            )
        })?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let partial = parent_of(out).join(format!(
            ".{}.{}-{stamp}.partial",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::create_dir(&partial).map_err(|e| CoreError::io(&partial, e))?;
        let result = self
            .write_folder::<B>(&partial, dtype, &scheduler_class, device)
            .and_then(|()| {
                // Checked again: something may have appeared at `out` while writing. An empty
                // folder there gives way (`remove_dir` removes nothing else).
                check_model_output(out)?;
                let was_empty_folder = out.is_dir();
                if was_empty_folder {
                    std::fs::remove_dir(out).map_err(|e| CoreError::io(out, e))?;
                }
                std::fs::rename(&partial, out).map_err(|e| {
                    if was_empty_folder {
                        let _ = std::fs::create_dir(out);
                    }
                    CoreError::io(out, e).into()
                })
            });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        result
    }

    /// Every component into `dir` (the temporary folder).
    fn write_folder<B: Backend>(
        &self,
        dir: &Path,
        dtype: DType,
        scheduler_class: &str,
        device: &B::Device,
    ) -> Result<()> {
        let source = self.clone().with_dtype(DType::F32);

        let unet_dir = component_dir(dir, "unet")?;
        write_json(&unet_dir.join("config.json"), &self.unet_config().to_json())?;
        let unet = source.load_unet::<B>(device)?;
        unet.save_weights(self.unet_config(), unet_dir.join(DIFFUSERS_WEIGHTS), dtype)?;
        drop(unet);

        let vae_dir = component_dir(dir, "vae")?;
        write_json(&vae_dir.join("config.json"), &self.vae_config().to_json())?;
        let encoder = source.load_vae_encoder::<B>(device)?;
        let decoder = source.load_vae_decoder::<B>(device)?;
        let mut tensors = encoder.weight_tensors();
        tensors.extend(decoder.weight_tensors());
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_tensors(
            tensors,
            vae_dir.join(DIFFUSERS_WEIGHTS),
            dtype,
            Some(&metadata),
        )?;
        drop((encoder, decoder));

        let mut text_classes = Vec::new();
        for (i, config) in self.text_configs()?.iter().enumerate() {
            let text_dir = component_dir(dir, text_encoder_folder(i))?;
            let model = source.load_text_encoder::<B>(i, device)?;
            let with_projection = model.text_projection.is_some();
            model.save_weights(text_dir.join("model.safetensors"), dtype)?;
            drop(model);
            let mut json = config.to_json_as(with_projection);
            json["dtype"] = torch_dtype_name(dtype).into();
            write_json(&text_dir.join("config.json"), &json)?;
            text_classes.push(json["architectures"][0].clone());
            let tokenizer = if i == 0 { "tokenizer" } else { "tokenizer_2" };
            write_tokenizer(
                &self.tokenizer_source(i, config),
                &component_dir(dir, tokenizer)?,
            )?;
        }

        let scheduler_dir = component_dir(dir, "scheduler")?;
        write_json(
            &scheduler_dir.join("scheduler_config.json"),
            &self.scheduler_config().to_json(),
        )?;
        write_json(
            &dir.join("model_index.json"),
            &self.model_index(scheduler_class, &text_classes),
        )
    }

    /// Writes the model as one single-file checkpoint in the original (CompVis / Stability)
    /// layout at `out`, its weights in `dtype`: the U-Net under `model.diffusion_model.`, the
    /// VAE under `first_stage_model.`, and the text encoders where the family keeps them
    /// (SD 1.x: `cond_stage_model.transformer.text_model.`; SD 2.x: OpenCLIP's layout under
    /// `cond_stage_model.model.`; SDXL: `conditioner.embedders.0.transformer.text_model.` and
    /// OpenCLIP's under `conditioner.embedders.1.model.`): the layout A1111, ComfyUI and
    /// stable-diffusion.cpp load, and the inverse of [`Model::from_single_file`]. Configs and
    /// tokenizers are not part of the layout (a reader takes the family's published ones or a
    /// config folder, as `--config` gives).
    ///
    /// Every component is loaded at once in f32 (one file holds them all), and the file is
    /// written atomically: beside `out`, then renamed into place.
    pub fn save_single_file<B: Backend>(
        &self,
        out: &Path,
        dtype: DType,
        device: &B::Device,
    ) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(SdError::InvalidOptions(format!(
                "weights are written in f32, f16 or bf16, not {dtype:?}"
            )));
        }
        sd_core::files::check_output_path(out)?;
        let source = self.clone().with_dtype(DType::F32);
        let mut tensors = source
            .load_unet::<B>(device)?
            .single_file_tensors(self.unet_config())?;
        let mut vae = source.load_vae_encoder::<B>(device)?.weight_tensors();
        vae.extend(source.load_vae_decoder::<B>(device)?.weight_tensors());
        let blocks = self.vae_config().block_out_channels.len();
        tensors.extend(sd_core::vae_keys::vae_single_file_tensors(vae, blocks)?);
        for i in 0..self.text_configs()?.len() {
            let weights = source.load_text_encoder::<B>(i, device)?.weight_tensors();
            tensors.extend(match (self.family(), i) {
                (ModelFamily::Sd1, _) => prefixed("cond_stage_model.transformer.", weights),
                (ModelFamily::Sd2, _) => {
                    sd_conditioner::transformers_to_open_clip(weights, "cond_stage_model.model.")?
                }
                (ModelFamily::Sdxl, 0) => prefixed("conditioner.embedders.0.transformer.", weights),
                (ModelFamily::Sdxl, _) => sd_conditioner::transformers_to_open_clip(
                    weights,
                    "conditioner.embedders.1.model.",
                )?,
            });
        }
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        // The snapshots hold their own (reference-counted) handles on the tensors.
        Ok(save_tensors(tensors, out, dtype, Some(&metadata))?)
    }

    /// `model_index.json` as diffusers writes it for the pipeline class that fits: every
    /// component as `[library, class]`, the optional ones this crate does not write
    /// (`safety_checker`, `feature_extractor`, `image_encoder`) as `[null, null]`.
    fn model_index(&self, scheduler_class: &str, text_classes: &[Value]) -> Value {
        let sdxl = self.family() == ModelFamily::Sdxl;
        let pipeline = match (sdxl, self.is_inpainting()) {
            (true, true) => "StableDiffusionXLInpaintPipeline",
            (true, false) => "StableDiffusionXLPipeline",
            (false, true) => "StableDiffusionInpaintPipeline",
            (false, false) => "StableDiffusionPipeline",
        };
        let none = json!([null, null]);
        let mut index = json!({
            "_class_name": pipeline,
            "_diffusers_version": sd_core::DIFFUSERS_VERSION,
            "feature_extractor": none,
            "image_encoder": none,
            "scheduler": ["diffusers", scheduler_class],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        });
        for (i, class) in text_classes.iter().enumerate() {
            let suffix = if i == 0 { "" } else { "_2" };
            index[format!("text_encoder{suffix}")] = json!(["transformers", class]);
            index[format!("tokenizer{suffix}")] = json!(["transformers", "CLIPTokenizer"]);
        }
        if sdxl {
            index["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt().into();
        } else {
            index["safety_checker"] = none;
            index["requires_safety_checker"] = false.into();
        }
        index
    }
}

/// Tensors under `prefix` + their key.
fn prefixed(
    prefix: &str,
    tensors: Vec<(String, sd_core::weights::TensorSnapshot)>,
) -> Vec<(String, sd_core::weights::TensorSnapshot)> {
    tensors
        .into_iter()
        .map(|(k, t)| (format!("{prefix}{k}"), t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_vocabulary_is_written_with_its_padding() {
        for (padding, pad) in [
            (Padding::EndOfText, "<|endoftext|>"),
            (Padding::Exclamation, "!"),
        ] {
            let dir = std::env::temp_dir()
                .join(format!("sd-save-tokenizer-{}-{pad}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            write_tokenizer(&TokenizerSource::Embedded(padding), &dir).unwrap();
            // Read back as the pipeline reads a folder: the same padding and the same ids.
            assert_eq!(sd_conditioner::padding_of(&dir), padding);
            let ours = ClipTokenizer::from_folder(&dir, padding).unwrap();
            let builtin = ClipTokenizer::embedded(padding).unwrap();
            let prompt = "a photo of an astronaut, riding a horse!";
            assert_eq!(
                ours.encode_padded(prompt).unwrap(),
                builtin.encode_padded(prompt).unwrap()
            );
            let config: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(config["pad_token"], pad);
            assert_eq!(config["tokenizer_class"], "CLIPTokenizer");
            assert_eq!(config["model_max_length"], 77);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn json_is_written_as_python_writes_it() {
        let dir = std::env::temp_dir().join(format!("sd-save-json-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        write_json(&path, &json!({"b": [1, 2], "a": null, "_c": 0.5})).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\n  \"_c\": 0.5,\n  \"a\": null,\n  \"b\": [\n    1,\n    2\n  ]\n}\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
