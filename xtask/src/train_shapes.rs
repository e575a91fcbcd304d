//! `cargo xtask train-shapes`: the shapes model, trained from scratch by the project's own
//! commands only, every stage resumable (re-running the command continues where it stopped):
//!
//! 1. `sd dataset shapes` writes the captioned images;
//! 2. `sd train vae` trains the autoencoder from `xtask/shapes/init/vae/config.json` and fits
//!    its scaling factor;
//! 3. the model folder is assembled: the init configs, the standard CLIP tokenizer files, the
//!    trained `vae/` (the U-Net and text encoder have configs only, so they start random);
//! 4. `sd train unet --train-text-encoder --cache-latents` trains both on the images;
//! 5. `sd convert --dtype f16` writes the result to `crates/sd-shapes/model/`, where the `sd`
//!    binary embeds it as the default model, with both stages' configs, logs and loss plots.
//!
//! The run folder (default `target/shapes-run`, outside the repository's tracked files) keeps
//! every checkpoint; the trained model ends in `RUN/unet`. Settings are in this file, so the
//! command is the whole recipe.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{flag, root, run};

/// The recipe's numbers (the step counts can be overridden to try a shorter run).
struct Recipe {
    images: u64,
    vae_steps: u64,
    unet_steps: u64,
}

fn sd(root: &Path) -> Command {
    Command::new(root.join("target/release/sd"))
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .map_err(|e| format!("{}: {e}", target.display()))?;
        }
    }
    Ok(())
}

pub fn train_shapes(args: &[String]) -> Result<(), String> {
    let root = root();
    let run_dir = flag(args, "--run-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/shapes-run"));
    let number = |name: &str, default: u64| -> Result<u64, String> {
        flag(args, name).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("{name}: {e}"))
        })
    };
    let recipe = Recipe {
        images: number("--images", 20_000)?,
        vae_steps: number("--vae-steps", 700)?,
        unet_steps: number("--unet-steps", 1100)?,
    };
    // A release build: the dev profile leaves the workspace's own crates (the training
    // convolutions, the latent cache) unoptimised, which made a U-Net step 1.3x and the VAE
    // step and latent caching 2-9x slower on the 2-core machine.
    run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "sd-cli",
    ]))?;
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let init = root.join("xtask/shapes/init");

    let data = run_dir.join("data");
    if !data.join("done").is_file() {
        let _ = std::fs::remove_dir_all(&data);
        run(sd(&root)
            .args(["dataset", "shapes", "--seed", "0", "--count"])
            .arg(recipe.images.to_string())
            .arg("--out")
            .arg(&data))?;
        std::fs::write(data.join("done"), "").map_err(|e| e.to_string())?;
    }

    let vae = run_dir.join("vae");
    if !vae.join("vae/config.json").is_file() {
        run(sd(&root)
            .args(["train", "vae", "--init"])
            .arg(&init)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&vae)
            .args([
                "--resolution",
                "64",
                "--batch-size",
                "16",
                "--learning-rate",
                "5e-4",
            ])
            .args(["--kl-weight", "1e-6", "--fit-scaling-factor", "--seed", "0"])
            .args([
                "--checkpoint-every",
                "100",
                "--keep",
                "2",
                "--resume",
                "latest",
            ])
            .arg("--max-steps")
            .arg(recipe.vae_steps.to_string()))?;
    }

    let model = run_dir.join("model");
    if !model
        .join("vae/diffusion_pytorch_model.safetensors")
        .is_file()
    {
        let _ = std::fs::remove_dir_all(&model);
        copy_dir(&init, &model)?;
        let vocab = root.join("crates/sd-conditioner/vocab");
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(vocab.join(file), model.join("tokenizer").join(file))
                .map_err(|e| format!("{file}: {e}"))?;
        }
        std::fs::remove_dir_all(model.join("vae")).map_err(|e| e.to_string())?;
        copy_dir(&vae.join("vae"), &model.join("vae"))?;
    }

    let unet = run_dir.join("unet");
    let mut cmd = sd(&root);
    cmd.args(["train", "unet", "--init"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&unet)
        .args([
            "--train-text-encoder",
            "--cache-latents",
            "--resolution",
            "64",
        ])
        .args([
            "--batch-size",
            "32",
            "--learning-rate",
            "5e-4",
            "--lr-scheduler",
            "cosine",
        ])
        .args([
            "--lr-warmup-steps",
            "100",
            "--caption-dropout",
            "0.1",
            "--ema-decay",
            "0.995",
        ])
        .args([
            "--seed",
            "0",
            "--checkpoint-every",
            "100",
            "--keep",
            "2",
            "--resume",
            "latest",
        ])
        .args(["--validation-every", "1000", "--validation-steps", "20"])
        .args(["--validation-prompt", "a red circle above a blue square"])
        .args(["--validation-prompt", "a yellow circle"])
        .args([
            "--validation-prompt",
            "a purple triangle to the left of a green square",
        ])
        .arg("--max-steps")
        .arg(recipe.unet_steps.to_string());
    run(&mut cmd)?;

    // 5. The built-in model: the trained folder in f16 where `sd-shapes` embeds it, with each
    //    stage's resolved config, log and loss plot beside it.
    let built_in = root.join("crates/sd-shapes/model");
    let _ = std::fs::remove_dir_all(&built_in);
    run(sd(&root)
        .arg("convert")
        .arg(&unet)
        .arg(&built_in)
        .args(["--dtype", "f16"]))?;
    for (stage, dir) in [("vae", &vae), ("unet", &unet)] {
        let records = built_in.join("training").join(stage);
        std::fs::create_dir_all(&records).map_err(|e| format!("{}: {e}", records.display()))?;
        for file in ["train_config.json", "train_log.jsonl", "loss.png"] {
            std::fs::copy(dir.join(file), records.join(file))
                .map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
        }
    }
    println!(
        "the shapes model is {}; rebuild sd-cli to embed it",
        built_in.display()
    );
    Ok(())
}
