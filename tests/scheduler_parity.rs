//! Every sampler against diffusers, step by step, on a stand-in model
//! (`x · (0.9 + 0.1 tanh x) · (0.9 + 0.1 t / T)`), for 1, 4, 20 and 50 steps, ε- and v-prediction and
//! each timestep spacing: the timesteps, the initial noise scale, every model input and every
//! intermediate sample. Stochastic samplers replay the noise diffusers drew.

use crate::common;

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use common::{Reference, Report, cases, manifest};
use sd_schedulers::{HostNoise, NoiseSource, ReplayNoise, SchedulerConfig, from_config};

fn stand_in_model<B: Backend>(x: Tensor<B, 4>, t: f64, train: usize) -> Tensor<B, 4> {
    let scale = 0.9 + 0.1 * t as f32 as f64 / train as f64;
    (x.clone() * (x.tanh() * 0.1 + 0.9)) * scale
}

fn unstack<B: Backend>(stacked: Tensor<B, 5>) -> Vec<Tensor<B, 4>> {
    let n = stacked.dims()[0];
    (0..n)
        .map(|i| stacked.clone().narrow(0, i, 1).squeeze_dim::<4>(0))
        .collect()
}

fn check_case<B: Backend>(case: &Path, device: &B::Device, report: &mut Report) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let manifest = manifest(case);
    let tol = manifest["tolerance"].as_f64().unwrap() as f32;
    let mut config = SchedulerConfig::from_json(&manifest["scheduler_config"].to_string()).unwrap();
    config.eta = manifest["step_kwargs"]["eta"].as_f64().unwrap_or(0.0);
    let train = config.num_train_timesteps;
    let reference = Reference::open(case);
    let latents: Tensor<B, 4> = reference.tensor("latents", device);
    let mut scheduler = from_config::<B>(config).unwrap();

    for (steps, run) in manifest["runs"].as_object().unwrap() {
        let label = format!("{name} {steps} steps");
        let steps: usize = steps.parse().unwrap();
        scheduler.set_timesteps(steps).unwrap();
        let expected: Vec<f64> = serde_json::from_value(run["timesteps"].clone()).unwrap();
        let actual = scheduler.timesteps().to_vec();
        if actual.len() != expected.len()
            || actual
                .iter()
                .zip(&expected)
                .any(|(a, e)| (a - e).abs() > 1e-3)
        {
            report.fail(format!(
                "{label}: timesteps {actual:?}, diffusers {expected:?}"
            ));
            continue;
        }
        let sigma0 = run["init_noise_sigma"].as_f64().unwrap();
        if (scheduler.init_noise_sigma() - sigma0).abs() > 1e-5 * sigma0.max(1.0) {
            report.fail(format!(
                "{label}: init_noise_sigma {} vs {sigma0}",
                scheduler.init_noise_sigma()
            ));
        }
        let trace = unstack(reference.tensor::<B, 5>(&format!("steps_{steps}_trace"), device));
        let inputs =
            unstack(reference.tensor::<B, 5>(&format!("steps_{steps}_model_inputs"), device));
        let noise_key = format!("steps_{steps}_noise");
        let mut noise: Box<dyn NoiseSource<B>> = if manifest_has(&reference, &noise_key) {
            Box::new(ReplayNoise::new(unstack(
                reference.tensor::<B, 5>(&noise_key, device),
            )))
        } else {
            Box::new(HostNoise::new(0))
        };

        // 1e-5 for samples of order one; beyond that float32 itself cannot resolve 1e-5 (its
        // spacing is 3.8e-6 at 32), so the bound scales with the largest reference value.
        let scale = |t: &Tensor<B, 4>| t.clone().abs().max().into_scalar().elem::<f32>().max(1.0);
        let mut sample = latents.clone() * scheduler.init_noise_sigma();
        let (mut worst_input, mut worst_sample) = (0.0f32, 0.0f32);
        for (i, &t) in actual.iter().enumerate() {
            let input = scheduler.scale_model_input(sample.clone());
            let err = common::max_abs_diff(input.clone(), inputs[i].clone()) / scale(&inputs[i]);
            worst_input = worst_input.max(err);
            let output = stand_in_model(input, t, train);
            sample = scheduler
                .step(output, sample, noise.as_mut())
                .unwrap()
                .prev_sample;
            let err = common::max_abs_diff(sample.clone(), trace[i].clone()) / scale(&trace[i]);
            worst_sample = worst_sample.max(err);
        }
        let last = trace.last().unwrap().clone();
        let bound = tol * scale(&last);
        report.check(&format!("{label} final sample"), sample, last, bound);
        if worst_input > tol || worst_sample > tol {
            report.fail(format!(
                "{label}: worst step error (÷ max(1, |reference|)): model input {worst_input:e}, \
                 sample {worst_sample:e}"
            ));
        }
    }
}

