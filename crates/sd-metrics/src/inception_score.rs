//! The Inception Score (Salimans et al. 2016, "Improved techniques for training GANs", §4):
//! `exp E_x KL(p(y|x) ‖ p(y))`, over splits of the images, as torch-fidelity's
//! `isc_features_to_metric` computes it: its `logits_unbiased` (the classifier without its bias)
//! over all 1008 outputs, the rows shuffled by `RandomState(2020)`, 10 splits, in f64.

use crate::error::{MetricsError, Result};
use crate::kid::mean_std;
use crate::numpy_random::RandomState;

/// torch-fidelity's Inception Score settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsOptions {
    /// How many splits (`isc_splits`, 10).
    pub splits: usize,
    /// Shuffle the rows first (`samples_shuffle`, true).
    pub shuffle: bool,
    /// The shuffle's seed (`rng_seed`, 2020).
    pub seed: u32,
}

impl Default for IsOptions {
    fn default() -> Self {
        Self {
            splits: 10,
            shuffle: true,
            seed: 2020,
        }
    }
}

/// The score over the splits: mean and population standard deviation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InceptionScore {
    /// `inception_score_mean`.
    pub mean: f64,
    /// `inception_score_std`.
    pub std: f64,
}

/// The Inception Score of `logits` (`rows × classes`, row-major).
pub fn inception_score(
    logits: &[f32],
    classes: usize,
    options: &IsOptions,
) -> Result<InceptionScore> {
    let n = logits.len().checked_div(classes).unwrap_or(0);
    if classes == 0 || n * classes != logits.len() {
        return Err(MetricsError::Shape(format!(
            "{} logits are not whole rows of {classes}",
            logits.len()
        )));
    }
    if options.splits == 0 || n < options.splits {
        return Err(MetricsError::TooFew(format!(
            "{n} image(s) cannot be cut into {} splits",
            options.splits
        )));
    }
    let order: Vec<usize> = if options.shuffle {
        RandomState::new(options.seed).permutation(n)
    } else {
        (0..n).collect()
    };
    // Per row: softmax and log-softmax in f64.
    let mut p = vec![0.0f64; n * classes];
    let mut log_p = vec![0.0f64; n * classes];
    for (row, &source) in order.iter().enumerate() {
        let x = &logits[source * classes..(source + 1) * classes];
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_sum = sum.ln();
        for c in 0..classes {
            let shifted = x[c] as f64 - max;
            p[row * classes + c] = shifted.exp() / sum;
            log_p[row * classes + c] = shifted - log_sum;
        }
    }
    let mut scores = Vec::with_capacity(options.splits);
    for i in 0..options.splits {
        let (start, end) = (i * n / options.splits, (i + 1) * n / options.splits);
        let rows = (end - start) as f64;
        let log_q: Vec<f64> = (0..classes)
            .map(|c| ((start..end).map(|r| p[r * classes + c]).sum::<f64>() / rows).ln())
            .collect();
        let kl: f64 = (start..end)
            .map(|r| {
                (0..classes)
                    .map(|c| p[r * classes + c] * (log_p[r * classes + c] - log_q[c]))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / rows;
        scores.push(kl.exp());
    }
    let (mean, std) = mean_std(&scores);
    if mean.is_finite() {
        Ok(InceptionScore { mean, std })
    } else {
        Err(MetricsError::NotFinite(format!(
            "the Inception Score came out {mean}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confident_distinct_classes_score_the_class_count_and_uniform_ones_score_one() {
        let classes = 4;
        // Each image certain of its own class, the classes spread evenly: IS = 4 per split.
        let sharp: Vec<f32> = (0..40)
            .flat_map(|i| (0..classes).map(move |c| if c == i % classes { 50.0 } else { 0.0 }))
            .collect();
        let options = IsOptions {
            splits: 2,
            shuffle: false,
            seed: 0,
        };
        let score = inception_score(&sharp, classes, &options).unwrap();
        assert!((score.mean - 4.0).abs() < 1e-6, "{score:?}");
        let flat = vec![0.0f32; 40 * classes];
        let score = inception_score(&flat, classes, &options).unwrap();
        assert!((score.mean - 1.0).abs() < 1e-12, "{score:?}");
    }
}
