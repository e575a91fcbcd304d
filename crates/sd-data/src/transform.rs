//! From an image file to a training sample, as `train_text_to_image.py`'s transforms do:
//! resize the short side to the resolution (bilinear, antialiased), crop to a square (centre
//! or random), flip at random, and map to `[-1, 1]`; and the caption's dropout and shuffle.

use std::path::Path;

use image::imageops::FilterType;
use rand::{Rng, RngExt};

use crate::error::{DataError, Result};

/// The image side of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    /// The square side, in pixels (a multiple of 8, the VAE's factor).
    pub resolution: u32,
    /// Crop the centre (`--center_crop`) rather than a random square.
    pub center_crop: bool,
    /// Mirror left-right with probability ½ (`--random_flip`).
    pub random_flip: bool,
}

impl Transform {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) || self.resolution > 8192 {
            return Err(DataError::Config(format!(
                "the resolution must be a positive multiple of 8 up to 8192, got {}",
                self.resolution
            )));
        }
        Ok(())
    }
}

/// The caption side of it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CaptionOptions {
    /// Replace the caption by the empty one with this probability (kohya's
    /// `caption_dropout_rate`), so that the model also learns the unconditional prediction
    /// classifier-free guidance needs.
    pub dropout: f64,
    /// Shuffle the comma-separated tags (kohya's `shuffle_caption`) ...
    pub shuffle: bool,
    /// ... keeping this many leading tags in place (`keep_tokens`).
    pub keep_tags: usize,
}

