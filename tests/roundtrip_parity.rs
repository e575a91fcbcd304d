//! Folders our writers make (`sd convert`, `sd train unet`) against diffusers: the fixture
//! script (`cargo xtask fixtures --only roundtrip`) ran the binary, opened every folder it wrote
//! with diffusers' and transformers' `from_pretrained` and compared each component with its
//! source; `manifest.json` holds the verdicts, which must all be passes. It also kept one
//! trained U-Net (`sd train unet --init`, on tiny_sd1's other components) and diffusers' image
//! from tiny_sd1's folder with it: the same folder, assembled here, must give that image.
//!
//! LoRA: the script also trained a rank-4 LoRA of tiny_sd1's U-Net and text encoder in each of
//! our file layouts (`sd train unet --lora-rank 4 --train-text-encoder --lora-format kohya` and
//! `diffusers`), loaded each with diffusers' `load_lora_weights` and kept the files
//! (`lora/<format>/`) with diffusers' images (`lora/<format>/reference.safetensors`): the
//! manifest's `lora` verdicts must be passes, and our pipeline with the committed file must give
//! diffusers' image.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::{Flex, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use common::{Reference, Report, fixtures_dir, manifest};
use sd::lora::{Component, LoraFile, LoraFormat};
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

/// Our two LoRA layouts, as the script names their cases, with the format [`LoraFile::open`]
/// must tell from the file.
const LORA_FORMATS: [(&str, LoraFormat); 2] = [
    ("kohya", LoraFormat::Kohya),
    ("diffusers", LoraFormat::Diffusers),
];

/// The first line of each fatal message (size-mismatch reports run to dozens of lines).
fn first_lines(messages: &serde_json::Value) -> Vec<String> {
    messages
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["text"].as_str().or(m.as_str()))
        .map(|t| {
            let mut lines = t.lines().filter(|l| !l.trim().is_empty());
            let first: Vec<&str> = lines.by_ref().take(2).collect();
            first.join(" / ")
        })
        .collect()
}

