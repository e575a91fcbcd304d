//! Load → save → load gives identical tensors for every fixture model's U-Net and VAE, and the
//! saved files hold the same keys, shapes and (in the file's dtype) bytes as the originals:
//! the saving half of the weight contract, as training will write checkpoints with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use sd_core::AutoencoderKlConfig;
use sd_core::backend::Flex;
use sd_core::weights::{
    LoadOptions, SafetensorsFile, TensorSnapshot, module_tensors, save_tensors,
};
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;
use sd_unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn models() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipeline");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path().join("model"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "{dirs:?}");
    dirs
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-save-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every tensor of a file as (dtype, shape, bytes), by key.
fn contents(path: &Path) -> BTreeMap<String, (DType, Vec<usize>, Vec<u8>)> {
    let file = SafetensorsFile::open(path).unwrap();
    file.entries()
        .iter()
        .filter(|e| e.is_float())
        .map(|e| {
            let data = file.tensor_data(&e.key, e.dtype).unwrap();
            (
                e.key.clone(),
                (e.dtype, e.shape.clone(), data.as_bytes().to_vec()),
            )
        })
        .collect()
}

/// Asserts two files' contents are equal, naming the keys that differ (not printing bytes).
fn assert_same(
    a: &BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>,
    b: &BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>,
    what: &str,
) {
    let only_a: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_b: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    let differ: Vec<_> = a
        .iter()
        .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
        .map(|(k, v)| (k, v.0, v.1.clone(), b[k].0, b[k].1.clone()))
        .take(5)
        .collect();
    assert!(
        only_a.is_empty() && only_b.is_empty() && differ.is_empty(),
        "{what}: only saved {only_a:?}, only original {only_b:?}, differ {differ:?}"
    );
}

/// A module's tensors as bytes in f32, by key.
fn values(tensors: Vec<(String, TensorSnapshot)>) -> BTreeMap<String, Vec<u8>> {
    tensors
        .into_iter()
        .map(|(k, s)| {
            (
                k,
                s.to_data()
                    .unwrap()
                    .convert_dtype(DType::F32)
                    .as_bytes()
                    .to_vec(),
            )
        })
        .collect()
}

#[test]
fn unet_weights_round_trip_exactly() {
    let dir = scratch("unet");
    let device = Default::default();
    for model in models() {
        let original = model.join("unet/diffusion_pytorch_model.safetensors");
        let unet = UNet2DConditionModel::<Flex>::from_pretrained(model.join("unet"), None, &device)
            .unwrap();
        let stored = contents(&original);
        let dtype = stored.values().next().unwrap().0;
        let saved = dir.join("unet.safetensors");
        let config = UNet2DConditionConfig::from_file(model.join("unet/config.json")).unwrap();
        unet.save_weights(&config, &saved, dtype).unwrap();
        // Same keys, shapes and bytes as the file diffusers wrote.
        assert_same(&contents(&saved), &stored, &model.display().to_string());
        // And loads back to the same parameters, in f32 too.
        let f32_file = dir.join("unet-f32.safetensors");
        unet.save_weights(&config, &f32_file, DType::F32).unwrap();
        let back = UNet2DConditionModel::<Flex>::new(&config, &device)
            .unwrap()
            .load_weights(
                &SafetensorsFile::open(&f32_file).unwrap(),
                LoadOptions::default(),
            )
            .unwrap();
        let key = |k: &str| Some(k.to_string());
        assert_eq!(
            values(module_tensors(&back, &key)),
            values(module_tensors(&unet, &key))
        );
    }
}

