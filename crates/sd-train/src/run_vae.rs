//! The autoencoder's training loop (`sd train vae`): both halves on [`VaeObjective`], one
//! gradient norm over both, each with its AdamW state; checkpoints, resume and the log as in
//! [`crate::train_unet`]. The result is a `vae/` folder that loads wherever a VAE is read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Tensor, TensorData};
use sd_core::AutoencoderKlConfig;
use sd_data::{CaptionOptions, Dataset, Order, Transform, load_example_image, sample_rng};
use sd_decoder::VaeDecoder;
use sd_diffusion::training::host_noise;
use sd_encoder::VaeEncoder;

use crate::checkpoint::{TrainingState, read_state, write_checkpoint};
use crate::config::TrainConfig;
use crate::discriminator::{PatchDiscriminator, discriminator_hinge_loss};
use crate::error::{Result, TrainError};
use crate::parallel::{ParallelConfig, Peer};
use crate::run::{
    Event, Resume, first_restorable, open_dataset, prepare_output, run_peers, step_rng,
};
use crate::train_log::{StepLog, keep_log};
use crate::vae::VaeObjective;
use crate::{AdamW, AdamWConfig, Gradients, LrSchedule};

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// Writes `dir/config.json` and both halves in one `diffusion_pytorch_model.safetensors`, as
/// diffusers keeps a VAE.
fn write_vae<B: Backend>(
    encoder: &VaeEncoder<B>,
    decoder: &VaeDecoder<B>,
    config: &AutoencoderKlConfig,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let json = serde_json::to_string_pretty(&config.to_json()).unwrap_or_default();
    sd_core::files::write_atomic(dir.join("config.json"), |out| {
        out.write_all(json.as_bytes()).map_err(|e| e.to_string())
    })?;
    let mut tensors = encoder.weight_tensors();
    tensors.extend(decoder.weight_tensors());
    let metadata = std::collections::BTreeMap::from([("format".into(), "pt".into())]);
    sd_core::weights::save_tensors(
        tensors,
        dir.join("diffusion_pytorch_model.safetensors"),
        DType::F32,
        Some(&metadata),
    )?;
    Ok(())
}

/// The standard deviation of posterior samples (unscaled latents) over up to 512 training
/// images, 16 at a time.
fn latent_std<B: Backend>(
    encoder: &VaeEncoder<B>,
    dataset: &Dataset,
    transform: &Transform,
    seed: u64,
    device: &B::Device,
) -> Result<f64> {
    let side = transform.resolution as usize;
    let count = dataset.len().min(512);
    let (mut sum, mut sum_sq, mut n) = (0.0f64, 0.0f64, 0usize);
    let mut rng = step_rng(seed, u64::MAX, 0);
    for start in (0..count).step_by(16) {
        let end = (start + 16).min(count);
        let mut pixels = Vec::new();
        for example in &dataset.examples()[start..end] {
            let mut image_rng = sample_rng(seed, start as u64);
            pixels.extend(load_example_image(
                &example.image,
                transform,
                &mut image_rng,
            )?);
        }
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(pixels, [end - start, 3, side, side]),
            device,
        );
        let posterior = encoder.encode(x)?;
        let draw = host_noise::<B, 4>(posterior.mean.dims(), &mut rng, device);
        let z: Vec<f32> = posterior
            .sample(draw)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| TrainError::Io(format!("{e:?}")))?;
        for v in z {
            let v = f64::from(v);
            sum += v;
            sum_sq += v * v;
            n += 1;
        }
    }
    let mean = sum / n.max(1) as f64;
    Ok((sum_sq / n.max(1) as f64 - mean * mean).max(0.0).sqrt())
}

/// The VAE config of `--init DIR` (`DIR/vae/config.json`, or `DIR/config.json` for a VAE
/// folder itself) or of the model folder.
fn vae_config_dir(config: &TrainConfig) -> Result<(PathBuf, bool)> {
    if let Some(init) = &config.init {
        let nested = init.join("vae");
        let dir = if nested.join("config.json").is_file() {
            nested
        } else {
            init.clone()
        };
        return Ok((dir, true));
    }
    let model = PathBuf::from(config.model.as_deref().unwrap_or_default());
    let nested = model.join("vae");
    Ok((if nested.is_dir() { nested } else { model }, false))
}

