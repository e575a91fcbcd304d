//! Text to image, as diffusers' `StableDiffusionPipeline` and `StableDiffusionXLPipeline` do
//! it: encode the prompt and the negative prompt, draw the initial latents, denoise with
//! classifier-free guidance (Ho & Salimans 2022), decode. Each component is loaded when its
//! stage starts and dropped when it ends, so peak memory stays near the largest one.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use sd_conditioner::{Conditioner, Conditioning, PromptSyntax};
use sd_core::image_io::check_image_size;
use sd_encoder::VaeEncoder;
use sd_schedulers::{HostNoise, NoiseSource, Scheduler, SchedulerConfig, img2img_start};
use sd_unet::{TextTimeConditioning, UNet2DConditionModel, UNetConditioning};

use crate::control::{Control, ControlStack};
use crate::image_prompt::ImagePrompt;
use crate::latent_tiles::LatentTiling;

use crate::error::{Result, SdError, model_error};
use crate::family::ModelFamily;
use crate::finite::{check_finite, non_finite_values};
use crate::model::{MAX_CLIP_SKIP, Model};

/// The largest image side accepted, in pixels: 16× SDXL's 1024 (what fits is then the memory
/// estimate's call, see [`crate::memory`]); beyond it sizes only overflow.
pub const MAX_SIDE: usize = 16384;
/// The most images one run generates (they are denoised as one batch).
pub const MAX_IMAGES: usize = 4096;
/// The most sampling steps one run takes (diffusers' schedules have 1000 training steps; a few
/// samplers accept more inference steps than that, none needs more than this).
pub const MAX_STEPS: usize = 10_000;
/// The largest guidance scale (or its negative) accepted: real use stays under 30, and a scale
/// beyond this only turns the latents infinite.
pub const MAX_GUIDANCE: f64 = 1000.0;

/// The prompt side of a generation: what [`encode_prompts`] reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptOptions {
    /// The prompt.
    pub text: String,
    /// `None`: the empty prompt (SDXL: zeros, when the model says `force_zeros_for_empty_prompt`).
    pub negative: Option<String>,
    /// Layers skipped at the end of the text encoder (diffusers' `clip_skip`).
    pub clip_skip: usize,
    /// How the prompts are read: A1111's weights and `BREAK`, or diffusers' plain text.
    pub syntax: PromptSyntax,
}

impl PromptOptions {
    /// `text` read with A1111's syntax, the empty negative prompt, no clip skip.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            ..Self::default()
        }
    }
}

impl From<&str> for PromptOptions {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl From<String> for PromptOptions {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

/// Classifier-free guidance (Ho & Salimans 2022): how [`Denoiser::run`] mixes the two halves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// The guidance scale; at most 1 skips the unconditional half.
    pub scale: f64,
    /// Rescales the guided prediction's deviation towards the conditional one's (Lin et al.
    /// 2023, sec. 3.4); 0 is off.
    pub rescale: f64,
}

impl Default for Guidance {
    fn default() -> Self {
        Self {
            scale: 7.5,
            rescale: 0.0,
        }
    }
}

impl Guidance {
    /// Whether the unconditional half runs (`scale > 1`).
    pub fn guided(&self) -> bool {
        self.scale > 1.0
    }
}

/// The sampler and its random draws.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// The number of sampling steps, 1 to [`MAX_STEPS`] (img2img runs the last
    /// `strength · steps` of them).
    pub steps: usize,
    /// The seed of every random draw of [`generate`]; image `i` of a batch draws from `seed + i`.
    pub seed: u64,
    /// A sampler name ([`sd_schedulers::known_names`]); `None`: the model's own scheduler.
    pub scheduler: Option<String>,
    /// Karras sigmas on whatever sampler is chosen.
    pub karras: bool,
    /// Replaces the model's `scheduler_config.json` (e.g. with fields overridden).
    pub config: Option<SchedulerConfig>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            steps: 20,
            seed: 0,
            scheduler: None,
            karras: false,
            config: None,
        }
    }
}

/// What a generation starts from: text alone, a starting image (img2img), or a starting image
/// and a mask (inpainting). One of the three, so that a mask without an image, or initial
/// latents with one, cannot be written.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// txt2img.
    Text {
        /// Initial latents `[num_images, channels, h/f, w/f]`, as diffusers' `latents=`:
        /// before the scheduler's initial sigma scales them; `None`: drawn from the seed.
        latents: Option<TensorData>,
    },
    /// img2img.
    Image(ImageTask),
    /// Inpainting.
    Inpaint(InpaintTask),
}

impl Default for Task {
    fn default() -> Self {
        Self::Text { latents: None }
    }
}

