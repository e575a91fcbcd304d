//! `sd upscale IMAGE --model FILE|DIR`: Real-ESRGAN after the decoder, on any image, or the
//! Stable Diffusion x4 upscaler (a diffusers `StableDiffusionUpscalePipeline` folder) guided by
//! a prompt.

use std::path::{Path, PathBuf};

use clap::Args;
use sd_upscale::{TileOptions, Upscaler};

type B = sd::backend::Flex;

#[derive(Args)]
pub struct UpscaleArgs {
    /// The image to enlarge (PNG, JPEG or WebP).
    image: PathBuf,
    /// A Real-ESRGAN model: `RealESRGAN_x4plus.pth`, `RealESRGAN_x2plus.pth`,
    /// `realesr-general-x4v3.pth`, the anime models, or a .safetensors with the same keys; or
    /// the Stable Diffusion x4 upscaler's diffusers folder (`stable-diffusion-x4-upscaler`).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// x4 upscaler: what the image shows (it guides the added detail).
    #[arg(long, default_value = "")]
    prompt: String,
    /// x4 upscaler: what to steer away from.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// x4 upscaler: sampling steps (diffusers' default 75).
    #[arg(long, default_value_t = 75)]
    steps: usize,
    /// x4 upscaler: classifier-free guidance scale (diffusers' default 9).
    #[arg(long, default_value_t = 9.0, allow_negative_numbers = true)]
    guidance: f64,
    /// x4 upscaler: how much noise the low-resolution image gets before it guides the model,
    /// 0 to the model's max_noise_level (350): more lets it invent more detail.
    #[arg(long, default_value_t = sd::DEFAULT_NOISE_LEVEL, allow_negative_numbers = true)]
    noise_level: usize,
    /// x4 upscaler: the seed of every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// x4 upscaler: a sampler name (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// x4 upscaler: decode in tiles (the 4× image in bounded memory).
    #[arg(long)]
    vae_tiling: bool,
    /// x4 upscaler: run the U-Net over overlapping tiles of this many latent (= input)
    /// pixels, blended (MultiDiffusion): memory follows the tile, not the image.
    #[arg(long, value_name = "N")]
    unet_tile: Option<usize>,
    /// x4 upscaler: latent pixels shared by neighbouring U-Net tiles (default a quarter tile).
    #[arg(long, value_name = "N")]
    unet_tile_overlap: Option<usize>,
    /// The memory the run may use (e.g. `12G`; default: what the system has available).
    #[arg(long, allow_negative_numbers = true)]
    max_memory: Option<String>,
    /// Where the PNG goes (default: IMAGE's folder, `<name>-x<scale>.png`).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Tile side in input pixels (0: the whole image at once, which needs the most memory).
    #[arg(long, default_value_t = TileOptions::default().tile)]
    tile: usize,
    /// Input pixels of context around each tile, cut from its output.
    #[arg(long, default_value_t = TileOptions::default().tile_pad)]
    tile_pad: usize,
    /// Pixels of reflection added at the right and bottom edges before upscaling (Real-ESRGAN's
    /// --pre_pad), cut off after.
    #[arg(long, default_value_t = TileOptions::default().pre_pad)]
    pre_pad: usize,
    /// The final enlargement (Real-ESRGAN's --outscale): the model's output resized (Lanczos)
    /// to this factor of the input; at most the model's own (default: the model's).
    #[arg(long, allow_negative_numbers = true)]
    scale: Option<f64>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Compute dtype of a Real-ESRGAN model: f16 or bf16 halve the weights' and activations'
    /// memory.
    #[arg(long, value_enum, default_value_t = crate::generate::DTypeArg::F32)]
    dtype: crate::generate::DTypeArg,
}

fn default_output(image: &Path, scale: f64) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    image.with_file_name(format!("{stem}-x{scale}.png"))
}

pub fn run(args: UpscaleArgs) -> Result<String, String> {
    let device = Default::default();
    // The image first: a bad image is reported before the model is read.
    let image = sd::core::image_io::decode_image(&args.image)
        .map_err(|e| e.to_string())?
        .to_rgb8();
    if args.model.is_dir() {
        return run_x4(&args, image);
    }
    let model = Upscaler::<B>::load_in(&args.model, args.dtype.dtype(), &device)
        .map_err(|e| e.to_string())?;
    let scale = model.scale();
    let outscale = args.scale.unwrap_or(scale as f64);
    if !(outscale.is_finite() && outscale >= 1.0) {
        return Err(format!("--scale {outscale} must be at least 1"));
    }
    if outscale > scale as f64 {
        return Err(format!(
            "--scale {outscale}: {} enlarges ×{scale}, no more; run it again on its output",
            args.model.display()
        ));
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.image, outscale));
    let options = TileOptions {
        tile: args.tile,
        tile_pad: args.tile_pad,
        pre_pad: args.pre_pad,
    };
    let need = model.estimate_bytes(image.width() as usize, image.height() as usize, &options);
    if let Some(available) = sd::memory::available_memory()
        && need > available
    {
        use sd::memory::Gib;
        let hint = if options.tile == 0 {
            "; upscale in tiles (--tile 256)"
        } else {
            "; use smaller tiles (--tile)"
        };
        return Err(format!(
            "{}: upscaling this {}×{} image would need about {} of memory but {} is available{hint}",
            args.image.display(),
            image.width(),
            image.height(),
            Gib(need),
            Gib(available)
        ));
    }
    let bar = crate::progress_bar(
        args.quiet,
        1,
        "upscaling [{bar:30}] {pos}/{len} tiles, eta {eta}",
    );
    let started = std::time::Instant::now();
    let out = model
        .upscale(&image, &options, &device, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let out = if outscale < scale as f64 {
        let size = |side: u32| ((f64::from(side) * outscale).round() as u32).max(1);
        image::imageops::resize(
            &out,
            size(image.width()),
            size(image.height()),
            image::imageops::FilterType::Lanczos3,
        )
    } else {
        out
    };
    let name = args
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A1111's extras tab records an upscale in these two fields.
    let parameters = format!(
        "Postprocess upscale by: {outscale}, Postprocess upscaler: {name} ({})",
        model.describe()
    );
    sd::save_png(&out, &output, &parameters).map_err(|e| e.to_string())?;
    Ok(format!(
        "{}×{} → {}×{} in {:.1} s: {}",
        image.width(),
        image.height(),
        out.width(),
        out.height(),
        started.elapsed().as_secs_f64(),
        output.display()
    ))
}

