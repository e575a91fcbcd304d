//! The U-Net training loop, thin over the library pieces: data → frozen VAE and text encoder
//! (outside the autodiff graph) → [`DenoisingObjective`] → [`Gradients`] → [`AdamW`] → [`Ema`],
//! with checkpoints, resume and a JSON-lines log.
//!
//! Every random draw of optimiser step `s`, micro-batch `m` comes from generators seeded by
//! the run's seed and `(s, m)` (the data's from the sample's position), so a resumed run
//! repeats the uninterrupted one exactly.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Tensor, TensorData};
use rand::RngExt;
use rand::rngs::StdRng;
use sd::Model;
use sd::conditioner::{
    ClipConditioner, ClipTextConfig, ClipTextModel, ClipTokenizer, Conditioner, PromptSyntax,
    padding_of,
};
use sd_core::weights::{LoadOptions, SafetensorsFile, diffusers_weights_path};
use sd_data::{
    CaptionOptions, Dataset, Order, Transform, load_bucketed_image_cropped,
    load_example_image_cropped, sample_rng,
};
use sd_diffusion::training::{host_noise, offset_noise, sample_timesteps_in};
use sd_diffusion::{NoiseSchedule, PredictionType};
use sd_unet::{TextTimeConditioning, UNet2DConditionConfig, UNet2DConditionModel};

use crate::checkpoint::{
    TrainingState, copy_components, list_checkpoints, read_state, remove_partials, write_checkpoint,
};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::lora::{LoraTrainee, write_lora};
use crate::parallel::{ParallelConfig, Peer};
use crate::precision::MixedPrecision;
use crate::train_log::{StepLog, keep_log};
use crate::{
    AdamW, DenoisingBatch, DenoisingObjective, Ema, EmaConfig, GradScaler, Gradients, LrSchedule,
};

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint in the output folder (a fresh start when there is none).
    Latest,
    /// This checkpoint folder.
    Path(PathBuf),
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// About to run steps `first..total`.
    Started {
        /// Steps already taken (0 on a fresh start).
        first: u64,
        /// The step the run ends at (`max_steps`).
        total: u64,
        /// Examples in the dataset, repeats counted.
        examples: usize,
        /// The data layout recognised.
        layout: &'static str,
    },
    /// One optimiser step done.
    Step(StepLog),
    /// Latents cached for `done` of `total` images.
    Caching {
        /// Images cached so far.
        done: usize,
        /// Images to cache.
        total: usize,
    },
    /// Validation samples were written into this folder.
    Samples(PathBuf),
    /// A checkpoint was written.
    Checkpoint(PathBuf),
    /// Something the user should know that does not stop the run.
    Warning(String),
    /// A result worth a line (e.g. the fitted scaling factor).
    Info(String),
}

/// The seed of step `step`, micro-batch `micro`'s generator.
pub(crate) fn step_rng(seed: u64, step: u64, micro: u64) -> StdRng {
    sample_rng(
        seed ^ 0x7e57_5eed,
        step.wrapping_mul(1 << 20).wrapping_add(micro),
    )
}

/// The training timesteps `--min-timestep..--max-timestep`, checked against the schedule.
fn timestep_range(config: &TrainConfig, schedule: &NoiseSchedule) -> Result<Range<usize>> {
    let n = schedule.num_train_timesteps();
    let max = config.max_timestep.unwrap_or(n);
    if max > n || config.min_timestep >= max {
        return Err(TrainError::Config(format!(
            "--min-timestep {} and --max-timestep {max} must satisfy min < max <= {n} (the \
             scheduler's num_train_timesteps)",
            config.min_timestep
        )));
    }
    Ok(config.min_timestep..max)
}

fn prediction_type(config: &TrainConfig, model: &Model) -> PredictionType {
    match config.prediction_type.as_deref() {
        Some("v_prediction") => PredictionType::VPrediction,
        Some("sample") => PredictionType::Sample,
        Some(_) => PredictionType::Epsilon,
        None => model.scheduler_config().prediction_type,
    }
}

fn write_unet<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    config: &UNet2DConditionConfig,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(&config.to_json()).unwrap_or_default();
    sd_core::files::write_atomic(dir.join("config.json"), |out| {
        out.write_all(json.as_bytes()).map_err(|e| e.to_string())
    })?;
    unet.save_weights(
        config,
        dir.join("diffusion_pytorch_model.safetensors"),
        DType::F32,
    )?;
    Ok(())
}

fn read_unet<B: Backend>(
    config: &UNet2DConditionConfig,
    dir: &Path,
    device: &B::Device,
) -> Result<UNet2DConditionModel<B>> {
    let file = SafetensorsFile::open(diffusers_weights_path(dir, None)?)?;
    Ok(UNet2DConditionModel::new(config, device)?.load_weights(&file, LoadOptions::default())?)
}

fn write_text<B: Backend>(
    text: &ClipTextModel<B>,
    config: &ClipTextConfig,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(&config.to_json()).unwrap_or_default();
    sd_core::files::write_atomic(dir.join("config.json"), |out| {
        out.write_all(json.as_bytes()).map_err(|e| e.to_string())
    })?;
    text.save_weights(dir.join("model.safetensors"), DType::F32)?;
    Ok(())
}

/// The text encoder: frozen on the inner backend, trained with its own optimiser state, or
/// frozen with a LoRA trained beside it; or SDXL's two frozen encoders.
enum TextEncoder<B: Backend, C: CheckpointStrategy> {
    Frozen(ClipTextModel<B>),
    /// SDXL's two frozen encoders, as the inference pipeline wires them (the penultimate layers
    /// concatenated, the second one's projected pooled output), on captions as they are.
    Conditioner(ClipConditioner<B>),
    Trained {
        model: ClipTextModel<Autodiff<B, C>>,
        adamw: AdamW<B>,
    },
    Lora {
        trainee: LoraTrainee<Autodiff<B, C>, ClipTextModel<Autodiff<B, C>>>,
        adamw: AdamW<B>,
    },
}

/// What trains of the U-Net: its weights, or a LoRA beside them.
enum Unet<B: Backend, C: CheckpointStrategy> {
    Full(UNet2DConditionModel<Autodiff<B, C>>),
    Lora(LoraTrainee<Autodiff<B, C>, UNet2DConditionModel<Autodiff<B, C>>>),
}

/// Where the LoRA factors' first draws come from (apart from the U-Net's and text encoder's
/// own seeds, so that the same `--seed` is an unrelated stream).
const LORA_SEED: u64 = 0x10a4_5eed;