/// img2img: the starting image and how much of it is replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTask {
    /// The starting image `[1, 3, H, W]` in `[-1, 1]`; its size is the output size.
    pub image: TensorData,
    /// How much of the starting image is replaced, in `(0, 1]` (diffusers' `strength`: the run
    /// starts `strength · steps` steps before the end).
    pub strength: f64,
}

/// Inpainting: the starting image, the mask and how much of the masked region is replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct InpaintTask {
    /// The starting image `[1, 3, H, W]` in `[-1, 1]`; its size is the output size.
    pub image: TensorData,
    /// `[1, 1, H, W]` in `[0, 1]`, at least 0.5 where to paint (the image is kept elsewhere).
    pub mask: TensorData,
    /// As [`ImageTask::strength`]; 1 paints the masked region from pure noise.
    pub strength: f64,
}

impl Task {
    /// The starting image, if any.
    pub fn image(&self) -> Option<&TensorData> {
        match self {
            Self::Text { .. } => None,
            Self::Image(t) => Some(&t.image),
            Self::Inpaint(t) => Some(&t.image),
        }
    }

    /// The strength, for tasks that start from an image.
    pub fn strength(&self) -> Option<f64> {
        match self {
            Self::Text { .. } => None,
            Self::Image(t) => Some(t.strength),
            Self::Inpaint(t) => Some(t.strength),
        }
    }
}

/// SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MicroConditioning {
    /// `(height, width)` of the "original" image; `None`: the output size.
    pub original_size: Option<(usize, usize)>,
    /// The crop's `(top, left)` in pixels; `(0, 0)` for none.
    pub crops_coords_top_left: (usize, usize),
    /// `(height, width)` aimed at; `None`: the output size.
    pub target_size: Option<(usize, usize)>,
}

/// Everything a generation takes besides the model, grouped by the stage that reads it: the
/// prompt (text encoders), guidance and sampling (the loop), the task (the starting latents),
/// the output size, SDXL's micro-conditioning, memory tiling, and what steers the loop from
/// images.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The prompt and negative prompt, and how the text encoders read them.
    pub prompt: PromptOptions,
    /// Classifier-free guidance.
    pub guidance: Guidance,
    /// The sampler, its step count and seed.
    pub sampling: Sampling,
    /// txt2img, img2img or inpainting.
    pub task: Task,
    /// Image width in pixels; `None`: the model's own size (or the starting image's).
    pub width: Option<usize>,
    /// Image height in pixels; `None`: the model's own size (or the starting image's).
    pub height: Option<usize>,
    /// Images generated in one batch, 1 to [`MAX_IMAGES`].
    pub num_images: usize,
    /// SDXL's size and crop conditioning (ignored by other families).
    pub micro_conditioning: MicroConditioning,
    /// Decode in overlapping tiles: bounded memory for large images.
    pub vae_tiling: bool,
    /// Run the U-Net over overlapping latent tiles, blended (MultiDiffusion): memory follows the
    /// tile; the image differs a little from an untiled run's.
    pub latent_tiling: Option<LatentTiling>,
    /// ControlNets, each with its conditioning image, scale and step range; their residuals
    /// add up.
    pub controls: Vec<Control>,
    /// ControlNet guess mode: under guidance the ControlNets see only the conditional half,
    /// and their shallower residuals are scaled down (for prompts that do not describe the
    /// conditioning image, or none at all).
    pub guess_mode: bool,
    /// An IP-Adapter image prompt, with or without a text prompt.
    pub image_prompt: Option<ImagePrompt>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: PromptOptions::default(),
            guidance: Guidance::default(),
            sampling: Sampling::default(),
            task: Task::default(),
            width: None,
            height: None,
            num_images: 1,
            micro_conditioning: MicroConditioning::default(),
            vae_tiling: false,
            latent_tiling: None,
            controls: Vec::new(),
            guess_mode: false,
            image_prompt: None,
        }
    }
}

/// What the step callback sees after each sampler step.
pub struct StepProgress<'a, B: Backend> {
    /// Steps done (1-based) and in all.
    pub step: usize,
    /// All the steps of the schedule, including any img2img skips.
    pub total: usize,
    /// The timestep of the step just taken.
    pub timestep: f64,
    /// The latents after the step.
    pub latents: &'a Tensor<B, 4>,
    /// The sampler's estimate of the clean latents (for previews).
    pub predicted_clean: &'a Tensor<B, 4>,
}

/// Called after each step; returning `false` cancels the generation.
pub type StepCallback<'c, B> = dyn FnMut(&StepProgress<'_, B>) -> bool + 'c;

/// The result: images in `[-1, 1]` (`[n, 3, H, W]`) and the final latents.
pub struct Generated<B: Backend> {
    /// The decoded images.
    pub images: Tensor<B, 4>,
    /// The final latents, before the VAE's scaling is undone.
    pub latents: Tensor<B, 4>,
    /// The sampler's name as used (for the PNG parameters).
    pub sampler: String,
}

