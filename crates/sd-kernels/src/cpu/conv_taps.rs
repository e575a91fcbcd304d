//! A stride-1 convolution for training: forward, input gradient, weight gradient and bias
//! gradient as sums of per-tap matrix products on a zero-padded copy of the input, each product
//! accumulated by gemm straight into its output.
//!
//! Why: `sd_core`'s `conv_train` writes the same sums in Burn tensor ops (one batched matmul
//! per tap on a view of the padded input, then the taps' products added), which on Flex costs,
//! per tap, a zero-filled output that is then copied to realign it, and an addition on one
//! core; its padding is two concatenations and its crop a strided copy. On the shapes model's
//! training step (batch 32, 16² latents) those were about a sixth of the main thread's time.
//!
//! The layout is `conv_train`'s (its module notes, steps 1 and 3, stride 1): each image's
//! channels zero-padded to `phase_h × phase_w` planes, the output computed over the phase's
//! whole width (the "wide" output) so that tap `(i, j)` reads the flat slice of every plane
//! that starts at `i · phase_w + j`; the wide columns past `out_w` are dropped (forward) or
//! zero (weight gradient). The input gradient is the forward of the output gradient, padded
//! by `k − 1 − padding`, with the kernel flipped in space and transposed in channels.

use rayon::prelude::*;

use super::{SharedOut, multiply};

/// The sizes of one stride-1 convolution and its padded layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapConv {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// The input's rows.
    pub height: usize,
    /// The input's columns.
    pub width: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub padding: [usize; 4],
}

impl TapConv {
    /// The output's rows and columns; `None` when the kernel does not fit the padded input.
    pub fn output_size(&self) -> Option<[usize; 2]> {
        let [kh, kw] = self.kernel;
        let [pt, pl, pb, pr] = self.padding;
        let (ph, pw) = (self.height + pt + pb, self.width + pl + pr);
        (kh > 0 && kw > 0 && ph >= kh && pw >= kw).then(|| [ph - kh + 1, pw - kw + 1])
    }

    /// A padded plane's rows and columns: every tap's slice of `out_h · phase_w` elements
    /// fits in it (one more row when the last tap's slice runs `kw − 1` past the last full
    /// row), as `conv_train`'s `Geometry` lays it out for stride 1.
    pub fn phase(&self) -> Option<[usize; 2]> {
        let [out_h, out_w] = self.output_size()?;
        let [kh, kw] = self.kernel;
        Some([out_h + kh - 1 + usize::from(kw > 1), out_w + kw - 1])
    }

    /// The input gradient's convolution: the output gradient (`out_channels` planes of the
    /// output size) padded by `k − 1 − padding` before and what reaches the input's far edge
    /// after; `None` when that padding would be negative (a crop).
    fn input_gradient(&self) -> Option<TapConv> {
        let [out_h, out_w] = self.output_size()?;
        let [kh, kw] = self.kernel;
        let [pt, pl, _, _] = self.padding;
        let before = [(kh - 1).checked_sub(pt)?, (kw - 1).checked_sub(pl)?];
        let after = [
            (self.height + pt).checked_sub(out_h)?,
            (self.width + pl).checked_sub(out_w)?,
        ];
        Some(TapConv {
            batch: self.batch,
            channels: self.out_channels,
            out_channels: self.channels,
            height: out_h,
            width: out_w,
            kernel: self.kernel,
            padding: [before[0], before[1], after[0], after[1]],
        })
    }

    fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }
}

/// `x` (`[batch, channels, height, width]`) zero-padded into `[batch · channels, phase_h ·
/// phase_w]` planes, the input at row `top`, column `left` of each.
pub fn pad(x: &[f32], g: &TapConv) -> Option<Vec<f32>> {
    let [phase_h, phase_w] = g.phase()?;
    let (h, w) = (g.height, g.width);
    let [pt, pl, ..] = g.padding;
    let planes = g.batch * g.channels;
    if x.len() != planes * h * w {
        return None;
    }
    // Rows and columns of the input inside the plane (all of them for stride 1).
    let (kept_h, kept_w) = (
        h.min(phase_h.saturating_sub(pt)),
        w.min(phase_w.saturating_sub(pl)),
    );
    let plane = phase_h * phase_w;
    let mut out = vec![0f32; planes * plane];
    out.par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for r in 0..kept_h {
                let start = (pt + r) * phase_w + pl;
                dst[start..start + kept_w].copy_from_slice(&src[r * w..r * w + kept_w]);
            }
        });
    Some(out)
}

/// `[kh · kw, out, in]` tap matrices of a weight `[out, in, kh, kw]`; `None` when the weight
/// is not that size.
pub fn tap_matrices(weight: &[f32], g: &TapConv) -> Option<Vec<f32>> {
    let (o, c, taps) = (g.out_channels, g.channels, g.taps());
    if weight.len() != taps * o * c {
        return None;
    }
    let mut out = vec![0f32; taps * o * c];
    // The weight as `[out · in, taps]`, transposed.
    transpose_into(weight, o * c, taps, &mut out);
    Some(out)
}

