use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use sd_core::config_checks::{
    self as checks, MAX_CHANNELS, MAX_FACTOR, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH,
};
use sd_core::layers::{layer_norm, linear_forward, multi_head_attention, quick_gelu};
use sd_core::weights::{LoadOptions, SafetensorsFile, load_safetensors};
use sd_core::{CoreError, Result};
use serde::{Deserialize, Serialize};

/// The MLP activation of a CLIP text tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x · σ(1.702 x)`: OpenAI's CLIP (SD 1.x, SDXL's first encoder).
    QuickGelu,
    /// The exact GELU: OpenCLIP (SD 2.x, SDXL's second encoder).
    Gelu,
}

/// transformers' `CLIPTextConfig` (`text_encoder/config.json`).
///
/// A file must name the fields that set the shape ([`ClipTextConfig::REQUIRED`]); every value
/// is checked by [`ClipTextConfig::validate`] before anything is built. The bounds are
/// `sd_core::vae_config::checks`' constants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Token embeddings: 1 to `MAX_VOCAB`.
    pub vocab_size: usize,
    /// The width of the hidden states: 1 to `MAX_CHANNELS`, a multiple of the heads.
    pub hidden_size: usize,
    /// The MLP's inner width: 1 to `MAX_WIDTH`.
    pub intermediate_size: usize,
    /// `text_projection`'s output width: 1 to `MAX_CHANNELS`.
    pub projection_dim: usize,
    /// Encoder layers: 1 to `MAX_LAYERS`.
    pub num_hidden_layers: usize,
    /// Attention heads: at least 1, dividing `hidden_size`.
    pub num_attention_heads: usize,
    /// Position embeddings: 1 to `MAX_POSITIONS`.
    pub max_position_embeddings: usize,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon: above 0 and below 1.
    pub layer_norm_eps: f64,
    /// 2 in configs from before transformers' fix: the pooled position is then the largest id.
    /// Below `vocab_size`.
    pub eos_token_id: u32,
    /// The start-of-text id (unused here): below `vocab_size` when given.
    pub bos_token_id: Option<u32>,
    /// The padding id (unused here: the tokenizer pads): below `vocab_size` when given.
    pub pad_token_id: Option<u32>,
    /// Attention dropout (training only): 0 to 1.
    pub attention_dropout: f64,
    /// Dropout (training only, in older configs): 0 to 1.
    pub dropout: f64,
    /// The standard deviation of the initial weights (training only): 0 to 1.
    pub initializer_range: f64,
    /// A factor on the initial weights (training only): 0 to `MAX_FACTOR`.
    pub initializer_factor: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            bos_token_id: None,
            pad_token_id: None,
            attention_dropout: 0.0,
            dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
        }
    }
}

impl ClipTextConfig {
    /// The fields a `config.json` must name: those that set the encoder's shape (transformers
    /// writes them all). The others default as in transformers.
    pub const REQUIRED: &'static [&'static [&'static str]] = &[
        &["vocab_size"],
        &["hidden_size"],
        &["intermediate_size"],
        &["num_hidden_layers"],
        &["num_attention_heads"],
        &["max_position_embeddings"],
    ];

