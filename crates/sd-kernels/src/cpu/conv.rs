//! 2-D convolution by the method [`ConvMethod::choose`] picks for the shape: Winograd
//! (`super::winograd`) for 3×3 kernels with padding 1 on maps of 16² and up, and otherwise
//! blocks of output positions, each taken by one core from its input to its finished output:
//!
//! The output positions `(image, y, x)` are cut into blocks of whole rows of one image (large
//! maps) or of whole images (small ones), sized so that a block's im2col columns (`in · taps`
//! rows of the block's positions, gathered from the unpadded input with zeros where a tap
//! falls outside) stay near 4 MiB. Each block gathers its columns (none for a 1×1 kernel at
//! stride 1 inside one image: the input planes are the matrix), runs one `out × in·taps` by
//! `in·taps × positions` multiply, and applies the [`Epilogue`] (a bias, or a BatchNorm's
//! scale and shift, and a ReLU) as it writes the output. No padded copy of the input, no
//! batch-sized im2col matrix and no pass over the output afterwards: on Inception's 1×1, 1×7,
//! 7×1, 5×5, valid and strided convolutions (batch 50) this ran 1.1-5× the GFLOP/s of one
//! batch-wide im2col multiply or per-tap multiplies on a padded copy, and 1.1-2.4× on SD 1.5's
//! downsamplers and shortcuts (`layer-timing --convs inception|sd-other`, 2-core AVX2 EPYC).

use rayon::prelude::*;

use super::winograd::{Filters, Tile};
use super::{SharedOut, multiply};

/// The sizes of one convolution (dilation 1, one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    /// Images in the batch.
    pub batch: usize,
    /// Channels of the input.
    pub in_channels: usize,
    /// Channels of the output (the number of filters).
    pub out_channels: usize,
    /// Input height in pixels, before padding.
    pub height: usize,
    /// Input width in pixels, before padding.
    pub width: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Zeros added at the top, left, bottom and right.
    pub padding: [usize; 4],
    /// Steps between output pixels, down and across (Winograd takes only 1).
    pub stride: [usize; 2],
}

impl Conv2dShape {
    /// Output height and width.
    pub fn output_size(&self) -> [usize; 2] {
        let [top, left, bottom, right] = self.padding;
        let [sy, sx] = self.stride.map(|s| s.max(1));
        let size = |len: usize, kernel: usize, step: usize| {
            (len + 1)
                .checked_sub(kernel)
                .map_or(0, |span| span.div_ceil(step))
        };
        [
            size(self.height + top + bottom, self.kernel[0], sy),
            size(self.width + left + right, self.kernel[1], sx),
        ]
    }
}

/// What each output becomes after the sum over inputs and taps: `acc · scale[o] + shift[o]`
/// for output channel `o` (no scale: `acc + shift[o]`, a convolution's bias), then the ReLU if
/// asked. An inference BatchNorm after the convolution is the scale and shift; applying them
/// here, rather than folding the scale into the weights, keeps PyTorch's order of rounding.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// The per-channel factor (`γ / √(σ² + ε)` for a BatchNorm).
    pub scale: Option<&'a [f32]>,
    /// The per-channel term added after the scale (the bias; `β − μ · scale` for a BatchNorm).
    pub shift: Option<&'a [f32]>,
    /// `max(y, 0)` at the end (a NaN stays NaN).
    pub relu: bool,
}

impl<'a> Epilogue<'a> {
    /// Only a bias added (the plain convolution).
    pub fn bias(bias: Option<&'a [f32]>) -> Self {
        Self {
            shift: bias,
            ..Self::default()
        }
    }

    /// Nothing but a bias: what the Winograd output transform adds by itself.
    pub(super) fn bias_only(&self) -> bool {
        self.scale.is_none() && !self.relu
    }

    /// Channel `o`'s scale and shift (1 and 0 where absent: `acc · 1 + 0` is `acc + 0`
    /// exactly).
    #[inline(always)]
    fn params(&self, o: usize) -> (f32, f32) {
        (
            self.scale.map_or(1.0, |s| s[o]),
            self.shift.map_or(0.0, |t| t[o]),
        )
    }

    #[inline(always)]
    fn apply(relu: bool, acc: f32, (scale, shift): (f32, f32)) -> f32 {
        let y = acc * scale + shift;
        if relu && y < 0.0 { 0.0 } else { y }
    }

