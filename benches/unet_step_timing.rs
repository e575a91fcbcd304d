//! Times one classifier-free-guidance step of a U-Net with random weights (batch 2: the
//! unconditional and conditional halves, 77-token context) on the default backend; prints one
//! JSON line (`--dtype f16` for half precision). `cargo xtask bench-unet` runs it next to
//! `xtask/python/bench_unet.py`.

use burn::tensor::{Distribution, Tensor};
use sd_benches::{arg, peak_rss_mib, time_runs};
use sd_core::backend::DefaultBackend as B;
use sd_unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let name = arg("--config").unwrap_or_else(|| "sd15".into());
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(2);
    let side: usize = arg("--latent").and_then(|r| r.parse().ok()).unwrap_or(64);
    let (config, context_dim) = match name.as_str() {
        "sd15" => (UNet2DConditionConfig::sd15(), 768),
        "sd21" => (UNet2DConditionConfig::sd21(), 1024),
        other => return Err(format!("unknown config {other}")),
    };
    let device = Default::default();
    // `--dtype f16`: every tensor (weights, inputs, activations) in half precision.
    let dtype = match arg("--dtype").as_deref() {
        None | Some("f32") => burn::tensor::DType::F32,
        Some("f16") => burn::tensor::DType::F16,
        Some("bf16") => burn::tensor::DType::BF16,
        Some(other) => return Err(format!("unknown dtype {other}")),
    };
    if dtype != burn::tensor::DType::F32 {
        burn::tensor::set_default_dtypes::<B>(&device, dtype, burn::tensor::DType::I64)
            .map_err(|e| format!("{e:?}"))?;
    }
    let unet = UNet2DConditionModel::<B>::new(&config, &device).map_err(|e| e.to_string())?;
    let latents =
        Tensor::<B, 4>::random([2, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<B, 3>::random(
        [2, 77, context_dim],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let (median, min) = time_runs(runs, || {
        let out = unet
            .forward(latents.clone(), &[500.0], context.clone(), None)
            .map_err(|e| e.to_string())?;
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "backend": format!("{} {dtype:?}", std::any::type_name::<B>()),
            "latent": latents.dims(),
            "image": [2, 77, context_dim],
            "median_s": median,
            "min_s": min,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
