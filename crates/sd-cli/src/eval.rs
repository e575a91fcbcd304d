//! `sd eval`: image metrics (`fid`, `kid`, `is`, `stats`, `clip-score`, in `eval_metrics`) and `shapes`, the
//! prompt adherence of a model trained on `sd dataset shapes`, judged by the dataset's analytic
//! checker ([`sd_shapes::check`]) on held-out and seen prompts.

use clap::{Args, Subcommand};
use sd::{GenerateOptions, Model};

#[derive(Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    what: EvalWhat,
}

#[derive(Subcommand)]
enum EvalWhat {
    /// Generate each of N held-out and N seen prompts with several seeds and report the share
    /// of images that show exactly what their prompt says, as JSON.
    Shapes(ShapesArgs),
    /// The Fréchet Inception Distance between two folders of images (or pytorch-fid .npz
    /// statistics), as pytorch-fid computes it.
    Fid(crate::eval_metrics::FidArgs),
    /// The Kernel Inception Distance between two folders, as torch-fidelity computes it.
    Kid(crate::eval_metrics::KidArgs),
    /// The Inception Score of a folder, as torch-fidelity computes it.
    Is(crate::eval_metrics::IsArgs),
    /// A folder's Inception statistics to a pytorch-fid .npz (for `sd eval fid`).
    Stats(crate::eval_metrics::StatsArgs),
    /// The CLIP score of a folder of images against their prompts, as torchmetrics defines it
    /// (100 · cos(image, text) clipped at 0, averaged).
    ClipScore(crate::eval_metrics::ClipScoreArgs),
}

#[derive(Args)]
struct ShapesArgs {
    /// The model (a diffusers folder; default: the built-in shapes model).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Prompts of each kind (held-out, seen).
    #[arg(long, default_value_t = sd_shapes::EVAL_PROMPT_COUNT)]
    prompts: usize,
    /// Seeds per prompt (0, 1, ...).
    #[arg(long, default_value_t = 4)]
    seeds: usize,
    /// Sampling steps (default: the built-in model's).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 turns guidance off (default: the built-in model's).
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f64>,
    /// Guidance rescale φ (Lin et al. 2023), as `sd generate --guidance-rescale`.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    guidance_rescale: f64,
    /// Sampler, as `sd generate --scheduler` (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// Which prompts: the lists drawn with this seed.
    #[arg(long, default_value_t = 0)]
    prompt_seed: u64,
    /// Also write the report (every image's verdict) to this JSON file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Also draw a PNG grid of the first --grid-prompts prompts of each kind (held-out ones
    /// marked), each image framed green where it passed and red where it did not.
    #[arg(long)]
    grid: Option<std::path::PathBuf>,
    /// Prompts of each kind in the grid.
    #[arg(long, default_value_t = 6)]
    grid_prompts: usize,
    /// Check the model's VAE instead of the whole model: each prompt drawn as the dataset draws
    /// it (a random scene per seed), encoded and decoded by the VAE. The adherence a U-Net on
    /// this VAE can reach at most.
    #[arg(long, conflicts_with_all = ["steps", "guidance", "guidance_rescale", "scheduler"])]
    reconstruct: bool,
}

