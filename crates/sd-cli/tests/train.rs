//! `sd train unet` on the tiny fixture model: a resumed run, one killed with SIGKILL at a
//! random moment and one whose newest checkpoint is damaged all end bit-identical to an
//! uninterrupted run; the output folders load in `sd generate`; bad data is one clear line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const SD: &str = env!("CARGO_BIN_EXE_sd");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Three small PNGs of different sizes with kohya-style caption files.
fn data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..3u32 {
        let (w, h) = (40 + 8 * i, 32);
        let image = image::RgbImage::from_fn(w, h, |x, y| {
            let r = if (x as i32 - 14).pow(2) + (y as i32 - 14).pow(2) < 100 {
                255
            } else {
                40
            };
            image::Rgb([r as u8, (60 * i) as u8, (x * 4) as u8])
        });
        image.save(data.join(format!("img{i}.png"))).unwrap();
        std::fs::write(
            data.join(format!("img{i}.txt")),
            format!("a red circle {i}\n"),
        )
        .unwrap();
    }
    data
}

/// `sd train unet` on the tiny model, 2 images a step at 32², a checkpoint every 2 steps, with
/// the run's `settings` and then `extra`.
fn train_with(data: &Path, output: &Path, steps: u64, settings: &[&str], extra: &[&str]) -> Output {
    let model = common::tiny_model();
    let steps = steps.to_string();
    let mut args = vec![
        "train",
        "unet",
        "--data",
        data.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--max-steps",
        &steps,
        "--batch-size",
        "2",
        "--resolution",
        "32",
        "--checkpoint-every",
        "2",
        "-q",
    ];
    args.extend_from_slice(settings);
    args.extend_from_slice(extra);
    Command::new(SD).args(&args).output().unwrap()
}

