//! `train_config.json`: every setting of a run, with diffusers' `train_text_to_image.py`
//! defaults. The resolved config is saved in the output folder, and a resume checks that the
//! settings that shape the result have not changed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::adamw::AdamWConfig;
use crate::error::{Result, TrainError};
use crate::lr::LrScheduleKind;

/// What `sd train unet` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The data folder (see `sd-data` for the layouts).
    pub data: PathBuf,
    /// The caption field of a `metadata.jsonl` (`text` by default).
    pub caption_column: Option<String>,
    /// Leave out images that cannot be read (counted in a warning) instead of stopping.
    pub skip_bad_images: bool,
    /// Where the run writes: checkpoints, logs and, at the end, a diffusers folder.
    pub output: PathBuf,
    /// The model fine-tuned: a diffusers folder (or anything `sd generate --model` takes).
    pub model: Option<String>,
    /// Train from scratch: random U-Net weights from this folder's `unet/config.json`, the
    /// other components from `model`.
    pub init: Option<PathBuf>,
    /// Encode each image once and keep its VAE posterior under `output/latent_cache/`
    /// (needs centre crops and no flips; with buckets, each image at its bucket's size).
    pub cache_latents: bool,
    /// Keep the frozen text encoder's output for each caption under `output/text_cache/`
    /// (not with `train_text_encoder`, whose outputs change every step).
    pub cache_text_embeddings: bool,
    /// Train the text encoder too (its own AdamW state, one gradient norm over both).
    pub train_text_encoder: bool,
    /// Recompute activations in the backward pass instead of keeping them all (Burn's
    /// `BalancedCheckpointing`): less memory for more time.
    pub gradient_checkpointing: bool,
    /// Optimiser steps.
    pub max_steps: u64,
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimiser step.
    pub gradient_accumulation: usize,
    /// The base learning rate (AdamW's), in `[0, 1)`.
    pub learning_rate: f64,
    /// The text encoder's own base learning rate (kohya's `--text_encoder_lr`), on the same
    /// schedule; `None`: `learning_rate`.
    pub text_encoder_lr: Option<f64>,
    /// The learning-rate schedule (diffusers' `--lr_scheduler`).
    pub lr_scheduler: LrScheduleKind,
    /// Steps of linear warm-up from 0 to `learning_rate` (ignored by `constant`).
    pub lr_warmup_steps: u64,
    /// The square image side trained at (with buckets: the area is `resolution²`).
    pub resolution: u32,
    /// Aspect-ratio buckets (kohya's `--enable_bucket`), `None` for square crops.
    #[serde(with = "bucket_serde")]
    pub bucket: Option<sd_data::BucketConfig>,
    /// Crop the centre of each image rather than a random square (diffusers' `--center_crop`).
    pub center_crop: bool,
    /// Mirror each image left-right with probability ½ (`--random_flip`).
    pub random_flip: bool,
    /// The seed of every random draw of the run: data order, noise, timesteps.
    pub seed: u64,
    /// `epsilon`, `v_prediction` or `sample`; the model's scheduler config decides when unset.
    pub prediction_type: Option<String>,
    /// Min-SNR-γ loss weighting (5 is the paper's recommendation); unset for plain MSE.
    pub snr_gamma: Option<f64>,
    /// The smallest training timestep (kohya's `--min_timestep`), inclusive.
    pub min_timestep: usize,
    /// The largest training timestep, exclusive (kohya's `--max_timestep`); `None`: the
    /// schedule's `num_train_timesteps`.
    pub max_timestep: Option<usize>,
    /// Offset noise (`--noise_offset`): the scale of a per-channel constant added to ε; 0 turns it
    /// off.
    pub noise_offset: f64,
    /// Input perturbation (`--input_perturbation`): the scale of extra noise on the noised latents
    /// only; 0 turns it off.
    pub input_perturbation: f64,
    /// Probability of training on the empty caption.
    pub caption_dropout: f64,
    /// Probability of replacing a caption's end-of-text token and the padding after it by the
    /// empty caption's (`--summary-dropout`): those positions attend to the whole caption, and
    /// a U-Net that reads the scene from them alone sees an unseen combination of words as a
    /// whole it never met; dropping them makes it read the words.
    pub summary_dropout: f64,
    /// Clip gradients to this global norm.
    pub max_grad_norm: f64,
    /// `no`, `f16` or `bf16` (accelerate's `--mixed_precision`): the trained models' forward
    /// and backward passes in that precision, their weights, optimiser and loss in f32.
    pub mixed_precision: crate::precision::MixedPrecision,
    /// Data-parallel peers (threads) on each node (`--devices`); `batch_size` is per peer.
    pub devices: usize,
    /// Nodes (processes, usually on several machines) training together (`--nodes`).
    pub nodes: usize,
    /// The dynamic loss scaler of an f16 run (`torch.amp.GradScaler`'s settings and defaults).
    pub grad_scaler: crate::grad_scaler::GradScalerConfig,
    /// AdamW's settings.
    pub adam: AdamWConfig,
    /// Keep an EMA of the U-Net's weights with this decay (diffusers' `--use_ema`); the final
    /// folder then holds the EMA weights, as diffusers saves them.
    pub ema_decay: Option<f64>,
    /// `sd train vae`: the reconstruction penalty.
    pub reconstruction: crate::vae::Reconstruction,
    /// `sd train vae`: the KL term's weight (the latent diffusion paper's 1e-6).
    pub kl_weight: f64,
    /// `sd train vae`: the latent diffusion paper's adversarial term against a patch
    /// discriminator, from `start` on (`--discriminator-start`); `None` trains on
    /// reconstruction and KL alone.
    pub discriminator: Option<crate::discriminator::DiscriminatorConfig>,
    /// Prompts rendered (fixed seed, the model's own sampler) into `samples/step-<n>/` every
    /// `validation_every` steps and at the end, to watch training.
    pub validation_prompts: Vec<String>,
    /// Steps between validation renders (0: only at the end).
    pub validation_every: u64,
    /// Sampling steps of a validation render.
    pub validation_steps: usize,
    /// `sd train vae`: at the end, set the config's `scaling_factor` to 1 / the standard
    /// deviation of posterior samples over (up to 512 of) the training images, so that the
    /// U-Net sees unit-variance latents (how Stable Diffusion's 0.18215 was chosen).
    pub fit_scaling_factor: bool,
    /// `sd train vae`: train the decoder alone, the encoder frozen, so that the latents (and
    /// a U-Net trained on them) stay valid: how Stability's ft-EMA / ft-MSE decoders were
    /// made for SD 1.x.
    pub decoder_only: bool,
    /// Write `checkpoint-<step>/` every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// How many checkpoints to keep (the oldest go first; 0 keeps all).
    pub keep: usize,
    /// Train a LoRA beside the frozen U-Net (and text encoder, with `train_text_encoder`)
    /// instead of their weights (`--lora-rank`); `None` trains the weights.
    pub lora: Option<LoraConfig>,
}