impl CaptionOptions {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.dropout) {
            return Err(DataError::Config(format!(
                "caption dropout must be in [0, 1], got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// One use of an example's captions: pick one, drop it out or shuffle its tags.
    pub fn caption(&self, captions: &[String], rng: &mut impl Rng) -> String {
        let caption = match captions.len() {
            0 => String::new(),
            1 => captions[0].clone(),
            n => captions[rng.random_range(0..n)].clone(),
        };
        // Always draw, so that the stream of choices does not depend on the setting.
        let drop = rng.random::<f64>() < self.dropout;
        if drop {
            return String::new();
        }
        if self.shuffle {
            let mut tags: Vec<&str> = caption.split(',').map(str::trim).collect();
            let keep = self.keep_tags.min(tags.len());
            let rest = &mut tags[keep..];
            for i in (1..rest.len()).rev() {
                let j = rng.random_range(0..=i);
                rest.swap(i, j);
            }
            return tags.join(", ");
        }
        caption
    }
}

/// Reads `path` and transforms it: `3 · s · s` values in `[-1, 1]`, channel-major (CHW).
/// An unreadable, truncated, empty or oversized image is an error naming the file.
pub fn load_example_image(
    path: &Path,
    transform: &Transform,
    rng: &mut impl Rng,
) -> Result<Vec<f32>> {
    Ok(load_example_image_cropped(path, transform, rng)?.0)
}

/// Where a training image came from, as SDXL's size and crop conditioning reads it
/// (`original_size`, `crops_coords_top_left` of diffusers' `train_text_to_image_sdxl.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropInfo {
    /// The file's `(width, height)` before resizing.
    pub original: (u32, u32),
    /// The crop's top-left corner `(x, y)` in the resized image, as seen after the flip (the
    /// reference flips before it crops).
    pub top_left: (u32, u32),
}

/// [`load_example_image`] with where its crop was taken.
pub fn load_example_image_cropped(
    path: &Path,
    transform: &Transform,
    rng: &mut impl Rng,
) -> Result<(Vec<f32>, CropInfo)> {
    let image = sd_core::image_io::decode_image(path)?.to_rgb8();
    let (w, h) = image.dimensions();
    let s = transform.resolution;
    // Short side to `s`, keeping the aspect ratio (torchvision's Resize(int)).
    let resized = if w <= h {
        (
            s,
            ((u64::from(h) * u64::from(s)) / u64::from(w)).max(u64::from(s)) as u32,
        )
    } else {
        (
            ((u64::from(w) * u64::from(s)) / u64::from(h)).max(u64::from(s)) as u32,
            s,
        )
    };
    Ok(crop(image, resized, (s, s), transform, rng))
}

/// Reads `path` for its aspect-ratio bucket: resized to `resized` (from
/// [`crate::BucketConfig::assign`]), cropped to `bucket` (`(width, height)`), flipped as the
/// transform says: `3 · height · width` values in `[-1, 1]`, CHW.
pub fn load_bucketed_image(
    path: &Path,
    bucket: (u32, u32),
    resized: (u32, u32),
    transform: &Transform,
    rng: &mut impl Rng,
) -> Result<Vec<f32>> {
    Ok(load_bucketed_image_cropped(path, bucket, resized, transform, rng)?.0)
}

/// [`load_bucketed_image`] with where its crop was taken.
pub fn load_bucketed_image_cropped(
    path: &Path,
    bucket: (u32, u32),
    resized: (u32, u32),
    transform: &Transform,
    rng: &mut impl Rng,
) -> Result<(Vec<f32>, CropInfo)> {
    let image = sd_core::image_io::decode_image(path)?.to_rgb8();
    Ok(crop(image, resized, bucket, transform, rng))
}

/// Resizes `image` to `resized` (bilinear, antialiased), crops `target` (centre or random,
/// as the transform says) and flips at random; to `[-1, 1]`, CHW, with where the crop was.
fn crop(
    image: image::RgbImage,
    (nw, nh): (u32, u32),
    (tw, th): (u32, u32),
    transform: &Transform,
    rng: &mut impl Rng,
) -> (Vec<f32>, CropInfo) {
    let original = image.dimensions();
    let (nw, nh) = (nw.max(tw), nh.max(th));
    let resized = if (nw, nh) == image.dimensions() {
        image
    } else {
        image::imageops::resize(&image, nw, nh, FilterType::Triangle)
    };
    let (x0, y0) = if transform.center_crop {
        ((nw - tw) / 2, (nh - th) / 2)
    } else {
        (rng.random_range(0..=nw - tw), rng.random_range(0..=nh - th))
    };
    let flip = transform.random_flip && rng.random::<bool>();
    let (w, h) = (tw as usize, th as usize);
    let mut out = vec![0f32; 3 * w * h];
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            let p = resized.get_pixel(x0 + sx as u32, y0 + y as u32);
            for c in 0..3 {
                out[c * w * h + y * w + x] = f32::from(p[c]) / 127.5 - 1.0;
            }
        }
    }
    // Flipping the crop equals cropping the flipped image at the mirrored left edge.
    let left = if flip { nw - tw - x0 } else { x0 };
    (
        out,
        CropInfo {
            original,
            top_left: (left, y0),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever crop and flip were drawn, the pixels are the flipped image's at the reported
    /// corner (what SDXL's crop ids describe).
    #[test]
    fn the_reported_crop_is_where_the_pixels_come_from_in_the_flipped_image() {
        let (w, h) = (48u32, 32u32);
        let image =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 9]));
        let path = std::env::temp_dir().join(format!("sd-data-crop-{}.png", std::process::id()));
        image.save(&path).unwrap();
        let transform = Transform {
            resolution: 32,
            center_crop: false,
            random_flip: true,
        };
        let (mut flipped, mut lefts) = (0, std::collections::BTreeSet::new());
        for seed in 0..40 {
            let mut rng = crate::sample_rng(seed, 0);
            let (pixels, info) = load_example_image_cropped(&path, &transform, &mut rng).unwrap();
            assert_eq!(info.original, (w, h));
            let (left, top) = info.top_left;
            lefts.insert(left);
            let s = 32usize;
            let mut was_flipped = true;
            for y in 0..s {
                for x in 0..s {
                    // Pixel x of the flipped image is pixel w - 1 - x of the original.
                    let p = image.get_pixel(w - 1 - (left + x as u32), top + y as u32);
                    let got = pixels[y * s + x];
                    if (got - (f32::from(p[0]) / 127.5 - 1.0)).abs() > 1e-6 {
                        was_flipped = false;
                    }
                }
            }
            if was_flipped {
                flipped += 1;
            } else {
                // Not flipped: the original at the corner.
                for y in 0..s {
                    for x in 0..s {
                        let p = image.get_pixel(left + x as u32, top + y as u32);
                        assert!((pixels[y * s + x] - (f32::from(p[0]) / 127.5 - 1.0)).abs() < 1e-6);
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
        assert!(flipped > 5 && flipped < 35, "{flipped} of 40 flipped");
        assert!(lefts.len() > 3, "{lefts:?}");
    }
}