    /// `dst[i] = epilogue(src[i])` for outputs of channel `o`.
    #[inline(always)]
    fn write(&self, o: usize, src: &[f32], dst: &mut [f32]) {
        let p = self.params(o);
        if self.relu {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = Self::apply(true, s, p);
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = Self::apply(false, s, p);
            }
        }
    }

    /// The epilogue in place on outputs of channel `o`.
    #[inline(always)]
    pub(super) fn finish(&self, o: usize, values: &mut [f32]) {
        let p = self.params(o);
        if self.relu {
            for v in values {
                *v = Self::apply(true, *v, p);
            }
        } else {
            for v in values {
                *v = Self::apply(false, *v, p);
            }
        }
    }

    /// Sizes agree with `out_channels`.
    fn fits(&self, out_channels: usize) -> bool {
        self.scale.is_none_or(|s| s.len() == out_channels)
            && self.shift.is_none_or(|t| t.len() == out_channels)
    }
}

/// Pixels (over the batch) from which Winograd pays for transforming the weights (16/9 of
/// them, every call, for F(2×2, 3×3)): SD 1.5's 16² level at batch 2.
const WINOGRAD_MIN_PIXELS: usize = 2 * 16 * 16;

/// Pixels (over the batch) from which F(4×4, 3×3) beats F(2×2, 3×3): SD 1.5's 32² level at
/// batch 2.
const WINOGRAD_4X4_MIN_PIXELS: usize = 2 * 32 * 32;

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvMethod {
    /// F(2×2, 3×3) Winograd (`super::winograd`): 3×3 kernels, padding 1, large maps.
    Winograd2x2,
    /// F(4×4, 3×3) Winograd: the same, on the largest maps.
    Winograd4x4,
    /// Cache-sized blocks of output positions, each gathered, multiplied and finished on one
    /// core (see the module's notes): every other shape.
    Blocked,
}

impl ConvMethod {
    /// The fastest method for `shape`, as measured on SD 1.5's U-Net (batch 2, 2 cores; `cargo
    /// run --release -p sd-benches --bin layer-timing -- --convs x`): F(4×4, 3×3) runs the 32²
    /// and 64² levels' 3×3 convolutions 1.2-1.6× faster than F(2×2, 3×3), which runs the 16²
    /// level's faster than the blocks. Below 16² (the 8² level), and for every other kernel,
    /// padding or stride, the blocks.
    pub fn choose(shape: Conv2dShape) -> Self {
        let pixels = shape.batch * shape.height * shape.width;
        if shape.stride == [1, 1]
            && shape.kernel == [3, 3]
            && shape.padding == [1; 4]
            && pixels >= WINOGRAD_MIN_PIXELS
        {
            if pixels >= WINOGRAD_4X4_MIN_PIXELS {
                ConvMethod::Winograd4x4
            } else {
                ConvMethod::Winograd2x2
            }
        } else {
            ConvMethod::Blocked
        }
    }
}

/// `x`: `[batch, in_channels, height, width]`, `weight`: `[out_channels, in_channels, kh, kw]`,
/// `bias`: `[out_channels]`, all row-major; returns `[batch, out_channels, Ho, Wo]`. `None` when
/// a slice's length does not match `shape` or the output would be empty.
pub fn conv2d(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: Conv2dShape,
) -> Option<Vec<f32>> {
    conv2d_by(ConvMethod::choose(shape), x, weight, bias, shape)
}

/// [`conv2d`] by the given method (Winograd falls back to the blocks where it does not
/// apply).
pub fn conv2d_by(
    method: ConvMethod,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: Conv2dShape,
) -> Option<Vec<f32>> {
    conv2d_with(method, x, weight, Epilogue::bias(bias), shape)
}

/// [`conv2d_by`] with a whole [`Epilogue`] (`None` also when its sizes do not match).
pub fn conv2d_with(
    method: ConvMethod,
    x: &[f32],
    weight: &[f32],
    epilogue: Epilogue,
    shape: Conv2dShape,
) -> Option<Vec<f32>> {
    conv2d_filters(method, x, Filters::F32(weight), epilogue, shape)
}

impl ConvMethod {
    /// The Winograd tile this method runs `shape` with: `None` for the blocks, and where
    /// Winograd does not apply (not a 3×3, stride-1, padding-1 convolution).
    pub fn winograd_tile(self, shape: Conv2dShape) -> Option<Tile> {
        let tile = match self {
            ConvMethod::Winograd2x2 => Tile::Two,
            ConvMethod::Winograd4x4 => Tile::Four,
            ConvMethod::Blocked => return None,
        };
        (shape.stride == [1, 1] && shape.kernel == [3, 3] && shape.padding == [1; 4])
            .then_some(tile)
    }
}

