//! `cargo xtask <command>`: chores that need more than cargo.
//!
//! - `fixtures`: make a Python venv (pinned reference packages) and regenerate `tests/fixtures/`.
//! - `bench-vae [--config sd15|tiny] [--runs N]`: time the same VAE decode in Rust (release,
//!   flex) and in PyTorch (diffusers) on this machine, one after the other, and print the ratio
//!   and each side's peak memory.
//! - `bench-unet [--config sd15|sd21] [--runs N]`: the same for one classifier-free-guidance
//!   U-Net step (batch 2, 64×64 latent, 77 tokens).
//! - `bench-train [--config sd15|tiny] [--runs N]`: the same for one U-Net training step
//!   (batch 1, 32×32 latent, ε objective, backward, global-norm clipping, AdamW; the sd15 shape
//!   with random weights, or the tiny fixture U-Net, whose steps per second it also prints).
//! - `bench-clip [--config vit-l|bigg] [--runs N]`: the CLIP text encoder on 2×77 tokens, Rust
//!   against transformers.
//! - `bench-metrics [--runs N]`: the FID Inception's pool3 features for 200 images at 299²
//!   (batches of 50), Rust against pytorch-fid's network.
//! - `bench-generate [--size 512] [--steps 4] [--dtype f32|f16] [--tiling]`: peak memory
//!   (`/usr/bin/time -v`) and wall time of a whole `sd generate` (release, flex) on a
//!   random-weight SD 1.5-size model, written once under `target/bench-models/` by the fixture
//!   venv; and the time from the start to the first U-Net step (`sd generate -v`) against
//!   the time to read the weight files it needs once (text encoder and U-Net), with a cold
//!   page cache where it can be dropped (root) and a warm one.
//! - `fixtures [--only KIND]`: regenerate only one kind of fixture (e.g. `pipeline`).
//! - `train-shapes [--run-dir DIR] [--images N] [--vae-steps N] [--decoder-steps N]
//!   [--unet-steps N] [--high-noise-steps N] [--canonical-steps N] [--text-encoder-steps N]
//!   [--as-drawn-steps N] [--as-drawn-cycles N] [--vae DIR]`: the shapes
//!   model from scratch (`xtask/src/train_shapes.rs` is the recipe), resumable: run it again to
//!   continue.
//! - `fuzz [--execs N] [--seed S] [--target NAME[,NAME]]`: the long fuzzing run of every loader
//!   (`tests/fuzz.rs`, release): N executions per target (1,000,000 by default) from seed S;
//!   prints executions per second and totals per target, and fails on any panic, abort or hang.
//!   `fuzz --target NAME --replay PATH` runs one saved input (e.g. a `tests/fuzz-corpus` file).

