//! CLIP's vision tower (Radford et al. 2021; Dosovitskiy et al. 2021 for the patch embedding),
//! as transformers' `CLIPVisionModelWithProjection`: image embeddings for CLIP score and image
//! conditioning. Its encoder layers are the text tower's, without the causal mask.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, Initializer, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use sd_core::config_checks::{
    self as checks, MAX_CHANNELS, MAX_FACTOR, MAX_LAYERS, MAX_POSITIONS, MAX_SAMPLE_SIZE, MAX_WIDTH,
};
use sd_core::layers::{conv2d_forward, linear_forward};
use sd_core::weights::{LoadOptions, SafetensorsFile, load_safetensors};
use sd_core::{CoreError, Result};
use serde::Deserialize;

use crate::clip::{
    ClipEncoder, ClipEncoderLayer, HiddenAct, LayerShape, normal_embedding, normal_linear,
};

/// transformers' `CLIPVisionConfig`. Every value is checked by
/// [`ClipVisionConfig::validate`] before anything is built; no field is required, as a
/// `CLIPModel` config may list only the values that differ from these defaults. The bounds are
/// `sd_core::vae_config::checks`' constants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    /// The width of the hidden states: 1 to `MAX_CHANNELS`, a multiple of the heads.
    pub hidden_size: usize,
    /// The MLP's inner width: 1 to `MAX_WIDTH`.
    pub intermediate_size: usize,
    /// `visual_projection`'s output width: 1 to `MAX_CHANNELS`.
    pub projection_dim: usize,
    /// Encoder layers: 1 to `MAX_LAYERS`.
    pub num_hidden_layers: usize,
    /// Attention heads: at least 1, dividing `hidden_size`.
    pub num_attention_heads: usize,
    /// Image channels: 1 to `MAX_CHANNELS`.
    pub num_channels: usize,
    /// The input side in pixels: 1 to `MAX_SAMPLE_SIZE`, a multiple of `patch_size`, with at
    /// most `MAX_POSITIONS` positions (patches plus the class token).
    pub image_size: usize,
    /// The patch side in pixels: 1 to `image_size`.
    pub patch_size: usize,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon: above 0 and below 1.
    pub layer_norm_eps: f64,
    /// Attention dropout (training only): 0 to 1.
    pub attention_dropout: f64,
    /// Dropout (training only, in older configs): 0 to 1.
    pub dropout: f64,
    /// The standard deviation of the initial weights (training only): 0 to 1.
    pub initializer_range: f64,
    /// A factor on the initial weights (training only): 0 to `MAX_FACTOR`.
    pub initializer_factor: f64,
}

impl Default for ClipVisionConfig {
    /// CLIP ViT-B/32's.
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
        }
    }
}

impl ClipVisionConfig {
    /// CLIP ViT-L/14 (the tower beside SD 1.x's text encoder).
    pub fn vit_l_14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Self::default()
        }
    }

    /// Reads a `config.json` of a `CLIPVisionModelWithProjection` (flat) or of a `CLIPModel`
    /// (its `vision_config`), and validates it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = sd_core::files::read_regular_to_string(path)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CoreError::config(path, format!("not JSON: {e}")))?;
        let section = json.get("vision_config").cloned().unwrap_or(json);
        let config: Self = checks::from_value(section, &[])
            .map_err(|e| CoreError::config(path, format!("invalid CLIPVisionConfig: {e}")))?;
        config.validate().map_err(|r| CoreError::config(path, r))?;
        Ok(config)
    }

    /// The `config.json` transformers' `CLIPVisionModelWithProjection.save_pretrained` writes
    /// for this config (`architectures`, `model_type: "clip_vision_model"`, every field under
    /// its transformers name), so that `from_pretrained` opens an `image_encoder/` folder
    /// unchanged. `dropout`, gone from transformers' config, is written only when set; the
    /// weights' `dtype` is the writer's to add.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "projection_dim": self.projection_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "initializer_factor": self.initializer_factor,
        });
        if self.dropout != 0.0
            && let Some(map) = json.as_object_mut()
        {
            map.insert("dropout".into(), self.dropout.into());
        }
        json
    }

    /// Checks every field against its meaning and bounds (see the field docs); returns the
    /// first problem found, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        checks::size("hidden_size", self.hidden_size, MAX_CHANNELS)?;
        checks::size("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        checks::size("projection_dim", self.projection_dim, MAX_CHANNELS)?;
        checks::size("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        checks::size(
            "num_attention_heads",
            self.num_attention_heads,
            MAX_CHANNELS,
        )?;
        checks::size("num_channels", self.num_channels, MAX_CHANNELS)?;
        checks::size("image_size", self.image_size, MAX_SAMPLE_SIZE)?;
        checks::size("patch_size", self.patch_size, self.image_size)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "field `num_attention_heads`: hidden_size {} does not split into {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.patches() + 1 > MAX_POSITIONS {
            return Err(format!(
                "field `patch_size` is {}: {} patches of a {}-pixel image are more than {} \
                 positions",
                self.patch_size,
                self.patches(),
                self.image_size,
                MAX_POSITIONS
            ));
        }
        checks::open_unit("layer_norm_eps", self.layer_norm_eps)?;
        checks::probability("attention_dropout", self.attention_dropout)?;
        checks::probability("dropout", self.dropout)?;
        checks::probability("initializer_range", self.initializer_range)?;
        checks::number(
            "initializer_factor",
            self.initializer_factor,
            (0.0, false),
            (MAX_FACTOR, false),
        )?;
        Ok(())
    }

    fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// Patch, class and position embeddings.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    pub patch_embedding: Conv2d<B>,
    pub class_embedding: Param<Tensor<B, 1>>,
    pub position_embedding: Embedding<B>,
}