/// [`conv2d_with`] for filters held in f32, f16 or bf16: Winograd widens them a filter at a
/// time as it transforms them; the blocks take them widened whole.
pub fn conv2d_filters(
    method: ConvMethod,
    x: &[f32],
    weight: Filters<'_>,
    epilogue: Epilogue,
    shape: Conv2dShape,
) -> Option<Vec<f32>> {
    let Conv2dShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: [kh, kw],
        ..
    } = shape;
    let [out_h, out_w] = shape.output_size();
    if [
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kh,
        kw,
        out_h,
        out_w,
    ]
    .contains(&0)
        || x.len() != batch * in_channels * height * width
        || weight.len() != out_channels * in_channels * kh * kw
        || !epilogue.fits(out_channels)
    {
        return None;
    }
    if let Some(tile) = method.winograd_tile(shape) {
        return Some(super::winograd::conv3x3(tile, x, weight, epilogue, shape));
    }
    let mut wide = Vec::new();
    let weight = weight.chunk(0, weight.len(), &mut wide);
    Some(conv2d_blocked(x, weight, epilogue, shape))
}

/// Floats of im2col columns one block gathers (4 MiB): blocks hold this many divided by
/// `in · taps` positions, and never fewer than [`BLOCK_MIN_POSITIONS`].
const BLOCK_COLUMN_FLOATS: usize = 1 << 20;

/// The fewest positions a block multiplies: below it, packing the weights for each block
/// would cost more than the block's multiply-adds repay.
const BLOCK_MIN_POSITIONS: usize = 512;

/// [`ConvMethod::Blocked`]. Positions run over `(image, y, x)`; a block is a run of whole
/// output rows of one image when an image is large, or of whole images when they are small.
fn conv2d_blocked(x: &[f32], weight: &[f32], epilogue: Epilogue, shape: Conv2dShape) -> Vec<f32> {
    let Conv2dShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: [kh, kw],
        ..
    } = shape;
    let [out_h, out_w] = shape.output_size();
    let (taps, map, plane) = (kh * kw, out_h * out_w, height * width);
    let k = in_channels * taps;
    // The input is its own column matrix: a 1×1 kernel at stride 1 without padding, read
    // within one image.
    let direct = taps == 1 && shape.stride == [1, 1] && shape.padding == [0; 4];
    let wanted = (BLOCK_COLUMN_FLOATS / k).max(BLOCK_MIN_POSITIONS);
    let threads = rayon::current_num_threads().max(1);
    // Whole rows of one image, or whole images; at least two blocks per thread when the
    // batch has them, for the balance.
    let (rows_per_block, images_per_block) = if map >= wanted {
        let rows = (wanted / out_w).clamp(1, out_h);
        let blocks = batch * out_h.div_ceil(rows);
        let rows = if blocks < 2 * threads {
            out_h.div_ceil((2 * threads).div_ceil(batch)).max(1)
        } else {
            rows
        };
        (rows, 1)
    } else {
        let images = wanted.div_ceil(map).min(batch.div_ceil(2 * threads)).max(1);
        (out_h, images)
    };
    let row_blocks = out_h.div_ceil(rows_per_block);
    let blocks = if images_per_block == 1 {
        batch * row_blocks
    } else {
        batch.div_ceil(images_per_block)
    };
    let mut out = vec![0f32; batch * out_channels * map];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..blocks).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(columns, product): &mut (Vec<f32>, Vec<f32>), block| {
            // Images `b0..b1`, output rows `y0..y1` of each.
            let (b0, b1, y0, y1) = if images_per_block == 1 {
                let (b, r) = (block / row_blocks, block % row_blocks);
                let y0 = r * rows_per_block;
                (b, b + 1, y0, (y0 + rows_per_block).min(out_h))
            } else {
                let b0 = block * images_per_block;
                (b0, (b0 + images_per_block).min(batch), 0, out_h)
            };
            let per_image = (y1 - y0) * out_w;
            let n = (b1 - b0) * per_image;
            // The columns and their row stride.
            let (rhs, rhs_row): (*const f32, usize) = if direct && b1 == b0 + 1 {
                (x[b0 * in_channels * plane + y0 * out_w..].as_ptr(), plane)
            } else {
                columns.resize(k * n, 0.0);
                gather(x, shape, [b0, b1], [y0, y1], columns);
                (columns.as_ptr(), n)
            };
            if b1 == b0 + 1 {
                // One image: straight into its output rows, finished in place.
                let dst = out_ptr
                    .get()
                    .wrapping_add(b0 * out_channels * map + y0 * out_w);
                // SAFETY: `weight` is `out × k`; the columns are `k × n` with row stride
                // `rhs_row` (the gathered block, or this image's input planes from row `y0`,
                // `n` pixels each inside the plane); the destination is rows `y0..y1` of every
                // output channel of image `b0`, which only this block writes.
                unsafe {
                    multiply(
                        [out_channels, n, k],
                        (dst, [map, 1]),
                        (weight.as_ptr(), [k, 1]),
                        (rhs, [rhs_row, 1]),
                        false,
                        1.0,
                        false,
                    );
                }
                for o in 0..out_channels {
                    // SAFETY: as above, this block's own `n` outputs of channel `o`.
                    let values =
                        unsafe { std::slice::from_raw_parts_mut(dst.wrapping_add(o * map), n) };
                    epilogue.finish(o, values);
                }
            } else {
                product.resize(out_channels * n, 0.0);
                // SAFETY: `weight` is `out × k`, the gathered columns `k × n`, `product`
                // `out × n`, all row-major and sized so.
                unsafe {
                    multiply(
                        [out_channels, n, k],
                        (product.as_mut_ptr(), [n, 1]),
                        (weight.as_ptr(), [k, 1]),
                        (rhs, [rhs_row, 1]),
                        false,
                        1.0,
                        false,
                    );
                }
                for b in b0..b1 {
                    for o in 0..out_channels {
                        // SAFETY: channel `o` of image `b`, which only this block writes.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out_ptr.get().wrapping_add((b * out_channels + o) * map),
                                map,
                            )
                        };
                        epilogue.write(o, &product[o * n + (b - b0) * map..][..map], dst);
                    }
                }
            }
        },
    );
    out
}

