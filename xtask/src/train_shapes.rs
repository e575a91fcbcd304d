//! `cargo xtask train-shapes`: the shapes model, trained from scratch by the project's own
//! commands only, every stage resumable (re-running the command continues where it stopped):
//!
//! 1. `sd dataset shapes` writes the captioned images;
//! 2. `sd train vae` trains the autoencoder from `xtask/shapes/init/vae/config.json` and fits
//!    its scaling factor;
//! 3. `sd train vae --decoder-only` fine-tunes its decoder, the encoder (and so the latents)
//!    frozen, as Stability made the ft-MSE decoder for SD 1.x: the first stage's own
//!    reconstructions had blurred, colour-fringed edges;
//! 4. the model folder is assembled: the init configs, the standard CLIP tokenizer files, the
//!    trained `vae/` (the U-Net and text encoder have configs only, so they start random);
//! 5. `sd train unet --train-text-encoder --cache-latents` trains both on the images, one
//!    cosine cycle. The scheduler config makes it a v-prediction model on a zero-terminal-SNR
//!    schedule (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
//!    flawed"): with Stable Diffusion's schedule the last timestep keeps √ᾱ = 0.068 of the
//!    image, enough on a 16×16 latent for the model to read the white background's mean and
//!    the objects' places from the noise it is given; pure noise at inference then showed it
//!    objects that were not there (the first committed model drew stray blobs and mixed
//!    colours). Inference starts at that last timestep ("trailing" spacing);
//! 6. word order, which stage 5 does not learn (it draws `a red circle below a blue square`
//!    and `a red circle above a blue square` alike: docs/shapes.md, "Why the order is not
//!    learnt"): the product of relation and order (`below` flips which object named is on
//!    top) is what it cannot learn, and with **canonical captions** (`sd dataset shapes
//!    --canonical`: the same images, every two-object caption with `above` or `to the left
//!    of`, the top or left object named first) it is learnt. So both are fine-tuned on
//!    canonical captions at timesteps 900-999 only, where the layout is decided
//!    (`--min-timestep 900`);
//! 7. the same at every timestep, one cosine cycle, so that the details are drawn again;
//! 8. the text encoder alone (the U-Net's learning rate 0) on the captions as drawn: the U-Net
//!    now places objects by a canonical caption's order, and the encoder learns to say `b
//!    below a` as it says `a above b`;
//! 9. the U-Net alone (the text encoder frozen, its outputs cached) on the captions as drawn,
//!    two cosine cycles at a lower rate, each a run from the one before: the shapes, now that
//!    the conditioning says which object goes where;
//! 10. the same U-Net cycles on the images again with more after them, in colours outside the
//!     palette (`sd dataset shapes --extra-colours`: teal, pink, brown, black and grey, every
//!     shape in each, the held-out combinations still left out): a colour word that met only
//!     some shapes is what makes the model draw a green triangle as a green circle, and the
//!     extra colours show every shape in more colours (docs/shapes.md, "Extra colours in the
//!     dataset"). Run after stage 9, not in every stage: the whole recipe on them (2026-12-08,
//!     M1) learnt green triangles and lost yellow circles;
//! 11. `sd convert --dtype f16` writes the result to `crates/sd-shapes/model/`, where the `sd`
//!     binary embeds it as the default model, with every stage's configs, logs and loss plots.
//!
//! `--extra-colours N` (default 10,000) is how many extra-colour images stage 10 adds, and
//! `--extra-colour-cycles` (default 5) its cycles.
//!
//! `--vae DIR` takes a VAE folder trained by stages 2-3 of an earlier run (its `config.json`
//! and weights) instead of running them again: the U-Net stage is the one that changes most
//! between runs, and the VAE stages take about an hour of the 2.5 h budget.
//!
//! The run folder (default `target/shapes-run`, outside the repository's tracked files) keeps
//! every checkpoint. Settings are in this file, so the command is the whole recipe.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{flag, root, run};

/// The recipe's numbers (the step counts can be overridden to try a shorter run).
struct Recipe {
    images: u64,
    extra_colour_images: u64,
    extra_colour_cycles: u64,
    vae_steps: u64,
    decoder_steps: u64,
    unet_steps: u64,
    high_noise_steps: u64,
    canonical_steps: u64,
    text_encoder_steps: u64,
    as_drawn_steps: u64,
    as_drawn_cycles: u64,
}

