//! `cargo xtask train-shapes`: the shapes model, trained from scratch by the project's own
//! commands only, every stage resumable (re-running the command continues where it stopped):
//!
//! 1. `sd dataset shapes` writes the captioned images;
//! 2. `sd train vae` trains the autoencoder from `xtask/shapes/init/vae/config.json` and fits
//!    its scaling factor;
//! 3. the model folder is assembled: the init configs, the standard CLIP tokenizer files, the
//!    trained `vae/` (the U-Net and text encoder have configs only, so they start random);
//! 4. `sd train unet --train-text-encoder --cache-latents` trains both on the images (one
//!    cosine cycle from lr 5e-4);
//! 5. a second cosine cycle (a warm restart, Loshchilov & Hutter 2017) from lr 3e-4 fine-tunes
//!    the first's result in f16, the form it was committed in after the first cycle (the
//!    second cycle was added in a later session, starting from the committed model);
//! 6. `sd train vae --decoder-only` fine-tunes the VAE's decoder on the same images, the
//!    encoder frozen so that the latents the U-Net learnt stay as they were (how Stability made
//!    the ft-MSE decoder for SD 1.x): the first VAE's blurred, colour-fringed edges were what
//!    kept every image from passing the checker;
//! 7. `sd convert --dtype f16` writes the second cycle's folder with that decoder to
//!    `crates/sd-shapes/model/`, where the `sd` binary embeds it as the default model, with
//!    every stage's configs, logs and loss plots.
//!
//! The run folder (default `target/shapes-run`, outside the repository's tracked files) keeps
//! every checkpoint; the trained model ends in `RUN/model2`. Settings are in this file, so the
//! command is the whole recipe.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{flag, root, run};

/// The recipe's numbers (the step counts can be overridden to try a shorter run).
struct Recipe {
    images: u64,
    vae_steps: u64,
    unet_steps: u64,
    refine_steps: u64,
    decoder_steps: u64,
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
        refine_steps: number("--refine-steps", 1500)?,
        decoder_steps: number("--decoder-steps", 1000)?,
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
    run(&mut train_unet(
        &root,
        &model,
        &data,
        &unet,
        Cycle::FIRST,
        recipe.unet_steps,
    ))?;

    // The first cycle's model as the second starts from it: in f16.
    let half = run_dir.join("unet-f16");
    if !half.join("unet/config.json").is_file() {
        let _ = std::fs::remove_dir_all(&half);
        run(sd(&root)
            .arg("convert")
            .arg(&unet)
            .arg(&half)
            .args(["--dtype", "f16"]))?;
    }
    let unet2 = run_dir.join("unet2");
    run(&mut train_unet(
        &root,
        &half,
        &data,
        &unet2,
        Cycle::SECOND,
        recipe.refine_steps,
    ))?;

    let vae2 = run_dir.join("vae2");
    if !vae2.join("vae/config.json").is_file() {
        run(sd(&root)
            .args(["train", "vae", "--decoder-only", "--model"])
            .arg(&unet2)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&vae2)
            .args([
                "--resolution",
                "64",
                "--batch-size",
                "16",
                "--learning-rate",
                "2e-4",
                "--lr-scheduler",
                "cosine",
                "--lr-warmup-steps",
                "20",
            ])
            .args(["--seed", "2", "--checkpoint-every", "100", "--keep", "2"])
            .args(["--resume", "latest", "--max-steps"])
            .arg(recipe.decoder_steps.to_string()))?;
    }
    let model2 = run_dir.join("model2");
    let _ = std::fs::remove_dir_all(&model2);
    for part in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
    ] {
        let from = unet2.join(part);
        if from.is_dir() {
            copy_dir(&from, &model2.join(part))?;
        } else {
            std::fs::create_dir_all(&model2).map_err(|e| e.to_string())?;
            std::fs::copy(&from, model2.join(part)).map_err(|e| format!("{part}: {e}"))?;
        }
    }
    copy_dir(&vae2.join("vae"), &model2.join("vae"))?;

    // 7. The built-in model: the trained folder in f16 where `sd-shapes` embeds it, with each
    //    stage's resolved config, log and loss plot beside it.
    let built_in = root.join("crates/sd-shapes/model");
    let _ = std::fs::remove_dir_all(&built_in);
    run(sd(&root)
        .arg("convert")
        .arg(&model2)
        .arg(&built_in)
        .args(["--dtype", "f16"]))?;
    for (stage, dir) in [
        ("vae", &vae),
        ("unet", &unet),
        ("unet2", &unet2),
        ("vae2", &vae2),
    ] {
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

/// One cosine cycle of U-Net (and text encoder) training.
struct Cycle {
    learning_rate: &'static str,
    warmup: &'static str,
    ema_decay: &'static str,
    seed: &'static str,
    /// `--init` (random weights from the folder's configs) or `--model` (fine-tune it).
    from_scratch: bool,
}

impl Cycle {
    const FIRST: Self = Self {
        learning_rate: "5e-4",
        warmup: "100",
        ema_decay: "0.995",
        seed: "0",
        from_scratch: true,
    };
    const SECOND: Self = Self {
        learning_rate: "3e-4",
        warmup: "50",
        ema_decay: "0.998",
        seed: "1",
        from_scratch: false,
    };
}

fn train_unet(
    root: &Path,
    model: &Path,
    data: &Path,
    output: &Path,
    cycle: Cycle,
    steps: u64,
) -> Command {
    let mut cmd = sd(root);
    cmd.args(["train", "unet"])
        .arg(if cycle.from_scratch {
            "--init"
        } else {
            "--model"
        })
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(output)
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
            cycle.learning_rate,
            "--lr-scheduler",
            "cosine",
        ])
        .args([
            "--lr-warmup-steps",
            cycle.warmup,
            "--caption-dropout",
            "0.1",
            "--ema-decay",
            cycle.ema_decay,
        ])
        .args([
            "--seed",
            cycle.seed,
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
        .arg(steps.to_string());
    cmd
}
