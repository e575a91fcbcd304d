//! `sd generate`: flags to [`sd::GenerateOptions`], a progress bar, numbered PNGs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use sd::conditioner::PromptSyntax;
use sd::core::weights::SafetensorsFile;
use sd::{GenerateOptions, Model, StepProgress, Task};

/// `--steps` when neither it nor the built-in model sets it (diffusers' pipelines use 50; 20 is
/// enough for the multistep samplers every model folder here names).
const DEFAULT_STEPS: usize = 20;

/// `--guidance` when neither it nor the built-in model sets it (diffusers' default).
const DEFAULT_GUIDANCE: f64 = 7.5;

#[derive(Args)]
pub struct GenerateArgs {
    /// What to draw (A1111 syntax: `(word:1.2)`, `[word]`, `BREAK`).
    #[arg(required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A prompt file instead of one prompt: a prompt a line, or JSON lines with "prompt" and
    /// optionally "seed" and "negative_prompt". One PNG per line, named by its index
    /// (00000.png, ...) in the --output folder; images already there are skipped, so a
    /// restarted run resumes. A line without a seed gets --seed plus its index.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// With --prompts: this run's share I/N of the lines (every N-th from the I-th), so N
    /// machines split one list with no coordination.
    #[arg(long, value_name = "I/N", requires = "prompts")]
    shard: Option<String>,
    /// A diffusers folder, a single-file .safetensors checkpoint, or a Hugging Face repo id
    /// already in the local cache. Default: the built-in shapes model (64×64 images of red,
    /// yellow, green, blue and purple circles, squares and triangles, alone or two in a
    /// relation: "a red circle above a blue square"), trained from scratch by
    /// `cargo xtask train-shapes` and embedded in this binary, so nothing is downloaded.
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// For a diffusers folder: the weight-file variant to load (e.g. `fp16`).
    #[arg(long)]
    variant: Option<String>,
    /// For a single-file checkpoint: a diffusers folder whose component configs to use.
    #[arg(long)]
    config: Option<PathBuf>,
    /// What to steer away from (the unconditional half of classifier-free guidance; default:
    /// the empty prompt, zeros for SDXL).
    #[arg(long, short = 'n')]
    negative_prompt: Option<String>,
    /// Sampler: a diffusers class or an A1111 name ("Euler a", "DPM++ 2M Karras", ...).
    /// Default: the model's own scheduler.
    #[arg(long)]
    scheduler: Option<String>,
    /// Karras sigmas.
    #[arg(long)]
    karras: bool,
    /// Sampling steps (default: 20; the built-in shapes model's own, 30, without --model).
    #[arg(long, allow_negative_numbers = true)]
    steps: Option<usize>,
    /// Classifier-free guidance scale, 1 turns guidance off (default: 7.5; the built-in
    /// shapes model's own, 3, without --model).
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f64>,
    /// Guidance rescale φ (Lin et al. 2023); 0 is off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    guidance_rescale: f64,
    /// Image i of a batch uses seed + i.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Width in pixels (default: the model's size).
    #[arg(long, allow_negative_numbers = true)]
    width: Option<usize>,
    /// Height in pixels (default: the model's size).
    #[arg(long, allow_negative_numbers = true)]
    height: Option<usize>,
    /// Images to generate; image i uses seed + i.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    num_images: usize,
    /// A safetensors file with a `latents` tensor [N, C, H/f, W/f]: the initial latents
    /// before the sampler's initial sigma scales them (diffusers' `latents=`).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// img2img: the starting image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much of the starting image to replace, in [0, 1] (default 0.8; 1 with
    /// --mask).
    #[arg(long, allow_negative_numbers = true)]
    strength: Option<f64>,
    /// Inpainting: white where to paint (same size as --init-image). Works with inpainting
    /// models (9-channel U-Nets) and, by blending latents, with ordinary ones.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Text encoder layers to skip at the end (A1111's "Clip skip" minus 1).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    clip_skip: usize,
    /// Read the prompt as diffusers does: no weights, truncated at 75 tokens.
    #[arg(long)]
    plain_prompt: bool,
    /// Decode in tiles (large images in bounded memory).
    #[arg(long)]
    vae_tiling: bool,
    /// Run the U-Net over overlapping tiles of this many latent pixels, blended
    /// (MultiDiffusion): large images in bounded memory, a little different from untiled.
    #[arg(long, value_name = "N")]
    unet_tile: Option<usize>,
    /// Latent pixels shared by neighbouring U-Net tiles (default a quarter tile).
    #[arg(long, value_name = "N")]
    unet_tile_overlap: Option<usize>,
    /// Compute backend, among those compiled in (default: the most capable).
    #[arg(long)]
    backend: Option<String>,
    /// Weight and compute dtype: f16 and bf16 halve the memory. On the CPU (`flex`) they hold
    /// the layers' weights and the arithmetic stays in f32 (as fast as f32, its precision); on
    /// a GPU both are in half precision, the VAE in f32 where its config says `force_upcast`.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Output PNG (default output.png); with several images, numbered files (`out-0.png`,
    /// `out-1.png`, ...). With --prompts, a folder (default `outputs`, made if missing).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Also print how long the run took before its first U-Net step (loading the models and
    /// encoding the prompt, from the start of the process), per step, and after the last step
    /// (decoding and writing), as stable-diffusion.cpp does. The step time is the mean of the
    /// steps after the first, so at least two are needed to separate the first from the
    /// loading.
    #[arg(long, short = 'v')]
    verbose: bool,
    /// Load weights without checking them for NaN and infinite values (the check names the
    /// damaged tensor; it costs one pass over the weights).
    #[arg(long)]
    skip_weight_check: bool,
    /// A LoRA to merge into the model, `FILE` or `FILE:WEIGHT` (weight 1 when absent):
    /// kohya / A1111, diffusers and PEFT files (LoCon convolutions too). Repeatable.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    lora: Vec<String>,
    /// Where A1111's `<lora:NAME:WEIGHT>` prompt tags find `NAME.safetensors` (searched in
    /// subfolders too).
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// Leave out LoRA layers that match no module of the model (counted in a warning) instead
    /// of refusing the file.
    #[arg(long)]
    lora_ignore_unmatched: bool,
    /// How LoRAs are applied: merged into the weights as they load (no cost per step), or
    /// kept beside them and added at each layer's forward (diffusers' unfused adapters).
    #[arg(long, value_enum, default_value_t = LoraApply::Merge)]
    lora_apply: LoraApply,
    /// The memory the run may use (e.g. `12G`, `800M`; default: what the system has
    /// available). Runs estimated to need more are refused before any weights are read.
    #[arg(long, allow_negative_numbers = true)]
    max_memory: Option<String>,
    /// After decoding, enlarge each image with this Real-ESRGAN model (as `sd upscale`); with
    /// --hires-scale, the upscaler of the hires fix instead.
    #[arg(long, value_name = "MODEL")]
    upscale: Option<PathBuf>,
    /// A1111's hires fix: enlarge the image by this factor (with --upscale's model, else
    /// Lanczos), then denoise it again at that size (img2img with --hires-strength).
    #[arg(long, allow_negative_numbers = true)]
    hires_scale: Option<f64>,
    /// How much of the enlarged image the hires pass replaces, in (0, 1] (default 0.7, A1111's).
    #[arg(long, allow_negative_numbers = true)]
    hires_strength: Option<f64>,
    /// Sampling steps of the hires pass (default: --steps).
    #[arg(long)]
    hires_steps: Option<usize>,
    /// A ControlNet: a diffusers folder or a single file in the original layout
    /// (`control_*.safetensors`). Repeatable; each takes the --control image of its position.
    #[arg(long, value_name = "MODEL")]
    controlnet: Vec<PathBuf>,
    /// The conditioning image of each --controlnet (edges, depth, pose, …). Without --width
    /// and --height it sets the output size (rounded down to the VAE's multiple), as diffusers
    /// does; otherwise it is resized to the output size, with a note.
    #[arg(long, value_name = "IMAGE")]
    control: Vec<PathBuf>,
    /// How strongly each ControlNet steers (default 1): one value for all, or one per
    /// --controlnet.
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    control_scale: Vec<f64>,
    /// The fraction of the steps before each ControlNet starts, in [0, 1) (default 0): one
    /// value for all, or one per --controlnet.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    control_start: Vec<f64>,
    /// The fraction of the steps after which each ControlNet stops, in (0, 1] (default 1).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    control_end: Vec<f64>,
    /// What to make of each --control image first: `none` (use it as given) or `canny`
    /// (edges, for canny ControlNets). One value for all, or one per --controlnet.
    #[arg(long, value_enum, value_name = "P")]
    control_preprocess: Vec<Preprocess>,
    /// Canny's thresholds on the gradient magnitude, low and high (A1111's 100 and 200).
    #[arg(long, num_args = 2, value_names = ["LOW", "HIGH"], default_values_t = [100.0, 200.0], allow_negative_numbers = true)]
    canny_thresholds: Vec<f32>,
    /// ControlNet guess mode: the ControlNets see only the prompt's half of the guided batch,
    /// their shallow residuals scaled down (for prompts that do not describe the image, or
    /// an empty one).
    #[arg(long)]
    guess_mode: bool,
    /// An IP-Adapter (`ip-adapter_sd15.safetensors`): --image-prompt steers the image like a
    /// prompt, with or without text.
    #[arg(long, value_name = "FILE")]
    ip_adapter: Option<PathBuf>,
    /// The image prompt of --ip-adapter.
    #[arg(long, value_name = "IMAGE")]
    image_prompt: Option<PathBuf>,
    /// The image prompt's weight against the text (default 1; 0.5–0.7 keeps more of the text).
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    image_prompt_scale: Option<f64>,
    /// The CLIP image encoder the IP-Adapter was trained with (a folder with `config.json` and
    /// `model.safetensors`; default: `image_encoder/` beside the adapter, above it, or in the
    /// model folder).
    #[arg(long, value_name = "DIR")]
    image_encoder: Option<PathBuf>,
}

