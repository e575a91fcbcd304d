use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Tile geometry for decoding large latents piece by piece, as diffusers' `AutoencoderKL` does:
/// tiles of `sample_size / f` latents, a quarter of each overlapping its neighbours, and the
/// overlaps cross-faded linearly so that no seam shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Tile side in latents (`tile_latent_min_size`).
    pub latent_tile: usize,
    /// Tile side in pixels (`tile_sample_min_size`).
    pub sample_tile: usize,
    /// Fraction of a tile shared with the next one (`tile_overlap_factor`).
    pub overlap: f64,
}

impl Tiling {
    /// diffusers' defaults for a VAE trained at `sample_size` that up-samples by `factor`.
    pub fn new(sample_size: usize, factor: usize) -> Self {
        Self {
            latent_tile: (sample_size / factor).max(1),
            sample_tile: sample_size,
            overlap: 0.25,
        }
    }

    /// Decodes `z` tile by tile with `decode` and blends the tiles.
    pub fn decode<B: Backend>(
        &self,
        z: Tensor<B, 4>,
        decode: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [b, c, h, w] = z.dims();
        let stride = ((self.latent_tile as f64 * (1.0 - self.overlap)) as usize).max(1);
        let blend = (self.sample_tile as f64 * self.overlap) as usize;
        let keep = self.sample_tile - blend;
        let mut rows: Vec<Vec<Tensor<B, 4>>> = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row: Vec<Tensor<B, 4>> = Vec::new();
            for j in (0..w).step_by(stride) {
                let tile = z.clone().slice([
                    0..b,
                    0..c,
                    i..(i + self.latent_tile).min(h),
                    j..(j + self.latent_tile).min(w),
                ]);
                let mut tile = decode(tile);
                // Each tile fades in from the tile above and the one to its left, both already
                // blended themselves, as diffusers' in-place `blend_v`/`blend_h` leave them.
                if let Some(above) = rows.last() {
                    tile = blend_rows(&above[row.len()], tile, blend);
                }
                if let Some(left) = row.last() {
                    tile = blend_columns(left, tile, blend);
                }
                row.push(tile);
            }
            rows.push(row);
        }
        let rows = rows
            .into_iter()
            .map(|row| {
                let cropped = row.into_iter().map(|t| crop(t, keep)).collect();
                Tensor::cat(cropped, 3)
            })
            .collect();
        Tensor::cat(rows, 2)
    }
}

fn crop<B: Backend>(t: Tensor<B, 4>, keep: usize) -> Tensor<B, 4> {
    let [b, c, h, w] = t.dims();
    t.slice([0..b, 0..c, 0..h.min(keep), 0..w.min(keep)])
}

/// Linear ramp `y / extent` for `y` in `0..extent`, shaped to broadcast along `axis`.
fn ramp<B: Backend>(extent: usize, axis: usize, device: &B::Device) -> Tensor<B, 4> {
    let weights: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let mut shape = [1, 1, 1, 1];
    shape[axis] = extent;
    Tensor::from_data(TensorData::new(weights, shape), device)
}

/// Cross-fades the first rows of `b` from the last rows of `a` (diffusers `blend_v`).
fn blend_rows<B: Backend>(a: &Tensor<B, 4>, b: Tensor<B, 4>, extent: usize) -> Tensor<B, 4> {
    blend(a, b, extent, 2)
}

/// Cross-fades the first columns of `b` from the last columns of `a` (diffusers `blend_h`).
fn blend_columns<B: Backend>(a: &Tensor<B, 4>, b: Tensor<B, 4>, extent: usize) -> Tensor<B, 4> {
    blend(a, b, extent, 3)
}

fn blend<B: Backend>(
    a: &Tensor<B, 4>,
    b: Tensor<B, 4>,
    extent: usize,
    axis: usize,
) -> Tensor<B, 4> {
    let extent = extent.min(a.dims()[axis]).min(b.dims()[axis]);
    if extent == 0 {
        return b;
    }
    let along = |t: &Tensor<B, 4>, from: usize| {
        let mut ranges = t.dims().map(|d| 0..d);
        ranges[axis] = from..from + extent;
        ranges
    };
    let a_len = a.dims()[axis];
    let w = ramp::<B>(extent, axis, &b.device());
    let tail = a.clone().slice(along(a, a_len - extent));
    let head = b.clone().slice(along(&b, 0));
    let mixed = tail * (w.clone().neg() + 1.0) + head * w;
    let ranges = along(&b, 0);
    b.slice_assign(ranges, mixed)
}
