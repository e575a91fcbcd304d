//! `sd train`: flags (over an optional JSON config) to [`sd_train::TrainConfig`], a progress
//! bar, and the loop in `sd-train`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use sd_train::{Event, LrScheduleKind, Resume, TrainConfig};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// The U-Net on the denoising objective.
    Unet,
    /// The autoencoder on reconstruction + KL.
    Vae,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    No,
    F16,
    Bf16,
}

#[derive(Args)]
pub struct TrainArgs {
    /// What to train.
    #[arg(value_enum, default_value = "unet")]
    what: What,
    /// The images: a diffusers imagefolder (metadata.jsonl), images with .txt/.caption files,
    /// or kohya's `N_name` repeat folders.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The caption field of metadata.jsonl (default `text`).
    #[arg(long)]
    caption_column: Option<String>,
    /// Where checkpoints, logs and, at the end, the trained diffusers folder go.
    #[arg(long)]
    output: Option<PathBuf>,
    /// The diffusers folder to fine-tune (its other components are kept).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Train the U-Net from scratch: random weights from DIR/unet/config.json (the other
    /// components come from --model, or from DIR when --model is not given).
    #[arg(long, value_name = "CONFIG_DIR")]
    init: Option<PathBuf>,
    /// A TOML (`.toml`) or JSON file with any of the settings (train_config.json's fields);
    /// flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    learning_rate: Option<f64>,
    /// The text encoder's base learning rate, on the same schedule (kohya's
    /// --text_encoder_lr; default: --learning-rate).
    #[arg(long, allow_negative_numbers = true)]
    text_encoder_lr: Option<f64>,
    /// Square image side.
    #[arg(long)]
    resolution: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Write OUTPUT/checkpoint-STEP/ every N steps (0: only at the end).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Keep the newest K checkpoints (0: all).
    #[arg(long)]
    keep: Option<usize>,
    /// `latest` (the newest complete checkpoint in --output) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
    /// epsilon, v_prediction or sample (default: the model's scheduler config).
    #[arg(long)]
    prediction_type: Option<String>,
    /// Min-SNR-γ loss weighting (5 is the paper's choice).
    #[arg(long, allow_negative_numbers = true)]
    snr_gamma: Option<f64>,
    /// Train on timesteps from this one on (kohya's `--min_timestep`; default 0).
    #[arg(long)]
    min_timestep: Option<usize>,
    /// Train on timesteps below this one (kohya's `--max_timestep`; default: the scheduler's
    /// num_train_timesteps).
    #[arg(long)]
    max_timestep: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    noise_offset: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    input_perturbation: Option<f64>,
    /// Probability of training on the empty caption.
    #[arg(long, allow_negative_numbers = true)]
    caption_dropout: Option<f64>,
    /// Probability of replacing a caption's end-of-text token and the padding after it by the
    /// empty caption's, so that the U-Net reads the words rather than the whole caption.
    #[arg(long, allow_negative_numbers = true)]
    summary_dropout: Option<f64>,
    #[arg(long)]
    gradient_accumulation: Option<usize>,
    /// Clip gradients to this global norm (default 1).
    #[arg(long, allow_negative_numbers = true)]
    max_grad_norm: Option<f64>,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.
    #[arg(long)]
    lr_scheduler: Option<String>,
    #[arg(long)]
    lr_warmup_steps: Option<u64>,
    /// Keep an EMA of the weights with this decay; the final folder holds the EMA weights.
    #[arg(long, allow_negative_numbers = true)]
    ema_decay: Option<f64>,
    /// `sd train vae`: the reconstruction penalty, l1 (default) or l2.
    #[arg(long)]
    reconstruction: Option<String>,
    /// `sd train vae`: the KL term's weight (default 1e-6).
    #[arg(long, allow_negative_numbers = true)]
    kl_weight: Option<f64>,
    /// `sd train vae`: add the latent diffusion paper's adversarial term against a patch
    /// discriminator from this step on (the paper: 50001); before it, reconstruction and KL
    /// alone.
    #[arg(long)]
    discriminator_start: Option<u64>,
    /// `sd train vae`: the adversarial term's weight, times its adaptive weight (default 0.5).
    #[arg(long, allow_negative_numbers = true)]
    discriminator_weight: Option<f64>,
    /// `sd train vae`: at the end, set scaling_factor to 1 / the latents' standard deviation.
    #[arg(long)]
    fit_scaling_factor: bool,
    /// `sd train vae`: train the decoder alone (the encoder, and so the latents a U-Net was
    /// trained on, stay as they are).
    #[arg(long)]
    decoder_only: bool,
    /// Gradient checkpointing: recompute activations in the backward pass (less memory).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Leave out unreadable images (counted in a warning) instead of stopping.
    #[arg(long)]
    skip_bad_images: bool,
    /// Aspect-ratio buckets (kohya's): each image trains at the bucket nearest its shape,
    /// area about resolution², instead of a square crop.
    #[arg(long)]
    enable_bucket: bool,
    /// The smallest bucket side (default 256, or the resolution when smaller).
    #[arg(long)]
    min_bucket_reso: Option<u32>,
    /// The largest bucket side (default 1024, or the resolution when larger).
    #[arg(long)]
    max_bucket_reso: Option<u32>,
    /// Bucket sides are multiples of this (default 64).
    #[arg(long)]
    bucket_reso_steps: Option<u32>,
    /// Never enlarge an image: buckets are the images' own sizes floored to the step.
    #[arg(long)]
    bucket_no_upscale: bool,
    /// Crop a random square instead of the centre.
    #[arg(long)]
    random_crop: bool,
    /// Mirror images at random.
    #[arg(long)]
    random_flip: bool,
    /// Also train the text encoder (from random weights when the model's text_encoder/ has
    /// a config but no weights).
    #[arg(long)]
    train_text_encoder: bool,
    /// Encode each image once and keep its VAE posterior under OUTPUT/latent_cache/ (needs
    /// centre crops and no flips; with buckets, each image at its bucket's size).
    #[arg(long)]
    cache_latents: bool,
    /// Keep the frozen text encoder's output for each caption under OUTPUT/text_cache/,
    /// computed once (not with --train-text-encoder).
    #[arg(long)]
    cache_text_embeddings: bool,
    /// `bf16` or `f16`: the U-Net's (and a trained text encoder's) forward and backward passes
    /// in that precision on f32 weights, optimiser and loss (accelerate's --mixed_precision);
    /// f16 scales the loss dynamically and skips a step whose gradients overflow.
    #[arg(long, value_enum)]
    mixed_precision: Option<Precision>,
    /// Render this prompt (repeatable) every --validation-every steps and at the end into
    /// OUTPUT/samples/step-STEP/, at the run's seed with the model's own sampler.
    #[arg(long)]
    validation_prompt: Vec<String>,
    /// Steps between validation renders (default: only at the end).
    #[arg(long)]
    validation_every: Option<u64>,
    /// Sampling steps of a validation render (default 20).
    #[arg(long)]
    validation_steps: Option<usize>,
    /// Train a LoRA of this rank beside the frozen U-Net (and text encoder, with
    /// --train-text-encoder) instead of their weights; the run ends with a LoRA file.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// The LoRA's alpha: updates are scaled by alpha / rank (default: the rank).
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Which weights the LoRA adapts: `kohya` (default: every linear layer and 1x1 conv of
    /// the transformer blocks; the text encoder's attention and MLP), `diffusers` (the
    /// attention projections) or module names, comma-separated (`to_q,to_v`).
    #[arg(long)]
    lora_targets: Option<String>,
    /// How the LoRA's down factors start: `kohya` (Kaiming-uniform, default) or `gaussian`.
    #[arg(long)]
    lora_init: Option<String>,
    /// The LoRA file written: `kohya` (OUTPUT/lora.safetensors, default; A1111, ComfyUI,
    /// stable-diffusion.cpp) or `diffusers` (OUTPUT/pytorch_lora_weights.safetensors).
    #[arg(long)]
    lora_format: Option<String>,
    /// Data-parallel peers (threads) on this machine; --batch-size is per peer, so the
    /// global batch is devices × nodes × batch-size.
    #[arg(long)]
    devices: Option<usize>,
    /// Machines (processes) training together: each runs `sd train` with the same settings,
    /// its own --node-rank and the same --orchestrator.
    #[arg(long)]
    nodes: Option<usize>,
    /// This process's index among --nodes, from 0 (node 0 writes the output).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// With --nodes: HOST:PORT where node 0 listens (it binds it) and the others connect;
    /// the gradients pass through node 0.
    #[arg(long)]
    orchestrator: Option<String>,
    /// The longest wait, in seconds, for another peer (default 1800): past it the run stops
    /// with an error rather than wait for a peer that died.
    #[arg(long)]
    collective_timeout: Option<u64>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// The config: the file's settings, then every flag given over them.
fn resolve(args: &TrainArgs) -> Result<TrainConfig, String> {
    let mut c = match &args.config {
        Some(path) => {
            let text = sd::core::files::read_regular_to_string(path).map_err(|e| e.to_string())?;
            let toml = path.extension().is_some_and(|e| e == "toml");
            if toml {
                TrainConfig::from_toml(&text)
            } else {
                TrainConfig::from_json(&text)
            }
            .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = &args.$field {
                c.$field = v.clone().into();
            }
        )*};
    }
    set!(
        data,
        output,
        max_steps,
        batch_size,
        learning_rate,
        resolution,
        seed
    );
    set!(
        checkpoint_every,
        keep,
        noise_offset,
        input_perturbation,
        caption_dropout,
        summary_dropout
    );
    set!(
        gradient_accumulation,
        max_grad_norm,
        lr_warmup_steps,
        devices,
        nodes
    );
    if args.text_encoder_lr.is_some() {
        c.text_encoder_lr = args.text_encoder_lr;
    }
    match args.mixed_precision {
        Some(Precision::No) => c.mixed_precision = sd_train::MixedPrecision::No,
        Some(Precision::F16) => c.mixed_precision = sd_train::MixedPrecision::F16,
        Some(Precision::Bf16) => c.mixed_precision = sd_train::MixedPrecision::Bf16,
        None => {}
    }
    if args.model.is_some() {
        c.model = args.model.clone();
    }
    if args.init.is_some() {
        c.init = args.init.clone();
    }
    if args.what == What::Unet && c.model.is_none() {
        c.model = c.init.as_ref().map(|p| p.display().to_string());
    }
    if let Some(r) = &args.reconstruction {
        c.reconstruction = match r.as_str() {
            "l1" => sd_train::Reconstruction::L1,
            "l2" => sd_train::Reconstruction::L2,
            other => return Err(format!("--reconstruction must be l1 or l2, got `{other}`")),
        };
    }
    if args.kl_weight.is_some() {
        c.kl_weight = args.kl_weight.unwrap_or_default();
    }
    if args.discriminator_start.is_some() || args.discriminator_weight.is_some() {
        let d = c.discriminator.get_or_insert_with(Default::default);
        if let Some(start) = args.discriminator_start {
            d.start = start;
        }
        if let Some(weight) = args.discriminator_weight {
            d.weight = weight;
        }
    }
    if args.caption_column.is_some() {
        c.caption_column = args.caption_column.clone();
    }
    if args.prediction_type.is_some() {
        c.prediction_type = args.prediction_type.clone();
    }
    if args.snr_gamma.is_some() {
        c.snr_gamma = args.snr_gamma;
    }
    if let Some(t) = args.min_timestep {
        c.min_timestep = t;
    }
    if args.max_timestep.is_some() {
        c.max_timestep = args.max_timestep;
    }
    if args.ema_decay.is_some() {
        c.ema_decay = args.ema_decay;
    }
    if let Some(name) = &args.lr_scheduler {
        c.lr_scheduler = LrScheduleKind::from_name(name).map_err(|e| e.to_string())?;
    }
    if args.random_crop {
        c.center_crop = false;
    }
    if args.random_flip {
        c.random_flip = true;
    }
    if !args.validation_prompt.is_empty() {
        c.validation_prompts = args.validation_prompt.clone();
    }
    if let Some(n) = args.validation_every {
        c.validation_every = n;
    }
    if let Some(n) = args.validation_steps {
        c.validation_steps = n;
    }
    if args.fit_scaling_factor {
        c.fit_scaling_factor = true;
    }
    if args.decoder_only {
        c.decoder_only = true;
    }
    if args.gradient_checkpointing {
        c.gradient_checkpointing = true;
    }
    if args.cache_latents {
        c.cache_latents = true;
    }
    if args.cache_text_embeddings {
        c.cache_text_embeddings = true;
    }
    if args.train_text_encoder {
        c.train_text_encoder = true;
    }
    if args.enable_bucket {
        let mut b = sd_data::BucketConfig::new(c.resolution);
        b.min_size = args.min_bucket_reso.unwrap_or(b.min_size);
        b.max_size = args.max_bucket_reso.unwrap_or(b.max_size);
        b.step = args.bucket_reso_steps.unwrap_or(b.step);
        b.no_upscale = args.bucket_no_upscale;
        c.bucket = Some(b);
    }
    if args.skip_bad_images {
        c.skip_bad_images = true;
    }
    let lora_flags = args.lora_alpha.is_some()
        || args.lora_targets.is_some()
        || args.lora_init.is_some()
        || args.lora_format.is_some();
    if args.lora_rank.is_some() || lora_flags {
        let mut lora = c.lora.clone().unwrap_or_default();
        if lora_flags && args.lora_rank.is_none() && c.lora.is_none() {
            return Err(
                "--lora-alpha, --lora-targets, --lora-init and --lora-format need \
                        --lora-rank"
                    .into(),
            );
        }
        if let Some(rank) = args.lora_rank {
            lora.rank = rank;
        }
        if args.lora_alpha.is_some() {
            lora.alpha = args.lora_alpha;
        }
        if let Some(t) = &args.lora_targets {
            lora.targets = t.clone();
        }
        if let Some(i) = &args.lora_init {
            lora.init = i.clone();
        }
        if let Some(f) = &args.lora_format {
            lora.format = f.clone();
        }
        c.lora = Some(lora);
    }
    if c.data.as_os_str().is_empty() {
        return Err("no training data: give --data DIR".into());
    }
    if c.output.as_os_str().is_empty() {
        return Err("no output folder: give --output DIR".into());
    }
    Ok(c)
}

pub fn run(args: TrainArgs) -> Result<String, String> {
    let unsupported = [
        (
            args.what == What::Vae
                && matches!(args.mixed_precision, Some(Precision::F16 | Precision::Bf16)),
            "--mixed-precision f16 or bf16 with `sd train vae`",
        ),
        (
            args.what == What::Vae && !args.validation_prompt.is_empty(),
            "--validation-prompt with `sd train vae`",
        ),
        (
            args.what == What::Vae && args.lora_rank.is_some(),
            "--lora-rank with `sd train vae`",
        ),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(format!("{what} is not supported yet"));
    }
    let config = resolve(&args)?;
    // Ctrl-C (or SIGTERM): finish the step in progress, checkpoint, stop; a second one ends
    // the process at once (the newest complete checkpoint is still there to resume from).
    let _ = ctrlc::set_handler(|| {
        if sd_train::stop_requested() {
            std::process::exit(130);
        }
        sd_train::request_stop();
        eprintln!("sd: stopping after this step (Ctrl-C again to quit now)");
    });
    let resume = args.resume.as_deref().map(|r| match r {
        "latest" => Resume::Latest,
        path => Resume::Path(PathBuf::from(path)),
    });
    let bar = crate::progress_bar(
        args.quiet,
        config.max_steps,
        "{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta}",
    );
    bar.set_message("loading");
    let mut smoothed: Option<f64> = None;
    let mut events = |event: Event| match event {
        Event::Started { first, .. } => {
            bar.set_position(first);
            bar.reset_eta();
        }
        Event::Step(log) => {
            // An exponential average, as kohya's bar shows, so the number can be read.
            let s = smoothed.map_or(log.loss, |s| 0.9 * s + 0.1 * log.loss);
            smoothed = Some(s);
            bar.set_position(log.step);
            bar.set_message(format!("loss {s:.4} lr {:.2e}", log.lr));
        }
        Event::Caching { done, total } => {
            bar.set_message(format!("caching latents {done}/{total}"))
        }
        Event::Info(text) => bar.suspend(|| eprintln!("sd: {text}")),
        Event::Samples(path) => bar.println(format!("samples in {}", path.display())),
        Event::Checkpoint(path) => bar.println(format!("saved {}", path.display())),
        // Printed even with -q (a hidden bar prints nothing).
        Event::Warning(text) => bar.suspend(|| eprintln!("sd: warning: {text}")),
    };
    let started = std::time::Instant::now();
    let device = Default::default();
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    type Flex = sd::backend::Flex;
    let parallel = sd_train::ParallelConfig {
        node_rank: args.node_rank,
        orchestrator: args.orchestrator.clone(),
        timeout: args.collective_timeout.unwrap_or(0),
    };
    let out = match (args.what, config.gradient_checkpointing) {
        (What::Unet, false) => sd_train::train_unet_parallel::<Flex, NoCheckpointing>(
            &config,
            resume,
            &device,
            &mut events,
            &parallel,
        ),
        (What::Unet, true) => sd_train::train_unet_parallel::<Flex, BalancedCheckpointing>(
            &config,
            resume,
            &device,
            &mut events,
            &parallel,
        ),
        (What::Vae, false) => sd_train::train_vae_parallel::<Flex, NoCheckpointing>(
            &config,
            resume,
            &device,
            &mut events,
            &parallel,
        ),
        (What::Vae, true) => sd_train::train_vae_parallel::<Flex, BalancedCheckpointing>(
            &config,
            resume,
            &device,
            &mut events,
            &parallel,
        ),
    }
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    if config.nodes > 1 && args.node_rank > 0 {
        return Ok(format!(
            "node {}: trained {} steps in {:.1} s; node 0 wrote the output",
            args.node_rank,
            config.max_steps,
            started.elapsed().as_secs_f64()
        ));
    }
    let what = if config.lora.is_some() {
        "the LoRA"
    } else {
        "the model"
    };
    Ok(format!(
        "trained {} steps in {:.1} s; {what} is {}",
        config.max_steps,
        started.elapsed().as_secs_f64(),
        out.display()
    ))
}