type Halves<B> = (VaeEncoder<B>, VaeDecoder<B>);

/// The discriminator with its optimiser, where the run has one.
type Critic<B, C> = Option<(PatchDiscriminator<Autodiff<B, C>>, AdamW<B>)>;

/// What a checkpoint restores: where the run stood, both halves and their optimisers, and the
/// discriminator with its own.
type Restored<B, C> = (
    TrainingState,
    Halves<Autodiff<B, C>>,
    AdamW<B>,
    AdamW<B>,
    Critic<B, C>,
);

/// The discriminator's optimiser: Adam with β (0.5, 0.9), as the latent diffusion code's
/// `opt_disc`, at the run's learning rate.
const DISCRIMINATOR_ADAM: AdamWConfig = AdamWConfig {
    beta1: 0.5,
    beta2: 0.9,
    epsilon: 1e-8,
    weight_decay: 0.0,
};

/// Where a checkpoint keeps the discriminator and its moments.
fn discriminator_files(dir: &Path) -> [PathBuf; 3] {
    [
        dir.join("discriminator/diffusion_pytorch_model.safetensors"),
        dir.join("optimizer/discriminator/exp_avg.safetensors"),
        dir.join("optimizer/discriminator/exp_avg_sq.safetensors"),
    ]
}

/// Trains the autoencoder of `config.model` (or a random one from `config.init`) on
/// `config.data`; returns the trained `vae/` folder (`output/vae`).
pub fn train_vae<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    train_vae_parallel::<B, C>(config, resume, device, events, &ParallelConfig::default())
}

/// [`train_vae`] as one node of a data-parallel run, as [`crate::train_unet_parallel`]: the
/// peers' gradients (and the discriminator's) averaged before each step, every random draw
/// made for the global batch and split between them, so that the run equals one process with
/// their batches together, except where the discriminator's BatchNorm and adaptive weight see
/// each peer's batch alone (as under PyTorch's DDP without SyncBatchNorm).
pub fn train_vae_parallel<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
    parallel: &ParallelConfig,
) -> Result<PathBuf> {
    config.validate()?;
    run_peers::<B>(config, device, events, parallel, &|peer, events| {
        run_vae::<B, C>(config, resume.clone(), device, events, peer)
    })
}

