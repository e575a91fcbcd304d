//! The U-Net over overlapping latent tiles (MultiDiffusion, Bar-Tal et al. 2023, eq. 5 with a
//! feathered weight): each step predicts every tile alone and blends the predictions where
//! tiles overlap, so that memory follows the tile's size rather than the latent's. The x4
//! upscaler needs it most: its latent is as large as its input image.

use burn::tensor::backend::Backend;
use std::ops::Range;

use burn::tensor::{DType, Tensor, TensorData};
use sd_unet::{UNet2DConditionModel, UNetConditioning};

use crate::error::{Result, SdError};

/// Tiles of the latent for the U-Net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentTiling {
    /// Tile side in latent pixels.
    pub tile: usize,
    /// Latent pixels shared by neighbouring tiles (blended).
    pub overlap: usize,
}

impl LatentTiling {
    /// Checks the sizes: a tile of at least 8 latent pixels, an overlap below the tile.
    pub fn check(&self) -> Result<()> {
        if self.tile < 8 || self.overlap >= self.tile {
            return Err(SdError::InvalidOptions(format!(
                "U-Net tiles of {} with an overlap of {}: a tile needs at least 8 latent pixels \
                 and more than its overlap",
                self.tile, self.overlap
            )));
        }
        Ok(())
    }

    /// Tile starts along a side of `len`: every `tile − overlap`, the last flush with the end.
    fn starts(&self, len: usize) -> Vec<usize> {
        if len <= self.tile {
            return vec![0];
        }
        let stride = self.tile - self.overlap;
        let mut starts: Vec<usize> = (0..len - self.tile).step_by(stride).collect();
        starts.push(len - self.tile);
        starts.dedup();
        starts
    }

    /// A tile's blend weight along one side of `size` at `start` in a side of `len`: ramps from
    /// near 0 to 1 over the overlap on edges shared with another tile, 1 elsewhere.
    fn ramp(&self, start: usize, size: usize, len: usize) -> Vec<f32> {
        let ramp = self.overlap.max(1) as f32;
        (0..size)
            .map(|i| {
                let from_start = if start > 0 {
                    (i as f32 + 1.0) / ramp
                } else {
                    1.0
                };
                let from_end = if start + size < len {
                    (size - i) as f32 / ramp
                } else {
                    1.0
                };
                from_start.min(from_end).min(1.0)
            })
            .collect()
    }

    /// The tiles of an `h × w` latent with their blend weights, normalised so that they sum to
    /// one at every latent pixel, as tensors on `device` in `dtype`: made once per generation
    /// and used at every step.
    pub fn plan<B: Backend>(
        &self,
        (h, w): (usize, usize),
        dtype: DType,
        device: &B::Device,
    ) -> TilePlan<B> {
        let (rows, cols) = (self.starts(h), self.starts(w));
        let (th, tw) = (self.tile.min(h), self.tile.min(w));
        let weight = |top: usize, left: usize| -> Vec<f32> {
            let (wy, wx) = (self.ramp(top, th, h), self.ramp(left, tw, w));
            wy.iter()
                .flat_map(|a| wx.iter().map(move |b| a * b))
                .collect()
        };
        let mut total = vec![0f32; h * w];
        for &top in &rows {
            for &left in &cols {
                for (i, v) in weight(top, left).into_iter().enumerate() {
                    total[(top + i / tw) * w + left + i % tw] += v;
                }
            }
        }
        let tiles = rows
            .iter()
            .flat_map(|&top| cols.iter().map(move |&left| (top, left)))
            .map(|(top, left)| {
                let normalised: Vec<f32> = weight(top, left)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| v / total[(top + i / tw) * w + left + i % tw])
                    .collect();
                let weight =
                    Tensor::<B, 4>::from_data(TensorData::new(normalised, [1, 1, th, tw]), device)
                        .cast(dtype);
                (top..top + th, left..left + tw, weight)
            })
            .collect();
        TilePlan {
            tiles,
            size: [h, w],
        }
    }
}

/// A latent's U-Net tiles and their normalised blend weights ([`LatentTiling::plan`]).
pub struct TilePlan<B: Backend> {
    tiles: Vec<(Range<usize>, Range<usize>, Tensor<B, 4>)>,
    size: [usize; 2],
}

impl<B: Backend> TilePlan<B> {
    /// The U-Net's prediction for `input` (`[batch, channels, h, w]`, extra channels included)
    /// blended from the tiles. ControlNet residuals and other full-size conditioning are not
    /// tiled: refused.
    pub fn predict(
        &self,
        unet: &UNet2DConditionModel<B>,
        input: Tensor<B, 4>,
        t: f64,
        cond: &UNetConditioning<'_, B>,
    ) -> Result<Tensor<B, 4>> {
        if cond.control.is_some() {
            return Err(SdError::InvalidOptions(
                "U-Net tiling cannot split ControlNet residuals: use one or the other".into(),
            ));
        }
        let [b, c_in, h, w] = input.dims();
        if [h, w] != self.size {
            return Err(SdError::InvalidOptions(format!(
                "internal: U-Net tiles planned for {:?}, latent is {h}×{w}",
                self.size
            )));
        }
        if self.tiles.len() == 1 {
            return Ok(unet.forward_conditioned(input, &[t], cond)?);
        }
        let mut sum: Option<Tensor<B, 4>> = None;
        for (rows, cols, weight) in &self.tiles {
            let patch = input
                .clone()
                .slice([0..b, 0..c_in, rows.clone(), cols.clone()]);
            let weighted = unet.forward_conditioned(patch, &[t], cond)? * weight.clone();
            let c = weighted.dims()[1];
            let total = sum.unwrap_or_else(|| {
                Tensor::<B, 4>::zeros([b, c, h, w], &input.device()).cast(weighted.dtype())
            });
            let ranges = [0..b, 0..c, rows.clone(), cols.clone()];
            let region = total.clone().slice(ranges.clone()) + weighted;
            sum = Some(total.slice_assign(ranges, region));
        }
        sum.ok_or_else(|| SdError::InvalidOptions("empty latent".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::LatentTiling;

    #[test]
    fn tiles_cover_the_latent_and_blend_to_positive_weights() {
        let tiling = LatentTiling {
            tile: 16,
            overlap: 4,
        };
        assert_eq!(tiling.starts(16), vec![0]);
        assert_eq!(tiling.starts(10), vec![0]);
        assert_eq!(tiling.starts(40), vec![0, 12, 24]);
        assert_eq!(tiling.starts(30), vec![0, 12, 14]);
        for len in [17, 30, 40, 57] {
            let mut total = vec![0f32; len];
            for start in tiling.starts(len) {
                let size = tiling.tile.min(len);
                assert!(start + size <= len);
                for (i, w) in tiling.ramp(start, size, len).into_iter().enumerate() {
                    assert!((0.0..=1.0).contains(&w));
                    total[start + i] += w;
                }
            }
            assert!(total.iter().all(|&w| w > 0.0), "{len}: {total:?}");
        }
        assert!(
            LatentTiling {
                tile: 8,
                overlap: 8
            }
            .check()
            .is_err()
        );
        assert!(
            LatentTiling {
                tile: 4,
                overlap: 0
            }
            .check()
            .is_err()
        );
    }
}
