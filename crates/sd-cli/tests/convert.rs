//! `sd convert`: a single file or a diffusers folder in, a diffusers folder out that loads to
//! the same weights (byte for byte in the source's dtype) and configs; refused outputs and
//! failures leave nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::DType;
use sd::Model;
use sd::backend::Flex;
use sd::core::weights::{SafetensorsFile, TensorSnapshot, module_tensors};
use serde_json::Value;

mod common;
use common::{copy_dir, tiny_model};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-cli-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `sd` with a deadline (a hang is a failure, not a stuck test): exit code, stdout,
/// stderr.
fn sd(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("sd {args:?} hung for two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sd convert` and asserts it succeeds with its one line.
fn convert(args: &[&str]) {
    let mut all = vec!["convert"];
    all.extend(args);
    let (code, stdout, stderr) = sd(&all);
    assert_eq!(code, Some(0), "{all:?}: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("wrote "), "{stdout}");
}

/// Asserts `sd convert` fails with one `sd: …` line containing `needle` (exit 1, or 2 for a
/// usage error; never a panic).
fn refused(args: &[&str], needle: &str) {
    let mut all = vec!["convert"];
    all.extend(args);
    let (code, _, stderr) = sd(&all);
    assert!(matches!(code, Some(1 | 2)), "{all:?}: {code:?} {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("sd: "), "{stderr}");
    assert!(stderr.contains(needle), "`{needle}` in {stderr}");
}

/// A module's tensors as f32 bytes, by module path.
fn values(tensors: Vec<(String, TensorSnapshot)>) -> BTreeMap<String, Vec<u8>> {
    tensors
        .into_iter()
        .map(|(k, s)| {
            let data = s.to_data().unwrap().convert_dtype(DType::F32);
            (k, data.as_bytes().to_vec())
        })
        .collect()
}

/// Every weight of every component of a model, loaded with the model's own loaders.
fn weights(model: &Model) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let device = Default::default();
    let key = |k: &str| Some(k.to_string());
    let mut out = BTreeMap::new();
    let unet = model.load_unet::<Flex>(&device).unwrap();
    out.insert("unet".into(), values(module_tensors(&unet, &key)));
    let encoder = model.load_vae_encoder::<Flex>(&device).unwrap();
    out.insert("vae encoder".into(), values(encoder.weight_tensors()));
    let decoder = model.load_vae_decoder::<Flex>(&device).unwrap();
    out.insert("vae decoder".into(), values(decoder.weight_tensors()));
    for i in 0..model.text_encoder_count() {
        let text = model.load_text_encoder::<Flex>(i, &device).unwrap();
        out.insert(
            format!("text encoder {i}"),
            values(module_tensors(&text, &key)),
        );
    }
    out
}

/// Asserts two models hold the same weights, naming the first component and tensor that
/// differ.
fn assert_same_weights(a: &Model, b: &Model, what: &str) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (component, tensors) in &a {
        let theirs = &b[component];
        assert_eq!(
            tensors.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{what}: {component}"
        );
        assert!(!tensors.is_empty(), "{what}: {component}");
        for (key, value) in tensors {
            assert!(value == &theirs[key], "{what}: {component} `{key}` differs");
        }
    }
}

/// Every floating-point tensor of a safetensors file as (dtype, shape, bytes), by key.
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

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts nothing but `keep` is left in `dir` (no temporary folder from a conversion).
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep, "{}", dir.display());
}