/// A LoRA run's settings (`--lora-rank`, `--lora-alpha`, `--lora-targets`, `--lora-init`,
/// `--lora-format`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank `r` of every pair of factors.
    pub rank: usize,
    /// The alpha `α` (updates scaled by `α / r`); `None` is the rank, as diffusers' scripts
    /// set it (kohya's sd-scripts default to 1).
    pub alpha: Option<f32>,
    /// `kohya` (every linear layer and 1×1 convolution of the transformer blocks; the text
    /// encoder's attention and MLP), `diffusers` (the attention projections), or module names.
    pub targets: String,
    /// `kohya` (Kaiming-uniform down, PEFT's default too) or `gaussian` (diffusers' scripts).
    pub init: String,
    /// The file written at the end: `kohya` (`lora.safetensors`, what A1111, ComfyUI and
    /// stable-diffusion.cpp load) or `diffusers` (`pytorch_lora_weights.safetensors`).
    pub format: String,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: None,
            targets: "kohya".into(),
            init: "kohya".into(),
            format: "kohya".into(),
        }
    }
}

impl LoraConfig {
    /// `alpha`, or the rank when unset.
    pub fn alpha(&self) -> f32 {
        self.alpha.unwrap_or(self.rank as f32)
    }

    /// The targets, parsed.
    pub fn target_set(&self) -> Result<sd_lora::TargetSet> {
        Ok(sd_lora::TargetSet::parse(&self.targets)?)
    }