/// The conditioning of one generation, batched `[unconditional; conditional]` when guided.
pub struct PromptConditioning<B: Backend> {
    /// The text encoders' context (and SDXL's pooled embedding), unconditional half first when
    /// guided.
    pub conditioning: Conditioning<B>,
    /// Whether classifier-free guidance is on (`guidance_scale > 1`): the batch holds both halves.
    pub guided: bool,
}

impl GenerateOptions {
    /// The output size, checked against the VAE's factor: the starting image's, else the one
    /// asked for, else the model's own.
    pub fn size(&self, model: &Model) -> Result<(usize, usize)> {
        let side = model.default_size();
        let (w, h) = (self.width.unwrap_or(side), self.height.unwrap_or(side));
        for (name, v) in [("width", w), ("height", h)] {
            if v > MAX_SIDE {
                return Err(SdError::InvalidOptions(format!(
                    "{name} {v} is larger than the largest side supported, {MAX_SIDE} pixels"
                )));
            }
        }
        let (w, h) = match self.task.image() {
            Some(image) => {
                let (iw, ih) = match image.shape.as_slice() {
                    [1, 3, ih, iw] => (*iw, *ih),
                    other => {
                        return Err(SdError::InvalidOptions(format!(
                            "the starting image has shape {other:?}, not [1, 3, H, W]"
                        )));
                    }
                };
                if self.width.is_some_and(|x| x != iw) || self.height.is_some_and(|x| x != ih) {
                    return Err(SdError::InvalidOptions(format!(
                        "the starting image is {iw}×{ih}, not the {w}×{h} asked for"
                    )));
                }
                if iw > MAX_SIDE || ih > MAX_SIDE {
                    return Err(SdError::InvalidOptions(format!(
                        "the starting image is {iw}×{ih}; the largest side supported is \
                         {MAX_SIDE} pixels"
                    )));
                }
                (iw, ih)
            }
            None => (w, h),
        };
        check_image_size(w, h, model.vae_scale_factor())?;
        Ok((w, h))
    }

    fn check(&self, model: &Model) -> Result<()> {
        let steps = self.sampling.steps;
        if steps == 0 {
            return Err(SdError::InvalidOptions("steps must be at least 1".into()));
        }
        if steps > MAX_STEPS {
            return Err(SdError::InvalidOptions(format!(
                "{steps} steps is more than the {MAX_STEPS} supported"
            )));
        }
        if self.num_images == 0 {
            return Err(SdError::InvalidOptions(
                "the number of images must be at least 1".into(),
            ));
        }
        if self.num_images > MAX_IMAGES {
            return Err(SdError::InvalidOptions(format!(
                "{} images is more than the {MAX_IMAGES} one run supports",
                self.num_images
            )));
        }
        let Guidance { scale, rescale } = self.guidance;
        if !scale.is_finite() || scale.abs() > MAX_GUIDANCE {
            return Err(SdError::InvalidOptions(format!(
                "guidance {scale} is outside [-{MAX_GUIDANCE}, {MAX_GUIDANCE}]"
            )));
        }
        // diffusers' `rescale_noise_cfg` mixes by φ: a weight in [0, 1].
        if !(0.0..=1.0).contains(&rescale) {
            return Err(SdError::InvalidOptions(format!(
                "guidance rescale {rescale} is outside [0, 1]"
            )));
        }
        if self.prompt.clip_skip > MAX_CLIP_SKIP {
            return Err(SdError::InvalidOptions(format!(
                "clip skip {} is more than the {MAX_CLIP_SKIP} layers any text encoder has",
                self.prompt.clip_skip
            )));
        }
        if let Task::Text {
            latents: Some(latents),
        } = &self.task
        {
            let bad = non_finite_values(latents);
            if bad > 0 {
                return Err(SdError::InvalidOptions(format!(
                    "the initial latents hold {bad} NaN or infinite value(s)"
                )));
            }
        }
        if let Some(strength) = self.task.strength() {
            if !(0.0..=1.0).contains(&strength) {
                return Err(SdError::InvalidOptions(format!(
                    "strength {strength} is outside [0, 1]"
                )));
            }
            // diffusers' img2img and inpainting pipelines raise here too: strength 0 keeps the
            // image as it is and runs no step.
            if strength <= 0.0 {
                return Err(SdError::InvalidOptions(
                    "strength 0 runs no step and returns the starting image: use a strength \
                     in (0, 1]"
                        .into(),
                ));
            }
        }
        if model.is_inpainting() && !matches!(self.task, Task::Inpaint(_)) {
            return Err(SdError::InvalidOptions(
                "this is an inpainting model: it needs a starting image and a mask".into(),
            ));
        }
        let (w, h) = self.size(model)?;
        if let Task::Inpaint(InpaintTask { mask, .. }) = &self.task
            && mask.shape.as_slice() != [1, 1, h, w]
        {
            return Err(SdError::InvalidOptions(format!(
                "the mask has shape {:?}; the {w}×{h} image needs [1, 1, {h}, {w}]",
                mask.shape.as_slice()
            )));
        }
        for control in &self.controls {
            control.check(model, (w, h))?;
        }
        if let Some(prompt) = &self.image_prompt {
            prompt.check()?;
        }
        if let Some(tiling) = &self.latent_tiling {
            tiling.check()?;
        }
        Ok(())
    }