/// Each LoRA file our binary trained loaded in diffusers' `load_lora_weights` with no message
/// about unexpected, missing or mismatched weights; every pair of factors in it became one of
/// diffusers' (PEFT's) LoRA layers of the U-Net or text encoder with the file's values and the
/// scale alpha / rank, and no other; the images with it unfused and fused agree, and differ from
/// the image without it.
#[test]
fn diffusers_loads_the_loras_we_train() {
    let manifest = manifest(&case());
    let lora = &manifest["lora"];
    let cases = lora["cases"]
        .as_object()
        .expect("the manifest's lora.cases");
    let mut failures = Vec::new();
    for (format, _) in LORA_FORMATS {
        let Some(entry) = cases.get(format) else {
            failures.push(format!("the manifest has no lora case `{format}`"));
            continue;
        };
        let check = &entry["check"];
        let file = entry["file"].as_str().unwrap_or("?");
        if check["loads"] != true {
            failures.push(format!("{format}: diffusers did not load {file}"));
        }
        for message in first_lines(&check["fatal_messages"]) {
            failures.push(format!("{format}: {message}"));
        }
        for component in ["unet", "text_encoder"] {
            let pairs = check["file_pairs"][component].as_u64().unwrap_or(0);
            let loaded = check["loaded_lora_modules"][component]
                .as_u64()
                .unwrap_or(0);
            if pairs == 0 || loaded != pairs {
                failures.push(format!(
                    "{format}: {loaded} of the file's {pairs} {component} layers loaded"
                ));
            }
        }
        if check["missing_modules"].as_u64() != Some(0) {
            failures.push(format!(
                "{format}: {} file layers diffusers has no LoRA module for, first {}",
                check["missing_modules"], check["first_missing_modules"]
            ));
        }
        for (field, what) in [
            ("extra_modules", "LoRA modules the file does not name"),
            ("shape_mismatch", "factors of another shape"),
        ] {
            if check[field].as_array().is_some_and(|a| !a.is_empty()) {
                failures.push(format!("{format}: {what}: {}", check[field]));
            }
        }
        if check["loads"] == true {
            for field in ["factors_max_abs_diff", "scale_max_abs_diff"] {
                if check[field].as_f64() != Some(0.0) {
                    failures.push(format!("{format}: {field} {}", check[field]));
                }
            }
            let images = &check["images"];
            for field in ["finite", "fused_equals_unfused", "lora_matters"] {
                if images[field] != true {
                    failures.push(format!("{format}: images.{field} is not true: {images}"));
                }
            }
        }
        if entry["passed"] != true {
            let finding = entry["diagnosis"]["finding"]
                .as_str()
                .unwrap_or("no diagnosis");
            failures.push(format!("{format}: failed (diagnosis: {finding})"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(lora["all_passed"], true);
}

/// The checks see damage: copies of our kohya file with one key, and with one layer's keys,
/// renamed failed, each with diffusers' message kept.
#[test]
fn the_lora_checks_catch_a_renamed_key() {
    let manifest = manifest(&case());
    let controls = manifest["lora"]["negative_controls"]
        .as_array()
        .expect("the manifest's lora.negative_controls");
    let names: Vec<&str> = controls.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["one_key_renamed", "one_layer_renamed"]);
    for control in controls {
        assert_eq!(control["failed"], true, "{control}");
        assert!(
            !first_lines(&control["fatal_messages"]).is_empty(),
            "no message from diffusers: {control}"
        );
    }
}

fn trained_lora_image<B: Backend>(device: &B::Device, backend: &str) {
    let manifest = manifest(&case());
    let lora = &manifest["lora"];
    let g = &lora["generation"];
    let tolerance = g["tolerance"].as_f64().unwrap() as f32;
    let min_effect = g["min_effect"].as_f64().unwrap() as f32;
    let mut report = Report::default();
    for (format, layout) in LORA_FORMATS {
        let entry = &lora["cases"][format];
        let dir = case().join("lora").join(format);
        let file = LoraFile::open(dir.join(entry["file"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.format, layout, "{format}");
        for (component, name) in [
            (Component::Unet, "unet"),
            (Component::TextEncoder, "text_encoder"),
        ] {
            assert_eq!(
                file.layers_of(component).count() as u64,
                entry["check"]["file_pairs"][name].as_u64().unwrap(),
                "{format}: {name} layers"
            );
        }
        let reference = Reference::open(&dir);
        let model = Model::from_folder(fixtures_dir().join("pipeline/tiny_sd1/model"), None)
            .and_then(|m| m.with_loras(vec![(Arc::new(file), 1.0)]))
            .unwrap_or_else(|e| panic!("{e}"));
        let latents: Tensor<B, 4> = reference.tensor("latents_in", device);
        let options = common::generation_options(g, latents.into_data());
        let mut noise = ReplayNoise::new(Vec::new());
        let out = generate_with_noise::<B>(&model, &options, device, &mut noise, None)
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        // The LoRA matters at this tolerance: diffusers' latents with it are far from those
        // without it.
        let expected: Tensor<B, 4> = reference.tensor("latents_out", device);
        let scale = common::magnitude(&expected);
        let base: Tensor<B, 4> = reference.tensor("base.latents_out", device);
        let moved = (expected - base).abs().max().into_scalar().elem::<f32>();
        if moved < min_effect * tolerance * scale {
            report.fail(format!(
                "{format}: the LoRA moves diffusers' latents only {moved}"
            ));
        }
        for run in ["", "fused."] {
            common::check_latents_and_image(
                &mut report,
                &format!(
                    "{backend} {format} LoRA against diffusers' {}",
                    if run.is_empty() { "unfused" } else { "fused" }
                ),
                (out.latents.clone(), out.images.clone()),
                (
                    reference.tensor(&format!("{run}latents_out"), device),
                    reference.tensor(&format!("{run}image"), device),
                ),
                tolerance,
            );
        }
    }
    report.finish();
}

/// Our pipeline with each LoRA file our binary trained, merged as the weights load, gives
/// diffusers' latents and image with it (unfused and fused) from the same initial latents.
#[test]
fn the_trained_loras_give_diffusers_image_on_flex() {
    trained_lora_image::<Flex>(&Default::default(), "flex");
}

#[test]
fn the_trained_loras_give_diffusers_image_on_ndarray() {
    trained_lora_image::<NdArray>(&Default::default(), "ndarray");
}
