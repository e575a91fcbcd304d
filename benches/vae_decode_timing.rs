//! Times a VAE decode with random weights on the default backend; prints one JSON line.
//! `cargo xtask bench-vae` runs it next to `xtask/python/bench_vae.py` with the same arguments.

use burn::tensor::{Distribution, Tensor};
use sd_benches::{arg, peak_rss_mib, time_runs};
use sd_core::AutoencoderKlConfig;
use sd_core::backend::DefaultBackend as B;
use sd_decoder::VaeDecoder;

fn config(name: &str) -> Option<(AutoencoderKlConfig, usize)> {
    match name {
        "sd15" => Some((AutoencoderKlConfig::sd15(), 64)),
        "tiny" => Some((
            AutoencoderKlConfig {
                block_out_channels: vec![32, 64],
                down_block_types: vec!["DownEncoderBlock2D".into(); 2],
                up_block_types: vec!["UpDecoderBlock2D".into(); 2],
                norm_num_groups: 8,
                ..AutoencoderKlConfig::default()
            },
            16,
        )),
        _ => None,
    }
}

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let name = arg("--config").unwrap_or_else(|| "sd15".into());
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let (config, side) = config(&name).ok_or(format!("unknown config {name}"))?;
    let device = Default::default();
    let decoder = VaeDecoder::<B>::new(&config, &device).map_err(|e| e.to_string())?;
    let z = Tensor::<B, 4>::random([1, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    let mut image_dims = [0; 4];
    let (median, min) = time_runs(runs, || {
        let image = decoder.decode(z.clone()).map_err(|e| e.to_string())?;
        image_dims = image.dims();
        // Reading the result back waits for the backend to finish.
        let _ = image.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "backend": std::any::type_name::<B>(),
            "latent": z.dims(),
            "image": image_dims,
            "median_s": median,
            "min_s": min,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
