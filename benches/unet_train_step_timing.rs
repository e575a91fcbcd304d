//! Times one training step of a U-Net on the default backend under Burn's autodiff: the
//! ε-objective forward (DDPM `scaled_linear` noising, U-Net, mean squared error), the backward
//! pass, clipping by the global gradient norm (1.0) and an AdamW step (lr 1e-5, β 0.9 / 0.999,
//! ε 1e-8, weight decay 1e-2), each step timed whole; prints one JSON line. `cargo xtask
//! bench-train` runs it next to `xtask/python/bench_unet_train.py` with the same arguments.
//!
//! `--config sd15`: the SD 1.5 U-Net's shape with random weights (its training cost); `--config
//! tiny`: the tiny fixture U-Net (`tests/fixtures/pipeline/tiny_sd1/model/unet`), whose steps
//! per second say what the test and shapes-model runs pay per step. Batch 1, a 4×32×32 latent
//! (`--latent N` for another side), 77 context tokens, f32; `--mixed-precision bf16|f16` runs
//! the passes on a bf16 or f16 copy of the weights, as `sd train --mixed-precision` does (f16
//! with its loss scaled and the gradients unscaled by the default `GradScaler`).

use burn::backend::Autodiff;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use sd_benches::{arg, peak_rss_mib, time_runs};
use sd_core::backend::DefaultBackend as Inner;
use sd_diffusion::{BetaSchedule, NoiseSchedule, NoiseScheduleConfig, PredictionType};
use sd_train::{
    AdamW, AdamWConfig, DenoisingBatch, DenoisingObjective, GradScaler, GradScalerConfig,
    Gradients, MixedPrecision,
};
use sd_unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};

/// The training backend: `sd train`'s (autodiff over the default backend, Flex in the default
/// build), so that the step measured is the one the trainer runs.
type B = Autodiff<Inner>;

/// Where `--config tiny` reads its U-Net, relative to the workspace root (`cargo xtask` runs
/// the binary there).
const TINY_UNET: &str = "tests/fixtures/pipeline/tiny_sd1/model/unet";

/// The timestep every step trains at: fixed (as on the PyTorch side) so that both sides do
/// exactly the same work; the cost of a step does not depend on it.
const TIMESTEP: usize = 500;

/// The learning rate of `train_text_to_image.py`'s examples.
const LR: f64 = 1e-5;

/// `torch.nn.utils.clip_grad_norm_`'s `max_norm` in diffusers' training scripts.
const MAX_GRAD_NORM: f64 = 1.0;

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let name = arg("--config").unwrap_or_else(|| "sd15".into());
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let side: usize = arg("--latent").and_then(|r| r.parse().ok()).unwrap_or(32);
    let precision = match arg("--mixed-precision").as_deref() {
        None | Some("no") => MixedPrecision::No,
        Some("bf16") => MixedPrecision::Bf16,
        Some("f16") => MixedPrecision::F16,
        Some(other) => return Err(format!("--mixed-precision no|bf16|f16, not {other}")),
    };
    let scaler = (precision == MixedPrecision::F16)
        .then(|| GradScaler::new(GradScalerConfig::default()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let device = Default::default();
    let (unet, context_dim) = match name.as_str() {
        "sd15" => {
            let config = UNet2DConditionConfig::sd15();
            let unet =
                UNet2DConditionModel::<B>::new(&config, &device).map_err(|e| e.to_string())?;
            (unet, 768)
        }
        "tiny" => {
            let config = UNet2DConditionConfig::from_file(format!("{TINY_UNET}/config.json"))
                .map_err(|e| e.to_string())?;
            // The context width the first cross-attention block takes (one value in the
            // fixture; a per-block list starts with the first block's).
            let context_dim = match &config.cross_attention_dim {
                PerBlock::One(d) => *d,
                PerBlock::Each(d) => *d.first().ok_or("empty cross_attention_dim")?,
            };
            let unet = UNet2DConditionModel::<B>::from_pretrained(TINY_UNET, None, &device)
                .map_err(|e| e.to_string())?;
            (unet, context_dim)
        }
        other => return Err(format!("unknown config {other}")),
    };
    let objective = DenoisingObjective {
        schedule: NoiseSchedule::new(&NoiseScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?,
        prediction: PredictionType::Epsilon,
        snr_gamma: None,
    };
    let mut adamw = AdamW::<Inner>::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 1e-2,
    })
    .map_err(|e| e.to_string())?;
    let latents =
        Tensor::<B, 4>::random([1, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    let noise = Tensor::<B, 4>::random([1, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<B, 3>::random(
        [1, 77, context_dim],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    // `AdamW::step` takes the model by value and returns the updated one; the closure below is
    // `FnMut`, so the model lives in an `Option` it takes out and puts back each step.
    let mut unet = Some(unet);
    let mut last_loss = f64::NAN;
    let (median, min) = time_runs(runs, || {
        let model = unet.take().ok_or("the model was lost in an earlier step")?;
        let batch = DenoisingBatch {
            latents: latents.clone(),
            context: context.clone(),
            noise: noise.clone(),
            timesteps: vec![TIMESTEP],
            perturbation: None,
            conditioning: None,
            text_time: None,
        };
        let loss = objective
            .loss(&precision.compute_copy(&model), batch)
            .map_err(|e| e.to_string())?;
        // Reading the loss waits for the forward pass (as `sd train` does to log it).
        last_loss = loss.clone().into_scalar().elem();
        let mut backward = loss
            .mul_scalar(scaler.as_ref().map_or(1.0, GradScaler::scale))
            .backward();
        let mut grads = Gradients::<Inner>::new();
        grads.accumulate(&model, &mut backward);
        if grads.is_empty() {
            return Err("the backward pass gave no gradients".into());
        }
        if let Some(scaler) = &scaler {
            // An overflow would skip the step in `sd train`; here every step is applied.
            let _ = scaler.unscale(&mut [&mut grads]);
        }
        grads.clip_global_norm(MAX_GRAD_NORM);
        let model = adamw.step(model, grads, LR);
        // Reading back a piece of the last parameter's new moment waits for the optimiser.
        if let Some(Some((m, _))) = adamw.moments().last() {
            let _ = m.clone().narrow(0, 0, 1).into_data();
        }
        unet = Some(model);
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "backend": format!(
                "{} {:?}",
                std::any::type_name::<B>(),
                precision.compute_dtype()
            ),
            "latent": [1, 4, side, side],
            "context": [1, 77, context_dim],
            "median_s": median,
            "min_s": min,
            "steps_per_s": 1.0 / median,
            "loss": last_loss,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