    /// Reads and checks a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        checks::read_config(
            path.as_ref(),
            Self::REQUIRED,
            "CLIPTextConfig",
            Self::validate,
        )
    }

    /// The `config.json` transformers' `CLIPTextModel.save_pretrained` writes for this config
    /// (see [`ClipTextConfig::to_json_as`]).
    pub fn to_json(&self) -> serde_json::Value {
        self.to_json_as(false)
    }

    /// The `config.json` transformers' `save_pretrained` writes for this config, so that
    /// `from_pretrained` (and diffusers' pipelines) open the folder unchanged: `architectures`
    /// names `CLIPTextModelWithProjection` when `with_projection` (SDXL's second encoder) and
    /// `CLIPTextModel` otherwise, `model_type` is `clip_text_model`, and every field goes under
    /// its transformers name. Token ids a file did not name stay unnamed (transformers' own
    /// defaults are CLIP's 49408-token ids, which a smaller vocabulary would refuse on
    /// reading back); `dropout`, gone from transformers' config, is written only when set.
    /// The weights' `dtype` is the writer's to add.
    pub fn to_json_as(&self, with_projection: bool) -> serde_json::Value {
        let architecture = if with_projection {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        };
        let mut json = serde_json::json!({
            "architectures": [architecture],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "projection_dim": self.projection_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "initializer_factor": self.initializer_factor,
            "eos_token_id": self.eos_token_id,
        });
        if let Some(map) = json.as_object_mut() {
            for (key, id) in [
                ("bos_token_id", self.bos_token_id),
                ("pad_token_id", self.pad_token_id),
            ] {
                if let Some(id) = id {
                    map.insert(key.into(), id.into());
                }
            }
            if self.dropout != 0.0 {
                map.insert("dropout".into(), self.dropout.into());
            }
        }
        json
    }

    /// Checks every field against its meaning and bounds (see the field docs); returns the
    /// first problem found, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        checks::size("vocab_size", self.vocab_size, MAX_VOCAB)?;
        checks::size("hidden_size", self.hidden_size, MAX_CHANNELS)?;
        checks::size("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        checks::size("projection_dim", self.projection_dim, MAX_CHANNELS)?;
        checks::size("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        checks::size(
            "num_attention_heads",
            self.num_attention_heads,
            MAX_CHANNELS,
        )?;
        checks::size(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        let heads = self.num_attention_heads;
        if !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "field `num_attention_heads`: hidden_size {} does not split into {heads} heads",
                self.hidden_size
            ));
        }
        checks::open_unit("layer_norm_eps", self.layer_norm_eps)?;
        for (field, id) in [
            ("eos_token_id", Some(self.eos_token_id)),
            ("bos_token_id", self.bos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id.filter(|id| *id as usize >= self.vocab_size) {
                return Err(format!(
                    "field `{field}` is {id}; it must be below vocab_size ({})",
                    self.vocab_size
                ));
            }
        }
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
}

/// One pre-LayerNorm transformer layer of a CLIP tower (shared by the text and vision towers):
/// `x + attn(LN(x))`, then `x + MLP(LN(x))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// The LayerNorm before self-attention.
    pub layer_norm1: LayerNorm<B>,
    /// Multi-head self-attention over the tokens.
    pub self_attn: ClipAttention<B>,
    /// The LayerNorm before the MLP.
    pub layer_norm2: LayerNorm<B>,
    /// The two-layer MLP.
    pub mlp: ClipMlp<B>,
    heads: usize,
    quick_gelu: bool,
    causal: bool,
}

/// transformers' `CLIPAttention`: the projections of multi-head self-attention.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// The query projection.
    pub q_proj: Linear<B>,
    /// The key projection.
    pub k_proj: Linear<B>,
    /// The value projection.
    pub v_proj: Linear<B>,
    /// The output projection.
    pub out_proj: Linear<B>,
}

/// transformers' `CLIPMLP`: hidden → intermediate width, the activation, and back.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// Hidden to intermediate width.
    pub fc1: Linear<B>,
    /// Intermediate back to hidden width.
    pub fc2: Linear<B>,
}

/// The sizes of one encoder layer, shared by the text and vision towers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub act: HiddenAct,
    pub eps: f64,
    /// The tower's layer count and `initializer_factor`: they set the initial weights' spread.
    pub layers: usize,
    pub factor: f64,
}

impl From<&ClipTextConfig> for LayerShape {
    fn from(c: &ClipTextConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
            layers: c.num_hidden_layers,
            factor: c.initializer_factor,
        }
    }
}

/// A linear layer initialised as transformers' `CLIPPreTrainedModel._init_weights` does:
/// weights from N(0, std²), biases zero.
pub(crate) fn normal_linear<B: Backend>(
    input: usize,
    output: usize,
    std: f64,
    bias: bool,
    device: &B::Device,
) -> Linear<B> {
    let mut linear = LinearConfig::new(input, output)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device);
    linear.bias = bias.then(|| Param::from_tensor(Tensor::zeros([output], device)));
    linear
}

