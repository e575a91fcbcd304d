//! Finding a model on disk and loading its components one at a time: a diffusers folder
//! (`model_index.json`), a single-file checkpoint in the original layout, or a Hugging Face repo
//! id already in the local hub cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use sd_conditioner::{
    ClipConditioner, ClipStage, ClipTextConfig, ClipTextModel, ClipTokenizer, HiddenAct,
    LayerChoice, Padding, PromptSyntax, TextWiring,
};
use sd_core::AutoencoderKlConfig;
use sd_core::weights::{LoadOptions, SafetensorsFile, diffusers_weights_path};
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;
use sd_schedulers::SchedulerConfig;
use sd_unet::{UNet2DConditionConfig, UNet2DConditionModel};

use crate::error::{Result, SdError, model_error};
use crate::family::ModelFamily;
use crate::single_file::{self, CheckpointLayout, TextPrefix};
use sd_lora::{Attached, Component, LoraFile, MergeOptions};

/// The most text-encoder layers `clip_skip` can skip (ViT-bigG has 32).
pub const MAX_CLIP_SKIP: usize = 64;

#[derive(Debug, Clone)]
enum Source {
    Folder(PathBuf),
    SingleFile {
        path: PathBuf,
        layout: CheckpointLayout,
        /// A diffusers folder whose component configs replace the built-in ones.
        config_dir: Option<PathBuf>,
    },
}

/// A [`sd_lora::Rename`] that owns what it needs.
type OwnedRename = Box<dyn Fn(&str) -> Option<String>>;

/// How the LoRAs of [`Model::with_loras`] reach a generation's U-Net and text encoders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoraApplication {
    /// Added into the weights as they load (no cost per step; kohya's and ComfyUI's way).
    #[default]
    Merge,
    /// Kept beside the weights and added at forward time (PEFT's unfused adapters, diffusers'
    /// `load_lora_weights` before `fuse_lora`): the loaded weights stay the files' own.
    OnTheFly,
}

/// A model on disk: its configuration is read up front, its weights only when a component is
/// loaded, so that a pipeline holds one large component at a time.
#[derive(Debug, Clone)]
pub struct Model {
    source: Source,
    family: ModelFamily,
    variant: Option<String>,
    unet_config: UNet2DConditionConfig,
    vae_config: AutoencoderKlConfig,
    scheduler_config: SchedulerConfig,
    /// SDXL: an absent negative prompt conditions on zeros rather than on the empty prompt.
    force_zeros_for_empty_prompt: bool,
    /// The dtype weights are loaded in (and computed in).
    dtype: DType,
    /// The dtype the layers' matrices are held in when narrower than `dtype`
    /// ([`Model::with_matrix_dtype`]).
    matrix_dtype: Option<DType>,
    /// Refuse weights holding NaN or ±∞ as they load ([`LoadOptions::check_finite`]).
    check_weights: bool,
    /// LoRAs merged into the U-Net and text encoders as they load, with their weights.
    loras: Vec<(Arc<LoraFile>, f32)>,
    lora_options: MergeOptions,
    lora_application: LoraApplication,
    /// The x4 upscaler's (`StableDiffusionUpscalePipeline`): the schedule that noises the
    /// low-resolution image, and the highest noise level it allows.
    upscaler: Option<UpscalerParts>,
}

/// What a `StableDiffusionUpscalePipeline` folder adds to a model.
#[derive(Debug, Clone)]
pub struct UpscalerParts {
    /// `low_res_scheduler/scheduler_config.json`: the schedule the low-resolution image is
    /// noised by (its `noise_level` is a timestep of it).
    pub low_res_scheduler: SchedulerConfig,
    /// `max_noise_level` of `model_index.json` (350 in the released model).
    pub max_noise_level: usize,
}

/// Where a text encoder's tokenizer comes from.
#[derive(Debug, Clone)]
pub(crate) enum TokenizerSource {
    /// A `tokenizer/` folder (`vocab.json` and `merges.txt`, or `tokenizer.json`).
    Folder(PathBuf),
    /// The built-in CLIP vocabulary, padded so.
    Embedded(Padding),
}

impl TokenizerSource {
    /// The tokenizer, with the folder's own padding (`pad_token`).
    pub(crate) fn open(&self) -> Result<ClipTokenizer> {
        Ok(match self {
            Self::Folder(dir) => ClipTokenizer::from_folder(dir, sd_conditioner::padding_of(dir))?,
            Self::Embedded(padding) => ClipTokenizer::embedded(*padding)?,
        })
    }
}

/// The folder of text encoder `index` in a diffusers model.
pub(crate) fn text_encoder_folder(index: usize) -> &'static str {
    if index == 0 {
        "text_encoder"
    } else {
        "text_encoder_2"
    }
}

