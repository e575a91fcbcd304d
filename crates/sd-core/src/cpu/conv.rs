//! 2-D convolution with stride 1 as a sum of shifted matrix multiplies, without im2col.
//!
//! The input is copied once into a zero-padded buffer of `Hp × Wp` pixels per channel. On that
//! grid, the output pixel `(y, x)` sits at position `y·Wp + x`, and for the kernel tap `(i, j)`
//! it reads the padded input at position `y·Wp + x + i·Wp + j`: for every tap, the inputs of all
//! output positions form one `channels × positions` matrix with unit position stride, a plain
//! view of the padded buffer shifted by `i·Wp + j`. The convolution is then `kh·kw` multiplies
//! `W[:, :, i, j] · X_shift(i, j)` accumulated into one output, computed on `Ho × Wp` positions
//! (the `Wp − Wo` extra columns of each row are dropped when the bias is added).

use rayon::prelude::*;

/// The sizes of one convolution (stride 1, dilation 1, one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: [usize; 2],
    /// Zeros added at the top, left, bottom and right.
    pub padding: [usize; 4],
}

impl Conv2dShape {
    /// Output height and width.
    pub fn output_size(&self) -> [usize; 2] {
        let [top, left, bottom, right] = self.padding;
        [
            (self.height + top + bottom + 1).saturating_sub(self.kernel[0]),
            (self.width + left + right + 1).saturating_sub(self.kernel[1]),
        ]
    }
}

/// Output positions one task computes: enough for the multiplies to run at full width, small
/// enough that the task's output block (`out_channels × positions`) stays in cache.
const TILE_POSITIONS: usize = 512;

/// A pointer the tasks share; each writes only its own rows (see the SAFETY note at its use).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint position ranges of the buffer behind the pointer, which outlives
// them (the parallel loop returns before it is read).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
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
    let Conv2dShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: [kh, kw],
        padding: [top, left, bottom, right],
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
    let (padded_h, padded_w) = (height + top + bottom, width + left + right);
    // The last tap of the last position reads `kw − 1` past the padded grid.
    let channel_len = padded_h * padded_w + kw - 1;
    let mut padded = vec![0f32; batch * in_channels * channel_len];
    padded
        .par_chunks_mut(channel_len)
        .zip(x.par_chunks(height * width))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(width).enumerate() {
                let start = (y + top) * padded_w + left;
                dst[start..start + width].copy_from_slice(row);
            }
        });

    let taps = kh * kw;
    let grid = out_h * padded_w;
    let mut full = vec![0f32; batch * out_channels * grid];
    let rows_per_tile = (TILE_POSITIONS / padded_w).clamp(1, out_h);
    let tiles = out_h.div_ceil(rows_per_tile);
    let out_ptr = SharedOut(full.as_mut_ptr());
    (0..batch * tiles).into_par_iter().for_each(|task| {
        let (b, tile) = (task / tiles, task % tiles);
        let first = tile * rows_per_tile * padded_w;
        let positions = (rows_per_tile * padded_w).min(grid - first);
        let input = &padded[b * in_channels * channel_len..][..in_channels * channel_len];
        for t in 0..taps {
            let shift = (t / kw) * padded_w + t % kw;
            // SAFETY: the destination is positions `first..first + positions` of every output
            // channel of image `b` (no other task touches them: tasks split batch × position
            // ranges); reads are the tap's weight matrix and, for each input channel, padded
            // positions `first + shift .. first + shift + positions`, which end at most at
            // `(out_h − 1 + kh − 1)·Wp + Wp − 1 + kw − 1 < channel_len`.
            unsafe {
                gemm::gemm(
                    out_channels,
                    positions,
                    in_channels,
                    out_ptr.get().add(b * out_channels * grid + first),
                    1,
                    grid as isize,
                    t > 0,
                    weight.as_ptr().add(t),
                    taps as isize,
                    (in_channels * taps) as isize,
                    input.as_ptr().add(first + shift),
                    1,
                    channel_len as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });

    // Drop the extra columns and add the bias.
    let mut out = vec![0f32; batch * out_channels * out_h * out_w];
    out.par_chunks_mut(out_h * out_w)
        .zip(full.par_chunks(grid))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            let bias = bias.map_or(0.0, |b| b[i % out_channels]);
            for (d, s) in dst.chunks_exact_mut(out_w).zip(src.chunks_exact(padded_w)) {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = s + bias;
                }
            }
        });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                                        y as isize + i as isize - top,
                                        xx as isize + j as isize - left,
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
    fn shifted_multiplies_match_the_direct_sum() {
        for shape in [
            Conv2dShape {
                batch: 2,
                in_channels: 5,
                out_channels: 7,
                height: 9,
                width: 11,
                kernel: [3, 3],
                padding: [1, 1, 1, 1],
            },
            Conv2dShape {
                batch: 1,
                in_channels: 3,
                out_channels: 4,
                height: 40,
                width: 33,
                kernel: [3, 3],
                padding: [1, 1, 1, 1],
            },
            Conv2dShape {
                batch: 2,
                in_channels: 6,
                out_channels: 3,
                height: 5,
                width: 6,
                kernel: [1, 1],
                padding: [0, 0, 0, 0],
            },
            Conv2dShape {
                batch: 1,
                in_channels: 2,
                out_channels: 3,
                height: 7,
                width: 6,
                kernel: [3, 2],
                padding: [0, 1, 2, 0],
            },
        ] {
            let [kh, kw] = shape.kernel;
            let x = pseudo_random(
                shape.batch * shape.in_channels * shape.height * shape.width,
                1,
            );
            let w = pseudo_random(shape.out_channels * shape.in_channels * kh * kw, 2);
            let bias = pseudo_random(shape.out_channels, 3);
            let ours = conv2d(&x, &w, Some(&bias), shape).expect("consistent sizes");
            let expected = reference(&x, &w, &bias, shape);
            assert_eq!(ours.len(), expected.len());
            let worst = ours
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{shape:?}: {worst}");
        }
    }

    #[test]
    fn mismatched_sizes_are_refused() {
        let shape = Conv2dShape {
            batch: 1,
            in_channels: 2,
            out_channels: 2,
            height: 3,
            width: 3,
            kernel: [3, 3],
            padding: [1; 4],
        };
        assert!(conv2d(&[0.0; 17], &[0.0; 36], None, shape).is_none());
        assert!(conv2d(&[0.0; 18], &[0.0; 36], Some(&[0.0; 3]), shape).is_none());
    }
}