impl<B: Backend, C: CheckpointStrategy> TextEncoder<B, C> {
    /// `[batch, 77, width]`: the last layer after the final LayerNorm, as
    /// `train_text_to_image.py` takes `text_encoder(input_ids)[0]`. A trained encoder runs on
    /// its `precision` copy; a frozen one in f32.
    fn context(
        &self,
        ids: &[Vec<u32>],
        precision: MixedPrecision,
    ) -> Result<Tensor<Autodiff<B, C>, 3>> {
        Ok(match self {
            Self::Frozen(model) => Tensor::from_inner(model.forward(ids)?.last_hidden_state),
            Self::Conditioner(_) => {
                return Err(TrainError::Config(
                    "SDXL's encoders take captions, not token ids".into(),
                ));
            }
            Self::Trained { model, .. } => {
                precision
                    .compute_copy(model)
                    .forward(ids)?
                    .last_hidden_state
            }
            Self::Lora { trainee, .. } => {
                precision
                    .compute_copy(&trainee.model())
                    .forward(ids)?
                    .last_hidden_state
            }
        })
    }
}

/// The state restored from a checkpoint.
struct Restored<B: Backend, C: CheckpointStrategy> {
    state: TrainingState,
    unet: Unet<B, C>,
    ema: Option<UNet2DConditionModel<B>>,
    adamw: AdamW<B>,
    text: Option<TextEncoder<B, C>>,
}

fn restore<B: Backend, C: CheckpointStrategy>(
    dir: &Path,
    config: &TrainConfig,
    unet_config: &UNet2DConditionConfig,
    device: &B::Device,
) -> Result<Restored<B, C>> {
    let state = read_state(dir)?;
    let unet = read_unet::<Autodiff<B, C>>(unet_config, &dir.join("unet"), device)?;
    let ema = match state.ema_steps {
        Some(_) => Some(read_unet::<B>(unet_config, &dir.join("unet_ema"), device)?),
        None => None,
    };
    let first = read_unet::<B>(unet_config, &dir.join("optimizer/exp_avg"), device)?;
    let second = read_unet::<B>(unet_config, &dir.join("optimizer/exp_avg_sq"), device)?;
    let adamw = AdamW::from_moment_modules(config.adam, state.optimizer_steps(), &first, &second)?;
    let text = if config.train_text_encoder {
        let model =
            ClipTextModel::<Autodiff<B, C>>::from_pretrained(dir.join("text_encoder"), device)?;
        let moments = |name: &str| {
            ClipTextModel::<B>::from_pretrained(dir.join("optimizer").join(name), device)
        };
        let (first, second) = (
            moments("text_encoder_exp_avg")?,
            moments("text_encoder_exp_avg_sq")?,
        );
        let adamw =
            AdamW::from_moment_modules(config.adam, state.optimizer_steps(), &first, &second)?;
        Some(TextEncoder::Trained { model, adamw })
    } else {
        None
    };
    Ok(Restored {
        state,
        unet: Unet::Full(unet),
        ema,
        adamw,
        text,
    })
}

/// What trains in a run: the U-Net's part, and the text encoder's when it trains.
type Trainees<B, C> = (Unet<B, C>, Option<TextEncoder<B, C>>);

/// A LoRA run's fresh U-Net (and text-encoder) trainees: the model's weights frozen, new
/// factors from the run's seed.
fn lora_trainees<B: Backend, C: CheckpointStrategy>(
    model: &Model,
    config: &TrainConfig,
    lora: &crate::LoraConfig,
    device: &B::Device,
) -> Result<Trainees<B, C>> {
    let unet_config = model.unet_config();
    let unet = LoraTrainee::new(
        model.load_unet::<Autodiff<B, C>>(device)?,
        sd_lora::Component::Unet,
        lora,
        (&sd_unet::checkpoint_key, &|m| {
            unet_config.stores_linear_as_conv(m)
        }),
        config.seed ^ LORA_SEED,
        device,
    )?;
    let text = if config.train_text_encoder {
        let trainee = LoraTrainee::new(
            model.load_text_encoder::<Autodiff<B, C>>(0, device)?,
            sd_lora::Component::TextEncoder,
            lora,
            (&sd::conditioner::text_checkpoint_key, &|_| false),
            config.seed ^ LORA_SEED ^ 1,
            device,
        )?;
        Some(TextEncoder::Lora {
            trainee,
            adamw: AdamW::new(config.adam)?,
        })
    } else {
        None
    };
    Ok((Unet::Lora(unet), text))
}

/// A LoRA run's state from a checkpoint: its factors and moments on fresh trainees.
fn restore_lora<B: Backend, C: CheckpointStrategy>(
    dir: &Path,
    model: &Model,
    config: &TrainConfig,
    lora: &crate::LoraConfig,
    device: &B::Device,
) -> Result<Restored<B, C>> {
    let state = read_state(dir)?;
    let (unet, text) = lora_trainees::<B, C>(model, config, lora, device)?;
    let Unet::Lora(unet) = unet else {
        unreachable!("lora_trainees makes LoRA trainees")
    };
    let (unet, adamw) = unet.restore(dir, "unet", config.adam, state.optimizer_steps(), device)?;
    let text = match text {
        Some(TextEncoder::Lora { trainee, .. }) => {
            let (trainee, adamw) = trainee.restore(
                dir,
                "text_encoder",
                config.adam,
                state.optimizer_steps(),
                device,
            )?;
            Some(TextEncoder::Lora { trainee, adamw })
        }
        other => other,
    };
    Ok(Restored {
        state,
        unet: Unet::Lora(unet),
        ema: None,
        adamw,
        text,
    })
}

/// The data folder, opened and checked before any work: every image's header, or (with
/// `--skip-bad-images`) the unreadable ones left out and counted in a warning.
pub(crate) fn open_dataset(config: &TrainConfig, events: &mut dyn FnMut(Event)) -> Result<Dataset> {
    let dataset = Dataset::open(&config.data, config.caption_column.as_deref())?;
    if !config.skip_bad_images {
        dataset.check_images()?;
        return Ok(dataset);
    }
    let (kept, bad) = dataset.without_bad_images();
    if let Some(first) = bad.first() {
        events(Event::Warning(format!(
            "skipped {} unreadable image(s), the first: {first}",
            bad.len()
        )));
    }
    if kept.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no readable image is left",
            config.data.display()
        )));
    }
    Ok(kept)
}

/// Creates the output folder, removes what a killed run left half-written, and refuses to
/// start afresh over another run's checkpoints.
pub(crate) fn prepare_output(output: &Path, resume: Option<&Resume>) -> Result<()> {
    std::fs::create_dir_all(output)
        .map_err(|e| TrainError::Io(format!("{}: {e}", output.display())))?;
    remove_partials(output);
    if resume.is_none() && !list_checkpoints(output).is_empty() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints: continue with --resume latest, or choose another \
             --output",
            output.display()
        )));
    }
    Ok(())
}

