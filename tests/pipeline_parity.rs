//! Whole pipelines against diffusers' `StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` on the tiny fixture
//! models: the same initial latents (or starting image and mask), every sampler, every random
//! draw replayed (VAE posterior samples, added noise, the stochastic samplers' noise), then the
//! prompt embeddings, the final latents and the decoded image compared.

use crate::common;

use std::path::Path;

use burn::backend::{Flex, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use common::{Reference, Report, cases, manifest};
use sd::conditioner::PromptSyntax;
use sd::schedulers::{ReplayNoise, SchedulerConfig};
use sd::{GenerateOptions, Model, encode_prompts, generate_with_noise};

/// The model's scheduler config with a run's `from_config` overrides on top.
fn scheduler_config(model_dir: &Path, overrides: &serde_json::Value) -> SchedulerConfig {
    let path = model_dir.join("scheduler/scheduler_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if let Some(map) = overrides.as_object() {
        for (k, v) in map {
            json[k] = v.clone();
        }
    }
    SchedulerConfig::from_json(&json.to_string()).unwrap()
}

fn pair(v: &serde_json::Value) -> Option<(usize, usize)> {
    let a = v.as_array()?;
    Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
}

fn options_for(run: &serde_json::Value, model_dir: &Path) -> GenerateOptions {
    GenerateOptions {
        prompt: sd::PromptOptions {
            text: run["prompt"].as_str().unwrap().to_string(),
            negative: run["negative_prompt"].as_str().map(String::from),
            clip_skip: run["clip_skip"].as_u64().unwrap_or(0) as usize,
            syntax: PromptSyntax::Plain,
        },
        guidance: sd::Guidance {
            scale: run["guidance_scale"].as_f64().unwrap(),
            rescale: run["guidance_rescale"].as_f64().unwrap_or(0.0),
        },
        sampling: sd::Sampling {
            steps: run["steps"].as_u64().unwrap() as usize,
            scheduler: run["scheduler"].as_str().map(String::from),
            config: Some(scheduler_config(model_dir, &run["overrides"])),
            ..Default::default()
        },
        micro_conditioning: sd::MicroConditioning {
            original_size: pair(&run["original_size"]),
            crops_coords_top_left: pair(&run["crops_coords_top_left"]).unwrap_or((0, 0)),
            target_size: pair(&run["target_size"]),
        },
        ..GenerateOptions::default()
    }
}

fn unstack<B: Backend>(stacked: Tensor<B, 5>) -> Vec<Tensor<B, 4>> {
    let n = stacked.dims()[0];
    (0..n)
        .map(|i| stacked.clone().narrow(0, i, 1).squeeze_dim::<4>(0))
        .collect()
}

/// `every`: check every n-th run only (the slow `ndarray` backend takes a sample).
fn check_case<B: Backend>(case: &Path, device: &B::Device, report: &mut Report, every: usize) {
    let manifest = manifest(case);
    let img2img = manifest["pipeline"] == "StableDiffusionImg2ImgPipeline";
    let inpaint = manifest["pipeline"] == "StableDiffusionInpaintPipeline";
    let reference = Reference::open(case);
    let case_model = case.join(manifest["model"].as_str().unwrap_or("model"));
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    for run in manifest["runs"].as_array().unwrap().iter().step_by(every) {
        // A run may name another model folder (the inpainting case runs both kinds of U-Net).
        let model_dir = run["model"]
            .as_str()
            .map(|m| case.join(m))
            .filter(|p| p.join("model_index.json").is_file())
            .unwrap_or_else(|| case_model.clone());
        let model = Model::from_folder(&model_dir, None).unwrap_or_else(|e| panic!("{e}"));
        let run_name = run["name"].as_str().unwrap();
        let what = format!("{name}/{run_name}");
        let tolerance = run["tolerance"].as_f64().unwrap_or(1e-4) as f32;
        let mut options = options_for(run, &model_dir);
        let start_image = || {
            let image = sd::core::image_io::read_rgb(case.join("init.png"), 1).unwrap();
            sd::core::image_io::image_to_data(&image)
        };
        let strength = || run["strength"].as_f64().unwrap();
        options.task = if inpaint {
            let mask = image::open(case.join("mask.png")).unwrap().to_luma8();
            let (w, h) = (mask.width() as usize, mask.height() as usize);
            let values: Vec<f32> = mask
                .as_raw()
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect();
            sd::Task::Inpaint(sd::InpaintTask {
                image: start_image(),
                mask: burn::tensor::TensorData::new(values, [1, 1, h, w]),
                strength: strength(),
            })
        } else if img2img {
            sd::Task::Image(sd::ImageTask {
                image: start_image(),
                strength: strength(),
            })
        } else {
            let latents_in: Tensor<B, 4> =
                reference.tensor(&format!("{run_name}.latents_in"), device);
            sd::Task::Text {
                latents: Some(latents_in.into_data()),
            }
        };

        let cond = encode_prompts::<B>(&model, &options.prompt, &options.guidance, device).unwrap();
        let has_embeddings = reference.has(&format!("{run_name}.prompt_embeds"));
        // diffusers applies `clip_skip` to the prompt only: its negative prompt goes through
        // the last layer (`text_encoder(...)[0]`). The library applies it to both, as A1111
        // does, so for these runs the test builds diffusers' conditioning from the stages.
        let cond = if options.prompt.clip_skip > 0 && cond.guided {
            let plain = sd::PromptOptions {
                clip_skip: 0,
                ..options.prompt.clone()
            };
            let last_layer =
                encode_prompts::<B>(&model, &plain, &options.guidance, device).unwrap();
            let n = cond.conditioning.context.dims()[0];
            let context = Tensor::cat(
                vec![
                    last_layer.conditioning.context.narrow(0, 0, 1),
                    cond.conditioning.context.clone().narrow(0, n - 1, 1),
                ],
                0,
            );
            sd::PromptConditioning {
                conditioning: sd::conditioner::Conditioning {
                    context,
                    pooled: None,
                },
                guided: true,
            }
        } else {
            cond
        };
        let context = cond.conditioning.context.clone();
        let n = context.dims()[0];
        let conditional = context.clone().narrow(0, n - 1, 1);
        if has_embeddings {
            report.check(
                &format!("{what} prompt_embeds"),
                conditional,
                reference.tensor(&format!("{run_name}.prompt_embeds"), device),
                tolerance,
            );
            if cond.guided {
                report.check(
                    &format!("{what} negative_prompt_embeds"),
                    context.narrow(0, 0, 1),
                    reference.tensor(&format!("{run_name}.negative_prompt_embeds"), device),
                    tolerance,
                );
            }
            if let Some(pooled) = &cond.conditioning.pooled {
                report.check(
                    &format!("{what} pooled_prompt_embeds"),
                    pooled.clone().narrow(0, n - 1, 1),
                    reference.tensor(&format!("{run_name}.pooled_prompt_embeds"), device),
                    tolerance,
                );
            }
        }

        let noise_key = format!("{run_name}.noise");
        let draws = if reference.has(&noise_key) {
            unstack(reference.tensor::<B, 5>(&noise_key, device))
        } else {
            Vec::new()
        };
        if let sd::Task::Image(task) = &options.task {
            // The image encoded, sampled and noised to the first step's level.
            let (mut scheduler, _) = options.scheduler::<B>(&model).unwrap();
            scheduler.set_timesteps(options.sampling.steps).unwrap();
            let begin = sd::schedulers::img2img_start(options.sampling.steps, task.strength)
                .unwrap()
                * scheduler.order();
            scheduler.set_begin_index(begin).unwrap();
            let mut first_two = ReplayNoise::new(draws.iter().take(2).cloned());
            let noised = sd::noised_image_latents(
                &model,
                task,
                options.num_images,
                scheduler.as_ref(),
                &mut first_two,
                device,
            )
            .unwrap();
            report.check(
                &format!("{what} noised_latents"),
                noised,
                reference.tensor(&format!("{run_name}.noised_latents"), device),
                tolerance,
            );
        }
        let mut noise = ReplayNoise::new(draws);
        let out = if options.prompt.clip_skip > 0 {
            run_stages::<B>(&model, &options, cond, device, &mut noise)
        } else {
            generate_with_noise::<B>(&model, &options, device, &mut noise, None)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        if noise.remaining() != 0 {
            report.fail(format!("{what}: {} noise draws unused", noise.remaining()));
        }
        common::check_latents_and_image(
            report,
            &what,
            (out.latents, out.images),
            (
                reference.tensor(&format!("{run_name}.latents_out"), device),
                reference.tensor(&format!("{run_name}.image"), device),
            ),
            tolerance,
        );
    }
}

/// The pipeline from its public stages, with a conditioning built by the caller.
fn run_stages<B: Backend>(
    model: &Model,
    options: &GenerateOptions,
    cond: sd::PromptConditioning<B>,
    device: &B::Device,
    noise: &mut ReplayNoise<B>,
) -> sd::Generated<B> {
    let (mut scheduler, sampler) = options.scheduler::<B>(model).unwrap();
    scheduler.set_timesteps(options.sampling.steps).unwrap();
    let latents =
        sd::initial_latents(model, options, noise, device).unwrap() * scheduler.init_noise_sigma();
    let unet = model.load_unet::<B>(device).unwrap();
    let latents = sd::Denoiser {
        unet: &unet,
        prompt: &cond,
        text_time: None,
        inpaint: None,
        image: &sd::ImageConditioning::default(),
        guidance: options.guidance,
        latent_tiling: options.latent_tiling,
    }
    .run(scheduler.as_mut(), latents, noise, None)
    .unwrap();
    let images = sd::decode(model, latents.clone(), false, device).unwrap();
    sd::Generated {
        images,
        latents,
        sampler,
    }
}

fn check_all<B: Backend>(device: &B::Device, every: usize) {
    let mut report = Report::default();
    for case in cases("pipeline") {
        check_case::<B>(&case, device, &mut report, every);
    }
    report.finish();
}

#[test]
fn pipelines_match_diffusers_on_flex() {
    check_all::<Flex>(&Default::default(), 1);
}

#[test]
fn pipelines_match_diffusers_on_ndarray() {
    check_all::<NdArray>(&Default::default(), 5);
}

/// A1111's emphasis and long-prompt chunks against the fixture script's torch rendering of
/// A1111's algorithm, on the tiny SD 1.x text encoder.
fn check_weighted<B: Backend>(device: &B::Device) {
    use sd::conditioner::Conditioner;
    let case = common::fixtures_dir().join("pipeline/tiny_sd1");
    let manifest = manifest(&case);
    let reference = Reference::open(&case);
    let model = Model::from_folder(case.join("model"), None).unwrap();
    let conditioner = model
        .load_conditioner::<B>(PromptSyntax::Weighted, 0, device)
        .unwrap();
    let mut report = Report::default();
    for prompt in manifest["weighted_prompts"].as_array().unwrap() {
        let text = prompt["prompt"].as_str().unwrap();
        let index = prompt["index"].as_u64().unwrap();
        let got = conditioner.encode(&[text]).unwrap().context;
        report.check(
            &format!("weighted {text:?}"),
            got,
            reference.tensor(&format!("weighted.{index}.context"), device),
            1e-4,
        );
    }
    report.finish();
}

#[test]
fn weighted_prompts_match_a1111_on_flex() {
    check_weighted::<Flex>(&Default::default());
}

/// The single-file copies of the tiny models (original layout: `model.diffusion_model.*`,
/// `first_stage_model.*`, and the text encoders as `cond_stage_model.transformer.*` (SD 1.x),
/// OpenCLIP's `cond_stage_model.model.*` with an extra layer to drop (SD 2.x), or
/// `conditioner.embedders.{0,1}.*` (SDXL)) are detected as their family and give diffusers'
/// image, as the folders do.
#[test]
fn single_file_checkpoints_give_the_folders_image() {
    let device = Default::default();
    let mut report = Report::default();
    for (case, family, run_name) in [
        ("tiny_sd1", sd::ModelFamily::Sd1, "ddim"),
        ("tiny_sd2_vpred", sd::ModelFamily::Sd2, "ddim"),
        ("tiny_sdxl", sd::ModelFamily::Sdxl, "euler"),
    ] {
        let case_dir = common::fixtures_dir().join("pipeline").join(case);
        let manifest = manifest(&case_dir);
        let reference = Reference::open(&case_dir);
        let model_dir = case_dir.join("model");
        let file = case_dir.join(manifest["single_file"].as_str().unwrap());
        let model = Model::from_single_file(&file, Some(&model_dir))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(model.family(), family, "{case}");
        let run = manifest["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == run_name)
            .unwrap();
        let mut options = options_for(run, &model_dir);
        let latents: Tensor<Flex, 4> = reference.tensor(&format!("{run_name}.latents_in"), &device);
        options.task = sd::Task::Text {
            latents: Some(latents.into_data()),
        };
        let mut noise = ReplayNoise::new(Vec::new());
        let out = generate_with_noise::<Flex>(&model, &options, &device, &mut noise, None)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        report.check(
            &format!("{case} single file {run_name} image"),
            ((out.images + 1.0) / 2.0).clamp(0.0, 1.0),
            reference.tensor(&format!("{run_name}.image"), &device),
            1e-4,
        );
    }
    report.finish();
}

/// The step callback sees every step with the latents and the predicted clean latents, and
/// returning `false` cancels with an error naming the step.
#[test]
fn the_step_callback_reports_progress_and_cancels() {
    let device = Default::default();
    let model =
        Model::from_folder(common::fixtures_dir().join("pipeline/tiny_sd1/model"), None).unwrap();
    let options = GenerateOptions {
        prompt: "cat".into(),
        sampling: sd::Sampling {
            steps: 4,
            scheduler: Some("Euler".into()),
            ..Default::default()
        },
        ..GenerateOptions::default()
    };
    let mut seen = Vec::new();
    let mut record = |p: &sd::StepProgress<'_, Flex>| {
        assert_eq!(p.latents.dims(), p.predicted_clean.dims());
        seen.push((p.step, p.total));
        true
    };
    sd::generate::<Flex>(&model, &options, &device, Some(&mut record)).unwrap();
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    let mut stop_at_two = |p: &sd::StepProgress<'_, Flex>| p.step < 2;
    let err = sd::generate::<Flex>(&model, &options, &device, Some(&mut stop_at_two))
        .err()
        .expect("cancelled");
    assert!(matches!(err, sd::SdError::Cancelled(2)), "{err}");
}

/// The same seed gives the same image on `flex` and `ndarray` (host noise), within 2/255.
#[test]
fn a_seed_gives_the_same_image_on_flex_and_ndarray() {
    let model =
        Model::from_folder(common::fixtures_dir().join("pipeline/tiny_sd1/model"), None).unwrap();
    let options = GenerateOptions {
        prompt: sd::PromptOptions {
            text: "a (red:1.2) cat".into(),
            negative: Some("blurry".into()),
            ..Default::default()
        },
        sampling: sd::Sampling {
            steps: 4,
            seed: 11,
            scheduler: Some("Euler a".into()),
            ..Default::default()
        },
        ..GenerateOptions::default()
    };
    let flex = sd::generate::<Flex>(&model, &options, &Default::default(), None).unwrap();
    let ndarray = sd::generate::<NdArray>(&model, &options, &Default::default(), None).unwrap();
    let (a, b) = (
        sd::to_images(flex.images).unwrap().remove(0),
        sd::to_images(ndarray.images).unwrap().remove(0),
    );
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(worst <= 2, "flex and ndarray differ by {worst}/255");
}

/// The bytes a module's float parameters hold, by dtype width: (held in 2 bytes, in 4).
fn parameter_bytes<B: Backend, M: burn::module::Module<B>>(module: &M) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let t = param.val();
            let n = t.shape().num_elements();
            match t.dtype().size() {
                2 => self.0 += 2 * n,
                _ => self.1 += 4 * n,
            }
        }
    }
    let mut count = Count(0, 0);
    module.visit(&mut count);
    (count.0, count.1)
}

