//! UNet2DConditionModel parity with diffusers on every case under `tests/fixtures/unet/`: SD 1.x,
//! 2.x (odd latent size), XL and inpainting shapes, timesteps 0, 1, 500, 999 and a fractional
//! one, a different timestep per sample.

use crate::common;

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use common::{Reference, Report, cases, manifest};
use sd_unet::{TextTimeConditioning, UNet2DConditionModel};

fn check_case<B: Backend>(case: &Path, device: &B::Device, report: &mut Report) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let manifest = manifest(case);
    let tol = manifest["tolerance"].as_f64().unwrap() as f32;
    let reference = Reference::open(case);
    let unet = match UNet2DConditionModel::<B>::from_pretrained(case.join("unet"), None, device) {
        Ok(u) => u,
        Err(e) => return report.fail(format!("{name}: loading: {e}")),
    };
    let expected_params = manifest["parameters"].as_u64().unwrap() as usize;
    if unet.parameter_count() != expected_params {
        report.fail(format!(
            "{name}: {} parameters, diffusers has {expected_params}",
            unet.parameter_count()
        ));
    }
    let latents: Tensor<B, 4> = reference.tensor("latents", device);
    let context: Tensor<B, 3> = reference.tensor("context", device);
    let text_time = reference.has("text_embeds").then(|| {
        let ids: Tensor<B, 2> = reference.tensor("time_ids", device);
        let ids = ids.into_data().to_vec::<f32>().unwrap();
        TextTimeConditioning {
            text_embeds: reference.tensor("text_embeds", device),
            time_ids: ids
                .chunks(6)
                .map(|c| std::array::from_fn(|i| c[i] as f64))
                .collect(),
        }
    });
    // The x4 upscaler's shape: the noise level as each sample's class label.
    let class_labels: Option<Vec<usize>> = reference.has("class_labels").then(|| {
        let labels: Tensor<B, 1> = reference.tensor("class_labels", device);
        let labels = labels.into_data().to_vec::<f32>().unwrap();
        labels.into_iter().map(|l| l as usize).collect()
    });
    let timesteps: Vec<Vec<f64>> = serde_json::from_value(manifest["timesteps"].clone()).unwrap();
    for (i, t) in timesteps.iter().enumerate() {
        let out = unet
            .forward_with_classes(
                latents.clone(),
                t,
                context.clone(),
                text_time.as_ref(),
                class_labels.as_deref(),
            )
            .unwrap();
        let expected: Tensor<B, 4> = reference.tensor(&format!("output_{i}"), device);
        report.check(&format!("{name} t={t:?}"), out, expected, tol);
    }
}

/// The same U-Net written in the original single-file layout (by the fixture script, checked
/// there with diffusers' own converter) loads to the same output.
fn check_single_file<B: Backend>(case: &Path, device: &B::Device, report: &mut Report) {
    use sd_core::weights::{LoadOptions, SafetensorsFile};
    use sd_unet::UNet2DConditionConfig;
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let tol = manifest(case)["tolerance"].as_f64().unwrap() as f32;
    let config = UNet2DConditionConfig::from_file(case.join("unet/config.json")).unwrap();
    let path = case.join("unet_single_file.safetensors");
    if !path.is_file() {
        // The upscaler is published as a diffusers folder only.
        return;
    }
    let file = SafetensorsFile::open(path).unwrap();
    let unet = match UNet2DConditionModel::<B>::new(&config, device)
        .and_then(|u| u.load_single_file(&file, &config, LoadOptions::default()))
    {
        Ok(u) => u,
        Err(e) => return report.fail(format!("{name}: loading the single file: {e}")),
    };
    let reference = Reference::open(case);
    let text_time = reference.has("text_embeds").then(|| TextTimeConditioning {
        text_embeds: reference.tensor("text_embeds", device),
        time_ids: vec![
            [64.0, 64.0, 0.0, 0.0, 64.0, 64.0],
            [48.0, 40.0, 4.0, 2.0, 64.0, 64.0],
        ],
    });
    let out = unet
        .forward(
            reference.tensor("latents", device),
            &[0.0, 1.0],
            reference.tensor("context", device),
            text_time.as_ref(),
        )
        .unwrap();
    report.check(
        &format!("{name} single-file layout"),
        out,
        reference.tensor("output_0", device),
        tol,
    );
}

fn check_all<B: Backend>(device: &B::Device) {
    let mut report = Report::default();
    for case in cases("unet") {
        check_case::<B>(&case, device, &mut report);
        check_single_file::<B>(&case, device, &mut report);
    }
    report.finish();
}

#[test]
fn unet_matches_diffusers_on_flex() {
    check_all::<sd_core::backend::Flex>(&Default::default());
}

#[test]
fn unet_matches_diffusers_on_ndarray() {
    check_all::<sd_core::backend::NdArray>(&Default::default());
}

/// `cargo test -p sd-tests --features cuda` on a machine with an NVIDIA GPU.
#[cfg(feature = "cuda")]
#[test]
fn unet_matches_diffusers_on_cuda() {
    check_all::<sd_core::backend::Cuda>(&common::cuda_device());
}

