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
    let image = image::open(path)
        .map_err(|e| CoreError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .to_rgb8();
    check_image_size(image.width() as usize, image.height() as usize, multiple).map_err(|e| {
        CoreError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok(image)
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
