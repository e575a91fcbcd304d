//! 3×3-style pooling over channels-first maps, one plane per task: the maximum, or the mean
//! over the window's pixels inside the image (`count_include_pad=False`). Burn's Flex pooling
//! tracks indices and walks each window element by element; here each output row reads its
//! window's input rows once. Windows are summed row by row, column by column, as PyTorch does.

use rayon::prelude::*;

/// The sizes of one pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// Planes (batch × channels).
    pub planes: usize,
    /// Input height and width.
    pub size: [usize; 2],
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Steps between windows.
    pub stride: [usize; 2],
    /// Pixels of padding on each side (never counted, never the maximum).
    pub padding: [usize; 2],
}

impl PoolShape {
    /// The output height and width (floor mode); `None` when the window does not fit.
    pub fn output_size(&self) -> Option<[usize; 2]> {
        let side = |i: usize| {
            let padded = self.size[i] + 2 * self.padding[i];
            (self.stride[i] > 0 && self.kernel[i] > 0 && padded >= self.kernel[i])
                .then(|| (padded - self.kernel[i]) / self.stride[i] + 1)
        };
        Some([side(0)?, side(1)?])
    }
}

/// Max pooling (`average = false`) or average pooling without the padding
/// (`average = true`) of `x` (`[planes, h, w]` row-major). `None` when the sizes do not fit.
pub fn pool2d(x: &[f32], shape: PoolShape, average: bool) -> Option<Vec<f32>> {
    let [h, w] = shape.size;
    let [oh, ow] = shape.output_size()?;
    if x.len() != shape.planes * h * w
        || shape.padding[0] >= shape.kernel[0]
        || shape.padding[1] >= shape.kernel[1]
    {
        return None;
    }
    let [kh, kw] = shape.kernel;
    let [sh, sw] = shape.stride;
    let [ph, pw] = shape.padding;
    // The input columns of output column `ox`: `x0(ox)..x1(ox)`, clipped to the image.
    let x0 = |ox: usize| (ox * sw).saturating_sub(pw);
    let x1 = |ox: usize| (ox * sw + kw).saturating_sub(pw).min(w);
    // For window column `dx`, the output columns whose tap lies inside the image:
    // `ox · sw + dx − pw ∈ [0, w)`.
    let columns: Vec<std::ops::Range<usize>> = (0..kw)
        .map(|dx| {
            let lo = pw.saturating_sub(dx).div_ceil(sw);
            let hi = (w + pw).saturating_sub(dx).div_ceil(sw).min(ow);
            lo..hi.max(lo)
        })
        .collect();
    let mut out = vec![0f32; shape.planes * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each_init(
            || vec![0f32; ow],
            |acc, (o, plane)| {
                for (oy, o) in o.chunks_exact_mut(ow).enumerate() {
                    let y0 = (oy * sh).saturating_sub(ph);
                    let y1 = (oy * sh + kh).saturating_sub(ph).min(h);
                    acc.fill(if average { 0.0 } else { f32::NEG_INFINITY });
                    // Row by row, and within a row column by column, as PyTorch sums each
                    // window; every output column of the row at once, so that the loops run
                    // over vectors of outputs.
                    for y in y0..y1 {
                        let row = &plane[y * w..(y + 1) * w];
                        for (dx, cols) in columns.iter().enumerate() {
                            let acc = &mut acc[cols.clone()];
                            let first = cols.start * sw + dx - pw;
                            if sw == 1 {
                                let src = &row[first..first + acc.len()];
                                if average {
                                    for (a, &v) in acc.iter_mut().zip(src) {
                                        *a += v;
                                    }
                                } else {
                                    for (a, &v) in acc.iter_mut().zip(src) {
                                        *a = max_nan(*a, v);
                                    }
                                }
                            } else {
                                let src = row[first..].iter().step_by(sw);
                                if average {
                                    for (a, &v) in acc.iter_mut().zip(src) {
                                        *a += v;
                                    }
                                } else {
                                    for (a, &v) in acc.iter_mut().zip(src) {
                                        *a = max_nan(*a, v);
                                    }
                                }
                            }
                        }
                    }
                    if average {
                        let rows = (y1 - y0) as f32;
                        for (ox, (d, &a)) in o.iter_mut().zip(acc.iter()).enumerate() {
                            *d = a / (rows * (x1(ox) - x0(ox)) as f32);
                        }
                    } else {
                        o.copy_from_slice(acc);
                    }
                }
            },
        );
    Some(out)
}

/// The larger of a running maximum and a new value; a NaN wins and stays, as in PyTorch.
#[inline(always)]
fn max_nan(acc: f32, v: f32) -> f32 {
    if v > acc || v.is_nan() { v } else { acc }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_clip_to_the_image() {
        // 1 plane 3×3: 1..9.
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let shape = PoolShape {
            planes: 1,
            size: [3, 3],
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
        };
        let avg = pool2d(&x, shape, true).unwrap();
        // Corner: (1+2+4+5)/4; centre: 45/9.
        assert_eq!(avg[0], 3.0);
        assert_eq!(avg[4], 5.0);
        let max = pool2d(&x, shape, false).unwrap();
        assert_eq!(max, vec![5.0, 6.0, 6.0, 8.0, 9.0, 9.0, 8.0, 9.0, 9.0]);
        let strided = PoolShape {
            stride: [2, 2],
            padding: [0, 0],
            ..shape
        };
        assert_eq!(pool2d(&x, strided, false).unwrap(), vec![9.0]);
    }

    /// Every window size, stride and padding against a window-by-window sum in the same order
    /// (row by row, column by column): equal to the bit, NaN kept by the maximum.
    #[test]
    fn rows_at_once_equal_the_window_by_window_sums() {
        let mut state = 9u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (size, kernel, stride, padding) in [
            ([7, 9], [3, 3], [1, 1], [1, 1]),
            ([8, 8], [3, 3], [2, 2], [0, 0]),
            ([9, 7], [3, 3], [2, 2], [1, 1]),
            ([5, 11], [2, 3], [1, 2], [1, 0]),
            ([4, 4], [4, 4], [1, 1], [2, 2]),
            ([1, 1], [3, 3], [1, 1], [1, 1]),
            ([6, 13], [1, 5], [1, 3], [0, 2]),
        ] {
            let shape = PoolShape {
                planes: 2,
                size,
                kernel,
                stride,
                padding,
            };
            let [h, w] = size;
            let mut x: Vec<f32> = (0..2 * h * w).map(|_| next()).collect();
            x[h * w + w / 2] = f32::NAN;
            let [oh, ow] = shape.output_size().unwrap();
            for average in [false, true] {
                let got = pool2d(&x, shape, average).unwrap();
                for p in 0..2 {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let (mut acc, mut count) =
                                (if average { 0.0 } else { f32::NEG_INFINITY }, 0);
                            for i in 0..kernel[0] {
                                for j in 0..kernel[1] {
                                    let (y, xx) = (
                                        (oy * stride[0] + i) as isize - padding[0] as isize,
                                        (ox * stride[1] + j) as isize - padding[1] as isize,
                                    );
                                    if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                        continue;
                                    }
                                    let v = x[p * h * w + y as usize * w + xx as usize];
                                    count += 1;
                                    acc = if average {
                                        acc + v
                                    } else if v > acc || v.is_nan() {
                                        v
                                    } else {
                                        acc
                                    };
                                }
                            }
                            let want = if average { acc / count as f32 } else { acc };
                            let g = got[(p * oh + oy) * ow + ox];
                            assert!(
                                g.to_bits() == want.to_bits() || g.is_nan() && want.is_nan(),
                                "{shape:?} average {average} ({p},{oy},{ox}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
