//! ControlNet against diffusers on the tiny fixture ControlNets (`tests/fixtures/controlnet`,
//! made by `xtask/python/controlnet_fixtures.py`): the model alone (every residual, guess
//! mode's scales, the U-Net with the residuals added), then whole generations against
//! `StableDiffusionControlNetPipeline` and the SDXL one with one and two ControlNets, a step
//! range, guess mode and no guidance.

use crate::common;

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use common::{Reference, Report, fixtures_dir, manifest};
use sd::core::weights::LoadOptions;
use sd::unet::{
    ControlNetModel, ControlResiduals, TextTimeConditioning, UNet2DConditionModel, UNetConditioning,
};
use sd::{Control, ControlNetSource, GenerateOptions, Model, generate};

type B = Flex;

fn residuals<Bk: Backend>(
    reference: &Reference,
    prefix: &str,
    count: usize,
    device: &Bk::Device,
) -> ControlResiduals<Bk> {
    ControlResiduals {
        down: (0..count)
            .map(|i| reference.tensor(&format!("{prefix}.down.{i}"), device))
            .collect(),
        mid: reference.tensor(&format!("{prefix}.mid"), device),
    }
}

fn check_residuals(
    report: &mut Report,
    what: &str,
    actual: ControlResiduals<B>,
    expected: ControlResiduals<B>,
    tolerance: f32,
) {
    assert_eq!(
        actual.down.len(),
        expected.down.len(),
        "{what}: residual count"
    );
    for (i, (a, e)) in actual.down.into_iter().zip(expected.down).enumerate() {
        report.check(&format!("{what} down.{i}"), a, e, tolerance);
    }
    report.check(&format!("{what} mid"), actual.mid, expected.mid, tolerance);
}