#[test]
fn single_files_convert_to_folders_with_the_same_weights() {
    let dir = scratch("single");
    for case in ["tiny_sd1", "tiny_sd2_vpred", "tiny_sdxl"] {
        let config = fixtures().join(case).join("model");
        let file = fixtures().join(case).join(format!("{case}.safetensors"));
        let out = dir.join(case);
        convert(&[
            file.to_str().unwrap(),
            out.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        let single = Model::from_single_file(&file, Some(&config)).unwrap();
        let folder = Model::from_folder(&out, None).unwrap();
        assert_eq!(folder.family(), single.family(), "{case}");
        assert_eq!(folder.unet_config(), single.unet_config(), "{case}");
        assert_eq!(folder.vae_config(), single.vae_config(), "{case}");
        assert_eq!(
            folder.scheduler_config(),
            single.scheduler_config(),
            "{case}"
        );
        assert_eq!(
            folder.text_configs().unwrap(),
            single.text_configs().unwrap(),
            "{case}"
        );
        // Written in the source's dtype by default.
        assert_eq!(folder.stored_dtype(), single.stored_dtype(), "{case}");
        assert_same_weights(&folder, &single, case);
        // The tokenizers are the config folder's, as the single file was read with them.
        for tokenizer in ["tokenizer", "tokenizer_2"] {
            let from = config.join(tokenizer);
            if !from.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&from).unwrap() {
                let name = entry.unwrap().file_name();
                assert_eq!(
                    std::fs::read(out.join(tokenizer).join(&name)).unwrap(),
                    std::fs::read(from.join(&name)).unwrap(),
                    "{case}: {tokenizer}/{name:?}"
                );
            }
        }
        assert_eq!(
            read_json(&out.join("model_index.json")),
            read_json(&config.join("model_index.json")),
            "{case}"
        );
    }
    only(&dir, &["tiny_sd1", "tiny_sd2_vpred", "tiny_sdxl"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a single file we write may leave out of the fixture's (written by the fixture
/// script in the original layout and proven there with diffusers' own converters): the
/// `position_ids` buffer, OpenCLIP's unused `logit_scale`, and for SD 2.x the 24th ViT-H block
/// and `text_projection`, which diffusers' SD 2.x text encoder does not hold.
fn not_in_the_model(key: &str, case: &str) -> bool {
    key.ends_with("position_ids")
        || key.ends_with("logit_scale")
        || (case == "tiny_sd2_vpred"
            && (key.ends_with("model.text_projection") || key.contains(".resblocks.3.")))
}

#[test]
fn folders_convert_to_single_files_in_the_original_layout() {
    let dir = scratch("to-single");
    for case in ["tiny_sd1", "tiny_sd2_vpred", "tiny_sdxl"] {
        let source = fixtures().join(case).join("model");
        let reference = fixtures().join(case).join(format!("{case}.safetensors"));
        let out = dir.join(format!("{case}.safetensors"));
        convert(&[source.to_str().unwrap(), out.to_str().unwrap()]);
        // The same keys, shapes and f16 bytes as the fixture script's file.
        let ours = contents(&out);
        let theirs = contents(&reference);
        for (key, value) in &ours {
            assert!(
                theirs.get(key) == Some(value),
                "{case}: {key} differs or is extra"
            );
        }
        let missing: Vec<_> = theirs
            .keys()
            .filter(|k| !ours.contains_key(*k) && !not_in_the_model(k, case))
            .collect();
        assert!(missing.is_empty(), "{case}: not written: {missing:?}");
        // And it reads back as the folder's weights.
        let single = Model::from_single_file(&out, Some(&source)).unwrap();
        let folder = Model::from_folder(&source, None).unwrap();
        assert_eq!(single.family(), folder.family(), "{case}");
        assert_same_weights(&single, &folder, case);
    }
    // f32 on request, and a single file converts back to the same folder weights.
    let out = dir.join("f32.safetensors");
    convert(&[
        tiny_model().to_str().unwrap(),
        out.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let file = SafetensorsFile::open(&out).unwrap();
    assert!(file.entries().iter().all(|e| e.dtype == DType::F32));
    let back = dir.join("back");
    convert(&[
        out.to_str().unwrap(),
        back.to_str().unwrap(),
        "--config",
        tiny_model().to_str().unwrap(),
    ]);
    let folder = Model::from_folder(tiny_model(), None).unwrap();
    assert_same_weights(&Model::from_folder(&back, None).unwrap(), &folder, "back");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn folders_convert_to_byte_identical_weights_and_the_same_configs() {
    let dir = scratch("folders");
    for case in [
        "tiny_sd1",
        "tiny_sd1_inpaint",
        "tiny_sd2_vpred",
        "tiny_sdxl",
    ] {
        let source = fixtures().join(case).join("model");
        let out = dir.join(case);
        convert(&[source.to_str().unwrap(), out.to_str().unwrap()]);
        let mut files = vec![
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ];
        if source.join("text_encoder_2").is_dir() {
            files.push("text_encoder_2/model.safetensors");
        }
        for file in files {
            let (ours, theirs) = (contents(&out.join(file)), contents(&source.join(file)));
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                theirs.keys().collect::<Vec<_>>(),
                "{case}: {file}"
            );
            for (key, value) in &ours {
                assert!(value == &theirs[key], "{case}: {file} `{key}` differs");
            }
        }
        // The configs diffusers and transformers wrote, as they wrote them (transformers'
        // version aside, which is not ours to claim).
        for file in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder_2/config.json",
        ] {
            if !source.join(file).is_file() {
                continue;
            }
            let mut theirs = read_json(&source.join(file));
            if let Some(map) = theirs.as_object_mut() {
                map.remove("transformers_version");
            }
            assert_eq!(read_json(&out.join(file)), theirs, "{case}: {file}");
        }
        for tokenizer in ["tokenizer", "tokenizer_2"] {
            if !source.join(tokenizer).is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(source.join(tokenizer)).unwrap() {
                let name = entry.unwrap().file_name();
                assert_eq!(
                    std::fs::read(out.join(tokenizer).join(&name)).unwrap(),
                    std::fs::read(source.join(tokenizer).join(&name)).unwrap(),
                    "{case}: {tokenizer}/{name:?}"
                );
            }
        }
        let (a, b) = (
            Model::from_folder(&out, None).unwrap(),
            Model::from_folder(&source, None).unwrap(),
        );
        assert_eq!(a.unet_config(), b.unet_config(), "{case}");
        assert_eq!(a.vae_config(), b.vae_config(), "{case}");
        assert_eq!(a.is_inpainting(), b.is_inpainting(), "{case}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn other_dtypes_are_written_as_asked() {
    let dir = scratch("dtype");
    let out = dir.join("f32");
    convert(&[
        tiny_model().to_str().unwrap(),
        out.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    let folder = Model::from_folder(&out, None).unwrap();
    assert_eq!(folder.stored_dtype(), Some(DType::F32));
    assert_eq!(
        read_json(&out.join("text_encoder/config.json"))["dtype"],
        "float32"
    );
    for file in [
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        assert!(
            contents(&out.join(file))
                .values()
                .all(|(dtype, ..)| *dtype == DType::F32),
            "{file}"
        );
    }
    // f16 widens exactly: the same weights.
    assert_same_weights(
        &folder,
        &Model::from_folder(tiny_model(), None).unwrap(),
        "f32",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn outputs_that_hold_something_and_missing_inputs_are_refused() {
    let dir = scratch("refused");
    let model = tiny_model();
    let model = model.to_str().unwrap();
    // A folder with something in it is neither merged into nor replaced.
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    refused(&[model, full.to_str().unwrap()], "exists and is not empty");
    only(&full, &["keep.txt"]);
    assert_eq!(
        std::fs::read_to_string(full.join("keep.txt")).unwrap(),
        "mine"
    );
    // Nor is a file.
    let file = dir.join("file");
    std::fs::write(&file, "mine").unwrap();
    refused(
        &[model, file.to_str().unwrap()],
        "exists and is not a folder",
    );
    // An input that is not there, and an output folder that is not there.
    let missing = dir.join("missing-model");
    refused(
        &[missing.to_str().unwrap(), dir.join("a").to_str().unwrap()],
        "missing-model",
    );
    refused(
        &[model, dir.join("no/such/folder").to_str().unwrap()],
        "does not exist",
    );
    // A single file over a folder, and --config with a folder.
    let folder = dir.join("folder.safetensors");
    std::fs::create_dir(&folder).unwrap();
    refused(&[model, folder.to_str().unwrap()], "folder.safetensors");
    refused(
        &[model, dir.join("b").to_str().unwrap(), "--config", model],
        "--config is for single-file checkpoints",
    );
    refused(
        &[model, dir.join("c").to_str().unwrap(), "--dtype", "f64"],
        "--dtype",
    );
    only(&dir, &["file", "folder.safetensors", "full"]);
    // An empty folder is the one thing that may be there already.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    convert(&[model, empty.to_str().unwrap()]);
    assert!(Model::from_folder(&empty, None).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failure_while_writing_leaves_no_folder() {
    let dir = scratch("failure");
    // The text encoder's weights are cut short: the model opens (its configs are fine), and
    // the U-Net and VAE are written before the text encoder fails to load.
    let broken = dir.join("broken");
    copy_dir(&tiny_model(), &broken);
    let weights = broken.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.join("out");
    refused(
        &[broken.to_str().unwrap(), out.to_str().unwrap()],
        "model.safetensors",
    );
    only(&dir, &["broken"]);
    let _ = std::fs::remove_dir_all(&dir);
}
