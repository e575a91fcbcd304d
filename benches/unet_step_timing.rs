//! Times one classifier-free-guidance step of a U-Net with random weights (batch 2: the
//! unconditional and conditional halves, 77-token context) on the default backend; prints one
//! JSON line (`--dtype f16` for half precision). `cargo xtask bench-unet` runs it next to
//! `xtask/python/bench_unet.py`.
//!
//! `--lora-rank R`: each run times the step without and then with a rank-R LoRA on kohya's
//! default targets attached on the fly (`sd_lora::attach`), back to back, and the line adds
//! the LoRA's medians and the median of the runs' ratios (pairs taken together, so that a
//! busy moment of the machine falls on both sides of a ratio).
//!
//! `--matrix-dtype f16|bf16`: the same pairs, the second step with the U-Net's matrices held
//! in that dtype under f32 arithmetic (`sd_core::weights::hold_matrices_in`, what `sd generate
//! --dtype f16` loads on the CPU): the kernels widen the weights as they read them.

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
    let step_of = |unet: &UNet2DConditionModel<B>| -> Result<(), String> {
        let out = unet
            .forward(latents.clone(), &[500.0], context.clone(), None)
            .map_err(|e| e.to_string())?;
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    };
    let step = || step_of(&unet);
    let mut line = serde_json::json!({
        "backend": format!("{} {dtype:?}", std::any::type_name::<B>()),
        "latent": latents.dims(),
        "image": [2, 77, context_dim],
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if let Some(narrow) = arg("--matrix-dtype") {
        let narrow = match narrow.as_str() {
            "f16" => burn::tensor::DType::F16,
            "bf16" => burn::tensor::DType::BF16,
            other => return Err(format!("--matrix-dtype {other}: f16 or bf16")),
        };
        let half = sd_core::weights::hold_matrices_in(unet.clone(), narrow);
        let half_step = || step_of(&half);
        // One warm-up of each, then the pairs.
        step()?;
        half_step()?;
        let (mut full, mut narrowed, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let start = std::time::Instant::now();
            step()?;
            let f = start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            half_step()?;
            let h = start.elapsed().as_secs_f64();
            full.push(f);
            narrowed.push(h);
            ratios.push(h / f);
        }
        line["median_s"] = median(&mut full).into();
        line["matrix_dtype"] = format!("{narrow:?}").into();
        line["matrix_median_s"] = median(&mut narrowed).into();
        line["matrix_ratios"] = ratios.clone().into();
        line["matrix_median_ratio"] = median(&mut ratios).into();
        line["peak_rss_mib"] = peak_rss_mib().into();
        println!("{line}");
        return Ok(());
    }
    match arg("--lora-rank").map(|r| r.parse::<usize>()) {
        None => {
            let (median, min) = time_runs(runs, step)?;
            line["median_s"] = median.into();
            line["min_s"] = min.into();
        }
        Some(rank) => {
            let rank = rank.map_err(|e| format!("--lora-rank: {e}"))?;
            let lora = sd_benches::kohya_lora(&unet, rank);
            let attach = || {
                sd_lora::attach(
                    &unet,
                    sd_lora::Component::Unet,
                    &[(&lora, 0.8)],
                    &sd_unet::checkpoint_key,
                    None,
                    sd_lora::MergeOptions::default(),
                    &device,
                )
                .map_err(|e| e.to_string())
            };
            // One warm-up of each, then the pairs.
            step()?;
            let attached = attach()?;
            step()?;
            attached.detach();
            let (mut base, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs.max(1) {
                let start = std::time::Instant::now();
                step()?;
                let b = start.elapsed().as_secs_f64();
                let attached = attach()?;
                let start = std::time::Instant::now();
                step()?;
                let w = start.elapsed().as_secs_f64();
                attached.detach();
                base.push(b);
                with.push(w);
                ratios.push(w / b);
            }
            line["median_s"] = median(&mut base).into();
            line["lora_rank"] = rank.into();
            line["lora_layers"] = lora.layers.len().into();
            line["lora_median_s"] = median(&mut with).into();
            line["lora_ratios"] = ratios.clone().into();
            line["lora_median_ratio"] = median(&mut ratios).into();
        }
    }
    line["peak_rss_mib"] = peak_rss_mib().into();
    println!("{line}");
    Ok(())
}