/// `dst[j · rows + i] = src[i · cols + j]`: the `rows × cols` matrix `src` transposed, by 64 ×
/// 64 tiles spread over the threads (an element-by-element gather of a large weight was a
/// tenth of the SD 1.5 U-Net's training step).
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 64;
    let len = rows * cols;
    assert!(src.len() == len && dst.len() == len);
    let (tiles_i, tiles_j) = (rows.div_ceil(TILE), cols.div_ceil(TILE));
    let shared = SharedOut(dst.as_mut_ptr());
    (0..tiles_i * tiles_j).into_par_iter().for_each(|tile| {
        let (i0, j0) = ((tile / tiles_j) * TILE, (tile % tiles_j) * TILE);
        let (i1, j1) = ((i0 + TILE).min(rows), (j0 + TILE).min(cols));
        let dst = shared.get();
        for j in j0..j1 {
            for i in i0..i1 {
                // SAFETY: `j · rows + i < rows · cols`, inside the buffer, which outlives the
                // loop; each element is written by its tile alone.
                unsafe { *dst.add(j * rows + i) = src[i * cols + j] };
            }
        }
    });
}

/// Whether to spread the images over the threads (each multiply on one core) rather than each
/// multiply over them.
fn by_image(batch: usize) -> bool {
    batch >= rayon::current_num_threads()
}

/// The convolution of the padded input (from [`pad`]) by the tap matrices (from
/// [`tap_matrices`]), plus `bias`: `[batch, out, out_h, out_w]`.
pub fn forward(
    padded: &[f32],
    taps: &[f32],
    bias: Option<&[f32]>,
    g: &TapConv,
) -> Option<Vec<f32>> {
    let (o, c) = (g.out_channels, g.channels);
    by_taps(padded, taps, |t| (t * o * c, [c, 1]), bias, g)
}

/// [`forward`] with tap `t`'s `out × in` matrix at element `offset` of `taps`, its rows and
/// columns `strides` apart, for `(offset, strides) = tap(t)`.
fn by_taps(
    padded: &[f32],
    taps: &[f32],
    tap: impl Fn(usize) -> (usize, [usize; 2]) + Sync,
    bias: Option<&[f32]>,
    g: &TapConv,
) -> Option<Vec<f32>> {
    let [out_h, out_w] = g.output_size()?;
    let [phase_h, phase_w] = g.phase()?;
    let (c, o, kw) = (g.channels, g.out_channels, g.kernel[1]);
    let (plane, wide) = (phase_h * phase_w, out_h * phase_w);
    // The last element each tap matrix reads.
    let last = |t: usize| {
        let (at, [row, column]) = tap(t);
        at + (o - 1) * row + (c - 1) * column
    };
    if padded.len() != g.batch * c * plane
        || o == 0
        || c == 0
        || (0..g.taps()).any(|t| last(t) >= taps.len())
        || bias.is_some_and(|b| b.len() != o)
    {
        return None;
    }
    let image = o * out_h * out_w;
    let mut out = Vec::with_capacity(g.batch * image);
    let parallel = !by_image(g.batch);
    let one = |b: usize, dst: &mut [std::mem::MaybeUninit<f32>]| {
        let mut scratch = Vec::<f32>::with_capacity(o * wide);
        let src = &padded[b * c * plane..(b + 1) * c * plane];
        for t in 0..g.taps() {
            let offset = (t / kw) * phase_w + t % kw;
            let (at, strides) = tap(t);
            // SAFETY: the scratch has room for `o × wide`; the tap matrix is `o × c` inside
            // `taps` (checked above); the slice read is `c` rows `plane` apart of `wide`
            // elements from `offset`, and `offset + wide ≤ plane` by the phase's size. The
            // first tap writes every element of the scratch, the others accumulate onto it.
            unsafe {
                multiply(
                    [o, wide, c],
                    (scratch.as_mut_ptr(), [wide, 1]),
                    (taps[at..].as_ptr(), strides),
                    (src[offset..].as_ptr(), [plane, 1]),
                    t > 0,
                    1.0,
                    parallel,
                );
                scratch.set_len(o * wide);
            }
        }
        for (oi, rows) in dst.chunks_exact_mut(out_h * out_w).enumerate() {
            let b = bias.map_or(0.0, |b| b[oi]);
            for (r, row) in rows.chunks_exact_mut(out_w).enumerate() {
                let from = &scratch[oi * wide + r * phase_w..][..out_w];
                for (d, &v) in row.iter_mut().zip(from) {
                    d.write(v + b);
                }
            }
        }
    };
    let spare = &mut out.spare_capacity_mut()[..g.batch * image];
    if parallel {
        spare
            .chunks_exact_mut(image)
            .enumerate()
            .for_each(|(b, dst)| one(b, dst));
    } else {
        spare
            .par_chunks_exact_mut(image)
            .enumerate()
            .for_each(|(b, dst)| one(b, dst));
    }
    // SAFETY: every image's every element was written above.
    unsafe { out.set_len(g.batch * image) };
    Some(out)
}