    /// The initialisation, parsed.
    pub fn init_kind(&self) -> Result<sd_lora::LoraInit> {
        Ok(sd_lora::LoraInit::parse(&self.init)?)
    }

    /// The final file's name in the output folder.
    pub fn file_name(&self) -> &'static str {
        if self.format == "diffusers" {
            "pytorch_lora_weights.safetensors"
        } else {
            "lora.safetensors"
        }
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(TrainError::Config(format!(
                "--lora-rank must be from 1 to 1024, got {}",
                self.rank
            )));
        }
        if let Some(a) = self.alpha
            && !(a.is_finite() && a > 0.0)
        {
            return Err(TrainError::Config(format!(
                "--lora-alpha must be positive, got {a}"
            )));
        }
        self.target_set()?;
        self.init_kind()?;
        if !matches!(self.format.as_str(), "kohya" | "diffusers") {
            return Err(TrainError::Config(format!(
                "--lora-format must be kohya or diffusers, got `{}`",
                self.format
            )));
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::new(),
            caption_column: None,
            skip_bad_images: false,
            output: PathBuf::new(),
            model: None,
            init: None,
            train_text_encoder: false,
            cache_latents: false,
            cache_text_embeddings: false,
            gradient_checkpointing: false,
            max_steps: 1000,
            batch_size: 1,
            gradient_accumulation: 1,
            learning_rate: 1e-4,
            text_encoder_lr: None,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            resolution: 512,
            bucket: None,
            center_crop: true,
            random_flip: false,
            seed: 0,
            prediction_type: None,
            snr_gamma: None,
            min_timestep: 0,
            max_timestep: None,
            noise_offset: 0.0,
            input_perturbation: 0.0,
            caption_dropout: 0.0,
            summary_dropout: 0.0,
            max_grad_norm: 1.0,
            mixed_precision: Default::default(),
            grad_scaler: Default::default(),
            devices: 1,
            nodes: 1,
            adam: AdamWConfig::default(),
            ema_decay: None,
            reconstruction: crate::vae::Reconstruction::L1,
            kl_weight: 1e-6,
            discriminator: None,
            fit_scaling_factor: false,
            decoder_only: false,
            validation_prompts: Vec::new(),
            validation_every: 0,
            validation_steps: 20,
            checkpoint_every: 500,
            keep: 0,
            lora: None,
        }
    }
}

