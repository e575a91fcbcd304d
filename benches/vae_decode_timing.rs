//! Times a VAE decode with random weights on the default backend; prints one JSON line.
//! `cargo xtask bench-vae` runs it next to `xtask/python/bench_vae.py` with the same arguments.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
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

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let name = get("--config").unwrap_or_else(|| "sd15".into());
    let runs: usize = get("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let (config, side) = config(&name).ok_or(format!("unknown config {name}"))?;
    let device = Default::default();
    let decoder = VaeDecoder::<B>::new(&config, &device).map_err(|e| e.to_string())?;
    let z = Tensor::<B, 4>::random([1, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    let decode = || {
        let image = decoder.decode(z.clone()).map_err(|e| e.to_string())?;
        // Reading the result back waits for the backend to finish.
        let _ = image.clone().slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok::<_, String>(image)
    };
    let image = decode()?; // warm-up (kernel selection, allocator)
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        decode()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "backend": std::any::type_name::<B>(),
            "latent": z.dims(),
            "image": image.dims(),
            "median_s": times[times.len() / 2],
            "min_s": times[0],
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