    /// The sampler: the model's own, or the named one configured from the model's
    /// `scheduler_config.json` (as `SchedulerClass.from_config(pipe.scheduler.config)`).
    pub fn scheduler<B: Backend>(&self, model: &Model) -> Result<(Box<dyn Scheduler<B>>, String)> {
        let mut config: SchedulerConfig = self
            .sampling
            .config
            .clone()
            .unwrap_or_else(|| model.scheduler_config().clone());
        if self.sampling.karras {
            config.use_karras_sigmas = true;
        }
        let name = self
            .sampling
            .scheduler
            .clone()
            .or_else(|| config.class_name.clone())
            .unwrap_or_else(|| "PNDMScheduler".into());
        let scheduler = sd_schedulers::from_name::<B>(&name, config)?;
        Ok((scheduler, name))
    }
}

/// Encodes the prompt (and, when guided, the negative prompt) with the model's text encoders,
/// which are dropped on return.
pub fn encode_prompts<B: Backend>(
    model: &Model,
    prompt: &PromptOptions,
    guidance: &Guidance,
    device: &B::Device,
) -> Result<PromptConditioning<B>> {
    // With LoRAs on the fly, `_loras` keeps them attached while the prompts encode.
    let (conditioner, _loras) =
        model.load_conditioner_with_loras::<B>(prompt.syntax, prompt.clip_skip, device)?;
    let guided = guidance.guided();
    let conditioning = if !guided {
        conditioner.encode(&[prompt.text.as_str()])?
    } else {
        let zero_negative = prompt.negative.is_none() && model.force_zeros_for_empty_prompt();
        let negative = prompt.negative.as_deref().unwrap_or("");
        let both = conditioner.encode(&[negative, prompt.text.as_str()])?;
        if zero_negative {
            let positive = split_conditioning(&both, 1);
            Conditioning::cat(vec![positive.zeros_like(), positive])?
        } else {
            both
        }
    };
    Ok(PromptConditioning {
        conditioning,
        guided,
    })
}

fn split_conditioning<B: Backend>(c: &Conditioning<B>, index: usize) -> Conditioning<B> {
    let [_, s, d] = c.context.dims();
    Conditioning {
        context: c.context.clone().slice([index..index + 1, 0..s, 0..d]),
        pooled: c.pooled.as_ref().map(|p| {
            let d = p.dims()[1];
            p.clone().slice([index..index + 1, 0..d])
        }),
    }
}

/// The initial latents `[n, c, h/f, w/f]`, before the scheduler's initial sigma: given by the
/// caller, or drawn from `noise`.
pub fn initial_latents<B: Backend>(
    model: &Model,
    options: &GenerateOptions,
    noise: &mut dyn NoiseSource<B>,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let (w, h) = options.size(model)?;
    let f = model.vae_scale_factor();
    let shape = [
        options.num_images,
        model.unet_config().out_channels,
        h / f,
        w / f,
    ];
    match &options.task {
        Task::Text {
            latents: Some(data),
        } => {
            if data.shape.as_slice() != shape.as_slice() {
                return Err(SdError::InvalidOptions(format!(
                    "initial latents have shape {:?}; {} image(s) of {w}×{h} need {shape:?}",
                    data.shape, options.num_images
                )));
            }
            Ok(
                Tensor::<B, 4>::from_data(data.clone().convert::<f32>(), device)
                    .cast(model.dtype()),
            )
        }
        _ => Ok(noise.standard_normal(shape, device)),
    }
}

/// SDXL's size and crop conditioning for a batch: `[unconditional; conditional]` when guided.
fn text_time<B: Backend>(
    micro: &MicroConditioning,
    size: (usize, usize),
    cond: &PromptConditioning<B>,
    images: usize,
) -> Result<Option<TextTimeConditioning<B>>> {
    let Some(pooled) = cond.conditioning.pooled.clone() else {
        return Ok(None);
    };
    let (w, h) = size;
    let (oh, ow) = micro.original_size.unwrap_or((h, w));
    let (ct, cl) = micro.crops_coords_top_left;
    let (th, tw) = micro.target_size.unwrap_or((h, w));
    let ids = [oh, ow, ct, cl, th, tw].map(|v| v as f64);
    let pooled = expand_halves(pooled, cond.guided, images);
    let batch = pooled.dims()[0];
    Ok(Some(TextTimeConditioning {
        text_embeds: pooled,
        time_ids: vec![ids; batch],
    }))
}