/// The im2col columns of images `b0..b1`, output rows `y0..y1`: row `(c, i, j)` of `columns`
/// (`in · taps` rows of `n` positions) holds, for each of those output pixels `(b, y, x)`, input
/// pixel `(y·sy + i − top, x·sx + j − left)` of channel `c` of image `b`, or 0 outside.
fn gather(
    x: &[f32],
    shape: Conv2dShape,
    [b0, b1]: [usize; 2],
    [y0, y1]: [usize; 2],
    columns: &mut [f32],
) {
    let Conv2dShape {
        in_channels,
        height,
        width,
        kernel: [kh, kw],
        padding: [top, left, ..],
        stride: [sy, sx],
        ..
    } = shape;
    let [_, out_w] = shape.output_size();
    let n = (b1 - b0) * (y1 - y0) * out_w;
    let taps = kh * kw;
    for (r, dst) in columns.chunks_exact_mut(n).enumerate() {
        let (c, i, j) = (r / taps, r % taps / kw, r % kw);
        // Output columns whose tap lies inside the image: `x·sx + j − left ∈ [0, width)`.
        let lo = left.saturating_sub(j).div_ceil(sx).min(out_w);
        let hi = (width + left)
            .saturating_sub(j)
            .div_ceil(sx)
            .clamp(lo, out_w);
        let mut rows = dst.chunks_exact_mut(out_w);
        for b in b0..b1 {
            let image = &x[(b * in_channels + c) * height * width..][..height * width];
            for y in y0..y1 {
                let row = rows.next().expect("n rows of out_w");
                let iy = (y * sy + i).wrapping_sub(top);
                if iy >= height {
                    row.fill(0.0);
                    continue;
                }
                let src = &image[iy * width..][..width];
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                let first = lo * sx + j - left;
                if sx == 1 {
                    row[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                } else {
                    for (d, &v) in row[lo..hi].iter_mut().zip(src[first..].iter().step_by(sx)) {
                        *d = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::pseudo_random;

    /// `batch` images of `channels = [in, out]` at `size = [height, width]`.
    fn shape(
        batch: usize,
        [in_channels, out_channels]: [usize; 2],
        [height, width]: [usize; 2],
        kernel: [usize; 2],
        padding: [usize; 4],
        stride: [usize; 2],
    ) -> Conv2dShape {
        Conv2dShape {
            batch,
            in_channels,
            out_channels,
            height,
            width,
            kernel,
            padding,
            stride,
        }
    }

    fn reference(x: &[f32], w: &[f32], bias: &[f32], s: Conv2dShape) -> Vec<f32> {
        let [oh, ow] = s.output_size();
        let [kh, kw] = s.kernel;
        let (top, left) = (s.padding[0] as isize, s.padding[1] as isize);
        let mut out = vec![0f32; s.batch * s.out_channels * oh * ow];
        for b in 0..s.batch {
            for o in 0..s.out_channels {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = f64::from(bias[o]);
                        for c in 0..s.in_channels {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (iy, ix) = (
                                        (y * s.stride[0]) as isize + i as isize - top,
                                        (xx * s.stride[1]) as isize + j as isize - left,
                                    );
                                    if iy < 0
                                        || ix < 0
                                        || iy >= s.height as isize
                                        || ix >= s.width as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * s.in_channels + c) * s.height + iy as usize)
                                        * s.width
                                        + ix as usize];
                                    let wv = w[((o * s.in_channels + c) * kh + i) * kw + j];
                                    acc += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        out[((b * s.out_channels + o) * oh + y) * ow + xx] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_method_matches_the_direct_sum() {
        for shape in [
            // Large enough for Winograd (odd height: a half-empty last row of tiles).
            shape(2, [3, 4], [33, 32], [3, 3], [1; 4], [1, 1]),
            shape(2, [3, 4], [33, 32], [3, 3], [1, 1, 1, 0], [1, 1]),
            shape(2, [5, 7], [9, 11], [3, 3], [1, 1, 1, 1], [1, 1]),
            shape(1, [3, 4], [40, 33], [3, 3], [1, 1, 1, 1], [1, 1]),
            // Deep and small (the U-Net's deep levels in miniature): more filters than tiles,
            // so each task transforms its own block of them.
            shape(1, [16, 32], [4, 5], [3, 3], [1, 1, 1, 1], [1, 1]),
            // Rows of more tiles than the transforms take at once, the last one partial.
            shape(1, [2, 3], [7, 66], [3, 3], [1, 1, 1, 1], [1, 1]),
            shape(2, [6, 3], [5, 6], [1, 1], [0, 0, 0, 0], [1, 1]),
            shape(1, [2, 3], [7, 6], [3, 2], [0, 1, 2, 0], [1, 1]),
            // A downsampler's stride 2 (with the U-Net's one-sided padding, and even/odd sizes).
            shape(2, [3, 5], [9, 8], [3, 3], [1, 1, 1, 1], [2, 2]),
            shape(1, [2, 2], [8, 8], [3, 3], [0, 0, 1, 1], [2, 2]),
            // Inception's factorised kernels and a 5×5.
            shape(2, [3, 4], [6, 5], [1, 7], [0, 3, 0, 3], [1, 1]),
            shape(2, [3, 4], [6, 5], [7, 1], [3, 0, 3, 0], [1, 1]),
            shape(3, [2, 3], [7, 7], [5, 5], [2; 4], [1, 1]),
        ] {
            let [kh, kw] = shape.kernel;
            let x = pseudo_random(
                shape.batch * shape.in_channels * shape.height * shape.width,
                1,
                1.0,
            );
            let w = pseudo_random(shape.out_channels * shape.in_channels * kh * kw, 2, 1.0);
            let bias = pseudo_random(shape.out_channels, 3, 1.0);
            let expected = reference(&x, &w, &bias, shape);
            for method in [
                ConvMethod::Winograd2x2,
                ConvMethod::Winograd4x4,
                ConvMethod::Blocked,
            ] {
                let ours = conv2d_by(method, &x, &w, Some(&bias), shape).expect("consistent sizes");
                assert_eq!(ours.len(), expected.len());
                let worst = ours
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{method:?} {shape:?}: {worst}");
            }
        }
    }

    /// Filters held in f16 or bf16 give, by every method, exactly what their values widened to
    /// f32 give: Winograd widens them a filter at a time (up front, and in its tasks on deep
    /// and small maps), the blocks all at once.
    #[test]
    fn narrow_filters_give_their_widened_values_result() {
        for shape in [
            shape(2, [3, 4], [33, 32], [3, 3], [1; 4], [1, 1]),
            shape(1, [16, 32], [4, 5], [3, 3], [1, 1, 1, 1], [1, 1]),
            shape(2, [6, 3], [5, 6], [1, 1], [0, 0, 0, 0], [1, 1]),
        ] {
            let [kh, kw] = shape.kernel;
            let x = pseudo_random(
                shape.batch * shape.in_channels * shape.height * shape.width,
                1,
                1.0,
            );
            let w = pseudo_random(shape.out_channels * shape.in_channels * kh * kw, 2, 1.0);
            let halves: Vec<half::f16> = w.iter().map(|v| half::f16::from_f32(*v)).collect();
            let brains: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let widened_halves: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
            let widened_brains: Vec<f32> = brains.iter().map(|v| v.to_f32()).collect();
            let bias = pseudo_random(shape.out_channels, 3, 1.0);
            for method in [
                ConvMethod::Winograd2x2,
                ConvMethod::Winograd4x4,
                ConvMethod::Blocked,
            ] {
                for (narrow, widened) in [
                    (Filters::F16(&halves), &widened_halves),
                    (Filters::Bf16(&brains), &widened_brains),
                ] {
                    let expected =
                        conv2d_with(method, &x, widened, Epilogue::bias(Some(&bias)), shape);
                    let ours =
                        conv2d_filters(method, &x, narrow, Epilogue::bias(Some(&bias)), shape);
                    assert_eq!(ours, expected, "{method:?} {shape:?} {narrow:?}");
                }
            }
        }
    }

    /// The scale, shift and ReLU, by every method, on maps large enough for blocks of rows of
    /// one image (1×1 read straight from the input, and gathered 3×3, 1×7 and strided ones)
    /// as well as blocks of whole images.
    #[test]
    fn every_method_applies_the_epilogue() {
        for shape in [
            shape(2, [2048, 3], [24, 24], [1, 1], [0; 4], [1, 1]),
            shape(2, [228, 3], [26, 26], [3, 3], [0; 4], [1, 1]),
            shape(2, [228, 3], [24, 24], [3, 3], [1; 4], [1, 1]),
            shape(1, [300, 2], [24, 30], [1, 7], [0, 3, 0, 3], [1, 1]),
            shape(2, [60, 2], [49, 49], [3, 3], [0; 4], [2, 2]),
            shape(5, [6, 3], [5, 6], [1, 1], [0; 4], [1, 1]),
        ] {
            let [kh, kw] = shape.kernel;
            let x = pseudo_random(
                shape.batch * shape.in_channels * shape.height * shape.width,
                4,
                1.0,
            );
            let w = pseudo_random(shape.out_channels * shape.in_channels * kh * kw, 5, 1.0);
            let scale: Vec<f32> = pseudo_random(shape.out_channels, 6, 1.0)
                .iter()
                .map(|v| v + 1.0)
                .collect();
            let shift = pseudo_random(shape.out_channels, 7, 1.0);
            let plain = reference(&x, &w, &vec![0.0; shape.out_channels], shape);
            let per_channel = plain.len() / (shape.batch * shape.out_channels);
            let expected: Vec<f32> = plain
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let o = i / per_channel % shape.out_channels;
                    (v * scale[o] + shift[o]).max(0.0)
                })
                .collect();
            let epilogue = Epilogue {
                scale: Some(&scale),
                shift: Some(&shift),
                relu: true,
            };
            let winograd = shape.kernel == [3, 3] && shape.padding == [1; 4];
            for method in [
                ConvMethod::Winograd2x2,
                ConvMethod::Winograd4x4,
                ConvMethod::Blocked,
            ] {
                if !winograd && method != ConvMethod::Blocked {
                    continue;
                }
                let ours = conv2d_with(method, &x, &w, epilogue, shape).expect("consistent sizes");
                assert_eq!(ours.len(), expected.len());
                assert!(ours.contains(&0.0) && ours.iter().any(|&v| v > 0.0));
                let worst = ours
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // F(4×4, 3×3) is good to about 1e-5 of the largest output.
                let largest = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
                assert!(worst < 2e-5 * largest, "{method:?} {shape:?}: {worst}");
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_refused() {
        let shape = shape(1, [2, 2], [3, 3], [3, 3], [1; 4], [1, 1]);
        assert!(conv2d(&[0.0; 17], &[0.0; 36], None, shape).is_none());
        assert!(conv2d(&[0.0; 18], &[0.0; 36], Some(&[0.0; 3]), shape).is_none());
    }
}
