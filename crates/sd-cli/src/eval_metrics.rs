//! `sd eval fid|kid|is|stats`: the metrics of `sd-metrics` on folders of images (and
//! pytorch-fid's `.npz` statistics), with the numbers of pytorch-fid (FID, statistics) and
//! torch-fidelity (KID, Inception Score).

use std::path::{Path, PathBuf};

use clap::Args;
use sd_metrics::folder::{features_of_files, image_files};
use sd_metrics::{
    BatchFeatures, FeatureAccumulator, FeatureExtractor, Features, InceptionV3, IsOptions,
    KidOptions, Preprocess, Statistics,
};

type B = sd::backend::Flex;

/// pytorch-fid's weights file, as its download caches it.
const FID_WEIGHTS: &str = "pt_inception-2015-12-05-6726825d.pth";
/// torch-fidelity's weights file (the same network converted by its authors).
const FIDELITY_WEIGHTS: &str = "weights-inception-2015-12-05-6726825d.pth";

/// Options every metric over images takes.
#[derive(Args)]
pub struct InceptionArgs {
    /// The Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID,
    /// statistics) or torch-fidelity's weights-inception-2015-12-05-6726825d.pth (KID, IS),
    /// either PyTorch format, or a .safetensors with their keys. Default: the file in torch's
    /// hub cache ($TORCH_HOME/hub/checkpoints, else ~/.cache/torch/hub/checkpoints), where
    /// those packages download it.
    #[arg(long)]
    inception: Option<PathBuf>,
    /// Images per forward pass (pytorch-fid's default is 50).
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `sd eval fid`.
#[derive(Args)]
pub struct FidArgs {
    /// A folder of images, or a pytorch-fid statistics file (.npz with mu and sigma).
    real: PathBuf,
    /// The same for the other set.
    fake: PathBuf,
    /// clean-fid's preparation ("clean" mode: PIL's antialiased bicubic resize on float
    /// channels, then (x − 128)/128) instead of pytorch-fid's bilinear resize and 2x − 1.
    #[arg(long)]
    clean: bool,
    #[command(flatten)]
    common: InceptionArgs,
}

/// `sd eval kid`.
#[derive(Args)]
pub struct KidArgs {
    /// A folder of images.
    real: PathBuf,
    /// The other folder.
    fake: PathBuf,
    /// Random subsets (torch-fidelity's kid_subsets).
    #[arg(long, default_value_t = 100)]
    subsets: usize,
    /// Images per subset (torch-fidelity's kid_subset_size); at most the smaller set's size.
    #[arg(long, default_value_t = 1000)]
    subset_size: usize,
    #[command(flatten)]
    common: InceptionArgs,
}

/// `sd eval is`.
#[derive(Args)]
pub struct IsArgs {
    /// A folder of images.
    dir: PathBuf,
    /// Splits (torch-fidelity's isc_splits).
    #[arg(long, default_value_t = 10)]
    splits: usize,
    #[command(flatten)]
    common: InceptionArgs,
}

/// `sd eval stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// A folder of images.
    dir: PathBuf,
    /// Where to write the statistics (.npz, as pytorch-fid's --save-stats writes them).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// clean-fid's preparation instead of pytorch-fid's (see `sd eval fid --clean`).
    #[arg(long)]
    clean: bool,
    #[command(flatten)]
    common: InceptionArgs,
}

/// torch's hub checkpoint folder, where pytorch-fid and torch-fidelity download the weights.
fn hub_checkpoints() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("TORCH_HOME") {
        return Some(PathBuf::from(home).join("hub/checkpoints"));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("torch/hub/checkpoints"))
}

/// The weights to use: `--inception`, else the package's file in the hub cache, else the other
/// package's (the same network).
fn weights(args: &InceptionArgs, preferred: &str) -> Result<PathBuf, String> {
    if let Some(path) = &args.inception {
        return Ok(path.clone());
    }
    let other = if preferred == FID_WEIGHTS {
        FIDELITY_WEIGHTS
    } else {
        FID_WEIGHTS
    };
    let hub = hub_checkpoints();
    hub.iter()
        .flat_map(|dir| [dir.join(preferred), dir.join(other)])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no Inception weights: pass --inception PATH ({preferred}, as pytorch-fid and \
                 torch-fidelity download it){}",
                hub.map(|d| format!("; none in {}", d.display()))
                    .unwrap_or_default()
            )
        })
}

fn extractor(args: &InceptionArgs, preprocess: Preprocess) -> Result<FeatureExtractor<B>, String> {
    if args.batch_size == 0 || args.batch_size > 1024 {
        return Err("--batch-size must be in 1..=1024".into());
    }
    let preferred = match preprocess {
        Preprocess::PytorchFid => FID_WEIGHTS,
        // clean-fid runs the TensorFlow graph, as torch-fidelity's file converts it.
        Preprocess::TorchFidelity | Preprocess::CleanFid => FIDELITY_WEIGHTS,
    };
    let path = weights(args, preferred)?;
    let device = Default::default();
    let model = InceptionV3::<B>::load(&path, &device).map_err(|e| e.to_string())?;
    Ok(FeatureExtractor::new(model, device, preprocess))
}