/// The IP-Adapter image prompt of the run, if any.
fn read_image_prompt(
    args: &GenerateArgs,
    model: &Model,
) -> Result<Option<sd::ImagePrompt>, String> {
    let (adapter, image) = match (&args.ip_adapter, &args.image_prompt) {
        (Some(adapter), Some(image)) => (adapter, image),
        (None, None) => {
            let stray = [
                (args.image_prompt_scale.is_some(), "--image-prompt-scale"),
                (args.image_encoder.is_some(), "--image-encoder"),
            ];
            if let Some((_, flag)) = stray.iter().find(|(given, _)| *given) {
                return Err(format!("{flag} needs --ip-adapter and --image-prompt"));
            }
            return Ok(None);
        }
        (Some(_), None) => return Err("--ip-adapter needs --image-prompt (the image)".into()),
        (None, Some(_)) => {
            return Err("--image-prompt needs --ip-adapter (the adapter that reads it)".into());
        }
    };
    sd::core::files::regular_file(adapter).map_err(|e| e.to_string())?;
    let image_encoder = match &args.image_encoder {
        Some(dir) => dir.clone(),
        None => sd::ImagePrompt::find_image_encoder(adapter, model).map_err(|e| e.to_string())?,
    };
    let image = sd::core::image_io::decode_image(image)
        .map_err(|e| e.to_string())?
        .to_rgb8();
    Ok(Some(sd::ImagePrompt {
        adapter: adapter.clone(),
        image_encoder,
        image,
        scale: args.image_prompt_scale.unwrap_or(1.0),
    }))
}

/// `--unet-tile N [--unet-tile-overlap M]`.
fn unet_tiling(args: &GenerateArgs) -> Result<Option<sd::LatentTiling>, String> {
    match (args.unet_tile, args.unet_tile_overlap) {
        (None, Some(_)) => Err("--unet-tile-overlap needs --unet-tile".into()),
        (None, None) => Ok(None),
        (Some(tile), overlap) => Ok(Some(sd::LatentTiling {
            tile,
            overlap: overlap.unwrap_or(tile / 4),
        })),
    }
}

