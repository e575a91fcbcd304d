//! The forward process against diffusers' `DDPMScheduler` (`betas`, `alphas_cumprod`,
//! `add_noise`, `get_velocity`) and `training_utils.compute_snr`, on every case under
//! `tests/fixtures/diffusion/`.

use crate::common;

use burn::tensor::{Tensor, TensorData};
use common::{Reference, Report, cases, manifest};
use sd_diffusion::training::{min_snr_weights, target};
use sd_diffusion::{NoiseSchedule, NoiseScheduleConfig, PredictionType};

type B = sd_core::backend::Flex;

fn host(values: &[f64]) -> Tensor<B, 1> {
    let v: Vec<f32> = values.iter().map(|x| *x as f32).collect();
    Tensor::from_data(TensorData::new(v.clone(), [v.len()]), &Default::default())
}

/// NaN where the reference has NaN (0/0 at zero terminal SNR), the value elsewhere.
fn nan_aware(actual: &[f64], expected: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let e = expected.into_data().to_vec::<f32>().unwrap();
    let both_nan: Vec<bool> = actual
        .iter()
        .zip(&e)
        .map(|(a, e)| a.is_nan() && e.is_nan())
        .collect();
    let a: Vec<f64> = actual
        .iter()
        .zip(&both_nan)
        .map(|(a, n)| if *n { 0.0 } else { *a })
        .collect();
    let e: Vec<f64> = e
        .iter()
        .zip(&both_nan)
        .map(|(e, n)| if *n { 0.0 } else { *e as f64 })
        .collect();
    (host(&a), host(&e))
}

#[test]
fn forward_process_matches_diffusers() {
    let device = Default::default();
    let mut report = Report::default();
    for case in cases("diffusion") {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let manifest = manifest(&case);
        let tol = manifest["tolerance"].as_f64().unwrap() as f32;
        let config: NoiseScheduleConfig =
            serde_json::from_value(manifest["config"].clone()).unwrap();
        let timesteps: Vec<usize> = serde_json::from_value(manifest["timesteps"].clone()).unwrap();
        let gamma = manifest["min_snr_gamma"].as_f64().unwrap();
        let reference = Reference::open(&case);
        let schedule = NoiseSchedule::new(&config).unwrap();

        report.check(
            &format!("{name} betas"),
            host(&schedule.betas),
            reference.tensor("betas", &device),
            tol,
        );
        report.check(
            &format!("{name} alphas_cumprod"),
            host(&schedule.alphas_cumprod),
            reference.tensor("alphas_cumprod", &device),
            tol,
        );
        let x0: Tensor<B, 4> = reference.tensor("x0", &device);
        let noise: Tensor<B, 4> = reference.tensor("noise", &device);
        let noisy = schedule
            .add_noise(x0.clone(), noise.clone(), &timesteps)
            .unwrap();
        report.check(
            &format!("{name} add_noise"),
            noisy,
            reference.tensor("noisy", &device),
            tol,
        );
        let v = target(
            &schedule,
            PredictionType::VPrediction,
            x0.clone(),
            noise.clone(),
            &timesteps,
        )
        .unwrap();
        report.check(
            &format!("{name} velocity"),
            v,
            reference.tensor("velocity", &device),
            tol,
        );

        let snr: Vec<f64> = timesteps
            .iter()
            .map(|t| schedule.snr(*t).unwrap())
            .collect();
        // SNR spans many orders of magnitude: compare relative to the reference.
        let (a, e) = nan_aware(&snr, reference.tensor("snr", &device));
        let rel = (a - e.clone()).abs() / (e.abs() + 1e-12);
        report.check(
            &format!("{name} snr (relative)"),
            rel,
            Tensor::zeros([timesteps.len()], &device),
            1e-3,
        );
        for (prediction, key) in [
            (PredictionType::Epsilon, "min_snr_epsilon"),
            (PredictionType::VPrediction, "min_snr_v_prediction"),
            (PredictionType::Sample, "min_snr_sample"),
        ] {
            let w = min_snr_weights(&schedule, prediction, &timesteps, gamma).unwrap();
            let (a, e) = nan_aware(&w, reference.tensor(key, &device));
            report.check(&format!("{name} {key}"), a, e, 1e-4);
        }
    }
    report.finish();
}

#[test]
fn bad_schedules_and_timesteps_are_errors() {
    let device = Default::default();
    let err = NoiseSchedule::new(&NoiseScheduleConfig {
        num_train_timesteps: 0,
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("num_train_timesteps is 0"),
        "{err}"
    );
    let err = NoiseSchedule::new(&NoiseScheduleConfig {
        beta_end: 1.5,
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("outside [0, 1]"), "{err}");
    let err = NoiseSchedule::new(&NoiseScheduleConfig {
        trained_betas: Some(vec![0.1; 3]),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("3 values for 1000 timesteps"),
        "{err}"
    );
    let err: Result<NoiseScheduleConfig, _> =
        serde_json::from_str(r#"{"beta_schedule": "sigmoid"}"#);
    assert!(err.unwrap_err().to_string().contains("sigmoid"));

    let schedule = NoiseSchedule::new(&NoiseScheduleConfig::stable_diffusion()).unwrap();
    let x: Tensor<B, 4> = Tensor::zeros([2, 4, 8, 8], &device);
    let err = schedule
        .add_noise(x.clone(), x.clone(), &[0, 1000])
        .unwrap_err();
    assert!(
        err.to_string().contains("timestep 1000 is outside 0..1000"),
        "{err}"
    );
    let err = schedule.add_noise(x.clone(), x.clone(), &[0]).unwrap_err();
    assert!(
        err.to_string().contains("1 timesteps for a batch of 2"),
        "{err}"
    );
    let small: Tensor<B, 4> = Tensor::zeros([2, 4, 4, 4], &device);
    assert!(schedule.velocity(x, small, &[0, 1]).is_err());
    assert!(min_snr_weights(&schedule, PredictionType::Epsilon, &[0], 0.0).is_err());
}

#[test]
fn host_noise_is_the_same_on_every_backend() {
    use rand::SeedableRng;
    use sd_diffusion::training::host_noise;
    let mut a = rand::rngs::StdRng::seed_from_u64(7);
    let mut b = rand::rngs::StdRng::seed_from_u64(7);
    let flex: Tensor<B, 4> = host_noise([1, 4, 8, 8], &mut a, &Default::default());
    let nd: Tensor<sd_core::backend::NdArray, 4> =
        host_noise([1, 4, 8, 8], &mut b, &Default::default());
    assert_eq!(
        flex.into_data().to_vec::<f32>().unwrap(),
        nd.into_data().to_vec::<f32>().unwrap()
    );
}