fn manifest_has(reference: &Reference, key: &str) -> bool {
    reference.has(key)
}

#[test]
fn samplers_match_diffusers_step_by_step() {
    let device = Default::default();
    let mut report = Report::default();
    for case in cases("schedulers") {
        check_case::<sd_core::backend::Flex>(&case, &device, &mut report);
    }
    report.finish();
}

#[test]
fn bad_input_is_an_error() {
    use sd_schedulers::{from_name, img2img_start};
    type B = sd_core::backend::Flex;
    let device = Default::default();
    let config = SchedulerConfig::default();

    let err = from_name::<B>("Euler b", config.clone()).err().unwrap();
    let text = err.to_string();
    assert!(text.contains("unknown scheduler `Euler b`"), "{text}");
    assert!(
        text.contains("DPM++ 2M Karras") && text.contains("Euler a"),
        "{text}"
    );

    for name in sd_schedulers::known_names() {
        let mut scheduler = from_name::<B>(name, config.clone()).unwrap();
        let err = scheduler.set_timesteps(0).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{name}: {err}");
        let err = scheduler.set_timesteps(1001).unwrap_err();
        assert!(
            err.to_string()
                .contains("more than the 1000 training timesteps"),
            "{name}: {err}"
        );

        let x: Tensor<B, 4> = Tensor::zeros([1, 4, 8, 8], &device);
        let mut noise = HostNoise::new(0);
        let mut fresh = from_name::<B>(name, config.clone()).unwrap();
        let err = fresh.step(x.clone(), x.clone(), &mut noise).unwrap_err();
        assert!(
            err.to_string().contains("before set_timesteps"),
            "{name}: {err}"
        );

        scheduler.set_timesteps(4).unwrap();
        for _ in 0..scheduler.timesteps().len() {
            scheduler.step(x.clone(), x.clone(), &mut noise).unwrap();
        }
        let err = scheduler
            .step(x.clone(), x.clone(), &mut noise)
            .unwrap_err();
        assert!(err.to_string().contains("after the last"), "{name}: {err}");
        assert!(scheduler.set_begin_index(99).is_err());
    }

    assert_eq!(img2img_start(50, 0.8).unwrap(), 10);
    assert_eq!(img2img_start(50, 1.0).unwrap(), 0);
    assert_eq!(img2img_start(50, 0.0).unwrap(), 50);
    for strength in [-0.1, 1.5, f64::NAN] {
        assert!(
            img2img_start(50, strength)
                .unwrap_err()
                .to_string()
                .contains("outside [0, 1]")
        );
    }

    let thresholding = SchedulerConfig {
        thresholding: true,
        ..SchedulerConfig::default()
    };
    // Euler has no dynamic thresholding in diffusers: asking for it is an error, not a no-op.
    assert!(from_name::<B>("DDIM", thresholding.clone()).is_ok());
    let err = from_name::<B>("Euler", thresholding).err().unwrap();
    assert!(
        err.to_string().contains("unsupported thresholding"),
        "{err}"
    );
    let third_order = SchedulerConfig {
        solver_order: 3,
        ..SchedulerConfig::default()
    };
    assert!(from_name::<B>("DPM++ 2M", third_order).is_err());
    let err = SchedulerConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/scheduler_config.json"),
        "{err}"
    );
}