/// An image size, `(width, height)`.
type Size = (usize, usize);

/// `--lora-apply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoraApply {
    /// Added into the weights as they load.
    Merge,
    /// Added at each adapted layer's forward, the weights left as loaded.
    OnTheFly,
}

/// How a --control image is prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Preprocess {
    /// Used as given.
    None,
    /// Canny edges.
    Canny,
}

/// The value for ControlNet `i` of a flag given once for all or once per ControlNet.
fn per_control<T: Copy>(
    values: &[T],
    i: usize,
    n: usize,
    flag: &str,
    default: T,
) -> Result<T, String> {
    match values.len() {
        0 => Ok(default),
        1 => Ok(values[0]),
        k if k == n => Ok(values[i]),
        k => Err(format!(
            "--{flag} is given {k} times for {n} --controlnet: give it once (for all) or once per \
             ControlNet"
        )),
    }
}

/// The ControlNets of the run, each with its image read, prepared and sized. `size`: the
/// output size asked for (--width/--height, or the starting image's); without one the first
/// image's size, rounded down to the VAE's multiple, becomes the output size (returned).
fn read_controls(
    args: &GenerateArgs,
    model: &Model,
    size: Option<(usize, usize)>,
) -> Result<(Vec<sd::Control>, Option<Size>), String> {
    let n = args.controlnet.len();
    if args.control.len() != n {
        return Err(format!(
            "{} --controlnet and {} --control images: give one image per ControlNet",
            n,
            args.control.len()
        ));
    }
    if n == 0 {
        let stray = [
            (!args.control_scale.is_empty(), "--control-scale"),
            (!args.control_start.is_empty(), "--control-start"),
            (!args.control_end.is_empty(), "--control-end"),
            (!args.control_preprocess.is_empty(), "--control-preprocess"),
            (args.guess_mode, "--guess-mode"),
        ];
        if let Some((_, flag)) = stray.iter().find(|(given, _)| *given) {
            return Err(format!("{flag} needs --controlnet and --control"));
        }
        return Ok((Vec::new(), size));
    }
    // Every per-ControlNet flag's count, before any file is read.
    per_control(&args.control_scale, 0, n, "control-scale", 1.0)?;
    per_control(&args.control_start, 0, n, "control-start", 0.0)?;
    per_control(&args.control_end, 0, n, "control-end", 1.0)?;
    per_control(
        &args.control_preprocess,
        0,
        n,
        "control-preprocess",
        Preprocess::None,
    )?;
    let factor = model.vae_scale_factor();
    let mut size = size;
    let mut controls = Vec::with_capacity(n);
    for (i, (net, path)) in args.controlnet.iter().zip(&args.control).enumerate() {
        let source = sd::ControlNetSource::open(net, model).map_err(|e| e.to_string())?;
        source.check_fits(model).map_err(|e| e.to_string())?;
        let mut image = sd::core::image_io::decode_image(path)
            .map_err(|e| e.to_string())?
            .to_rgb8();
        let preprocess = per_control(
            &args.control_preprocess,
            i,
            n,
            "control-preprocess",
            Preprocess::None,
        )?;
        if preprocess == Preprocess::Canny {
            let (low, high) = (args.canny_thresholds[0], args.canny_thresholds[1]);
            if !(low.is_finite() && high.is_finite() && 0.0 <= low && low <= high) {
                return Err(format!(
                    "--canny-thresholds {low} {high}: need 0 ≤ low ≤ high"
                ));
            }
            image = sd::canny_edges(&image, low, high);
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (tw, th) = *size.get_or_insert((w / factor * factor, h / factor * factor));
        if tw == 0 || th == 0 {
            return Err(format!(
                "{}: a {w}×{h} conditioning image is smaller than the VAE's {factor}-pixel step",
                path.display()
            ));
        }
        if (w, h) != (tw, th) {
            eprintln!(
                "note: {}: the {w}×{h} conditioning image is resized to {tw}×{th} (Lanczos)",
                path.display()
            );
            image = image::imageops::resize(
                &image,
                tw as u32,
                th as u32,
                image::imageops::FilterType::Lanczos3,
            );
        }
        controls.push(sd::Control {
            scale: per_control(&args.control_scale, i, n, "control-scale", 1.0)?,
            start: per_control(&args.control_start, i, n, "control-start", 0.0)?,
            end: per_control(&args.control_end, i, n, "control-end", 1.0)?,
            preprocessor: match preprocess {
                Preprocess::None => "none".into(),
                Preprocess::Canny => "canny".into(),
            },
            ..sd::Control::new(source, sd::control_image_data(&image))
        });
    }
    Ok((controls, size))
}

/// What enlarges the decoded images.
enum PostUpscaler {
    /// A Real-ESRGAN model.
    Esrgan(sd_upscale::Upscaler<sd::backend::Flex>),
    /// The Stable Diffusion x4 upscaler, guided by the generation's prompt.
    X4(Box<Model>),
}

impl PostUpscaler {
    fn scale(&self) -> usize {
        match self {
            Self::Esrgan(model) => model.scale(),
            Self::X4(model) => model.vae_scale_factor(),
        }
    }

    fn esrgan(&self) -> Option<&sd_upscale::Upscaler<sd::backend::Flex>> {
        match self {
            Self::Esrgan(model) => Some(model),
            Self::X4(_) => None,
        }
    }
}

/// What happens to the decoded images: an upscaler after decoding, or A1111's hires fix.
struct After<'a> {
    upscaler: Option<(&'a PostUpscaler, String)>,
    hires: Option<Hires>,
}

/// The hires fix's second pass.
#[derive(Clone, Copy)]
struct Hires {
    scale: f64,
    strength: f64,
    steps: usize,
    /// The second pass's image size.
    size: (usize, usize),
}

/// A Real-ESRGAN model on one image, in its default tiles.
fn run_upscaler(
    model: &sd_upscale::Upscaler<sd::backend::Flex>,
    image: &image::RgbImage,
) -> Result<image::RgbImage, String> {
    let options = sd_upscale::TileOptions::default();
    model
        .upscale(image, &options, &Default::default(), &mut |_, _| {})
        .map_err(|e| e.to_string())
}

/// An image at `size`: through the Real-ESRGAN model first when given (A1111 then resizes its
/// output to the target), Lanczos-resized otherwise.
fn enlarge(
    image: &image::RgbImage,
    (w, h): (usize, usize),
    upscaler: Option<&sd_upscale::Upscaler<sd::backend::Flex>>,
) -> Result<image::RgbImage, String> {
    let source = match upscaler {
        Some(model) => run_upscaler(model, image)?,
        None => image.clone(),
    };
    Ok(image::imageops::resize(
        &source,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    ))
}

/// A ControlNet's conditioning image resized (Lanczos) to `(w, h)`.
fn resize_control(control: &sd::Control, (w, h): (usize, usize)) -> Result<sd::Control, String> {
    let [_, c, ih, iw] = control.image.shape.as_slice() else {
        return Err("internal: a conditioning image is not [1, C, H, W]".into());
    };
    let (c, ih, iw) = (*c, *ih, *iw);
    if c != 3 {
        return Err(format!(
            "--hires-scale resizes RGB conditioning images; {} takes {c} channels",
            control.net.path().display()
        ));
    }
    let values = control
        .image
        .clone()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| format!("internal: {e:?}"))?;
    let plane = ih * iw;
    let image = image::RgbImage::from_fn(iw as u32, ih as u32, |x, y| {
        let at = y as usize * iw + x as usize;
        image::Rgb(std::array::from_fn(|k| {
            (values[k * plane + at] * 255.0).round().clamp(0.0, 255.0) as u8
        }))
    });
    let big = image::imageops::resize(
        &image,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    );
    Ok(sd::Control {
        image: sd::control_image_data(&big),
        ..control.clone()
    })
}

