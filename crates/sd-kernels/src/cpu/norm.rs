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
    let GroupNormShape {
        batch,
        channels,
        spatial,
        groups,
    } = shape;
    if groups == 0
        || channels % groups != 0
        || spatial == 0
        || x.len() != batch * channels * spatial
        || affine.is_some_and(|(g, b)| g.len() != channels || b.len() != channels)
    {
        return None;
    }
    let per_group = channels / groups * spatial;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(per_group)
        .zip(x.par_chunks(per_group))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            let (mean, variance) = group_statistics(src);
            let scale = 1.0 / (variance + f64::from(eps)).sqrt();
            let first_channel = (i % groups) * (channels / groups);
            for (c, (dst, src)) in dst
                .chunks_exact_mut(spatial)
                .zip(src.chunks_exact(spatial))
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
        });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
