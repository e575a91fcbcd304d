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
    let mut out = vec![0f32; shape.planes * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, plane)| {
            for oy in 0..oh {
                let y0 = (oy * sh).saturating_sub(ph);
                let y1 = (oy * sh + kh).saturating_sub(ph).min(h);
                for ox in 0..ow {
                    let x0 = (ox * sw).saturating_sub(pw);
                    let x1 = (ox * sw + kw).saturating_sub(pw).min(w);
                    let mut acc = if average { 0.0 } else { f32::NEG_INFINITY };
                    for y in y0..y1 {
                        let row = &plane[y * w + x0..y * w + x1];
                        if average {
                            for &v in row {
                                acc += v;
                            }
                        } else {
                            for &v in row {
                                // NaN propagates, as in PyTorch.
                                if v > acc || v.is_nan() {
                                    acc = v;
                                }
                            }
                        }
                    }
                    o[oy * ow + ox] = if average {
                        acc / ((y1 - y0) * (x1 - x0)) as f32
                    } else {
                        acc
                    };
                }
            }
        });
    Some(out)
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
}