/// The Stable Diffusion x4 upscaler on `image`: the image rounded down to a multiple of the
/// VAE's factor (PIL's bicubic, as diffusers' processor), then the pipeline.
fn run_x4(args: &UpscaleArgs, image: image::RgbImage) -> Result<String, String> {
    let model = sd::Model::from_folder(&args.model, None).map_err(|e| e.to_string())?;
    if model.upscaler().is_none() {
        return Err(format!(
            "{}: not an upscaler (a StableDiffusionUpscalePipeline folder); for a Real-ESRGAN \
             model give its .pth or .safetensors file",
            args.model.display()
        ));
    }
    let f = model.vae_scale_factor();
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (rw, rh) = (w / f * f, h / f * f);
    if rw == 0 || rh == 0 {
        return Err(format!(
            "{}: a {w}×{h} image is smaller than the upscaler's {f}-pixel step",
            args.image.display()
        ));
    }
    let low = if (rw, rh) != (w, h) {
        eprintln!(
            "note: {}: {w}×{h} is rounded down to {rw}×{rh} (bicubic), a multiple of {f}",
            args.image.display()
        );
        let raw = sd::conditioner::image_processor::pil_bicubic_rgb8(image.as_raw(), w, h, rw, rh);
        image::RgbImage::from_raw(rw as u32, rh as u32, raw).ok_or("internal: resize")?
    } else {
        image
    };
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.image, f as f64));
    sd::core::files::check_output_path(&output).map_err(|e| e.to_string())?;
    let options = sd::GenerateOptions {
        prompt: sd::PromptOptions {
            text: args.prompt.clone(),
            negative: args.negative_prompt.clone(),
            ..Default::default()
        },
        guidance: sd::Guidance {
            scale: args.guidance,
            ..Default::default()
        },
        sampling: sd::Sampling {
            steps: args.steps,
            seed: args.seed,
            scheduler: args.scheduler.clone(),
            ..Default::default()
        },
        vae_tiling: args.vae_tiling,
        latent_tiling: args.unet_tile.map(|tile| sd::LatentTiling {
            tile,
            overlap: args.unet_tile_overlap.unwrap_or(tile / 4),
        }),
        width: Some(rw * f),
        height: Some(rh * f),
        ..sd::GenerateOptions::default()
    };
    if args.unet_tile_overlap.is_some() && args.unet_tile.is_none() {
        return Err("--unet-tile-overlap needs --unet-tile".into());
    }
    // Before any weight is read: the U-Net's activations over the latent (the input's size)
    // and the 4× decode.
    let estimate = sd::memory::estimate(&model, &options, (rw * f, rh * f));
    let budget = match &args.max_memory {
        Some(text) => Some(sd::memory::parse_size(text).ok_or_else(|| {
            format!("--max-memory {text}: not a size (bytes, or a number with K, M, G or T)")
        })?),
        None => sd::memory::available_memory(),
    };
    if let Some(available) = budget
        && estimate.peak() > available
    {
        use sd::memory::Gib;
        return Err(format!(
            "{}: upscaling {rw}×{rh} would need about {} of memory (U-Net {}, VAE decode {}) but \
             {} is available; try --unet-tile 64 and --vae-tiling",
            args.image.display(),
            Gib(estimate.peak()),
            Gib(estimate.unet_weights + estimate.unet_activations),
            Gib(estimate.vae_weights
                + if args.vae_tiling {
                    estimate.vae_activations_tiled
                } else {
                    estimate.vae_activations
                }),
            Gib(available)
        ));
    }
    let bar = crate::progress_bar(
        args.quiet,
        args.steps as u64,
        "upscaling [{bar:30}] {pos}/{len} steps, eta {eta}",
    );
    let mut callback = |p: &sd::StepProgress<'_, B>| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    };
    let started = std::time::Instant::now();
    let mut noise = sd::schedulers::HostNoise::per_image(args.seed, 1);
    let out = sd::upscale_x4_with_noise::<B>(
        &model,
        &options,
        sd::core::image_io::image_to_data(&low),
        args.noise_level,
        &Default::default(),
        &mut noise,
        Some(&mut callback),
    )
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let picture = sd::to_images(out.images)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("internal: no image")?;
    let name = args
        .model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A1111's extras fields, and the generation settings that made the detail.
    let mut parameters = args.prompt.clone();
    if let Some(negative) = &args.negative_prompt {
        parameters.push_str(&format!("\nNegative prompt: {negative}"));
    }
    parameters.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Noise level: {}, Postprocess upscale \
         by: {f}, Postprocess upscaler: {name}",
        args.steps, out.sampler, args.guidance, args.seed, args.noise_level
    ));
    sd::save_png(&picture, &output, &parameters).map_err(|e| e.to_string())?;
    Ok(format!(
        "{rw}×{rh} → {}×{} in {:.1} s: {}",
        picture.width(),
        picture.height(),
        started.elapsed().as_secs_f64(),
        output.display()
    ))
}