/// One peer's run (the only one without data parallelism).
fn run_vae<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
    peer: &Peer<B>,
) -> Result<PathBuf> {
    let root = peer.is_root();
    // The VAE loop crops squares; buckets read and ignored would train on other images than
    // the user asked for.
    if config.bucket.is_some() {
        return Err(TrainError::Config(
            "aspect-ratio buckets (--enable-bucket, `bucket` in train.toml) are not supported \
             by `sd train vae` yet: it trains on square crops of --resolution"
                .into(),
        ));
    }
    if config.mixed_precision != crate::MixedPrecision::No {
        return Err(TrainError::Config(
            "mixed precision (--mixed-precision, `mixed_precision` in train.toml) is not \
             supported by `sd train vae` yet: it trains in f32"
                .into(),
        ));
    }
    if let Some(d) = &config.discriminator
        && (config.resolution as usize) < d.min_side()
    {
        return Err(TrainError::Config(format!(
            "--resolution {} is smaller than the {}-layer discriminator's smallest input, {} px",
            config.resolution,
            d.layers,
            d.min_side()
        )));
    }
    let transform = Transform {
        resolution: config.resolution,
        center_crop: config.center_crop,
        random_flip: config.random_flip,
    };
    transform.validate()?;
    let dataset = open_dataset(config, events)?;
    let (vae_dir, from_scratch) = vae_config_dir(config)?;
    let vae_config = AutoencoderKlConfig::from_file(vae_dir.join("config.json"))?;
    let factor = vae_config.downsample_factor();
    if !(config.resolution as usize).is_multiple_of(factor) {
        return Err(TrainError::Config(format!(
            "--resolution {} is not a multiple of the VAE's factor {factor}",
            config.resolution
        )));
    }
    let output = &config.output;
    if root {
        prepare_output(output, resume.as_ref())?;
    }
    let load = |dir: &Path| -> Result<Halves<Autodiff<B, C>>> {
        Ok((
            VaeEncoder::from_pretrained(dir, None, device)?,
            VaeDecoder::from_pretrained(dir, None, device)?,
        ))
    };
    let load_inner = |dir: &Path| -> Result<Halves<B>> {
        Ok((
            VaeEncoder::from_pretrained(dir, None, device)?,
            VaeDecoder::from_pretrained(dir, None, device)?,
        ))
    };
    let restore = |dir: &Path| -> Result<Restored<B, C>> {
        let state = read_state(dir)?;
        let halves = load(&dir.join("vae"))?;
        let (me, md) = load_inner(&dir.join("optimizer/exp_avg"))?;
        let (ve, vd) = load_inner(&dir.join("optimizer/exp_avg_sq"))?;
        let ae = AdamW::from_moment_modules(config.adam, state.step, &me, &ve)?;
        let ad = AdamW::from_moment_modules(config.adam, state.step, &md, &vd)?;
        let critic = match &config.discriminator {
            None => None,
            Some(d) => {
                let [weights, m, v] = discriminator_files(dir);
                let template = || PatchDiscriminator::<B>::new(d, device);
                let disc = PatchDiscriminator::new(d, device)?.load(&weights)?;
                // Before its first step the optimiser has no moments; it counts the steps
                // on zero gradients when it takes one.
                let adam = if state.step <= d.start {
                    AdamW::new(DISCRIMINATOR_ADAM)?
                } else {
                    AdamW::from_moment_modules(
                        DISCRIMINATOR_ADAM,
                        state.step,
                        &template()?.load(&m)?,
                        &template()?.load(&v)?,
                    )?
                };
                Some((disc, adam))
            }
        };
        Ok((state, halves, ae, ad, critic))
    };
    let restored = first_restorable(output, resume.as_ref(), config, events, restore, |r| &r.0)?;
    let (start, (mut encoder, mut decoder), mut adam_e, mut adam_d, mut critic) = match restored {
        Some((state, halves, ae, ad, critic)) => (state.step, halves, ae, ad, critic),
        None => {
            let halves = if from_scratch {
                // Random initial weights from the run's seed.
                <Autodiff<B, C> as Backend>::seed(device, config.seed);
                (
                    VaeEncoder::new(&vae_config, device)?,
                    VaeDecoder::new(&vae_config, device)?,
                )
            } else {
                load(&vae_dir)?
            };
            // The discriminator's random weights, from the seed whatever the halves came from.
            let critic = match &config.discriminator {
                None => None,
                Some(d) => {
                    <Autodiff<B, C> as Backend>::seed(device, config.seed.wrapping_add(1));
                    Some((
                        PatchDiscriminator::new(d, device)?,
                        AdamW::new(DISCRIMINATOR_ADAM)?,
                    ))
                }
            };
            (
                0,
                halves,
                AdamW::new(config.adam)?,
                AdamW::new(config.adam)?,
                critic,
            )
        }
    };
    // A frozen encoder: its parameters leave the autodiff graph, so the backward pass stops
    // at the latents and no encoder gradient is computed.
    if config.decoder_only {
        encoder = encoder.no_grad();
    }
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
    if root {
        std::fs::write(output.join("train_config.json"), config.to_json())
            .map_err(|e| io(output, e))?;
    }
    let objective = VaeObjective {
        reconstruction: config.reconstruction,
        kl_weight: config.kl_weight,
    };
    let lr = LrSchedule::new(
        config.learning_rate,
        config.lr_scheduler,
        config.lr_warmup_steps,
        config.max_steps,
    )?;
    let mut order = Order::new(dataset.len(), config.seed);
    let log_path = output.join("train_log.jsonl");
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
    let save = |step: u64,
                encoder: &VaeEncoder<Autodiff<B, C>>,
                decoder: &VaeDecoder<Autodiff<B, C>>,
                adam_e: &AdamW<B>,
                adam_d: &AdamW<B>,
                critic: &Critic<B, C>|
     -> Result<PathBuf> {
        let state = TrainingState {
            step,
            ema_steps: None,
            grad_scaler: None,
            config: config.clone(),
        };
        write_checkpoint(output, &state, config.keep, |dir| {
            let (e, d) = (encoder.valid(), decoder.valid());
            write_vae(&e, &d, &vae_config, &dir.join("vae"))?;
            let (me, ve) = adam_e.moment_modules(&e)?;
            let (md, vd) = adam_d.moment_modules(&d)?;
            write_vae(&me, &md, &vae_config, &dir.join("optimizer/exp_avg"))?;
            write_vae(&ve, &vd, &vae_config, &dir.join("optimizer/exp_avg_sq"))?;
            if let Some((disc, adam)) = critic {
                let [weights, m, v] = discriminator_files(dir);
                for file in [&weights, &m] {
                    let parent = file.parent().unwrap_or(dir);
                    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
                }
                let disc = disc.valid();
                disc.save(&weights)?;
                let (first, second) = adam.moment_modules(&disc)?;
                first.save(&m)?;
                second.save(&v)?;
            }
            Ok(())
        })
    };

    let side = config.resolution as usize;
    let accumulation = config.gradient_accumulation as u64;
    let batch = config.batch_size;
    let no_captions = CaptionOptions::default();
    let started = Instant::now();
    for step in start..config.max_steps {
        let (mut ge, mut gd) = (Gradients::<B>::new(), Gradients::<B>::new());
        let mut loss_sum = 0.0;
        // From its start, the adversarial term: the step's factor and weight.
        let adversarial = config
            .discriminator
            .filter(|d| step >= d.start && d.factor > 0.0);
        let mut adversarial_weight = 0.0;
        // Each micro-batch's images and second posterior draw, for the discriminator's step.
        let mut seen = Vec::new();
        for micro in 0..accumulation {
            // This peer's `batch` examples of the global batch (all of it with one peer).
            let global = step * accumulation + micro;
            let world_batch = (batch * peer.world()) as u64;
            let first = (peer.rank() * batch) as u64;
            let mut images = Vec::with_capacity(batch * 3 * side * side);
            for j in 0..batch as u64 {
                let sample = global * world_batch + first + j;
                let example = &dataset.examples()[order.example(sample)];
                let mut rng = sample_rng(config.seed, sample);
                images.extend(load_example_image(&example.image, &transform, &mut rng)?);
                // Drawn (and dropped) so that the data stream matches the U-Net loop's.
                let _ = no_captions.caption(&example.captions, &mut rng);
            }
            let images = Tensor::<Autodiff<B, C>, 4>::from_data(
                TensorData::new(images, [batch, 3, side, side]),
                device,
            );
            // The draws for the whole global batch, of which this peer takes its rows.
            let mut rng = step_rng(config.seed, step, micro);
            let latent = side / factor;
            let whole = [
                batch * peer.world(),
                vae_config.latent_channels,
                latent,
                latent,
            ];
            let noise = Tensor::<Autodiff<B, C>, 4>::from_inner(
                peer.rows(host_noise::<B, 4>(whole, &mut rng, device), batch),
            );
            let (value, to_minimise) = match (&adversarial, &critic) {
                (Some(d), Some((disc, _))) => {
                    let losses = objective.adversarial_losses(
                        &encoder,
                        &decoder,
                        disc,
                        d.weight,
                        d.factor,
                        images.clone(),
                        noise,
                    )?;
                    adversarial_weight += losses.adversarial_weight / accumulation as f64;
                    let second = peer.rows(host_noise::<B, 4>(whole, &mut rng, device), batch);
                    seen.push((images.inner(), second));
                    (losses.total, losses.objective)
                }
                _ => {
                    let losses = objective.losses(&encoder, &decoder, images, noise)?;
                    (losses.total.clone().into_scalar().elem(), losses.total)
                }
            };
            // The global batch's loss, so that every peer sees a non-finite one.
            let value = peer.mean(&[value], device)?[0];
            if !value.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "step {}: the loss is {value}: training stopped",
                    step + 1
                )));
            }
            loss_sum += value;
            let mut backward = to_minimise.div_scalar(accumulation as f64).backward();
            if !config.decoder_only {
                ge.accumulate(&encoder, &mut backward);
            }
            gd.accumulate(&decoder, &mut backward);
        }
        peer.mean_gradients(&mut [&mut ge, &mut gd])?;
        let grad_norm =
            Gradients::clip_global_norm_all(&mut [&mut ge, &mut gd], config.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite(format!(
                "step {}: the gradient norm is {grad_norm}: training stopped",
                step + 1
            )));
        }
        let rate = lr.lr(step);
        if !config.decoder_only {
            encoder = adam_e.step(encoder, ge, rate);
        }
        decoder = adam_d.step(decoder, gd, rate);
        let mut discriminator_loss = None;
        if let (Some(d), Some((disc, adam))) = (&adversarial, &mut critic) {
            let (loss, mut grads) = discriminator_step(
                disc,
                &encoder.valid(),
                &decoder.valid(),
                seen,
                d.factor,
                accumulation,
            )?;
            peer.mean_gradients(&mut [&mut grads])?;
            let loss = peer.mean(&[loss], device)?[0];
            if !loss.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "step {}: the discriminator's loss is {loss}: training stopped",
                    step + 1
                )));
            }
            if adam.steps() < step {
                *adam = AdamW::after_zero_steps(DISCRIMINATOR_ADAM, step)?;
            }
            *disc = adam.step(disc.clone(), grads, rate);
            discriminator_loss = Some(loss);
        }
        let entry = StepLog {
            step: step + 1,
            loss: loss_sum / accumulation as f64,
            lr: rate,
            grad_norm,
            time: started.elapsed().as_secs_f64(),
            loss_scale: None,
            skipped: false,
            adversarial_weight: adversarial.map(|_| adversarial_weight),
            discriminator_loss,
        };
        if let Some(log) = log.as_mut() {
            writeln!(log, "{}", serde_json::to_string(&entry).unwrap_or_default())
                .and_then(|()| log.flush())
                .map_err(|e| io(&log_path, e))?;
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
                let path = save(done, &encoder, &decoder, &adam_e, &adam_d, &critic)?;
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
    }
    let out = output.join("vae");
    // The other peers hold the same weights; peer 0 writes them.
    if !root {
        return Ok(out);
    }
    let (encoder, decoder) = (encoder.valid(), decoder.valid());
    let mut vae_config = vae_config;
    if config.fit_scaling_factor {
        let std = latent_std(&encoder, &dataset, &transform, config.seed, device)?;
        vae_config.scaling_factor = 1.0 / std.max(1e-6);
        events(Event::Info(format!(
            "latent standard deviation {std:.5}: scaling_factor set to {:.5}",
            vae_config.scaling_factor
        )));
    }
    write_vae(&encoder, &decoder, &vae_config, &out)?;
    // Beside the VAE, so that a later run can take the discriminator up again.
    if let Some((disc, _)) = &critic {
        let [weights, ..] = discriminator_files(output);
        let parent = weights.parent().unwrap_or(output);
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        disc.valid().save(&weights)?;
    }
    crate::plot::plot_loss(
        &crate::train_log::read_log(&log_path)?,
        "sd train vae",
        &output.join("loss.png"),
    )?;
    Ok(out)
}

