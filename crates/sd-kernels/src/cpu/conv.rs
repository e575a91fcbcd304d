//! 2-D convolution by the method [`ConvMethod::choose`] picks for the shape: Winograd
//! (`super::winograd`) for 3×3 kernels with padding 1 on maps of 16² and up, one multiply on the
//! im2col matrix for small maps and strided kernels, and otherwise a sum of shifted matrix
//! multiplies, without im2col:
//!
//! The input is copied once into a zero-padded buffer of `Hp × Wp` pixels per channel. On that
//! grid, the output pixel `(y, x)` sits at position `y·Wp + x`, and for the kernel tap `(i, j)`
//! it reads the padded input at position `y·Wp + x + i·Wp + j`: for every tap, the inputs of all
//! output positions form one `channels × positions` matrix with unit position stride, a plain
//! view of the padded buffer shifted by `i·Wp + j`. The convolution is then `kh·kw` multiplies
//! `W[:, :, i, j] · X_shift(i, j)` accumulated into one output, computed on `Ho × Wp` positions
//! (the `Wp − Wo` extra columns of each row are dropped when the bias is added).

use rayon::prelude::*;

use super::winograd::Tile;
use super::{SharedOut, multiply};

/// The sizes of one convolution (stride 1, dilation 1, one group).
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
    /// Steps between output pixels, down and across (only im2col takes other than 1).
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

/// Pixels (over the batch) from which Winograd pays for transforming the weights (16/9 of
/// them, every call, for F(2×2, 3×3)): SD 1.5's 16² level at batch 2.
const WINOGRAD_MIN_PIXELS: usize = 2 * 16 * 16;

/// Pixels (over the batch) from which F(4×4, 3×3) beats F(2×2, 3×3): SD 1.5's 32² level at
/// batch 2.
const WINOGRAD_4X4_MIN_PIXELS: usize = 2 * 32 * 32;

/// The largest im2col matrix built, in floats (64 MiB).
const IM2COL_MAX: usize = 1 << 24;

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvMethod {
    /// F(2×2, 3×3) Winograd (`super::winograd`): 3×3 kernels, padding 1, large maps.
    Winograd2x2,
    /// F(4×4, 3×3) Winograd: the same, on the largest maps.
    Winograd4x4,
    /// One multiply on the im2col matrix: small maps (the deep levels), where that matrix is
    /// small and the weights large.
    Im2col,
    /// One multiply per kernel tap on shifted views of the padded input: the rest.
    Shifted,
}