/// The checkpoint a run resumes from, read by `restore`: the given folder, or for `latest` the
/// newest complete one that reads back (a damaged one is reported and the one before it
/// tried). A checkpoint written with other settings is refused.
pub(crate) fn first_restorable<T>(
    output: &Path,
    resume: Option<&Resume>,
    config: &TrainConfig,
    events: &mut dyn FnMut(Event),
    mut restore: impl FnMut(&Path) -> Result<T>,
    state: impl Fn(&T) -> &TrainingState,
) -> Result<Option<T>> {
    let candidates: Vec<PathBuf> = match resume {
        None => Vec::new(),
        Some(Resume::Path(p)) => vec![p.clone()],
        Some(Resume::Latest) => list_checkpoints(output)
            .into_iter()
            .rev()
            .map(|(_, p)| p)
            .collect(),
    };
    for dir in &candidates {
        match restore(dir) {
            Ok(r) => {
                if !same_run(&state(&r).config, config) {
                    return Err(TrainError::Config(format!(
                        "{}: the checkpoint was written with other settings; resume with the \
                         same ones (only --max-steps, --checkpoint-every and --keep may change)",
                        dir.display()
                    )));
                }
                return Ok(Some(r));
            }
            Err(e) if matches!(resume, Some(Resume::Latest)) => events(Event::Warning(format!(
                "{}: cannot be resumed from ({e}); trying the one before",
                dir.display()
            ))),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The settings a resume must share with the run that wrote the checkpoint: everything but
/// the run's length and its checkpoint cadence.
pub(crate) fn same_run(a: &TrainConfig, b: &TrainConfig) -> bool {
    let strip = |c: &TrainConfig| TrainConfig {
        max_steps: 0,
        checkpoint_every: 0,
        keep: 0,
        validation_prompts: Vec::new(),
        validation_every: 0,
        validation_steps: 0,
        output: PathBuf::new(),
        ..c.clone()
    };
    strip(a) == strip(b)
}

/// Trains the U-Net of `config.model` on `config.data`, writing into `config.output`; returns
/// the final diffusers folder (the output folder itself), or with `config.lora` the LoRA file
/// written there. `C` is Burn's checkpointing
/// strategy: `NoCheckpointing`, or `BalancedCheckpointing` to recompute cheap activations in
/// the backward pass instead of keeping them (gradient checkpointing: less memory, more time).
pub fn train_unet<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    train_unet_parallel::<B, C>(config, resume, device, events, &ParallelConfig::default())
}

/// [`train_unet`] as one node of a data-parallel run: `config.devices` peers on threads of
/// this process (peer 0 on the calling thread, the one that reports `events`), and with
/// `config.nodes` above 1 this process as node `parallel.node_rank` of several, which find
/// each other through the orchestrator. Node 0's first peer writes the output; the result of
/// every peer is the same.
pub fn train_unet_parallel<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
    parallel: &ParallelConfig,
) -> Result<PathBuf> {
    config.validate()?;
    if config.discriminator.is_some() {
        return Err(TrainError::Config(
            "the discriminator (--discriminator-start, `discriminator` in train.toml) is part \
             of `sd train vae`'s objective, not the U-Net's"
                .into(),
        ));
    }
    run_peers::<B>(config, device, events, parallel, &|peer, events| {
        run_unet::<B, C>(config, resume.clone(), device, events, peer)
    })
}

/// One peer's whole run, given its peer and its event sink.
pub(crate) type PeerRun<'a, B> =
    dyn Fn(&Peer<B>, &mut dyn FnMut(Event)) -> Result<PathBuf> + Sync + 'a;

/// Runs `run` as every peer of this node: `config.devices` threads (peer 0 on the calling
/// thread, the one that reports `events`), each registered with the others (and, with
/// `config.nodes` above 1, with the other nodes through the orchestrator); the one failure
/// that caused the others is returned.
pub(crate) fn run_peers<B: Backend>(
    config: &TrainConfig,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
    parallel: &ParallelConfig,
    run: &PeerRun<'_, B>,
) -> Result<PathBuf> {
    let (devices, nodes) = (config.devices, config.nodes);
    if devices * nodes == 1 {
        return run(&Peer::single(), events);
    }
    let peer_run = |local: usize, events: &mut dyn FnMut(Event)| -> Result<PathBuf> {
        let peer = Peer::<B>::register(devices, nodes, local, parallel, device)?;
        let result = run(&peer, events);
        peer.finish(result.is_err());
        result
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..devices)
            .map(|local| scope.spawn(move || peer_run(local, &mut |_| {})))
            .collect();
        let first = peer_run(0, events);
        let mut results = vec![first];
        for handle in others {
            results.push(
                handle.join().unwrap_or_else(|_| {
                    Err(TrainError::Parallel("a peer's thread panicked".into()))
                }),
            );
        }
        // The cause: the first failure that is not another peer's reaction to it (those name
        // the collective that broke), else the first failure, else peer 0's result.
        let cause = results
            .iter()
            .position(|r| matches!(r, Err(e) if !matches!(e, TrainError::Parallel(_))))
            .or_else(|| results.iter().position(Result::is_err))
            .unwrap_or(0);
        results.swap_remove(cause)
    })
}

