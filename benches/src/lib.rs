//! Helpers for the timing binaries that `cargo xtask bench-*` runs next to PyTorch.

use std::time::Instant;

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
