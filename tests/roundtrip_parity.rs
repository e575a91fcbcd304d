//! Folders our writers make (`sd convert`, `sd train unet`) against diffusers: the fixture
//! script (`cargo xtask fixtures --only roundtrip`) ran the binary, opened every folder it wrote
//! with diffusers' and transformers' `from_pretrained` and compared each component with its
//! source; `manifest.json` holds the verdicts, which must all be passes. It also kept one
//! trained U-Net (`sd train unet --init`, on tiny_sd1's other components) and diffusers' image
//! from tiny_sd1's folder with it: the same folder, assembled here, must give that image.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::{Flex, NdArray};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use common::{Reference, Report, fixtures_dir, manifest};
use sd::schedulers::ReplayNoise;
use sd::{Model, generate_with_noise};

fn case() -> PathBuf {
    fixtures_dir().join("roundtrip")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// tiny_sd1's model folder with its `unet/` replaced by the committed trained one, in a fresh
/// temporary folder: the folder `sd train unet` wrote, without its checkpoints and logs.
fn assembled_folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-roundtrip-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let base = fixtures_dir().join("pipeline/tiny_sd1/model");
    for entry in std::fs::read_dir(&base).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "unet" {
            continue;
        }
        let target = dir.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
    copy_dir(&case().join("unet"), &dir.join("unet"));
    dir
}

/// Every folder the script wrote loaded in diffusers with no message about unexpected,
/// missing, unused or newly initialised weights or config fields, and matched its source.
#[test]
fn diffusers_opens_every_folder_we_write() {
    let manifest = manifest(&case());
    let folders = manifest["folders"].as_object().expect("folders");
    for expected in [
        "convert_single_tiny_sd1",
        "convert_single_tiny_sd2_vpred",
        "convert_single_tiny_sdxl",
        "convert_folder_tiny_sd1",
        "convert_folder_tiny_sdxl",
        "convert_folder_tiny_sdxl_f32",
        "train_tiny_sd1",
        "train_tiny_sd1_init",
    ] {
        assert!(
            folders.contains_key(expected),
            "the manifest has no `{expected}`"
        );
    }
    let mut failures = Vec::new();
    for (name, folder) in folders {
        let mut parts: Vec<(String, &serde_json::Value)> = folder["components"]
            .as_object()
            .expect("components")
            .iter()
            .map(|(k, v)| (k.clone(), v))
            .collect();
        assert!(parts.len() >= 5, "{name}: only {} components", parts.len());
        parts.push(("pipeline".into(), &folder["pipeline"]));
        for (part, report) in parts {
            if report["loads"] != true {
                failures.push(format!("{name}/{part}: diffusers did not load it"));
            }
            if let Some(messages) = report["fatal_messages"].as_array()
                && !messages.is_empty()
            {
                let texts: Vec<&str> = messages.iter().filter_map(|m| m["text"].as_str()).collect();
                failures.push(format!("{name}/{part}: {texts:?}"));
            }
            if report["passed"] != true {
                failures.push(format!("{name}/{part}: a check failed (see the manifest)"));
            }
        }
        if folder["passed"] != true {
            failures.push(format!("{name}: failed"));
        }
    }
    assert_eq!(manifest["all_passed"], true, "{failures:#?}");
    assert!(failures.is_empty(), "{failures:#?}");
}

fn trained_folder_image<B: Backend>(device: &B::Device, name: &str) {
    let manifest = manifest(&case());
    let g = &manifest["generation"];
    let reference = Reference::open(&case());
    let folder = assembled_folder(name);
    let model = Model::from_folder(&folder, None).unwrap_or_else(|e| panic!("{e}"));
    let latents: Tensor<B, 4> = reference.tensor("latents_in", device);
    let options = common::generation_options(g, latents.into_data());
    let mut noise = ReplayNoise::new(Vec::new());
    let out = generate_with_noise::<B>(&model, &options, device, &mut noise, None)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&folder);
    let tolerance = g["tolerance"].as_f64().unwrap() as f32;
    let mut report = Report::default();
    common::check_latents_and_image(
        &mut report,
        &format!("{name} trained folder"),
        (out.latents, out.images),
        (
            reference.tensor("latents_out", device),
            reference.tensor("image", device),
        ),
        tolerance,
    );
    report.finish();
}

/// The folder `sd train unet` wrote gives diffusers' image from the same latents.
#[test]
fn the_trained_folder_gives_diffusers_image_on_flex() {
    trained_folder_image::<Flex>(&Default::default(), "flex");
}

#[test]
fn the_trained_folder_gives_diffusers_image_on_ndarray() {
    trained_folder_image::<NdArray>(&Default::default(), "ndarray");
}