/// An embedding table from N(0, std²), as transformers initialises CLIP's (std 0.02 × the
/// factor), not N(0, 1) as Burn's default: embeddings that large swamp what the layers add to
/// the residual stream, and a text encoder trained from them stayed near a bag of words.
pub(crate) fn normal_embedding<B: Backend>(
    rows: usize,
    width: usize,
    std: f64,
    device: &B::Device,
) -> Embedding<B> {
    EmbeddingConfig::new(rows, width)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl<B: Backend> ClipEncoderLayer<B> {
    pub(crate) fn new(c: LayerShape, causal: bool, device: &B::Device) -> Self {
        let d = c.hidden;
        let norm = || LayerNormConfig::new(d).with_epsilon(c.eps).init(device);
        // transformers' `CLIPAttention` and `CLIPMLP` initial spreads: the projections into the
        // residual stream's sublayers shrink with depth, as in GPT-2.
        let width = (d as f64).powf(-0.5);
        let depth = ((2 * c.layers) as f64).powf(-0.5);
        let in_proj = width * depth * c.factor;
        let out_proj = width * c.factor;
        let fc1 = ((2 * d) as f64).powf(-0.5) * c.factor;
        let linear = |i, o, std| normal_linear(i, o, std, true, device);
        Self {
            layer_norm1: norm(),
            self_attn: ClipAttention {
                q_proj: linear(d, d, in_proj),
                k_proj: linear(d, d, in_proj),
                v_proj: linear(d, d, in_proj),
                out_proj: linear(d, d, out_proj),
            },
            layer_norm2: norm(),
            mlp: ClipMlp {
                fc1: linear(d, c.intermediate, fc1),
                fc2: linear(c.intermediate, d, in_proj),
            },
            heads: c.heads,
            quick_gelu: c.act == HiddenAct::QuickGelu,
            causal,
        }
    }

    /// The layer on `[batch, tokens, hidden]`: attention, then the MLP, each with its residual.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        // The projections see `[batch·tokens, width]`: one matrix product each rather than a
        // batch of small ones.
        let x = x.reshape([b * n, d]);
        let h = layer_norm(&self.layer_norm1, x.clone());
        let tokens = |t: Tensor<B, 2>| t.reshape([b, n, d]);
        let attn = &self.self_attn;
        let (q, k, v) = (
            tokens(linear_forward(&attn.q_proj, h.clone())),
            tokens(linear_forward(&attn.k_proj, h.clone())),
            tokens(linear_forward(&attn.v_proj, h)),
        );
        let attended = multi_head_attention(q, k, v, self.heads, self.causal);
        let x = x + linear_forward(&attn.out_proj, attended.reshape([b * n, d]));
        let h = linear_forward(&self.mlp.fc1, layer_norm(&self.layer_norm2, x.clone()));
        let h = if self.quick_gelu {
            quick_gelu(h)
        } else {
            gelu(h)
        };
        (x + linear_forward(&self.mlp.fc2, h)).reshape([b, n, d])
    }
}

/// Token and position embeddings (transformers' `CLIPTextEmbeddings`).
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

/// transformers' `CLIPTextTransformer`.
#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    pub embeddings: ClipTextEmbeddings<B>,
    pub encoder: ClipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
}

/// The stack of encoder layers.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput<B: Backend> {
    /// The last layer's output after the final LayerNorm: `[batch, tokens, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// The embeddings, then every layer's output (before the final LayerNorm), as transformers'
    /// `hidden_states`: `hidden_states[len − 2]` is SDXL's penultimate layer; clip-skip `n` is
    /// `hidden_states[len − 1 − n]`.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// The final hidden state at each sequence's end-of-text token: `[batch, hidden]`.
    pub pooled: Tensor<B, 2>,
    /// `text_projection(pooled)` for `CLIPTextModelWithProjection` checkpoints.
    pub text_embeds: Option<Tensor<B, 2>>,
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when the checkpoint has a
/// `text_projection`.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    /// The embeddings, encoder layers and final LayerNorm (transformers' `text_model`).
    pub text_model: ClipTextTransformer<B>,
    /// The projection of the pooled output (`text_projection`), for `CLIPTextModelWithProjection`
    /// checkpoints.
    pub text_projection: Option<Linear<B>>,
    vocab_size: usize,
    max_positions: usize,
    eos_token_id: u32,
}