/// `∂L/∂x` (`[batch, in, height, width]`) from `∂L/∂y` (`[batch, out, out_h, out_w]`) and the
/// weight (`[out, in, kh, kw]`); `None` when the input gradient's padding would be negative.
pub fn input_grad(grad: &[f32], weight: &[f32], g: &TapConv) -> Option<Vec<f32>> {
    let gi = g.input_gradient()?;
    if gi.output_size()? != [g.height, g.width] {
        return None;
    }
    let padded = pad(grad, &gi)?;
    // Tap `t` of the input gradient is tap `k − 1 − t` of the forward, transposed: read in
    // place from the forward's tap matrices (`[out, in]` each) by swapped strides.
    let (o, c, taps) = (g.out_channels, g.channels, g.taps());
    let matrices = tap_matrices(weight, g)?;
    by_taps(
        &padded,
        &matrices,
        |t| ((taps - 1 - t) * o * c, [1, c]),
        None,
        &gi,
    )
}

/// `∂L/∂W` (`[out, in, kh, kw]`): `Σ_b ∂L/∂y_wide[b] · tap(i, j)[b]ᵀ` for every tap, from the
/// padded input (from [`pad`]) and `∂L/∂y` (`[batch, out, out_h, out_w]`).
pub fn weight_grad(padded: &[f32], grad: &[f32], g: &TapConv) -> Option<Vec<f32>> {
    let [out_h, out_w] = g.output_size()?;
    let [phase_h, phase_w] = g.phase()?;
    let (c, o, kw, taps) = (g.channels, g.out_channels, g.kernel[1], g.taps());
    let (plane, wide) = (phase_h * phase_w, out_h * phase_w);
    if padded.len() != g.batch * c * plane || grad.len() != g.batch * o * out_h * out_w {
        return None;
    }
    // The gradient of the wide output: zero past the true output width.
    let mut grad_wide = vec![0f32; g.batch * o * wide];
    grad_wide
        .par_chunks_mut(phase_w)
        .zip(grad.par_chunks(out_w))
        .for_each(|(dst, src)| dst[..out_w].copy_from_slice(src));
    let mut by_tap = vec![0f32; taps * o * c];
    let parallel = taps < rayon::current_num_threads();
    let one = |t: usize, dst: &mut [f32]| {
        let offset = (t / kw) * phase_w + t % kw;
        for b in 0..g.batch {
            let src = &padded[b * c * plane..(b + 1) * c * plane];
            // SAFETY: `dst` is this tap's `o × c`; the gradient is `o` rows of `wide`; the
            // tap's slice, read transposed (`wide × c`, columns `plane` apart), ends inside
            // the image's planes as in `forward`. The first image writes every element.
            unsafe {
                multiply(
                    [o, c, wide],
                    (dst.as_mut_ptr(), [c, 1]),
                    (grad_wide[b * o * wide..].as_ptr(), [wide, 1]),
                    (src[offset..].as_ptr(), [1, plane]),
                    b > 0,
                    1.0,
                    parallel,
                );
            }
        }
    };
    if parallel {
        by_tap
            .chunks_exact_mut(o * c)
            .enumerate()
            .for_each(|(t, dst)| one(t, dst));
    } else {
        by_tap
            .par_chunks_exact_mut(o * c)
            .enumerate()
            .for_each(|(t, dst)| one(t, dst));
    }
    // `[taps, out, in]` → `[out, in, taps]`.
    let mut out = vec![0f32; taps * o * c];
    transpose_into(&by_tap, taps, o * c, &mut out);
    Some(out)
}