impl TrainConfig {
    /// Reads a JSON config (`train_config.json`; every field optional).
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| TrainError::Config(format!("train config: {e}")))
    }

    /// Reads a TOML config (`train.toml`; the same fields as the JSON, every one optional).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            // One line: the line number and the message, not the multi-line excerpt.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            TrainError::Config(format!("train config: {at}{}", e.message().trim()))
        })
    }

    /// The config as JSON, every field written.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks each value against its meaning, naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.model.is_none() && self.init.is_none() {
            return bad("no model to train: give --model (a diffusers folder) or --init".into());
        }
        if self.decoder_only && self.fit_scaling_factor {
            return bad(
                "--decoder-only keeps the encoder and so its latents: --fit-scaling-factor would \
                 change what the U-Net sees"
                    .into(),
            );
        }
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return bad(format!("--kl-weight must be ≥ 0, got {}", self.kl_weight));
        }
        if let Some(d) = &self.discriminator {
            d.validate()?;
        }
        if self.cache_text_embeddings && self.train_text_encoder {
            return bad(
                "--cache-text-embeddings keeps a frozen text encoder's outputs: not with \
                 --train-text-encoder, which changes them every step"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.summary_dropout) {
            return bad(format!(
                "--summary-dropout must be in [0, 1], got {}",
                self.summary_dropout
            ));
        }
        if self.max_steps == 0 {
            return bad("--max-steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return bad(format!(
                "--batch-size must be from 1 to 4096, got {}",
                self.batch_size
            ));
        }
        if self.gradient_accumulation == 0 || self.gradient_accumulation > 4096 {
            return bad(format!(
                "--gradient-accumulation must be from 1 to 4096, got {}",
                self.gradient_accumulation
            ));
        }
        for (name, rate) in [
            ("--learning-rate", Some(self.learning_rate)),
            ("--text-encoder-lr", self.text_encoder_lr),
        ] {
            let Some(rate) = rate else { continue };
            if !(rate.is_finite() && (0.0..1.0).contains(&rate)) {
                return bad(format!("{name} must be in [0, 1), got {rate}"));
            }
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad(format!(
                "--max-grad-norm must be positive, got {}",
                self.max_grad_norm
            ));
        }
        self.grad_scaler.validate()?;
        if self.devices == 0 || self.devices > 256 || self.nodes == 0 || self.nodes > 4096 {
            return bad(format!(
                "--devices must be from 1 to 256 and --nodes from 1 to 4096, got {} and {}",
                self.devices, self.nodes
            ));
        }
        if let Some(g) = self.snr_gamma
            && !(g.is_finite() && g > 0.0)
        {
            return bad(format!("--snr-gamma must be positive, got {g}"));
        }
        if let Some(max) = self.max_timestep
            && max <= self.min_timestep
        {
            return bad(format!(
                "--max-timestep ({max}) must be more than --min-timestep ({})",
                self.min_timestep
            ));
        }
        for (name, v) in [
            ("--noise-offset", self.noise_offset),
            ("--input-perturbation", self.input_perturbation),
        ] {
            if !(v.is_finite() && (0.0..=10.0).contains(&v)) {
                return bad(format!("{name} must be in [0, 10], got {v}"));
            }
        }
        if let Some(d) = self.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return bad(format!("--ema-decay must be in [0, 1), got {d}"));
        }
        if let Some(p) = &self.prediction_type
            && !matches!(p.as_str(), "epsilon" | "v_prediction" | "sample")
        {
            return bad(format!(
                "--prediction-type must be epsilon, v_prediction or sample, got `{p}`"
            ));
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
            if self.init.is_some() {
                return bad(
                    "--lora-rank adapts a trained model; --init trains one from scratch".into(),
                );
            }
            if self.ema_decay.is_some() {
                return bad("--ema-decay is for full training, not --lora-rank".into());
            }
        }
        self.adam.validate()
    }
}

/// `bucket` as `{resolution, min_size, max_size, step, no_upscale}` or `null`.
mod bucket_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Bucket {
        resolution: u32,
        min_size: u32,
        max_size: u32,
        step: u32,
        no_upscale: bool,
    }

    pub fn serialize<S: Serializer>(
        value: &Option<sd_data::BucketConfig>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .map(|b| Bucket {
                resolution: b.resolution,
                min_size: b.min_size,
                max_size: b.max_size,
                step: b.step,
                no_upscale: b.no_upscale,
            })
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<sd_data::BucketConfig>, D::Error> {
        Ok(
            Option::<Bucket>::deserialize(d)?.map(|b| sd_data::BucketConfig {
                resolution: b.resolution,
                min_size: b.min_size,
                max_size: b.max_size,
                step: b.step,
                no_upscale: b.no_upscale,
            }),
        )
    }
}
