//! Times the FID Inception's features for 200 images at 299² (4 batches of 50, pytorch-fid's
//! batch size) with random weights on the default backend; prints one JSON line.
//! `cargo xtask bench-metrics` runs it next to `xtask/python/bench_inception.py`.

use burn::tensor::{Distribution, Tensor};
use sd_benches::{arg, peak_rss_mib, time_runs};
use sd_core::backend::DefaultBackend as B;
use sd_metrics::{FeatureExtractor, InceptionV3, Preprocess};

const IMAGES: usize = 200;
const BATCH: usize = 50;

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let device = Default::default();
    let extractor = FeatureExtractor::new(
        InceptionV3::<B>::new(&device),
        // The same default device (a clone would be `clone_on_copy` on Flex, whose device is
        // `Copy`; WGPU's is not).
        Default::default(),
        Preprocess::PytorchFid,
    );
    let x = Tensor::<B, 4>::random(
        [BATCH, 3, 299, 299],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let (median, min) = time_runs(runs, || {
        for _ in 0..IMAGES / BATCH {
            // `features_of_input` reads the features back: the backend has finished.
            extractor
                .features_of_input(x.clone())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "backend": std::any::type_name::<B>(),
            "latent": format!("{IMAGES} images at 299², batches of {BATCH}"),
            "median_s": median,
            "min_s": min,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
