//! Image files to RGB, as the reference packages read them (`PIL.Image.open(path).convert("RGB")`):
//! JPEG through libjpeg-turbo's decoder (mozjpeg's copy of it: integer "slow" IDCT and fancy
//! chroma upsampling, PIL's defaults), everything else through the `image` crate, whose PNG,
//! BMP and WebP decoders are exact.

use std::path::Path;

use image::RgbImage;

use crate::error::{MetricsError, Result};

/// Reads `path` as 8-bit RGB the way PIL does.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let fail = |reason: String| MetricsError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = sd_core::files::read_regular(path).map_err(|e| fail(e.to_string()))?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(&bytes).map_err(fail);
    }
    let image = image::load_from_memory(&bytes).map_err(|e| fail(e.to_string()))?;
    Ok(image.to_rgb8())
}

/// A JPEG decoded by libjpeg-turbo's decoder to RGB (greyscale and CMYK converted by it).
pub fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, Vec<u8>)> {
        let started = mozjpeg::Decompress::new_mem(bytes)?.rgb()?;
        let (width, height) = (started.width(), started.height());
        let mut started = started;
        let pixels: Vec<[u8; 3]> = started.read_scanlines()?;
        started.finish()?;
        Ok((width, height, pixels.into_iter().flatten().collect()))
    });
    let (width, height, pixels) = match decoded {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Err(format!("not a readable JPEG ({e})")),
        Err(_) => return Err("not a readable JPEG (the decoder gave up)".into()),
    };
    if width == 0 || height == 0 {
        return Err("a JPEG of 0 pixels".into());
    }
    RgbImage::from_raw(width as u32, height as u32, pixels)
        .ok_or_else(|| "the JPEG decoder returned too few pixels".into())
}