/// The recipe's numbers from the command line, the defaults where a flag is not given.
fn recipe(args: &[String]) -> Result<Recipe, String> {
    let number = |name: &str, default: u64| -> Result<u64, String> {
        flag(args, name).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("{name}: {e}"))
        })
    };
    Ok(Recipe {
        images: number("--images", 20_000)?,
        extra_colour_images: number("--extra-colours", 10_000)?,
        extra_colour_cycles: number("--extra-colour-cycles", 5)?,
        vae_steps: number("--vae-steps", 700)?,
        decoder_steps: number("--decoder-steps", 1000)?,
        unet_steps: number("--unet-steps", 3100)?,
        high_noise_steps: number("--high-noise-steps", 600)?,
        canonical_steps: number("--canonical-steps", 600)?,
        text_encoder_steps: number("--text-encoder-steps", 800)?,
        as_drawn_steps: number("--as-drawn-steps", 1000)?,
        as_drawn_cycles: number("--as-drawn-cycles", 2)?,
    })
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
    let recipe = recipe(args)?;
    let trained_vae = flag(args, "--vae").map(PathBuf::from);
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

    // The images three times: as drawn, (the same images) with canonical captions, and as drawn
    // with the extra-colour ones after them.
    let data = run_dir.join("data");
    let canonical_data = run_dir.join("data-canonical");
    let extra_data = run_dir.join("data-extra-colours");
    for (folder, canonical, extra) in [
        (&data, false, 0),
        (&canonical_data, true, 0),
        (&extra_data, false, recipe.extra_colour_images),
    ] {
        if !folder.join("done").is_file() {
            let _ = std::fs::remove_dir_all(folder);
            let mut cmd = sd(&root);
            cmd.args(["dataset", "shapes", "--seed", "0", "--count"])
                .arg(recipe.images.to_string())
                .arg("--extra-colours")
                .arg(extra.to_string())
                .arg("--out")
                .arg(folder);
            if canonical {
                cmd.arg("--canonical");
            }
            run(&mut cmd)?;
            std::fs::write(folder.join("done"), "").map_err(|e| e.to_string())?;
        }
    }

    // Stages 2 and 3: the VAE, or the one given.
    let (vae, vae2) = (run_dir.join("vae"), run_dir.join("vae2"));
    let vae_folder = match &trained_vae {
        Some(dir) => dir.clone(),
        None => {
            if !vae.join("vae/config.json").is_file() {
                run(sd(&root)
                    .args(["train", "vae", "--init"])
                    .arg(&init)
                    .arg("--data")
                    .arg(&data)
                    .arg("--output")
                    .arg(&vae)
                    .args(["--resolution", "64", "--batch-size", "16"])
                    .args(["--learning-rate", "5e-4", "--kl-weight", "1e-6"])
                    .args(["--fit-scaling-factor", "--seed", "0"])
                    .args(["--checkpoint-every", "100", "--keep", "2"])
                    .args(["--resume", "latest", "--max-steps"])
                    .arg(recipe.vae_steps.to_string()))?;
            }
            if !vae2.join("vae/config.json").is_file() {
                run(sd(&root)
                    .args(["train", "vae", "--decoder-only", "--model"])
                    .arg(&vae)
                    .arg("--data")
                    .arg(&data)
                    .arg("--output")
                    .arg(&vae2)
                    .args(["--resolution", "64", "--batch-size", "16"])
                    .args(["--learning-rate", "2e-4", "--lr-scheduler", "cosine"])
                    .args(["--lr-warmup-steps", "20", "--seed", "2"])
                    .args(["--checkpoint-every", "100", "--keep", "2"])
                    .args(["--resume", "latest", "--max-steps"])
                    .arg(recipe.decoder_steps.to_string()))?;
            }
            vae2.join("vae")
        }
    };

    // Stage 4: the folder the U-Net stage starts from.
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
        copy_dir(&vae_folder, &model.join("vae"))?;
    }

    // Stage 5: from random weights, on the captions as drawn.
    let unet = run_dir.join("unet");
    run(&mut train_unet(
        &root,
        &model,
        &data,
        &unet,
        recipe.unet_steps,
    ))?;

    // Stages 6-10.
    let mut stages = vec![("unet".to_string(), unet.clone())];
    let folders = DataFolders {
        data: &data,
        canonical: &canonical_data,
        extra_colours: &extra_data,
    };
    for (name, output, mut cmd) in later_stages(&root, &recipe, &unet, &folders, &run_dir) {
        run(&mut cmd)?;
        stages.push((name, output));
    }
    let last = stages.last().expect("stage 5 is there").1.clone();

    // Stage 11: the built-in model, the trained folder in f16 where `sd-shapes` embeds it, with
    // each stage's resolved config, log and loss plot beside it.
    let built_in = root.join("crates/sd-shapes/model");
    let _ = std::fs::remove_dir_all(&built_in);
    run(sd(&root)
        .arg("convert")
        .arg(&last)
        .arg(&built_in)
        .args(["--dtype", "f16"]))?;
    if trained_vae.is_none() {
        stages.extend([("vae".to_string(), vae), ("vae2".to_string(), vae2)]);
    }
    for (stage, dir) in stages {
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

/// The U-Net and text encoder, from scratch: one cosine cycle from lr 5e-4, the EMA weights
/// kept as the result.
fn train_unet(root: &Path, model: &Path, data: &Path, output: &Path, steps: u64) -> Command {
    let mut cmd = sd(root);
    cmd.args(["train", "unet", "--init"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(output)
        .args(["--train-text-encoder", "--cache-latents"])
        .args(["--resolution", "64", "--batch-size", "32"])
        .args(["--learning-rate", "5e-4", "--lr-scheduler", "cosine"])
        .args(["--lr-warmup-steps", "100", "--caption-dropout", "0.1"])
        .args(["--ema-decay", "0.999", "--seed", "0"])
        .args([
            "--checkpoint-every",
            "100",
            "--keep",
            "2",
            "--resume",
            "latest",
        ])
        .args(["--validation-every", "500", "--validation-steps", "20"])
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

/// The data folders the stages after stage 5 train on.
struct DataFolders<'a> {
    /// The images with their captions as drawn.
    data: &'a Path,
    /// The same images, every two-object caption with `above` or `to the left of`.
    canonical: &'a Path,
    /// The images as drawn, then the extra-colour ones.
    extra_colours: &'a Path,
}

/// Stages 6-10, each a run from the one before (the first from stage 5's folder `unet`): its
/// name in `training/`, its output folder and the command.
fn later_stages(
    root: &Path,
    recipe: &Recipe,
    unet: &Path,
    folders: &DataFolders,
    run_dir: &Path,
) -> Vec<(String, PathBuf, Command)> {
    let mut stages = Vec::new();
    let mut previous = unet.to_path_buf();
    let mut add = |name: String, data: &Path, steps: u64, configure: &dyn Fn(&mut Command)| {
        let output = run_dir.join(&name);
        let mut cmd = fine_tune(root, &previous, data, &output);
        configure(&mut cmd);
        cmd.arg("--max-steps").arg(steps.to_string());
        previous = output.clone();
        stages.push((name, output, cmd));
    };
    // Stage 6: word order, at high noise on canonical captions.
    add(
        "high-noise".into(),
        folders.canonical,
        recipe.high_noise_steps,
        &|cmd| {
            cmd.arg("--train-text-encoder")
                .args(["--learning-rate", "2e-4"])
                .args(["--lr-scheduler", "constant_with_warmup"])
                .args(["--caption-dropout", "0.1", "--min-timestep", "900"]);
        },
    );
    // Stage 7: the same at every timestep.
    add(
        "canonical".into(),
        folders.canonical,
        recipe.canonical_steps,
        &|cmd| {
            cmd.arg("--train-text-encoder")
                .args(["--learning-rate", "2e-4", "--lr-scheduler", "cosine"])
                .args(["--caption-dropout", "0.1"]);
        },
    );
    // Stage 8: the text encoder alone. The U-Net's rate 0 keeps it as it is (AdamW's decay is
    // scaled by the rate too); no caption dropout, as the empty caption has no order to learn.
    add(
        "text-encoder".into(),
        folders.data,
        recipe.text_encoder_steps,
        &|cmd| {
            cmd.arg("--train-text-encoder")
                .args(["--learning-rate", "0", "--text-encoder-lr", "5e-4"])
                .args(["--lr-scheduler", "constant_with_warmup"])
                .args(["--caption-dropout", "0"]);
        },
    );
    // Stage 9: the U-Net alone, the text encoder frozen (no --train-text-encoder) so its
    // outputs are cached; each cycle a run of its own. Stage 10: the same on the extra colours,
    // the encoder still frozen (it never trained on their words, yet gives each its own
    // outputs, which is all the U-Net needs to tell them apart).
    let cycles = [
        ("unet-as-drawn", folders.data, recipe.as_drawn_cycles),
        (
            "extra-colours",
            folders.extra_colours,
            recipe.extra_colour_cycles,
        ),
    ];
    for (stage, folder, count) in cycles {
        for cycle in 1..=count {
            let name = match cycle {
                1 => stage.to_string(),
                n => format!("{stage}-{n}"),
            };
            add(name, folder, recipe.as_drawn_steps, &|cmd| {
                cmd.args(["--cache-text-embeddings", "--learning-rate", "1e-4"])
                    .args(["--lr-scheduler", "cosine", "--caption-dropout", "0.1"]);
            });
        }
    }
    stages
}

/// A stage after the first U-Net stage: `sd train unet` from the previous stage's folder, at
/// the batch and warm-up of the runs that found the recipe (docs/shapes.md); the caller adds
/// what is trained, the rates and timesteps; `add` the step count.
fn fine_tune(root: &Path, model: &Path, data: &Path, output: &Path) -> Command {
    let mut cmd = sd(root);
    cmd.args(["train", "unet", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(output)
        .arg("--cache-latents")
        .args(["--resolution", "64", "--batch-size", "32"])
        .args(["--lr-warmup-steps", "50", "--seed", "1"])
        .args([
            "--checkpoint-every",
            "200",
            "--keep",
            "2",
            "--resume",
            "latest",
        ]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages 6-10 as the recipe runs them say what the committed model's records say was run:
    /// every setting `train_config.json` keeps, stage by stage, and no stage more or fewer.
    #[test]
    fn later_stages_are_the_runs_the_committed_model_records() {
        let root = root();
        let run_dir = Path::new("/run");
        let (data, canonical, extra_colours) = (
            run_dir.join("data"),
            run_dir.join("data-canonical"),
            run_dir.join("data-extra-colours"),
        );
        let folders = DataFolders {
            data: &data,
            canonical: &canonical,
            extra_colours: &extra_colours,
        };
        let stages = later_stages(
            &root,
            &recipe(&[]).unwrap(),
            &run_dir.join("unet"),
            &folders,
            run_dir,
        );
        let training = root.join("crates/sd-shapes/model/training");
        let mut recorded: Vec<String> = std::fs::read_dir(&training)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| !["unet", "vae", "vae2"].contains(&name.as_str()))
            .collect();
        recorded.sort();
        let mut names: Vec<String> = stages.iter().map(|(name, _, _)| name.clone()).collect();
        names.sort();
        assert_eq!(names, recorded);
        for (name, _, cmd) in &stages {
            let args: Vec<String> = cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let value = |flag: &str| {
                let at = args.iter().position(|a| a == flag)?;
                Some(args[at + 1].clone())
            };
            let number = |flag: &str| value(flag).map(|v| v.parse::<f64>().unwrap());
            let has = |flag: &str| args.iter().any(|a| a == flag);
            let text =
                std::fs::read_to_string(training.join(name).join("train_config.json")).unwrap();
            let record: serde_json::Value = serde_json::from_str(&text).unwrap();
            let f = |key: &str| record[key].as_f64();
            assert_eq!(
                record["train_text_encoder"],
                has("--train-text-encoder"),
                "{name}"
            );
            assert_eq!(
                record["cache_text_embeddings"],
                has("--cache-text-embeddings"),
                "{name}"
            );
            assert_eq!(record["cache_latents"], has("--cache-latents"), "{name}");
            assert_eq!(f("learning_rate"), number("--learning-rate"), "{name}");
            assert_eq!(f("text_encoder_lr"), number("--text-encoder-lr"), "{name}");
            assert_eq!(
                record["lr_scheduler"].as_str().map(str::to_string),
                value("--lr-scheduler"),
                "{name}"
            );
            for (key, flag) in [
                ("lr_warmup_steps", "--lr-warmup-steps"),
                ("caption_dropout", "--caption-dropout"),
                ("max_steps", "--max-steps"),
                ("seed", "--seed"),
                ("batch_size", "--batch-size"),
                ("resolution", "--resolution"),
            ] {
                assert_eq!(f(key), number(flag), "{name}: {key}");
            }
            assert_eq!(
                f("min_timestep"),
                Some(number("--min-timestep").unwrap_or(0.0)),
                "{name}"
            );
            assert!(
                record["ema_decay"].is_null() && !has("--ema-decay"),
                "{name}"
            );
        }
    }
}
