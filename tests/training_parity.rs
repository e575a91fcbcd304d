//! Training steps at parity with diffusers' `train_text_to_image.py`: the fixture script trained
//! a tiny U-Net for a few optimiser steps with diffusers' and torch's own pieces and recorded
//! every random draw; here `sd-train` replays them on `Autodiff<Flex>` and must reach the same
//! per-micro-batch losses, learning rates, gradient norms and, after the last step, the same
//! weights, EMA weights and Adam moments (each read back from the file our writer saves them
//! in, under diffusers' keys).

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::{DType, ElementConversion, Tensor};
use sd_conditioner::ClipTextModel;
use sd_core::backend::Flex;
use sd_core::weights::SafetensorsFile;
use sd_decoder::VaeDecoder;
use sd_diffusion::{BetaSchedule, NoiseSchedule, NoiseScheduleConfig, PredictionType};
use sd_encoder::VaeEncoder;
use sd_lora::{Component, LoraFile, LoraFormat, LoraNetwork, LoraTargets, TargetSet};
use sd_train::{
    AdamW, AdamWConfig, DenoisingBatch, DenoisingObjective, Ema, EmaConfig, GradScaler,
    GradScalerConfig, Gradients, LrSchedule, LrScheduleKind,
};
use sd_train::{
    DiscriminatorConfig, MixedPrecision, PatchDiscriminator, Reconstruction, VaeObjective,
    discriminator_hinge_loss,
};
use sd_unet::{TextTimeConditioning, UNet2DConditionModel};

type Inner = Flex;
type B = Autodiff<Inner>;

/// Every float tensor of a file, flattened, as f64.
fn read_all(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let file = SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    file.entries()
        .iter()
        .map(|e| {
            let data = file.tensor_data(&e.key, DType::F64).unwrap();
            (e.key.clone(), data.to_vec::<f64>().unwrap())
        })
        .collect()
}

fn tensor<const D: usize>(
    file: &SafetensorsFile,
    key: &str,
    device: &burn::tensor::Device<B>,
) -> Tensor<B, D> {
    let data = file
        .tensor_data(key, DType::F32)
        .unwrap_or_else(|e| panic!("{key}: {e}"));
    Tensor::from_data(data, device)
}

fn values(file: &SafetensorsFile, key: &str) -> Vec<f64> {
    file.tensor_data(key, DType::F64)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .to_vec::<f64>()
        .unwrap()
}

/// The fixture's `[batch, tokens]` token ids (stored as f32, exact below 2²⁴), one row a
/// sequence.
fn token_ids(file: &SafetensorsFile, key: &str) -> Vec<Vec<u32>> {
    let entry = file.entries().iter().find(|e| e.key == key).unwrap();
    let n = entry.shape[1];
    values(file, key)
        .chunks(n)
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect()
}

/// A scalar within `tolerance` of the reference, relative; a failure is collected, a pass
/// printed.
fn check_relative(
    name: &str,
    what: &str,
    actual: f64,
    expected: f64,
    tolerance: f64,
    failures: &mut Vec<String>,
) {
    let err = (actual - expected).abs() / expected.abs().max(1e-12);
    if err > tolerance || err.is_nan() {
        failures.push(format!("{what}: {actual} vs {expected} (relative {err:e})"));
    } else {
        eprintln!("ok  {name} {what}: relative error {err:e}");
    }
}

/// Largest `|a − e| / (1 + |e|)`: absolute for values below 1, relative above.
fn scaled_error(actual: &[f64], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() {
        return f64::INFINITY;
    }
    actual.iter().zip(expected).fold(0.0, |m, (a, e)| {
        let d = (a - e).abs() / (1.0 + e.abs());
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    })
}

/// Compares every tensor of a file our writer saved (`path`) with the reference's
/// `{what}.{key}` tensors: the same set of keys, each within `tolerance` ([`scaled_error`]).
fn compare_saved(
    name: &str,
    what: &str,
    path: &Path,
    expected: &BTreeMap<String, Vec<f64>>,
    tolerance: f64,
    failures: &mut Vec<String>,
) {
    let actual = read_all(path);
    let count = expected
        .keys()
        .filter(|k| k.starts_with(&format!("{what}.")))
        .count();
    let mut worst = (0.0f64, String::new());
    for (key, values) in &actual {
        // The attention key bias adds the same `q·b` to every score of a query, which the
        // softmax cancels: its gradient is 0 in exact arithmetic and rounding noise in both
        // implementations, which Adam's normalisation turns into ±lr steps of random sign. Its
        // moments (compared too) are that noise, tiny and equal; its value is not comparable.
        if what == "weight" && key.ends_with("to_k.bias") {
            continue;
        }
        // With the adversarial term, the VAE decoder's attention query weight comes out of
        // torch's own f32 run 1.3e-5 from a float64 run of the same steps (and ours 1.3e-5 on
        // the other side, checked with the fixture function run in float64): its gradient is a
        // small difference of the large adversarially weighted terms. It is held to 4× the
        // tolerance; every other tensor of that case to the tolerance.
        let slack = if name == "vae_discriminator"
            && what == "weight"
            && key == "decoder.mid_block.attentions.0.to_q.weight"
        {
            4.0
        } else {
            1.0
        };
        match expected.get(&format!("{what}.{key}")) {
            Some(reference) => {
                let err = scaled_error(values, reference) / slack;
                if err > worst.0 || err.is_nan() {
                    worst = (err, key.clone());
                }
            }
            None => failures.push(format!("{what}: `{key}` is not in the reference")),
        }
    }
    if count != actual.len() || worst.0 > tolerance || worst.0.is_nan() {
        failures.push(format!(
            "{what}: {} tensors vs {count}; `{}` off by {:e}",
            actual.len(),
            worst.1,
            worst.0
        ));
    } else {
        eprintln!(
            "ok  {name} final {what}: {count} tensors, worst scaled error {:e} (`{}`)",
            worst.0, worst.1
        );
    }
}

