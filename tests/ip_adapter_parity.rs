//! IP-Adapter against diffusers' `load_ip_adapter` on a tiny adapter in the released layout and
//! a tiny CLIP image encoder (`tests/fixtures/ip_adapter`, made by
//! `xtask/python/ip_adapter_fixtures.py`): the image processor's pixels, the image embedding,
//! the projected tokens, the U-Net with the adapter attached, then whole generations with and
//! without a text prompt and guidance.

use crate::common;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use common::{Reference, Report, fixtures_dir, manifest};
use sd::conditioner::ClipVisionModel;
use sd::conditioner::image_processor::{CLIP_SIZE, Resampler, clip_crop_with, clip_input};
use sd::core::weights::LoadOptions;
use sd::unet::{IpAdapter, UNet2DConditionModel, UNetConditioning};
use sd::{GenerateOptions, ImagePrompt, Model, generate};

type B = Flex;

fn read_rgb(path: &std::path::Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

#[test]
fn the_image_embedding_tokens_and_unet_match_diffusers() {
    let case = fixtures_dir().join("ip_adapter");
    let manifest = manifest(&case);
    let reference = Reference::open(&case);
    let device = Default::default();
    let direct = &manifest["direct"];
    let tolerance = direct["tolerance"].as_f64().unwrap_or(1e-4) as f32;
    let mut report = Report::default();

    // The processor's pixels: torchvision's 8-bit resize (transformers 5's default, what
    // diffusers uses), and Pillow's for the PIL backend; both images (landscape, portrait).
    let pixels_of = |image: &str, resampler: Resampler| {
        let picture = read_rgb(&case.join(direct[image].as_str().unwrap()));
        let (w, h) = (picture.width() as usize, picture.height() as usize);
        Tensor::<B, 4>::from_data(
            TensorData::new(
                clip_input(&clip_crop_with(picture.as_raw(), w, h, resampler)),
                [1, 3, CLIP_SIZE, CLIP_SIZE],
            ),
            &device,
        )
    };
    let pixels = pixels_of("image", Resampler::Torchvision);
    report.check(
        "pixel values (torchvision)",
        pixels.clone(),
        reference.tensor("direct.pixel_values", &device),
        1e-6,
    );
    report.check(
        "pixel values (Pillow)",
        pixels_of("image", Resampler::Pillow),
        reference.tensor("direct.pixel_values_pil", &device),
        1e-6,
    );
    report.check(
        "portrait pixel values (torchvision)",
        pixels_of("image_b", Resampler::Torchvision),
        reference.tensor("direct_b.pixel_values", &device),
        1e-6,
    );
    let encoder =
        ClipVisionModel::<B>::from_pretrained(case.join("image_encoder"), &device).unwrap();
    let embeds = encoder.forward(pixels).unwrap().image_embeds;
    report.check(
        "image embeds",
        embeds.clone(),
        reference.tensor("direct.image_embeds", &device),
        tolerance,
    );
    let adapter = IpAdapter::<B>::load(
        case.join("ip_adapter.safetensors"),
        LoadOptions::default(),
        &device,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let expected_embeds: Tensor<B, 2> = reference.tensor("direct.image_embeds", &device);
    let tokens = adapter.image_tokens(expected_embeds.clone()).unwrap();
    report.check(
        "image tokens",
        tokens.clone(),
        reference.tensor("direct.ip_tokens", &device),
        tolerance,
    );
    let negative = adapter.image_tokens(expected_embeds.zeros_like()).unwrap();
    report.check(
        "negative image tokens",
        negative.clone(),
        reference.tensor("direct.ip_tokens_negative", &device),
        tolerance,
    );

    let scale = direct["scale"].as_f64().unwrap();
    let unet = UNet2DConditionModel::<B>::from_pretrained(
        case.join(direct["unet"].as_str().unwrap()),
        None,
        &device,
    )
    .unwrap()
    .with_ip_adapter(&adapter, scale)
    .unwrap_or_else(|e| panic!("{e}"));
    let cond = UNetConditioning {
        image_prompt: Some(Tensor::cat(vec![negative, tokens], 0)),
        ..UNetConditioning::text(reference.tensor("direct.context", &device))
    };
    let t = direct["timestep"].as_f64().unwrap();
    report.check(
        "U-Net with the adapter",
        unet.forward_conditioned(reference.tensor("direct.sample", &device), &[t], &cond)
            .unwrap(),
        reference.tensor("direct.unet_out", &device),
        tolerance,
    );
    report.finish();
}

#[test]
fn ip_adapter_pipelines_match_diffusers() {
    let case = fixtures_dir().join("ip_adapter");
    let manifest = manifest(&case);
    let reference = Reference::open(&case);
    let device = Default::default();
    let mut report = Report::default();
    for run in manifest["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let model = Model::from_folder(case.join(run["base"].as_str().unwrap()), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let options = GenerateOptions {
            image_prompt: Some(ImagePrompt {
                adapter: case.join(run["ip_adapter"].as_str().unwrap()),
                image_encoder: case.join(run["image_encoder"].as_str().unwrap()),
                image: read_rgb(&case.join(run["image"].as_str().unwrap())),
                scale: run["scale"].as_f64().unwrap(),
            }),
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

/// An IP-Adapter whose image projection takes another embedding width than the image
/// encoder gives is refused in one sentence naming both files and both widths.
#[test]
fn an_adapter_for_another_image_encoder_is_refused_by_name() {
    let case = fixtures_dir().join("ip_adapter");
    let bytes = std::fs::read(case.join("ip_adapter.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // The projection cut to 20 input features: an adapter for a 20-wide image embedding.
    let narrow: Vec<u8> = {
        let view = tensors.tensor("image_proj.proj.weight").unwrap();
        let [rows, cols] = [view.shape()[0], view.shape()[1]];
        let size = view.data().len() / (rows * cols);
        (0..rows)
            .flat_map(|r| view.data()[r * cols * size..(r * cols + 20) * size].to_vec())
            .collect()
    };
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "image_proj.proj.weight")
        .collect();
    let dtype = tensors.tensor("image_proj.proj.weight").unwrap().dtype();
    views.push((
        "image_proj.proj.weight".into(),
        safetensors::tensor::TensorView::new(dtype, vec![128, 20], &narrow).unwrap(),
    ));
    let path =
        std::env::temp_dir().join(format!("sd-ip-adapter-{}.safetensors", std::process::id()));
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let model = Model::from_folder(case.join("../pipeline/tiny_sd1/model"), None).unwrap();
    let options = GenerateOptions {
        prompt: "a cat".into(),
        sampling: sd::Sampling {
            steps: 1,
            ..Default::default()
        },
        image_prompt: Some(ImagePrompt {
            adapter: path.clone(),
            image_encoder: case.join("image_encoder"),
            image: read_rgb(&case.join("image_prompt.png")),
            scale: 1.0,
        }),
        ..GenerateOptions::default()
    };
    let err = generate::<B>(&model, &options, &Default::default(), None)
        .err()
        .expect("a mismatched adapter must be refused")
        .to_string();
    std::fs::remove_file(&path).ok();
    assert!(
        err.contains("image_encoder") && err.contains("24 values") && err.contains("takes 20"),
        "{err}"
    );
}
