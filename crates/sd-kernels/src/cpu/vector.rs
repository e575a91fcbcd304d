//! Element-wise and row kernels written as plain loops, compiled once per instruction set
//! (AVX-512, AVX2+FMA, baseline) and picked at run time, so the compiler vectorises them
//! without a `target-cpu` flag.

use rayon::prelude::*;

/// Lanes per block: one AVX-512 register of f32, two AVX2 ones.
const LANES: usize = 16;

/// Defines `pub fn name(args)` running `body` compiled for AVX-512, for AVX2+FMA or for the
/// baseline, whichever the CPU has.
macro_rules! dispatched {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (and with it AVX2 and FMA).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// `eˣ` to about one ulp (Cephes `expf`: Cody–Waite reduction `x = n ln2 + r`, `|r| ≤ ln2/2`,
/// and a degree-7 polynomial for `eʳ`), in branch-free arithmetic that vectorises. Inputs below
/// −87 are clamped there (`e⁻⁸⁷ ≈ 1.6e-38`, the smallest exponent the bit trick can build);
/// the softmax only feeds it `x − max ≤ 0`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for |n| < 2⁹.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to the nearest integer, left in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r2 + r + 1.0;
    e_r * f32::from_bits(((n_bits + 127) << 23) as u32)
}

/// The largest element (−∞ for an empty row).
#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let blocks = row.chunks_exact(LANES);
    let rest = blocks.remainder();
    for block in blocks {
        for (m, &x) in lanes.iter_mut().zip(block) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `row ← exp(row − shift)`; returns the sum of the new row.
#[inline(always)]
fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut blocks = row.chunks_exact_mut(LANES);
    for block in &mut blocks {
        for (s, x) in lanes.iter_mut().zip(block.iter_mut()) {
            *x = exp(*x - shift);
            *s += *x;
        }
    }
    let mut sum = 0.0;
    for x in blocks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    lanes.iter().sum::<f32>() + sum
}

dispatched! {
    /// Unnormalised softmax of each `cols`-wide row of `rows`, in place: `exp(x − max)` over
    /// the first `valid(r)` entries of row `r`, zeros after them (a causal mask). Writes
    /// `1 / sum` of each row into `inverse_sums`.
    pub fn softmax_rows(
        rows: &mut [f32],
        cols: usize,
        valid: &dyn Fn(usize) -> usize,
        inverse_sums: &mut [f32],
    ) {
        for (r, (row, inverse)) in rows
            .chunks_exact_mut(cols)
            .zip(inverse_sums.iter_mut())
            .enumerate()
        {
            let (kept, masked) = row.split_at_mut(valid(r).min(cols));
            masked.fill(0.0);
            let max = max_of(kept);
            let sum = exp_shifted(kept, max);
            *inverse = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        }
    }
}

/// The error function to 1.5e-7 (Abramowitz & Stegun 1964, eq. 7.1.26; 5e-7 with f32
/// rounding), branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-z * z)).copysign(x)
}

/// GELU, `x Φ(x) = x (1 + erf(x/√2)) / 2` (Hendrycks & Gimpel 2016), the exact form.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

dispatched! {
    /// GEGLU on rows of `2 · inner`: `out = h ⊙ GELU(g)` with `[h, g]` the row's two halves
    /// (Shazeer 2020, eq. 5).
    pub fn geglu_rows(input: &[f32], out: &mut [f32], inner: usize) {
        for (row, dst) in input.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
            let (hidden, gate) = row.split_at(inner);
            for ((o, &h), &g) in dst.iter_mut().zip(hidden).zip(gate) {
                *o = h * gelu(g);
            }
        }
    }
}