/// The discriminator's half of a step, as the latent diffusion code's second optimiser runs
/// it after the autoencoder's update: each micro-batch reconstructed again by the updated
/// autoencoder (a fresh posterior draw, no gradient), both real and reconstructed images
/// scored (BatchNorm on each batch alone), the hinge loss times `factor`; returns the mean
/// loss and the discriminator's gradients.
fn discriminator_step<B: Backend, C: CheckpointStrategy>(
    disc: &PatchDiscriminator<Autodiff<B, C>>,
    encoder: &VaeEncoder<B>,
    decoder: &VaeDecoder<B>,
    seen: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    factor: f64,
    accumulation: u64,
) -> Result<(f64, Gradients<B>)> {
    let mut grads = Gradients::<B>::new();
    let mut sum = 0.0;
    for (images, noise) in seen {
        let fake = decoder.forward(encoder.encode(images.clone())?.sample(noise));
        let real = Tensor::<Autodiff<B, C>, 4>::from_inner(images);
        let fake = Tensor::<Autodiff<B, C>, 4>::from_inner(fake);
        let loss =
            discriminator_hinge_loss(disc.forward(real), disc.forward(fake)).mul_scalar(factor);
        let value: f64 = loss.clone().into_scalar().elem();
        sum += value;
        let mut backward = loss.div_scalar(accumulation as f64).backward();
        grads.accumulate(disc, &mut backward);
    }
    Ok((sum / accumulation as f64, grads))
}
