//! The Fréchet Inception Distance (Heusel et al. 2017, "GANs trained by a two time-scale update
//! rule converge to a local Nash equilibrium", eq. 6): the Fréchet (2-Wasserstein) distance
//! between two Gaussians fitted to Inception features,
//! `d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½`.
//!
//! pytorch-fid takes `scipy.linalg.sqrtm` of the non-symmetric product and keeps the real part
//! of its trace. The trace is the same through symmetric matrices only:
//! `Σ₁Σ₂ = A⁻¹ (A Σ₂ A) A` with `A = Σ₁^½`, so `(Σ₁Σ₂)^½` is similar to `(A Σ₂ A)^½` and
//! `tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(A Σ₂ A)`: two symmetric eigendecompositions, stable even when the
//! covariances are singular (fewer images than feature dimensions), where `sqrtm` needs
//! pytorch-fid's `ε·I` retry.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};

use crate::error::{MetricsError, Result};
use crate::stats::Statistics;

/// The symmetric positive semi-definite square root of `m` (its negative eigenvalues, which
/// only rounding makes, taken as 0).
fn psd_sqrt(m: &Mat<f64>) -> Result<Mat<f64>> {
    let eigen = symmetric(m)
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| MetricsError::NotFinite(format!("eigendecomposition failed: {e:?}")))?;
    let (u, s) = (eigen.U(), eigen.S());
    let n = m.nrows();
    let scaled = Mat::from_fn(n, n, |i, j| u[(i, j)] * s[j].max(0.0).sqrt());
    let mut out = Mat::zeros(n, n);
    matmul(
        out.as_mut(),
        Accum::Replace,
        scaled.as_ref(),
        u.transpose(),
        1.0,
        Par::rayon(0),
    );
    Ok(out)
}

/// `(m + mᵀ) / 2`: rounding leaves products of symmetric matrices slightly asymmetric.
fn symmetric(m: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| 0.5 * (m[(i, j)] + m[(j, i)]))
}

fn product(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(
        out.as_mut(),
        Accum::Replace,
        a.as_ref(),
        b.as_ref(),
        1.0,
        Par::rayon(0),
    );
    out
}

/// `tr (Σ₁Σ₂)^½` for symmetric positive semi-definite `Σ₁`, `Σ₂`.
pub fn trace_sqrt_product(sigma1: &Mat<f64>, sigma2: &Mat<f64>) -> Result<f64> {
    let a = psd_sqrt(sigma1)?;
    let inner = symmetric(&product(&product(&a, sigma2), &a));
    let eigenvalues = inner
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| MetricsError::NotFinite(format!("eigendecomposition failed: {e:?}")))?;
    Ok(eigenvalues.iter().map(|l| l.max(0.0).sqrt()).sum())
}

/// The Fréchet distance between two feature distributions, as pytorch-fid's
/// `calculate_frechet_distance` computes it (the value `fid_score` prints).
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64> {
    if a.dim() != b.dim() || a.sigma.nrows() != a.dim() || b.sigma.nrows() != b.dim() {
        return Err(MetricsError::Shape(format!(
            "the two statistics have different feature sizes ({} and {}): they come from \
             different feature layers",
            a.dim(),
            b.dim()
        )));
    }
    let mean_term: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |m: &Mat<f64>| (0..m.nrows()).map(|i| m[(i, i)]).sum::<f64>();
    let cross = trace_sqrt_product(&a.sigma, &b.sigma)?;
    let fid = mean_term + trace(&a.sigma) + trace(&b.sigma) - 2.0 * cross;
    if fid.is_finite() {
        Ok(fid)
    } else {
        Err(MetricsError::NotFinite(format!(
            "the Fréchet distance came out {fid}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mu: Vec<f64>, sigma: Vec<Vec<f64>>) -> Statistics {
        let d = mu.len();
        Statistics {
            mu,
            sigma: Mat::from_fn(d, d, |i, j| sigma[i][j]),
        }
    }

    #[test]
    fn commuting_covariances_give_the_closed_form() {
        // Diagonal covariances: tr (Σ₁Σ₂)^½ = Σ √(aᵢ bᵢ), so
        // d² = |Δμ|² + Σ (√aᵢ − √bᵢ)².
        let a = stats(vec![0.0, 1.0], vec![vec![4.0, 0.0], vec![0.0, 9.0]]);
        let b = stats(vec![3.0, 1.0], vec![vec![1.0, 0.0], vec![0.0, 16.0]]);
        let fid = frechet_distance(&a, &b).unwrap();
        let expected = 9.0 + (2.0f64 - 1.0).powi(2) + (3.0f64 - 4.0).powi(2);
        assert!((fid - expected).abs() < 1e-10, "{fid} vs {expected}");
    }

    #[test]
    fn a_distribution_is_at_distance_zero_from_itself_even_when_singular() {
        // Rank 1 in two dimensions: pytorch-fid's sqrtm needs its ε retry here.
        let a = stats(vec![1.0, 2.0], vec![vec![1.0, 2.0], vec![2.0, 4.0]]);
        let fid = frechet_distance(&a, &a).unwrap();
        assert!(fid.abs() < 1e-7, "{fid}");
    }

    #[test]
    fn non_commuting_covariances_match_the_2x2_formula() {
        // For 2×2 PSD M = Σ₁Σ₂ (real, non-negative eigenvalues): tr √M = √(tr M + 2√det M).
        let s1 = [[2.0, 0.5], [0.5, 1.0]];
        let s2 = [[1.0, -0.3], [-0.3, 3.0]];
        let m = |i: usize, j: usize| s1[i][0] * s2[0][j] + s1[i][1] * s2[1][j];
        let (tr, det): (f64, f64) = (m(0, 0) + m(1, 1), m(0, 0) * m(1, 1) - m(0, 1) * m(1, 0));
        let expected = (tr + 2.0 * det.sqrt()).sqrt();
        let a = Mat::from_fn(2, 2, |i, j| s1[i][j]);
        let b = Mat::from_fn(2, 2, |i, j| s2[i][j]);
        let got = trace_sqrt_product(&a, &b).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    #[test]
    fn different_feature_sizes_are_refused() {
        let a = stats(vec![0.0], vec![vec![1.0]]);
        let b = stats(vec![0.0, 0.0], vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        let err = frechet_distance(&a, &b).unwrap_err().to_string();
        assert!(err.contains("different feature sizes"), "{err}");
    }
}
