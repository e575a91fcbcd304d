//! `sd upscale IMAGE --model FILE`: Real-ESRGAN after the decoder, on any image.

use std::path::{Path, PathBuf};

use clap::Args;
use sd_upscale::{TileOptions, Upscaler};

type B = sd::backend::Flex;

#[derive(Args)]
pub struct UpscaleArgs {
    /// The image to enlarge (PNG, JPEG or WebP).
    image: PathBuf,
    /// A Real-ESRGAN model: `RealESRGAN_x4plus.pth`, `RealESRGAN_x2plus.pth`,
    /// `realesr-general-x4v3.pth`, the anime models, or a .safetensors with the same keys.
    #[arg(long, short = 'm')]
    model: PathBuf,
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
    let model = Upscaler::<B>::load(&args.model, &device).map_err(|e| e.to_string())?;
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