impl ConvMethod {
    /// The fastest method for `shape`, as measured on SD 1.5's U-Net (batch 2, 2 cores; `cargo
    /// run --release -p sd-benches --bin layer-timing -- --convs x`): F(4×4, 3×3) runs the 32²
    /// and 64² levels' 3×3 convolutions 1.2-1.6× faster than F(2×2, 3×3), which runs the 16²
    /// level's 1.3× faster than im2col; im2col runs the 8² level at 190-200 GFLOP/s, where
    /// Winograd's weight transforms cost more than they save, and the shifted multiplies beat
    /// im2col on large maps.
    pub fn choose(shape: Conv2dShape) -> Self {
        let [out_h, out_w] = shape.output_size();
        let taps = shape.kernel[0] * shape.kernel[1];
        let pixels = shape.batch * shape.height * shape.width;
        if shape.stride != [1, 1] {
            ConvMethod::Im2col
        } else if shape.kernel == [3, 3] && shape.padding == [1; 4] && pixels >= WINOGRAD_MIN_PIXELS
        {
            if pixels >= WINOGRAD_4X4_MIN_PIXELS {
                ConvMethod::Winograd4x4
            } else {
                ConvMethod::Winograd2x2
            }
        } else if shape.batch * out_h * out_w * shape.in_channels * taps <= IM2COL_MAX {
            ConvMethod::Im2col
        } else {
            ConvMethod::Shifted
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

/// [`conv2d`] by the given method (Winograd falls back to the shifted multiplies where it
/// does not apply).
pub fn conv2d_by(
    method: ConvMethod,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: Conv2dShape,
) -> Option<Vec<f32>> {
    let Conv2dShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: [kh, kw],
        padding: [top, left, bottom, right],
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
        || bias.is_some_and(|b| b.len() != out_channels)
    {
        return None;
    }
    let unit_stride = shape.stride == [1, 1];
    let tile = match method {
        ConvMethod::Winograd2x2 => Some(Tile::Two),
        ConvMethod::Winograd4x4 => Some(Tile::Four),
        _ => None,
    };
    if let Some(tile) = tile
        && unit_stride
        && [kh, kw] == [3, 3]
        && shape.padding == [1; 4]
    {
        return Some(super::winograd::conv3x3(tile, x, weight, bias, shape));
    }
    let (padded_h, padded_w) = (height + top + bottom, width + left + right);
    let image_len = padded_h * padded_w;
    // Per input channel, the padded images one after another; the last tap of the last
    // position reads `kw − 1` past them.
    let channel_len = batch * image_len + kw - 1;
    let mut padded = vec![0f32; in_channels * channel_len];
    padded
        .par_chunks_mut(channel_len)
        .enumerate()
        .for_each(|(c, dst)| {
            for b in 0..batch {
                let src = &x[(b * in_channels + c) * height * width..][..height * width];
                for (y, row) in src.chunks_exact(width).enumerate() {
                    let start = b * image_len + (y + top) * padded_w + left;
                    dst[start..start + width].copy_from_slice(row);
                }
            }
        });

    let taps = kh * kw;
    if method == ConvMethod::Im2col || !unit_stride {
        return Some(conv2d_im2col(
            &padded,
            weight,
            bias,
            shape,
            channel_len,
            [padded_h, padded_w],
        ));
    }

    // The weights with the taps ahead of the input channels (`[out, tap, in]`), so that each
    // tap's `out × in` matrix has unit stride along `in` and is read in order.
    let mut tap_weights = vec![0f32; weight.len()];
    tap_weights
        .par_chunks_mut(taps * in_channels)
        .zip(weight.par_chunks(in_channels * taps))
        .for_each(|(dst, src)| {
            for (c, filter) in src.chunks_exact(taps).enumerate() {
                for (t, &w) in filter.iter().enumerate() {
                    dst[t * in_channels + c] = w;
                }
            }
        });

    // Output positions run over all images (`b·Hp·Wp + y·Wp + x`); the rows between images
    // (`y ≥ Ho`) are computed and dropped, except the last image's.
    let positions = batch * image_len - (padded_h - out_h) * padded_w;
    let grid = batch * image_len;
    let mut full = vec![0f32; out_channels * grid];
    let split = Split::choose(rayon::current_num_threads(), out_channels, positions);
    let out_ptr = SharedOut(full.as_mut_ptr());
    (0..split.channel_blocks * split.position_blocks)
        .into_par_iter()
        .for_each(|task| {
            let channels = split.range(
                task / split.position_blocks,
                split.channel_blocks,
                out_channels,
            );
            let range = split.range(
                task % split.position_blocks,
                split.position_blocks,
                positions,
            );
            if channels.is_empty() || range.is_empty() {
                return;
            }
            for t in 0..taps {
                let shift = (t / kw) * padded_w + t % kw;
                // SAFETY: the destination is output channels `channels` × positions `range`,
                // which no other task touches (tasks split channels × positions); reads are
                // rows `channels` of the tap's weight matrix and, for each input channel,
                // padded positions `range.start + shift .. range.end + shift`, which end at
                // most at `positions − 1 + (kh − 1)·Wp + kw − 1 = batch·Hp·Wp + kw − 2`,
                // inside `channel_len`.
                unsafe {
                    multiply(
                        [channels.len(), range.len(), in_channels],
                        (
                            out_ptr.get().add(channels.start * grid + range.start),
                            [grid, 1],
                        ),
                        (
                            tap_weights
                                .as_ptr()
                                .add((channels.start * taps + t) * in_channels),
                            [taps * in_channels, 1],
                        ),
                        (padded.as_ptr().add(range.start + shift), [channel_len, 1]),
                        t > 0,
                        1.0,
                        false,
                    );
                }
            }
        });

    // Drop the extra columns and rows, add the bias, and go back to `[batch, out, Ho, Wo]`.
    let mut out = vec![0f32; batch * out_channels * out_h * out_w];
    out.par_chunks_mut(out_h * out_w)
        .enumerate()
        .for_each(|(i, dst)| {
            let (b, o) = (i / out_channels, i % out_channels);
            let bias = bias.map_or(0.0, |bias| bias[o]);
            let src = &full[o * grid + b * image_len..][..out_h * padded_w];
            for (d, s) in dst.chunks_exact_mut(out_w).zip(src.chunks_exact(padded_w)) {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = s + bias;
                }
            }
        });
    Some(out)
}

/// The convolution as one multiply `weights [out × in·taps] · columns [in·taps × positions]`,
/// with the columns gathered from the padded images (rows in the weights' `(in, i, j)` order).
fn conv2d_im2col(
    padded: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: Conv2dShape,
    channel_len: usize,
    [padded_h, padded_w]: [usize; 2],
) -> Vec<f32> {
    let Conv2dShape {
        batch,
        in_channels,
        out_channels,
        kernel: [kh, kw],
        stride,
        ..
    } = shape;
    let [out_h, out_w] = shape.output_size();
    let image_len = padded_h * padded_w;
    let (taps, map) = (kh * kw, out_h * out_w);
    let positions = batch * map;
    let mut columns = vec![0f32; in_channels * taps * positions];
    columns
        .par_chunks_mut(positions)
        .enumerate()
        .for_each(|(row, dst)| {
            let (c, t) = (row / taps, row % taps);
            let (i, j) = (t / kw, t % kw);
            for (b, dst) in dst.chunks_exact_mut(map).enumerate() {
                let image = &padded[c * channel_len + b * image_len..][..image_len];
                let [sy, sx] = stride;
                for (y, dst) in dst.chunks_exact_mut(out_w).enumerate() {
                    let row = &image[(y * sy + i) * padded_w + j..];
                    if sx == 1 {
                        dst.copy_from_slice(&row[..out_w]);
                    } else {
                        for (x, d) in dst.iter_mut().enumerate() {
                            *d = row[x * sx];
                        }
                    }
                }
            }
        });
    let mut product = vec![0f32; out_channels * positions];
    // SAFETY: `weight` is `out × in·taps`, `columns` `in·taps × positions` and `product`
    // `out × positions`, all row-major and sized so above.
    unsafe {
        multiply(
            [out_channels, positions, in_channels * taps],
            (product.as_mut_ptr(), [positions, 1]),
            (weight.as_ptr(), [in_channels * taps, 1]),
            (columns.as_ptr(), [positions, 1]),
            false,
            1.0,
            true,
        );
    }
    let mut out = vec![0f32; batch * out_channels * map];
    out.par_chunks_mut(map).enumerate().for_each(|(i, dst)| {
        let (b, o) = (i / out_channels, i % out_channels);
        let bias = bias.map_or(0.0, |bias| bias[o]);
        for (d, &s) in dst
            .iter_mut()
            .zip(&product[o * positions + b * map..][..map])
        {
            *d = s + bias;
        }
    });
    out
}

/// How the output is cut into tasks: blocks of output channels × blocks of positions.
struct Split {
    channel_blocks: usize,
    position_blocks: usize,
}

impl Split {
    /// One task per core. Every position block packs the weights of its channels again, and
    /// every channel block the inputs of its positions: pick the cut that reads the least,
    /// `position_blocks · out_channels + channel_blocks · positions` (both times `in · taps`).
    /// Large maps split by positions, small deep ones (8×8 at 1280 channels) by channels.
    fn choose(threads: usize, out_channels: usize, positions: usize) -> Self {
        let threads = threads.max(1);
        (1..=threads)
            .map(|position_blocks| Split {
                channel_blocks: threads.div_ceil(position_blocks),
                position_blocks,
            })
            .min_by_key(|s| s.position_blocks * out_channels + s.channel_blocks * positions)
            .unwrap_or(Split {
                channel_blocks: 1,
                position_blocks: 1,
            })
    }

    /// Block `i` of `blocks` over `0..len`, in multiples of 16 where the length allows.
    fn range(&self, i: usize, blocks: usize, len: usize) -> std::ops::Range<usize> {
        let step = len.div_ceil(blocks).next_multiple_of(16).min(len);
        let start = (i * step).min(len);
        start..((i + 1) * step).min(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn every_method_matches_the_direct_sum() {
        for shape in [
            // Large enough for Winograd (odd height: a half-empty last row of tiles).
            shape(2, [3, 4], [33, 32], [3, 3], [1; 4], [1, 1]),
            shape(2, [3, 4], [33, 32], [3, 3], [1, 1, 1, 0], [1, 1]),
            shape(2, [5, 7], [9, 11], [3, 3], [1, 1, 1, 1], [1, 1]),
            shape(1, [3, 4], [40, 33], [3, 3], [1, 1, 1, 1], [1, 1]),
            // Rows of more tiles than the transforms take at once, the last one partial.
            shape(1, [2, 3], [7, 66], [3, 3], [1, 1, 1, 1], [1, 1]),
            shape(2, [6, 3], [5, 6], [1, 1], [0, 0, 0, 0], [1, 1]),
            shape(1, [2, 3], [7, 6], [3, 2], [0, 1, 2, 0], [1, 1]),
            // A downsampler's stride 2 (with the U-Net's one-sided padding, and even/odd sizes).
            shape(2, [3, 5], [9, 8], [3, 3], [1, 1, 1, 1], [2, 2]),
            shape(1, [2, 2], [8, 8], [3, 3], [0, 0, 1, 1], [2, 2]),
        ] {
            let [kh, kw] = shape.kernel;
            let x = pseudo_random(
                shape.batch * shape.in_channels * shape.height * shape.width,
                1,
            );
            let w = pseudo_random(shape.out_channels * shape.in_channels * kh * kw, 2);
            let bias = pseudo_random(shape.out_channels, 3);
            let expected = reference(&x, &w, &bias, shape);
            for method in [
                ConvMethod::Winograd2x2,
                ConvMethod::Winograd4x4,
                ConvMethod::Im2col,
                ConvMethod::Shifted,
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

    #[test]
    fn mismatched_sizes_are_refused() {
        let shape = shape(1, [2, 2], [3, 3], [3, 3], [1; 4], [1, 1]);
        assert!(conv2d(&[0.0; 17], &[0.0; 36], None, shape).is_none());
        assert!(conv2d(&[0.0; 18], &[0.0; 36], Some(&[0.0; 3]), shape).is_none());
    }
}