impl<B: Backend> ClipTextModel<B> {
    /// A text encoder with random weights, drawn as transformers initialises `CLIPTextModel`
    /// (embeddings N(0, 0.02²), the layers' spreads from the width and depth, biases zero, all
    /// scaled by `initializer_factor`); `with_projection` adds `text_projection`.
    pub fn new(config: &ClipTextConfig, with_projection: bool, device: &B::Device) -> Result<Self> {
        config.validate().map_err(|reason| CoreError::Config {
            path: "<ClipTextConfig>".into(),
            reason,
        })?;
        let d = config.hidden_size;
        let embedding_std = 0.02 * config.initializer_factor;
        Ok(Self {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: normal_embedding(config.vocab_size, d, embedding_std, device),
                    position_embedding: normal_embedding(
                        config.max_position_embeddings,
                        d,
                        embedding_std,
                        device,
                    ),
                },
                encoder: ClipEncoder {
                    layers: (0..config.num_hidden_layers)
                        .map(|_| ClipEncoderLayer::new(config.into(), true, device))
                        .collect(),
                },
                final_layer_norm: LayerNormConfig::new(d)
                    .with_epsilon(config.layer_norm_eps)
                    .init(device),
            },
            text_projection: with_projection.then(|| {
                let std = (d as f64).powf(-0.5) * config.initializer_factor;
                normal_linear(d, config.projection_dim, std, false, device)
            }),
            vocab_size: config.vocab_size,
            max_positions: config.max_position_embeddings,
            eos_token_id: config.eos_token_id,
        })
    }

    /// Loads a `text_encoder/` folder (`config.json`, `model.safetensors`); a projection is
    /// built when the file has `text_projection.weight`. Keys load with or without the
    /// `text_model.` prefix.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        Self::from_pretrained_with(dir, LoadOptions::default(), device)
    }

    /// [`ClipTextModel::from_pretrained`] with load options (e.g. the compute dtype).
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::from_file(dir.join("config.json"))?;
        // Repositories that ship only the half-precision variant have `model.fp16.safetensors`.
        let plain = dir.join("model.safetensors");
        let fp16 = dir.join("model.fp16.safetensors");
        let file = SafetensorsFile::open(if !plain.is_file() && fp16.is_file() {
            fp16
        } else {
            plain
        })?;
        let with_projection = file
            .entries()
            .iter()
            .any(|e| e.key == "text_projection.weight");
        Self::new(&config, with_projection, device)?.load_weights(&file, options)
    }

    /// Saves the weights as transformers' `model.safetensors` (its key names and layout, as
    /// `save_pretrained` writes them), in `dtype`, written atomically.
    pub fn save_weights(&self, path: impl AsRef<Path>, dtype: burn::tensor::DType) -> Result<()> {
        let with_projection = self.text_projection.is_some();
        let metadata = std::collections::BTreeMap::from([("format".into(), "pt".into())]);
        sd_core::weights::save_safetensors(
            self,
            path,
            &|k| checkpoint_key(k, with_projection),
            dtype,
            Some(&metadata),
        )
    }

    /// The weights under transformers' key names, always with the `text_model.` level
    /// (`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`), as
    /// single-file checkpoints hold a transformers CLIP (`cond_stage_model.transformer.…`);
    /// read lazily.
    pub fn weight_tensors(&self) -> Vec<(String, sd_core::weights::TensorSnapshot)> {
        sd_core::weights::module_tensors(self, &|k| checkpoint_key(k, true))
    }

    /// Fills the weights from a transformers state dict.
    pub fn load_weights(self, file: &SafetensorsFile, options: LoadOptions) -> Result<Self> {
        load_safetensors(self, file, &transformers_key, options)
    }

    /// Fills the weights from the keys under `prefix` of a combined file (a single-file
    /// checkpoint's `cond_stage_model.transformer.`), ignoring every other key.
    pub fn load_weights_under(
        self,
        file: &SafetensorsFile,
        prefix: &str,
        options: LoadOptions,
    ) -> Result<Self> {
        let map = |key: &str| key.strip_prefix(prefix).and_then(transformers_key);
        load_safetensors(self, file, &map, options)
    }

    /// Encodes `[batch, tokens]` token ids.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<ClipTextOutput<B>> {
        let b = ids.len();
        let n = ids.first().map_or(0, Vec::len);
        if b == 0 || n == 0 || ids.iter().any(|r| r.len() != n) {
            return Err(CoreError::InvalidInput(
                "token ids must be a non-empty batch of equal-length sequences".into(),
            ));
        }
        if n > self.max_positions {
            return Err(CoreError::InvalidInput(format!(
                "{n} tokens is more than the text encoder's {} positions",
                self.max_positions
            )));
        }
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(CoreError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        let device = self.text_model.final_layer_norm.gamma.device();
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, n]), &device);
        let positions = Tensor::<B, 1, Int>::arange(0..n as i64, &device)
            .unsqueeze::<2>()
            .repeat_dim(0, b);
        let emb = &self.text_model.embeddings;
        let mut x = emb.token_embedding.forward(tokens) + emb.position_embedding.forward(positions);
        let mut hidden_states = vec![x.clone()];
        for layer in &self.text_model.encoder.layers {
            x = layer.forward(x);
            hidden_states.push(x.clone());
        }
        let last = layer_norm(&self.text_model.final_layer_norm, x);
        // The pooled position: the first end-of-text token (the largest id for old configs whose
        // eos_token_id is 2), as transformers picks it.
        let pool_at: Vec<usize> = ids
            .iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|&(i, t)| (*t, std::cmp::Reverse(i)))
                        .map_or(0, |(i, _)| i)
                } else {
                    row.iter()
                        .position(|&t| t == self.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect();
        let d = last.dims()[2];
        let pooled = Tensor::cat(
            pool_at
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    last.clone()
                        .slice([i..i + 1, p..p + 1, 0..d])
                        .reshape([1, d])
                })
                .collect(),
            0,
        );
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|proj| linear_forward(proj, pooled.clone()));
        Ok(ClipTextOutput {
            last_hidden_state: last,
            hidden_states,
            pooled,
            text_embeds,
        })
    }
}