/// Checks that the component configs, each valid on its own, fit together, before anything is
/// built: the U-Net's channels against the VAE's latent, RGB images, the U-Net's context width
/// against the text encoders' hidden sizes, SDXL's pooled and time-id conditioning, and text
/// encoders long enough for the tokenizer's 77 positions. `at` names the file of a component's
/// config (`"unet/config.json"`).
fn check_components(
    at: &dyn Fn(&str) -> PathBuf,
    family: ModelFamily,
    unet: &UNet2DConditionConfig,
    vae: &AutoencoderKlConfig,
    texts: &[ClipTextConfig],
) -> Result<()> {
    let unet_at = || at("unet/config.json");
    let latent = vae.latent_channels;
    if unet.out_channels != latent {
        return Err(model_error(
            unet_at(),
            format!(
                "field `out_channels` is {}; it must equal latent_channels in vae/config.json \
                 ({latent})",
                unet.out_channels
            ),
        ));
    }
    // The x4 upscaler's U-Net reads the noised low-resolution image beside the latent.
    let upscaler = unet.num_class_embeds.is_some() && unet.in_channels == latent + vae.in_channels;
    if unet.in_channels != latent && unet.in_channels != 2 * latent + 1 && !upscaler {
        return Err(model_error(
            unet_at(),
            format!(
                "field `in_channels` is {}; with latent_channels {latent} in vae/config.json it \
                 must be {latent} (or {} for inpainting, {} for an upscaler with class labels)",
                unet.in_channels,
                2 * latent + 1,
                latent + vae.in_channels
            ),
        ));
    }
    for (field, channels) in [
        ("in_channels", vae.in_channels),
        ("out_channels", vae.out_channels),
    ] {
        if channels != 3 {
            return Err(model_error(
                at("vae/config.json"),
                format!("field `{field}` is {channels}; images have 3 channels (RGB)"),
            ));
        }
    }
    let text_at = |i: usize| {
        at(if i == 0 {
            "text_encoder/config.json"
        } else {
            "text_encoder_2/config.json"
        })
    };
    for (i, text) in texts.iter().enumerate() {
        if text.max_position_embeddings < sd_conditioner::MAX_LENGTH {
            return Err(model_error(
                text_at(i),
                format!(
                    "field `max_position_embeddings` is {}; prompts take {} positions",
                    text.max_position_embeddings,
                    sd_conditioner::MAX_LENGTH
                ),
            ));
        }
    }
    let context: usize = texts.iter().map(|t| t.hidden_size).sum();
    let dims = unet
        .cross_attention_dim
        .expand(unet.block_out_channels.len())
        .unwrap_or_default();
    if let Some(d) = dims.iter().find(|d| **d != context) {
        let widths: Vec<String> = texts.iter().map(|t| t.hidden_size.to_string()).collect();
        return Err(model_error(
            unet_at(),
            format!(
                "field `cross_attention_dim` is {d}; the text encoder hidden states are \
                 {context} wide ({})",
                widths.join(" + ")
            ),
        ));
    }
    match (family == ModelFamily::Sdxl, unet.needs_text_time()) {
        (true, false) => Err(model_error(
            unet_at(),
            "an SDXL U-Net needs `addition_embed_type`: \"text_time\"",
        )),
        (false, true) => Err(model_error(
            unet_at(),
            "field `addition_embed_type` is text_time, which needs SDXL's second text encoder \
             (text_encoder_2)",
        )),
        (true, true) => {
            let pooled = texts.get(1).map_or(0, |t| t.projection_dim);
            let time = unet.addition_time_embed_dim.unwrap_or(0);
            let expected = pooled + 6 * time;
            match unet.projection_class_embeddings_input_dim {
                Some(d) if d != expected => Err(model_error(
                    unet_at(),
                    format!(
                        "field `projection_class_embeddings_input_dim` is {d}; the pooled text \
                         embedding ({pooled}) and six time ids of addition_time_embed_dim \
                         ({time}) make {expected}"
                    ),
                )),
                _ => Ok(()),
            }
        }
        (false, false) => Ok(()),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = sd_core::files::read_regular_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| model_error(path, format!("not valid JSON: {e}")))
}