/// The images of `dir`, listed before any weights are loaded, so that an empty or missing
/// folder is reported at once.
fn list(dir: &Path) -> Result<Vec<PathBuf>, String> {
    image_files(dir).map_err(|e| e.to_string())
}

/// The features of `files` (from `dir`), with a progress bar.
fn folder_features(
    extractor: &FeatureExtractor<B>,
    dir: &Path,
    files: &[PathBuf],
    args: &InceptionArgs,
) -> Result<(BatchFeatures, usize), String> {
    let bar = crate::progress_bar(
        args.quiet,
        files.len() as u64,
        "{msg} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}",
    );
    bar.set_message(dir.display().to_string());
    let features = features_of_files(extractor, files, args.batch_size, |n| bar.inc(n as u64))
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    Ok((features, files.len()))
}

fn is_npz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
        && path.is_file()
}

/// Statistics of a folder (through the extractor, made once and only when needed) or an `.npz`.
fn statistics(
    path: &Path,
    extractor: &mut Option<FeatureExtractor<B>>,
    preprocess: Preprocess,
    args: &InceptionArgs,
) -> Result<(Statistics, Option<usize>), String> {
    if is_npz(path) {
        return Ok((Statistics::read_npz(path).map_err(|e| e.to_string())?, None));
    }
    let files = list(path)?;
    if extractor.is_none() {
        *extractor = Some(self::extractor(args, preprocess)?);
    }
    let extractor = extractor.as_ref().ok_or("no extractor")?;
    let (features, count) = folder_features(extractor, path, &files, args)?;
    let mut acc = FeatureAccumulator::new(sd_metrics::inception::FEATURES);
    acc.add(&features.pool3).map_err(|e| e.to_string())?;
    let stats = acc
        .finish()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((stats, Some(count)))
}

fn output(
    json: bool,
    name: &str,
    value: serde_json::Value,
    text: String,
) -> Result<String, String> {
    if json {
        let mut out = serde_json::Map::new();
        out.insert(name.into(), value);
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())
    } else {
        Ok(text)
    }
}

/// `sd eval fid REAL FAKE`.
pub fn fid(args: FidArgs) -> Result<String, String> {
    let mut extractor = None;
    let preprocess = if args.clean {
        Preprocess::CleanFid
    } else {
        Preprocess::PytorchFid
    };
    let (real, real_count) = statistics(&args.real, &mut extractor, preprocess, &args.common)?;
    let (fake, fake_count) = statistics(&args.fake, &mut extractor, preprocess, &args.common)?;
    let value = sd_metrics::frechet_distance(&real, &fake).map_err(|e| e.to_string())?;
    output(
        args.common.json,
        "fid",
        serde_json::json!({"value": value, "real_images": real_count, "fake_images": fake_count}),
        format!("FID {value:.6}"),
    )
}

/// `sd eval kid REAL FAKE`.
pub fn kid(args: KidArgs) -> Result<String, String> {
    let (real_files, fake_files) = (list(&args.real)?, list(&args.fake)?);
    let extractor = extractor(&args.common, Preprocess::TorchFidelity)?;
    let (real, _) = folder_features(&extractor, &args.real, &real_files, &args.common)?;
    let (fake, _) = folder_features(&extractor, &args.fake, &fake_files, &args.common)?;
    let dim = sd_metrics::inception::FEATURES;
    let options = KidOptions {
        subsets: args.subsets,
        subset_size: args.subset_size,
        ..KidOptions::default()
    };
    let kid = sd_metrics::kernel_inception_distance(
        Features {
            values: &real.pool3,
            dim,
        },
        Features {
            values: &fake.pool3,
            dim,
        },
        &options,
    )
    .map_err(|e| e.to_string())?;
    output(
        args.common.json,
        "kid",
        serde_json::json!({"mean": kid.mean, "std": kid.std, "subsets": args.subsets, "subset_size": args.subset_size}),
        format!("KID {:.6} ± {:.6}", kid.mean, kid.std),
    )
}

/// `sd eval is DIR`.
pub fn inception_score(args: IsArgs) -> Result<String, String> {
    let files = list(&args.dir)?;
    let extractor = extractor(&args.common, Preprocess::TorchFidelity)?;
    let (features, _) = folder_features(&extractor, &args.dir, &files, &args.common)?;
    let options = IsOptions {
        splits: args.splits,
        ..IsOptions::default()
    };
    let score =
        sd_metrics::inception_score(&features.logits, sd_metrics::inception::CLASSES, &options)
            .map_err(|e| format!("{}: {e}", args.dir.display()))?;
    output(
        args.common.json,
        "inception_score",
        serde_json::json!({"mean": score.mean, "std": score.std, "splits": args.splits}),
        format!("IS {:.6} ± {:.6}", score.mean, score.std),
    )
}