dispatched! {
    /// GEGLU's input gradient on rows of `2 · inner`: for `out = h ⊙ GELU(g)`,
    /// `∂L/∂h = ∂L/∂out · GELU(g)` and `∂L/∂g = ∂L/∂out · h · GELU′(g)` with
    /// `GELU′(g) = Φ(g) + g φ(g)`, written as the row's two halves.
    pub fn geglu_backward_rows(input: &[f32], grad: &[f32], out: &mut [f32], inner: usize) {
        const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
        for ((row, g_out), dst) in input
            .chunks_exact(2 * inner)
            .zip(grad.chunks_exact(inner))
            .zip(out.chunks_exact_mut(2 * inner))
        {
            let (hidden, gate) = row.split_at(inner);
            let (d_hidden, d_gate) = dst.split_at_mut(inner);
            for ((((dh, dg), &h), &g), &d) in d_hidden
                .iter_mut()
                .zip(d_gate.iter_mut())
                .zip(hidden)
                .zip(gate)
                .zip(g_out)
            {
                let cdf = 0.5 * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * g * g);
                *dh = d * g * cdf;
                *dg = d * h * (cdf + g * pdf);
            }
        }
    }
}

dispatched! {
    /// Swish, `x · σ(βx)` (Ramachandran et al. 2017), in place: SiLU for β = 1, CLIP's quick
    /// GELU for β = 1.702.
    pub fn swish_in_place(x: &mut [f32], beta: f32) {
        for v in x.iter_mut() {
            *v /= 1.0 + exp(-beta * *v);
        }
    }
}

dispatched! {
    /// SiLU's gradient: `∂L/∂x = ∂L/∂y · σ(x)(1 + x(1 − σ(x)))` for `y = x·σ(x)`.
    pub fn silu_backward_into(x: &[f32], grad: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let s = 1.0 / (1.0 + exp(-x));
            *o = g * s * (1.0 + x * (1.0 - s));
        }
    }
}

/// [`silu_backward_into`] over whole tensors of one length, in parallel.
pub fn silu_backward(x: &[f32], grad: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16).zip(grad.par_chunks(1 << 16)))
        .for_each(|(o, (x, g))| silu_backward_into(x, g, o));
    out
}

dispatched! {
    /// The mean and (biased) variance of a group, in two passes, summed in f32 lanes and
    /// combined in f64.
    pub fn group_statistics(x: &[f32]) -> (f64, f64) {
        let mut lanes = [0f32; LANES];
        let blocks = x.chunks_exact(LANES);
        let rest = blocks.remainder();
        for block in blocks {
            for (s, &v) in lanes.iter_mut().zip(block) {
                *s += v;
            }
        }
        let sum: f64 = lanes.iter().chain(rest).map(|&v| f64::from(v)).sum();
        let mean = sum / x.len().max(1) as f64;
        let m = mean as f32;
        let mut lanes = [0f32; LANES];
        let blocks = x.chunks_exact(LANES);
        let rest = blocks.remainder();
        for block in blocks {
            for (s, &v) in lanes.iter_mut().zip(block) {
                *s += (v - m) * (v - m);
            }
        }
        let squares: f64 = lanes.iter().map(|&v| f64::from(v)).sum::<f64>()
            + rest.iter().map(|&v| f64::from((v - m) * (v - m))).sum::<f64>();
        (mean, squares / x.len().max(1) as f64)
    }
}

dispatched! {
    /// `dst = src·a + b`, then SiLU when `silu`.
    pub fn normalize_channel(src: &[f32], dst: &mut [f32], a: f32, b: f32, silu: bool) {
        if silu {
            for (d, &s) in dst.iter_mut().zip(src) {
                let y = s * a + b;
                *d = y / (1.0 + exp(-y));
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s * a + b;
            }
        }
    }
}

/// The constants of one AdamW step (Loshchilov & Hutter 2019, Algorithm 2; the bias
/// corrections arranged as PyTorch's `AdamW`), as f32 like the tensor ops it replaces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// `1 − lr·λ`: the decoupled weight decay.
    pub decay: f32,
    /// `1 − β₁`.
    pub one_minus_beta1: f32,
    /// `β₂`.
    pub beta2: f32,
    /// `1 − β₂`.
    pub one_minus_beta2: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bias2_sqrt: f32,
    /// `ε`.
    pub epsilon: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
}

