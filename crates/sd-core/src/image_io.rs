//! Images to and from tensors in `[-1, 1]`, as diffusers' `VaeImageProcessor` does it.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use image::RgbImage;

use crate::error::{CoreError, Result};

/// Checks that an image of `width`×`height` can go through a model that halves the resolution
/// `log2(multiple)` times.
pub fn check_image_size(width: usize, height: usize, multiple: usize) -> Result<()> {
    if width == 0
        || height == 0
        || !width.is_multiple_of(multiple)
        || !height.is_multiple_of(multiple)
    {
        return Err(CoreError::InvalidInput(format!(
            "image size {width}×{height}: width and height must be positive multiples of {multiple}"
        )));
    }
    Ok(())
}

/// An RGB image as a `[1, 3, h, w]` tensor: `2 · pixel / 255 − 1`.
pub fn image_to_tensor<B: Backend>(image: &RgbImage, device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(image_to_data(image), device)
}

/// An RGB image as `[1, 3, h, w]` data in `[-1, 1]`, for any backend.
pub fn image_to_data(image: &RgbImage) -> TensorData {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut planar = vec![0f32; 3 * h * w];
    for (x, y, pixel) in image.enumerate_pixels() {
        for c in 0..3 {
            planar[c * h * w + y as usize * w + x as usize] = pixel[c] as f32 / 127.5 - 1.0;
        }
    }
    TensorData::new(planar, [1, 3, h, w])
}

/// Reads a PNG or JPEG file as an RGB image whose sides are multiples of `multiple`.
pub fn read_rgb(path: impl AsRef<Path>, multiple: usize) -> Result<RgbImage> {
    let path = path.as_ref();
    let image = decode_image(path)?.to_rgb8();
    check_image_size(image.width() as usize, image.height() as usize, multiple).map_err(|e| {
        CoreError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok(image)
}

/// The largest side [`decode_image`] decodes, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most pixels [`decode_image`] decodes (8192², 64 Mpx): past it a few hundred bytes of
/// JPEG header make seconds of decoding and gigabytes of buffers (a decompression bomb), and
/// no Stable Diffusion run starts from such an image.
pub const MAX_IMAGE_PIXELS: u64 = 8192 * 8192;
/// The most memory [`decode_image`] lets one decode allocate: a 64 Mpx RGBA image fits.
pub const MAX_IMAGE_ALLOC: u64 = 4 * MAX_IMAGE_PIXELS + (16 << 20);

fn image_error(path: &Path, reason: impl ToString) -> CoreError {
    CoreError::Image {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// An image file's width and height, read from its header without decoding it (the format is
/// guessed from the bytes, not the extension). The path must be a regular file.
pub fn image_dimensions(path: impl AsRef<Path>) -> Result<(u32, u32)> {
    let path = path.as_ref();
    crate::files::regular_file(path)?;
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| image_error(path, e))?
        .into_dimensions()
        .map_err(|e| image_error(path, e))
}

/// Decodes an image file within limits: a regular file, at most [`MAX_IMAGE_SIDE`] pixels a
/// side and [`MAX_IMAGE_PIXELS`] in all (checked from the header, before decoding) and
/// [`MAX_IMAGE_ALLOC`] bytes, so that a
/// decompression bomb or a FIFO is one clear error rather than an abort or a hang.
pub fn decode_image(path: impl AsRef<Path>) -> Result<image::DynamicImage> {
    let path = path.as_ref();
    let (w, h) = image_dimensions(path)?;
    if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(image_error(
            path,
            format!("the image is {w}×{h}; sides from 1 to {MAX_IMAGE_SIDE} pixels are supported"),
        ));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_IMAGE_PIXELS {
        return Err(image_error(
            path,
            format!(
                "the image is {w}×{h}, {} Mpx; at most {} Mpx are decoded",
                pixels / 1_000_000,
                MAX_IMAGE_PIXELS / 1_000_000
            ),
        ));
    }
    check_png_palette(path)?;
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| image_error(path, e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    reader.decode().map_err(|e| image_error(path, e))
}

/// Refuses a PNG whose palette (`PLTE`) is not 1 to 256 whole RGB entries (the PNG
/// specification, 11.2.3): the `png` crate 0.18 does not check it, and an indexed image with a
/// 19-byte palette panicked in its palette expansion (found by the `image` fuzz target). Reads
/// the chunk headers before the first `IDAT` only; other files pass.
fn check_png_palette(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut file = std::fs::File::open(path).map_err(|e| image_error(path, e))?;
    let mut signature = [0u8; 8];
    if file.read_exact(&mut signature).is_err() || signature != SIGNATURE {
        return Ok(());
    }
    let mut header = [0u8; 8];
    // A truncated or odd chunk list is the decoder's to report.
    while file.read_exact(&mut header).is_ok() {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        match &header[4..] {
            b"PLTE" if length == 0 || length % 3 != 0 || length > 3 * 256 => {
                return Err(image_error(
                    path,
                    format!(
                        "its PNG palette (PLTE) is {length} bytes: 1 to 256 RGB entries of 3 \
                         bytes are allowed"
                    ),
                ));
            }
            b"IDAT" | b"IEND" => break,
            _ => {
                if file.seek(SeekFrom::Current(i64::from(length) + 4)).is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Reads a PNG or JPEG file as a `[1, 3, h, w]` tensor in `[-1, 1]`, checking that both sides are
/// multiples of `multiple` (the VAE's down-sampling factor).
pub fn load_image<B: Backend>(
    path: impl AsRef<Path>,
    multiple: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    Ok(image_to_tensor(&read_rgb(path, multiple)?, device))
}

/// A `[batch, 3, h, w]` tensor in `[-1, 1]` as RGB images: `round(255 · clamp((x + 1) / 2))`.
pub fn tensor_to_images<B: Backend>(images: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
    let [b, c, h, w] = images.dims();
    if c != 3 {
        return Err(CoreError::InvalidInput(format!(
            "expected 3 image channels, got {c}"
        )));
    }
    let data = ((images / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .into_data()
        .convert::<f32>();
    let values = data
        .as_slice::<f32>()
        .map_err(|e| CoreError::InvalidInput(format!("{e:?}")))?;
    Ok((0..b)
        .map(|n| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = |c: usize| values[((n * 3 + c) * h + y as usize) * w + x as usize] as u8;
                image::Rgb([at(0), at(1), at(2)])
            })
        })
        .collect())
}

/// Writes an image; the format follows the extension (PNG or JPEG).
pub fn save_image(image: &RgbImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    image.save(path).map_err(|e| CoreError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