/// `sd eval stats DIR -o OUT.npz`.
pub fn stats(args: StatsArgs) -> Result<String, String> {
    let mut extractor = None;
    let preprocess = if args.clean {
        Preprocess::CleanFid
    } else {
        Preprocess::PytorchFid
    };
    let (stats, count) = statistics(&args.dir, &mut extractor, preprocess, &args.common)?;
    stats.write_npz(&args.out).map_err(|e| e.to_string())?;
    output(
        args.common.json,
        "stats",
        serde_json::json!({"out": args.out, "images": count, "dims": stats.dim()}),
        format!(
            "wrote {} ({} images)",
            args.out.display(),
            count.unwrap_or(0)
        ),
    )
}

/// `sd eval clip-score`.
#[derive(Args)]
pub struct ClipScoreArgs {
    /// A folder of images: with --prompts, the `sd generate --prompts` output (`00000.png`, …);
    /// without, every PNG, scored against the prompt in its `parameters` chunk.
    dir: PathBuf,
    /// The prompt file the images were generated from (as `sd generate --prompts` reads it).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// A transformers CLIPModel folder (config.json, model.safetensors, tokenizer files), e.g.
    /// openai/clip-vit-large-patch14 as torchmetrics uses, or its id in the Hugging Face hub
    /// cache (`openai/clip-vit-large-patch14`).
    #[arg(long)]
    clip: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Print the result as JSON (with every image's score).
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// The CLIP folder: a path, or a hub id resolved in the Hugging Face cache.
fn clip_folder(spec: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(spec);
    if path.is_dir() {
        return Ok(path);
    }
    sd::hub_cache_snapshot(spec)
        .filter(|p| p.join("config.json").is_file())
        .ok_or_else(|| {
            format!("--clip {spec}: neither a CLIPModel folder nor a model in the hub cache")
        })
}

pub fn clip_score(args: ClipScoreArgs) -> Result<String, String> {
    if args.batch_size == 0 || args.batch_size > 1024 {
        return Err("--batch-size must be in 1..=1024".into());
    }
    // The (image, caption) pairs first: a missing image or prompt costs no loading time.
    let pairs: Vec<(PathBuf, String)> = match &args.prompts {
        Some(file) => crate::prompt_file::read(file)?
            .into_iter()
            .map(|line| {
                let path = crate::prompt_file::output_path(&args.dir, &line);
                if path.is_file() {
                    Ok((path, line.prompt))
                } else {
                    Err(format!(
                        "{}: line {} has no image ({} is missing)",
                        file.display(),
                        line.index,
                        path.display()
                    ))
                }
            })
            .collect::<Result<_, _>>()?,
        None => list(&args.dir)?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .map(|p| {
                let text = sd::read_parameters(&p)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!(
                            "{}: no `parameters` chunk to take the prompt from; give --prompts",
                            p.display()
                        )
                    })?;
                Ok((p, sd::prompt_of_parameters(&text)))
            })
            .collect::<Result<_, String>>()?,
    };
    if pairs.is_empty() {
        return Err(format!("{}: no PNG images to score", args.dir.display()));
    }
    let device = Default::default();
    let scorer = sd_metrics::ClipScorer::<B>::load(clip_folder(&args.clip)?, &device)
        .map_err(|e| e.to_string())?;
    let bar = crate::progress_bar(
        args.quiet,
        pairs.len() as u64,
        "CLIP score [{bar:30}] {pos}/{len} images, eta {eta}",
    );
    let mut scores = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(args.batch_size) {
        let pictures = chunk
            .iter()
            .map(|(p, _)| sd_metrics::decode::read_rgb(p).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let captions: Vec<&str> = chunk.iter().map(|(_, c)| c.as_str()).collect();
        let image_embeds = scorer.image_embeds(&pictures).map_err(|e| e.to_string())?;
        let text_embeds = scorer.text_embeds(&captions).map_err(|e| e.to_string())?;
        scores.extend(
            sd_metrics::ClipScorer::<B>::scores(image_embeds, text_embeds)
                .map_err(|e| e.to_string())?,
        );
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    if args.json {
        let per_image: Vec<serde_json::Value> = pairs
            .iter()
            .zip(&scores)
            .map(|((p, c), s)| serde_json::json!({"image": p.display().to_string(), "prompt": c, "score": s}))
            .collect();
        return Ok(
            serde_json::json!({"clip_score": mean, "images": scores.len(), "scores": per_image})
                .to_string(),
        );
    }
    Ok(format!("CLIP score: {mean:.4} ({} images)", scores.len()))
}
