//! The Stable Diffusion x4 upscaler against diffusers' `StableDiffusionUpscalePipeline` on a
//! tiny model in the released folder layout (`tests/fixtures/x4_upscaler`, made by
//! `xtask/python/x4_upscaler_fixtures.py`): the low-resolution image noised by the low-res
//! schedule, the 7-channel U-Net with the noise level as its class, every random draw replayed
//! (the image's noise, the stochastic samplers'), the factor-4 VAE; final latents and images.

use crate::common;

use burn::backend::Flex;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use common::{Reference, Report, fixtures_dir, manifest};
use sd::conditioner::image_processor::pil_bicubic_rgb8;
use sd::schedulers::ReplayNoise;
use sd::{GenerateOptions, Model, upscale_x4_with_noise};

type B = Flex;

fn unstack<Bk: Backend>(stacked: Tensor<Bk, 5>) -> Vec<Tensor<Bk, 4>> {
    let n = stacked.dims()[0];
    (0..n)
        .map(|i| stacked.clone().narrow(0, i, 1).squeeze_dim::<4>(0))
        .collect()
}

#[test]
fn x4_upscaler_matches_diffusers() {
    let case = fixtures_dir().join("x4_upscaler");
    let manifest = manifest(&case);
    let reference = Reference::open(&case);
    let device = Default::default();
    let model = Model::from_folder(case.join("model"), None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.vae_scale_factor(), 4);
    let mut report = Report::default();

    // The 10×10 image rounded down to 8×8 by PIL's bicubic, as the pipeline's processor does.
    let low_b = image::open(case.join("low_b.png")).unwrap().to_rgb8();
    let resized = pil_bicubic_rgb8(low_b.as_raw(), 10, 10, 8, 8);
    let expected: Tensor<B, 4> = reference.tensor("low_b_resized", &device);
    let expected = expected
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    let planar: Vec<f32> = (0..3)
        .flat_map(|c| resized.iter().skip(c).step_by(3).map(|&v| f32::from(v)))
        .collect();
    assert_eq!(planar, expected, "PIL's bicubic resize to 8×8");

    for run in manifest["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let options = common::run_options::<B>(run, &reference, &device);
        let image: Tensor<B, 4> = reference.tensor(&format!("{name}.image_in"), &device);
        let mut draws = vec![reference.tensor::<B, 4>(&format!("{name}.image_noise"), &device)];
        let noise_key = format!("{name}.noise");
        if reference.has(&noise_key) {
            draws.extend(unstack(reference.tensor::<B, 5>(&noise_key, &device)));
        }
        let mut noise = ReplayNoise::new(draws);
        let out = upscale_x4_with_noise::<B>(
            &model,
            &options,
            image.into_data(),
            run["noise_level"].as_u64().unwrap() as usize,
            &device,
            &mut noise,
            None,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        if noise.remaining() != 0 {
            report.fail(format!("{name}: {} noise draws unused", noise.remaining()));
        }
        let tolerance = run["tolerance"].as_f64().unwrap() as f32;
        common::check_generated(
            &mut report,
            &reference,
            name,
            out.latents,
            out.images,
            tolerance,
            &device,
        );
    }
    report.finish();
}

#[test]
fn a_noise_level_above_the_models_maximum_is_refused() {
    let case = fixtures_dir().join("x4_upscaler");
    let model = Model::from_folder(case.join("model"), None).unwrap();
    let image = burn::tensor::TensorData::new(vec![0f32; 3 * 8 * 8], [1, 3, 8, 8]);
    let err = upscale_x4_with_noise::<B>(
        &model,
        &GenerateOptions::default(),
        image,
        351,
        &Default::default(),
        &mut ReplayNoise::new(Vec::new()),
        None,
    )
    .err()
    .expect("noise level 351 must be refused")
    .to_string();
    assert!(err.contains("max_noise_level 350"), "{err}");
    // And the upscaler is not a text-to-image model.
    let err = sd::generate::<B>(
        &model,
        &GenerateOptions::default(),
        &Default::default(),
        None,
    )
    .err()
    .expect("generate must refuse the upscaler")
    .to_string();
    assert!(err.contains("x4 upscaler"), "{err}");
}

/// U-Net tiles that cover the latent give the untiled result exactly; smaller, overlapping
/// tiles give a finite image of the same size near it.
#[test]
fn latent_tiles_cover_the_upscale() {
    let case = fixtures_dir().join("x4_upscaler");
    let model = Model::from_folder(case.join("model"), None).unwrap();
    let reference = Reference::open(&case);
    let device = Default::default();
    let image: Tensor<B, 4> = reference.tensor("ddim.image_in", &device);
    let run = |tiling: Option<sd::LatentTiling>| {
        let options = GenerateOptions {
            prompt: "a photo of a cat".into(),
            sampling: sd::Sampling {
                steps: 2,
                scheduler: Some("DDIMScheduler".into()),
                ..Default::default()
            },
            latent_tiling: tiling,
            ..GenerateOptions::default()
        };
        let mut noise = sd::schedulers::HostNoise::per_image(1, 1);
        upscale_x4_with_noise::<B>(
            &model,
            &options,
            image.clone().into_data(),
            20,
            &device,
            &mut noise,
            None,
        )
        .unwrap()
        .images
    };
    let whole = run(None);
    let covering = run(Some(sd::LatentTiling {
        tile: 16,
        overlap: 4,
    }));
    let mut report = Report::default();
    report.check("one covering tile", covering, whole.clone(), 0.0);
    // The 8×12 latent in 8×8 tiles overlapping by 4: two tiles across.
    let tiled = run(Some(sd::LatentTiling {
        tile: 8,
        overlap: 4,
    }));
    assert_eq!(tiled.dims(), whole.dims());
    let values = tiled.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    report.finish();
}