dispatched! {
    /// One AdamW step in place, element by element, in the order (and so the rounding) of the
    /// tensor ops it replaces: `θ ← θ(1 − lrλ)`, `m ← m + (g − m)(1 − β₁)`,
    /// `v ← vβ₂ + g²(1 − β₂)`, `θ ← θ − m / (√v / √(1 − β₂ᵗ) + ε) · lr / (1 − β₁ᵗ)`.
    pub fn adamw_in_place(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
        for (((t, &g), m), v) in theta.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            let mt = *m + (g - *m) * s.one_minus_beta1;
            let vt = *v * s.beta2 + g * g * s.one_minus_beta2;
            let denom = vt.sqrt() / s.bias2_sqrt + s.epsilon;
            *t = *t * s.decay - mt / denom * s.step_size;
            *m = mt;
            *v = vt;
        }
    }
}

dispatched! {
    /// `Σ x²`, each square and the sum in f64.
    pub fn sum_of_squares_f64(x: &[f32]) -> f64 {
        let mut lanes = [0f64; LANES / 2];
        let blocks = x.chunks_exact(LANES / 2);
        let rest = blocks.remainder();
        for block in blocks {
            for (s, &v) in lanes.iter_mut().zip(block) {
                *s += f64::from(v) * f64::from(v);
            }
        }
        lanes.iter().sum::<f64>() + rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()
    }
}

dispatched! {
    /// An exponential moving average's step towards `now`, in place:
    /// `avg ← avg − (avg − now)·w` (`w = 1 − decay`).
    pub fn ema_in_place(avg: &mut [f32], now: &[f32], w: f32) {
        for (a, &n) in avg.iter_mut().zip(now) {
            *a -= (*a - n) * w;
        }
    }
}

/// [`ema_in_place`] over a whole parameter, in parallel. The slices have one length.
pub fn ema(avg: &mut [f32], now: &[f32], w: f32) {
    avg.par_chunks_mut(PARAMETER_CHUNK)
        .zip(now.par_chunks(PARAMETER_CHUNK))
        .for_each(|(a, n)| ema_in_place(a, n, w));
}

dispatched! {
    /// `x ← x·a`, in place.
    pub fn scale_in_place(x: &mut [f32], a: f32) {
        for v in x.iter_mut() {
            *v *= a;
        }
    }
}

/// Elements handed to one task by the parallel passes over parameters.
const PARAMETER_CHUNK: usize = 1 << 15;

/// [`adamw_in_place`] over a whole parameter, in parallel. The slices have one length.
pub fn adamw(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], step: AdamWStep) {
    theta
        .par_chunks_mut(PARAMETER_CHUNK)
        .zip(grad.par_chunks(PARAMETER_CHUNK))
        .zip(m.par_chunks_mut(PARAMETER_CHUNK))
        .zip(v.par_chunks_mut(PARAMETER_CHUNK))
        .for_each(|(((t, g), m), v)| adamw_in_place(t, g, m, v, step));
}

/// [`sum_of_squares_f64`], in parallel.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    x.par_chunks(PARAMETER_CHUNK).map(sum_of_squares_f64).sum()
}

/// [`scale_in_place`], in parallel.
pub fn scale(x: &mut [f32], a: f32) {
    x.par_chunks_mut(PARAMETER_CHUNK)
        .for_each(|chunk| scale_in_place(chunk, a));
}

/// A view's sizes and strides with size-1 axes dropped and each axis merged into the one
/// before it where the two walk memory as one (`stride[i] = stride[i+1] · size[i+1]`).
fn collapse(shape: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut sizes, mut steps): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&size, &stride) in shape.iter().zip(strides) {
        if size == 1 {
            continue;
        }
        match (sizes.last_mut(), steps.last_mut()) {
            (Some(last), Some(step)) if *step == stride * size => {
                *last *= size;
                *step = stride;
            }
            _ => {
                sizes.push(size);
                steps.push(stride);
            }
        }
    }
    (sizes, steps)
}

/// The memory offset of row `row` (row-major over `shape`) of a view with these strides.
fn offset_of(mut row: usize, shape: &[usize], strides: &[usize]) -> usize {
    let mut offset = 0;
    for (&size, &stride) in shape.iter().zip(strides).rev() {
        offset += (row % size) * stride;
        row /= size;
    }
    offset
}

