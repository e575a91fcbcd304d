//! LoRA files in each layout users download, against diffusers: the fixture script (`cargo
//! xtask fixtures --only lora`) made random LoRAs for tiny_sd1 and tiny_sdxl with PEFT (the
//! U-Net's attention, projections, feed-forwards and resnet 3×3 convolutions; every text
//! encoder's attention and MLP), wrote them with diffusers' `save_lora_weights`, in kohya's
//! layout (alphas other than the rank) and, for tiny_sd1, as PEFT's own folder, and ran
//! diffusers' pipeline with each (`load_lora_weights` + `fuse_lora`; two at once with
//! `set_adapters` weights; PEFT's `merge_and_unload`) from fixed latents. Ours, merged as the
//! weights load, must give the same latents and image.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::{Flex, NdArray};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use common::{Reference, Report, fixtures_dir, magnitude, manifest};
use sd::lora::{Component, LoraFile, MergeOptions};
use sd::schedulers::ReplayNoise;
use sd::{LoraApplication, Model, generate_with_noise};

fn case(name: &str) -> PathBuf {
    fixtures_dir().join("lora").join(name)
}

fn model_folder(name: &str) -> PathBuf {
    fixtures_dir().join("pipeline").join(name).join("model")
}

fn open(case: &Path, file: &str) -> Arc<LoraFile> {
    Arc::new(LoraFile::open(case.join(file)).unwrap_or_else(|e| panic!("{e}")))
}

/// The latents and image (in `[0, 1]`) our pipeline gives with `loras` merged or applied on
/// the fly.
fn generate<B: Backend>(
    name: &str,
    loras: Vec<(Arc<LoraFile>, f32)>,
    application: LoraApplication,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let case = case(name);
    let manifest = manifest(&case);
    let g = &manifest["generation"];
    let reference = Reference::open(&case);
    let model = Model::from_folder(model_folder(name), None)
        .and_then(|m| m.with_loras(loras))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_lora_application(application);
    let latents: Tensor<B, 4> = reference.tensor("latents_in", device);
    let options = common::generation_options(g, latents.into_data());
    let mut noise = ReplayNoise::new(Vec::new());
    let out = generate_with_noise::<B>(&model, &options, device, &mut noise, None)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (out.latents, ((out.images + 1.0) / 2.0).clamp(0.0, 1.0))
}