/// The size a hires pass renders at: the first pass's times `scale`, to a multiple of `f`.
fn hires_size((w, h): (usize, usize), scale: f64, f: usize) -> (usize, usize) {
    let side = |x: usize| (((x as f64 * scale) / f as f64).round() as usize).max(1) * f;
    (side(w), side(h))
}

/// `--dtype`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    /// As Burn names it.
    pub(crate) fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

fn output_paths(output: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("output");
    let ext = output.extension().and_then(|s| s.to_str()).unwrap_or("png");
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

fn open_lora(path: &Path) -> Result<std::sync::Arc<sd::lora::LoraFile>, String> {
    sd::lora::LoraFile::open(path)
        .map(std::sync::Arc::new)
        .map_err(|e| e.to_string())
}

/// `NAME.safetensors` under `dir` or one of its subfolders (A1111 searches its Lora folder
/// recursively); the first found in sorted order, so that the choice is repeatable.
fn find_lora(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let wanted = format!("{name}.safetensors");
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .map_err(|e| format!("--lora-dir {}: {e}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        if let Some(found) = entries
            .iter()
            .find(|p| p.is_file() && p.file_name().is_some_and(|n| *n == *wanted))
        {
            return Ok(found.clone());
        }
        stack.extend(entries.into_iter().rev().filter(|p| p.is_dir()));
    }
    Err(format!(
        "<lora:{name}>: no {wanted} under --lora-dir {}",
        dir.display()
    ))
}

fn read_latents(path: &Path) -> Result<burn::tensor::TensorData, String> {
    let file = SafetensorsFile::open(path).map_err(|e| e.to_string())?;
    let entry = file.entries().iter().find(|e| e.key == "latents");
    if let Some(entry) = entry
        && (entry.shape.len() != 4 || !entry.is_float())
    {
        return Err(format!(
            "{}: `latents` is {:?} of shape {:?}; it must be a 4-D float tensor [N, C, H/f, W/f]",
            path.display(),
            entry.dtype,
            entry.shape
        ));
    }
    if !file.entries().iter().any(|e| e.key == "latents") {
        return Err(format!("{}: no tensor named `latents`", path.display()));
    }
    file.tensor_data("latents", DType::F32)
        .map_err(|e| e.to_string())
}

/// A mask image as `[1, 1, H, W]` in `[0, 1]` (its luminance; white paints).
fn read_mask(path: &Path) -> Result<burn::tensor::TensorData, String> {
    let image = sd::core::image_io::decode_image(path)
        .map_err(|e| e.to_string())?
        .to_luma8();
    let (w, h) = (image.width() as usize, image.height() as usize);
    let values: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect();
    Ok(burn::tensor::TensorData::new(values, [1, 1, h, w]))
}

/// `--steps` and `--guidance` within the pipeline's bounds.
pub(crate) fn check_steps_and_guidance(steps: usize, guidance: f64) -> Result<(), String> {
    if !(1..=sd::MAX_STEPS).contains(&steps) {
        return Err(format!("--steps {steps} is outside 1..={}", sd::MAX_STEPS));
    }
    if !guidance.is_finite() || guidance.abs() > sd::MAX_GUIDANCE {
        return Err(format!(
            "--guidance {guidance} is outside [-{0}, {0}]",
            sd::MAX_GUIDANCE
        ));
    }
    Ok(())
}

/// The built-in shapes model, installed into its cache folder on first use.
pub(crate) fn built_in_model() -> Result<Model, String> {
    let dir = sd_shapes::model::install(&sd_shapes::model::default_cache())
        .map_err(|e| format!("the built-in model: {e}"))?;
    Model::from_folder(&dir, None).map_err(|e| e.to_string())
}

pub fn run(args: GenerateArgs) -> Result<String, String> {
    // Settings that need no model are checked first: a bad flag costs no loading time.
    let built_in = args.model.is_none();
    for (flag, given) in [
        ("--config", args.config.is_some()),
        ("--variant", args.variant.is_some()),
    ] {
        if built_in && given {
            return Err(format!(
                "{flag} needs --model (the built-in model is one folder)"
            ));
        }
    }
    let steps = args.steps.unwrap_or(if built_in {
        sd_shapes::model::DEFAULT_STEPS
    } else {
        DEFAULT_STEPS
    });
    let guidance = args.guidance.unwrap_or(if built_in {
        sd_shapes::model::DEFAULT_GUIDANCE
    } else {
        DEFAULT_GUIDANCE
    });
    check_steps_and_guidance(steps, guidance)?;
    let hires_flags = args.hires_strength.is_some() || args.hires_steps.is_some();
    if hires_flags && args.hires_scale.is_none() {
        return Err("--hires-strength and --hires-steps need --hires-scale".into());
    }
    if let Some(scale) = args.hires_scale {
        if !(scale.is_finite() && scale > 1.0 && scale <= 4.0) {
            return Err(format!("--hires-scale {scale} is outside (1, 4]"));
        }
        if args.init_image.is_some() || args.init_latents.is_some() {
            return Err(
                "--hires-scale is for txt2img: leave out --init-image and --init-latents".into(),
            );
        }
    }
    let hires_strength = args.hires_strength.unwrap_or(0.7);
    if !(hires_strength > 0.0 && hires_strength <= 1.0) {
        return Err(format!(
            "--hires-strength {hires_strength} is outside (0, 1]"
        ));
    }
    let hires_steps = args.hires_steps.unwrap_or(steps);
    check_steps_and_guidance(hires_steps, guidance)?;
    if !(1..=sd::MAX_IMAGES).contains(&args.num_images) {
        return Err(format!(
            "--num-images {} is outside 1..={}",
            args.num_images,
            sd::MAX_IMAGES
        ));
    }
    for (flag, value) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = value
            && !(1..=sd::MAX_SIDE).contains(&v)
        {
            return Err(format!("{flag} {v} is outside 1..={}", sd::MAX_SIDE));
        }
    }
    if args.clip_skip > sd::MAX_CLIP_SKIP {
        return Err(format!(
            "--clip-skip {} is more than the {} layers any text encoder has",
            args.clip_skip,
            sd::MAX_CLIP_SKIP
        ));
    }
    if !(0.0..=1.0).contains(&args.guidance_rescale) {
        return Err(format!(
            "--guidance-rescale {} is outside [0, 1]",
            args.guidance_rescale
        ));
    }
    if let Some(s) = args.strength
        && !(0.0..=1.0).contains(&s)
    {
        return Err(format!("--strength {s} is outside [0, 1]"));
    }
    let jobs = jobs(&args)?;
    if jobs.is_empty() {
        return Ok("every image of this --prompts share is already written: nothing to do".into());
    }
    // The prompts' bounds (length, nesting, weights, chunks) before any loading: the built-in
    // vocabulary is the one every SD family's tokenizers share.
    let checks = jobs.iter().flat_map(|job| {
        [
            (job.name.clone(), Some(&job.prompt)),
            (
                format!("{}: the negative prompt", job.name),
                job.negative_prompt.as_ref(),
            ),
        ]
    });
    for (flag, prompt) in checks {
        let flag = flag.as_str();
        let Some(prompt) = prompt else { continue };
        if args.plain_prompt {
            let chars = prompt.chars().count();
            if chars > sd::conditioner::MAX_PROMPT_CHARS {
                return Err(format!(
                    "{flag} has {chars} characters; at most {} are read",
                    sd::conditioner::MAX_PROMPT_CHARS
                ));
            }
        } else {
            let tokenizer =
                sd::conditioner::ClipTokenizer::embedded(sd::conditioner::Padding::EndOfText)
                    .map_err(|e| e.to_string())?;
            sd::conditioner::tokenize_prompt(&tokenizer, prompt).map_err(|e| match flag {
                "the prompt" => e.to_string(),
                "the prompt: the negative prompt" => format!("--negative-prompt: {e}"),
                _ => format!("{flag}: {e}"),
            })?;
        }
    }
    let compiled = sd::backend::compiled_backends();
    let backend = args
        .backend
        .clone()
        .unwrap_or_else(|| compiled.first().copied().unwrap_or("flex").to_string());
    if !compiled.contains(&backend.as_str()) {
        return Err(format!(
            "unknown or not compiled-in backend `{backend}`; this build has: {}",
            compiled.join(", ")
        ));
    }
    // Outputs are checked before any work: their folder exists, and none of them is anything
    // but a regular file (a device, a folder, a symlink out of the folder) that we would replace.
    for path in jobs.iter().flat_map(|job| &job.paths) {
        sd::core::files::check_output_path(path).map_err(|e| e.to_string())?;
    }
    // Input files must be regular files (a FIFO would block forever), and a starting image's
    // size is read from its header before it is decoded.
    for path in [&args.init_image, &args.mask, &args.init_latents]
        .into_iter()
        .flatten()
        .chain(&args.control)
        .chain(&args.image_prompt)
    {
        sd::core::files::regular_file(path).map_err(|e| e.to_string())?;
    }
    let header_size = match &args.init_image {
        Some(path) => Some(sd::core::image_io::image_dimensions(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let max_memory = match &args.max_memory {
        Some(text) => Some(sd::memory::parse_size(text).ok_or_else(|| {
            format!("--max-memory {text}: not a size (bytes, or a number with K, M, G or T)")
        })?),
        None => None,
    };
    let dtype = args.dtype.dtype();
    // On the CPU, half precision is for holding the weights only: its arithmetic there is
    // emulated (slower than f32) and less precise, while f16 weights widened as each kernel
    // reads them cost no time.
    let compute_dtype = if backend == "flex" { DType::F32 } else { dtype };
    let model = match (&args.model, &args.config) {
        (None, _) => built_in_model(),
        (Some(model), Some(config)) => {
            Model::from_single_file(model, Some(config)).map_err(|e| e.to_string())
        }
        (Some(model), None) => {
            Model::open_variant(model, args.variant.as_deref()).map_err(|e| e.to_string())
        }
    }?
    .with_dtype(compute_dtype)
    .with_matrix_dtype(dtype)
    .with_weight_check(!args.skip_weight_check)
    .with_lora_ignore_unmatched(args.lora_ignore_unmatched)
    .with_lora_application(match args.lora_apply {
        LoraApply::Merge => sd::LoraApplication::Merge,
        LoraApply::OnTheFly => sd::LoraApplication::OnTheFly,
    });
    // LoRAs from --lora and from the prompt's <lora:…> tags (taken out of the text the text
    // encoder reads; the PNG's parameters keep them, as A1111's do).
    // (A prompt file's lines hold no tags: `prompt_file::read` refuses them.)
    let (prompt, tags) = if args.plain_prompt || args.prompts.is_some() {
        (jobs[0].prompt.clone(), Vec::new())
    } else {
        sd::lora::extract_prompt_loras(&jobs[0].prompt).map_err(|e| e.to_string())?
    };
    let mut loras = Vec::new();
    for arg in &args.lora {
        let spec = sd::lora::parse_lora_arg(arg).map_err(|e| e.to_string())?;
        loras.push((open_lora(Path::new(&spec.file))?, spec.weight));
    }
    for tag in tags {
        let dir = args.lora_dir.as_deref().ok_or_else(|| {
            format!(
                "the prompt names <lora:{}>; give --lora-dir (the folder holding {}.safetensors)",
                tag.file, tag.file
            )
        })?;
        let path = find_lora(dir, &tag.file)?;
        loras.push((open_lora(&path)?, tag.weight));
    }
    let model = model.with_loras(loras).map_err(|e| e.to_string())?;
    if args.mask.is_some() && args.init_image.is_none() {
        return Err("--mask needs --init-image (the image to paint into)".into());
    }
    if args.strength.is_some() && args.init_image.is_none() {
        return Err("--strength needs --init-image".into());
    }
    if args.init_latents.is_some() && args.init_image.is_some() {
        return Err(
            "--init-latents and --init-image exclude each other (the starting image sets the \
             latents)"
                .into(),
        );
    }
    // ControlNet images are read before the memory check: without a size asked for, the first
    // one sets the output size.
    let asked = match (header_size, args.width, args.height) {
        (Some((w, h)), ..) => Some((w as usize, h as usize)),
        (None, None, None) => None,
        (None, w, h) => Some((
            w.unwrap_or(model.default_size()),
            h.unwrap_or(model.default_size()),
        )),
    };
    let (controls, control_size) = read_controls(&args, &model, asked)?;
    let image_prompt = read_image_prompt(&args, &model)?;
    // The memory check, before any image is decoded or weight read: it applies where the host
    // holds the tensors, and on a GPU backend only when a budget is given. A starting image's
    // size comes from its header.
    let budget = match max_memory {
        Some(b) => Some(b),
        None if matches!(backend.as_str(), "flex" | "ndarray") => sd::memory::available_memory(),
        None => None,
    };
    if let Some(budget) = budget {
        let probe = GenerateOptions {
            width: control_size.map(|(w, _)| w).or(args.width),
            height: control_size.map(|(_, h)| h).or(args.height),
            controls: controls.clone(),
            num_images: args.num_images,
            guidance: sd::Guidance {
                scale: guidance,
                ..Default::default()
            },
            vae_tiling: args.vae_tiling,
            latent_tiling: unet_tiling(&args)?,
            ..GenerateOptions::default()
        };
        let size = probe.size(&model).map_err(|e| e.to_string())?;
        check_memory(&model, &probe, size, budget)?;
        if let Some(scale) = args.hires_scale {
            // The hires pass renders one image at a time, at the larger size.
            let big = hires_size(size, scale, model.vae_scale_factor());
            let probe = GenerateOptions {
                width: Some(big.0),
                height: Some(big.1),
                num_images: 1,
                controls: Vec::new(),
                ..probe
            };
            check_memory(&model, &probe, big, budget)?;
        }
    }
    let upscaler = match &args.upscale {
        // The Stable Diffusion x4 upscaler's folder: after decoding, guided by the prompt.
        Some(path) if path.is_dir() => {
            if args.hires_scale.is_some() {
                return Err(format!(
                    "--hires-scale enlarges with Real-ESRGAN or Lanczos; {} is the x4 upscaler: \
                     use it alone (--upscale) or give a Real-ESRGAN file",
                    path.display()
                ));
            }
            let x4 = Model::from_folder(path, None)
                .map_err(|e| e.to_string())?
                .with_dtype(compute_dtype)
                .with_matrix_dtype(dtype);
            if x4.upscaler().is_none() {
                return Err(format!(
                    "--upscale {}: not an upscaler (a StableDiffusionUpscalePipeline folder or a \
                     Real-ESRGAN file)",
                    path.display()
                ));
            }
            let name = path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some((PostUpscaler::X4(Box::new(x4)), name))
        }
        Some(path) => {
            let model =
                sd_upscale::Upscaler::load(path, &Default::default()).map_err(|e| e.to_string())?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some((PostUpscaler::Esrgan(model), name))
        }
        None => None,
    };
    let init_image = match &args.init_image {
        Some(path) => Some(sd::core::image_io::image_to_data(
            &sd::core::image_io::read_rgb(path, model.vae_scale_factor())
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let mask = match &args.mask {
        Some(path) => Some(read_mask(path)?),
        None => None,
    };
    let task = match (init_image, mask) {
        (Some(image), None) => Task::Image(sd::ImageTask {
            image,
            strength: args.strength.unwrap_or(0.8),
        }),
        (Some(image), Some(mask)) => Task::Inpaint(sd::InpaintTask {
            image,
            mask,
            strength: args.strength.unwrap_or(1.0),
        }),
        (None, _) => Task::Text {
            latents: match &args.init_latents {
                Some(path) => Some(read_latents(path)?),
                None => None,
            },
        },
    };
    let options = GenerateOptions {
        prompt: sd::PromptOptions {
            text: prompt,
            negative: jobs[0].negative_prompt.clone(),
            clip_skip: args.clip_skip,
            syntax: if args.plain_prompt {
                PromptSyntax::Plain
            } else {
                PromptSyntax::Weighted
            },
        },
        guidance: sd::Guidance {
            scale: guidance,
            rescale: args.guidance_rescale,
        },
        sampling: sd::Sampling {
            steps,
            seed: jobs[0].seed,
            scheduler: args.scheduler.clone(),
            karras: args.karras,
            config: None,
        },
        task,
        width: control_size.map(|(w, _)| w).or(args.width),
        height: control_size.map(|(_, h)| h).or(args.height),
        num_images: args.num_images,
        vae_tiling: args.vae_tiling,
        latent_tiling: unet_tiling(&args)?,
        controls,
        guess_mode: args.guess_mode,
        image_prompt,
        ..GenerateOptions::default()
    };
    let first_size = options.size(&model).map_err(|e| e.to_string())?;
    let after = After {
        upscaler: upscaler.as_ref().map(|(m, name)| (m, name.clone())),
        hires: args.hires_scale.map(|scale| Hires {
            scale,
            strength: hires_strength,
            steps: hires_steps,
            size: hires_size(first_size, scale, model.vae_scale_factor()),
        }),
    };
    let started = Instant::now();
    let mut messages = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        // The first job's prompt had its LoRA tags taken out above; a file's lines have none.
        let options = GenerateOptions {
            prompt: sd::PromptOptions {
                text: if i == 0 {
                    options.prompt.text.clone()
                } else {
                    job.prompt.clone()
                },
                negative: job.negative_prompt.clone(),
                ..options.prompt.clone()
            },
            sampling: sd::Sampling {
                seed: job.seed,
                ..options.sampling.clone()
            },
            ..options.clone()
        };
        let message = match backend.as_str() {
            #[cfg(feature = "cuda")]
            "cuda" => generate::<sd::backend::Cuda>(
                &model,
                &options,
                &args,
                &after,
                job,
                &Default::default(),
            ),
            #[cfg(feature = "wgpu")]
            "wgpu" => generate::<sd::backend::Wgpu>(
                &model,
                &options,
                &args,
                &after,
                job,
                &sd::backend::wgpu_device(),
            ),
            #[cfg(feature = "flex")]
            "flex" => generate::<sd::backend::Flex>(
                &model,
                &options,
                &args,
                &after,
                job,
                &Default::default(),
            ),
            #[cfg(feature = "ndarray")]
            "ndarray" => generate::<sd::backend::NdArray>(
                &model,
                &options,
                &args,
                &after,
                job,
                &Default::default(),
            ),
            other => Err(format!("backend `{other}` is not compiled in")),
        }?;
        messages.push(message);
    }
    match &args.prompts {
        None => Ok(messages.join("\n")),
        Some(file) => Ok(format!(
            "wrote {} image(s) for {} in {:.1} s",
            jobs.len(),
            file.display(),
            started.elapsed().as_secs_f64()
        )),
    }
}

/// One image (or one batch of `--num-images`) to render: a prompt, its seed and where it goes.
pub struct Job {
    /// How errors name it: "the prompt" or "FILE: line N".
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    paths: Vec<PathBuf>,
}

/// What the flags ask for: the one prompt, or the lines of `--prompts` of this `--shard` whose
/// image is not written yet (none when the whole share is done).
fn jobs(args: &GenerateArgs) -> Result<Vec<Job>, String> {
    let Some(file) = &args.prompts else {
        let output = args.output.clone().unwrap_or_else(|| "output.png".into());
        return Ok(vec![Job {
            name: "the prompt".into(),
            prompt: args.prompt.clone().unwrap_or_default(),
            negative_prompt: args.negative_prompt.clone(),
            seed: args.seed,
            paths: output_paths(&output, args.num_images),
        }]);
    };
    if args.num_images != 1 {
        return Err("--prompts makes one image per line; drop --num-images".into());
    }
    let (shard, shards) = match &args.shard {
        Some(text) => crate::prompt_file::parse_shard(text)?,
        None => (0, 1),
    };
    let dir = args.output.clone().unwrap_or_else(|| "outputs".into());
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let lines = crate::prompt_file::read(file)?;
    let mut jobs = Vec::new();
    for line in lines.iter().filter(|l| l.index % shards == shard) {
        let path = crate::prompt_file::output_path(&dir, line);
        if path.is_file() {
            continue;
        }
        jobs.push(Job {
            name: format!("{}: prompt {}", file.display(), line.index),
            prompt: line.prompt.clone(),
            negative_prompt: line
                .negative_prompt
                .clone()
                .or(args.negative_prompt.clone()),
            seed: line
                .seed
                .unwrap_or(args.seed.wrapping_add(line.index as u64)),
            paths: vec![path],
        });
    }
    Ok(jobs)
}

/// Refuses a run estimated to need more memory than `budget`, saying how much and what helps.
fn check_memory(
    model: &Model,
    options: &GenerateOptions,
    size: (usize, usize),
    budget: f64,
) -> Result<(), String> {
    use sd::memory::Gib;
    let estimate = sd::memory::estimate(model, options, size);
    let need = estimate.peak();
    if need <= budget {
        return Ok(());
    }
    let tiling = if !options.vae_tiling && estimate.peak_tiled() <= budget {
        format!(
            "; with --vae-tiling it would need {}",
            Gib(estimate.peak_tiled())
        )
    } else {
        String::new()
    };
    Err(format!(
        "this run would need about {} of memory (U-Net: {} of weights and {} of activations; VAE \
         decode: {}) but {} is available{tiling}; make the images smaller or fewer, or set \
         --max-memory to override",
        Gib(need),
        Gib(estimate.unet_weights),
        Gib(estimate.unet_activations),
        Gib(estimate.vae_weights
            + if options.vae_tiling {
                estimate.vae_activations_tiled
            } else {
                estimate.vae_activations
            }),
        Gib(budget),
    ))
}

fn generate<B: Backend>(
    model: &Model,
    options: &GenerateOptions,
    args: &GenerateArgs,
    after: &After<'_>,
    job: &Job,
    device: &B::Device,
) -> Result<String, String> {
    if model.dtype() != DType::F32 {
        // Every tensor the run creates (weights, noise, activations) takes the device's
        // default float dtype: set it before the first one.
        burn::tensor::set_default_dtypes::<B>(device, model.dtype(), DType::I64)
            .map_err(|e| format!("this backend cannot compute in {:?}: {e:?}", model.dtype()))?;
    }
    let bar = crate::progress_bar(
        args.quiet,
        options.sampling.steps as u64,
        "{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta}",
    );
    bar.set_message("loading");
    let started = Instant::now();
    // When each step ended, for --verbose.
    let mut step_ends = Vec::new();
    let mut callback = |p: &StepProgress<'_, B>| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        bar.set_message("denoising");
        step_ends.push(Instant::now());
        true
    };
    let out = sd::generate::<B>(model, options, device, Some(&mut callback))
        .map_err(|e| e.to_string())?;
    let mut images = sd::to_images(out.images).map_err(|e| e.to_string())?;
    let mut notes = String::new();
    if let Some(hires) = after.hires {
        // A1111's hires fix: each image enlarged, then denoised again at that size from the
        // same seed.
        let (w, h) = hires.size;
        for (i, image) in images.iter_mut().enumerate() {
            bar.set_message("hires upscaling");
            let big = enlarge(
                image,
                (w, h),
                after.upscaler.as_ref().and_then(|(m, _)| m.esrgan()),
            )?;
            let second = GenerateOptions {
                task: Task::Image(sd::ImageTask {
                    image: sd::core::image_io::image_to_data(&big),
                    strength: hires.strength,
                }),
                sampling: sd::Sampling {
                    steps: hires.steps,
                    seed: options.sampling.seed.wrapping_add(i as u64),
                    ..options.sampling.clone()
                },
                width: Some(w),
                height: Some(h),
                num_images: 1,
                // The ControlNets steer the hires pass too, their images resized to its size
                // (as A1111's extension does).
                controls: options
                    .controls
                    .iter()
                    .map(|c| resize_control(c, (w, h)))
                    .collect::<Result<_, _>>()?,
                ..options.clone()
            };
            let mut callback = |p: &StepProgress<'_, B>| {
                bar.set_length(p.total as u64);
                bar.set_position(p.step as u64);
                bar.set_message("hires pass");
                true
            };
            let out = sd::generate::<B>(model, &second, device, Some(&mut callback))
                .map_err(|e| e.to_string())?;
            *image = sd::to_images(out.images)
                .map_err(|e| e.to_string())?
                .remove(0);
        }
        let upscaler = after
            .upscaler
            .as_ref()
            .map_or("Lanczos", |(_, n)| n.as_str());
        notes = format!(
            ", Denoising strength: {}, Hires upscale: {}, Hires steps: {}, Hires upscaler: {upscaler}",
            hires.strength, hires.scale, hires.steps
        );
    } else if let Some((upscaler, name)) = &after.upscaler {
        for (i, image) in images.iter_mut().enumerate() {
            bar.set_message("upscaling");
            *image = match upscaler {
                PostUpscaler::Esrgan(model) => run_upscaler(model, image)?,
                PostUpscaler::X4(x4) => {
                    // The generation's prompt and settings guide the added detail; the
                    // image's seed its noise.
                    let seed = options.sampling.seed.wrapping_add(i as u64);
                    let settings = GenerateOptions {
                        num_images: 1,
                        sampling: sd::Sampling {
                            seed,
                            ..options.sampling.clone()
                        },
                        task: Task::default(),
                        ..options.clone()
                    };
                    let mut noise = sd::schedulers::HostNoise::per_image(seed, 1);
                    let mut callback = |p: &StepProgress<'_, B>| {
                        bar.set_length(p.total as u64);
                        bar.set_position(p.step as u64);
                        bar.set_message("x4 upscaling");
                        true
                    };
                    let out = sd::upscale_x4_with_noise::<B>(
                        x4,
                        &settings,
                        sd::core::image_io::image_to_data(image),
                        sd::DEFAULT_NOISE_LEVEL,
                        device,
                        &mut noise,
                        Some(&mut callback),
                    )
                    .map_err(|e| e.to_string())?;
                    sd::to_images(out.images)
                        .map_err(|e| e.to_string())?
                        .remove(0)
                }
            };
        }
        notes = format!(
            ", Postprocess upscale by: {}, Postprocess upscaler: {name}",
            upscaler.scale()
        );
    }
    bar.finish_and_clear();
    let paths = &job.paths;
    for (i, (image, path)) in images.iter().zip(paths).enumerate() {
        // A1111 keeps the <lora:…> tags in the prompt it records.
        let recorded = GenerateOptions {
            prompt: sd::PromptOptions {
                text: job.prompt.clone(),
                ..options.prompt.clone()
            },
            sampling: sd::Sampling {
                seed: options.sampling.seed.wrapping_add(i as u64),
                ..options.sampling.clone()
            },
            ..options.clone()
        };
        let text = sd::parameters_text(model, &recorded, &out.sampler) + &notes;
        sd::save_png(image, path, &text).map_err(|e| e.to_string())?;
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    if args.verbose {
        bar.suspend(|| eprintln!("{}", stage_times(crate::process_start(), &step_ends)));
    }
    Ok(format!(
        "wrote {} in {:.1} s",
        names.join(", "),
        started.elapsed().as_secs_f64()
    ))
}

/// `--verbose`'s line: seconds from `start` to the first U-Net step (the loading and the
/// prompt encoding), per step, and from the last step to now, from the instants the steps
/// ended. A step's time is the mean of the steps after the first (the first also faults in
/// its buffers); the first began that long before it ended.
fn stage_times(start: Instant, step_ends: &[Instant]) -> String {
    let Some(&first_end) = step_ends.first() else {
        return format!(
            "timings: no step, {:.2} s in all",
            start.elapsed().as_secs_f64()
        );
    };
    let last_end = step_ends[step_ends.len() - 1];
    let after = last_end.elapsed().as_secs_f64();
    let later = step_ends.len() - 1;
    match (last_end - first_end).as_secs_f64() / later as f64 {
        step if later > 0 => format!(
            "timings: first step began {:.2} s after the start, {} steps of {step:.2} s (mean \
             of the later ones), {after:.2} s after the last",
            (first_end - start).as_secs_f64() - step,
            step_ends.len()
        ),
        _ => format!(
            "timings: the one step ended {:.2} s after the start, {after:.2} s after it",
            (first_end - start).as_secs_f64()
        ),
    }
}