/// The elements of a strided view (`offset`, `shape`, `strides` into `src`) in logical order,
/// in parallel: contiguous runs copied row by row, otherwise the last two axes as matrices
/// copied in 32 × 32 tiles (so that a transpose reads and writes whole cache lines). Flex's
/// own copy walks a view of three or more axes that do not merge one element at a time, on
/// one core; the weight gradients of convolutions come back in such views.
pub fn gather_strided(src: &[f32], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<f32> {
    let (shape, strides) = collapse(shape, strides);
    let n: usize = shape.iter().product();
    let mut out = vec![0f32; n];
    if n == 0 {
        return out;
    }
    let Some((&cols, &col_stride)) = shape.last().zip(strides.last()) else {
        // Every axis of size 1: one element.
        if let Some(o) = out.first_mut() {
            *o = src[offset];
        }
        return out;
    };
    let k = shape.len();
    if col_stride == 1 {
        let rows_per_task = rows_per_task(cols);
        let (outer, outer_strides) = (&shape[..k - 1], &strides[..k - 1]);
        out.par_chunks_mut(rows_per_task * cols)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, row) in chunk.chunks_mut(cols).enumerate() {
                    let start = offset + offset_of(task * rows_per_task + i, outer, outer_strides);
                    row.copy_from_slice(&src[start..start + cols]);
                }
            });
        return out;
    }
    const TILE: usize = 32;
    let (rows, row_stride) = if k >= 2 {
        (shape[k - 2], strides[k - 2])
    } else {
        (1, 0)
    };
    let (batch, batch_strides) = (
        &shape[..k.saturating_sub(2)],
        &strides[..k.saturating_sub(2)],
    );
    out.par_chunks_mut(rows * cols)
        .enumerate()
        .for_each(|(b, matrix)| {
            let base = offset + offset_of(b, batch, batch_strides);
            matrix
                .par_chunks_mut(TILE * cols)
                .enumerate()
                .for_each(|(t, band)| {
                    let first = t * TILE;
                    let band_rows = band.len() / cols;
                    for c0 in (0..cols).step_by(TILE) {
                        for c in c0..(c0 + TILE).min(cols) {
                            let column = base + c * col_stride;
                            for r in 0..band_rows {
                                band[r * cols + c] = src[column + (first + r) * row_stride];
                            }
                        }
                    }
                });
        });
    out
}

/// Rows handed to one task by the parallel element-wise kernels: about 2¹⁶ elements.
fn rows_per_task(row_len: usize) -> usize {
    ((1 << 16) / row_len.max(1)).max(1)
}

/// [`geglu_rows`] over all rows of `input` (`rows × 2·inner`), in parallel.
pub fn geglu(input: &[f32], inner: usize) -> Vec<f32> {
    let rows = input.len() / (2 * inner).max(1);
    let mut out = vec![0f32; rows * inner];
    let per = rows_per_task(2 * inner);
    out.par_chunks_mut(per * inner)
        .zip(input.par_chunks(per * 2 * inner))
        .for_each(|(dst, src)| geglu_rows(src, dst, inner));
    out
}

/// [`geglu_backward_rows`] over all rows (`input`: `rows × 2·inner`, `grad`: `rows × inner`),
/// in parallel.
pub fn geglu_backward(input: &[f32], grad: &[f32], inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    let per = rows_per_task(2 * inner);
    out.par_chunks_mut(per * 2 * inner)
        .zip(input.par_chunks(per * 2 * inner))
        .zip(grad.par_chunks(per * inner))
        .for_each(|((dst, src), g)| geglu_backward_rows(src, g, dst, inner));
    out
}