/// The real SD 1.5, 2.1 and XL configurations build with diffusers' parameter counts (diffusers
/// 0.42.1 on the meta device: 859,520,964; 865,910,724; 2,567,463,684). Allocates every
/// parameter (13 GB for SDXL, about a minute), so it runs on request:
/// `cargo test -p sd-tests --test parity unet_parity:: -- --ignored`.
#[test]
#[ignore = "full-size models: about a minute and 13 GB"]
fn real_size_configs_have_diffusers_parameter_counts() {
    use sd_unet::UNet2DConditionConfig;
    type B = sd_core::backend::Flex;
    let device = Default::default();
    for (name, config, expected) in [
        ("SD 1.5", UNet2DConditionConfig::sd15(), 859_520_964),
        ("SD 2.1", UNet2DConditionConfig::sd21(), 865_910_724),
        ("SDXL", UNet2DConditionConfig::sdxl(), 2_567_463_684),
    ] {
        let unet = UNet2DConditionModel::<B>::new(&config, &device).unwrap();
        assert_eq!(unet.parameter_count(), expected, "{name}");
    }
}

#[test]
fn bad_input_is_an_error() {
    type B = sd_core::backend::Flex;
    let device = Default::default();
    let case = cases("unet")
        .into_iter()
        .find(|c| c.ends_with("sd1_like"))
        .unwrap();
    let unet =
        UNet2DConditionModel::<B>::from_pretrained(case.join("unet"), None, &device).unwrap();
    let latents = Tensor::<B, 4>::zeros([1, 4, 16, 16], &device);
    let context = Tensor::<B, 3>::zeros([1, 7, 32], &device);

    let err = unet
        .forward(
            latents.clone(),
            &[1.0],
            Tensor::zeros([1, 7, 33], &device),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("cross_attention_dim 32"), "{err}");
    let err = unet
        .forward(
            Tensor::zeros([1, 5, 16, 16], &device),
            &[1.0],
            context.clone(),
            None,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("takes 4 latent channels, got 5"),
        "{err}"
    );
    let err = unet
        .forward(latents.clone(), &[1.0, 2.0, 3.0], context.clone(), None)
        .unwrap_err();
    assert!(
        err.to_string().contains("3 timesteps for a batch of 1"),
        "{err}"
    );
    let tt = TextTimeConditioning {
        text_embeds: Tensor::zeros([1, 16], &device),
        time_ids: vec![[0.0; 6]],
    };
    let err = unet
        .forward(latents.clone(), &[1.0], context.clone(), Some(&tt))
        .unwrap_err();
    assert!(err.to_string().contains("takes no SDXL"), "{err}");

    let xl = cases("unet")
        .into_iter()
        .find(|c| c.ends_with("sdxl_like"))
        .unwrap();
    let unet = UNet2DConditionModel::<B>::from_pretrained(xl.join("unet"), None, &device).unwrap();
    let err = unet
        .forward(latents, &[1.0], Tensor::zeros([1, 11, 32], &device), None)
        .unwrap_err();
    assert!(
        err.to_string().contains("needs the pooled text embedding"),
        "{err}"
    );

    // Class labels: needed by a class-conditional U-Net, within its classes, and refused by
    // the others.
    let up = cases("unet")
        .into_iter()
        .find(|c| c.ends_with("upscaler_like"))
        .unwrap();
    let upscaler =
        UNet2DConditionModel::<B>::from_pretrained(up.join("unet"), None, &device).unwrap();
    let x = Tensor::<B, 4>::zeros([1, 7, 8, 8], &device);
    let text = Tensor::<B, 3>::zeros([1, 7, 24], &device);
    let err = upscaler
        .forward(x.clone(), &[1.0], text.clone(), None)
        .unwrap_err();
    assert!(err.to_string().contains("needs class labels"), "{err}");
    let err = upscaler
        .forward_with_classes(x, &[1.0], text, None, Some(&[1000]))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("class label 1000 is outside the U-Net's 1000 classes"),
        "{err}"
    );
    let err = UNet2DConditionModel::<B>::from_pretrained(case.join("unet"), None, &device)
        .unwrap()
        .forward_with_classes(
            Tensor::zeros([1, 4, 16, 16], &device),
            &[1.0],
            Tensor::zeros([1, 7, 32], &device),
            None,
            Some(&[3]),
        )
        .unwrap_err();
    assert!(err.to_string().contains("takes no class labels"), "{err}");

    // Configs.
    let dir = std::env::temp_dir().join(format!("sd-unet-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let original = std::fs::read_to_string(case.join("unet/config.json")).unwrap();
    for (from, to, needle) in [
        (
            "\"DownBlock2D\"",
            "\"SimpleCrossAttnDownBlock2D\"",
            "unsupported block type `SimpleCrossAttnDownBlock2D`",
        ),
        (
            "\"attention_head_dim\": 8",
            "\"attention_head_dim\": 7",
            "do not split into 7 heads",
        ),
        (
            "\"layers_per_block\": 2",
            "\"layers_per_block\": [1, 2, 3]",
            "layers_per_block must have one value or one per block",
        ),
    ] {
        assert!(original.contains(from), "fixture config lacks {from}");
        std::fs::write(dir.join("config.json"), original.replacen(from, to, 1)).unwrap();
        std::fs::copy(
            case.join("unet/diffusion_pytorch_model.safetensors"),
            dir.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let err = UNet2DConditionModel::<B>::from_pretrained(&dir, None, &device).unwrap_err();
        assert!(err.to_string().contains(needle), "`{needle}` not in {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