/// Full training with EMA, random flips and crops.
fn train(data: &Path, output: &Path, steps: u64, extra: &[&str]) -> Output {
    let settings = [
        "--ema-decay",
        "0.99",
        "--learning-rate",
        "1e-3",
        "--random-flip",
        "--random-crop",
    ];
    train_with(data, output, steps, &settings, extra)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "sd train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files of a checkpoint that must match bit for bit.
const STATE: &[&str] = &[
    "unet/diffusion_pytorch_model.safetensors",
    "unet_ema/diffusion_pytorch_model.safetensors",
    "optimizer/exp_avg/diffusion_pytorch_model.safetensors",
    "optimizer/exp_avg_sq/diffusion_pytorch_model.safetensors",
];

fn same_state(a: &Path, b: &Path) {
    for file in STATE {
        let (x, y) = (
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
        );
        assert!(
            x == y,
            "{file} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn interrupted_runs_end_where_the_straight_run_ends() {
    let dir = scratch("resume");
    let data = data(&dir);
    let straight = dir.join("straight");
    ok(&train(&data, &straight, 6, &[]));
    let end = straight.join("checkpoint-6");
    for required in [
        "model_index.json",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ] {
        assert!(end.join(required).exists(), "checkpoint lacks {required}");
    }

    // 2 steps, then resumed to 6.
    let resumed = dir.join("resumed");
    ok(&train(&data, &resumed, 2, &[]));
    ok(&train(&data, &resumed, 6, &["--resume", "latest"]));
    same_state(&end, &resumed.join("checkpoint-6"));
    let log = |p: &Path| -> Vec<(u64, String)> { sd_train_log(p) };
    assert_eq!(log(&straight), log(&resumed), "the logs' losses differ");

    // Killed with SIGKILL at a moment that depends on the clock, then resumed.
    let killed = dir.join("killed");
    let model = common::tiny_model();
    let mut child = Command::new(SD)
        .args(["train", "unet", "--data"])
        .arg(&data)
        .arg("--output")
        .arg(&killed)
        .arg("--model")
        .arg(&model)
        .args([
            "--max-steps",
            "6",
            "--batch-size",
            "2",
            "--resolution",
            "32",
            "--checkpoint-every",
            "2",
            "--ema-decay",
            "0.99",
            "--learning-rate",
            "1e-3",
            "--random-flip",
            "--random-crop",
            "-q",
        ])
        .spawn()
        .unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_millis(700 + u64::from(nanos % 2200)));
    let _ = child.kill();
    let _ = child.wait();
    ok(&train(&data, &killed, 6, &["--resume", "latest"]));
    same_state(&end, &killed.join("checkpoint-6"));
    // No temporary folder is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&killed)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The newest checkpoint damaged (a truncated weight file): reported, the previous used.
    let damaged = dir.join("damaged");
    ok(&train(&data, &damaged, 4, &[]));
    let weights = damaged.join("checkpoint-4/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = train(&data, &damaged, 6, &["--resume", "latest"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("checkpoint-4") && stderr.contains("the one before"),
        "{stderr}"
    );
    same_state(&end, &damaged.join("checkpoint-6"));

    // The output is a diffusers folder `sd generate` opens.
    let png = dir.join("out.png");
    let out = Command::new(SD)
        .args([
            "generate",
            "a red circle",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "-q",
        ])
        .arg("--model")
        .arg(&straight)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

/// (step, loss) of a run's log, the loss as written.
fn sd_train_log(output: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(output.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

/// The losses of a 2-step [`train`] run into `output`.
fn two_step_losses(output: &Path, data: &Path, extra: &[&str]) -> Vec<(u64, String)> {
    ok(&train(data, output, 2, extra));
    sd_train_log(output)
}

fn one_line_error(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "not one line: {stderr}");
    assert!(line.starts_with("sd: "), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "`{needle}` not in: {line}");
    }
}

#[test]
fn bad_data_is_one_clear_line() {
    let dir = scratch("errors");
    let output = dir.join("out");
    one_line_error(
        &train(&dir.join("absent"), &output, 1, &[]),
        &["absent", "does not exist"],
    );
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    one_line_error(
        &train(&empty, &output, 1, &[]),
        &["empty", "no training images"],
    );

    let folder = dir.join("imagefolder");
    let data = data(&dir);
    common::copy_dir(&data, &folder);
    std::fs::write(
        folder.join("metadata.jsonl"),
        "{\"file_name\": \"img0.png\", \"caption\": \"x\"}\n",
    )
    .unwrap();
    one_line_error(
        &train(&folder, &output, 1, &[]),
        &["metadata.jsonl:1", "no caption column `text`", "caption"],
    );

    let broken = dir.join("broken");
    common::copy_dir(&data, &broken);
    std::fs::write(broken.join("img1.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    one_line_error(&train(&broken, &output, 1, &[]), &["img1.png"]);
    // Skipped and counted on request.
    let skipped = dir.join("skipped");
    let out = train(&broken, &skipped, 1, &["--skip-bad-images"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipped 1 unreadable image(s)") && stderr.contains("img1.png"),
        "{stderr}"
    );

    one_line_error(
        &train(&data, &output, 1, &["--lr-scheduler", "cosine_warm"]),
        &["cosine_warm"],
    );
    one_line_error(
        &Command::new(SD)
            .args(["train", "vae", "--data", data.to_str().unwrap(), "--output"])
            .arg(&output)
            .args(["--mixed-precision", "f16", "--max-steps", "1", "-q"])
            .output()
            .unwrap(),
        &["--mixed-precision f16 or bf16", "sd train vae"],
    );
    // A config file with a misspelt setting: the line and the name, on one line.
    let toml = dir.join("train.toml");
    std::fs::write(&toml, "batch_size = 2\nmax_stepz = 3\n").unwrap();
    one_line_error(
        &train(&data, &output, 1, &["--config", toml.to_str().unwrap()]),
        &["train.toml", "line 2", "max_stepz"],
    );
    // A finished run's folder is not trained over by accident.
    ok(&train(&data, &output, 2, &[]));
    one_line_error(
        &train(&data, &output, 2, &[]),
        &["already holds checkpoints", "--resume"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_autoencoder_trains_resumes_and_loads_as_vae() {
    let dir = scratch("vae");
    let data = data(&dir);
    let model = common::tiny_model();
    let run = |output: &Path, steps: &str, extra: &[&str]| {
        let options = ["--resolution", "32", "--checkpoint-every", "2"];
        let vae = ["--kl-weight", "1e-4", "--random-flip"];
        sd_train(
            "vae",
            &model,
            &data,
            output,
            steps,
            &[&options[..], &vae, extra].concat(),
        )
    };
    // Buckets are not read by the VAE loop: refused, not ignored, and nothing is written.
    let bucketed = dir.join("bucketed");
    let out = run(&bucketed, "2", &["--enable-bucket"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--enable-bucket"),
        "{stderr}"
    );
    assert!(!bucketed.join("checkpoint-2").exists());
    let straight = dir.join("straight");
    ok(&run(&straight, "4", &[]));
    let resumed = dir.join("resumed");
    ok(&run(&resumed, "2", &[]));
    ok(&run(&resumed, "4", &["--resume", "latest"]));
    for file in [
        "vae/diffusion_pytorch_model.safetensors",
        "checkpoint-4/optimizer/exp_avg_sq/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            std::fs::read(straight.join(file)).unwrap()
                == std::fs::read(resumed.join(file)).unwrap(),
            "{file} differs after resume"
        );
    }
    // The scaling factor fitted to the latents' spread.
    let fitted = dir.join("fitted");
    let out = run(&fitted, "1", &["--fit-scaling-factor"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("scaling_factor set to"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fitted.join("vae/config.json")).unwrap())
            .unwrap();
    let factor = config["scaling_factor"].as_f64().unwrap();
    assert!(factor > 0.0 && factor != 0.18215, "{factor}");
    // --decoder-only: the encoder half (and so the latents) as it was, the decoder trained.
    let decoder_only = dir.join("decoder-only");
    ok(&run(&decoder_only, "2", &["--decoder-only"]));
    let read = |path: &Path| sd::core::weights::SafetensorsFile::open(path).unwrap();
    let (before, after) = (
        read(&model.join("vae/diffusion_pytorch_model.safetensors")),
        read(&decoder_only.join("vae/diffusion_pytorch_model.safetensors")),
    );
    let (mut frozen, mut trained) = (0, 0);
    for entry in before.entries() {
        let f32 = burn::tensor::DType::F32;
        let same = before.tensor_data(&entry.key, f32).unwrap()
            == after.tensor_data(&entry.key, f32).unwrap();
        if entry.key.starts_with("encoder.") || entry.key.starts_with("quant_conv.") {
            assert!(same, "{} changed with --decoder-only", entry.key);
            frozen += 1;
        } else if !same {
            trained += 1;
        }
    }
    assert!(
        frozen > 10 && trained > 10,
        "{frozen} frozen, {trained} trained"
    );
    let out = run(
        &dir.join("both"),
        "1",
        &["--decoder-only", "--fit-scaling-factor"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--decoder-only") && err.trim().lines().count() == 1,
        "{err}"
    );

    let original = std::fs::read(model.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(
        std::fs::read(straight.join("vae/diffusion_pytorch_model.safetensors")).unwrap()
            != original
    );

    // The trained vae/ replaces a model's and generates.
    let with_vae = dir.join("model");
    common::copy_dir(&model, &with_vae);
    std::fs::remove_dir_all(with_vae.join("vae")).unwrap();
    common::copy_dir(&straight.join("vae"), &with_vae.join("vae"));
    let png = dir.join("out.png");
    let out = Command::new(SD)
        .args([
            "generate",
            "a red circle",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "-q",
        ])
        .arg("--model")
        .arg(&with_vae)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sd train vae` with the latent diffusion paper's discriminator: it joins at its start
/// (set in train.toml, its weight by flag), the log shows its loss from then on, and runs
/// interrupted before and after the start resume to the straight run's weights, discriminator
/// and moments, byte for byte.
#[test]
fn the_discriminator_joins_at_its_start_and_resumes_exactly() {
    let dir = scratch("vae-discriminator");
    let data = data(&dir);
    let model = common::tiny_model();
    let toml = dir.join("train.toml");
    std::fs::write(
        &toml,
        "[discriminator]\nstart = 2\nchannels = 8\nlayers = 2\n",
    )
    .unwrap();
    let toml = toml.to_str().unwrap();
    let run = |output: &Path, steps: &str, extra: &[&str]| {
        let options = ["--config", toml, "--checkpoint-every", "1"];
        let adversarial = ["--discriminator-weight", "0.8", "--random-flip"];
        let options = [&options[..], &adversarial, extra].concat();
        sd_train("vae", &model, &data, output, steps, &options)
    };
    let straight = dir.join("straight");
    ok(&run(&straight, "4", &["--resolution", "32"]));
    let resumed = dir.join("resumed");
    ok(&run(&resumed, "1", &["--resolution", "32"]));
    ok(&run(
        &resumed,
        "3",
        &["--resolution", "32", "--resume", "latest"],
    ));
    ok(&run(
        &resumed,
        "4",
        &["--resolution", "32", "--resume", "latest"],
    ));
    for file in [
        "vae/diffusion_pytorch_model.safetensors",
        "discriminator/diffusion_pytorch_model.safetensors",
        "checkpoint-4/optimizer/discriminator/exp_avg_sq.safetensors",
        "checkpoint-4/optimizer/exp_avg/diffusion_pytorch_model.safetensors",
    ] {
        assert!(
            std::fs::read(straight.join(file)).unwrap()
                == std::fs::read(resumed.join(file)).unwrap(),
            "{file} differs after resume"
        );
    }
    let log = std::fs::read_to_string(straight.join("train_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, line) in lines.iter().enumerate() {
        let d = &line["discriminator_loss"];
        let w = &line["adversarial_weight"];
        if i < 2 {
            assert!(d.is_null() && w.is_null(), "step {}: {line}", i + 1);
        } else {
            assert!(d.as_f64().unwrap() > 0.0, "step {}: {line}", i + 1);
            assert!(w.as_f64().unwrap() > 0.0, "step {}: {line}", i + 1);
        }
    }
    // The discriminator's weights moved from their start.
    let read = |p: &Path| sd::core::weights::SafetensorsFile::open(p).unwrap();
    let f32 = burn::tensor::DType::F32;
    let (early, late) = (
        read(&straight.join("checkpoint-2/discriminator/diffusion_pytorch_model.safetensors")),
        read(&straight.join("discriminator/diffusion_pytorch_model.safetensors")),
    );
    assert!(
        early.tensor_data("main.0.weight", f32).unwrap()
            != late.tensor_data("main.0.weight", f32).unwrap()
    );
    // Images too small for its patches: one line naming the setting.
    let out = run(&dir.join("small"), "1", &["--resolution", "8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--resolution 8")
            && err.contains("discriminator")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    // Not part of the U-Net's objective: refused there, not ignored.
    let out = train(&data, &dir.join("unet"), 1, &["--discriminator-start", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("sd train vae") && err.trim().lines().count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sd train KIND` (`unet` or `vae`) of `model` on `data` into `output` for `steps` steps, 2
/// images a step at learning rate 1e-3, quiet, then `options`.
fn sd_train(
    kind: &str,
    model: &Path,
    data: &Path,
    output: &Path,
    steps: &str,
    options: &[&str],
) -> Output {
    Command::new(SD)
        .args(["train", kind, "--data"])
        .arg(data)
        .arg("--output")
        .arg(output)
        .arg("--model")
        .arg(model)
        .args(["--max-steps", steps, "--batch-size", "2"])
        .args(["--learning-rate", "1e-3", "-q"])
        .args(options)
        .output()
        .unwrap()
}

/// `sd train unet` on another fixture model: 2 images a step at 32², a checkpoint every 2
/// steps, EMA, random flips, then `extra`.
fn train_model(model: &Path, data: &Path, output: &Path, steps: &str, extra: &[&str]) -> Output {
    let options = ["--resolution", "32", "--checkpoint-every", "2"];
    let unet = ["--ema-decay", "0.99", "--random-flip"];
    sd_train(
        "unet",
        model,
        data,
        output,
        steps,
        &[&options[..], &unet, extra].concat(),
    )
}

/// Runs 4 steps straight and 2 + 2 with a resume; their last checkpoints must match bit for
/// bit. Returns the straight run's folder.
fn straight_and_resumed(dir: &Path, run: &dyn Fn(&Path, &str, &[&str]) -> Output) -> PathBuf {
    let straight = dir.join("straight");
    ok(&run(&straight, "4", &[]));
    let resumed = dir.join("resumed");
    ok(&run(&resumed, "2", &[]));
    ok(&run(&resumed, "4", &["--resume", "latest"]));
    same_state(
        &straight.join("checkpoint-4"),
        &resumed.join("checkpoint-4"),
    );
    straight
}

/// An inpainting model (9-channel U-Net) trains on random masks over its images, resumes
/// exactly, and the folder it writes inpaints with `sd generate --init-image --mask`; its
/// latents cannot be cached (the masked images change every step).
#[test]
fn an_inpainting_unet_trains_on_random_masks_resumes_and_inpaints() {
    let dir = scratch("inpainting");
    let data = data(&dir);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pipeline/tiny_sd1_inpaint");
    let model = fixture.join("model");
    let run = |output: &Path, steps: &str, extra: &[&str]| {
        train_model(&model, &data, output, steps, extra)
    };
    let straight = straight_and_resumed(&dir, &run);
    let read = |p: &Path| sd::core::weights::SafetensorsFile::open(p).unwrap();
    let f32 = burn::tensor::DType::F32;
    let key = "conv_in.weight";
    let (before, after) = (
        read(&model.join("unet/diffusion_pytorch_model.safetensors")),
        read(&straight.join("unet/diffusion_pytorch_model.safetensors")),
    );
    assert_eq!(
        after.tensor_data(key, f32).unwrap().shape,
        [32, 9, 3, 3].into()
    );
    assert!(before.tensor_data(key, f32).unwrap() != after.tensor_data(key, f32).unwrap());
    let png = dir.join("inpainted.png");
    let out = Command::new(SD)
        .args(["generate", "a red circle", "--steps", "2", "-q"])
        .arg("--model")
        .arg(&straight)
        .arg("--init-image")
        .arg(fixture.join("init.png"))
        .arg("--mask")
        .arg(fixture.join("mask.png"))
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.is_file());
    let out = run(&dir.join("cached"), "1", &["--cache-latents"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--cache-latents") && err.trim().lines().count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An SDXL model's U-Net trains on both frozen text encoders with its pooled and size/crop
/// conditioning (random crops and flips change the crop ids), resumes exactly, and the folder
/// it writes generates; what it does not support yet is refused in one line.
#[test]
fn an_sdxl_unet_trains_resumes_and_generates() {
    let dir = scratch("sdxl");
    let data = data(&dir);
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline/tiny_sdxl/model");
    let run = |output: &Path, steps: &str, extra: &[&str]| {
        let crops = ["--random-crop", "--caption-dropout", "0.3"];
        train_model(&model, &data, output, steps, &[&crops[..], extra].concat())
    };
    let straight = straight_and_resumed(&dir, &run);
    // The added-conditioning layers trained too.
    let read = |p: &Path| sd::core::weights::SafetensorsFile::open(p).unwrap();
    let f32 = burn::tensor::DType::F32;
    let key = "add_embedding.linear_1.weight";
    let (before, after) = (
        read(&model.join("unet/diffusion_pytorch_model.safetensors")),
        read(&straight.join("unet/diffusion_pytorch_model.safetensors")),
    );
    assert!(before.tensor_data(key, f32).unwrap() != after.tensor_data(key, f32).unwrap());
    assert!(straight.join("text_encoder_2").is_dir() && straight.join("tokenizer_2").is_dir());
    let png = dir.join("sdxl.png");
    let out = Command::new(SD)
        .args([
            "generate",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
        ])
        .args(["-q", "--model"])
        .arg(&straight)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the latent cache (centre crops, no flips) the run's losses are those of one that
    // encodes every step: the cache keeps each image's size and crop for its ids.
    let (plain, cached) = (dir.join("plain"), dir.join("cached"));
    let centre = |output: &Path, extra: &[&str]| {
        Command::new(SD)
            .args(["train", "unet", "--data"])
            .arg(&data)
            .arg("--output")
            .arg(output)
            .arg("--model")
            .arg(&model)
            .args([
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--resolution",
                "32",
                "-q",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    ok(&centre(&plain, &[]));
    ok(&centre(&cached, &["--cache-latents"]));
    let (a, b) = (sd_train_log(&plain), sd_train_log(&cached));
    assert_eq!(a.len(), 2);
    for ((s1, a), (s2, b)) in a.iter().zip(&b) {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!(
            s1 == s2 && (a - b).abs() <= 1e-5 * a.abs(),
            "step {s1}: {a} vs {b}"
        );
    }
    // A LoRA of the U-Net alone, in kohya's and diffusers' formats: each loads in `sd generate
    // --lora` on the base model and changes its image.
    let render = |name: &str, lora: Option<&Path>| {
        let out = dir.join(name);
        let mut c = Command::new(SD);
        c.args([
            "generate",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
        ])
        .args(["--seed", "1", "-q", "--model"])
        .arg(&model)
        .arg("-o")
        .arg(&out);
        if let Some(lora) = lora {
            c.arg("--lora").arg(lora);
        }
        let run = c.output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    let base = render("base.png", None);
    for format in ["kohya", "diffusers"] {
        let output = dir.join(format!("lora-{format}"));
        ok(&centre(
            &output,
            &[
                "--lora-rank",
                "4",
                "--learning-rate",
                "5e-2",
                "--lora-format",
                format,
            ],
        ));
        let path = output.join(match format {
            "kohya" => "lora.safetensors",
            _ => "pytorch_lora_weights.safetensors",
        });
        let file = sd_lora::LoraFile::open(&path).unwrap();
        assert_eq!(
            file.components(),
            vec![sd_lora::Component::Unet],
            "{format}"
        );
        assert!(render(&format!("{format}.png"), Some(&path)) != base);
    }
    // Cached text embeddings (both encoders' context and the pooled one, by caption) give the
    // same run; a damaged entry is computed again.
    let text_cached = dir.join("text-cached");
    ok(&centre(&text_cached, &["--cache-text-embeddings"]));
    let entries: Vec<PathBuf> = std::fs::read_dir(text_cached.join("text_cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!entries.is_empty());
    std::fs::write(&entries[0], b"damaged").unwrap();
    let again = dir.join("text-cached-again");
    common::copy_dir(&text_cached.join("text_cache"), &again.join("text_cache"));
    ok(&centre(&again, &["--cache-text-embeddings"]));
    for run in [&text_cached, &again] {
        let (a, b) = (sd_train_log(&plain), sd_train_log(run));
        for ((s1, a), (s2, b)) in a.iter().zip(&b) {
            let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            assert!(
                s1 == s2 && (a - b).abs() <= 1e-5 * a.abs(),
                "step {s1}: {a} vs {b}"
            );
        }
    }
    let rewritten = again
        .join("text_cache")
        .join(entries[0].file_name().unwrap());
    assert!(std::fs::read(rewritten).unwrap() != b"damaged");
    let out = run(&dir.join("refused"), "1", &["--train-text-encoder"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("--train-text-encoder")
            && err.contains("SDXL")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cached_latents_and_text_embeddings_train_like_encoded_ones_and_a_damaged_entry_is_recomputed() {
    let dir = scratch("cache");
    let data = data(&dir);
    let model = common::tiny_model();
    let run = |output: &Path, steps: &str, extra: &[&str]| {
        let options = ["--resolution", "32", "--checkpoint-every", "2"];
        sd_train(
            "unet",
            &model,
            &data,
            output,
            steps,
            &[&options[..], extra].concat(),
        )
    };
    let plain = dir.join("plain");
    ok(&run(&plain, "4", &[]));
    let cached = dir.join("cached");
    let caches = ["--cache-latents", "--cache-text-embeddings"];
    ok(&run(&cached, "4", &caches));
    let entries = |dir: &Path| -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        found.sort();
        found
    };
    let latents = entries(&cached.join("latent_cache"));
    assert_eq!(latents.len(), 3, "one entry per image: {latents:?}");
    let texts = entries(&cached.join("text_cache"));
    assert_eq!(texts.len(), 3, "one entry per caption: {texts:?}");
    // The same losses as encoding every step (up to the batch's rounding).
    for ((s1, a), (s2, b)) in sd_train_log(&plain)
        .iter()
        .zip(sd_train_log(&cached).iter())
    {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!(
            s1 == s2 && (a - b).abs() <= 1e-5 * a.abs(),
            "step {s1}: {a} vs {b}"
        );
    }
    // A damaged entry of each cache is recomputed on resume, and the run ends where the
    // first one did.
    let resumed = dir.join("resumed");
    ok(&run(&resumed, "2", &caches));
    // (Every image is encoded before the first step; a caption's entry is read when the
    // caption is first met, so the text entries the last two steps do not meet stay as left.)
    let latent = entries(&resumed.join("latent_cache"))[0].clone();
    let texts = entries(&resumed.join("text_cache"));
    let damage = |entry: &Path| {
        let bytes = std::fs::read(entry).unwrap();
        std::fs::write(entry, &bytes[..bytes.len() / 3]).unwrap();
        bytes
    };
    let latent_bytes = damage(&latent);
    let text_bytes: Vec<Vec<u8>> = texts.iter().map(|t| damage(t)).collect();
    ok(&run(
        &resumed,
        "4",
        &[
            "--cache-latents",
            "--cache-text-embeddings",
            "--resume",
            "latest",
        ],
    ));
    assert_eq!(
        std::fs::read(&latent).unwrap(),
        latent_bytes,
        "the latent entry was not rewritten whole"
    );
    let mut rewritten = 0;
    for (entry, bytes) in texts.iter().zip(&text_bytes) {
        let now = std::fs::read(entry).unwrap();
        if now == *bytes {
            rewritten += 1;
        } else {
            assert_eq!(now.len(), bytes.len() / 3, "{} changed", entry.display());
        }
    }
    assert!(rewritten > 0, "no damaged text entry was rewritten");
    // The text encoder must be frozen for its outputs to be kept.
    let out = run(
        &dir.join("trained-text"),
        "1",
        &["--cache-text-embeddings", "--train-text-encoder"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cache-text-embeddings"), "{err}");
    let weights = "checkpoint-4/unet/diffusion_pytorch_model.safetensors";
    assert!(
        std::fs::read(cached.join(weights)).unwrap()
            == std::fs::read(resumed.join(weights)).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validation_prompts_render_through_the_inference_pipeline() {
    let dir = scratch("validation");
    let data = data(&dir);
    let output = dir.join("out");
    let extra = [
        "--validation-prompt",
        "a red circle",
        "--validation-every",
        "1",
        "--validation-steps",
        "1",
    ];
    ok(&train(&data, &output, 2, &extra));
    let first = std::fs::read(output.join("samples/step-1/00.png")).unwrap();
    let second = std::fs::read(output.join("samples/step-2/00.png")).unwrap();
    assert!(
        first != second,
        "the samples did not change as the model trained"
    );
    let prompts = std::fs::read_to_string(output.join("samples/step-2/prompts.txt")).unwrap();
    assert_eq!(prompts, "00.png\ta red circle\n");
    assert!(!output.join(".validation-model").exists());
    assert!(output.join("loss.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_checkpoints_the_step_and_the_resume_is_exact() {
    let dir = scratch("sigint");
    let data = data(&dir);
    let straight = dir.join("straight");
    ok(&train(&data, &straight, 6, &[]));
    let stopped = dir.join("stopped");
    let model = common::tiny_model();
    let child = Command::new(SD)
        .args(["train", "unet", "--data"])
        .arg(&data)
        .arg("--output")
        .arg(&stopped)
        .arg("--model")
        .arg(&model)
        .args([
            "--max-steps",
            "6",
            "--batch-size",
            "2",
            "--resolution",
            "32",
            "--checkpoint-every",
            "5",
            "--ema-decay",
            "0.99",
            "--learning-rate",
            "1e-3",
            "--random-flip",
            "--random-crop",
            "-q",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // The run finished before the signal: nothing to check but its result.
        eprintln!("the run ended before Ctrl-C arrived");
    } else {
        assert!(
            stderr.contains("stopped after step") && stderr.contains("--resume latest"),
            "{stderr}"
        );
        ok(&train(&data, &stopped, 6, &["--resume", "latest"]));
    }
    same_state(
        &straight.join("checkpoint-6"),
        &stopped.join("checkpoint-6"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn aspect_ratio_buckets_train_resume_exactly_and_cache_their_latents() {
    let dir = scratch("buckets");
    let data = data(&dir);
    let buckets = [
        "--enable-bucket",
        "--min-bucket-reso",
        "16",
        "--max-bucket-reso",
        "64",
        "--bucket-reso-steps",
        "8",
    ];
    let straight = dir.join("straight");
    ok(&train(&data, &straight, 4, &buckets));
    let resumed = dir.join("resumed");
    ok(&train(&data, &resumed, 2, &buckets));
    let mut again = buckets.to_vec();
    again.extend(["--resume", "latest"]);
    ok(&train(&data, &resumed, 4, &again));
    same_state(
        &straight.join("checkpoint-4"),
        &resumed.join("checkpoint-4"),
    );
    let config = std::fs::read_to_string(straight.join("train_config.json")).unwrap();
    assert!(config.contains("\"step\": 8"), "{config}");
    // With the latent cache each image is encoded once at its bucket's size, and the run
    // has the losses of one that encodes every step (centre crops, no flips: the cache's
    // condition).
    let settings = ["--learning-rate", "1e-3"];
    let plain = dir.join("plain");
    ok(&train_with(&data, &plain, 4, &settings, &buckets));
    let mut cached_args = buckets.to_vec();
    cached_args.push("--cache-latents");
    let cached = dir.join("cached");
    ok(&train_with(&data, &cached, 4, &settings, &cached_args));
    let mut shapes: Vec<String> = std::fs::read_dir(cached.join("latent_cache"))
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            // `{hash}-{w}x{h}-from-{rw}x{rh}-centre-{vae}.safetensors`
            name.split('-').nth(1).unwrap().to_string()
        })
        .collect();
    assert_eq!(shapes.len(), 3, "one entry per image: {shapes:?}");
    shapes.sort();
    shapes.dedup();
    assert!(shapes.len() > 1, "the images share one bucket: {shapes:?}");
    let (a, b) = (sd_train_log(&plain), sd_train_log(&cached));
    assert_eq!(a.len(), 4);
    for ((s1, a), (s2, b)) in a.iter().zip(&b) {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!(
            s1 == s2 && (a - b).abs() <= 1e-5 * a.abs(),
            "step {s1}: {a} vs {b}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--mixed-precision bf16|f16`: resumed runs end bit-identical to straight ones, the config
/// records the precision, the weights stay f32 on disk, and the first losses stay within the
/// low precision's rounding of the f32 run's (and differ from them: the passes did run in it).
/// Under f16 a first loss scale of 2²⁰ overflows: those steps are skipped (logged so, the scale
/// halved each time) until the scale fits, and the checkpoint keeps the scaler's state.
#[test]
fn mixed_precision_trains_resumes_exactly_and_keeps_f32_weights() {
    let dir = scratch("mixed");
    let data = data(&dir);
    let full = dir.join("f32");
    ok(&train(&data, &full, 4, &[]));
    let toml = dir.join("scaler.toml");
    std::fs::write(
        &toml,
        "[grad_scaler]\ninit_scale = 1048576.0\ngrowth_interval = 2\n",
    )
    .unwrap();
    for precision in ["bf16", "f16"] {
        let mut flags = vec!["--mixed-precision", precision];
        if precision == "f16" {
            flags.extend(["--config", toml.to_str().unwrap()]);
        }
        let straight = dir.join(format!("{precision}-straight"));
        ok(&train(&data, &straight, 8, &flags));
        let resumed = dir.join(format!("{precision}-resumed"));
        ok(&train(&data, &resumed, 3, &flags));
        flags.extend(["--resume", "latest"]);
        ok(&train(&data, &resumed, 8, &flags));
        same_state(
            &straight.join("checkpoint-8"),
            &resumed.join("checkpoint-8"),
        );
        let config = std::fs::read_to_string(straight.join("train_config.json")).unwrap();
        assert!(
            config.contains(&format!("\"mixed_precision\": \"{precision}\"")),
            "{config}"
        );
        let weights = straight.join("checkpoint-8/unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(
            file.tensors()
                .iter()
                .all(|(_, t)| t.dtype() == safetensors::Dtype::F32),
            "{}: not all f32",
            weights.display()
        );
        let (a, b) = (sd_train_log(&full), sd_train_log(&straight));
        // The first step's loss (same weights on both sides).
        let (a, b): (f64, f64) = (a[0].1.parse().unwrap(), b[0].1.parse().unwrap());
        assert!(
            (a - b).abs() <= 2e-2 * a.abs() && a != b,
            "{precision}: first loss f32 {a} vs {b}"
        );
        if precision == "f16" {
            let log: Vec<serde_json::Value> =
                std::fs::read_to_string(straight.join("train_log.jsonl"))
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            let skipped: Vec<bool> = log.iter().map(|v| v["skipped"] == true).collect();
            let scales: Vec<f64> = log
                .iter()
                .map(|v| v["loss_scale"].as_f64().unwrap())
                .collect();
            assert!(skipped[0], "2^20 did not overflow: {log:?}");
            assert!(skipped.contains(&false), "every step skipped: {log:?}");
            for (i, pair) in scales.windows(2).enumerate() {
                let expected = if skipped[i] { pair[0] / 2.0 } else { pair[1] };
                assert_eq!(pair[1], expected, "step {}: scales {scales:?}", i + 2);
            }
            let state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(straight.join("checkpoint-8/training_state.json"))
                    .unwrap(),
            )
            .unwrap();
            let kept = &state["grad_scaler"];
            assert_eq!(
                kept["skipped_steps"].as_u64().unwrap() as usize,
                skipped.iter().filter(|&&s| s).count(),
                "{state}"
            );
            let resumed_state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(resumed.join("checkpoint-8/training_state.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(kept, &resumed_state["grad_scaler"]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every tensor of a safetensors file, by name, as bytes (the header's metadata is written
/// from a hash map, in no fixed order).
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect();
    all.sort();
    all
}

/// `sd train unet --lora-rank` on the tiny model with the text encoder's LoRA too.
fn train_lora(data: &Path, output: &Path, steps: u64, extra: &[&str]) -> Output {
    let settings = [
        "--learning-rate",
        "1e-2",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "2",
        "--train-text-encoder",
        "--random-flip",
    ];
    train_with(data, output, steps, &settings, extra)
}

#[test]
fn lora_training_resumes_exactly_and_its_file_loads_in_generate() {
    let dir = scratch("lora");
    let data = data(&dir);
    let straight = dir.join("straight");
    ok(&train_lora(&data, &straight, 4, &[]));
    let resumed = dir.join("resumed");
    ok(&train_lora(&data, &resumed, 2, &[]));
    ok(&train_lora(&data, &resumed, 4, &["--resume", "latest"]));
    // A LoRA checkpoint holds the factors and moments alone, never a copy of the model.
    let state = [
        "lora_unet.safetensors",
        "lora_text_encoder.safetensors",
        "optimizer/lora_unet_exp_avg.safetensors",
        "optimizer/lora_unet_exp_avg_sq.safetensors",
        "optimizer/lora_text_encoder_exp_avg.safetensors",
        "optimizer/lora_text_encoder_exp_avg_sq.safetensors",
    ];
    for file in state {
        assert!(
            tensors(&straight.join("checkpoint-4").join(file))
                == tensors(&resumed.join("checkpoint-4").join(file)),
            "{file} differs after resume"
        );
    }
    assert!(!straight.join("checkpoint-4/unet").exists());
    let lora = straight.join("lora.safetensors");
    let file = sd_lora::LoraFile::open(&lora).unwrap();
    assert_eq!(file.format, sd_lora::LoraFormat::Kohya);
    assert_eq!(
        file.components(),
        vec![sd_lora::Component::Unet, sd_lora::Component::TextEncoder]
    );
    assert!(file.layers.iter().all(|l| l.alpha == Some(2.0)));
    assert!(tensors(&lora) == tensors(&resumed.join("lora.safetensors")));
    // The tiny model is SD 1.x-shaped: its checkpoint holds proj_in/proj_out as 1×1
    // convolutions, so their factors are 4-D as kohya and PEFT write them (diffusers'
    // load_lora_weights refuses 2-D ones; tests/roundtrip_parity.rs loads ours there).
    let proj: Vec<_> = file
        .layers
        .iter()
        .filter(|l| l.key.contains("proj_in") || l.key.contains("proj_out"))
        .collect();
    assert!(!proj.is_empty());
    for layer in proj {
        assert_eq!(
            layer.down.shape.len(),
            4,
            "{}: {:?}",
            layer.key,
            layer.down.shape
        );
        assert_eq!(
            layer.up.shape.len(),
            4,
            "{}: {:?}",
            layer.key,
            layer.up.shape
        );
    }

    // The file loads in `sd generate --lora`, and changes the image.
    let model = common::tiny_model();
    let render = |name: &str, lora: Option<&Path>| {
        let out = dir.join(name);
        let mut args = vec![
            "generate".to_string(),
            "a red circle".into(),
            "--model".into(),
            model.display().to_string(),
            "--steps".into(),
            "2".into(),
            "--seed".into(),
            "1".into(),
            "-o".into(),
            out.display().to_string(),
            "-q".into(),
        ];
        if let Some(lora) = lora {
            args.extend(["--lora".into(), lora.display().to_string()]);
        }
        let run = Command::new(SD).args(&args).output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    assert!(
        render("with.png", Some(&lora)) != render("without.png", None),
        "the trained LoRA changes nothing"
    );

    // diffusers' layout on request, U-Net only with diffusers' targets.
    let diffusers = dir.join("diffusers");
    let one = [
        "--lora-format",
        "diffusers",
        "--lora-targets",
        "diffusers",
        "--lora-init",
        "gaussian",
        "--validation-prompt",
        "a red circle",
        "--validation-steps",
        "1",
    ];
    ok(&train_lora(&data, &diffusers, 1, &one));
    let file = sd_lora::LoraFile::open(diffusers.join("pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(file.format, sd_lora::LoraFormat::Diffusers);
    assert!(file.layers.iter().all(|l| {
        let m = l.module.as_str();
        [
            "to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj",
        ]
        .iter()
        .any(|t| m.ends_with(t))
    }));
    assert!(diffusers.join("samples/step-1/00.png").is_file());
    assert!(!diffusers.join(".validation-lora.safetensors").exists());

    // Settings that do not go with a LoRA are one line each.
    let out = train_lora(&data, &dir.join("bad"), 1, &["--ema-decay", "0.9"]);
    one_line_error(&out, &["--ema-decay", "--lora-rank"]);
    let out = train_lora(
        &data,
        &dir.join("bad2"),
        1,
        &["--lora-targets", "nothing_here"],
    );
    one_line_error(&out, &["--lora-targets nothing_here", "matches"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_text_encoder_trains_at_its_own_learning_rate() {
    let dir = scratch("text-lr");
    let data = data(&dir);
    let settings = ["--learning-rate", "1e-3", "--train-text-encoder"];
    let run = |name: &str, steps: u64, extra: &[&str]| -> PathBuf {
        let output = dir.join(name);
        ok(&train_with(&data, &output, steps, &settings, extra));
        output
    };
    let text = |run: &Path, step: u64| {
        tensors(&run.join(format!("checkpoint-{step}/text_encoder/model.safetensors")))
    };
    let unet = |run: &Path, step: u64| {
        tensors(&run.join(format!(
            "checkpoint-{step}/unet/diffusion_pytorch_model.safetensors"
        )))
    };
    // The same rate as the U-Net's is the default's run, to the bit.
    let default = run("default", 2, &[]);
    let same = run("same", 2, &["--text-encoder-lr", "1e-3"]);
    assert!(text(&default, 2) == text(&same, 2));
    // At rate 0 the text encoder stays as it was from step to step while the U-Net trains.
    let frozen = run("frozen", 4, &["--text-encoder-lr", "0"]);
    assert!(text(&frozen, 2) == text(&frozen, 4));
    assert!(unet(&frozen, 2) != unet(&frozen, 4));
    assert!(text(&default, 2) != text(&frozen, 2));
    let out = train_with(
        &data,
        &dir.join("bad"),
        1,
        &settings,
        &["--text-encoder-lr", "2"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--text-encoder-lr must be in [0, 1)"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_timestep_range_is_kohyas_and_checked() {
    let dir = scratch("timesteps");
    let data = data(&dir);
    let run = |name: &str, extra: &[&str]| two_step_losses(&dir.join(name), &data, extra);
    // The whole range given explicitly draws the default's timesteps: the same losses.
    let default = run("default", &[]);
    let explicit = run(
        "explicit",
        &["--min-timestep", "0", "--max-timestep", "1000"],
    );
    assert_eq!(default, explicit);
    // Only the last timestep (pure noise under this schedule's terminal SNR) is another loss.
    let last = run("last", &["--min-timestep", "999"]);
    assert_ne!(default, last);
    one_line_error(
        &train(&data, &dir.join("bad"), 1, &["--max-timestep", "2000"]),
        &["--max-timestep 2000", "num_train_timesteps"],
    );
    one_line_error(
        &train(
            &data,
            &dir.join("bad"),
            1,
            &["--min-timestep", "20", "--max-timestep", "10"],
        ),
        &["--max-timestep (10) must be more than --min-timestep (20)"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--summary-dropout` swaps captions' end-of-text and padding outputs for the empty
/// caption's: at 0 the run is the default's to the bit, at 1 it trains on other conditioning,
/// through a trained text encoder as through cached embeddings; a bad value is one line.
#[test]
fn summary_dropout_changes_only_what_it_drops() {
    let dir = scratch("summary-dropout");
    let data = data(&dir);
    let run = |name: &str, extra: &[&str]| two_step_losses(&dir.join(name), &data, extra);
    let default = run("default", &[]);
    assert_eq!(default, run("zero", &["--summary-dropout", "0"]));
    assert_ne!(default, run("one", &["--summary-dropout", "1"]));
    let text = ["--train-text-encoder", "--summary-dropout", "1"];
    assert_ne!(run("text", &text[..1]), run("text-dropped", &text));
    let cached = ["--cache-text-embeddings", "--summary-dropout", "1"];
    assert_ne!(run("cached", &cached[..1]), run("cached-dropped", &cached));
    one_line_error(
        &train(&data, &dir.join("bad"), 1, &["--summary-dropout", "1.5"]),
        &["--summary-dropout must be in [0, 1], got 1.5"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