/// [`swish_in_place`], in parallel.
pub fn swish(x: &mut [f32], beta: f32) {
    x.par_chunks_mut(1 << 16)
        .for_each(|chunk| swish_in_place(chunk, beta));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geglu_backward_is_the_derivative() {
        let inner = 37;
        let rows = 5;
        let input: Vec<f32> = (0..rows * 2 * inner)
            .map(|i| ((i * 7919) % 1000) as f32 * 8e-3 - 4.0)
            .collect();
        let grad: Vec<f32> = (0..rows * inner).map(|i| (i as f32 * 0.3).cos()).collect();
        let out = geglu_backward(&input, &grad, inner);
        let gelu =
            |v: f64| 0.5 * v * (1.0 + erf(v as f32 * std::f32::consts::FRAC_1_SQRT_2) as f64);
        for r in 0..rows {
            for j in 0..inner {
                let (h, g) = (
                    input[r * 2 * inner + j] as f64,
                    input[r * 2 * inner + inner + j] as f64,
                );
                let d = grad[r * inner + j] as f64;
                let eps = 1e-3;
                let slope = (gelu(g + eps) - gelu(g - eps)) / (2.0 * eps);
                let (want_h, want_g) = (d * gelu(g), d * h * slope);
                let (got_h, got_g) = (
                    out[r * 2 * inner + j] as f64,
                    out[r * 2 * inner + inner + j] as f64,
                );
                assert!(
                    (got_h - want_h).abs() < 1e-5 * (1.0 + want_h.abs()),
                    "row {r} h {j}: {got_h} against {want_h}"
                );
                assert!(
                    (got_g - want_g).abs() < 2e-4 * (1.0 + want_g.abs()),
                    "row {r} g {j}: {got_g} against {want_g}"
                );
            }
        }
    }

    #[test]
    fn silu_backward_is_the_derivative() {
        let x: Vec<f32> = (-2000..2000).map(|i| i as f32 * 5e-3).collect();
        let g: Vec<f32> = x.iter().map(|v| (v * 3.0).cos()).collect();
        let out = silu_backward(&x, &g);
        let silu = |v: f64| v / (1.0 + (-v).exp());
        for ((&x, &g), &o) in x.iter().zip(&g).zip(&out) {
            let h = 1e-4;
            let slope = (silu(f64::from(x) + h) - silu(f64::from(x) - h)) / (2.0 * h);
            let want = f64::from(g) * slope;
            assert!(
                (f64::from(o) - want).abs() < 2e-6,
                "x {x}: {o} against {want}"
            );
        }
    }

    /// Every kind of view: permuted, transposed, sliced, broadcast-free 1-D strides, axes
    /// of size 1, merged axes, an offset.
    #[test]
    fn strided_views_gather_in_logical_order() {
        let src: Vec<f32> = (0..200_000).map(|i| i as f32).collect();
        // (offset, shape, strides)
        let views: [(usize, Vec<usize>, Vec<usize>); 7] = [
            // A [in, out, kh, kw] buffer read as [out, in, kh, kw]: conv weight gradients.
            (0, vec![40, 30, 3, 3], vec![9, 40 * 9, 3, 1]),
            // A 2-D transpose, larger than a tile, with ragged edges.
            (0, vec![70, 45], vec![1, 70]),
            // A 3-D permutation with no unit stride.
            (5, vec![6, 7, 8], vec![1, 6 * 8, 6]),
            // Size-1 axes and a strided row.
            (3, vec![1, 50, 1], vec![999, 2, 7]),
            // Axes that merge into one contiguous run, under an outer stride.
            (11, vec![4, 5, 6], vec![100, 6, 1]),
            // One element.
            (17, vec![1, 1], vec![5, 3]),
            // Empty.
            (0, vec![0, 4], vec![4, 1]),
        ];
        for (offset, shape, strides) in views {
            let n: usize = shape.iter().product();
            let expected: Vec<f32> = (0..n)
                .map(|i| src[offset + offset_of(i, &shape, &strides)])
                .collect();
            assert_eq!(
                gather_strided(&src, offset, &shape, &strides),
                expected,
                "{shape:?} {strides:?}"
            );
        }
    }

    #[test]
    fn adamw_matches_its_formula_and_the_parallel_passes_their_serial_ones() {
        let n = 3 * PARAMETER_CHUNK + 77;
        let value = |i: usize, k: f32| ((i as f32 * 0.618 + k).sin()) * 0.1;
        let grad: Vec<f32> = (0..n).map(|i| value(i, 1.0)).collect();
        let mut theta: Vec<f32> = (0..n).map(|i| value(i, 2.0)).collect();
        let mut m: Vec<f32> = (0..n).map(|i| value(i, 3.0) * 0.01).collect();
        let mut v: Vec<f32> = (0..n).map(|i| value(i, 4.0).abs() * 0.001).collect();
        let s = AdamWStep {
            decay: 1.0 - 1e-3 * 1e-2,
            one_minus_beta1: 0.1,
            beta2: 0.999,
            one_minus_beta2: 1e-3,
            bias2_sqrt: (1.0f32 - 0.999f32.powi(3)).sqrt(),
            epsilon: 1e-8,
            step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
        };
        let (theta0, m0, v0) = (theta.clone(), m.clone(), v.clone());
        adamw(&mut theta, &grad, &mut m, &mut v, s);
        for i in [0, 1, PARAMETER_CHUNK, 2 * PARAMETER_CHUNK + 5, n - 1] {
            let g = grad[i];
            let mt = m0[i] + (g - m0[i]) * s.one_minus_beta1;
            let vt = v0[i] * s.beta2 + g * g * s.one_minus_beta2;
            let t = theta0[i] * s.decay - mt / (vt.sqrt() / s.bias2_sqrt + s.epsilon) * s.step_size;
            assert_eq!((theta[i], m[i], v[i]), (t, mt, vt), "element {i}");
        }
        let serial: f64 = grad.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
        assert!((sum_of_squares(&grad) - serial).abs() <= 1e-12 * serial);
        let mut scaled = grad.clone();
        scale(&mut scaled, 0.5);
        assert!(scaled.iter().zip(&grad).all(|(a, b)| *a == b * 0.5));
    }

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0f32;
        // Inside the clamps at −87 and 88.
        for i in -86_999..=87_999 {
            let x = i as f32 * 1e-3;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn erf_and_gelu_match_libm() {
        let mut worst = 0f32;
        for i in -10_000..=10_000 {
            let x = i as f32 * 1e-3;
            worst = worst.max((erf(x) - libm::erff(x)).abs());
            let exact = 0.5 * f64::from(x) * (1.0 + libm::erf(f64::from(x) / 2f64.sqrt()));
            assert!((f64::from(gelu(x)) - exact).abs() < 1e-6, "gelu({x})");
        }
        assert!(worst < 1e-6, "erf error {worst}");
    }

    #[test]
    fn geglu_and_swish_match_their_definitions() {
        let input: Vec<f32> = (0..3 * 2 * 40)
            .map(|i| (i as f32 * 0.37).sin() * 4.0)
            .collect();
        let out = geglu(&input, 40);
        for (r, row) in input.chunks(80).enumerate() {
            for c in 0..40 {
                let g = f64::from(row[40 + c]);
                let expected = f64::from(row[c]) * 0.5 * g * (1.0 + libm::erf(g / 2f64.sqrt()));
                assert!((f64::from(out[r * 40 + c]) - expected).abs() < 1e-5);
            }
        }
        let mut x = input.clone();
        swish(&mut x, 1.702);
        for (&y, &x) in x.iter().zip(&input) {
            assert!((y - x / (1.0 + (-1.702 * x).exp())).abs() < 1e-5);
        }
    }

    #[test]
    fn softmax_rows_match_a_plain_softmax_and_mask() {
        let cols = 37;
        let mut rows: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 7919) % 23) as f32 * 0.3)
            .collect();
        let original = rows.clone();
        let mut inverse = [0f32; 3];
        softmax_rows(&mut rows, cols, &|r| 20 + r, &mut inverse);
        for r in 0..3 {
            let kept = &original[r * cols..r * cols + 20 + r];
            let max = kept.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = kept.iter().map(|x| (x - max).exp()).sum();
            for c in 0..cols {
                let expected = if c < 20 + r {
                    (original[r * cols + c] - max).exp() / sum
                } else {
                    0.0
                };
                let got = rows[r * cols + c] * inverse[r];
                assert!(
                    (got - expected).abs() < 1e-6,
                    "row {r} col {c}: {got} vs {expected}"
                );
            }
        }
    }
}