mod train_shapes;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(&args[1..]),
        Some("bench-clip") => compare(
            "CLIP text encoder, 2×77 tokens",
            "clip-text-timing",
            "bench_clip.py",
            &args[1..],
            "vit-l",
            "5",
        ),
        Some("bench-generate") => bench_generate(&args[1..]),
        Some("bench-metrics") => compare(
            "FID Inception features",
            "inception-timing",
            "bench_inception.py",
            &args[1..],
            "fid",
            "3",
        ),
        Some("fuzz") => fuzz(&args[1..]),
        Some("train-shapes") => train_shapes::train_shapes(&args[1..]),
        Some("bench-vae") => compare(
            "VAE decode",
            "vae-decode-timing",
            "bench_vae.py",
            &args[1..],
            "sd15",
            "3",
        ),
        Some("bench-train") => compare(
            "U-Net training step (forward, backward, AdamW)",
            "unet-train-step-timing",
            "bench_unet_train.py",
            &args[1..],
            "sd15",
            "3",
        ),
        Some("bench-unet") => compare(
            "U-Net CFG step",
            "unet-step-timing",
            "bench_unet.py",
            &args[1..],
            "sd15",
            "2",
        ),
        _ => Err(format!(
            "usage: cargo xtask fixtures [--only KIND] | bench-vae [--config sd15|tiny] [--runs N] \
             | bench-unet [--config sd15|sd21] [--runs N] \
             | bench-train [--config sd15|tiny] [--runs N] \
             | bench-clip [--config vit-l|bigg] [--runs N] | bench-metrics [--runs N] | bench-generate [--size 512] [--steps 4] [--dtype f32|f16] [--tiling] \
             | fuzz [--execs N] [--seed S] [--target NAME] [--replay PATH] \
             | train-shapes [--run-dir DIR] [--images N] [--vae-steps N] [--decoder-steps N] [--unet-steps N] [--high-noise-steps N] [--canonical-steps N] [--text-encoder-steps N] [--as-drawn-steps N] [--as-drawn-cycles N] [--vae DIR]\n\
             got: {args:?}"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The venv with the pinned reference packages, made or brought up to date on first use.
fn venv() -> Result<PathBuf, String> {
    let root = root();
    let venv = root.join(".fixtures-venv");
    let python = venv.join("bin/python");
    let requirements = root.join("xtask/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).map_err(|e| format!("{e}"))?;
    let stamp = venv.join("requirements.installed");
    if !python.exists() {
        eprintln!("xtask: creating {}", venv.display());
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        eprintln!("xtask: installing the reference packages (torch pulls ~3 GB of CUDA wheels)");
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements))?;
        std::fs::write(&stamp, wanted).map_err(|e| format!("{e}"))?;
    }
    Ok(python)
}

fn fixtures(args: &[String]) -> Result<(), String> {
    let python = venv()?;
    let root = root();
    let mut cmd = Command::new(python);
    cmd.arg(root.join("xtask/python/make_fixtures.py"))
        .arg("--out")
        .arg(root.join("tests/fixtures"));
    if let Some(only) = flag(args, "--only") {
        cmd.args(["--only", only]);
    }
    run(&mut cmd)
}

/// The image side of `bench-generate`'s time-to-the-first-step runs: the first step's start is
/// its end less the mean later step, so short steps (0.5 s at 128² against 10 s at 512² on 2
/// cores) keep the steps' run-to-run noise out of it. Loading does not depend on the size.
const TIMING_SIZE: &str = "128";

/// Peak RSS and wall time of one whole generation on a random-weight SD 1.5-size model.
fn bench_generate(args: &[String]) -> Result<(), String> {
    let size = flag(args, "--size").unwrap_or("512");
    // Four steps (five U-Net calls with the model's PNDM) give the time to the first step a
    // mean of four later steps to subtract.
    let steps = flag(args, "--steps").unwrap_or("4");
    let dtype = flag(args, "--dtype").unwrap_or("f32");
    let root = root();
    let model = root.join("target/bench-models/sd15-random");
    if !model.join("model_index.json").is_file() {
        let python = venv()?;
        run(Command::new(python)
            .arg(root.join("xtask/python/make_random_model.py"))
            .arg("--out")
            .arg(&model))?;
    }
    run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "sd-cli",
    ]))?;
    let out = root.join("target/bench-models/bench.png");
    let generate = |size: &str| -> Result<String, String> {
        let mut cmd = Command::new("/usr/bin/time");
        cmd.arg("-v")
            .arg(root.join("target/release/sd"))
            .args([
                "generate",
                "a photograph of an astronaut riding a horse",
                "-q",
                "-v",
            ])
            .arg("--model")
            .arg(&model)
            .args([
                "--width", size, "--height", size, "--steps", steps, "--dtype", dtype, "-o",
            ])
            .arg(&out);
        if args.iter().any(|a| a == "--tiling") {
            cmd.arg("--vae-tiling");
        }
        let result = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        if !result.status.success() {
            return Err(format!("{cmd:?} failed:\n{stderr}"));
        }
        Ok(stderr)
    };
    let field = |stderr: &str, name: &str| {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    // `sd generate -v`: "timings: first step began X s after the start, …".
    let first_step = |stderr: &str| -> f64 {
        field(stderr, "timings: first step began")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    // What is read before the first step: the text encoder's and the U-Net's weights.
    let weights: Vec<PathBuf> = ["text_encoder", "unet"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(model.join(dir)).into_iter().flatten())
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    // Read as `cat` reads, through one reused buffer: the time of the I/O alone (reading into
    // fresh memory would add the faulting-in of that memory, which loading pays as well).
    let read_all = || -> Result<(f64, u64), String> {
        use std::io::Read;
        let start = std::time::Instant::now();
        let mut buffer = vec![0u8; 8 << 20];
        let mut bytes = 0;
        for path in &weights {
            let mut file =
                std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            loop {
                match file.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => bytes += n as u64,
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            }
        }
        Ok((start.elapsed().as_secs_f64(), bytes))
    };
    // Cold: the page cache dropped before each measurement (root only; otherwise skipped).
    let drop_caches = || {
        let _ = Command::new("sync").status();
        std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
    };
    let cold = if drop_caches() {
        let (read, bytes) = read_all()?;
        drop_caches();
        Some((read, bytes, first_step(&generate(TIMING_SIZE)?)))
    } else {
        None
    };
    let (read, bytes) = read_all()?;
    let warm = first_step(&generate(TIMING_SIZE)?);
    let stderr = generate(size)?;
    let kib: f64 = field(&stderr, "Maximum resident set size (kbytes):")
        .parse()
        .unwrap_or(f64::NAN);
    println!(
        "sd generate {size}x{size}, {steps} steps, SD 1.5-size random weights (flex, {dtype}): \
         peak RSS {:.0} MiB, wall {}",
        kib / 1024.0,
        field(&stderr, "Elapsed (wall clock) time (h:mm:ss or m:ss):")
    );
    let gb = bytes as f64 / 1e9;
    if let Some((cold_read, _, cold_first)) = cold {
        println!(
            "cold page cache: reading the text encoder's and U-Net's files ({gb:.2} GB) {cold_read:.2} s; \
             first U-Net step began {cold_first:.2} s after the start ({:.2}x the read; \
             {TIMING_SIZE}² runs, whose short steps make the first one's start exact)",
            cold_first / cold_read
        );
    } else {
        println!("(not root: the page cache could not be dropped, so no cold figures)");
    }
    println!(
        "warm page cache: reading them {read:.2} s; first U-Net step began {warm:.2} s after the \
         start ({:.2}x the read)",
        warm / read
    );
    println!("{}", machine());
    Ok(())
}

/// The long fuzzing run: `tests/fuzz.rs`'s ignored `long_run`, in release, with its settings
/// in the environment.
fn fuzz(args: &[String]) -> Result<(), String> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root()).args([
        "test",
        "--release",
        "-p",
        "sd-tests",
        "--test",
        "fuzz",
        "--",
        "--ignored",
        "--nocapture",
        "--exact",
    ]);
    cmd.arg(if flag(args, "--replay").is_some() {
        "replay"
    } else {
        "long_run"
    });
    for (flag_name, var) in [
        ("--execs", "SD_FUZZ_EXECS"),
        ("--seed", "SD_FUZZ_SEED"),
        ("--target", "SD_FUZZ_TARGET"),
    ] {
        if let Some(value) = flag(args, flag_name) {
            cmd.env(var, value);
        }
    }
    // The test runs in `tests/`: pass the input's absolute path.
    if let Some(path) = flag(args, "--replay") {
        let path = std::fs::canonicalize(path).map_err(|e| format!("{path}: {e}"))?;
        cmd.env("SD_FUZZ_REPLAY", path);
    }
    run(&mut cmd)
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Runs a Rust timing binary (release, default backend) and its PyTorch counterpart one after
/// the other on this machine with the same arguments, and prints both and the ratios.
fn compare(
    what: &str,
    bin: &str,
    script: &str,
    args: &[String],
    default_config: &str,
    default_runs: &str,
) -> Result<(), String> {
    let config = flag(args, "--config").unwrap_or(default_config);
    let runs = flag(args, "--runs").unwrap_or(default_runs);
    let python = venv()?;
    let root = root();
    run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "sd-benches",
        "--bin",
        bin,
    ]))?;
    let common = ["--config", config, "--runs", runs];
    let rust = output(
        Command::new(root.join("target/release").join(bin))
            .current_dir(&root)
            .args(common),
    )?;
    let torch = output(
        Command::new(python)
            .current_dir(&root)
            .arg(root.join("xtask/python").join(script))
            .args(common),
    )?;
    let parse = |s: &str| -> Result<serde_json::Value, String> {
        let line = s.lines().last().unwrap_or_default();
        serde_json::from_str(line).map_err(|e| format!("bad timing output {s:?}: {e}"))
    };
    let (rust, torch) = (parse(&rust)?, parse(&torch)?);
    let secs = |v: &serde_json::Value| v["median_s"].as_f64().unwrap_or(f64::NAN);
    let mib = |v: &serde_json::Value| v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
    println!(
        "{what}, config {config}, input {}, median of {runs}",
        rust["latent"]
    );
    println!(
        "  rust ({})  {:8.3} s   peak RSS {:8.0} MiB",
        rust["backend"],
        secs(&rust),
        mib(&rust)
    );
    println!(
        "  pytorch ({})  {:8.3} s   peak RSS {:8.0} MiB",
        torch["backend"],
        secs(&torch),
        mib(&torch)
    );
    // The training bench's throughput (the other bins print no `steps_per_s`).
    if let (Some(r), Some(t)) = (rust["steps_per_s"].as_f64(), torch["steps_per_s"].as_f64()) {
        println!("  steps/s: rust {r:.3}, pytorch {t:.3}");
    }
    println!(
        "  time ratio rust/pytorch: {:.2}×",
        secs(&rust) / secs(&torch)
    );
    println!(
        "  memory ratio rust/pytorch: {:.2}×",
        mib(&rust) / mib(&torch)
    );
    println!("  {}", machine());
    Ok(())
}

/// The machine a figure comes from: CPU model, the widest x86 vector instructions it has (the
/// kernels' AVX-512 paths run only where `avx512f` is listed), cores, and the load average
/// (another process running beside a benchmark changes its times).
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim)
            .unwrap_or("?")
            .to_string()
    };
    let flags = field("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let isa = if has("avx512f") {
        "AVX-512"
    } else if has("avx2") && has("fma") {
        "AVX2 + FMA (no AVX-512)"
    } else if has("avx2") {
        "AVX2"
    } else {
        "no AVX2"
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: {}, {isa}, {} cores; load average {} (1, 5, 15 min)",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.join(" ")
    )
}
