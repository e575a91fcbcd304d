//! Data-parallel `sd train unet` on the tiny fixture model (burn-collective): two peers with
//! batch 2 each, as threads of one process (`--devices 2`) and as two processes on loopback
//! (`--nodes 2`, node 0 listening at `--orchestrator`), end with the weights of one process with batch 4;
//! a node killed mid-run makes the other stop with one clear line, not wait forever.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SD: &str = env!("CARGO_BIN_EXE_sd");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-parallel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Five small captioned PNGs.
fn data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..5u32 {
        let image = image::RgbImage::from_fn(32, 32, |x, y| {
            let inside = (x as i32 - 8 - 3 * i as i32).pow(2) + (y as i32 - 14).pow(2) < 60;
            image::Rgb([if inside { 230 } else { 30 }, (50 * i) as u8, (x * 6) as u8])
        });
        image.save(data.join(format!("img{i}.png"))).unwrap();
        std::fs::write(data.join(format!("img{i}.txt")), format!("a circle {i}\n")).unwrap();
    }
    data
}

/// `sd train unet` for `steps` steps with caption dropout, offset noise and input perturbation on
/// (every random draw of the step is split between the peers), then `extra`.
fn command(data: &Path, output: &Path, batch: usize, steps: u64, extra: &[&str]) -> Command {
    let model = common::tiny_model();
    let mut c = Command::new(SD);
    c.args(["train", "unet", "--data"])
        .arg(data)
        .arg("--output")
        .arg(output)
        .arg("--model")
        .arg(&model)
        .args(["--max-steps", &steps.to_string()])
        .args(["--batch-size", &batch.to_string()])
        .args([
            "--resolution",
            "32",
            "--learning-rate",
            "1e-4",
            "--seed",
            "7",
        ])
        .args(["--caption-dropout", "0.3", "--noise-offset", "0.1"])
        .args(["--input-perturbation", "0.1", "--ema-decay", "0.9", "-q"])
        .args(extra);
    c
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "sd train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every tensor of a safetensors file as f32 values, by name.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// How far two runs' weights may end apart: half an Adam step at these tests' learning rate
/// (1e-4). Adam divides each first moment by the root of the second, so an element whose
/// gradient is at the level of rounding moves by a sizeable part of the learning rate either
/// way: two runs that sum the same gradients in another order (one batch of 4 against four
/// peers' mean) end up to about a tenth of a step apart in a few such weights, while their
/// moments, linear in the gradients, agree within 1e-8.
const WEIGHTS: f32 = 5e-5;

/// How far two runs' values may end apart otherwise (`· (1 + |x|)`): Adam's moments, and the
/// autoencoder test's weights.
const TIGHT: f32 = 1e-5;

/// The weights and EMA weights ([`WEIGHTS`]) and Adam moments ([`TIGHT`]) of two runs' last
/// checkpoints agree, and the logged losses within 1e-5 relative.
fn same_training(a: &Path, b: &Path) {
    for (file, tolerance) in [
        ("unet/diffusion_pytorch_model.safetensors", WEIGHTS),
        ("unet_ema/diffusion_pytorch_model.safetensors", WEIGHTS),
        (
            "optimizer/exp_avg/diffusion_pytorch_model.safetensors",
            TIGHT,
        ),
        (
            "optimizer/exp_avg_sq/diffusion_pytorch_model.safetensors",
            TIGHT,
        ),
    ] {
        close_files(
            &a.join("checkpoint-3").join(file),
            &b.join("checkpoint-3").join(file),
            tolerance,
        );
    }
    close_losses(a, b);
}

/// Two weight files agree within `tolerance · (1 + |x|)`, tensor by tensor.
fn close_files(a: &Path, b: &Path, tolerance: f32) {
    let (x, y) = (weights(a), weights(b));
    assert_eq!(x.len(), y.len());
    let mut worst = (0.0f32, String::new());
    for ((name, x), (_, y)) in x.iter().zip(&y) {
        for (p, q) in x.iter().zip(y) {
            let e = (p - q).abs() / (1.0 + q.abs());
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
    }
    let file = a.display();
    assert!(worst.0 <= tolerance, "{file}: {} at {}", worst.0, worst.1);
    eprintln!("{file}: worst {:e} at {}", worst.0, worst.1);
}

/// Two runs logged three steps with losses within 1e-5 relative.
fn close_losses(a: &Path, b: &Path) {
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (x, y) = (losses(a), losses(b));
    assert_eq!(x.len(), 3);
    for (p, q) in x.iter().zip(&y) {
        assert!((p - q).abs() <= 1e-5 * q.abs(), "losses {x:?} vs {y:?}");
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when dropped (a failed assertion leaves no process behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Node `rank` of two; node 0 listens at `orchestrator`.
fn node(data: &Path, output: &Path, rank: usize, steps: u64, orchestrator: &str) -> Command {
    let mut c = command(
        data,
        output,
        2,
        steps,
        &[
            "--nodes",
            "2",
            "--node-rank",
            &rank.to_string(),
            "--orchestrator",
            orchestrator,
            "--collective-timeout",
            "120",
        ],
    );
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

#[test]
fn two_peers_train_as_one_process_with_their_batches_together() {
    let dir = scratch("equal");
    let data = data(&dir);
    let single = dir.join("single");
    ok(&command(&data, &single, 4, 3, &[]).output().unwrap());

    let threads = dir.join("threads");
    ok(&command(&data, &threads, 2, 3, &["--devices", "2"])
        .output()
        .unwrap());
    same_training(&threads, &single);
    let config = std::fs::read_to_string(threads.join("train_config.json")).unwrap();
    assert!(config.contains("\"devices\": 2"), "{config}");

    // Two processes (nodes) on loopback; node 1 writes nothing.
    let address = format!("127.0.0.1:{}", free_port());
    let nodes = dir.join("nodes");
    let other = dir.join("nodes-1");
    let second = node(&data, &other, 1, 3, &address).spawn().unwrap();
    let first = node(&data, &nodes, 0, 3, &address).output().unwrap();
    let second = second.wait_with_output().unwrap();
    ok(&first);
    ok(&second);
    let said = String::from_utf8_lossy(&second.stdout);
    assert!(said.contains("node 1: trained 3 steps"), "{said}");
    same_training(&nodes, &single);
    assert!(
        !other.join("checkpoint-3").exists() && !other.join("train_log.jsonl").exists(),
        "node 1 wrote output"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_killed_mid_run_stops_the_other_with_one_line() {
    let dir = scratch("killed");
    let data = data(&dir);
    let address = format!("127.0.0.1:{}", free_port());
    let output = dir.join("out");
    let long =
        |rank: usize, output: &Path| node(&data, output, rank, 1000, &address).spawn().unwrap();
    let first = long(0, &output);
    let mut second = Reaped(long(1, &dir.join("out-1")));
    // Once a step has been taken together, node 1 dies.
    let started = Instant::now();
    while !output.join("train_log.jsonl").is_file()
        || std::fs::read_to_string(output.join("train_log.jsonl"))
            .unwrap()
            .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no step was taken"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    second.0.kill().unwrap();
    let _ = second.0.wait();
    let killed_at = Instant::now();
    let out = first.wait_with_output().unwrap();
    let waited = killed_at.elapsed();
    assert!(!out.status.success(), "node 0 went on without node 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "not one line: {stderr}");
    assert!(line.contains("data-parallel training"), "{line}");
    // Well inside the 120 s bound when the lost connection is noticed.
    eprintln!(
        "node 0 stopped {:.1} s after node 1 died: {line}",
        waited.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sorted file names of a folder.
fn names(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    all.sort();
    all
}

/// With `--cache-latents` and `--cache-text-embeddings` the peers fill the caches together
/// (each encodes its share of the images, then every peer reads them all) and still train as
/// one process with their batches together; a node whose output folder is its own encodes the
/// rest of its latent cache itself.
#[test]
fn peers_fill_the_caches_together_and_train_as_one_process() {
    let dir = scratch("caches");
    let data = data(&dir);
    let caches = ["--cache-latents", "--cache-text-embeddings"];
    let single = dir.join("single");
    ok(&command(&data, &single, 4, 3, &caches).output().unwrap());
    let threads = dir.join("threads");
    ok(&command(
        &data,
        &threads,
        2,
        3,
        &[&caches[..], &["--devices", "2"]].concat(),
    )
    .output()
    .unwrap());
    same_training(&threads, &single);
    for cache in ["latent_cache", "text_cache"] {
        assert_eq!(
            names(&threads.join(cache)),
            names(&single.join(cache)),
            "{cache}"
        );
    }
    assert_eq!(names(&single.join("latent_cache")).len(), 5);

    let address = format!("127.0.0.1:{}", free_port());
    let nodes = dir.join("nodes");
    let other = dir.join("nodes-1");
    let cmd = |out: &Path, rank: usize| {
        let mut c = node(&data, out, rank, 3, &address);
        c.args(caches);
        c
    };
    let second = cmd(&other, 1).spawn().unwrap();
    let first = cmd(&nodes, 0).output().unwrap();
    let second = second.wait_with_output().unwrap();
    ok(&first);
    ok(&second);
    same_training(&nodes, &single);
    assert_eq!(
        names(&other.join("latent_cache")),
        names(&single.join("latent_cache"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With aspect-ratio buckets each peer trains on its own bucket batch (kohya's scripts under
/// accelerate), with its own draws; such a run (with the latent cache too) resumes exactly and
/// is not peer 0's run alone.
#[test]
fn peers_train_on_their_own_bucket_batches_and_resume_exactly() {
    let dir = scratch("buckets");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..6u32 {
        let (w, h) = if i % 2 == 0 { (48, 32) } else { (32, 40) };
        let image = image::RgbImage::from_fn(w, h, |x, y| {
            let inside = (x as i32 - 12 - 2 * i as i32).pow(2) + (y as i32 - 14).pow(2) < 60;
            image::Rgb([if inside { 230 } else { 30 }, (40 * i) as u8, (x * 5) as u8])
        });
        image.save(data.join(format!("img{i}.png"))).unwrap();
        std::fs::write(data.join(format!("img{i}.txt")), format!("a circle {i}\n")).unwrap();
    }
    let buckets = [
        "--enable-bucket",
        "--min-bucket-reso",
        "16",
        "--max-bucket-reso",
        "64",
        "--bucket-reso-steps",
        "8",
        "--cache-latents",
        "--checkpoint-every",
        "1",
    ];
    fn with<'a>(buckets: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [buckets, extra].concat()
    }
    let straight = dir.join("straight");
    ok(
        &command(&data, &straight, 1, 3, &with(&buckets, &["--devices", "2"]))
            .output()
            .unwrap(),
    );
    let resumed = dir.join("resumed");
    ok(
        &command(&data, &resumed, 1, 2, &with(&buckets, &["--devices", "2"]))
            .output()
            .unwrap(),
    );
    ok(&command(
        &data,
        &resumed,
        1,
        3,
        &with(&buckets, &["--devices", "2", "--resume", "latest"]),
    )
    .output()
    .unwrap());
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/diffusion_pytorch_model.safetensors",
        "optimizer/exp_avg_sq/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            std::fs::read(straight.join("checkpoint-3").join(file)).unwrap()
                == std::fs::read(resumed.join("checkpoint-3").join(file)).unwrap(),
            "{file} differs after resume"
        );
    }
    let alone = dir.join("alone");
    ok(&command(&data, &alone, 1, 3, &buckets).output().unwrap());
    let losses = |d: &Path| std::fs::read_to_string(d.join("train_log.jsonl")).unwrap();
    let first = |log: String| -> f64 {
        let line: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        line["loss"].as_f64().unwrap()
    };
    assert_ne!(first(losses(&straight)), first(losses(&alone)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sd train vae` on two peers (threads) with batch 2 each ends with the weights, Adam
/// moments and losses of one process with batch 4.
#[test]
fn two_peers_train_the_autoencoder_as_one_process() {
    let dir = scratch("vae");
    let data = data(&dir);
    let model = common::tiny_model();
    let run = |output: &Path, batch: &str, extra: &[&str]| {
        let mut c = Command::new(SD);
        c.args(["train", "vae", "--data"])
            .arg(&data)
            .arg("--output")
            .arg(output)
            .arg("--model")
            .arg(&model)
            .args([
                "--max-steps",
                "3",
                "--batch-size",
                batch,
                "--resolution",
                "32",
            ])
            .args([
                "--learning-rate",
                "1e-3",
                "--kl-weight",
                "1e-4",
                "--seed",
                "3",
            ])
            .args(["--random-flip", "-q"])
            .args(extra);
        c.output().unwrap()
    };
    let single = dir.join("single");
    ok(&run(&single, "4", &[]));
    let threads = dir.join("threads");
    ok(&run(&threads, "2", &["--devices", "2"]));
    for file in [
        "vae/diffusion_pytorch_model.safetensors",
        "optimizer/exp_avg/diffusion_pytorch_model.safetensors",
        "optimizer/exp_avg_sq/diffusion_pytorch_model.safetensors",
    ] {
        close_files(
            &threads.join("checkpoint-3").join(file),
            &single.join("checkpoint-3").join(file),
            TIGHT,
        );
    }
    close_losses(&threads, &single);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two processes (nodes) of two threads (devices) each, batch 1 per peer, end with the
/// weights of one process with batch 4: the threads reduce together, their first thread with
/// the other node, and hand the result back.
#[test]
fn two_nodes_of_two_threads_train_as_one_process() {
    let dir = scratch("both");
    let data = data(&dir);
    let single = dir.join("single");
    ok(&command(&data, &single, 4, 3, &[]).output().unwrap());
    let address = format!("127.0.0.1:{}", free_port());
    let run = |output: &Path, rank: usize| {
        let mut c = command(
            &data,
            output,
            1,
            3,
            &[
                "--devices",
                "2",
                "--nodes",
                "2",
                "--node-rank",
                &rank.to_string(),
                "--orchestrator",
                &address,
                "--collective-timeout",
                "120",
            ],
        );
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    };
    let nodes = dir.join("nodes");
    let second = run(&dir.join("nodes-1"), 1).spawn().unwrap();
    let first = run(&nodes, 0).output().unwrap();
    let second = second.wait_with_output().unwrap();
    ok(&first);
    ok(&second);
    same_training(&nodes, &single);
    let config = std::fs::read_to_string(nodes.join("train_config.json")).unwrap();
    assert!(
        config.contains("\"devices\": 2") && config.contains("\"nodes\": 2"),
        "{config}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
