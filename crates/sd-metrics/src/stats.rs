//! Feature statistics: the mean and covariance the Fréchet distance compares, accumulated in
//! f64 batch by batch (memory independent of the image count), and read from / written to
//! pytorch-fid's `.npz` files (`mu`, `sigma`), so that published reference statistics work.

use std::io::{BufWriter, Cursor, Read, Seek, Write};
use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

use crate::error::{MetricsError, Result};

/// The mean and the (N − 1)-normalised covariance of a set of feature vectors, as
/// `numpy.mean(axis=0)` and `numpy.cov(rowvar=False)` give them.
#[derive(Debug, Clone)]
pub struct Statistics {
    /// The mean, `d` values.
    pub mu: Vec<f64>,
    /// The covariance, `d × d`.
    pub sigma: Mat<f64>,
}

impl Statistics {
    /// The feature width `d`.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Reads pytorch-fid's statistics file: an `.npz` with a `mu` of `d` values and a `sigma`
    /// of `d × d`, in f64 or f32.
    pub fn read_npz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fail = |reason: String| MetricsError::Stats {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = sd_core::files::read_regular(path).map_err(|e| fail(e.to_string()))?;
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| fail(format!("not an .npz archive ({e})")))?;
        let (mu, mu_shape) = read_array(&mut zip, "mu").map_err(fail)?;
        let (sigma, sigma_shape) = read_array(&mut zip, "sigma").map_err(fail)?;
        let d = match mu_shape.as_slice() {
            [d] => *d,
            other => return Err(fail(format!("`mu` has shape {other:?}, expected [d]"))),
        };
        if sigma_shape != [d, d] {
            return Err(fail(format!(
                "`sigma` has shape {sigma_shape:?}, expected [{d}, {d}] to match `mu`"
            )));
        }
        if let Some(bad) = mu.iter().chain(&sigma).find(|v| !v.is_finite()) {
            return Err(fail(format!("holds a non-finite value ({bad})")));
        }
        Ok(Self {
            mu,
            sigma: Mat::from_fn(d, d, |i, j| sigma[i * d + j]),
        })
    }

    /// Writes the statistics as pytorch-fid's `save_fid_stats` does (`numpy.savez_compressed`
    /// with `mu` and `sigma` in f64), atomically: the file appears complete or not at all.
    pub fn write_npz(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let fail = |reason: String| MetricsError::Stats {
            path: path.to_path_buf(),
            reason,
        };
        let d = self.dim();
        let mut bytes = Cursor::new(Vec::new());
        {
            let mut zip = zip::ZipWriter::new(&mut bytes);
            let sigma: Vec<f64> = (0..d * d).map(|k| self.sigma[(k / d, k % d)]).collect();
            for (name, shape, values) in [
                ("mu", vec![d as u64], self.mu.as_slice()),
                ("sigma", vec![d as u64, d as u64], sigma.as_slice()),
            ] {
                write_array(&mut zip, name, &shape, values).map_err(|e| fail(e.to_string()))?;
            }
            zip.finish().map_err(|e| fail(e.to_string()))?;
        }
        sd_core::files::write_atomic(path, |out| {
            out.write_all(bytes.get_ref()).map_err(|e| e.to_string())
        })
        .map_err(|e| fail(e.to_string()))
    }
}

/// One array of an `.npz` archive, as f64 values and a shape.
fn read_array<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
) -> std::result::Result<(Vec<f64>, Vec<usize>), String> {
    let entry = zip
        .by_name(&npyz::npz::file_name_from_array_name(name))
        .map_err(|_| {
            format!("has no `{name}` array (pytorch-fid's files hold `mu` and `sigma`)")
        })?;
    let npy = npyz::NpyFile::new(entry).map_err(|e| format!("`{name}`: {e}"))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    let descr = npy.dtype().descr().trim_matches('\'').to_string();
    let values = match descr.as_str() {
        "<f8" => npy.into_vec::<f64>(),
        "<f4" => npy
            .into_vec::<f32>()
            .map(|v| v.into_iter().map(f64::from).collect()),
        other => {
            return Err(format!(
                "`{name}` is of dtype {other}; expected float64 or float32"
            ));
        }
    }
    .map_err(|e| format!("`{name}`: {e}"))?;
    Ok((values, shape))
}

fn write_array<W: Write + Seek>(
    zip: &mut zip::ZipWriter<W>,
    name: &str,
    shape: &[u64],
    values: &[f64],
) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file(npyz::npz::file_name_from_array_name(name), options)?;
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(BufWriter::new(zip))
        .begin_nd()?;
    writer.extend(values.iter().copied())?;
    writer.finish()
}

/// Mean and covariance accumulated batch by batch, in f64.
///
/// Sums are taken around a shift (the first batch's mean), so that the covariance does not
/// lose digits to cancellation when the features' mean is large against their spread: with
/// `K` the shift, `Σ = (Σᵢ (xᵢ−K)(xᵢ−K)ᵀ − n (μ−K)(μ−K)ᵀ) / (n − 1)`.
#[derive(Debug, Clone)]
pub struct FeatureAccumulator {
    dim: usize,
    count: usize,
    shift: Option<Vec<f64>>,
    sum: Vec<f64>,
    products: Mat<f64>,
}

