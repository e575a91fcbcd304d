//! Helpers for the timing binaries that `cargo xtask bench-*` runs next to PyTorch.

use std::time::Instant;

use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use sd_lora::{Component, LoraFile, LoraFormat, LoraLayer, ModuleName};
use sd_unet::UNet2DConditionModel;

/// `--name value` from the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The allocator settings the `sd` command runs with
/// ([`sd_kernels::allocator::reuse_freed_memory`]), unless `--malloc-defaults` is given.
pub fn tune_allocator() {
    if !std::env::args().any(|a| a == "--malloc-defaults") {
        sd_kernels::allocator::reuse_freed_memory();
    }
}

/// The process's peak resident memory in MiB (`VmHWM`), NaN where /proc is not there.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Runs `f` once to warm up, then `runs` times; returns (median, min) seconds.
pub fn time_runs(
    runs: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<(f64, f64), String> {
    f()?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

/// A deterministic pseudo-random factor (the values do not matter to the time).
fn factor(rows: usize, cols: usize, seed: usize) -> TensorData {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| (((i * 2654435761 + seed * 40503) % 1000) as f32 / 1000.0 - 0.5) * 0.01)
        .collect();
    TensorData::new(values, [rows, cols])
}

/// A LoRA of rank `rank` with kohya's default targets on `unet` (every linear and 1×1
/// projection inside the transformer blocks: to_q, to_k, to_v, to_out.0, proj_in, proj_out,
/// the feed-forward's two), pseudo-random factors: what the LoRA benchmarks apply.
pub fn kohya_lora<B: Backend>(unet: &UNet2DConditionModel<B>, rank: usize) -> LoraFile {
    let mut layers = Vec::new();
    for (i, (key, snapshot)) in sd_core::weights::module_tensors(unet, &sd_unet::checkpoint_key)
        .into_iter()
        .enumerate()
    {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        let inside = module.contains(".attentions.");
        let shape: Vec<usize> = snapshot.shape.iter().copied().collect();
        let projection = matches!(shape.as_slice(), [_, _] | [_, _, 1, 1]);
        let norm = module.contains("norm");
        if !inside || !projection || norm {
            continue;
        }
        let (out, inputs) = (shape[0], shape[1]);
        layers.push(LoraLayer {
            component: Component::Unet,
            module: ModuleName::Dotted(module.to_string()),
            key: format!("lora_unet_{}", module.replace('.', "_")),
            down: factor(rank, inputs, i),
            up: factor(out, rank, i + 1),
            alpha: Some(rank as f32),
        });
    }
    LoraFile::new(
        "bench.safetensors",
        LoraFormat::Kohya,
        layers,
        Default::default(),
    )
}
