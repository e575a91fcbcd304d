//! GroupNorm (Wu & He 2018) over channels-first maps, with the optional SiLU after it, in two
//! passes over each group: its statistics, then normalise, scale, shift (and gate) per channel.

use rayon::prelude::*;

use super::vector::{group_statistics, normalize_channel};

/// The sizes of one GroupNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupNormShape {
    /// Maps in the batch.
    pub batch: usize,
    /// Channels per map; a multiple of `groups`.
    pub channels: usize,
    /// Pixels per channel.
    pub spatial: usize,
    /// Groups the channels are split into, each normalised on its own.
    pub groups: usize,
}

impl GroupNormShape {
    /// Whether `elements` values (and a `[channels]` scale and shift, if given) fit the shape.
    fn fits(&self, elements: usize, affine: Option<(&[f32], &[f32])>) -> bool {
        self.groups != 0
            && self.channels.is_multiple_of(self.groups)
            && self.spatial != 0
            && elements == self.batch * self.channels * self.spatial
            && affine.is_none_or(|(g, b)| g.len() == self.channels && b.len() == self.channels)
    }
}

/// Normalises group `i` (its values `src`) into `dst`; returns its mean and `1/σ`.
fn normalize_group(
    i: usize,
    (src, dst): (&[f32], &mut [f32]),
    shape: GroupNormShape,
    eps: f32,
    affine: Option<(&[f32], &[f32])>,
    silu: bool,
) -> [f32; 2] {
    let (mean, variance) = group_statistics(src);
    let scale = 1.0 / (variance + f64::from(eps)).sqrt();
    let per_channel_group = shape.channels / shape.groups;
    let first_channel = (i % shape.groups) * per_channel_group;
    for (c, (dst, src)) in dst
        .chunks_exact_mut(shape.spatial)
        .zip(src.chunks_exact(shape.spatial))
        .enumerate()
    {
        let (gamma, beta) = affine.map_or((1.0, 0.0), |(g, b)| {
            (g[first_channel + c], b[first_channel + c])
        });
        // (x − mean)·scale·γ + β as x·a + b.
        let a = (scale * f64::from(gamma)) as f32;
        let b = (f64::from(beta) - mean * scale * f64::from(gamma)) as f32;
        normalize_channel(src, dst, a, b, silu);
    }
    [mean as f32, scale as f32]
}

/// `x`: `[batch, channels, spatial]` row-major; `gamma`/`beta`: `[channels]` (or none for
/// `affine=False`). Returns the normalised map, passed through SiLU when `silu`. `None` when
/// the sizes do not fit together.
pub fn group_norm(
    x: &[f32],
    shape: GroupNormShape,
    eps: f32,
    affine: Option<(&[f32], &[f32])>,
    silu: bool,
) -> Option<Vec<f32>> {
    if !shape.fits(x.len(), affine) {
        return None;
    }
    let per_group = shape.channels / shape.groups * shape.spatial;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(per_group)
        .zip(x.par_chunks(per_group))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            normalize_group(i, (src, dst), shape, eps, affine, silu);
        });
    Some(out)
}

/// [`group_norm`] without the SiLU, for training: also returns each group's mean and
/// `1/σ` (`[batch · groups]` pairs), which [`group_norm_backward`] reads with the input.
pub fn group_norm_train(
    x: &[f32],
    shape: GroupNormShape,
    eps: f32,
    affine: Option<(&[f32], &[f32])>,
) -> Option<(Vec<f32>, Vec<[f32; 2]>)> {
    if !shape.fits(x.len(), affine) {
        return None;
    }
    let per_group = shape.channels / shape.groups * shape.spatial;
    let mut out = vec![0f32; x.len()];
    let mut stats = vec![[0f32; 2]; shape.batch * shape.groups];
    out.par_chunks_mut(per_group)
        .zip(x.par_chunks(per_group))
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((dst, src), stat))| {
            *stat = normalize_group(i, (src, dst), shape, eps, affine, false);
        });
    Some((out, stats))
}

