//! The Stable Diffusion x4 upscaler (diffusers' `StableDiffusionUpscalePipeline`): a latent
//! diffusion model whose U-Net reads, beside the latent, the low-resolution image itself,
//! noised to `noise_level` by its own schedule (noise augmentation, Ho et al. 2022, "Cascaded
//! Diffusion Models", sec. 4.1) and told that level as a class label. The latent has the
//! low-resolution image's size and the VAE (factor 4, scaling 0.08333) decodes it to four times
//! that.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_diffusion::NoiseSchedule;
use sd_schedulers::NoiseSource;

use crate::error::{Result, SdError};
use crate::finite::check_finite;
use crate::model::Model;
use crate::pipeline::{
    Denoiser, GenerateOptions, Generated, ImageConditioning, StepCallback, Task, decode_checked,
    encode_prompts, initial_latents,
};

/// The noise level diffusers' pipeline uses by default.
pub const DEFAULT_NOISE_LEVEL: usize = 20;

/// Upscales `image` (`[1, 3, h, w]` in `[-1, 1]`) four times with the x4 upscaler `model`,
/// guided by `options`' prompt, negative prompt, steps, guidance, sampler and number of images
/// (its size fields are ignored: the output is `4w × 4h`). Random numbers, in diffusers'
/// order: the low-resolution image's noise, the initial latents (unless given), the sampler's.
pub fn upscale_x4_with_noise<B: Backend>(
    model: &Model,
    options: &GenerateOptions,
    image: TensorData,
    noise_level: usize,
    device: &B::Device,
    noise: &mut dyn NoiseSource<B>,
    callback: Option<&mut StepCallback<'_, B>>,
) -> Result<Generated<B>> {
    let Some(parts) = model.upscaler() else {
        return Err(SdError::InvalidOptions(format!(
            "{} is not an x4 upscaler (a StableDiffusionUpscalePipeline folder)",
            model.path().display()
        )));
    };
    if noise_level > parts.max_noise_level {
        return Err(SdError::InvalidOptions(format!(
            "noise level {noise_level} is above the model's max_noise_level {}",
            parts.max_noise_level
        )));
    }
    let [n1, c, h, w] = match image.shape.as_slice() {
        [a, b, c, d] => [*a, *b, *c, *d],
        other => {
            return Err(SdError::InvalidOptions(format!(
                "the low-resolution image has shape {other:?}; expected [1, 3, height, width]"
            )));
        }
    };
    if n1 != 1 || c != 3 || h == 0 || w == 0 {
        return Err(SdError::InvalidOptions(format!(
            "the low-resolution image has shape [{n1}, {c}, {h}, {w}]; expected [1, 3, height, \
             width]"
        )));
    }
    if let Some(tiling) = &options.latent_tiling {
        tiling.check()?;
    }
    let f = model.vae_scale_factor();
    let options = GenerateOptions {
        width: Some(w * f),
        height: Some(h * f),
        // The low-resolution image is the start; given initial latents are kept.
        task: match &options.task {
            Task::Text { latents } => Task::Text {
                latents: latents.clone(),
            },
            _ => Task::default(),
        },
        controls: Vec::new(),
        image_prompt: None,
        ..options.clone()
    };
    let n = options.num_images;
    let (mut scheduler, sampler) = options.scheduler::<B>(model)?;
    scheduler.set_timesteps(options.sampling.steps)?;

    // The low-resolution image noised to `noise_level` by the low-res schedule.
    let image = Tensor::<B, 4>::from_data(image, device).cast(model.dtype());
    let image_noise = noise
        .standard_normal([1, 3, h, w], device)
        .cast(model.dtype());
    let schedule = NoiseSchedule::new(&parts.low_res_scheduler.noise_schedule())
        .map_err(|e| SdError::InvalidOptions(format!("low_res_scheduler: {e}")))?;
    let noised = schedule
        .add_noise(image, image_noise, &[noise_level])
        .map_err(|e| SdError::InvalidOptions(e.to_string()))?;

    let latents = initial_latents(model, &options, noise, device)? * scheduler.init_noise_sigma();
    let cond = encode_prompts::<B>(model, &options.prompt, &options.guidance, device)?;
    check_finite(&cond.conditioning.context, "the text encoder")?;
    let batch = n * if cond.guided { 2 } else { 1 };
    let image_cond = ImageConditioning {
        extra_channels: Some(Tensor::cat(vec![noised; batch], 0)),
        class_labels: Some(vec![noise_level; batch]),
        ..ImageConditioning::default()
    };
    let latents = {
        let unet = model.load_unet::<B>(device)?;
        Denoiser {
            unet: &unet,
            prompt: &cond,
            text_time: None,
            inpaint: None,
            image: &image_cond,
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