impl FeatureAccumulator {
    /// An empty accumulator for `dim`-wide features.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            count: 0,
            shift: None,
            sum: vec![0.0; dim],
            products: Mat::zeros(dim, dim),
        }
    }

    /// The feature width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// How many feature vectors were added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds `features`, row after row of `dim` values.
    pub fn add(&mut self, features: &[f32]) -> Result<()> {
        let d = self.dim;
        if d == 0 || !features.len().is_multiple_of(d) {
            return Err(MetricsError::Shape(format!(
                "{} feature values are not whole rows of {d}",
                features.len()
            )));
        }
        if let Some(bad) = features.iter().find(|v| !v.is_finite()) {
            return Err(MetricsError::NotFinite(format!(
                "a feature vector holds {bad}: the network's output is not finite"
            )));
        }
        let rows = features.len() / d;
        if rows == 0 {
            return Ok(());
        }
        let shift = self.shift.get_or_insert_with(|| {
            (0..d)
                .map(|j| (0..rows).map(|i| features[i * d + j] as f64).sum::<f64>() / rows as f64)
                .collect()
        });
        let centred = Mat::from_fn(rows, d, |i, j| features[i * d + j] as f64 - shift[j]);
        for j in 0..d {
            self.sum[j] += (0..rows).map(|i| centred[(i, j)]).sum::<f64>();
        }
        matmul(
            self.products.as_mut(),
            Accum::Add,
            centred.transpose(),
            centred.as_ref(),
            1.0,
            Par::rayon(0),
        );
        self.count += rows;
        Ok(())
    }

    /// The mean and covariance of everything added; at least two vectors are needed.
    pub fn finish(&self) -> Result<Statistics> {
        let n = self.count;
        if n < 2 {
            return Err(MetricsError::TooFew(format!(
                "{n} feature vector(s): a covariance needs at least 2 images"
            )));
        }
        let d = self.dim;
        let shift = self.shift.as_deref().unwrap_or(&[]);
        let offset: Vec<f64> = self.sum.iter().map(|s| s / n as f64).collect();
        let mu = offset.iter().zip(shift).map(|(o, k)| o + k).collect();
        let scale = 1.0 / (n as f64 - 1.0);
        let sigma = Mat::from_fn(d, d, |i, j| {
            (self.products[(i, j)] - n as f64 * offset[i] * offset[j]) * scale
        });
        Ok(Statistics { mu, sigma })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy's two-pass mean and covariance, written out.
    fn two_pass(rows: &[Vec<f32>]) -> (Vec<f64>, Vec<Vec<f64>>) {
        let n = rows.len() as f64;
        let d = rows[0].len();
        let mu: Vec<f64> = (0..d)
            .map(|j| rows.iter().map(|r| r[j] as f64).sum::<f64>() / n)
            .collect();
        let cov = (0..d)
            .map(|a| {
                (0..d)
                    .map(|b| {
                        rows.iter()
                            .map(|r| (r[a] as f64 - mu[a]) * (r[b] as f64 - mu[b]))
                            .sum::<f64>()
                            / (n - 1.0)
                    })
                    .collect()
            })
            .collect();
        (mu, cov)
    }

    #[test]
    fn batches_give_numpys_mean_and_covariance() {
        let d = 5;
        let rows: Vec<Vec<f32>> = (0..23)
            .map(|i| {
                (0..d)
                    .map(|j| 100.0 + ((i * 7 + j * 13) % 11) as f32 * 0.37 - (i * j) as f32 * 0.01)
                    .collect()
            })
            .collect();
        let mut acc = FeatureAccumulator::new(d);
        for chunk in rows.chunks(6) {
            acc.add(&chunk.concat()).unwrap();
        }
        let stats = acc.finish().unwrap();
        let (mu, cov) = two_pass(&rows);
        for j in 0..d {
            assert!((stats.mu[j] - mu[j]).abs() < 1e-10);
            for (k, expected) in cov[j].iter().enumerate() {
                assert!((stats.sigma[(j, k)] - expected).abs() < 1e-10, "{j},{k}");
            }
        }
    }

    #[test]
    fn statistics_survive_an_npz_round_trip() {
        let stats = Statistics {
            mu: vec![1.5, -2.0, 0.25],
            sigma: Mat::from_fn(3, 3, |i, j| (i * 3 + j) as f64 * 0.5),
        };
        let path = std::env::temp_dir().join(format!("sd-metrics-{}.npz", std::process::id()));
        stats.write_npz(&path).unwrap();
        let back = Statistics::read_npz(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.mu, stats.mu);
        assert_eq!(back.sigma, stats.sigma);
    }

    #[test]
    fn too_few_or_ragged_features_are_refused() {
        let mut acc = FeatureAccumulator::new(3);
        assert!(acc.add(&[1.0, 2.0]).is_err());
        acc.add(&[1.0, 2.0, 3.0]).unwrap();
        let err = acc.finish().unwrap_err().to_string();
        assert!(err.contains("at least 2"), "{err}");
    }
}
