//! AutoencoderKL parity with diffusers on every case under `tests/fixtures/vae/`: encoder
//! posterior, sampling with given noise, decoder, full forward and tiled decoding.

use crate::common;

use std::path::Path;

use burn::tensor::backend::Backend;
use common::{Reference, Report, cases, manifest};
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;

fn check_case<B: Backend>(case: &Path, device: &B::Device, report: &mut Report) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let manifest = manifest(case);
    let tol = manifest["tolerance"].as_f64().unwrap() as f32;
    let reference = Reference::open(case);
    let vae_dir = case.join("vae");

    let encoder = match VaeEncoder::<B>::from_pretrained(&vae_dir, None, device) {
        Ok(e) => e,
        Err(e) => return report.fail(format!("{name}: loading the encoder: {e}")),
    };
    let decoder = match VaeDecoder::<B>::from_pretrained(&vae_dir, None, device) {
        Ok(d) => d,
        Err(e) => return report.fail(format!("{name}: loading the decoder: {e}")),
    };

    let image = reference.tensor::<B, 4>("image", device);
    let posterior = encoder.encode(image.clone()).expect("encode");
    let t = |n: &str| reference.tensor::<B, 4>(n, device);
    report.check(
        &format!("{name} posterior mean"),
        posterior.mean.clone(),
        t("posterior_mean"),
        tol,
    );
    report.check(
        &format!("{name} posterior logvar"),
        posterior.logvar.clone(),
        t("posterior_logvar"),
        tol,
    );
    report.check(
        &format!("{name} posterior std"),
        posterior.std.clone(),
        t("posterior_std"),
        tol,
    );
    report.check(
        &format!("{name} posterior sample"),
        posterior.sample(t("noise")),
        t("posterior_sample"),
        tol,
    );

    let decoded = decoder.decode(t("latents")).expect("decode");
    report.check(&format!("{name} decode"), decoded, t("decoded"), tol);

    let forward = decoder.decode(posterior.mode()).expect("decode");
    report.check(
        &format!("{name} forward (encode, mode, decode)"),
        forward,
        t("forward"),
        tol,
    );

    let tiling = &manifest["tiling"];
    let geometry = decoder.tiling();
    assert_eq!(
        geometry.latent_tile as u64,
        tiling["tile_latent_min_size"].as_u64().unwrap()
    );
    assert_eq!(
        geometry.sample_tile as u64,
        tiling["tile_sample_min_size"].as_u64().unwrap()
    );
    let tiled = decoder
        .decode_tiled(t("tiled_latents"))
        .expect("tiled decode");
    report.check(
        &format!("{name} tiled decode"),
        tiled,
        t("tiled_decoded"),
        tol,
    );
    let decoder = decoder.with_tiling(true);
    let auto = decoder
        .decode(t("tiled_latents"))
        .expect("decode with tiling on");
    report.check(
        &format!("{name} decode with tiling on"),
        auto,
        t("tiled_decoded"),
        tol,
    );
}

fn check_all<B: Backend>(device: &B::Device) {
    let mut report = Report::default();
    for case in cases("vae") {
        check_case::<B>(&case, device, &mut report);
    }
    report.finish();
}

#[test]
fn vae_matches_diffusers_on_flex() {
    check_all::<sd_core::backend::Flex>(&Default::default());
}

#[test]
fn vae_matches_diffusers_on_ndarray() {
    check_all::<sd_core::backend::NdArray>(&Default::default());
}

/// `cargo test -p sd-tests --features cuda` on a machine with an NVIDIA GPU.
#[cfg(feature = "cuda")]
#[test]
fn vae_matches_diffusers_on_cuda() {
    check_all::<sd_core::backend::Cuda>(&common::cuda_device());
}

/// One small case on WGPU (`SD_WGPU_API=gl cargo test -p sd-tests --features wgpu` on a machine
/// without a GPU: Mesa's software OpenGL, slow).
#[cfg(feature = "wgpu")]
#[test]
fn vae_matches_diffusers_on_wgpu() {
    let device = sd_core::backend::wgpu_device();
    let mut report = Report::default();
    let case = cases("vae").into_iter().next().unwrap();
    check_case::<sd_core::backend::Wgpu>(&case, &device, &mut report);
    report.finish();
}

/// A parity check that cannot fail proves nothing: nudge one decoder weight by 0.01 and the
/// decode comparison must fail.
#[test]
fn a_drifted_weight_fails_the_comparison() {
    use burn::tensor::{DType, TensorData};
    use sd_core::weights::SafetensorsFile;
    type B = sd_core::backend::Flex;
    let device = Default::default();
    let case = cases("vae").into_iter().next().unwrap();
    let reference = Reference::open(&case);
    let vae_dir = case.join("vae");
    let weights = vae_dir.join("diffusion_pytorch_model.safetensors");

    // Rewrite the file with `decoder.conv_out.bias[0] += 0.01`.
    let file = SafetensorsFile::open(&weights).unwrap();
    let mut tensors: Vec<(String, TensorData)> = file
        .entries()
        .iter()
        .map(|e| (e.key.clone(), file.tensor_data(&e.key, DType::F32).unwrap()))
        .collect();
    let (_, bias) = tensors
        .iter_mut()
        .find(|(k, _)| k == "decoder.conv_out.bias")
        .unwrap();
    let mut values = bias.to_vec::<f32>().unwrap();
    values[0] += 0.01;
    *bias = TensorData::new(values, bias.shape.clone());
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                d.shape.to_vec(),
                d.as_bytes(),
            )
            .unwrap();
            (k.clone(), view)
        })
        .collect();
    let drifted_dir = std::env::temp_dir().join(format!("sd-drift-{}", std::process::id()));
    std::fs::create_dir_all(&drifted_dir).unwrap();
    std::fs::copy(vae_dir.join("config.json"), drifted_dir.join("config.json")).unwrap();
    safetensors::serialize_to_file(
        views,
        None,
        &drifted_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();

    let decoder = VaeDecoder::<B>::from_pretrained(&drifted_dir, None, &device).unwrap();
    let decoded = decoder
        .decode(reference.tensor::<B, 4>("latents", &device))
        .unwrap();
    let err = common::max_abs_diff(decoded, reference.tensor::<B, 4>("decoded", &device));
    std::fs::remove_dir_all(&drifted_dir).ok();
    let tol = manifest(&case)["tolerance"].as_f64().unwrap() as f32;
    assert!(
        err > tol,
        "a drifted weight went unnoticed: max abs error {err:e}"
    );
}
