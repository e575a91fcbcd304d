//! Images out: PNG files that carry their generation parameters in an A1111-style
//! `parameters` text chunk, which other Stable Diffusion tools read back.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use image::RgbImage;

use crate::error::Result;
use crate::model::Model;
use crate::pipeline::GenerateOptions;

/// Decoded images in `[-1, 1]` as 8-bit RGB: `round(255 · clamp((x + 1) / 2))`, as diffusers'
/// image processor does.
pub fn to_images<B: Backend>(images: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
    Ok(sd_core::image_io::tensor_to_images(images)?)
}

/// The A1111 `parameters` text: the prompt, `Negative prompt: ...`, then one line of
/// `Key: value` pairs.
pub fn parameters_text(model: &Model, options: &GenerateOptions, sampler: &str) -> String {
    let size = options.size(model).unwrap_or((0, 0));
    let mut text = options.prompt.text.clone();
    if let Some(negative) = &options.prompt.negative {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    let mut fields = vec![
        format!("Steps: {}", options.sampling.steps),
        format!("Sampler: {sampler}"),
    ];
    if options.sampling.karras {
        fields.push("Schedule type: Karras".into());
    }
    fields.push(format!("CFG scale: {}", options.guidance.scale));
    fields.push(format!("Seed: {}", options.sampling.seed));
    fields.push(format!("Size: {}x{}", size.0, size.1));
    if let Some(hash) = model.short_hash() {
        fields.push(format!("Model hash: {hash}"));
    }
    if let Some(name) = model.path().file_stem().and_then(|n| n.to_str()) {
        fields.push(format!("Model: {name}"));
    }
    if let Some(strength) = options.task.strength() {
        fields.push(format!("Denoising strength: {strength}"));
    }
    if options.prompt.clip_skip > 0 {
        fields.push(format!("Clip skip: {}", options.prompt.clip_skip + 1));
    }
    // A1111's `Lora hashes: "name: hash, …"` (the addnet hash's first 12 hex digits).
    let hashes: Vec<String> = model
        .loras()
        .iter()
        .filter_map(|(file, _)| {
            let hash = file.addnet_hash()?;
            Some(format!("{}: {}", file.name(), hash.get(..12)?))
        })
        .collect();
    if !hashes.is_empty() {
        fields.push(format!("Lora hashes: \"{}\"", hashes.join(", ")));
    }
    // A1111's ControlNet extension: `ControlNet 0: "Module: canny, Model: …, Weight: 1, …"`.
    for (i, c) in options.controls.iter().enumerate() {
        fields.push(format!(
            "ControlNet {i}: \"Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance \
             End: {}\"",
            c.preprocessor,
            c.net.name(),
            c.scale,
            c.start,
            c.end
        ));
    }
    if let Some(prompt) = &options.image_prompt {
        fields.push(format!(
            "IP-Adapter: \"Model: {}, Weight: {}\"",
            prompt.name(),
            prompt.scale
        ));
    }
    if options.guess_mode && !options.controls.is_empty() {
        fields.push("ControlNet guess mode: True".into());
    }
    fields.push(format!("Version: sd {}", env!("CARGO_PKG_VERSION")));
    text.push('\n');
    text.push_str(&fields.join(", "));
    text
}

/// Writes `image` as a PNG with `parameters` in a `tEXt` chunk (an `iTXt` one when the text is
/// not Latin-1). The file appears only when it is complete ([`sd_core::files::write_atomic`]:
/// written beside the target and renamed), so a failure leaves no half-written image, and a
/// path that exists as anything but a regular file (a folder, a device, a symlink) is refused.
pub fn save_png(image: &RgbImage, path: impl AsRef<Path>, parameters: &str) -> Result<()> {
    sd_core::files::write_atomic(path, |out| {
        let mut encoder = png::Encoder::new(out, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let latin1 = parameters.chars().all(|c| (c as u32) < 256);
        if latin1 {
            encoder
                .add_text_chunk("parameters".into(), parameters.into())
                .map_err(|e| e.to_string())?;
        } else {
            encoder
                .add_itxt_chunk("parameters".into(), parameters.into())
                .map_err(|e| e.to_string())?;
        }
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(image.as_raw())
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// The `parameters` text of a PNG written by [`save_png`] (or by A1111): `None` when the file
/// has none.
pub fn read_parameters(path: impl AsRef<Path>) -> Result<Option<String>> {
    let path = path.as_ref();
    let fail = |reason: String| sd_core::CoreError::Image {
        path: path.to_path_buf(),
        reason,
    };
    sd_core::files::regular_file(path)?;
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| fail(format!("not a readable PNG ({e})")))?;
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone());
    let international = || {
        info.utf8_text
            .iter()
            .find(|t| t.keyword == "parameters")
            .and_then(|t| t.get_text().ok())
    };
    Ok(latin1.or_else(international))
}

/// The prompt of an A1111-style `parameters` text: the lines before `Negative prompt:` or the
/// settings line (`Steps: …`).
pub fn prompt_of_parameters(parameters: &str) -> String {
    parameters
        .lines()
        .take_while(|l| !l.starts_with("Negative prompt: ") && !l.starts_with("Steps: "))
        .collect::<Vec<_>>()
        .join("\n")
}