pub fn run(args: EvalArgs) -> Result<String, String> {
    let args = match args.what {
        EvalWhat::Shapes(args) => args,
        EvalWhat::Fid(args) => return crate::eval_metrics::fid(args),
        EvalWhat::Kid(args) => return crate::eval_metrics::kid(args),
        EvalWhat::Is(args) => return crate::eval_metrics::inception_score(args),
        EvalWhat::Stats(args) => return crate::eval_metrics::stats(args),
        EvalWhat::ClipScore(args) => return crate::eval_metrics::clip_score(args),
    };
    if !(1..=100).contains(&args.seeds) || !(1..=1000).contains(&args.prompts) {
        return Err("--seeds must be in 1..=100 and --prompts in 1..=1000".into());
    }
    let steps = args.steps.unwrap_or(sd_shapes::model::DEFAULT_STEPS);
    let guidance = args.guidance.unwrap_or(sd_shapes::model::DEFAULT_GUIDANCE);
    crate::generate::check_steps_and_guidance(steps, guidance)?;
    let model = match &args.model {
        None => crate::generate::built_in_model(),
        Some(m) => Model::open(m).map_err(|e| e.to_string()),
    }?;
    let device = Default::default();
    let mut report = serde_json::Map::new();
    let mut summary = serde_json::Map::new();
    let mut grid = Vec::new();
    for (kind, prompts) in [
        (
            "held_out",
            sd_shapes::held_out_prompts(args.prompts, args.prompt_seed),
        ),
        (
            "seen",
            sd_shapes::seen_prompts(args.prompts, args.prompt_seed),
        ),
    ] {
        let mut passed = 0usize;
        // Passed and total images of one- and two-object prompts, and the failures by kind.
        let mut by_objects = [(0usize, 0usize); 2];
        let mut failures = std::collections::BTreeMap::<sd_shapes::Failure, usize>::new();
        let mut images = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let options = GenerateOptions {
                prompt: sd::PromptOptions::new(prompt.clone()),
                guidance: sd::Guidance {
                    scale: guidance,
                    rescale: args.guidance_rescale,
                },
                sampling: sd::Sampling {
                    steps,
                    scheduler: args.scheduler.clone(),
                    seed: 0,
                    ..Default::default()
                },
                num_images: args.seeds,
                ..GenerateOptions::default()
            };
            let drawn = if args.reconstruct {
                reconstructions::<sd::backend::Flex>(&model, prompt, p, args.seeds, &device)?
            } else {
                sd::generate::<sd::backend::Flex>(&model, &options, &device, None)
                    .map_err(|e| format!("{prompt:?}: {e}"))?
                    .images
            };
            let rgb = sd::to_images(drawn).map_err(|e| e.to_string())?;
            let mut row = Vec::new();
            for (seed, image) in rgb.iter().enumerate() {
                let verdict = sd_shapes::check(image, prompt);
                passed += usize::from(verdict.pass);
                let two = prompt
                    .parse::<sd_shapes::Prompt>()
                    .is_ok_and(|p| p.relation().is_some());
                let tally = &mut by_objects[usize::from(two)];
                tally.0 += usize::from(verdict.pass);
                tally.1 += 1;
                if let Some(kind) = verdict.failure {
                    *failures.entry(kind).or_default() += 1;
                }
                if args.grid.is_some() && p < args.grid_prompts {
                    row.push((image.clone(), verdict.pass));
                }
                images.push(serde_json::json!({
                    "prompt": prompt,
                    "seed": seed,
                    "verdict": verdict.to_json(),
                }));
            }
            if !row.is_empty() {
                grid.push(crate::eval_grid::Row {
                    prompt: prompt.clone(),
                    held_out: kind == "held_out",
                    images: row,
                });
            }
        }
        let total = prompts.len() * args.seeds;
        summary.insert(
            kind.into(),
            serde_json::json!({
                "passed": passed,
                "images": total,
                "adherence": passed as f64 / total as f64,
                "one_object": {"passed": by_objects[0].0, "images": by_objects[0].1},
                "two_objects": {"passed": by_objects[1].0, "images": by_objects[1].1},
                "failures": failures
                    .iter()
                    .map(|(kind, n)| (kind.name().to_string(), serde_json::json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
            }),
        );
        report.insert(kind.into(), images.into());
    }
    let summary = serde_json::json!({
        "reconstruct": args.reconstruct,
        "steps": steps,
        "guidance": guidance,
        "guidance_rescale": args.guidance_rescale,
        "scheduler": args.scheduler,
        "seeds": args.seeds,
        "prompts": args.prompts,
        "summary": summary,
    });
    if let Some(path) = &args.out {
        let mut whole = summary.clone();
        whole["images"] = report.into();
        let text = serde_json::to_string_pretty(&whole).map_err(|e| e.to_string())?;
        sd::core::files::write_atomic(path, |out| {
            use std::io::Write;
            out.write_all(text.as_bytes()).map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())?;
    }
    if let Some(path) = &args.grid {
        crate::eval_grid::write_grid(&grid, path)?;
    }
    serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())
}

/// `seeds` dataset drawings of the `index`th prompt (seed `index · 2³² + seed`), through the
/// model's VAE and back.
fn reconstructions<B: burn::tensor::backend::Backend>(
    model: &Model,
    prompt: &str,
    index: usize,
    seeds: usize,
    device: &B::Device,
) -> Result<burn::tensor::Tensor<B, 4>, String> {
    use rand::SeedableRng;
    let parsed: sd_shapes::Prompt = prompt.parse().map_err(|e| format!("{prompt:?}: {e}"))?;
    let mut drawings = Vec::with_capacity(seeds);
    for seed in 0..seeds as u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(((index as u64) << 32) + seed);
        let scene = sd_shapes::random_scene_for(&mut rng, &parsed).map_err(|e| e.to_string())?;
        drawings.push(sd::core::image_io::image_to_tensor(&scene.render(), device));
    }
    sd::reconstruct(model, burn::tensor::Tensor::cat(drawings, 0), device)
        .map_err(|e| format!("{prompt:?}: {e}"))
}