struct Case {
    manifest: serde_json::Value,
}

impl Case {
    fn f64(&self, key: &str) -> Option<f64> {
        self.manifest.get(key).and_then(serde_json::Value::as_f64)
    }
    fn usize(&self, key: &str) -> usize {
        self.manifest[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}")) as usize
    }
    fn str(&self, key: &str) -> &str {
        self.manifest[key].as_str().unwrap()
    }
    /// The manifest's `schedule` (DDPMScheduler's arguments).
    fn schedule(&self) -> NoiseSchedule {
        let schedule = &self.manifest["schedule"];
        NoiseSchedule::new(&NoiseScheduleConfig {
            num_train_timesteps: schedule["num_train_timesteps"].as_u64().unwrap() as usize,
            beta_start: schedule["beta_start"].as_f64().unwrap(),
            beta_end: schedule["beta_end"].as_f64().unwrap(),
            beta_schedule: match schedule["beta_schedule"].as_str().unwrap() {
                "scaled_linear" => BetaSchedule::ScaledLinear,
                "linear" => BetaSchedule::Linear,
                other => panic!("schedule {other}"),
            },
            ..Default::default()
        })
        .unwrap()
    }
}

fn run_case(dir: &Path, precision: MixedPrecision) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case = Case {
        manifest: common::manifest(dir),
    };
    let (tolerance, norm_tolerance) = match precision {
        MixedPrecision::No => (
            case.f64("tolerance").unwrap(),
            case.f64("tolerance").unwrap(),
        ),
        MixedPrecision::Bf16 => (BF16_TOLERANCE, BF16_NORM_TOLERANCE),
        MixedPrecision::F16 => (F16_TOLERANCE, F16_TOLERANCE),
    };
    // The f16 case's loss scaler, with the settings diffusers' run used.
    let mut scaler = (precision == MixedPrecision::F16).then(|| {
        let spec = &case.manifest["grad_scaler"];
        let get = |key: &str| spec[key].as_f64().unwrap();
        GradScaler::new(GradScalerConfig {
            init_scale: get("init_scale"),
            growth_factor: get("growth_factor"),
            backoff_factor: get("backoff_factor"),
            growth_interval: get("growth_interval") as u64,
        })
        .unwrap()
    });
    let device = Default::default();
    let mut unet = UNet2DConditionModel::<B>::from_pretrained(dir.join("unet"), None, &device)
        .unwrap_or_else(|e| panic!("{e}"));
    let unet_config =
        sd_unet::UNet2DConditionConfig::from_file(dir.join("unet/config.json")).unwrap();

    let objective = DenoisingObjective {
        schedule: case.schedule(),
        prediction: match case.str("prediction_type") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => panic!("prediction {other}"),
        },
        snr_gamma: case.f64("snr_gamma"),
    };
    let steps = case.usize("steps");
    let accumulation = case.usize("accumulation");
    let lr = LrSchedule::new(
        case.f64("lr").unwrap(),
        LrScheduleKind::from_name(case.str("lr_scheduler")).unwrap(),
        case.usize("warmup") as u64,
        steps as u64,
    )
    .unwrap();
    let mut adamw = AdamW::<Inner>::new(AdamWConfig {
        weight_decay: case.f64("weight_decay").unwrap(),
        ..Default::default()
    })
    .unwrap();
    let ema_spec = &case.manifest["ema"];
    let ema_config = EmaConfig {
        decay: ema_spec["decay"].as_f64().unwrap(),
        use_ema_warmup: ema_spec["use_ema_warmup"].as_bool().unwrap_or(false),
        power: ema_spec["power"].as_f64().unwrap_or(2.0 / 3.0),
        update_after_step: ema_spec["update_after_step"].as_u64().unwrap_or(0),
        ..Default::default()
    };
    let mut ema = Ema::new(ema_config, unet.valid()).unwrap();
    // The case that trains the text encoder too: one gradient norm over both models, each
    // with its moments (torch keeps one AdamW over the chained parameters: the same maths).
    let mut text = dir.join("text_encoder").is_dir().then(|| {
        let model = ClipTextModel::<B>::from_pretrained(dir.join("text_encoder"), &device)
            .unwrap_or_else(|e| panic!("{e}"));
        let adamw = AdamW::<Inner>::new(AdamWConfig {
            weight_decay: case.f64("weight_decay").unwrap(),
            ..Default::default()
        })
        .unwrap();
        (model, adamw)
    });

    let inputs = SafetensorsFile::open(dir.join("inputs.safetensors")).unwrap();
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let (ref_loss, ref_lr, ref_norm) = (
        values(&reference, "loss"),
        values(&reference, "lr"),
        values(&reference, "grad_norm"),
    );
    let has = |key: &str| inputs.entries().iter().any(|e| e.key == key);
    let mut failures = Vec::new();
    let mut check = |what: String, actual: f64, expected: f64, tolerance: f64| {
        check_relative(&name, &what, actual, expected, tolerance, &mut failures)
    };
    for step in 0..steps {
        let mut grads = Gradients::<Inner>::new();
        let mut text_grads = Gradients::<Inner>::new();
        for micro in 0..accumulation {
            let k = format!("{step}_{micro}");
            let mut noise: Tensor<B, 4> = tensor(&inputs, &format!("noise_{k}"), &device);
            if has(&format!("offset_{k}")) {
                let draw: Tensor<B, 4> = tensor(&inputs, &format!("offset_{k}"), &device);
                noise = noise + draw * case.f64("noise_offset").unwrap();
            }
            let perturbation = has(&format!("perturbation_{k}")).then(|| {
                let draw: Tensor<B, 4> = tensor(&inputs, &format!("perturbation_{k}"), &device);
                draw * case.f64("input_perturbation").unwrap()
            });
            let timesteps: Vec<usize> = values(&inputs, &format!("timesteps_{k}"))
                .iter()
                .map(|&t| t as usize)
                .collect();
            let context = match &text {
                None => tensor(&inputs, &format!("context_{k}"), &device),
                Some((model, _)) => {
                    let ids = token_ids(&inputs, &format!("ids_{k}"));
                    precision
                        .compute_copy(model)
                        .forward(&ids)
                        .unwrap()
                        .last_hidden_state
                }
            };
            // An inpainting case's mask and masked-image latents, after the noisy latents.
            let conditioning = case.manifest.get("inpainting").map(|_| {
                Tensor::cat(
                    vec![
                        tensor(&inputs, &format!("mask_{k}"), &device),
                        tensor(&inputs, &format!("masked_latents_{k}"), &device),
                    ],
                    1,
                )
            });
            // An SDXL case's pooled embedding and size/crop ids.
            let text_time = case
                .manifest
                .get("text_time")
                .map(|_| TextTimeConditioning {
                    text_embeds: tensor(&inputs, &format!("text_embeds_{k}"), &device),
                    time_ids: values(&inputs, &format!("time_ids_{k}"))
                        .chunks(6)
                        .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
                        .collect(),
                });
            let batch = DenoisingBatch {
                latents: tensor(&inputs, &format!("latents_{k}"), &device),
                context,
                noise,
                timesteps,
                perturbation,
                conditioning,
                text_time,
            };
            let loss = objective
                .loss(&precision.compute_copy(&unet), batch)
                .unwrap();
            let value: f64 = loss.clone().into_scalar().elem();
            check(
                format!("loss {k}"),
                value,
                ref_loss[step * accumulation + micro],
                tolerance,
            );
            let factor = scaler.as_ref().map_or(1.0, GradScaler::scale) / accumulation as f64;
            let mut backward = loss.mul_scalar(factor).backward();
            grads.accumulate(&unet, &mut backward);
            if let Some((model, _)) = &text {
                text_grads.accumulate(model, &mut backward);
            }
        }
        let mut skipped = false;
        if let Some(scaler) = &scaler {
            // The same scale, and the same steps skipped for an f16 overflow, as torch's
            // GradScaler under autocast.
            skipped = scaler.unscale(&mut [&mut grads, &mut text_grads]);
            let (scales, skips) = (
                values(&reference, "loss_scale"),
                values(&reference, "skipped"),
            );
            check(
                format!("loss scale {step}"),
                scaler.scale(),
                scales[step],
                0.0,
            );
            let skip = if skipped { 1.0 } else { 0.0 };
            check(format!("skipped {step}"), skip, skips[step], 0.0);
        }
        let max_norm = case.f64("max_grad_norm").unwrap();
        let norm = Gradients::clip_global_norm_all(&mut [&mut grads, &mut text_grads], max_norm);
        if !skipped {
            check(
                format!("grad norm {step}"),
                norm,
                ref_norm[step],
                norm_tolerance,
            );
        }
        let rate = lr.lr(step as u64 - scaler.as_ref().map_or(0, GradScaler::skipped_steps));
        check(format!("lr {step}"), rate, ref_lr[step], tolerance);
        if let Some(scaler) = scaler.as_mut() {
            scaler.update(skipped);
        }
        if !skipped {
            unet = adamw.step(unet, grads, rate);
            text = text.map(|(model, mut adamw)| {
                let model = adamw.step(model, text_grads, rate);
                (model, adamw)
            });
        }
        ema.update(&unet.valid()).unwrap();
    }

    // The final state, each written by the U-Net's own weight writer and read back.
    let expected = read_all(&dir.join("final.safetensors"));
    let scratch = std::env::temp_dir().join(format!(
        "sd-train-parity-{}-{name}-{precision:?}",
        std::process::id()
    ));
    std::fs::create_dir_all(&scratch).unwrap();
    let (first, second) = adamw.moment_modules(&unet.valid()).unwrap();
    let saved = [
        ("weight", unet.valid()),
        ("ema", ema.model().clone()),
        ("exp_avg", first),
        ("exp_avg_sq", second),
    ];
    for (what, module) in saved {
        let path = scratch.join(format!("{what}.safetensors"));
        module
            .save_weights(&unet_config, &path, DType::F32)
            .unwrap();
        compare_saved(&name, what, &path, &expected, tolerance, &mut failures);
    }
    if let Some((model, adamw)) = &text {
        let (first, second) = adamw.moment_modules(&model.valid()).unwrap();
        for (what, module) in [
            ("text_weight", model.valid()),
            ("text_exp_avg", first),
            ("text_exp_avg_sq", second),
        ] {
            let path = scratch.join(format!("{what}.safetensors"));
            module.save_weights(&path, DType::F32).unwrap();
            compare_saved(&name, what, &path, &expected, tolerance, &mut failures);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

/// The autoencoder's objective: both halves trained by AdamW, one gradient norm over both,
/// the weights and moments read back from the one `vae/` file our writer saves them in. With
/// `discriminator` in the manifest, the adversarial term from its `start` on and the
/// discriminator's own Adam step after each autoencoder step, on a second posterior draw.
fn run_vae_case(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case = Case {
        manifest: common::manifest(dir),
    };
    let tolerance = case.f64("tolerance").unwrap();
    let device = Default::default();
    let mut encoder = VaeEncoder::<B>::from_pretrained(dir.join("vae"), None, &device).unwrap();
    let mut decoder = VaeDecoder::<B>::from_pretrained(dir.join("vae"), None, &device).unwrap();
    let objective = VaeObjective {
        reconstruction: match case.str("reconstruction") {
            "l1" => Reconstruction::L1,
            _ => Reconstruction::L2,
        },
        kl_weight: case.f64("kl_weight").unwrap(),
    };
    let config = AdamWConfig {
        weight_decay: case.f64("weight_decay").unwrap(),
        ..Default::default()
    };
    let (mut adam_e, mut adam_d) = (
        AdamW::<Inner>::new(config).unwrap(),
        AdamW::<Inner>::new(config).unwrap(),
    );
    let adversarial: Option<DiscriminatorConfig> = case
        .manifest
        .get("discriminator")
        .map(|d| serde_json::from_value(d.clone()).unwrap());
    let disc_adam = AdamWConfig {
        beta1: 0.5,
        beta2: 0.9,
        epsilon: 1e-8,
        weight_decay: 0.0,
    };
    let mut critic = adversarial.map(|d| {
        let disc = PatchDiscriminator::<B>::new(&d, &device)
            .unwrap()
            .load(&dir.join("discriminator/diffusion_pytorch_model.safetensors"))
            .unwrap();
        (d, disc, AdamW::<Inner>::new(disc_adam).unwrap())
    });
    let inputs = SafetensorsFile::open(dir.join("inputs.safetensors")).unwrap();
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let mut failures = Vec::new();
    let mut check = |what: String, actual: f64, expected: f64| {
        check_relative(&name, &what, actual, expected, tolerance, &mut failures)
    };
    let lr = case.f64("lr").unwrap();
    for step in 0..case.usize("steps") {
        let images = tensor(&inputs, &format!("images_{step}"), &device);
        let noise = tensor(&inputs, &format!("noise_{step}"), &device);
        let active = critic.as_ref().filter(|(d, ..)| step as u64 >= d.start);
        let mut backward = match active {
            Some((d, disc, _)) => {
                let losses = objective
                    .adversarial_losses(
                        &encoder,
                        &decoder,
                        disc,
                        d.weight,
                        d.factor,
                        images.clone(),
                        noise,
                    )
                    .unwrap();
                for (what, v) in [
                    ("loss", losses.total),
                    ("reconstruction", losses.reconstruction),
                    ("kl", losses.kl),
                    ("g_loss", losses.generator),
                    ("d_weight", losses.adversarial_weight),
                ] {
                    check(format!("{what} {step}"), v, values(&reference, what)[step]);
                }
                losses.objective.backward()
            }
            None => {
                let losses = objective
                    .losses(&encoder, &decoder, images.clone(), noise)
                    .unwrap();
                for (what, value) in [
                    ("loss", losses.total.clone()),
                    ("reconstruction", losses.reconstruction),
                    ("kl", losses.kl),
                ] {
                    let v: f64 = value.into_scalar().elem();
                    check(format!("{what} {step}"), v, values(&reference, what)[step]);
                }
                losses.total.backward()
            }
        };
        let (mut ge, mut gd) = (Gradients::<Inner>::new(), Gradients::<Inner>::new());
        ge.accumulate(&encoder, &mut backward);
        gd.accumulate(&decoder, &mut backward);
        let norm = Gradients::clip_global_norm_all(
            &mut [&mut ge, &mut gd],
            case.f64("max_grad_norm").unwrap(),
        );
        check(
            format!("grad norm {step}"),
            norm,
            values(&reference, "grad_norm")[step],
        );
        encoder = adam_e.step(encoder, ge, lr);
        decoder = adam_d.step(decoder, gd, lr);
        if let Some((d, disc, adam)) = critic.as_mut().filter(|(d, ..)| step as u64 >= d.start) {
            let second = tensor::<4>(&inputs, &format!("discriminator_noise_{step}"), &device);
            let (e, dd) = (encoder.valid(), decoder.valid());
            let fake = dd.forward(
                e.encode(images.clone().inner())
                    .unwrap()
                    .sample(second.inner()),
            );
            let loss = discriminator_hinge_loss(
                disc.forward(images),
                disc.forward(Tensor::from_inner(fake)),
            )
            .mul_scalar(d.factor);
            let v: f64 = loss.clone().into_scalar().elem();
            check(
                format!("d_loss {step}"),
                v,
                values(&reference, "d_loss")[step],
            );
            let mut backward = loss.backward();
            let mut grads = Gradients::<Inner>::new();
            grads.accumulate(&*disc, &mut backward);
            if adam.steps() < step as u64 {
                *adam = AdamW::after_zero_steps(disc_adam, step as u64).unwrap();
            }
            *disc = adam.step(disc.clone(), grads, lr);
        }
    }
    let expected = read_all(&dir.join("final.safetensors"));
    let scratch =
        std::env::temp_dir().join(format!("sd-train-parity-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let (me, ve) = adam_e.moment_modules(&encoder.valid()).unwrap();
    let (md, vd) = adam_d.moment_modules(&decoder.valid()).unwrap();
    for (what, e, d) in [
        ("weight", encoder.valid(), decoder.valid()),
        ("exp_avg", me, md),
        ("exp_avg_sq", ve, vd),
    ] {
        let path = scratch.join(format!("{what}.safetensors"));
        let mut tensors = e.weight_tensors();
        tensors.extend(d.weight_tensors());
        sd_core::weights::save_tensors(tensors, &path, DType::F32, None).unwrap();
        compare_saved(&name, what, &path, &expected, tolerance, &mut failures);
    }
    if let Some((_, disc, adam)) = &critic {
        let disc = disc.valid();
        let (m, v) = adam.moment_modules(&disc).unwrap();
        for (what, module) in [("weight", disc), ("exp_avg", m), ("exp_avg_sq", v)] {
            let path = scratch.join(format!("discriminator_{what}.safetensors"));
            // BatchNorm's running statistics are not parameters (and never read in training).
            let tensors = module
                .weight_tensors()
                .into_iter()
                .filter(|(k, _)| !k.contains("running_"))
                .collect();
            sd_core::weights::save_tensors(tensors, &path, DType::F32, None).unwrap();
            let what = format!("discriminator.{what}");
            compare_saved(&name, &what, &path, &expected, tolerance, &mut failures);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

/// Every LoRA layer of a file by (component, module path as diffusers names it), as f64.
fn lora_layers(path: &Path) -> BTreeMap<String, (Vec<f64>, Vec<f64>)> {
    let file = LoraFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    file.layers
        .iter()
        .map(|l| {
            let module = l.module.as_str();
            let module = module.strip_prefix("text_model.").unwrap_or(module);
            let values = |d: &burn::tensor::TensorData| {
                d.clone().convert_dtype(DType::F64).to_vec::<f64>().unwrap()
            };
            (
                format!("{:?}.{module}", l.component),
                (values(&l.down), values(&l.up)),
            )
        })
        .collect()
}

/// A LoRA file our writer saved against the reference's: the same layers, every factor within
/// `tolerance` ([`scaled_error`]).
fn compare_lora(
    name: &str,
    what: &str,
    ours: &Path,
    reference: &Path,
    tolerance: f64,
    failures: &mut Vec<String>,
) {
    let (actual, expected) = (lora_layers(ours), lora_layers(reference));
    if actual.keys().ne(expected.keys()) {
        failures.push(format!(
            "{what}: layers {:?} vs {:?}",
            actual.keys().take(3).collect::<Vec<_>>(),
            expected.keys().take(3).collect::<Vec<_>>()
        ));
        return;
    }
    let mut worst = (0.0f64, String::new());
    for (module, (down, up)) in &actual {
        let (rd, ru) = &expected[module];
        for (err, which) in [
            (scaled_error(down, rd), "down"),
            (scaled_error(up, ru), "up"),
        ] {
            if err > worst.0 || err.is_nan() {
                worst = (err, format!("{module} {which}"));
            }
        }
    }
    if worst.0 > tolerance || worst.0.is_nan() {
        failures.push(format!("{what}: `{}` off by {:e}", worst.1, worst.0));
    } else {
        eprintln!(
            "ok  {name} {what}: {} layers, worst scaled error {:e} (`{}`)",
            actual.len(),
            worst.0,
            worst.1
        );
    }
}

/// The raw tensor keys of a safetensors file.
fn keys_of(path: &Path) -> Vec<String> {
    let file = SafetensorsFile::open(path).unwrap();
    let mut keys: Vec<String> = file.entries().iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys
}

/// Which state of a trained LoRA to write: its factors or one of its Adam moments.
type Pick = dyn Fn(&LoraNetwork<Inner>, &AdamW<Inner>) -> LoraNetwork<Inner>;

/// A model frozen, a LoRA trained beside it.
struct Adapted<M> {
    model: M,
    targets: LoraTargets,
    network: LoraNetwork<B>,
    adamw: AdamW<Inner>,
}

/// LoRA training (`sd train unet --lora-rank`) against PEFT's layers in diffusers' LoRA
/// script: the factors start from the ones PEFT drew, the same steps are replayed, and the
/// factors and Adam moments after the last step, saved by our diffusers-layout writer, must
/// equal PEFT's; our kohya-layout file has the keys diffusers' `convert_state_dict_to_kohya`
/// gives, and our diffusers-layout file the keys of `save_lora_weights`.
fn run_lora_case(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case = Case {
        manifest: common::manifest(dir),
    };
    let tolerance = case.f64("tolerance").unwrap();
    let device = Default::default();
    let set = TargetSet::parse(case.str("targets")).unwrap();
    let (rank, alpha) = (case.usize("rank"), case.f64("alpha").unwrap() as f32);
    let init = LoraFile::open(dir.join("init.safetensors")).unwrap();
    let adam = AdamWConfig {
        weight_decay: case.f64("weight_decay").unwrap(),
        ..Default::default()
    };
    // The factors PEFT drew, and a fresh optimiser.
    let start = |targets: LoraTargets| {
        let network = targets.read::<B>(&init, &device).unwrap();
        (targets, network, AdamW::<Inner>::new(adam).unwrap())
    };
    let unet = UNet2DConditionModel::<B>::from_pretrained(dir.join("unet"), None, &device)
        .unwrap_or_else(|e| panic!("{e}"))
        .no_grad();
    let (targets, network, adamw) = start(
        LoraTargets::find(
            &unet,
            Component::Unet,
            &set,
            rank,
            alpha,
            &sd_unet::checkpoint_key,
        )
        .unwrap(),
    );
    let mut unet = Adapted {
        model: unet,
        targets,
        network,
        adamw,
    };
    let mut text = dir.join("text_encoder").is_dir().then(|| {
        let model = ClipTextModel::<B>::from_pretrained(dir.join("text_encoder"), &device)
            .unwrap_or_else(|e| panic!("{e}"))
            .no_grad();
        let key = sd_conditioner::text_checkpoint_key;
        let (targets, network, adamw) = start(
            LoraTargets::find(&model, Component::TextEncoder, &set, rank, alpha, &key).unwrap(),
        );
        Adapted {
            model,
            targets,
            network,
            adamw,
        }
    });
    let objective = DenoisingObjective {
        schedule: case.schedule(),
        prediction: match case.str("prediction_type") {
            "epsilon" => PredictionType::Epsilon,
            _ => PredictionType::VPrediction,
        },
        snr_gamma: case.f64("snr_gamma"),
    };
    let (steps, accumulation) = (case.usize("steps"), case.usize("accumulation"));
    let lr = LrSchedule::new(
        case.f64("lr").unwrap(),
        LrScheduleKind::from_name(case.str("lr_scheduler")).unwrap(),
        case.usize("warmup") as u64,
        steps as u64,
    )
    .unwrap();
    let inputs = SafetensorsFile::open(dir.join("inputs.safetensors")).unwrap();
    let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let mut failures = Vec::new();
    let mut check = |what: String, actual: f64, expected: f64| {
        check_relative(&name, &what, actual, expected, tolerance, &mut failures)
    };
    for step in 0..steps {
        let (mut grads, mut text_grads) = (Gradients::<Inner>::new(), Gradients::<Inner>::new());
        for micro in 0..accumulation {
            let k = format!("{step}_{micro}");
            let context = match &text {
                None => tensor(&inputs, &format!("context_{k}"), &device),
                Some(t) => {
                    let ids = token_ids(&inputs, &format!("ids_{k}"));
                    let model = t.targets.apply(&t.network, t.model.clone());
                    model.forward(&ids).unwrap().last_hidden_state
                }
            };
            let batch = DenoisingBatch {
                latents: tensor(&inputs, &format!("latents_{k}"), &device),
                context,
                noise: tensor(&inputs, &format!("noise_{k}"), &device),
                timesteps: values(&inputs, &format!("timesteps_{k}"))
                    .iter()
                    .map(|&t| t as usize)
                    .collect(),
                perturbation: None,
                conditioning: None,
                text_time: None,
            };
            let model = unet.targets.apply(&unet.network, unet.model.clone());
            let loss = objective.loss(&model, batch).unwrap();
            let value: f64 = loss.clone().into_scalar().elem();
            check(
                format!("loss {k}"),
                value,
                values(&reference, "loss")[step * accumulation + micro],
            );
            let mut backward = loss.div_scalar(accumulation as f64).backward();
            grads.accumulate(&unet.network, &mut backward);
            if let Some(t) = &text {
                text_grads.accumulate(&t.network, &mut backward);
            }
        }
        let norm = Gradients::clip_global_norm_all(
            &mut [&mut grads, &mut text_grads],
            case.f64("max_grad_norm").unwrap(),
        );
        check(
            format!("grad norm {step}"),
            norm,
            values(&reference, "grad_norm")[step],
        );
        let rate = lr.lr(step as u64);
        check(format!("lr {step}"), rate, values(&reference, "lr")[step]);
        unet.network = unet.adamw.step(unet.network, grads, rate);
        if let Some(t) = text.as_mut() {
            let network = std::mem::replace(
                &mut t.network,
                LoraNetwork {
                    down: vec![],
                    up: vec![],
                },
            );
            t.network = t.adamw.step(network, text_grads, rate);
        }
    }

    let scratch =
        std::env::temp_dir().join(format!("sd-lora-parity-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let adapted: Vec<(&LoraTargets, LoraNetwork<Inner>, &AdamW<Inner>)> =
        std::iter::once((&unet.targets, unet.network.valid(), &unet.adamw))
            .chain(
                text.iter()
                    .map(|t| (&t.targets, t.network.valid(), &t.adamw)),
            )
            .collect();
    let file_of = |pick: &Pick| {
        let mut layers = Vec::new();
        for (targets, network, adamw) in &adapted {
            layers.extend(targets.to_file(&pick(network, adamw), "x").layers);
        }
        LoraFile::new("x", LoraFormat::Kohya, layers, Default::default())
    };
    let first = |n: &LoraNetwork<Inner>, a: &AdamW<Inner>| a.moment_modules(n).unwrap().0;
    let second = |n: &LoraNetwork<Inner>, a: &AdamW<Inner>| a.moment_modules(n).unwrap().1;
    let weights = |n: &LoraNetwork<Inner>, _: &AdamW<Inner>| n.clone();
    let picks: [(&str, &Pick); 3] = [
        ("lora", &weights),
        ("exp_avg", &first),
        ("exp_avg_sq", &second),
    ];
    for (what, pick) in picks {
        let path = scratch.join(format!("{what}.safetensors"));
        file_of(pick).save_diffusers(&path, DType::F32).unwrap();
        let reference = dir.join(format!("final_{what}.safetensors"));
        compare_lora(&name, what, &path, &reference, tolerance, &mut failures);
        if what == "lora" && keys_of(&path) != keys_of(&reference) {
            failures.push("our diffusers-layout keys differ from save_lora_weights'".into());
        }
    }
    let kohya = scratch.join("kohya.safetensors");
    file_of(&weights).save_kohya(&kohya, DType::F16).unwrap();
    // kohya's sd-scripts (and so A1111 and ComfyUI) name the text encoder's modules from
    // `text_model_`; diffusers' converter, fed transformers 5's names, leaves that out.
    let mut expected: Vec<String> = case.manifest["kohya_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let k = k.as_str().unwrap();
            match k.strip_prefix("lora_te_") {
                Some(rest) if !rest.starts_with("text_model_") => {
                    format!("lora_te_text_model_{rest}")
                }
                _ => k.to_string(),
            }
        })
        .collect();
    expected.sort();
    if keys_of(&kohya) != expected {
        failures.push(format!(
            "kohya keys: {:?} vs {:?}",
            keys_of(&kohya).first(),
            expected.first()
        ));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn training_steps_match_diffusers() {
    for case in common::cases("training") {
        let manifest = common::manifest(&case);
        if manifest["objective"] == "vae" {
            run_vae_case(&case);
        } else if manifest["kind"] == "lora_training" {
            run_lora_case(&case);
        } else if manifest["mixed_precision"] == "fp16" {
            run_case(&case, MixedPrecision::F16);
        } else {
            run_case(&case, MixedPrecision::No);
        }
    }
}

/// How far the f16 case may go from diffusers' f16 run (torch's autocast with its
/// GradScaler): f16 keeps 11 bits of mantissa, and autocast runs more ops in f32 than our f16
/// copy does (see `sd_train::MixedPrecision`).
const F16_TOLERANCE: f64 = 5e-3;

/// How far bf16 mixed precision may take the losses, gradient norms and final states from
/// diffusers' f32 run ([`scaled_error`] for the states): bf16 keeps 8 bits of mantissa, a
/// relative rounding of 2⁻⁹ per op.
const BF16_TOLERANCE: f64 = 2e-2;

/// The gradient norms' bound under bf16: a norm sums the squares of every gradient, and one of
/// the text-encoder case's steps is 8 % from diffusers' (the others within 1 %).
const BF16_NORM_TOLERANCE: f64 = 1e-1;

/// `--mixed-precision bf16`: the U-Net (and the trained text encoder) compute on bf16 copies,
/// the gradients reach the f32 weights, and five optimiser steps stay within bf16's rounding of
/// diffusers' f32 steps, for every U-Net case.
#[test]
fn bf16_mixed_precision_training_tracks_diffusers() {
    for case in common::cases("training") {
        let manifest = common::manifest(&case);
        if manifest["objective"] != "vae"
            && manifest["kind"] != "lora_training"
            && manifest["mixed_precision"].is_null()
        {
            run_case(&case, MixedPrecision::Bf16);
        }
    }
}

#[test]
fn state_round_trips_through_the_moment_modules() {
    let dir = &common::cases("training")[0];
    let device = Default::default();
    let unet = UNet2DConditionModel::<B>::from_pretrained(dir.join("unet"), None, &device).unwrap();
    let adamw = AdamW::<Inner>::new(AdamWConfig::default()).unwrap();
    let (m, v) = adamw.moment_modules(&unet.valid()).unwrap();
    let back = AdamW::<Inner>::from_moment_modules(AdamWConfig::default(), 3, &m, &v).unwrap();
    assert_eq!(back.steps(), 3);
    assert_eq!(
        back.moments().len(),
        sd_train::flat_params(&unet.valid()).len()
    );
    let zero: f32 = back.moments()[0]
        .as_ref()
        .unwrap()
        .0
        .clone()
        .abs()
        .sum()
        .into_scalar()
        .elem();
    assert_eq!(zero, 0.0);
}

/// The bf16 copy really computes in bf16 (its weights are bf16 and keep their ids), and its
/// gradients reach the f32 weights as f32, within bf16's rounding of the f32 gradient and not
/// equal to it.
#[test]
fn bf16_copy_computes_in_bf16_and_its_gradients_reach_the_f32_weights() {
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;
    use sd_train::to_dtype;

    let device = Default::default();
    let linear = LinearConfig::new(64, 16).init::<B>(&device);
    let copy = MixedPrecision::Bf16.compute_copy(&linear);
    assert_eq!(copy.weight.val().dtype(), DType::BF16);
    assert_eq!(copy.weight.id, linear.weight.id);
    let x = Tensor::<B, 2>::random([8, 64], Distribution::Normal(0.0, 1.0), &device);
    let half = to_dtype(copy.forward(to_dtype(x.clone(), DType::BF16)), DType::F32);
    let grad = linear.weight.grad(&half.square().sum().backward()).unwrap();
    assert_eq!(grad.dtype(), DType::F32);
    let full = linear.forward(x).square().sum();
    let reference = linear.weight.grad(&full.backward()).unwrap();
    let scale: f32 = reference.clone().abs().max().into_scalar();
    let diff: f32 = (grad - reference).abs().max().into_scalar();
    assert!(
        diff / scale < 2e-2,
        "bf16 gradient {} from f32's",
        diff / scale
    );
    assert!(diff > 0.0, "the copy computed in f32");
}

/// Under f16 a LayerNorm normalises in f32 (`sd_core::layers::layer_norm`, as autocast runs
/// `layer_norm`): an activation of 300 (CLIP's residual stream holds such) squares past f16's
/// 65504 in Burn's decomposed LayerNorm on the autodiff backend, not in ours, and the gradient
/// still reaches the f32 weights.
#[test]
fn f16_layer_norm_of_large_activations_matches_f32() {
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Distribution, TensorData};
    let device = Default::default();
    let norm = LayerNormConfig::new(64).init::<B>(&device);
    let mut values = Tensor::<B, 2>::random([4, 64], Distribution::Normal(0.0, 1.0), &device)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for row in 0..4 {
        values[row * 64 + 7] = 300.0;
    }
    let x = Tensor::<B, 2>::from_data(TensorData::new(values, [4, 64]), &device);
    let reference = norm.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
    let copy = MixedPrecision::F16.compute_copy(&norm);
    let x16 = x.cast(DType::F16);
    let error = |t: Tensor<B, 2>| {
        let v = t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        v.iter()
            .zip(&reference)
            .map(|(a, b)| {
                if a.is_finite() {
                    (a - b).abs()
                } else {
                    f32::INFINITY
                }
            })
            .fold(0.0f32, f32::max)
    };
    let burn_error = error(copy.forward(x16.clone()));
    let ours = sd_core::layers::layer_norm(&copy, x16);
    let our_error = error(ours.clone());
    assert!(our_error < 1e-2, "f16 layer norm off by {our_error}");
    assert!(
        burn_error > 0.5,
        "Burn's f16 layer norm is fine now ({burn_error}): drop ours?"
    );
    let mut grads = ours.cast(DType::F32).sum().backward();
    let gamma = norm
        .gamma
        .val()
        .grad_remove(&mut grads)
        .expect("no gradient on gamma");
    assert_eq!(gamma.dtype(), DType::F32);
    let g = gamma.into_data().to_vec::<f32>().unwrap();
    assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
}