#[test]
fn the_controlnet_and_the_unet_with_its_residuals_match_diffusers() {
    let case = fixtures_dir().join("controlnet");
    let manifest = manifest(&case);
    let reference = Reference::open(&case);
    let device = Default::default();
    let direct = &manifest["direct"];
    let t = direct["timestep"].as_f64().unwrap();
    let scale = direct["scale"].as_f64().unwrap();
    let guess_scale = direct["guess_scale"].as_f64().unwrap();
    let tolerance = direct["tolerance"].as_f64().unwrap() as f32;
    let mut report = Report::default();
    for net_name in direct["nets"].as_array().unwrap() {
        let net_name = net_name.as_str().unwrap();
        let prefix = format!("direct.{net_name}");
        let net = ControlNetModel::<B>::from_pretrained(
            case.join(net_name),
            None,
            LoadOptions::default(),
            &device,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sample: Tensor<B, 4> = reference.tensor(&format!("{prefix}.sample"), &device);
        let image: Tensor<B, 4> = reference.tensor(&format!("{prefix}.cond"), &device);
        let text_time = reference.has(&format!("{prefix}.text_embeds")).then(|| {
            let ids: Tensor<B, 2> = reference.tensor(&format!("{prefix}.time_ids"), &device);
            let ids = ids.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            TextTimeConditioning {
                text_embeds: reference.tensor(&format!("{prefix}.text_embeds"), &device),
                time_ids: ids
                    .chunks(6)
                    .map(|c| std::array::from_fn(|i| f64::from(c[i])))
                    .collect(),
            }
        });
        let cond = UNetConditioning {
            text_time: text_time.as_ref(),
            ..UNetConditioning::text(reference.tensor(&format!("{prefix}.context"), &device))
        };
        let count = direct[net_name]["down_shapes"].as_array().unwrap().len();
        let out = net
            .forward(sample.clone(), &[t], &cond, image.clone(), scale, false)
            .unwrap();
        check_residuals(
            &mut report,
            net_name,
            out.clone(),
            residuals(&reference, &prefix, count, &device),
            tolerance,
        );
        let guess = net
            .forward(sample.clone(), &[t], &cond, image, guess_scale, true)
            .unwrap();
        check_residuals(
            &mut report,
            &format!("{net_name} guess mode"),
            guess,
            residuals(&reference, &format!("{prefix}.guess"), count, &device),
            tolerance,
        );
        if let Some(unet_dir) = direct[net_name]["unet"].as_str() {
            let unet =
                UNet2DConditionModel::<B>::from_pretrained(case.join(unet_dir), None, &device)
                    .unwrap();
            // The reference's own residuals, so that the U-Net side is checked on its own.
            let given = residuals(&reference, &prefix, count, &device);
            let with = UNetConditioning {
                control: Some(&given),
                ..cond.clone()
            };
            report.check(
                &format!("{net_name} U-Net with residuals"),
                unet.forward_conditioned(sample, &[t], &with).unwrap(),
                reference.tensor(&format!("{prefix}.unet_out"), &device),
                tolerance,
            );
        }
    }
    report.finish();
}

fn pair(v: &serde_json::Value) -> Option<(usize, usize)> {
    let a = v.as_array()?;
    Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
}

fn read_control_image(path: &Path) -> burn::tensor::TensorData {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    sd::control_image_data(&image)
}

#[test]
fn controlnet_pipelines_match_diffusers() {
    let case = fixtures_dir().join("controlnet");
    let manifest = manifest(&case);
    let reference = Reference::open(&case);
    let device = Default::default();
    let mut report = Report::default();
    for run in manifest["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let model = Model::from_folder(case.join(run["base"].as_str().unwrap()), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let controls = run["controlnets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Control {
                scale: c["scale"].as_f64().unwrap(),
                start: run["control_guidance_start"].as_f64().unwrap(),
                end: run["control_guidance_end"].as_f64().unwrap(),
                ..Control::new(
                    ControlNetSource::open(case.join(c["folder"].as_str().unwrap()), &model)
                        .unwrap_or_else(|e| panic!("{e}")),
                    read_control_image(&case.join(c["image"].as_str().unwrap())),
                )
            })
            .collect();
        let options = GenerateOptions {
            micro_conditioning: sd::MicroConditioning {
                original_size: pair(&run["original_size"]),
                crops_coords_top_left: pair(&run["crops_coords_top_left"]).unwrap_or((0, 0)),
                target_size: pair(&run["target_size"]),
            },
            controls,
            guess_mode: run["guess_mode"].as_bool().unwrap(),
            ..common::run_options::<B>(run, &reference, &device)
        };
        let out = generate::<B>(&model, &options, &device, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
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

/// A ControlNet written in the original layout (`control_model.…`, through
/// `controlnet_ldm_key`) loads through `ldm_controlnet_key` with the encoder's widths read off
/// the file, and gives the folder's residuals exactly.
#[test]
fn an_original_layout_controlnet_gives_the_folders_residuals() {
    let case = fixtures_dir().join("controlnet");
    let folder = case.join("sd1_a");
    let model = Model::from_folder(case.join("../pipeline/tiny_sd1/model"), None).unwrap();
    let bytes = std::fs::read(folder.join("diffusion_pytorch_model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            let ldm = sd::unet::controlnet_ldm_key(&key, 2, 1)
                .unwrap_or_else(|| panic!("{key} has no original-layout name"));
            (ldm, view)
        })
        .collect();
    let single = std::env::temp_dir().join(format!(
        "sd-controlnet-{}-control_tiny.safetensors",
        std::process::id()
    ));
    std::fs::write(&single, safetensors::serialize(renamed, None).unwrap()).unwrap();
    let source = ControlNetSource::open(&single, &model).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        source.config().extras.conditioning_embedding_out_channels,
        vec![8, 16]
    );
    let device = Default::default();
    let from_file = source
        .load::<B>(&model, &device)
        .unwrap_or_else(|e| panic!("{e}"));
    let from_folder = ControlNetSource::open(&folder, &model)
        .unwrap()
        .load::<B>(&model, &device)
        .unwrap();
    std::fs::remove_file(&single).ok();
    let reference = Reference::open(&case);
    let prefix = "direct.sd1_a";
    let sample: Tensor<B, 4> = reference.tensor(&format!("{prefix}.sample"), &device);
    let image: Tensor<B, 4> = reference.tensor(&format!("{prefix}.cond"), &device);
    let cond = UNetConditioning::text(reference.tensor(&format!("{prefix}.context"), &device));
    let run = |net: &ControlNetModel<B>| {
        net.forward(sample.clone(), &[500.0], &cond, image.clone(), 1.0, false)
            .unwrap()
    };
    let mut report = Report::default();
    check_residuals(
        &mut report,
        "original layout",
        run(&from_file),
        run(&from_folder),
        0.0,
    );
    report.finish();
}
