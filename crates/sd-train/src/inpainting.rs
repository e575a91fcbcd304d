//! Training data for an inpainting U-Net (9 input channels: the noisy latents, the mask and the
//! masked image's latents), as diffusers' inpainting training scripts make it
//! (`examples/research_projects/dreambooth_inpaint`): a random rectangle or ellipse as the
//! mask (`random_mask`), the image with the masked pixels set to 0 (`image * (mask < 0.5)`,
//! mid-grey in `[-1, 1]`), and the mask brought to the latents' size by nearest-neighbour
//! sampling (`F.interpolate(mask, size=latent size)`).

use rand::{Rng, RngExt};

/// A `w × h` mask (row-major, 1 inside, 0 outside) as `random_mask(ratio=1)`: a size from 0 to
/// the image's on each axis, a centre that keeps half of it inside, then a rectangle or an
/// ellipse (one chance in two) over the box `centre ± size / 2`, both ends included as PIL
/// draws them.
pub fn random_mask(w: usize, h: usize, rng: &mut impl Rng) -> Vec<f32> {
    let (sw, sh) = (rng.random_range(0..=w), rng.random_range(0..=h));
    let cx = rng.random_range(sw / 2..=w - sw / 2);
    let cy = rng.random_range(sh / 2..=h - sh / 2);
    let ellipse = rng.random_bool(0.5);
    let (x0, x1) = (cx as f64 - (sw / 2) as f64, cx as f64 + (sw / 2) as f64);
    let (y0, y1) = (cy as f64 - (sh / 2) as f64, cy as f64 + (sh / 2) as f64);
    let (mx, my) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    // Half-axes at least half a pixel: a zero-width box still marks its line.
    let (rx, ry) = (((x1 - x0) / 2.0).max(0.5), ((y1 - y0) / 2.0).max(0.5));
    let mut mask = vec![0.0; w * h];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64, y as f64);
            let inside = if ellipse {
                ((fx - mx) / rx).powi(2) + ((fy - my) / ry).powi(2) <= 1.0
            } else {
                (x0..=x1).contains(&fx) && (y0..=y1).contains(&fy)
            };
            if inside {
                mask[y * w + x] = 1.0;
            }
        }
    }
    mask
}

/// The images (`[n, 3, h, w]`, row-major) with every pixel the matching mask (`[n, h, w]`)
/// marks set to 0.
pub fn masked_images(images: &[f32], masks: &[f32], n: usize, w: usize, h: usize) -> Vec<f32> {
    let plane = w * h;
    let mut out = images.to_vec();
    for i in 0..n {
        let mask = &masks[i * plane..(i + 1) * plane];
        for c in 0..3 {
            let start = (i * 3 + c) * plane;
            for (value, &m) in out[start..start + plane].iter_mut().zip(mask) {
                if m >= 0.5 {
                    *value = 0.0;
                }
            }
        }
    }
    out
}

/// The masks (`[n, h, w]`) at the latents' size (`[n, h / factor, w / factor]`) by
/// nearest-neighbour sampling, as `F.interpolate`'s default mode (source index ⌊i · h / h'⌋).
pub fn latent_masks(masks: &[f32], n: usize, w: usize, h: usize, factor: usize) -> Vec<f32> {
    let (lw, lh) = (w / factor, h / factor);
    let mut out = Vec::with_capacity(n * lw * lh);
    for i in 0..n {
        for y in 0..lh {
            let sy = y * h / lh;
            for x in 0..lw {
                let sx = x * w / lw;
                out.push(masks[i * w * h + sy * w + sx]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_boxes_or_ellipses_inside_the_image_and_shrink_by_nearest_sampling() {
        let mut rng = sd_data::sample_rng(3, 0);
        let (mut rectangles, mut ellipses) = (0, 0);
        for _ in 0..200 {
            let mask = random_mask(16, 12, &mut rng);
            assert_eq!(mask.len(), 16 * 12);
            let marked = mask.iter().filter(|&&m| m == 1.0).count();
            // A full box of the marked rows and columns is a rectangle; less, an ellipse.
            let rows: Vec<usize> = (0..12)
                .filter(|y| mask[y * 16..(y + 1) * 16].contains(&1.0))
                .collect();
            let cols: Vec<usize> = (0..16)
                .filter(|x| (0..12).any(|y| mask[y * 16 + x] == 1.0))
                .collect();
            if marked > 0 && marked == rows.len() * cols.len() {
                rectangles += 1;
            } else if marked > 0 {
                ellipses += 1;
            }
        }
        assert!(rectangles > 40 && ellipses > 40, "{rectangles} {ellipses}");

        // Pixel (2y, 2x) of each 2 × 2 block.
        let mask: Vec<f32> = (0..16).map(|i| (i % 3 == 0) as u8 as f32).collect();
        let small = latent_masks(&mask, 1, 4, 4, 2);
        assert_eq!(small, vec![mask[0], mask[2], mask[8], mask[10]]);
        let images = vec![0.5f32; 3 * 16];
        let masked = masked_images(&images, &mask, 1, 4, 4);
        for c in 0..3 {
            for p in 0..16 {
                let want = if mask[p] == 1.0 { 0.0 } else { 0.5 };
                assert_eq!(masked[c * 16 + p], want);
            }
        }
    }
}