/// The snapshot folder of a Hugging Face repo id in the local hub cache
/// (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`), if it is there.
pub fn hub_cache_snapshot(repo_id: &str) -> Option<PathBuf> {
    let (org, name) = repo_id.split_once('/')?;
    if org.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        })?;
    let repo = hub.join(format!("models--{org}--{name}"));
    let snapshots = repo.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(commit.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    // No `refs/main`: the most recently written snapshot.
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

impl Model {
    /// Opens what a user names as the model: a diffusers folder, a `.safetensors` checkpoint,
    /// or a Hugging Face repo id found in the local hub cache.
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_variant(spec, None)
    }

    /// [`Model::open`] taking a folder's `variant` weight files (e.g. `fp16`:
    /// `diffusion_pytorch_model.fp16.safetensors`).
    pub fn open_variant(spec: &str, variant: Option<&str>) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_folder(path, variant);
        }
        if path.is_file() {
            return Self::from_single_file(path, None);
        }
        if !path.exists()
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && let Some(dir) = hub_cache_snapshot(spec)
        {
            return Self::from_folder(dir, variant);
        }
        let hint = if spec.matches('/').count() == 1 && !spec.starts_with('/') {
            " (not in the local Hugging Face cache either; this build does not download)"
        } else {
            ""
        };
        Err(model_error(spec, format!("no such file or folder{hint}")))
    }

    /// A diffusers folder: `model_index.json` and one folder per component. `variant` picks
    /// weight files such as `diffusion_pytorch_model.fp16.safetensors`.
    pub fn from_folder(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join("model_index.json");
        if !index_path.is_file() {
            return Err(model_error(
                &dir,
                "not a diffusers model folder: no model_index.json",
            ));
        }
        let index = read_json(&index_path)?;
        let class = index["_class_name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Every component the index names (a [library, class] pair) must have its folder.
        if let Some(map) = index.as_object() {
            for (name, value) in map {
                let named = value
                    .as_array()
                    .is_some_and(|pair| pair.len() == 2 && pair.iter().all(|v| !v.is_null()));
                if named && !name.starts_with('_') && !dir.join(name).is_dir() {
                    return Err(model_error(
                        &index_path,
                        format!("component `{name}` is listed but its folder is missing"),
                    ));
                }
            }
        }
        for required in ["unet", "vae", "text_encoder", "scheduler"] {
            if !dir.join(required).is_dir() {
                return Err(model_error(
                    &dir,
                    format!("the `{required}` component folder is missing"),
                ));
            }
        }
        let unet_config = UNet2DConditionConfig::from_file(dir.join("unet/config.json"))?;
        let vae_config = AutoencoderKlConfig::from_file(dir.join("vae/config.json"))?;
        let scheduler_config =
            SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?;
        let text_config = ClipTextConfig::from_file(dir.join("text_encoder/config.json"))?;
        let family = if class.contains("XL") || dir.join("text_encoder_2").is_dir() {
            ModelFamily::Sdxl
        } else if text_config.hidden_act == HiddenAct::Gelu {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };
        if family == ModelFamily::Sdxl && !dir.join("text_encoder_2").is_dir() {
            return Err(model_error(
                &dir,
                "an SDXL model needs the `text_encoder_2` component folder",
            ));
        }
        // Every text encoder's config is checked now, before any component is built.
        let mut text_configs = vec![text_config];
        if dir.join("text_encoder_2").is_dir() {
            text_configs.push(ClipTextConfig::from_file(
                dir.join("text_encoder_2/config.json"),
            )?);
        }
        check_components(
            &|config| dir.join(config),
            family,
            &unet_config,
            &vae_config,
            &text_configs,
        )?;
        let force_zeros_for_empty_prompt = index["force_zeros_for_empty_prompt"]
            .as_bool()
            .unwrap_or(family == ModelFamily::Sdxl);
        let upscaler = if class == "StableDiffusionUpscalePipeline" {
            let path = dir.join("low_res_scheduler/scheduler_config.json");
            let low_res_scheduler = SchedulerConfig::from_file(&path)?;
            let max_noise_level = match &index["max_noise_level"] {
                serde_json::Value::Null => 350,
                v => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    model_error(&index_path, "field `max_noise_level` is not a whole number")
                })?,
            };
            let classes = unet_config.num_class_embeds.unwrap_or(0);
            if max_noise_level >= classes
                || max_noise_level >= low_res_scheduler.num_train_timesteps
            {
                return Err(model_error(
                    &index_path,
                    format!(
                        "max_noise_level {max_noise_level} must be below the U-Net's \
                         num_class_embeds ({classes}) and the low-res scheduler's \
                         num_train_timesteps ({})",
                        low_res_scheduler.num_train_timesteps
                    ),
                ));
            }
            Some(UpscalerParts {
                low_res_scheduler,
                max_noise_level,
            })
        } else {
            None
        };
        if upscaler.is_none() && unet_config.in_channels == unet_config.out_channels + 3 {
            return Err(model_error(
                dir.join("unet/config.json"),
                "a U-Net that reads a low-resolution image belongs to a \
                 StableDiffusionUpscalePipeline folder (model_index.json `_class_name`)",
            ));
        }
        Ok(Self {
            upscaler,
            source: Source::Folder(dir),
            family,
            variant: variant.map(String::from),
            unet_config,
            vae_config,
            scheduler_config,
            force_zeros_for_empty_prompt,
            dtype: DType::F32,
            matrix_dtype: None,
            check_weights: true,
            loras: Vec::new(),
            lora_options: MergeOptions::default(),
            lora_application: LoraApplication::default(),
        })
    }

    /// A single-file checkpoint in the original (CompVis / Stability) layout. The family and
    /// inpainting are detected from the keys and shapes; the component configs are the family's
    /// published ones, or those of the diffusers folder `config_dir` (as diffusers'
    /// `from_single_file(..., config=...)`).
    pub fn from_single_file(path: impl AsRef<Path>, config_dir: Option<&Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
            return Err(model_error(
                &path,
                "pickled checkpoints are not loaded (unpickling can run code); convert it to \
                 .safetensors first, e.g. with diffusers' or A1111's converters",
            ));
        }
        let file = SafetensorsFile::open(&path)?;
        let layout = single_file::detect(&file)?;
        let (unet_config, vae_config, scheduler_config) = match config_dir {
            Some(dir) => {
                let folder = Self::from_folder(dir, None)?;
                (
                    folder.unet_config,
                    folder.vae_config,
                    folder.scheduler_config,
                )
            }
            None => single_file::default_configs(&layout),
        };
        if unet_config.in_channels != layout.unet_in_channels {
            return Err(model_error(
                &path,
                format!(
                    "the U-Net takes {} input channels but the config says {}",
                    layout.unet_in_channels, unet_config.in_channels
                ),
            ));
        }
        // The presets are valid as published, but the input channels come from the file.
        unet_config
            .validate()
            .map_err(|reason| model_error(&path, format!("U-Net: {reason}")))?;
        if config_dir.is_none() {
            let texts = single_file::text_configs(layout.family);
            check_components(
                &|_| path.clone(),
                layout.family,
                &unet_config,
                &vae_config,
                &texts,
            )?;
        }
        Ok(Self {
            family: layout.family,
            force_zeros_for_empty_prompt: layout.family == ModelFamily::Sdxl,
            source: Source::SingleFile {
                path,
                layout,
                config_dir: config_dir.map(Path::to_path_buf),
            },
            variant: None,
            unet_config,
            vae_config,
            scheduler_config,
            dtype: DType::F32,
            matrix_dtype: None,
            check_weights: true,
            loras: Vec::new(),
            lora_options: MergeOptions::default(),
            lora_application: LoraApplication::default(),
            upscaler: None,
        })
    }

    /// Loads weights in `dtype` (`F32`, `F16` or `BF16`): the backend must compute in it too
    /// (`burn::tensor::set_default_dtypes`, as `sd generate --dtype` does).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The dtype weights are loaded and computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Holds the layers' matrices (every `Linear` and `Conv2d` weight: nearly all of a model's
    /// bytes) in `dtype` (f16 or bf16) while the arithmetic stays in [`Model::dtype`]: half the
    /// weight memory at f32's precision. On the CPU (`flex`) each layer's kernel widens the
    /// weights it multiplies (F16C on x86); other backends cast a layer's weights before using
    /// them. `sd generate --dtype f16` on the CPU does this.
    pub fn with_matrix_dtype(mut self, dtype: DType) -> Self {
        self.matrix_dtype = Some(dtype);
        self
    }

    /// The dtype the matrices are held in: [`Model::with_matrix_dtype`]'s, else the model's.
    pub fn matrix_dtype(&self) -> DType {
        self.matrix_dtype.unwrap_or(self.dtype)
    }

    /// Whether weights are checked for NaN and ±∞ as they load (the default): a damaged file is
    /// then refused by tensor name instead of giving a black image.
    pub fn with_weight_check(mut self, check: bool) -> Self {
        self.check_weights = check;
        self
    }

    /// The VAE in f32 whatever the model's dtype (as its config's `force_upcast` asks): the
    /// pipeline's retry when a half-precision decode overflows.
    pub fn with_vae_upcast(mut self) -> Self {
        self.vae_config.force_upcast = true;
        self
    }

    fn load_options(&self) -> LoadOptions {
        self.weight_load_options()
    }

    /// How this model's weights load: its dtype, and the finiteness check unless turned off.
    /// Components loaded beside the model (ControlNets) use the same.
    pub fn weight_load_options(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.dtype,
            check_finite: self.check_weights,
            matrix_dtype: self.matrix_dtype.filter(|d| *d != self.dtype),
            ..LoadOptions::default()
        }
    }

    /// The VAE's dtype: f32 when the model computes in half precision and the VAE's config
    /// says `force_upcast` (SDXL's VAE overflows in f16), as diffusers does.
    pub fn vae_dtype(&self) -> DType {
        if self.dtype != DType::F32 && self.vae_config.force_upcast {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The dtype the VAE's matrices are held in: the model's matrix dtype when it was set
    /// apart from the arithmetic's ([`Model::with_matrix_dtype`]), else the VAE's own.
    pub fn vae_matrix_dtype(&self) -> DType {
        self.matrix_dtype
            .filter(|d| *d != self.dtype)
            .unwrap_or(self.vae_dtype())
    }

    fn vae_load_options(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.vae_dtype(),
            check_finite: self.check_weights,
            matrix_dtype: Some(self.vae_matrix_dtype()).filter(|d| *d != self.vae_dtype()),
            ..LoadOptions::default()
        }
    }

    /// The model's family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Whether the U-Net takes the masked image and mask as extra channels (9 inputs).
    pub fn is_inpainting(&self) -> bool {
        self.unet_config.in_channels == 9
    }

    /// The x4 upscaler's parts, for a `StableDiffusionUpscalePipeline` folder.
    pub fn upscaler(&self) -> Option<&UpscalerParts> {
        self.upscaler.as_ref()
    }

    /// The U-Net's configuration: `unet/config.json`, or the family's published one for a single
    /// file.
    pub fn unet_config(&self) -> &UNet2DConditionConfig {
        &self.unet_config
    }

    /// The VAE's configuration: `vae/config.json`, or the family's published one for a single file.
    pub fn vae_config(&self) -> &AutoencoderKlConfig {
        &self.vae_config
    }

    /// The model's own sampler configuration (`scheduler/scheduler_config.json`).
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Whether a missing negative prompt is encoded as zeros rather than as the empty prompt
    /// (`force_zeros_for_empty_prompt` of `model_index.json`; SDXL's default).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// Pixels per latent cell.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.downsample_factor()
    }

    /// The image side the model was trained at: the U-Net's sample size times the VAE factor,
    /// as diffusers' pipelines default it.
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size * self.vae_scale_factor()
    }

    /// The file or folder the model was opened from.
    pub fn path(&self) -> &Path {
        match &self.source {
            Source::Folder(dir) => dir,
            Source::SingleFile { path, .. } => path,
        }
    }

    /// A short hash for the PNG's parameters, as A1111's legacy "Model hash": SHA-256 of the
    /// 64 KiB at offset 1 MiB of the checkpoint (the U-Net's weights for a folder), 8 hex
    /// digits. Cheap on multi-gigabyte files.
    pub fn short_hash(&self) -> Option<String> {
        use sha2::Digest;
        use std::io::{Read, Seek, SeekFrom};
        let path = match &self.source {
            Source::Folder(dir) => {
                diffusers_weights_path(dir.join("unet"), self.variant.as_deref()).ok()?
            }
            Source::SingleFile { path, .. } => path.clone(),
        };
        let mut file = std::fs::File::open(path).ok()?;
        let mut buf = vec![0u8; 0x10000];
        let start = if file.metadata().ok()?.len() > 0x100000 {
            0x100000
        } else {
            0
        };
        file.seek(SeekFrom::Start(start)).ok()?;
        let n = file.read(&mut buf).ok()?;
        let digest = sha2::Sha256::digest(&buf[..n]);
        Some(digest.iter().take(4).map(|b| format!("{b:02x}")).collect())
    }

    /// The dtype the U-Net's weights are stored in (the first of its floating-point tensors),
    /// from the file's header alone: the natural dtype to write the model in again. `None`
    /// when the file cannot be read.
    pub fn stored_dtype(&self) -> Option<DType> {
        let (path, prefix) = match &self.source {
            Source::Folder(dir) => (
                diffusers_weights_path(dir.join("unet"), self.variant.as_deref()).ok()?,
                "",
            ),
            Source::SingleFile { path, .. } => (path.clone(), "model.diffusion_model."),
        };
        let file = SafetensorsFile::open_streaming(path).ok()?;
        file.entries()
            .iter()
            .find(|e| e.is_float() && e.key.starts_with(prefix))
            .map(|e| e.dtype)
    }

    fn single_file(&self) -> Result<SafetensorsFile> {
        match &self.source {
            Source::SingleFile { path, .. } => Ok(SafetensorsFile::open(path)?),
            Source::Folder(dir) => Err(model_error(dir, "not a single-file checkpoint")),
        }
    }

    /// Loads the text conditioner. `clip_skip` takes the output of an earlier layer
    /// (diffusers' `clip_skip`; 0 is the default layer of the family).
    pub fn load_conditioner<B: Backend>(
        &self,
        syntax: PromptSyntax,
        clip_skip: usize,
        device: &B::Device,
    ) -> Result<ClipConditioner<B>> {
        let conditioner = self.load_base_conditioner(syntax, clip_skip, device)?;
        if self.loras.is_empty() {
            return Ok(conditioner);
        }
        let (stages, syntax) = conditioner.into_parts();
        let mut merged = Vec::new();
        for (i, mut stage) in stages.into_iter().enumerate() {
            let component = if i == 0 {
                Component::TextEncoder
            } else {
                Component::TextEncoder2
            };
            stage.model = self.merge_loras(
                stage.model,
                component,
                &sd_conditioner::text_checkpoint_key,
                device,
            )?;
            merged.push(stage);
        }
        Ok(ClipConditioner::new(merged, syntax)?)
    }

    /// Loads the text conditioner for a generation: as [`Model::load_conditioner`], or (with
    /// [`LoraApplication::OnTheFly`]) with the LoRAs attached for as long as the second value
    /// lives.
    pub fn load_conditioner_with_loras<B: Backend>(
        &self,
        syntax: PromptSyntax,
        clip_skip: usize,
        device: &B::Device,
    ) -> Result<(ClipConditioner<B>, Vec<Attached>)> {
        if self.lora_application == LoraApplication::Merge {
            return Ok((
                self.load_conditioner(syntax, clip_skip, device)?,
                Vec::new(),
            ));
        }
        let conditioner = self.load_base_conditioner(syntax, clip_skip, device)?;
        let mut attached = Vec::new();
        for (i, stage) in conditioner.stages().iter().enumerate() {
            let component = if i == 0 {
                Component::TextEncoder
            } else {
                Component::TextEncoder2
            };
            attached.extend(self.attach_loras(
                &stage.model,
                component,
                &sd_conditioner::text_checkpoint_key,
                device,
            )?);
        }
        Ok((conditioner, attached))
    }

    /// The text conditioner as the model's files hold it (no LoRA).
    pub fn load_base_conditioner<B: Backend>(
        &self,
        syntax: PromptSyntax,
        clip_skip: usize,
        device: &B::Device,
    ) -> Result<ClipConditioner<B>> {
        let wiring = match self.family {
            ModelFamily::Sdxl => TextWiring::Dual { clip_skip },
            _ => TextWiring::Single { clip_skip },
        };
        match &self.source {
            Source::Folder(dir) => Ok(ClipConditioner::from_diffusers_with(
                dir,
                wiring,
                syntax,
                self.load_options(),
                device,
            )?),
            Source::SingleFile { layout, .. } => {
                let file = self.single_file()?;
                let configs = self.text_configs()?;
                let (final_norm, base_skip) = match self.family {
                    ModelFamily::Sdxl => (false, 1),
                    _ => (true, 0),
                };
                let layer = LayerChoice {
                    skip: base_skip + clip_skip.min(MAX_CLIP_SKIP),
                    final_norm,
                };
                let mut stages = Vec::new();
                for (i, (config, prefix)) in configs.iter().zip(&layout.text_prefixes).enumerate() {
                    stages.push(ClipStage {
                        tokenizer: self.tokenizer_source(i, config).open()?,
                        model: self.single_file_text_model(&file, prefix, config, i, device)?,
                        layer,
                    });
                }
                Ok(ClipConditioner::new(stages, syntax)?)
            }
        }
    }

    /// How many text encoders the model has: two for SDXL, else one.
    pub fn text_encoder_count(&self) -> usize {
        if self.family == ModelFamily::Sdxl {
            2
        } else {
            1
        }
    }

    /// The text encoders' configs in pipeline order (SDXL's projected one second): a folder's
    /// `text_encoder*/config.json`, those of a single file's config folder, or else the
    /// family's published ones (what the weights are loaded into).
    pub fn text_configs(&self) -> Result<Vec<ClipTextConfig>> {
        let dir = match &self.source {
            Source::Folder(dir) => dir,
            Source::SingleFile {
                config_dir: Some(dir),
                ..
            } => dir,
            Source::SingleFile {
                config_dir: None, ..
            } => return Ok(single_file::text_configs(self.family)),
        };
        (0..self.text_encoder_count())
            .map(|i| {
                let name = text_encoder_folder(i);
                Ok(ClipTextConfig::from_file(
                    dir.join(format!("{name}/config.json")),
                )?)
            })
            .collect()
    }

    /// Loads text encoder `index` (0, or 1 for SDXL's second) alone, without its tokenizer
    /// or the conditioner around it: what writing the model out needs, one tower at a time.
    pub fn load_text_encoder<B: Backend>(
        &self,
        index: usize,
        device: &B::Device,
    ) -> Result<ClipTextModel<B>> {
        let count = self.text_encoder_count();
        if index >= count {
            return Err(model_error(
                self.path(),
                format!("text encoder {index} asked for; the model has {count}"),
            ));
        }
        match &self.source {
            Source::Folder(dir) => Ok(ClipTextModel::from_pretrained_with(
                dir.join(text_encoder_folder(index)),
                self.load_options(),
                device,
            )?),
            Source::SingleFile { layout, .. } => {
                let file = self.single_file()?;
                let configs = self.text_configs()?;
                match (configs.get(index), layout.text_prefixes.get(index)) {
                    (Some(config), Some(prefix)) => {
                        self.single_file_text_model(&file, prefix, config, index, device)
                    }
                    _ => Err(model_error(
                        self.path(),
                        format!("no weights for text encoder {index} in the checkpoint"),
                    )),
                }
            }
        }
    }

    /// Text encoder `index` of a single file, from the keys under `prefix` (OpenCLIP's are
    /// converted to transformers' first). SDXL's second encoder has the projection.
    fn single_file_text_model<B: Backend>(
        &self,
        file: &SafetensorsFile,
        prefix: &TextPrefix,
        config: &ClipTextConfig,
        index: usize,
        device: &B::Device,
    ) -> Result<ClipTextModel<B>> {
        let projection = index == 1;
        let model = ClipTextModel::new(config, projection, device)?;
        Ok(if prefix.open_clip {
            let converted = sd_conditioner::open_clip_to_transformers(
                file,
                &prefix.prefix,
                config.num_hidden_layers,
                projection,
            )?;
            model.load_weights(&converted, self.load_options())?
        } else {
            model.load_weights_under(file, &prefix.prefix, self.load_options())?
        })
    }

    /// Where text encoder `index`'s tokenizer comes from, as the conditioner reads it: a
    /// folder's `tokenizer*/` (the built-in vocabulary when it has none), a single file's
    /// config folder's, or else the built-in vocabulary padded as the family pads.
    pub(crate) fn tokenizer_source(
        &self,
        index: usize,
        config: &ClipTextConfig,
    ) -> TokenizerSource {
        let name = if index == 0 {
            "tokenizer"
        } else {
            "tokenizer_2"
        };
        match &self.source {
            Source::Folder(dir) if dir.join(name).is_dir() => {
                TokenizerSource::Folder(dir.join(name))
            }
            // `ClipConditioner::from_diffusers_with` then pads with end-of-text.
            Source::Folder(_) => TokenizerSource::Embedded(Padding::EndOfText),
            Source::SingleFile {
                config_dir: Some(dir),
                ..
            } => TokenizerSource::Folder(dir.join(name)),
            Source::SingleFile {
                config_dir: None, ..
            } => TokenizerSource::Embedded(if config.hidden_act == HiddenAct::Gelu {
                Padding::Exclamation
            } else {
                Padding::EndOfText
            }),
        }
    }

    /// Adds LoRAs (each with its weight) to be merged into the U-Net and text encoders as they
    /// load. Each file must adapt only components the model has.
    pub fn with_loras(mut self, loras: Vec<(Arc<LoraFile>, f32)>) -> Result<Self> {
        for (file, _) in &loras {
            for component in file.components() {
                let present = match component {
                    Component::Unet | Component::TextEncoder => true,
                    Component::TextEncoder2 => self.text_encoder_count() == 2,
                };
                if !present {
                    return Err(SdError::Lora(sd_lora::LoraError::Format {
                        path: file.path.clone(),
                        reason: format!(
                            "adapts {}, which this {} model does not have",
                            component.name(),
                            self.family.name()
                        ),
                    }));
                }
            }
        }
        self.loras.extend(loras);
        Ok(self)
    }

    /// Merge LoRA layers whose module the model lacks by leaving them out (counted in a
    /// warning on standard error) instead of refusing the file.
    pub fn with_lora_ignore_unmatched(mut self, ignore: bool) -> Self {
        self.lora_options.ignore_unmatched = ignore;
        self
    }

    /// Whether generations merge the LoRAs into the weights or apply them on the fly.
    pub fn with_lora_application(mut self, application: LoraApplication) -> Self {
        self.lora_application = application;
        self
    }

    /// How generations apply the LoRAs.
    pub fn lora_application(&self) -> LoraApplication {
        self.lora_application
    }

    /// The LoRAs [`Model::with_loras`] added.
    pub fn loras(&self) -> &[(Arc<LoraFile>, f32)] {
        &self.loras
    }

    /// The LoRA files that adapt `component`, with their weights.
    fn loras_of(&self, component: Component) -> Vec<(&LoraFile, f32)> {
        self.loras
            .iter()
            .filter(|(f, _)| f.layers_of(component).next().is_some())
            .map(|(f, w)| (f.as_ref(), *w))
            .collect()
    }

    /// kohya's SDXL LoRAs name U-Net modules in the original layout: their names in ours
    /// (for the U-Net; `None` for the text encoders).
    fn kohya_rename(&self, component: Component) -> Option<OwnedRename> {
        let layers = match self.unet_config.layers_per_block {
            sd_unet::PerBlock::One(n) => Some(n),
            _ => None,
        };
        (component == Component::Unet).then(|| {
            Box::new(move |name: &str| sd_unet::kohya_ldm_to_diffusers(name, layers?)) as Box<_>
        })
    }

    fn warn_unmatched(component: Component, unmatched: &[String]) {
        if let Some(first) = unmatched.first() {
            eprintln!(
                "warning: {} LoRA layer(s) for {} match no module and were left out (first: {first})",
                unmatched.len(),
                component.name(),
            );
        }
    }

    /// Merges the LoRAs' layers for `component` into `module`.
    fn merge_loras<B: Backend, M: burn::module::Module<B>>(
        &self,
        module: M,
        component: Component,
        key: &dyn Fn(&str) -> Option<String>,
        device: &B::Device,
    ) -> Result<M> {
        let files = self.loras_of(component);
        if files.is_empty() {
            return Ok(module);
        }
        let rename = self.kohya_rename(component);
        let (module, merged) = sd_lora::merge(
            module,
            component,
            &files,
            key,
            rename.as_deref(),
            self.lora_options,
            device,
        )?;
        Self::warn_unmatched(component, &merged.unmatched);
        Ok(module)
    }

    /// Attaches the LoRAs' layers for `component` to `module` (applied at forward time until
    /// the returned value is dropped); `None` when no LoRA adapts it.
    fn attach_loras<B: Backend, M: burn::module::Module<B>>(
        &self,
        module: &M,
        component: Component,
        key: &dyn Fn(&str) -> Option<String>,
        device: &B::Device,
    ) -> Result<Option<Attached>> {
        let files = self.loras_of(component);
        if files.is_empty() {
            return Ok(None);
        }
        let rename = self.kohya_rename(component);
        let attached = sd_lora::attach(
            module,
            component,
            &files,
            key,
            rename.as_deref(),
            self.lora_options,
            device,
        )?;
        Self::warn_unmatched(component, &attached.unmatched);
        Ok(Some(attached))
    }

    /// Loads the U-Net for a generation: with the LoRAs merged in, or (with
    /// [`LoraApplication::OnTheFly`]) as the files hold it with the LoRAs attached for as long
    /// as the second value lives.
    pub fn load_unet_with_loras<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<(UNet2DConditionModel<B>, Option<Attached>)> {
        match self.lora_application {
            LoraApplication::Merge => Ok((self.load_unet(device)?, None)),
            LoraApplication::OnTheFly => {
                let unet = self.load_base_unet(device)?;
                let attached =
                    self.attach_loras(&unet, Component::Unet, &sd_unet::checkpoint_key, device)?;
                Ok((unet, attached))
            }
        }
    }

    /// Loads the U-Net, with the LoRAs of [`Model::with_loras`] merged in.
    pub fn load_unet<B: Backend>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>> {
        let unet = self.load_base_unet(device)?;
        self.merge_loras(unet, Component::Unet, &sd_unet::checkpoint_key, device)
    }

    /// Loads the U-Net as the model's files hold it (no LoRA).
    pub fn load_base_unet<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<UNet2DConditionModel<B>> {
        let unet = UNet2DConditionModel::new(&self.unet_config, device)?;
        Ok(match &self.source {
            Source::Folder(dir) => {
                let file = SafetensorsFile::open(diffusers_weights_path(
                    dir.join("unet"),
                    self.variant.as_deref(),
                )?)?;
                unet.load_weights(&file, self.load_options())?
            }
            Source::SingleFile { .. } => {
                let file = self.single_file()?;
                unet.load_single_file(&file, &self.unet_config, self.load_options())?
            }
        })
    }

    /// The folder's VAE weight file, or `None` for a single file (whose VAE keys each half maps
    /// from the original layout itself).
    fn vae_file(&self) -> Result<Option<SafetensorsFile>> {
        Ok(match &self.source {
            Source::Folder(dir) => Some(SafetensorsFile::open(diffusers_weights_path(
                dir.join("vae"),
                self.variant.as_deref(),
            )?)?),
            Source::SingleFile { .. } => None,
        })
    }

    /// Loads the VAE's decoder half.
    pub fn load_vae_decoder<B: Backend>(&self, device: &B::Device) -> Result<VaeDecoder<B>> {
        let decoder = VaeDecoder::new(&self.vae_config, device)?;
        let blocks = self.vae_config.block_out_channels.len();
        Ok(match self.vae_file()? {
            Some(file) => decoder.load_weights(&file, self.vae_load_options())?,
            None => {
                decoder.load_single_file(&self.single_file()?, blocks, self.vae_load_options())?
            }
        })
    }

    /// Loads the VAE's encoder half (img2img and inpainting).
    pub fn load_vae_encoder<B: Backend>(&self, device: &B::Device) -> Result<VaeEncoder<B>> {
        let encoder = VaeEncoder::new(&self.vae_config, device)?;
        let blocks = self.vae_config.block_out_channels.len();
        Ok(match self.vae_file()? {
            Some(file) => encoder.load_weights(&file, self.vae_load_options())?,
            None => {
                encoder.load_single_file(&self.single_file()?, blocks, self.vae_load_options())?
            }
        })
    }
}