fn every_case<B: Backend>(
    device: &B::Device,
    backend: &str,
    models: &[&str],
    application: LoraApplication,
) {
    let mut report = Report::default();
    for &name in models {
        let case = case(name);
        let manifest = manifest(&case);
        let reference = Reference::open(&case);
        let tolerance = manifest["generation"]["tolerance"].as_f64().unwrap() as f32;
        let cases = manifest["cases"].as_object().expect("cases");
        let expected_cases = if name == "tiny_sd1" { 5 } else { 4 };
        assert_eq!(cases.len(), expected_cases, "{name}: cases {cases:?}");
        for (label, spec) in cases {
            let loras = spec["loras"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        open(&case, l["file"].as_str().unwrap()),
                        l["weight"].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            let (latents, image) = generate::<B>(name, loras, application, device);
            let expected: Tensor<B, 4> = reference.tensor(&format!("{label}.latents_out"), device);
            let scale = magnitude(&expected);
            // The LoRA must matter: its latents are far from the base model's.
            let base: Tensor<B, 4> = reference.tensor("base.latents_out", device);
            let moved = (expected.clone() - base)
                .abs()
                .max()
                .into_scalar()
                .elem::<f32>();
            if moved < 100.0 * tolerance * scale {
                report.fail(format!(
                    "{name}/{label}: the LoRA moves the latents only {moved}"
                ));
            }
            report.check(
                &format!("{backend} {name}/{label} latents"),
                latents,
                expected,
                tolerance * scale,
            );
            report.check(
                &format!("{backend} {name}/{label} image"),
                image,
                reference.tensor(&format!("{label}.image"), device),
                tolerance,
            );
        }
    }
    report.finish();
}

#[test]
fn every_lora_layout_gives_diffusers_image_on_flex() {
    every_case::<Flex>(
        &Default::default(),
        "flex",
        &["tiny_sd1", "tiny_sdxl"],
        LoraApplication::Merge,
    );
}

/// The same cases with the LoRAs kept beside the weights and added at each layer's forward
/// (diffusers' `load_lora_weights` before `fuse_lora`): the same latents and image.
#[test]
fn every_lora_layout_gives_diffusers_image_on_the_fly() {
    every_case::<Flex>(
        &Default::default(),
        "flex on the fly",
        &["tiny_sd1", "tiny_sdxl"],
        LoraApplication::OnTheFly,
    );
}

/// The second CPU backend on the SD 1.x cases (the slow one: SDXL's adds a minute).
#[test]
fn every_lora_layout_gives_diffusers_image_on_ndarray() {
    every_case::<NdArray>(
        &Default::default(),
        "ndarray",
        &["tiny_sd1"],
        LoraApplication::Merge,
    );
}

/// Each layout is told from its keys, and every factor pairs up.
#[test]
fn layouts_are_detected() {
    use sd::lora::LoraFormat;
    let sd1 = case("tiny_sd1");
    let kohya = open(&sd1, "kohya.safetensors");
    assert_eq!(kohya.format, LoraFormat::Kohya);
    assert_eq!(
        kohya.components(),
        vec![Component::Unet, Component::TextEncoder]
    );
    // kohya's alpha 8 on rank 4 (U-Net), 1 on rank 2 (text encoder).
    let l = kohya.layers_of(Component::Unet).next().unwrap();
    assert_eq!((l.rank(), l.scale()), (4, 2.0));
    let l = kohya.layers_of(Component::TextEncoder).next().unwrap();
    assert_eq!((l.rank(), l.scale()), (2, 0.5));
    let diffusers = open(&sd1, "diffusers.safetensors");
    assert_eq!(diffusers.format, LoraFormat::Diffusers);
    assert_eq!(diffusers.layers.len(), kohya.layers.len());
    // The alphas come from diffusers' adapter metadata.
    assert!(diffusers.layers.iter().all(|l| l.alpha.is_some()));
    let peft = open(&sd1, "peft/adapter_model.safetensors");
    assert_eq!(peft.format, LoraFormat::Peft);
    assert_eq!(peft.components(), vec![Component::Unet]);
    assert!(
        peft.layers.iter().all(|l| l.scale() == 2.0),
        "adapter_config.json's lora_alpha"
    );
    let xl = open(&case("tiny_sdxl"), "kohya.safetensors");
    assert_eq!(
        xl.components(),
        vec![
            Component::Unet,
            Component::TextEncoder,
            Component::TextEncoder2
        ]
    );
}

/// A merge is undone exactly: the module's weights come back bit for bit.
#[test]
fn a_merge_is_restored_exactly() {
    type B = Flex;
    let device = Default::default();
    let model = Model::from_folder(model_folder("tiny_sd1"), None).unwrap();
    let unet = model.load_base_unet::<B>(&device).unwrap();
    let before: Vec<_> = sd::core::weights::module_tensors(&unet, &|p| Some(p.to_string()));
    let lora = open(&case("tiny_sd1"), "kohya.safetensors");
    let (merged, undo) = sd::lora::merge(
        unet,
        Component::Unet,
        &[(lora.as_ref(), 0.8)],
        &sd::unet::checkpoint_key,
        None,
        MergeOptions::default(),
        &device,
    )
    .unwrap();
    assert!(undo.weights > 20, "{} weights merged", undo.weights);
    let during = sd::core::weights::module_tensors(&merged, &|p| Some(p.to_string()));
    let changed = before
        .iter()
        .zip(&during)
        .filter(|((_, a), (_, b))| a.to_data().unwrap() != b.to_data().unwrap())
        .count();
    assert_eq!(changed, undo.weights);
    let restored = undo.restore(merged).unwrap();
    let after = sd::core::weights::module_tensors(&restored, &|p| Some(p.to_string()));
    for ((ka, a), (kb, b)) in before.iter().zip(&after) {
        assert_eq!(ka, kb);
        assert_eq!(a.to_data().unwrap(), b.to_data().unwrap(), "{ka}");
    }
    assert_eq!(
        restored.num_params(),
        model.load_base_unet::<B>(&device).unwrap().num_params()
    );
}

/// LoRAs attached to a loaded U-Net change its output as the merge does and come off again
/// without a trace: one model, switched between generations without reloading.
#[test]
fn attached_loras_switch_per_generation_without_reloading() {
    type B = Flex;
    let device = Default::default();
    let model = Model::from_folder(model_folder("tiny_sd1"), None).unwrap();
    let unet = model.load_base_unet::<B>(&device).unwrap();
    let config = model.unet_config();
    let [c, s] = [config.in_channels, 8];
    let latents = Tensor::<B, 4>::random(
        [2, c, s, s],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let context = Tensor::<B, 3>::random(
        [2, 7, config.cross_attention_dim.expand(1).unwrap()[0]],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let forward = |unet: &sd::unet::UNet2DConditionModel<B>| {
        unet.forward(latents.clone(), &[500.0, 20.0], context.clone(), None)
            .unwrap()
            .into_data()
    };
    let max_diff = |a: &burn::tensor::TensorData, b: &burn::tensor::TensorData| {
        let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let base = forward(&unet);
    let kohya = open(&case("tiny_sd1"), "kohya.safetensors");
    let attach = |weight: f32| {
        sd::lora::attach(
            &unet,
            Component::Unet,
            &[(kohya.as_ref(), weight)],
            &sd::unet::checkpoint_key,
            None,
            MergeOptions::default(),
            &device,
        )
        .unwrap()
    };
    let merged_output = |weight: f32| {
        let (merged, _) = sd::lora::merge(
            unet.clone(),
            Component::Unet,
            &[(kohya.as_ref(), weight)],
            &sd::unet::checkpoint_key,
            None,
            MergeOptions::default(),
            &device,
        )
        .unwrap();
        forward(&merged)
    };
    for weight in [0.8, -0.5] {
        let expected = merged_output(weight);
        let attached = attach(weight);
        assert!(
            attached.weights > 20,
            "{} weights adapted",
            attached.weights
        );
        let out = forward(&unet);
        let moved = max_diff(&out, &base);
        let off = max_diff(&out, &expected);
        assert!(
            moved > 1e-2,
            "weight {weight}: the LoRA moved the output {moved}"
        );
        assert!(off < 1e-4, "weight {weight}: on the fly vs merged: {off}");
        attached.detach();
        assert_eq!(forward(&unet), base, "weight {weight}: not detached");
    }
}

/// A LoRA made for another model is refused with the key, the module it wanted and the
/// nearest one there is; `ignore_unmatched` leaves such layers out and counts them.
#[test]
fn a_lora_for_another_model_is_refused_by_key() {
    let sd1_lora = open(&case("tiny_sd1"), "kohya.safetensors");
    let xl = Model::from_folder(model_folder("tiny_sdxl"), None).unwrap();
    let err = xl
        .clone()
        .with_loras(vec![(sd1_lora.clone(), 1.0)])
        .unwrap()
        .load_unet::<Flex>(&Default::default())
        .expect_err("an SD 1.x LoRA on an SDXL U-Net");
    let text = err.to_string();
    assert!(text.contains("kohya.safetensors"), "{text}");
    assert!(text.contains("lora_unet_"), "{text}");
    assert!(
        text.contains("nearest module") || text.contains("does not fit"),
        "{text}"
    );
    // An SDXL LoRA's second text encoder on an SD 1.x model: refused up front.
    let xl_lora = open(&case("tiny_sdxl"), "kohya.safetensors");
    let sd1 = Model::from_folder(model_folder("tiny_sd1"), None).unwrap();
    let err = sd1
        .with_loras(vec![(xl_lora, 1.0)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("second text encoder"), "{err}");
}

/// kohya's SDXL LoRAs name the U-Net's modules in the original layout
/// (`lora_unet_input_blocks_4_1_…`). The fixture's kohya file, renamed so through the original
/// layout's keys of tiny_sdxl's single-file checkpoint, gives diffusers' image of the original.
#[test]
fn kohya_sdxl_names_in_the_original_layout_give_the_same_image() {
    use safetensors::tensor::TensorView;
    let case = case("tiny_sdxl");
    // Original-layout module names (underscored) by the diffusers name they map to.
    let single = sd::core::weights::SafetensorsFile::open(
        fixtures_dir().join("pipeline/tiny_sdxl/tiny_sdxl.safetensors"),
    )
    .unwrap();
    let mut original = std::collections::HashMap::new();
    for entry in single.entries() {
        let Some(module) = entry
            .key
            .strip_prefix(sd::unet::LDM_UNET_PREFIX)
            .and_then(|k| k.strip_suffix(".weight"))
        else {
            continue;
        };
        let ldm = module.replace('.', "_");
        if let Some(diffusers) = sd::unet::kohya_ldm_to_diffusers(&ldm, 1) {
            original.insert(diffusers, ldm);
        }
    }
    let source = std::fs::read(case.join("kohya.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&source).unwrap();
    let mut renamed = Vec::new();
    let mut count = 0;
    for (key, view) in tensors.tensors() {
        let new_key = match key.strip_prefix("lora_unet_") {
            Some(rest) => {
                let (module, suffix) = rest.split_once('.').unwrap();
                let ldm = original
                    .get(module)
                    .unwrap_or_else(|| panic!("no original name for {module}"));
                count += 1;
                format!("lora_unet_{ldm}.{suffix}")
            }
            None => key.clone(),
        };
        renamed.push((
            new_key,
            TensorView::new(view.dtype(), view.shape().to_vec(), view.data()).unwrap(),
        ));
    }
    assert!(count > 50, "{count} U-Net keys renamed");
    assert!(
        renamed
            .iter()
            .any(|(k, _)| k.starts_with("lora_unet_input_blocks_"))
    );
    let dir = std::env::temp_dir().join(format!("sd-lora-ldm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kohya_ldm.safetensors");
    std::fs::write(&path, safetensors::serialize(renamed, None).unwrap()).unwrap();
    let lora = Arc::new(LoraFile::open(&path).unwrap());
    let device = Default::default();
    let (latents, _) = generate::<Flex>(
        "tiny_sdxl",
        vec![(lora, 1.0)],
        LoraApplication::Merge,
        &device,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let reference = Reference::open(&case);
    let mut report = Report::default();
    let tolerance = manifest(&case)["generation"]["tolerance"].as_f64().unwrap() as f32;
    report.check(
        "original-layout kohya names",
        latents,
        reference.tensor::<Flex, 4>("kohya.latents_out", &device),
        tolerance * 4.0,
    );
    report.finish();
}

/// Each layout written in kohya's (`LoraFile::save_kohya`, f16 factors, alphas as keys) reads
/// back as kohya's with the same layers and gives diffusers' image of the original file.
#[test]
fn every_layout_converts_to_kohya_and_gives_the_same_image() {
    use sd::lora::LoraFormat;
    let dir = std::env::temp_dir().join(format!("sd-lora-kohya-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let device = Default::default();
    let mut report = Report::default();
    for (name, file, label) in [
        ("tiny_sd1", "diffusers.safetensors", "diffusers"),
        ("tiny_sd1", "peft/adapter_model.safetensors", "peft"),
        ("tiny_sdxl", "diffusers.safetensors", "diffusers"),
    ] {
        let case = case(name);
        let source = open(&case, file);
        let path = dir.join(format!("{name}-{label}.safetensors"));
        source
            .save_kohya(&path, burn::tensor::DType::F16)
            .unwrap_or_else(|e| panic!("{e}"));
        // The same file, byte for byte, every time it is written (the header's metadata
        // comes from a hash map).
        let again = dir.join(format!("{name}-{label}-again.safetensors"));
        for _ in 0..4 {
            source.save_kohya(&again, burn::tensor::DType::F16).unwrap();
            assert!(
                std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap(),
                "{name} {label}: saved twice, two different files"
            );
        }
        let back = Arc::new(LoraFile::open(&path).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(back.format, LoraFormat::Kohya);
        assert_eq!(back.layers.len(), source.layers.len(), "{name} {label}");
        assert_eq!(back.components(), source.components());
        assert_eq!(back.metadata["ss_network_module"], "networks.lora");
        let scales = |f: &LoraFile| {
            let mut s: Vec<String> = f
                .layers
                .iter()
                .map(|l| format!("{:?} {} {}", l.component, l.rank(), l.scale()))
                .collect();
            s.sort();
            s
        };
        assert_eq!(scales(&back), scales(&source), "{name} {label}");
        let (latents, _) =
            generate::<Flex>(name, vec![(back, 1.0)], LoraApplication::Merge, &device);
        let reference = Reference::open(&case);
        let tolerance = manifest(&case)["generation"]["tolerance"].as_f64().unwrap() as f32;
        let expected: Tensor<Flex, 4> = reference.tensor(&format!("{label}.latents_out"), &device);
        let scale = magnitude(&expected);
        report.check(
            &format!("{name} {label} as kohya"),
            latents,
            expected,
            tolerance * scale,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    report.finish();
}
