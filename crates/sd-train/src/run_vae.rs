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
use crate::error::{Result, TrainError};
use crate::run::{Event, Resume, first_restorable, open_dataset, prepare_output, step_rng};
use crate::train_log::{StepLog, keep_log};
use crate::vae::VaeObjective;
use crate::{AdamW, Gradients, LrSchedule};

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

/// What a checkpoint restores: where the run stood, both halves and their optimisers.
type Restored<B, C> = (TrainingState, Halves<Autodiff<B, C>>, AdamW<B>, AdamW<B>);

/// Trains the autoencoder of `config.model` (or a random one from `config.init`) on
/// `config.data`; returns the trained `vae/` folder (`output/vae`).
pub fn train_vae<B: Backend, C: CheckpointStrategy>(
    config: &TrainConfig,
    resume: Option<Resume>,
    device: &B::Device,
    events: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    config.validate()?;
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
    prepare_output(output, resume.as_ref())?;
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
        Ok((state, halves, ae, ad))
    };
    let restored = first_restorable(output, resume.as_ref(), config, events, restore, |r| &r.0)?;
    let (start, (mut encoder, mut decoder), mut adam_e, mut adam_d) = match restored {
        Some((state, halves, ae, ad)) => (state.step, halves, ae, ad),
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
            (
                0,
                halves,
                AdamW::new(config.adam)?,
                AdamW::new(config.adam)?,
            )
        }
    };
    // A frozen encoder: its parameters leave the autodiff graph, so the backward pass stops
    // at the latents and no encoder gradient is computed.
    if config.decoder_only {
        encoder = encoder.no_grad();
    }
    std::fs::write(output.join("train_config.json"), config.to_json())
        .map_err(|e| io(output, e))?;
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
    let mut log = keep_log(&log_path, start)?;
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
                adam_d: &AdamW<B>|
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
        for micro in 0..accumulation {
            let mut images = Vec::with_capacity(batch * 3 * side * side);
            for j in 0..batch as u64 {
                let sample = (step * accumulation + micro) * batch as u64 + j;
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
            let mut rng = step_rng(config.seed, step, micro);
            let latent = side / factor;
            let noise = host_noise::<Autodiff<B, C>, 4>(
                [batch, vae_config.latent_channels, latent, latent],
                &mut rng,
                device,
            );
            let losses = objective.losses(&encoder, &decoder, images, noise)?;
            let value: f64 = losses.total.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(TrainError::NonFinite(format!(
                    "step {}: the loss is {value}: training stopped",
                    step + 1
                )));
            }
            loss_sum += value;
            let mut backward = losses.total.div_scalar(accumulation as f64).backward();
            if !config.decoder_only {
                ge.accumulate(&encoder, &mut backward);
            }
            gd.accumulate(&decoder, &mut backward);
        }
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
        let entry = StepLog {
            step: step + 1,
            loss: loss_sum / accumulation as f64,
            lr: rate,
            grad_norm,
            time: started.elapsed().as_secs_f64(),
            loss_scale: None,
            skipped: false,
        };
        writeln!(log, "{}", serde_json::to_string(&entry).unwrap_or_default())
            .and_then(|()| log.flush())
            .map_err(|e| io(&log_path, e))?;
        events(Event::Step(entry));
        let done = step + 1;
        let due = config.checkpoint_every > 0 && done % config.checkpoint_every == 0;
        let stop = crate::stop_requested();
        if due || done == config.max_steps || stop {
            let path = save(done, &encoder, &decoder, &adam_e, &adam_d)?;
            events(Event::Checkpoint(path.clone()));
            if stop && done < config.max_steps {
                return Err(TrainError::Stopped {
                    step: done,
                    checkpoint: path,
                });
            }
        }
    }
    let out = output.join("vae");
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
    crate::plot::plot_loss(
        &crate::train_log::read_log(&log_path)?,
        "sd train vae",
        &output.join("loss.png"),
    )?;
    Ok(out)
}
