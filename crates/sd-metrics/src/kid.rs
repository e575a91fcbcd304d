//! The Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 4): the
//! unbiased estimate of the squared maximum mean discrepancy between two feature sets under the
//! cubic polynomial kernel `k(x, y) = (xᵀy / d + 1)³`, averaged over random subsets, as
//! torch-fidelity computes it (its defaults: 100 subsets of 1000, `RandomState(2020)`, the two
//! sets' subsets drawn alternately).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use crate::error::{MetricsError, Result};
use crate::numpy_random::RandomState;

/// torch-fidelity's KID settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KidOptions {
    /// How many subsets (`kid_subsets`, 100).
    pub subsets: usize,
    /// Feature vectors per subset (`kid_subset_size`, 1000).
    pub subset_size: usize,
    /// The kernel's degree (3).
    pub degree: i32,
    /// The kernel's scale; `None` is `1 / d` (torch-fidelity's default).
    pub gamma: Option<f64>,
    /// The kernel's offset (1).
    pub coef0: f64,
    /// The subsets' seed (`rng_seed`, 2020).
    pub seed: u32,
}

impl Default for KidOptions {
    fn default() -> Self {
        Self {
            subsets: 100,
            subset_size: 1000,
            degree: 3,
            gamma: None,
            coef0: 1.0,
            seed: 2020,
        }
    }
}

/// KID over the subsets: their mean and (population) standard deviation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kid {
    /// `kernel_inception_distance_mean`.
    pub mean: f64,
    /// `kernel_inception_distance_std`.
    pub std: f64,
}

/// A set of feature vectors: `rows × dim` values, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    /// The values.
    pub values: &'a [f32],
    /// The width of one vector.
    pub dim: usize,
}

impl Features<'_> {
    /// How many vectors.
    pub fn rows(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }

    fn pick(&self, rows: &[usize]) -> Mat<f64> {
        Mat::from_fn(rows.len(), self.dim, |i, j| {
            self.values[rows[i] * self.dim + j] as f64
        })
    }
}

/// The unbiased MMD² of one pair of subsets (torch-fidelity's `mmd2`, `unbiased`).
fn mmd2(x: MatRef<'_, f64>, y: MatRef<'_, f64>, options: &KidOptions) -> f64 {
    let gamma = options.gamma.unwrap_or(1.0 / x.ncols() as f64);
    let kernel = |a: MatRef<'_, f64>, b: MatRef<'_, f64>| {
        let mut k = Mat::zeros(a.nrows(), b.nrows());
        matmul(
            k.as_mut(),
            Accum::Replace,
            a,
            b.transpose(),
            1.0,
            Par::rayon(0),
        );
        k
    };
    let powered =
        |k: &Mat<f64>, i: usize, j: usize| (k[(i, j)] * gamma + options.coef0).powi(options.degree);
    let m = x.nrows();
    let (kxx, kyy, kxy) = (kernel(x, x), kernel(y, y), kernel(x, y));
    let (mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0);
    for i in 0..m {
        for j in 0..m {
            if i != j {
                xx += powered(&kxx, i, j);
                yy += powered(&kyy, i, j);
            }
            xy += powered(&kxy, i, j);
        }
    }
    let m = m as f64;
    (xx + yy) / (m * (m - 1.0)) - 2.0 * xy / (m * m)
}

/// KID between two feature sets, as torch-fidelity's `kid_features_to_metric`.
pub fn kernel_inception_distance(
    a: Features<'_>,
    b: Features<'_>,
    options: &KidOptions,
) -> Result<Kid> {
    if a.dim != b.dim {
        return Err(MetricsError::Shape(format!(
            "the two feature sets have different widths ({} and {})",
            a.dim, b.dim
        )));
    }
    let (n1, n2, size) = (a.rows(), b.rows(), options.subset_size);
    if size < 2 || options.subsets == 0 {
        return Err(MetricsError::TooFew(format!(
            "KID needs subsets of at least 2 and at least one subset (asked: {} of {size})",
            options.subsets
        )));
    }
    if n1 < size || n2 < size {
        return Err(MetricsError::TooFew(format!(
            "KID subsets of {size} need at least {size} images in each set ({n1} and {n2}); \
             lower the subset size"
        )));
    }
    let mut rng = RandomState::new(options.seed);
    let mut values = Vec::with_capacity(options.subsets);
    for _ in 0..options.subsets {
        let x = a.pick(&rng.choice_without_replacement(n1, size));
        let y = b.pick(&rng.choice_without_replacement(n2, size));
        values.push(mmd2(x.as_ref(), y.as_ref(), options));
    }
    let (mean, std) = mean_std(&values);
    if mean.is_finite() {
        Ok(Kid { mean, std })
    } else {
        Err(MetricsError::NotFinite(format!("KID came out {mean}")))
    }
}

/// The mean and the population (ddof 0) standard deviation, as `np.mean` and `np.std`.
pub(crate) fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sets_have_an_unbiased_distance_near_zero_and_shifted_ones_do_not() {
        let dim = 4;
        let a: Vec<f32> = (0..40 * dim)
            .map(|i| ((i * 37 % 17) as f32) / 17.0)
            .collect();
        let b: Vec<f32> = a.iter().map(|v| v + 1.0).collect();
        let options = KidOptions {
            subsets: 5,
            subset_size: 20,
            ..KidOptions::default()
        };
        let fa = Features { values: &a, dim };
        let same = kernel_inception_distance(fa, fa, &options).unwrap();
        let far = kernel_inception_distance(fa, Features { values: &b, dim }, &options).unwrap();
        assert!(same.mean.abs() < 0.05, "{same:?}");
        assert!(far.mean > 1.0, "{far:?}");
    }

    #[test]
    fn too_few_images_for_a_subset_are_refused() {
        let a = vec![0.0f32; 10 * 3];
        let f = Features { values: &a, dim: 3 };
        let err = kernel_inception_distance(f, f, &KidOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 1000 images"), "{err}");
    }
}