/// One peer's run (the only one without data parallelism).
fn run_unet<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
    peer: &Peer<B>,
) -> Result<PathBuf> {
    // `config` was validated by `train_unet_parallel`, the only caller.
    let root = peer.is_root();
    let transform = Transform {
        resolution: config.resolution,
        center_crop: config.center_crop,
        random_flip: config.random_flip,
    };
    transform.validate()?;
    let captions = CaptionOptions {
        dropout: config.caption_dropout,
        ..Default::default()
    };
    captions.validate()?;
    let dataset = open_dataset(config, events)?;
    // With `--init` alone, the init folder provides the other components too.
    let spec = match (&config.model, &config.init) {
        (Some(model), _) => model.clone(),
        (None, Some(init)) => init.display().to_string(),
        (None, None) => String::new(),
    };
    let model = Model::open(&spec)?;
    // SDXL: the U-Net (or its LoRA) on both frozen text encoders, with its pooled and
    // size/crop conditioning, as diffusers' `train_text_to_image_sdxl.py`.
    let sdxl = model.family() == sd::ModelFamily::Sdxl;
    if sdxl {
        let refused = [
            (config.train_text_encoder, "--train-text-encoder"),
            (
                config.lora.is_some() && config.train_text_encoder,
                "--lora-rank with --train-text-encoder",
            ),
            (config.summary_dropout > 0.0, "--summary-dropout"),
        ];
        if let Some((_, flag)) = refused.iter().find(|(on, _)| *on) {
            return Err(TrainError::Config(format!(
                "{flag} is not supported with SDXL models yet (their U-Net trains on both \
                 frozen text encoders)"
            )));
        }
    }
    let base = model.path().to_path_buf();
    if !base.join("model_index.json").is_file() {
        return Err(TrainError::Config(format!(
            "{}: training needs a diffusers folder; convert a single file first with `sd \
             convert`",
            base.display()
        )));
    }
    let unet_config = match &config.init {
        Some(dir) => UNet2DConditionConfig::from_file(dir.join("unet/config.json"))?,
        None => model.unet_config().clone(),
    };
    // An inpainting U-Net reads the mask and the masked image's latents after the noisy
    // latents (2c + 1 channels).
    let latent_channels = model.vae_config().latent_channels;
    let inpainting = unet_config.in_channels == 2 * latent_channels + 1;
    if unet_config.in_channels != latent_channels && !inpainting {
        return Err(TrainError::Config(format!(
            "the U-Net takes {} channels but the VAE makes {latent_channels}-channel latents \
             (a U-Net takes {latent_channels}, an inpainting one {})",
            unet_config.in_channels,
            2 * latent_channels + 1
        )));
    }
    if inpainting && config.cache_latents {
        return Err(TrainError::Config(
            "--cache-latents with an inpainting U-Net: its masked images are drawn anew every \
             step and encoded with them"
                .into(),
        ));
    }
    if inpainting && !config.validation_prompts.is_empty() {
        return Err(TrainError::Config(
            "--validation-prompt renders text-to-image, which an inpainting U-Net does not do"
                .into(),
        ));
    }
    let output = &config.output;
    if root {
        prepare_output(output, resume.as_ref())?;
    }

    let restored = first_restorable(
        output,
        resume.as_ref(),
        config,
        events,
        |dir| match &config.lora {
            Some(lora) => restore_lora::<B, C>(dir, &model, config, lora, device),
            None => restore::<B, C>(dir, config, &unet_config, device),
        },
        |r| &r.state,
    )?;

    let text_config = model
        .text_configs()?
        .into_iter()
        .next()
        .ok_or_else(|| TrainError::Config("the model has no text encoder".into()))?;
    let mut scaler_state = None;
    let (start, mut unet, mut adamw, mut ema, restored_text) = match restored {
        Some(r) => {
            let ema = match (r.ema, config.ema_decay) {
                (Some(m), Some(decay)) => Some(Ema::resume(
                    EmaConfig {
                        decay,
                        ..Default::default()
                    },
                    m,
                    r.state.ema_steps.unwrap_or(0),
                )?),
                _ => None,
            };
            scaler_state = r.state.grad_scaler;
            (r.state.step, r.unet, r.adamw, ema, r.text)
        }
        None if config.lora.is_some() => {
            let lora = config.lora.as_ref().expect("checked by the guard");
            let (unet, text) = lora_trainees::<B, C>(&model, config, lora, device)?;
            (0, unet, AdamW::new(config.adam)?, None, text)
        }
        None => {
            let unet: UNet2DConditionModel<Autodiff<B, C>> = match &config.init {
                Some(_) => {
                    // Random initial weights from the run's seed: the same run twice starts
                    // (and so ends) the same.
                    <Autodiff<B, C> as Backend>::seed(device, config.seed);
                    UNet2DConditionModel::new(&unet_config, device)?
                }
                None => model.load_unet(device)?,
            };
            let ema = match config.ema_decay {
                Some(decay) => Some(Ema::new(
                    EmaConfig {
                        decay,
                        ..Default::default()
                    },
                    unet.valid(),
                )?),
                None => None,
            };
            (0, Unet::Full(unet), AdamW::new(config.adam)?, ema, None)
        }
    };
    if peer.world() > 1 {
        // Every peer must go on from the same checkpoint.
        let mean = peer.mean(&[start as f64], device)?[0];
        if mean != start as f64 {
            return Err(TrainError::Parallel(format!(
                "the peers resume from different steps (this one from {start}): give each the \
                 same --output contents"
            )));
        }
    }
    // A text encoder folder with a config but no weights (a from-scratch `--init` folder)
    // starts from random weights; one with weights fine-tunes them.
    let text_weights = base.join("text_encoder/model.safetensors").is_file();
    let mut text = match (config.train_text_encoder, restored_text) {
        (_, Some(text)) => text,
        (true, None) => TextEncoder::Trained {
            model: if text_weights {
                model.load_text_encoder::<Autodiff<B, C>>(0, device)?
            } else {
                <Autodiff<B, C> as Backend>::seed(device, config.seed.wrapping_add(1));
                ClipTextModel::new(&text_config, false, device)?
            },
            adamw: AdamW::new(config.adam)?,
        },
        (false, _) if sdxl => {
            TextEncoder::Conditioner(model.load_conditioner::<B>(PromptSyntax::Plain, 0, device)?)
        }
        (false, _) => TextEncoder::Frozen(model.load_text_encoder::<B>(0, device)?),
    };
    // f16 needs its loss scaled (bf16 and f32 do not): a resumed run goes on with the scale
    // and skip count its checkpoint kept.
    let mut scaler = match (config.mixed_precision, scaler_state) {
        (MixedPrecision::F16, Some(state)) => Some(GradScaler::restore(config.grad_scaler, state)?),
        (MixedPrecision::F16, None) => Some(GradScaler::new(config.grad_scaler)?),
        _ => None,
    };
    let tokenizer_dir = base.join("tokenizer");
    let tokenizer = ClipTokenizer::from_folder(&tokenizer_dir, padding_of(&tokenizer_dir))?;
    if root {
        std::fs::write(output.join("train_config.json"), config.to_json())
            .map_err(|e| TrainError::Io(format!("{}: {e}", output.display())))?;
    }

    // The VAE is frozen, on the inner backend: no autodiff graph, no gradients.
    let encoder = model.load_vae_encoder::<B>(device)?;
    let schedule = NoiseSchedule::new(&model.scheduler_config().noise_schedule())?;
    let timestep_range = timestep_range(config, &schedule)?;
    let objective = DenoisingObjective {
        schedule: schedule.clone(),
        prediction: prediction_type(config, &model),
        snr_gamma: config.snr_gamma,
    };
    let lr = LrSchedule::new(
        config.learning_rate,
        config.lr_scheduler,
        config.lr_warmup_steps,
        config.max_steps,
    )?;
    // The text encoder's rate follows the same schedule from its own base (kohya's
    // `--text_encoder_lr`: one scheduler over two parameter groups).
    let text_lr = LrSchedule::new(
        config.text_encoder_lr.unwrap_or(config.learning_rate),
        config.lr_scheduler,
        config.lr_warmup_steps,
        config.max_steps,
    )?;
    let mut order = Order::new(dataset.len(), config.seed);
    // Aspect-ratio buckets: each example's (bucket, resized size) from its header, and the
    // run's batches drawn bucket by bucket.
    let mut buckets = match config.bucket {
        None => None,
        Some(bucket) => {
            bucket.validate()?;
            let factor = model.vae_scale_factor() as u32;
            if !bucket.step.is_multiple_of(factor) {
                return Err(TrainError::Config(format!(
                    "--bucket-reso-steps {} is not a multiple of the VAE's factor {factor}",
                    bucket.step
                )));
            }
            let mut assigned = Vec::with_capacity(dataset.len());
            for example in dataset.examples() {
                let (w, h) = sd_core::image_io::image_dimensions(&example.image)?;
                assigned.push(bucket.assign(w, h));
            }
            let shapes: Vec<(u32, u32)> = assigned.iter().map(|a| a.0).collect();
            let batches = sd_data::BucketBatches::new(&shapes, config.batch_size, config.seed);
            Some((assigned, batches))
        }
    };
    let cache = if config.cache_latents {
        let weights = diffusers_weights_path(base.join("vae"), None)?;
        let vae_hash = file_hash(&weights)?;
        let mut progress = |done: usize, total: usize| {
            if done == total || done.is_multiple_of(100) {
                events(Event::Caching { done, total });
            }
        };
        let size_of = |i: usize| match &buckets {
            Some((assigned, _)) => {
                let (bucket, resized) = assigned[i];
                crate::CacheSize::Bucket { bucket, resized }
            }
            None => crate::CacheSize::Square,
        };
        let vae = (
            &encoder,
            model.vae_config().latent_channels,
            vae_hash.as_str(),
        );
        let dir = output.join("latent_cache");
        // Several peers: each encodes its share first; once all have, each reads the whole
        // cache (and encodes what is missing, where nodes do not share the folder).
        let mut build = |share| {
            crate::LatentCache::build(
                &dataset,
                &transform,
                &size_of,
                vae,
                &dir,
                device,
                share,
                &mut progress,
            )
        };
        if peer.world() > 1 {
            build(Some((peer.rank(), peer.world())))?;
            peer.mean(&[0.0], device)?;
        }
        Some(build(None)?)
    } else {
        None
    };
    // SDXL's cached conditioning: both encoders' outputs by caption.
    let mut sdxl_cache = match (&text, config.cache_text_embeddings) {
        (TextEncoder::Conditioner(_), true) => Some(crate::text_cache::ConditioningCache::new(
            &output.join("text_cache"),
            &format!(
                "{}-{}",
                folder_weights_hash(&base.join("text_encoder"))?,
                folder_weights_hash(&base.join("text_encoder_2"))?
            ),
        )?),
        _ => None,
    };
    let mut text_cache = match (&text, config.cache_text_embeddings && !sdxl) {
        (TextEncoder::Frozen(_), true) => Some(crate::text_cache::TextCache::new(
            &output.join("text_cache"),
            &folder_weights_hash(&base.join("text_encoder"))?,
            text_config.max_position_embeddings,
            text_config.hidden_size,
        )?),
        (_, true) => {
            return Err(TrainError::Config(
                "--cache-text-embeddings needs a frozen text encoder (no --train-text-encoder)"
                    .into(),
            ));
        }
        (_, false) => None,
    };
    let log_path = output.join("train_log.jsonl");
    // Peer 0 alone writes: the log, checkpoints, samples and the final folder.
    let mut log = if root {
        Some(keep_log(&log_path, start)?)
    } else {
        None
    };
    events(Event::Started {
        first: start,
        total: config.max_steps,
        examples: dataset.len(),
        layout: dataset.layout(),
    });

    let accumulation = config.gradient_accumulation as u64;
    let batch = config.batch_size;
    let started = Instant::now();
    let trained: &[&str] = if config.train_text_encoder {
        &["unet", "text_encoder"]
    } else {
        &["unet"]
    };
    let save = |step: u64,
                unet: &Unet<B, C>,
                adamw: &AdamW<B>,
                ema: &Option<Ema<UNet2DConditionModel<B>>>,
                text: &TextEncoder<B, C>,
                scaler: &Option<GradScaler>|
     -> Result<PathBuf> {
        let state = TrainingState {
            step,
            ema_steps: ema.as_ref().map(Ema::steps),
            grad_scaler: scaler.as_ref().map(GradScaler::state),
            config: config.clone(),
        };
        write_checkpoint(output, &state, config.keep, |dir| {
            // A LoRA checkpoint holds the factors alone; a full one is a diffusers folder.
            let unet = match unet {
                Unet::Lora(trainee) => {
                    trainee.save(adamw, dir, "unet")?;
                    if let TextEncoder::Lora { trainee, adamw } = text {
                        trainee.save(adamw, dir, "text_encoder")?;
                    }
                    return Ok(());
                }
                Unet::Full(unet) => unet,
            };
            copy_components(&base, dir, trained)?;
            let inner = unet.valid();
            write_unet(&inner, &unet_config, &dir.join("unet"))?;
            if let Some(ema) = ema {
                write_unet(ema.model(), &unet_config, &dir.join("unet_ema"))?;
            }
            let (first, second) = adamw.moment_modules(&inner)?;
            write_unet(&first, &unet_config, &dir.join("optimizer/exp_avg"))?;
            write_unet(&second, &unet_config, &dir.join("optimizer/exp_avg_sq"))?;
            if let TextEncoder::Trained { model, adamw } = text {
                let inner = model.valid();
                write_text(&inner, &text_config, &dir.join("text_encoder"))?;
                let (first, second) = adamw.moment_modules(&inner)?;
                write_text(
                    &first,
                    &text_config,
                    &dir.join("optimizer/text_encoder_exp_avg"),
                )?;
                write_text(
                    &second,
                    &text_config,
                    &dir.join("optimizer/text_encoder_exp_avg_sq"),
                )?;
            }
            Ok(())
        })
    };

    for step in start..config.max_steps {
        let mut grads = Gradients::<B>::new();
        let mut text_grads = Gradients::<B>::new();
        let mut loss_sum = 0.0;
        for micro in 0..accumulation {
            // This micro-batch's (run position, example) pairs and its image size: `batch`
            // examples in the run's order, or one bucket's batch (which may be shorter).
            // With data parallelism, this peer's `batch` examples of the global batch, or with
            // buckets this peer's own bucket batch (as kohya's scripts under accelerate: each
            // process its batches, their gradients averaged).
            let global = step * accumulation + micro;
            let world_batch = (batch * peer.world()) as u64;
            let first = (peer.rank() * batch) as u64;
            let (members, (width, height)): (Vec<(u64, usize)>, (u32, u32)) = match &mut buckets {
                None => (
                    (0..batch as u64)
                        .map(|j| {
                            let sample = global * world_batch + first + j;
                            (sample, order.example(sample))
                        })
                        .collect(),
                    (config.resolution, config.resolution),
                ),
                Some((assigned, batches)) => {
                    let index = global * peer.world() as u64 + peer.rank() as u64;
                    let picked = batches.batch(index);
                    let size = picked.first().map_or((0, 0), |&e| assigned[e].0);
                    (
                        picked
                            .into_iter()
                            .enumerate()
                            .map(|(j, e)| (index * batch as u64 + j as u64, e))
                            .collect(),
                        size,
                    )
                }
            };
            let n = members.len();
            let (w, h) = (width as usize, height as usize);
            let mut images = Vec::with_capacity(n * 3 * w * h);
            let (mut means, mut stds) = (Vec::new(), Vec::new());
            let mut cache_shape = None;
            let mut texts = Vec::with_capacity(n);
            let mut summary_drops = Vec::with_capacity(n);
            let mut masks = Vec::new();
            let mut crops = Vec::with_capacity(n);
            for &(sample, index) in &members {
                let example = &dataset.examples()[index];
                let mut rng = sample_rng(config.seed, sample);
                match &cache {
                    Some(cache) => {
                        let entry = cache.get(&example.image).ok_or_else(|| {
                            TrainError::Io(format!(
                                "{}: not in the latent cache",
                                example.image.display()
                            ))
                        })?;
                        // A batch is one bucket's: every entry has its shape.
                        if cache_shape.is_some_and(|s| s != entry.shape) {
                            return Err(TrainError::Io(format!(
                                "{}: a cached latent of shape {:?} in a batch of {:?}",
                                example.image.display(),
                                entry.shape,
                                cache_shape
                            )));
                        }
                        cache_shape = Some(entry.shape);
                        means.extend_from_slice(&entry.mean);
                        stds.extend_from_slice(&entry.std);
                        crops.push(entry.crop);
                    }
                    None => {
                        let (pixels, crop) = match &buckets {
                            Some((assigned, _)) => {
                                let (bucket, resized) = assigned[index];
                                load_bucketed_image_cropped(
                                    &example.image,
                                    bucket,
                                    resized,
                                    &transform,
                                    &mut rng,
                                )?
                            }
                            None => {
                                load_example_image_cropped(&example.image, &transform, &mut rng)?
                            }
                        };
                        images.extend(pixels);
                        crops.push(crop);
                    }
                }
                texts.push(captions.caption(&example.captions, &mut rng));
                if config.summary_dropout > 0.0 {
                    // A stream of its own, so that runs without it draw what they drew before.
                    let mut rng = sample_rng(config.seed ^ 0x5a3d_d409, sample);
                    summary_drops.push(rng.random::<f64>() < config.summary_dropout);
                }
                if inpainting {
                    masks.extend(crate::inpainting::random_mask(w, h, &mut rng));
                }
            }
            // The first encoder's token ids, once (SDXL's conditioner tokenizes for itself);
            // with summaries to drop, the empty caption's after the batch's.
            let drop_summaries = summary_drops.contains(&true);
            let ids = match text {
                TextEncoder::Conditioner(_) => Vec::new(),
                _ => texts
                    .iter()
                    .map(String::as_str)
                    .chain(drop_summaries.then_some(""))
                    .map(|t| tokenizer.encode_padded(t))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            };
            let (context, text_time) = match (&text, &mut text_cache) {
                (TextEncoder::Conditioner(conditioner), _) => {
                    let (context, pooled) = match &mut sdxl_cache {
                        Some(cache) => cache.conditioning(conditioner, &texts, device)?,
                        None => {
                            let prompts: Vec<&str> = texts.iter().map(String::as_str).collect();
                            let c = conditioner.encode(&prompts)?;
                            let pooled = c.pooled.ok_or_else(|| {
                                TrainError::Config(
                                    "the SDXL text encoders gave no pooled embedding".into(),
                                )
                            })?;
                            (c.context, pooled)
                        }
                    };
                    // (original height, width, crop top, left, target height, width).
                    let time_ids = crops
                        .iter()
                        .map(|c| {
                            let f = f64::from;
                            [
                                f(c.original.1),
                                f(c.original.0),
                                f(c.top_left.1),
                                f(c.top_left.0),
                                f(height),
                                f(width),
                            ]
                        })
                        .collect();
                    let text_time = TextTimeConditioning {
                        text_embeds: Tensor::from_inner(pooled),
                        time_ids,
                    };
                    (Tensor::from_inner(context), Some(text_time))
                }
                (TextEncoder::Frozen(model), Some(cache)) => (
                    Tensor::from_inner(cache.context(model, &ids, device)?),
                    None,
                ),
                _ => (text.context(&ids, config.mixed_precision)?, None),
            };
            let context = if drop_summaries {
                crate::summary_dropout::drop_summaries(
                    context,
                    &ids,
                    tokenizer.eos(),
                    &summary_drops,
                )
            } else {
                context
            };
            // The draws of this micro-batch, in a fixed order: posterior, noise, offset,
            // perturbation, timesteps; each for the whole global batch, of which this peer
            // takes its rows (all of them without data parallelism). With buckets the peers'
            // batches differ in size and shape: each draws its own, from a stream of its own.
            let (draw_world, draw_rank, stream) = match &buckets {
                Some(_) => (1, 0, micro * peer.world() as u64 + peer.rank() as u64),
                None => (peer.world(), peer.rank(), micro),
            };
            let mut rng = step_rng(config.seed, step, stream);
            let whole = |[n, c, h, w]: [usize; 4]| [n * draw_world, c, h, w];
            let rows = |t: Tensor<B, 4>, n: usize| {
                if draw_world == 1 { t } else { peer.rows(t, n) }
            };
            let mut masked_pixels = None;
            let latents = match &cache {
                Some(_) => {
                    let [c, h, w] = cache_shape.ok_or_else(|| {
                        TrainError::Config("an empty batch from the latent cache".into())
                    })?;
                    let shape = [n, c, h, w];
                    let mean = Tensor::<B, 4>::from_data(TensorData::new(means, shape), device);
                    let std = Tensor::<B, 4>::from_data(TensorData::new(stds, shape), device);
                    let draw = rows(host_noise::<B, 4>(whole(shape), &mut rng, device), n);
                    encoder.scale_latents(mean + std * draw)
                }
                None => {
                    let masked = inpainting
                        .then(|| crate::inpainting::masked_images(&images, &masks, n, w, h));
                    let images =
                        Tensor::<B, 4>::from_data(TensorData::new(images, [n, 3, h, w]), device);
                    let posterior = encoder.encode(images)?;
                    let dims = whole(posterior.mean.dims());
                    let draw = rows(host_noise::<B, 4>(dims, &mut rng, device), n);
                    masked_pixels = masked;
                    encoder.scale_latents(posterior.sample(draw))
                }
            };
            // An inpainting U-Net's extra channels: the mask at the latents' size and the
            // masked images' latents (a posterior sample, as the latents).
            let conditioning = match masked_pixels.take() {
                Some(masked) => {
                    let [_, _, lh, lw] = latents.dims();
                    let factor = h / lh;
                    let mask = crate::inpainting::latent_masks(&masks, n, w, h, factor);
                    let mask =
                        Tensor::<B, 4>::from_data(TensorData::new(mask, [n, 1, lh, lw]), device);
                    let masked =
                        Tensor::<B, 4>::from_data(TensorData::new(masked, [n, 3, h, w]), device);
                    let posterior = encoder.encode(masked)?;
                    let dims = whole(posterior.mean.dims());
                    let draw = rows(host_noise::<B, 4>(dims, &mut rng, device), n);
                    let masked = encoder.scale_latents(posterior.sample(draw));
                    Some(Tensor::from_inner(Tensor::cat(vec![mask, masked], 1)))
                }
                None => None,
            };
            let mut noise = host_noise::<B, 4>(whole(latents.dims()), &mut rng, device);
            if config.noise_offset > 0.0 {
                noise = offset_noise(noise, config.noise_offset, &mut rng);
            }
            let perturbation = (config.input_perturbation > 0.0).then(|| {
                let draw = host_noise::<B, 4>(whole(latents.dims()), &mut rng, device);
                rows(draw * config.input_perturbation, n)
            });
            let noise = rows(noise, n);
            let mut timesteps =
                sample_timesteps_in(timestep_range.clone(), n * draw_world, &mut rng);
            timesteps = timesteps.split_off(draw_rank * n)[..n].to_vec();
            let input = DenoisingBatch {
                latents: Tensor::from_inner(latents),
                context,
                noise: Tensor::from_inner(noise),
                timesteps,
                perturbation: perturbation.map(Tensor::from_inner),
                conditioning,
                text_time,
            };
            let precision = config.mixed_precision;
            let loss = match &unet {
                Unet::Full(unet) => objective.loss(&precision.compute_copy(unet), input)?,
                Unet::Lora(trainee) => {
                    objective.loss(&precision.compute_copy(&trainee.model()), input)?
                }
            };
            // The global batch's loss: the mean of the peers' (equal-sized) batches' losses,
            // so that every peer sees a non-finite one and stops together.
            let value: f64 = loss.clone().into_scalar().elem();
            let value = peer.mean(&[value], device)?[0];
            if !value.is_finite() {
                let last = list_checkpoints(output)
                    .last()
                    .map(|(_, p)| format!("; the last good checkpoint is {}", p.display()))
                    .unwrap_or_default();
                return Err(TrainError::NonFinite(format!(
                    "step {}: the loss is {value}: training stopped{last}",
                    step + 1
                )));
            }
            loss_sum += value;
            // Under f16 the loss is scaled so that small gradients survive the f16 backward
            // pass; they are unscaled before clipping.
            let factor = scaler.as_ref().map_or(1.0, GradScaler::scale) / accumulation as f64;
            let mut backward = loss.mul_scalar(factor).backward();
            match &unet {
                Unet::Full(unet) => grads.accumulate(unet, &mut backward),
                Unet::Lora(trainee) => grads.accumulate(&trainee.network, &mut backward),
            }
            match &text {
                TextEncoder::Trained { model, .. } => text_grads.accumulate(model, &mut backward),
                TextEncoder::Lora { trainee, .. } => {
                    text_grads.accumulate(&trainee.network, &mut backward)
                }
                TextEncoder::Frozen(_) | TextEncoder::Conditioner(_) => {}
            }
        }
        // Data parallelism: every peer steps with the mean of the peers' gradients.
        peer.mean_gradients(&mut [&mut grads, &mut text_grads])?;
        // An f16 backward pass that overflowed skips the optimiser step (and the learning-rate
        // schedule's) and backs the scale off; the loss scale the step used is logged.
        let loss_scale = scaler.as_ref().map(GradScaler::scale);
        let skipped = match &scaler {
            Some(scaler) => scaler.unscale(&mut [&mut grads, &mut text_grads]),
            None => false,
        };
        let grad_norm = Gradients::clip_global_norm_all(
            &mut [&mut grads, &mut text_grads],
            config.max_grad_norm,
        );
        if !grad_norm.is_finite() && !skipped {
            return Err(TrainError::NonFinite(format!(
                "step {}: the gradient norm is {grad_norm}: training stopped",
                step + 1
            )));
        }
        let scheduled = step - scaler.as_ref().map_or(0, GradScaler::skipped_steps);
        let (rate, text_rate) = (lr.lr(scheduled), text_lr.lr(scheduled));
        if let Some(scaler) = scaler.as_mut() {
            scaler.update(skipped);
        }
        // A skipped step still counts, and the EMA still updates, as in diffusers' loop.
        if !skipped {
            unet = match unet {
                Unet::Full(unet) => Unet::Full(adamw.step(unet, grads, rate)),
                Unet::Lora(mut trainee) => {
                    trainee.network = adamw.step(trainee.network, grads, rate);
                    Unet::Lora(trainee)
                }
            };
            text = match text {
                TextEncoder::Trained { model, mut adamw } => {
                    let model = adamw.step(model, text_grads, text_rate);
                    TextEncoder::Trained { model, adamw }
                }
                TextEncoder::Lora {
                    mut trainee,
                    mut adamw,
                } => {
                    trainee.network = adamw.step(trainee.network, text_grads, text_rate);
                    TextEncoder::Lora { trainee, adamw }
                }
                frozen => frozen,
            };
        }
        if let (Some(ema), Unet::Full(unet)) = (ema.as_mut(), &unet) {
            ema.update(&unet.valid())?;
        }
        let entry = StepLog {
            step: step + 1,
            loss: loss_sum / accumulation as f64,
            lr: rate,
            grad_norm,
            time: started.elapsed().as_secs_f64(),
            loss_scale,
            skipped,
            adversarial_weight: None,
            discriminator_loss: None,
        };
        if let Some(log) = log.as_mut() {
            writeln!(log, "{}", serde_json::to_string(&entry).unwrap_or_default())
                .and_then(|()| log.flush())
                .map_err(|e| TrainError::Io(format!("{}: {e}", log_path.display())))?;
        }
        events(Event::Step(entry));
        let done = step + 1;
        let due = config.checkpoint_every > 0 && done % config.checkpoint_every == 0;
        let mut stop = crate::stop_requested();
        if peer.world() > 1 {
            // One peer asked to stop (Ctrl-C reaches each process): all stop at this step.
            stop = peer.mean(&[if stop { 1.0 } else { 0.0 }], device)?[0] > 0.0;
        }
        if due || done == config.max_steps || stop {
            let path = if root {
                let path = save(done, &unet, &adamw, &ema, &text, &scaler)?;
                events(Event::Checkpoint(path.clone()));
                path
            } else {
                crate::checkpoint::checkpoint_dir(output, done)
            };
            if stop && done < config.max_steps {
                return Err(TrainError::Stopped {
                    step: done,
                    checkpoint: path,
                });
            }
        }
        let validate = config.validation_every > 0 && done.is_multiple_of(config.validation_every);
        if root && !config.validation_prompts.is_empty() && (validate || done == config.max_steps) {
            if let Unet::Lora(trainee) = &unet {
                // The base model with the LoRA as it is now, merged as `sd generate --lora` does.
                let path = output.join(".validation-lora.safetensors");
                write_lora(lora_parts(trainee, &text, &path), "kohya", &path)?;
                let samples = render_samples::<B>(&base, config, done, output, Some(&path), device);
                let _ = std::fs::remove_file(&path);
                events(Event::Samples(samples?));
                continue;
            }
            // The model as it is now, as a diffusers folder the inference pipeline opens.
            let folder = output.join(".validation-model");
            if folder.exists() {
                std::fs::remove_dir_all(&folder)
                    .map_err(|e| TrainError::Io(format!("{}: {e}", folder.display())))?;
            }
            copy_components(&base, &folder, trained)?;
            let Unet::Full(unet) = &unet else {
                unreachable!("LoRA runs validated above")
            };
            match &ema {
                Some(ema) => write_unet(ema.model(), &unet_config, &folder.join("unet"))?,
                None => write_unet(&unet.valid(), &unet_config, &folder.join("unet"))?,
            }
            if let TextEncoder::Trained { model, .. } = &text {
                write_text(&model.valid(), &text_config, &folder.join("text_encoder"))?;
            }
            let samples = render_samples::<B>(&folder, config, done, output, None, device)?;
            let _ = std::fs::remove_dir_all(&folder);
            events(Event::Samples(samples));
        }
    }

    if !root {
        // The other peers hold the same weights; peer 0 writes them.
        return Ok(match &config.lora {
            Some(lora) => output.join(lora.file_name()),
            None => output.clone(),
        });
    }
    let plot = || {
        crate::plot::plot_loss(
            &crate::train_log::read_log(&log_path)?,
            "sd train unet",
            &output.join("loss.png"),
        )
    };
    let unet = match (&unet, &config.lora) {
        (Unet::Lora(trainee), Some(lora)) => {
            // A LoRA run ends with one LoRA file for `sd generate --lora`.
            let path = output.join(lora.file_name());
            write_lora(lora_parts(trainee, &text, &path), &lora.format, &path)?;
            plot()?;
            return Ok(path);
        }
        (Unet::Full(unet), _) => unet,
        (Unet::Lora(_), None) => unreachable!("a LoRA trainee comes from a LoRA config"),
    };
    // The final folder: the base model's components with the trained U-Net (its EMA weights
    // when kept, as diffusers' script saves them).
    copy_components(&base, output, trained)?;
    match &ema {
        Some(ema) => write_unet(ema.model(), &unet_config, &output.join("unet"))?,
        None => write_unet(&unet.valid(), &unet_config, &output.join("unet"))?,
    }
    if let TextEncoder::Trained { model, .. } = &text {
        write_text(&model.valid(), &text_config, &output.join("text_encoder"))?;
    }
    plot()?;
    Ok(output.clone())
}