/// The layers' matrices held in f16 under f32 arithmetic (`Model::with_matrix_dtype`, what
/// `sd generate --dtype f16` does on the CPU) give the f32 model's image exactly: the fixtures'
/// weights are stored in f16, so the values each kernel widens as it reads them (flex), or each
/// layer casts where no kernel runs (autodiff), are the ones the f32 load holds. SD 1.x and
/// SDXL (its text projection and added embeddings), with classifier-free guidance; nearly all
/// the weight bytes are then held in f16. NdArray, which holds no f16, loads them in f32.
#[test]
fn f16_matrices_under_f32_arithmetic_give_the_f32_image() {
    fn check<B: Backend>(case: &str, device: &B::Device, holds_f16: bool) {
        let dir = common::fixtures_dir()
            .join("pipeline")
            .join(case)
            .join("model");
        let full = Model::from_folder(&dir, None).unwrap();
        assert_eq!(
            full.stored_dtype(),
            Some(burn::tensor::DType::F16),
            "{case}"
        );
        let half = full.clone().with_matrix_dtype(burn::tensor::DType::F16);
        assert_eq!(half.dtype(), burn::tensor::DType::F32);
        let options = GenerateOptions {
            prompt: sd::PromptOptions {
                text: "a red cat".into(),
                negative: Some("blurry".into()),
                ..Default::default()
            },
            sampling: sd::Sampling {
                steps: 3,
                seed: 5,
                scheduler: Some("Euler".into()),
                ..Default::default()
            },
            ..GenerateOptions::default()
        };
        let a = sd::generate::<B>(&full, &options, device, None).unwrap();
        let b = sd::generate::<B>(&half, &options, device, None)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let worst = (a.images - b.images)
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>();
        assert_eq!(
            worst, 0.0,
            "{case}: f16 matrices moved the image by {worst}"
        );

        let (narrow, wide) = parameter_bytes(&half.load_unet::<B>(device).unwrap());
        if holds_f16 {
            assert!(
                narrow > 4 * wide,
                "{case}: U-Net holds {narrow} bytes in f16, {wide} in f32"
            );
        } else {
            assert_eq!(narrow, 0, "{case}: f16 weights on a backend without f16");
        }
        let (narrow, _) = parameter_bytes(&full.load_unet::<B>(device).unwrap());
        assert_eq!(narrow, 0, "{case}: the f32 model holds f16 weights");
    }
    for case in ["tiny_sd1", "tiny_sdxl"] {
        check::<Flex>(case, &Default::default(), true);
        check::<burn::backend::Autodiff<Flex>>(case, &Default::default(), true);
        check::<NdArray>(case, &Default::default(), false);
    }
}