/// A module path as transformers names the parameter: the inverse of [`transformers_key`].
/// transformers 5 saves a `CLIPTextModel` without the `text_model.` level and a
/// `CLIPTextModelWithProjection` with it.
fn checkpoint_key(path: &str, with_projection: bool) -> Option<String> {
    Some(match path.strip_prefix("text_model.") {
        Some(rest) if !with_projection => rest.to_string(),
        _ => path.to_string(),
    })
}

/// A module path as transformers names the parameter, always with the `text_model.` level
/// (`text_model.encoder.layers.0.self_attn.q_proj.weight`): what LoRA files name the weights
/// they adapt by.
pub fn text_checkpoint_key(path: &str) -> Option<String> {
    checkpoint_key(path, true)
}

/// transformers' key names onto the module (the module tree is the key tree): the
/// `text_model.` prefix may be missing; the `position_ids` buffer some files carry is not a
/// weight.
fn transformers_key(key: &str) -> Option<String> {
    if key.ends_with("position_ids") {
        return None;
    }
    let key = if key.starts_with("text_model.") || key.starts_with("text_projection.") {
        key.to_string()
    } else {
        format!("text_model.{key}")
    };
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every fixture text encoder's `config.json` (written by transformers 5).
    pub(crate) fn fixture_configs(folder: &str) -> Vec<std::path::PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let mut found = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.ends_with("config.json")
                    && path
                        .parent()
                        .and_then(|p| p.file_name())
                        .is_some_and(|n| n.to_string_lossy().starts_with(folder))
                {
                    found.push(path);
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn text_configs_write_back_as_transformers_wrote_them() {
        let configs = fixture_configs("text_encoder");
        assert!(configs.len() >= 8, "{configs:?}");
        for path in configs {
            let theirs: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let config = ClipTextConfig::from_file(&path).unwrap();
            let projection = theirs["architectures"][0] == "CLIPTextModelWithProjection";
            let ours = config.to_json_as(projection);
            let (ours, theirs) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
            // Every key transformers wrote but the dtype and its version, with the same value.
            for (key, value) in theirs {
                if key == "dtype" || key == "transformers_version" {
                    continue;
                }
                assert_eq!(ours.get(key), Some(value), "{}: `{key}`", path.display());
            }
            assert!(
                ours.keys().all(|k| theirs.contains_key(k)),
                "{}: {:?}",
                path.display(),
                ours.keys()
                    .filter(|k| !theirs.contains_key(*k))
                    .collect::<Vec<_>>()
            );
            let back: ClipTextConfig = checks::parse(
                &serde_json::to_string(ours).unwrap(),
                ClipTextConfig::REQUIRED,
            )
            .unwrap();
            assert_eq!(back, config, "{}", path.display());
        }
        // Unnamed token ids stay unnamed; a legacy dropout is kept.
        let config = ClipTextConfig {
            dropout: 0.1,
            ..ClipTextConfig::default()
        };
        let json = config.to_json();
        assert!(json.get("pad_token_id").is_none() && json.get("bos_token_id").is_none());
        assert_eq!(json["dropout"], 0.1);
        assert_eq!(json["architectures"][0], "CLIPTextModel");
    }

    #[test]
    fn text_configs_name_the_field_at_fault() {
        ClipTextConfig::default().validate().unwrap();
        let err = checks::parse::<ClipTextConfig>("{}", ClipTextConfig::REQUIRED).unwrap_err();
        assert!(err.contains("missing required field `vocab_size`"), "{err}");
        let config = ClipTextConfig {
            eos_token_id: 1_000_000_000,
            ..ClipTextConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err(),
            "field `eos_token_id` is 1000000000; it must be below vocab_size (49408)"
        );
        let config = ClipTextConfig {
            num_attention_heads: 7,
            ..ClipTextConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("does not split into 7 heads")
        );
        let err = checks::parse::<ClipTextConfig>(r#"{"pad_token_id": -1}"#, &[]).unwrap_err();
        assert!(err.starts_with("field `pad_token_id`:"), "{err}");
    }

    /// A from-scratch text encoder has transformers' initial spreads (`CLIPPreTrainedModel.
    /// _init_weights`): token and position embeddings 0.02, q/k/v and fc2 d^-½·(2L)^-½,
    /// out_proj d^-½, fc1 (2d)^-½, the projection d^-½, all × `initializer_factor`; biases 0,
    /// LayerNorms 1 and 0.
    #[test]
    fn random_weights_have_transformers_initial_spreads() {
        type B = sd_core::backend::Flex;
        let (d, layers, factor) = (64, 4, 1.5);
        let config = ClipTextConfig {
            vocab_size: 1000,
            eos_token_id: 999,
            hidden_size: d,
            intermediate_size: 256,
            projection_dim: 32,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            initializer_factor: factor,
            ..Default::default()
        };
        let model = ClipTextModel::<B>::new(&config, true, &Default::default()).unwrap();
        let stats = |t: Tensor<B, 2>| {
            let v: Vec<f32> = t.into_data().to_vec().unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        let check = |name: &str, t: Tensor<B, 2>, want: f64| {
            let (mean, std) = stats(t);
            assert!(mean.abs() < 0.1 * want, "{name}: mean {mean}");
            assert!(
                (std / want - 1.0).abs() < 0.05,
                "{name}: std {std}, want {want}"
            );
        };
        let zero = |name: &str, bias: &Option<Param<Tensor<B, 1>>>| {
            let v: Vec<f32> = bias.as_ref().unwrap().val().into_data().to_vec().unwrap();
            assert!(v.iter().all(|&x| x == 0.0), "{name}: bias not zero");
        };
        let text = &model.text_model;
        check(
            "token_embedding",
            text.embeddings.token_embedding.weight.val(),
            0.02 * factor,
        );
        check(
            "position_embedding",
            text.embeddings.position_embedding.weight.val(),
            0.02 * factor,
        );
        let in_proj = (d as f64).powf(-0.5) * ((2 * layers) as f64).powf(-0.5) * factor;
        let out_proj = (d as f64).powf(-0.5) * factor;
        let fc1 = ((2 * d) as f64).powf(-0.5) * factor;
        for (i, layer) in text.encoder.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            for (name, linear, want) in [
                ("q_proj", &attn.q_proj, in_proj),
                ("k_proj", &attn.k_proj, in_proj),
                ("v_proj", &attn.v_proj, in_proj),
                ("out_proj", &attn.out_proj, out_proj),
                ("fc1", &layer.mlp.fc1, fc1),
                ("fc2", &layer.mlp.fc2, in_proj),
            ] {
                let name = format!("layers.{i}.{name}");
                check(&name, linear.weight.val(), want);
                zero(&name, &linear.bias);
            }
            let gamma: Vec<f32> = layer.layer_norm1.gamma.val().into_data().to_vec().unwrap();
            assert!(gamma.iter().all(|&x| x == 1.0), "layers.{i}.layer_norm1");
        }
        let projection = model.text_projection.as_ref().unwrap();
        check(
            "text_projection",
            projection.weight.val(),
            (d as f64).powf(-0.5) * factor,
        );
        assert!(projection.bias.is_none());
    }
}