/// The LoRA files of a run's trained parts: the U-Net's, and the text encoder's when it trains.
fn lora_parts<B: Backend, C: CheckpointStrategy>(
    unet: &LoraTrainee<Autodiff<B, C>, UNet2DConditionModel<Autodiff<B, C>>>,
    text: &TextEncoder<B, C>,
    path: &Path,
) -> Vec<sd_lora::LoraFile> {
    let mut parts = vec![unet.file(path)];
    if let TextEncoder::Lora { trainee, .. } = text {
        parts.push(trainee.file(path));
    }
    parts
}

/// Renders each validation prompt with the folder's own sampler at the run's seed into
/// `output/samples/step-<n>/<i>.png`, with the LoRA file `lora` merged when given.
fn render_samples<B: Backend>(
    folder: &Path,
    config: &TrainConfig,
    step: u64,
    output: &Path,
    lora: Option<&Path>,
    device: &B::Device,
) -> Result<PathBuf> {
    let mut model = Model::open(&folder.display().to_string())?;
    if let Some(path) = lora {
        let file = std::sync::Arc::new(sd_lora::LoraFile::open(path)?);
        model = model.with_loras(vec![(file, 1.0)])?;
    }
    let dir = output.join("samples").join(format!("step-{step}"));
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
    let side = config.resolution as usize;
    for (i, prompt) in config.validation_prompts.iter().enumerate() {
        let options = sd::GenerateOptions {
            prompt: sd::PromptOptions::new(prompt.clone()),
            sampling: sd::Sampling {
                steps: config.validation_steps,
                seed: config.seed,
                ..Default::default()
            },
            width: Some(side),
            height: Some(side),
            ..Default::default()
        };
        let out = sd::generate::<B>(&model, &options, device, None)?;
        let images = sd::to_images(out.images)?;
        let text = sd::parameters_text(&model, &options, &out.sampler);
        for image in &images {
            sd::save_png(image, dir.join(format!("{i:02}.png")), &text)?;
        }
    }
    std::fs::write(
        dir.join("prompts.txt"),
        config
            .validation_prompts
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{i:02}.png\t{p}\n"))
            .collect::<String>(),
    )
    .map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// The weights of a component folder (every `.safetensors` file in it, by name), as
/// [`file_hash`] names one file.
fn folder_weights_hash(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TrainError::Io(format!(
            "{}: no .safetensors weights in this folder",
            dir.display()
        )));
    }
    let mut hashes = String::new();
    for file in &files {
        hashes.push_str(&file_hash(file)?);
    }
    use sha2::Digest;
    Ok(sha2::Sha256::digest(hashes.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The first 16 hex digits of a file's SHA-256 (read in 1 MiB pieces).
fn file_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}