/// The transformer of the vision tower.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipVisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

/// What the vision tower returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput<B: Backend> {
    /// `[batch, 1 + patches, hidden]`: the last layer's output (no final norm, as transformers).
    pub last_hidden_state: Tensor<B, 3>,
    /// The embeddings after `pre_layrnorm`, then every layer's output.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// `visual_projection(post_layernorm(class token))`: `[batch, projection_dim]`.
    pub image_embeds: Tensor<B, 2>,
}

/// transformers' `CLIPVisionModelWithProjection`.
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: Backend> {
    /// The embeddings, encoder layers and LayerNorms (transformers' `vision_model`).
    pub vision_model: ClipVisionTransformer<B>,
    /// The projection of the pooled class token into the shared embedding space
    /// (`visual_projection`).
    pub visual_projection: Linear<B>,
    image_size: usize,
    channels: usize,
}

impl<B: Backend> ClipVisionModel<B> {
    /// A vision tower with random weights, drawn as transformers initialises
    /// `CLIPVisionModel` (embeddings from `initializer_range`, the class token and projection
    /// from the width, the layers as the text tower's).
    pub fn new(config: &ClipVisionConfig, device: &B::Device) -> Result<Self> {
        config
            .validate()
            .map_err(|r| CoreError::config("<ClipVisionConfig>", r))?;
        let d = config.hidden_size;
        let shape = LayerShape {
            hidden: d,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            act: config.hidden_act,
            eps: config.layer_norm_eps,
            layers: config.num_hidden_layers,
            factor: config.initializer_factor,
        };
        // transformers' `CLIPVisionEmbeddings` and projection spreads.
        let range = config.initializer_range * config.initializer_factor;
        let width = (d as f64).powf(-0.5) * config.initializer_factor;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let p = config.patch_size;
        Ok(Self {
            vision_model: ClipVisionTransformer {
                embeddings: ClipVisionEmbeddings {
                    patch_embedding: Conv2dConfig::new([config.num_channels, d], [p, p])
                        .with_stride([p, p])
                        .with_bias(false)
                        .with_initializer(Initializer::Normal {
                            mean: 0.0,
                            std: range,
                        })
                        .init(device),
                    class_embedding: Param::from_tensor(Tensor::random(
                        [d],
                        burn::tensor::Distribution::Normal(0.0, width),
                        device,
                    )),
                    position_embedding: normal_embedding(config.patches() + 1, d, range, device),
                },
                pre_layrnorm: norm(),
                encoder: ClipEncoder {
                    layers: (0..config.num_hidden_layers)
                        .map(|_| ClipEncoderLayer::new(shape, false, device))
                        .collect(),
                },
                post_layernorm: norm(),
            },
            visual_projection: normal_linear(d, config.projection_dim, width, false, device),
            image_size: config.image_size,
            channels: config.num_channels,
        })
    }