/// GroupNorm's gradients from its input, the statistics of [`group_norm_train`], `gamma`
/// (none for `affine=False`) and `∂L/∂y`: `∂L/∂x`, and with `gamma`, `(∂L/∂γ, ∂L/∂β)`.
/// With `x̂ = (x − μ)/σ` and `ĝ = ∂L/∂y · γ`, over the `n` elements of a group:
/// `∂L/∂x = (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)) / σ`; `∂L/∂γ = Σ ∂L/∂y · x̂`, `∂L/∂β = Σ ∂L/∂y` per
/// channel over the batch and pixels (sums in f64).
#[allow(clippy::type_complexity)]
pub fn group_norm_backward(
    x: &[f32],
    stats: &[[f32; 2]],
    gamma: Option<&[f32]>,
    grad: &[f32],
    shape: GroupNormShape,
) -> Option<(Vec<f32>, Option<(Vec<f32>, Vec<f32>)>)> {
    let GroupNormShape {
        batch,
        channels,
        spatial,
        groups,
    } = shape;
    if !shape.fits(x.len(), gamma.map(|g| (g, g)))
        || grad.len() != x.len()
        || stats.len() != batch * groups
    {
        return None;
    }
    let per_channel_group = channels / groups;
    let per_group = per_channel_group * spatial;
    let n = per_group as f64;
    let mut dx = vec![0f32; x.len()];
    // Per image and channel: `Σ ∂L/∂y · x̂` and `Σ ∂L/∂y`.
    let mut partial = vec![[0f64; 2]; batch * channels];
    dx.par_chunks_mut(per_group)
        .zip(x.par_chunks(per_group).zip(grad.par_chunks(per_group)))
        .zip(partial.par_chunks_mut(per_channel_group))
        .enumerate()
        .for_each(|(i, ((dst, (src, dy)), partial))| {
            let [mean, inv] = stats[i];
            let first_channel = (i % groups) * per_channel_group;
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for (c, (src, dy)) in src
                .chunks_exact(spatial)
                .zip(dy.chunks_exact(spatial))
                .enumerate()
            {
                let gamma = gamma.map_or(1.0, |g| g[first_channel + c]);
                let (mut dy_x, mut dy_sum) = (0f64, 0f64);
                for (&v, &d) in src.iter().zip(dy) {
                    let xh = (v - mean) * inv;
                    dy_x += f64::from(d * xh);
                    dy_sum += f64::from(d);
                }
                partial[c] = [dy_x, dy_sum];
                sum_g += f64::from(gamma) * dy_sum;
                sum_gx += f64::from(gamma) * dy_x;
            }
            let (mean_g, mean_gx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
            for (c, ((dst, src), dy)) in dst
                .chunks_exact_mut(spatial)
                .zip(src.chunks_exact(spatial))
                .zip(dy.chunks_exact(spatial))
                .enumerate()
            {
                let gamma = gamma.map_or(1.0, |g| g[first_channel + c]);
                for ((o, &v), &d) in dst.iter_mut().zip(src).zip(dy) {
                    let xh = (v - mean) * inv;
                    *o = (d * gamma - mean_g - xh * mean_gx) * inv;
                }
            }
        });
    let params = gamma.map(|_| {
        let (mut dgamma, mut dbeta) = (vec![0f32; channels], vec![0f32; channels]);
        for c in 0..channels {
            let (a, b) = (0..batch).fold((0f64, 0f64), |(a, b), i| {
                let [x, y] = partial[i * channels + c];
                (a + x, b + y)
            });
            dgamma[c] = a as f32;
            dbeta[c] = b as f32;
        }
        (dgamma, dbeta)
    });
    Some((dx, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backward against central differences of `L = Σ y ⊙ u` in f64.
    #[test]
    fn group_norm_backward_matches_central_differences() {
        let shape = GroupNormShape {
            batch: 2,
            channels: 6,
            spatial: 5,
            groups: 3,
        };
        let n = shape.batch * shape.channels * shape.spatial;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.21)
            .collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1).collect();
        let gamma: Vec<f32> = (0..6).map(|c| 0.5 + c as f32 * 0.3).collect();
        let beta: Vec<f32> = (0..6).map(|c| c as f32 * 0.1 - 0.2).collect();
        let eps = 1e-5f64;
        let loss = |x: &[f64], gamma: &[f64], beta: &[f64]| -> f64 {
            let per = shape.channels / shape.groups * shape.spatial;
            let mut total = 0.0;
            for (gi, group) in x.chunks(per).enumerate() {
                let mean = group.iter().sum::<f64>() / per as f64;
                let var = group.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / per as f64;
                for (j, v) in group.iter().enumerate() {
                    let idx = gi * per + j;
                    let c = (idx / shape.spatial) % shape.channels;
                    let y = (v - mean) / (var + eps).sqrt() * gamma[c] + beta[c];
                    total += y * f64::from(u[idx]);
                }
            }
            total
        };
        let (_, stats) = group_norm_train(&x, shape, eps as f32, Some((&gamma, &beta))).unwrap();
        let (dx, params) = group_norm_backward(&x, &stats, Some(&gamma), &u, shape).unwrap();
        let (dgamma, dbeta) = params.unwrap();
        let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (x64, g64, b64) = (wide(&x), wide(&gamma), wide(&beta));
        let h = 1e-4;
        let central = |which: usize, i: usize| {
            let mut p = [x64.clone(), g64.clone(), b64.clone()];
            p[which][i] += h;
            let up = loss(&p[0], &p[1], &p[2]);
            p[which][i] -= 2.0 * h;
            (up - loss(&p[0], &p[1], &p[2])) / (2.0 * h)
        };
        for (which, got) in [(0, &dx), (1, &dgamma), (2, &dbeta)] {
            for (i, &g) in got.iter().enumerate() {
                let want = central(which, i);
                assert!(
                    (f64::from(g) - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "input {which} element {i}: {g} against {want}"
                );
            }
        }
    }

    #[test]
    fn group_norm_matches_the_definition() {
        let shape = GroupNormShape {
            batch: 2,
            channels: 6,
            spatial: 37,
            groups: 3,
        };
        let x: Vec<f32> = (0..2 * 6 * 37)
            .map(|i| (i as f32 * 0.61).sin() * 3.0 + 1.0)
            .collect();
        let gamma: Vec<f32> = (0..6).map(|c| 0.5 + c as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..6).map(|c| c as f32 * -0.2).collect();
        for silu in [false, true] {
            let out = group_norm(&x, shape, 1e-5, Some((&gamma, &beta)), silu).expect("sizes");
            for (g, group) in x.chunks(2 * 37).enumerate() {
                let n = group.len() as f64;
                let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = group
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                for (k, &v) in group.iter().enumerate() {
                    let c = (g % 3) * 2 + k / 37;
                    let mut y = (f64::from(v) - mean) / (var + 1e-5).sqrt() * f64::from(gamma[c])
                        + f64::from(beta[c]);
                    if silu {
                        y /= 1.0 + (-y).exp();
                    }
                    assert!((f64::from(out[g * 2 * 37 + k]) - y).abs() < 1e-5);
                }
            }
        }
        assert!(group_norm(&x[1..], shape, 1e-5, None, false).is_none());
    }
}