#[test]
fn both_vae_halves_save_into_one_file_as_diffusers_keeps_it() {
    let dir = scratch("vae");
    let device = Default::default();
    for model in models() {
        let vae = model.join("vae");
        let original = vae.join("diffusion_pytorch_model.safetensors");
        let encoder = VaeEncoder::<Flex>::from_pretrained(&vae, None, &device).unwrap();
        let decoder = VaeDecoder::<Flex>::from_pretrained(&vae, None, &device).unwrap();
        let stored = contents(&original);
        let dtype = stored.values().next().unwrap().0;
        let saved = dir.join("vae.safetensors");
        let mut tensors = encoder.weight_tensors();
        tensors.extend(decoder.weight_tensors());
        save_tensors(tensors, &saved, dtype, None).unwrap();
        assert_same(&contents(&saved), &stored, &model.display().to_string());
        let config = AutoencoderKlConfig::from_file(vae.join("config.json")).unwrap();
        let file = SafetensorsFile::open(&saved).unwrap();
        let back = VaeDecoder::<Flex>::new(&config, &device)
            .unwrap()
            .load_weights(&file, LoadOptions::default())
            .unwrap();
        assert_eq!(
            values(back.weight_tensors()),
            values(decoder.weight_tensors())
        );
    }
}

#[test]
fn text_encoders_round_trip_in_transformers_layout() {
    let dir = scratch("clip");
    let device = Default::default();
    for model in models() {
        for name in ["text_encoder", "text_encoder_2"] {
            let folder = model.join(name);
            if !folder.is_dir() {
                continue;
            }
            let original = folder.join("model.safetensors");
            let clip =
                sd_conditioner::ClipTextModel::<Flex>::from_pretrained(&folder, &device).unwrap();
            let stored = contents(&original);
            let dtype = stored.values().next().unwrap().0;
            let saved = dir.join("model.safetensors");
            clip.save_weights(&saved, dtype).unwrap();
            assert_same(&contents(&saved), &stored, &folder.display().to_string());
        }
    }
}

/// Our JSON against the one diffusers wrote: the same value for every key both have (numbers
/// compared as numbers), and no key diffusers does not write.
fn assert_config_matches(ours: &serde_json::Value, theirs: &serde_json::Value, what: &str) {
    let (ours, theirs) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    let same = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(1.0),
        _ => {
            a == b
                || (a.is_array() && serde_json::to_string(a).ok() == serde_json::to_string(b).ok())
        }
    };
    for (key, value) in ours {
        if key == "_diffusers_version" {
            continue;
        }
        let Some(theirs) = theirs.get(key) else {
            panic!("{what}: we write `{key}`, which diffusers does not");
        };
        // A list of one value per block may be written as that value alone.
        let per_block = |one: &serde_json::Value, list: &serde_json::Value| {
            list.as_array()
                .is_some_and(|l| l.iter().all(|v| same(v, one)))
        };
        assert!(
            same(value, theirs) || per_block(value, theirs) || per_block(theirs, value),
            "{what}: `{key}` is {value}, diffusers wrote {theirs}"
        );
    }
    // And every key diffusers writes: one left out is filled in by default on loading, with
    // a "was not found in config" message.
    for key in theirs.keys() {
        assert!(
            key == "_diffusers_version" || ours.contains_key(key),
            "{what}: diffusers writes `{key}`, which we do not"
        );
    }
}

#[test]
fn unet_and_vae_configs_write_back_as_diffusers_wrote_them() {
    let dir = scratch("configs");
    for model in models() {
        let unet_path = model.join("unet/config.json");
        let unet = UNet2DConditionConfig::from_file(&unet_path).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&unet_path).unwrap()).unwrap();
        assert_config_matches(&unet.to_json(), &theirs, &unet_path.display().to_string());
        let written = dir.join("unet.json");
        std::fs::write(
            &written,
            serde_json::to_string_pretty(&unet.to_json()).unwrap(),
        )
        .unwrap();
        assert_eq!(UNet2DConditionConfig::from_file(&written).unwrap(), unet);

        let vae_path = model.join("vae/config.json");
        let vae = AutoencoderKlConfig::from_file(&vae_path).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&vae_path).unwrap()).unwrap();
        assert_config_matches(&vae.to_json(), &theirs, &vae_path.display().to_string());
        let written = dir.join("vae.json");
        std::fs::write(
            &written,
            serde_json::to_string_pretty(&vae.to_json()).unwrap(),
        )
        .unwrap();
        assert_eq!(AutoencoderKlConfig::from_file(&written).unwrap(), vae);
    }
}