    /// Loads an `image_encoder/` folder (`config.json`, `model.safetensors`).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ClipVisionConfig::from_file(dir.join("config.json"))?;
        let file = SafetensorsFile::open(dir.join("model.safetensors"))?;
        Self::new(&config, device)?.load_weights(&file, LoadOptions::default())
    }

    /// Saves the weights as transformers' `model.safetensors` (its key names, which are the
    /// module's paths, and layout), in `dtype`, written atomically: with the `config.json` of
    /// [`ClipVisionConfig::to_json`], an `image_encoder/` folder transformers' `from_pretrained`
    /// opens.
    pub fn save_weights(&self, path: impl AsRef<Path>, dtype: burn::tensor::DType) -> Result<()> {
        let metadata = std::collections::BTreeMap::from([("format".into(), "pt".into())]);
        sd_core::weights::save_safetensors(
            self,
            path,
            &|k| Some(k.to_string()),
            dtype,
            Some(&metadata),
        )
    }

    /// Fills the weights from a transformers state dict (a `CLIPModel`'s text keys are
    /// ignored).
    pub fn load_weights(self, file: &SafetensorsFile, options: LoadOptions) -> Result<Self> {
        let map = |key: &str| {
            (key.starts_with("vision_model.") || key.starts_with("visual_projection."))
                .then(|| key.to_string())
        };
        load_safetensors(self, file, &map, options)
    }

    /// Encodes images `[batch, channels, image_size, image_size]` (already resized and
    /// normalised with CLIP's mean and std).
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Result<ClipVisionOutput<B>> {
        let [b, c, h, w] = pixels.dims();
        if c != self.channels || h != self.image_size || w != self.image_size {
            return Err(CoreError::InvalidInput(format!(
                "the vision tower takes [batch, {}, {s}, {s}] pixels, got [{b}, {c}, {h}, {w}]",
                self.channels,
                s = self.image_size
            )));
        }
        let emb = &self.vision_model.embeddings;
        let patches = conv2d_forward(&emb.patch_embedding, pixels);
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let class = emb
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .repeat_dim(0, b);
        let x = Tensor::cat(vec![class, patches], 1);
        let n = x.dims()[1];
        let device = x.device();
        let positions = Tensor::<B, 1, Int>::arange(0..n as i64, &device)
            .unsqueeze::<2>()
            .repeat_dim(0, b);
        let x = x + emb.position_embedding.forward(positions);
        let mut x = sd_core::layers::layer_norm(&self.vision_model.pre_layrnorm, x);
        let mut hidden_states = vec![x.clone()];
        for layer in &self.vision_model.encoder.layers {
            x = layer.forward(x);
            hidden_states.push(x.clone());
        }
        let class_token = x.clone().narrow(1, 0, 1).reshape([b, d]);
        let pooled = sd_core::layers::layer_norm(&self.vision_model.post_layernorm, class_token);
        Ok(ClipVisionOutput {
            last_hidden_state: x,
            hidden_states,
            image_embeds: linear_forward(&self.visual_projection, pooled),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Load → save → load gives the same weights under the same keys (every fixture tower,
    /// f32 files so the round trip is exact), and the same embeddings.
    #[test]
    fn vision_towers_save_what_they_load() {
        type B = sd_core::backend::Flex;
        let device = Default::default();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip_vision");
        let mut checked = 0;
        for entry in std::fs::read_dir(root).unwrap() {
            let dir = entry.unwrap().path().join("image_encoder");
            if !dir.is_dir() {
                continue;
            }
            let tower = ClipVisionModel::<B>::from_pretrained(&dir, &device).unwrap();
            let out = std::env::temp_dir().join(format!(
                "sd-vision-{}-{checked}.safetensors",
                std::process::id()
            ));
            tower.save_weights(&out, burn::tensor::DType::F32).unwrap();
            let keys = |path: &Path| -> Vec<String> {
                let mut k: Vec<String> = SafetensorsFile::open(path)
                    .unwrap()
                    .entries()
                    .iter()
                    .map(|e| e.key.clone())
                    .filter(|k| !k.ends_with("position_ids"))
                    .collect();
                k.sort();
                k
            };
            assert_eq!(keys(&out), keys(&dir.join("model.safetensors")));
            let config = ClipVisionConfig::from_file(dir.join("config.json")).unwrap();
            let again = ClipVisionModel::<B>::new(&config, &device)
                .unwrap()
                .load_weights(
                    &SafetensorsFile::open(&out).unwrap(),
                    LoadOptions::default(),
                )
                .unwrap();
            let side = config.image_size;
            let pixels = Tensor::<B, 4>::random(
                [1, config.num_channels, side, side],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            let (a, b) = (
                tower.forward(pixels.clone()).unwrap().image_embeds,
                again.forward(pixels).unwrap().image_embeds,
            );
            assert_eq!(a.into_data(), b.into_data(), "{}", dir.display());
            let _ = std::fs::remove_file(&out);
            checked += 1;
        }
        assert!(checked >= 2);
    }

    #[test]
    fn vision_configs_write_back_as_transformers_wrote_them() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip_vision");
        let mut checked = 0;
        for entry in std::fs::read_dir(root).unwrap() {
            let path = entry.unwrap().path().join("image_encoder/config.json");
            if !path.is_file() {
                continue;
            }
            let theirs: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let config = ClipVisionConfig::from_file(&path).unwrap();
            let ours = config.to_json();
            let (ours, theirs) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
            for (key, value) in theirs {
                if key == "dtype" || key == "transformers_version" {
                    continue;
                }
                assert_eq!(ours.get(key), Some(value), "{}: `{key}`", path.display());
            }
            assert!(ours.keys().all(|k| theirs.contains_key(k)), "{ours:?}");
            let back: ClipVisionConfig =
                checks::from_value(serde_json::Value::Object(ours.clone()), &[]).unwrap();
            assert_eq!(back, config);
            checked += 1;
        }
        assert!(checked >= 2);
    }
}