/// `[uncond; cond]` (or `[cond]`) of batch 1 each, to `[uncond × n; cond × n]`.
fn expand_halves<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    guided: bool,
    n: usize,
) -> Tensor<B, D> {
    if n == 1 {
        return t;
    }
    let halves = if guided { 2 } else { 1 };
    let parts: Vec<Tensor<B, D>> = (0..halves)
        .map(|i| {
            let one = t.clone().narrow(0, i, 1);
            Tensor::cat(vec![one; n], 0)
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// diffusers' `rescale_noise_cfg`: scale the guided prediction so its per-sample standard
/// deviation matches the conditional prediction's, then mix by `phi`.
fn rescale_guidance<B: Backend>(
    guided: Tensor<B, 4>,
    conditional: Tensor<B, 4>,
    phi: f64,
) -> Tensor<B, 4> {
    let std = |t: &Tensor<B, 4>| {
        let [b, c, h, w] = t.dims();
        let flat = t.clone().reshape([b, c * h * w]);
        let mean = flat.clone().mean_dim(1);
        let var = (flat - mean).powi_scalar(2).sum_dim(1) / ((c * h * w) as f64 - 1.0);
        var.sqrt().reshape([b, 1, 1, 1])
    };
    let rescaled = guided.clone() * (std(&conditional) / std(&guided));
    rescaled * phi + guided * (1.0 - phi)
}

/// What steers the loop from images besides the prompt: ControlNets and an IP-Adapter image
/// prompt.
pub struct ImageConditioning<B: Backend> {
    /// The ControlNets with their images.
    pub control: Option<ControlStack<B>>,
    /// IP-Adapter tokens for the whole batch (`[negative; image]` when guided), for a U-Net the
    /// adapter is attached to.
    pub image_tokens: Option<Tensor<B, 3>>,
    /// Channels concatenated to the scaled latents for the whole batch: the x4 upscaler's
    /// noised low-resolution image.
    pub extra_channels: Option<Tensor<B, 4>>,
    /// One class per sample of the whole batch: the x4 upscaler's noise level.
    pub class_labels: Option<Vec<usize>>,
}

impl<B: Backend> Default for ImageConditioning<B> {
    fn default() -> Self {
        Self {
            control: None,
            image_tokens: None,
            extra_channels: None,
            class_labels: None,
        }
    }
}

/// What inpainting adds to the loop.
pub struct InpaintLatents<B: Backend> {
    /// `[n, 1, h, w]` at latent resolution: 1 where to paint, 0 where to keep.
    pub mask: Tensor<B, 4>,
    /// 9-channel U-Nets: the latents of the image with the painted region blanked.
    pub masked_image_latents: Option<Tensor<B, 4>>,
    /// Ordinary U-Nets: the image's latents, put back outside the mask after every step,
    /// noised with `noise`.
    pub image_latents: Option<Tensor<B, 4>>,
    /// The noise the image's latents are noised with before being put back.
    pub noise: Tensor<B, 4>,
}

/// The denoising loop's fixed inputs: the U-Net and everything that steers its steps.
pub struct Denoiser<'a, B: Backend> {
    /// The U-Net (with any IP-Adapter attached).
    pub unet: &'a UNet2DConditionModel<B>,
    /// The text conditioning, `[unconditional; conditional]` when guided.
    pub prompt: &'a PromptConditioning<B>,
    /// SDXL's pooled embedding and size/crop ids for the whole batch.
    pub text_time: Option<&'a TextTimeConditioning<B>>,
    /// Inpainting's mask and image latents.
    pub inpaint: Option<&'a InpaintLatents<B>>,
    /// ControlNets, image-prompt tokens, extra channels and class labels.
    pub image: &'a ImageConditioning<B>,
    /// How the two halves are mixed.
    pub guidance: Guidance,
    /// U-Net tiles, when memory asks for them.
    pub latent_tiling: Option<LatentTiling>,
}

impl<B: Backend> Denoiser<'_, B> {
    /// The denoising loop from the scheduler's current step index: `latents` are at that
    /// step's noise level (txt2img: the initial noise times the initial sigma; img2img: the
    /// noised image).
    pub fn run(
        &self,
        scheduler: &mut dyn Scheduler<B>,
        latents: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
        mut callback: Option<&mut StepCallback<'_, B>>,
    ) -> Result<Tensor<B, 4>> {
        let Self {
            unet,
            prompt: cond,
            text_time,
            inpaint,
            image,
            guidance,
            latent_tiling,
        } = self;
        let (text_time, inpaint) = (*text_time, *inpaint);
        let n = latents.dims()[0];
        let halves = if cond.guided { 2 } else { 1 };
        // A 9-channel U-Net sees the mask and the masked image's latents next to the latents.
        let extra_channels = inpaint
            .and_then(|p| {
                p.masked_image_latents.as_ref().map(|masked| {
                    let both = Tensor::cat(vec![p.mask.clone(), masked.clone()], 1);
                    Tensor::cat(vec![both; halves], 0)
                })
            })
            .or_else(|| image.extra_channels.clone());
        let context = expand_halves(cond.conditioning.context.clone(), cond.guided, n);
        let mut latents = latents;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let first = scheduler.step_index();
        // U-Net tiles and their weights, once for the whole loop.
        let tiles = latent_tiling.map(|tiling| {
            let [.., h, w] = latents.dims();
            tiling.plan::<B>((h, w), latents.dtype(), &latents.device())
        });
        for (i, &t) in timesteps.iter().enumerate().skip(first) {
            let input = if cond.guided {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(input);
            let mut unet_cond = UNetConditioning {
                text_time,
                class_labels: image.class_labels.as_deref(),
                ..UNetConditioning::text(context.clone())
            };
            // ControlNets see the latents without an inpainting U-Net's extra channels, and count
            // steps from the first one run (diffusers' img2img ControlNet pipeline); the text
            // context without the image prompt's tokens.
            let residuals = match &image.control {
                Some(stack) => stack.residuals(
                    i - first,
                    total - first,
                    input.clone(),
                    t,
                    &unet_cond,
                    cond.guided,
                )?,
                None => None,
            };
            unet_cond.control = residuals.as_ref();
            unet_cond.image_prompt = image.image_tokens.clone();
            let input = match &extra_channels {
                Some(extra) => Tensor::cat(vec![input, extra.clone()], 1),
                None => input,
            };
            let prediction = match &tiles {
                Some(plan) => plan.predict(unet, input, t, &unet_cond)?,
                None => unet.forward_conditioned(input, &[t], &unet_cond)?,
            };
            let prediction = if cond.guided {
                let uncond = prediction.clone().narrow(0, 0, n);
                let text = prediction.narrow(0, n, n);
                let guided = uncond.clone() + (text.clone() - uncond) * guidance.scale;
                if guidance.rescale > 0.0 {
                    rescale_guidance(guided, text, guidance.rescale)
                } else {
                    guided
                }
            } else {
                prediction
            };
            let out = scheduler.step(prediction, latents, noise)?;
            latents = out.prev_sample;
            check_finite(&latents, &format!("U-Net step {} of {total}", i + 1))?;
            // An ordinary U-Net paints everywhere: put the image back outside the mask, noised to
            // the next step's level (clean after the last step).
            if let Some(InpaintLatents {
                mask,
                image_latents: Some(image),
                noise: added,
                ..
            }) = inpaint
            {
                let kept = if i + 1 < total {
                    scheduler.add_noise(image.clone(), added.clone())?
                } else {
                    image.clone()
                };
                latents = kept * (mask.clone().neg() + 1.0) + latents * mask.clone();
            }
            if let Some(cb) = callback.as_deref_mut() {
                let progress = StepProgress {
                    step: i + 1,
                    total,
                    timestep: t,
                    latents: &latents,
                    predicted_clean: &out.pred_original_sample,
                };
                if !cb(&progress) {
                    return Err(SdError::Cancelled(i + 1));
                }
            }
        }
        Ok(latents)
    }
}

/// Text to image with the seeded noise of `options.sampling.seed`.
pub fn generate<B: Backend>(
    model: &Model,
    options: &GenerateOptions,
    device: &B::Device,
    callback: Option<&mut StepCallback<'_, B>>,
) -> Result<Generated<B>> {
    let mut noise = HostNoise::per_image(options.sampling.seed, options.num_images);
    generate_with_noise(model, options, device, &mut noise, callback)
}

/// Text to image drawing every random number (initial latents unless given, stochastic
/// samplers' noise) from `noise`.
pub fn generate_with_noise<B: Backend>(
    model: &Model,
    options: &GenerateOptions,
    device: &B::Device,
    noise: &mut dyn NoiseSource<B>,
    callback: Option<&mut StepCallback<'_, B>>,
) -> Result<Generated<B>> {
    if model.upscaler().is_some() {
        return Err(SdError::InvalidOptions(
            "this is the Stable Diffusion x4 upscaler: it enlarges an image (sd upscale IMAGE \
             --model DIR, or sd::upscale_x4)"
                .into(),
        ));
    }
    options.check(model)?;
    let size = options.size(model)?;
    // Everything that can fail on the options before any weights are read.
    let (mut scheduler, sampler) = options.scheduler::<B>(model)?;
    let steps = options.sampling.steps;
    scheduler.set_timesteps(steps)?;
    if let Some(strength) = options.task.strength() {
        let begin = img2img_start(steps, strength)? * scheduler.order();
        if begin >= scheduler.timesteps().len() {
            return Err(SdError::InvalidOptions(format!(
                "strength {strength} leaves no step of {steps} to run"
            )));
        }
        scheduler.set_begin_index(begin)?;
    }
    let n = options.num_images;
    let (latents, inpaint) = match &options.task {
        Task::Text { .. } => (
            initial_latents(model, options, noise, device)? * scheduler.init_noise_sigma(),
            None,
        ),
        Task::Image(task) => (
            noised_image_latents(model, task, n, scheduler.as_ref(), noise, device)?,
            None,
        ),
        Task::Inpaint(task) => {
            let (latents, inpaint) =
                inpainting_latents(model, task, n, scheduler.as_ref(), noise, device)?;
            (latents, Some(inpaint))
        }
    };

    let cond = encode_prompts::<B>(model, &options.prompt, &options.guidance, device)?;
    check_finite(&cond.conditioning.context, "the text encoder")?;
    if let Some(pooled) = &cond.conditioning.pooled {
        check_finite(pooled, "the text encoder's pooled output")?;
    }
    let text_time = text_time(&options.micro_conditioning, size, &cond, options.num_images)?;
    if model.family() == ModelFamily::Sdxl && text_time.is_none() {
        return Err(SdError::InvalidOptions(
            "an SDXL model needs a pooled text embedding".into(),
        ));
    }
    let latents = {
        // The image prompt's encoder runs (and is dropped) before the U-Net loads.
        // With LoRAs on the fly, `_loras` keeps them attached until the latents are done.
        let (unet, _loras, image_tokens) = match &options.image_prompt {
            Some(prompt) => {
                let (adapter, tokens) =
                    prompt.encode::<B>(model, options.num_images, cond.guided, device)?;
                let (unet, loras) = model.load_unet_with_loras::<B>(device)?;
                let unet = unet
                    .with_ip_adapter(&adapter, prompt.scale)
                    .map_err(|e| model_error(&prompt.adapter, e.to_string()))?;
                (unet, loras, Some(tokens))
            }
            None => {
                let (unet, loras) = model.load_unet_with_loras::<B>(device)?;
                (unet, loras, None)
            }
        };
        let image = ImageConditioning {
            control: ControlStack::load(
                model,
                &options.controls,
                options.guess_mode,
                options.num_images,
                cond.guided,
                device,
            )?,
            image_tokens,
            ..ImageConditioning::default()
        };
        Denoiser {
            unet: &unet,
            prompt: &cond,
            text_time: text_time.as_ref(),
            inpaint: inpaint.as_ref(),
            image: &image,
            guidance: options.guidance,
            latent_tiling: options.latent_tiling,
        }
        .run(scheduler.as_mut(), latents, noise, callback)?
    };
    drop(cond);
    let images = decode_checked(model, latents.clone(), options.vae_tiling, device)?;
    Ok(Generated {
        images,
        latents,
        sampler,
    })
}

/// [`decode`], checked for NaN and ±∞: a half-precision VAE can overflow where f32 does not
/// (diffusers' `force_upcast` and `needs_upcasting`), so it decodes again in f32 before giving
/// up.
pub(crate) fn decode_checked<B: Backend>(
    model: &Model,
    latents: Tensor<B, 4>,
    tiling: bool,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let images = decode(model, latents.clone(), tiling, device)?;
    match check_finite(&images, "the VAE decoder") {
        Err(_) if model.vae_dtype() != DType::F32 => {
            let upcast = model.clone().with_vae_upcast();
            let images = decode(&upcast, latents, tiling, device)?;
            check_finite(&images, "the VAE decoder (in f32)")?;
            Ok(images)
        }
        other => other.map(|()| images),
    }
}

/// `scaling_factor · (posterior sample)` of images, in the VAE's dtype (f32 when upcast),
/// returned in the model's.
fn encode_sample<B: Backend>(
    model: &Model,
    encoder: &VaeEncoder<B>,
    images: Tensor<B, 4>,
    noise: &mut dyn NoiseSource<B>,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let posterior = encoder.encode(images.cast(model.vae_dtype()))?;
    let shape = posterior.mean.dims();
    let draw = noise.standard_normal(shape, device).cast(model.vae_dtype());
    Ok(encoder
        .scale_latents(posterior.sample(draw))
        .cast(model.dtype()))
}

/// img2img's starting point: the image encoded (a posterior sample, scaled), then noised to
/// the level of the first step to run. Draws the posterior noise, then the added noise.
pub fn noised_image_latents<B: Backend>(
    model: &Model,
    task: &ImageTask,
    num_images: usize,
    scheduler: &dyn Scheduler<B>,
    noise: &mut dyn NoiseSource<B>,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let image =
        Tensor::<B, 4>::from_data(task.image.clone().convert::<f32>(), device).cast(model.dtype());
    let image = Tensor::cat(vec![image; num_images], 0);
    let encoder = model.load_vae_encoder::<B>(device)?;
    let latents = encode_sample(model, &encoder, image, noise, device)?;
    drop(encoder);
    let shape = latents.dims();
    let added = noise.standard_normal(shape, device);
    Ok(scheduler.add_noise(latents, added)?)
}

/// Inpainting's starting latents and loop inputs, as diffusers' `StableDiffusionInpaintPipeline`
/// prepares them: the mask binarised at 0.5 and taken to latent size by nearest neighbour, the
/// masked image (painted region zeroed) encoded. Random draws, in diffusers' order: the image's
/// posterior sample (ordinary U-Nets, or strength below 1), the initial noise, the masked
/// image's posterior sample.
pub fn inpainting_latents<B: Backend>(
    model: &Model,
    task: &InpaintTask,
    num_images: usize,
    scheduler: &dyn Scheduler<B>,
    noise: &mut dyn NoiseSource<B>,
    device: &B::Device,
) -> Result<(Tensor<B, 4>, InpaintLatents<B>)> {
    let InpaintTask {
        image,
        mask,
        strength,
    } = task;
    let n = num_images;
    let image =
        Tensor::<B, 4>::from_data(image.clone().convert::<f32>(), device).cast(model.dtype());
    let image = Tensor::cat(vec![image; n], 0);
    let mask = Tensor::<B, 4>::from_data(mask.clone().convert::<f32>(), device).cast(model.dtype());
    let mask = mask.greater_equal_elem(0.5).float();
    let mask = Tensor::cat(vec![mask; n], 0);
    let masked_image = image.clone() * (mask.clone().neg() + 1.0);
    let f = model.vae_scale_factor();
    let [_, _, h, w] = image.dims();
    // Nearest-neighbour down-sampling by an integer factor takes every f-th pixel.
    let mask_latent = mask
        .reshape([n, 1, h / f, f, w / f, f])
        .narrow(3, 0, 1)
        .narrow(5, 0, 1)
        .reshape([n, 1, h / f, w / f]);
    let nine_channels = model.is_inpainting();
    let strength_max = *strength >= 1.0;
    let encoder = model.load_vae_encoder::<B>(device)?;
    let encode = |x: Tensor<B, 4>, noise: &mut dyn NoiseSource<B>| {
        encode_sample(model, &encoder, x, noise, device)
    };
    let image_latents = if !nine_channels || !strength_max {
        Some(encode(image, noise)?)
    } else {
        None
    };
    let latent_shape = [n, model.unet_config().out_channels, h / f, w / f];
    let initial = noise.standard_normal(latent_shape, device);
    let latents = match (&image_latents, strength_max) {
        (Some(image_latents), false) => {
            scheduler.add_noise(image_latents.clone(), initial.clone())?
        }
        _ => initial.clone() * scheduler.init_noise_sigma(),
    };
    let masked_image_latents = encode(masked_image, noise)?;
    drop(encoder);
    Ok((
        latents,
        InpaintLatents {
            mask: mask_latent,
            masked_image_latents: nine_channels.then_some(masked_image_latents),
            image_latents: if nine_channels { None } else { image_latents },
            noise: initial,
        },
    ))
}

/// Images in `[-1, 1]` through the VAE and back: encoded to their posterior's mode (no
/// sampling noise), decoded. The most a diffusion model on this VAE could draw of them.
pub fn reconstruct<B: Backend>(
    model: &Model,
    images: Tensor<B, 4>,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let encoder = model.load_vae_encoder::<B>(device)?;
    let latents = encoder.encode(images.cast(model.vae_dtype()))?.mode();
    drop(encoder);
    let vae = model.load_vae_decoder::<B>(device)?;
    Ok(vae.decode(latents)?.cast(DType::F32))
}

/// Latents (as the sampler leaves them) to images in `[-1, 1]`.
pub fn decode<B: Backend>(
    model: &Model,
    latents: Tensor<B, 4>,
    tiled: bool,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let vae = model.load_vae_decoder::<B>(device)?.with_tiling(tiled);
    let z = vae.unscale_latents(latents.cast(model.vae_dtype()));
    Ok(vae.decode(z)?.cast(DType::F32))
}
