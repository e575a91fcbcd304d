//! Running a network over an image in tiles, as Real-ESRGAN's `RealESRGANer` does
//! (`pre_process`, `tile_process`, `post_process`), so that memory is bounded by the tile
//! rather than the image.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::{Result, UpscaleError};

/// How an image is cut up (`RealESRGANer(tile, tile_pad, pre_pad)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// The side of a tile in input pixels; 0 runs the whole image at once.
    pub tile: usize,
    /// Extra input pixels around each tile (cut from its output), so that seams do not show.
    pub tile_pad: usize,
    /// Pixels of reflection added at the right and bottom before the run and cut after it.
    pub pre_pad: usize,
}

impl Default for TileOptions {
    /// 256-pixel tiles with 10 pixels of context (Real-ESRGAN's `--tile_pad`), no pre-padding
    /// (its inference script's default): a 4096² output stays within a few GB.
    fn default() -> Self {
        Self {
            tile: 256,
            tile_pad: 10,
            pre_pad: 0,
        }
    }
}

/// Pads the right and bottom by reflection (`F.pad(x, (0, right, 0, bottom), "reflect")`).
fn reflect_pad<B: Backend>(x: Tensor<B, 4>, right: usize, bottom: usize) -> Tensor<B, 4> {
    let mut x = x;
    if right > 0 {
        let [n, c, h, w] = x.dims();
        let edge = x
            .clone()
            .slice([0..n, 0..c, 0..h, w - 1 - right..w - 1])
            .flip([3]);
        x = Tensor::cat(vec![x, edge], 3);
    }
    if bottom > 0 {
        let [n, c, h, w] = x.dims();
        let edge = x
            .clone()
            .slice([0..n, 0..c, h - 1 - bottom..h - 1, 0..w])
            .flip([2]);
        x = Tensor::cat(vec![x, edge], 2);
    }
    x
}

/// `net` (×`scale`, sides a multiple of `modulo`) over `x` (`[1, C, H, W]`) as
/// `RealESRGANer.enhance` runs it: reflect-padded by `pre_pad` and up to a multiple of
/// `modulo`, then tile by tile (each with `tile_pad` of context, cut from its output), then the
/// padding cut off again.
pub(crate) fn upscale_tiled<B: Backend>(
    net: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
    scale: usize,
    modulo: usize,
    x: Tensor<B, 4>,
    options: &TileOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor<B, 4>> {
    let [_, _, h0, w0] = x.dims();
    let (pre, modulo) = (options.pre_pad, modulo.max(1));
    if pre >= h0 || pre >= w0 {
        return Err(UpscaleError::Invalid(format!(
            "--pre-pad {pre} needs an image larger than that on both sides ({w0}×{h0})"
        )));
    }
    if options.tile > 0 && !options.tile.is_multiple_of(modulo) {
        return Err(UpscaleError::Invalid(format!(
            "--tile {} must be a multiple of {modulo} for this model",
            options.tile
        )));
    }
    let x = reflect_pad(x, pre, pre);
    let [_, _, h1, w1] = x.dims();
    let (pad_w, pad_h) = (
        (modulo - w1 % modulo) % modulo,
        (modulo - h1 % modulo) % modulo,
    );
    if pad_w >= w1 || pad_h >= h1 {
        return Err(UpscaleError::Invalid(format!(
            "a {w0}×{h0} image is too small for this model"
        )));
    }
    let x = reflect_pad(x, pad_w, pad_h);
    let [n, c, h, w] = x.dims();

    let out = if options.tile == 0 {
        progress(0, 1);
        let out = net(x);
        progress(1, 1);
        out
    } else {
        let t = options.tile;
        let pad = options.tile_pad.div_ceil(modulo) * modulo;
        let (tiles_x, tiles_y) = (w.div_ceil(t), h.div_ceil(t));
        let total = tiles_x * tiles_y;
        let mut out =
            Tensor::<B, 4>::zeros([n, c, h * scale, w * scale], &x.device()).cast(x.dtype());
        progress(0, total);
        for ty in 0..tiles_y {
            for tx in 0..tiles_x {
                let (x0, y0) = (tx * t, ty * t);
                let (x1, y1) = ((x0 + t).min(w), (y0 + t).min(h));
                let (px0, py0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
                let (px1, py1) = ((x1 + pad).min(w), (y1 + pad).min(h));
                let tile = net(x.clone().slice([0..n, 0..c, py0..py1, px0..px1]));
                let (ox, oy) = ((x0 - px0) * scale, (y0 - py0) * scale);
                let (ow, oh) = ((x1 - x0) * scale, (y1 - y0) * scale);
                let kept = tile.slice([0..n, 0..c, oy..oy + oh, ox..ox + ow]);
                out = out.slice_assign(
                    [0..n, 0..c, y0 * scale..y1 * scale, x0 * scale..x1 * scale],
                    kept,
                );
                progress(ty * tiles_x + tx + 1, total);
            }
        }
        out
    };
    Ok(out.slice([0..n, 0..c, 0..h0 * scale, 0..w0 * scale]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::backend::DefaultBackend as B;

    #[test]
    fn reflect_padding_is_torchs() {
        let device = Default::default();
        let x = Tensor::<B, 1, burn::tensor::Int>::arange(0..4, &device)
            .float()
            .reshape([1, 1, 1, 4]);
        let x = Tensor::cat(vec![x.clone(), x.clone() + 10.0], 2);
        let padded: Vec<f32> = reflect_pad(x, 2, 1).into_data().to_vec().unwrap();
        // [0 1 2 3] → [0 1 2 3 2 1]; the rows reflect the same way.
        assert_eq!(
            padded,
            vec![
                0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 10.0, 11.0, 12.0, 13.0, 12.0, 11.0, 0.0, 1.0, 2.0,
                3.0, 2.0, 1.0
            ]
        );
    }
}