/// `∂L/∂b` (`[out]`): `∂L/∂y` (`[batch, out, pixels]`) summed over the batch and the pixels,
/// each channel in f64.
pub fn bias_grad(grad: &[f32], batch: usize, out_channels: usize) -> Option<Vec<f32>> {
    if batch == 0 || out_channels == 0 || !grad.len().is_multiple_of(batch * out_channels) {
        return None;
    }
    let pixels = grad.len() / (batch * out_channels);
    Some(
        (0..out_channels)
            .into_par_iter()
            .map(|oi| {
                (0..batch)
                    .map(|b| {
                        let start = (b * out_channels + oi) * pixels;
                        grad[start..start + pixels]
                            .iter()
                            .map(|&v| f64::from(v))
                            .sum::<f64>()
                    })
                    .sum::<f64>() as f32
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct convolution in f64: `y[b, o, r, s] = bias[o] + Σ x[b, c, r + i − pt, s + j −
    /// pl] · w[o, c, i, j]` over the taps that land inside the input.
    fn direct(x: &[f32], w: &[f32], bias: &[f32], g: &TapConv) -> Vec<f64> {
        let [out_h, out_w] = g.output_size().unwrap();
        let [kh, kw] = g.kernel;
        let [pt, pl, ..] = g.padding;
        let (c, o, h, wd) = (g.channels, g.out_channels, g.height, g.width);
        let mut y = vec![0f64; g.batch * o * out_h * out_w];
        for b in 0..g.batch {
            for oi in 0..o {
                for r in 0..out_h {
                    for s in 0..out_w {
                        let mut acc = f64::from(bias[oi]);
                        for ci in 0..c {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (yy, xx) = (r + i, s + j);
                                    if yy < pt || xx < pl || yy - pt >= h || xx - pl >= wd {
                                        continue;
                                    }
                                    acc +=
                                        f64::from(x[((b * c + ci) * h + yy - pt) * wd + xx - pl])
                                            * f64::from(w[((oi * c + ci) * kh + i) * kw + j]);
                                }
                            }
                        }
                        y[((b * o + oi) * out_h + r) * out_w + s] = acc;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 2_654_435_761 + seed * 97) % 10_007) as f32 / 10_007.0) - 0.5)
            .collect()
    }

    /// The forward, and the three gradients of `L = Σ y ⊙ u` (`∂L/∂y = u`) against the
    /// direct convolution's, differentiated by hand: `∂L/∂x`, `∂L/∂w` and `∂L/∂b` as sums of
    /// `u` over the positions each element meets.
    #[test]
    fn matches_the_direct_convolution_and_its_gradients() {
        for (batch, c, o, h, w, kernel, padding) in [
            (3, 5, 7, 9, 11, [3, 3], [1, 1, 1, 1]),
            (1, 4, 6, 8, 8, [3, 3], [1, 1, 1, 1]),
            (2, 3, 4, 6, 7, [1, 1], [0, 0, 0, 0]),
            (2, 3, 2, 7, 5, [3, 2], [2, 0, 1, 1]),
            (4, 2, 3, 5, 6, [5, 5], [2, 2, 2, 2]),
        ] {
            let g = TapConv {
                batch,
                channels: c,
                out_channels: o,
                height: h,
                width: w,
                kernel,
                padding,
            };
            let [out_h, out_w] = g.output_size().unwrap();
            let (kh, kw) = (kernel[0], kernel[1]);
            let x = values(batch * c * h * w, 1);
            let wt = values(o * c * kh * kw, 2);
            let bias = values(o, 3);
            let u = values(batch * o * out_h * out_w, 4);
            let padded = pad(&x, &g).unwrap();
            let y = forward(&padded, &tap_matrices(&wt, &g).unwrap(), Some(&bias), &g).unwrap();
            let want = direct(&x, &wt, &bias, &g);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5,
                    "{g:?} y {i}: {a} against {b}"
                );
            }
            // ∂L/∂x[b, c, p, q] = Σ_{o, i, j} u[b, o, p + pt − i, q + pl − j] · w[o, c, i, j].
            let gx = input_grad(&u, &wt, &g).unwrap();
            let gw = weight_grad(&padded, &u, &g).unwrap();
            let gb = bias_grad(&u, batch, o).unwrap();
            let (mut want_x, mut want_w, mut want_b) =
                (vec![0f64; x.len()], vec![0f64; wt.len()], vec![0f64; o]);
            let [pt, pl, ..] = padding;
            for b in 0..batch {
                for oi in 0..o {
                    for r in 0..out_h {
                        for s in 0..out_w {
                            let du = f64::from(u[((b * o + oi) * out_h + r) * out_w + s]);
                            want_b[oi] += du;
                            for ci in 0..c {
                                for i in 0..kh {
                                    for j in 0..kw {
                                        let (yy, xx) = (r + i, s + j);
                                        if yy < pt || xx < pl || yy - pt >= h || xx - pl >= w {
                                            continue;
                                        }
                                        let xi = ((b * c + ci) * h + yy - pt) * w + xx - pl;
                                        let wi = ((oi * c + ci) * kh + i) * kw + j;
                                        want_x[xi] += du * f64::from(wt[wi]);
                                        want_w[wi] += du * f64::from(x[xi]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for (what, got, want) in [
                ("x", &gx, &want_x),
                ("w", &gw, &want_w),
                ("b", &gb, &want_b),
            ] {
                assert_eq!(got.len(), want.len(), "{g:?} {what}");
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (f64::from(*a) - b).abs() < 1e-4,
                        "{g:?} ∂{what} {i}: {a} against {b}"
                    );
                }
            }
        }
    }
}
