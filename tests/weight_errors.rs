//! Bad input gives an error that names the problem, never a panic: files, keys, shapes, dtypes,
//! configurations and images.

use crate::common;

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sd_core::CoreError;
use sd_core::error::WeightProblem;
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;

type B = sd_core::backend::Flex;

/// One tensor of a safetensors file: key, dtype, shape, raw bytes.
type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn first_case() -> PathBuf {
    common::cases("vae").into_iter().next().unwrap().join("vae")
}

fn read_entries(path: &Path) -> Vec<Entry> {
    let bytes = std::fs::read(path).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<Entry> = parsed
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

/// A scratch copy of the first VAE case whose weights `edit` has changed.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, edit: impl FnOnce(&mut Vec<Entry>)) -> Self {
        let src = first_case();
        let dir = std::env::temp_dir().join(format!("sd-bad-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let mut entries = read_entries(&src.join("diffusion_pytorch_model.safetensors"));
        edit(&mut entries);
        let views: Vec<(String, TensorView<'_>)> = entries
            .iter()
            .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(
            views,
            None,
            &dir.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        Scratch(dir)
    }

    fn raw(name: &str, bytes: &[u8]) -> Self {
        let src = first_case();
        let dir = std::env::temp_dir().join(format!("sd-bad-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), bytes).unwrap();
        Scratch(dir)
    }

    fn load_decoder(&self) -> Result<VaeDecoder<B>, CoreError> {
        VaeDecoder::<B>::from_pretrained(&self.0, None, &Default::default())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn original_bytes() -> Vec<u8> {
    std::fs::read(first_case().join("diffusion_pytorch_model.safetensors")).unwrap()
}

#[test]
fn missing_folder_names_the_file() {
    let err = VaeDecoder::<B>::from_pretrained("/nonexistent/vae", None, &Default::default())
        .unwrap_err();
    assert!(matches!(err, CoreError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/vae/config.json"),
        "{err}"
    );
}

#[test]
fn missing_weights_file_names_the_file() {
    let scratch = Scratch::new("noweights", |_| {});
    std::fs::remove_file(scratch.0.join("diffusion_pytorch_model.safetensors")).unwrap();
    let err = scratch.load_decoder().unwrap_err();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    let err = VaeDecoder::<B>::from_pretrained(first_case(), Some("fp16"), &Default::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.fp16.safetensors"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_an_error() {
    let bytes = original_bytes();
    for cut in [0, 4, 9, 100, bytes.len() / 2, bytes.len() - 1] {
        let scratch = Scratch::raw("truncated", &bytes[..cut]);
        let err = scratch.load_decoder().unwrap_err();
        assert!(
            matches!(err, CoreError::Safetensors { .. }),
            "cut at {cut}: {err}"
        );
        assert!(
            err.to_string().contains("not a valid safetensors file"),
            "{err}"
        );
    }
}

#[test]
fn absurd_header_length_is_an_error() {
    let mut bytes = original_bytes();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let scratch = Scratch::raw("header", &bytes);
    let err = scratch.load_decoder().unwrap_err();
    assert!(matches!(err, CoreError::Safetensors { .. }), "{err}");
}

#[test]
fn garbage_header_is_an_error() {
    let mut bytes = original_bytes();
    bytes[8..16].copy_from_slice(b"{{{{{{{{");
    let scratch = Scratch::raw("garbage", &bytes);
    let err = scratch.load_decoder().unwrap_err();
    assert!(matches!(err, CoreError::Safetensors { .. }), "{err}");
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let scratch = Scratch::new("shape", |entries| {
        let e = entries
            .iter_mut()
            .find(|e| e.0 == "decoder.conv_in.bias")
            .unwrap();
        e.2 = vec![e.2[0] / 2];
        e.3.truncate(e.3.len() / 2);
    });
    let err = scratch.load_decoder().unwrap_err();
    let CoreError::Weights { problems, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(problems.len(), 1, "{err}");
    assert!(
        matches!(&problems[0], WeightProblem::ShapeMismatch { key, expected, found }
        if key == "decoder.conv_in.bias" && expected == &vec![64] && found == &vec![32])
    );
    assert!(
        err.to_string().contains("expected [64], found [32]"),
        "{err}"
    );
}

#[test]
fn every_problem_comes_back_in_one_error() {
    let scratch = Scratch::new("many", |entries| {
        entries.retain(|e| e.0 != "decoder.conv_out.weight" && e.0 != "post_quant_conv.bias");
        let e = entries
            .iter_mut()
            .find(|e| e.0 == "decoder.conv_in.bias")
            .unwrap();
        e.2 = vec![e.2[0] / 2];
        e.3.truncate(e.3.len() / 2);
        entries.push((
            "decoder.extra.weight".into(),
            Dtype::F16,
            vec![2],
            vec![0; 4],
        ));
    });
    let err = scratch.load_decoder().unwrap_err();
    let text = err.to_string();
    let CoreError::Weights { problems, path } = &err else {
        panic!("{err}")
    };
    assert_eq!(problems.len(), 4, "{text}");
    assert!(path.ends_with("diffusion_pytorch_model.safetensors"));
    for needle in [
        "4 weight problem(s)",
        "missing key `decoder.conv_out.weight` (expected shape [3, 32, 3, 3])",
        "missing key `post_quant_conv.bias`",
        "shape mismatch for `decoder.conv_in.bias`",
        "unexpected key `decoder.extra.weight`",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
}

#[test]
fn integer_weight_is_an_unsupported_dtype() {
    let scratch = Scratch::new("dtype", |entries| {
        let e = entries
            .iter_mut()
            .find(|e| e.0 == "decoder.conv_in.bias")
            .unwrap();
        e.1 = Dtype::I16;
    });
    let err = scratch.load_decoder().unwrap_err();
    // The file opens (integer buffers such as `position_ids` are allowed beside weights); the
    // tensor the model needs as floats is refused by name.
    assert!(
        matches!(&err, CoreError::Weights { problems, .. }
            if problems.iter().any(|p| matches!(p, WeightProblem::NotFloat { key, .. } if key == "decoder.conv_in.bias"))),
        "{err}"
    );
    assert!(err.to_string().contains("stored as I16"), "{err}");
}

#[test]
fn the_encoder_ignores_decoder_keys_and_the_decoder_encoder_keys() {
    // A file with only the encoder half loads into the encoder, and is missing everything for
    // the decoder.
    let scratch = Scratch::new("halves", |entries| {
        entries.retain(|e| e.0.starts_with("encoder.") || e.0.starts_with("quant_conv."));
    });
    VaeEncoder::<B>::from_pretrained(&scratch.0, None, &Default::default()).unwrap();
    let err = scratch.load_decoder().unwrap_err();
    assert!(
        err.to_string()
            .contains("missing key `decoder.conv_in.weight`"),
        "{err}"
    );
}

#[test]
fn bad_configs_are_errors() {
    let scratch = Scratch::new("config", |_| {});
    let config = scratch.0.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let cases = [
        (
            "\"norm_num_groups\": 8",
            "\"norm_num_groups\": 7",
            "not a positive multiple of norm_num_groups 7",
        ),
        (
            "\"DownEncoderBlock2D\",",
            "\"CrossAttnDownBlock2D\",",
            "unsupported down block type `CrossAttnDownBlock2D`",
        ),
        (
            "\"layers_per_block\": 1",
            "\"layers_per_block\": \"one\"",
            "invalid AutoencoderKL config",
        ),
        (
            "\"act_fn\": \"silu\"",
            "\"act_fn\": \"relu\"",
            "unsupported act_fn `relu`",
        ),
    ];
    for (from, to, needle) in cases {
        assert!(original.contains(from), "fixture config lacks {from}");
        std::fs::write(&config, original.replacen(from, to, 1)).unwrap();
        let err = scratch.load_decoder().unwrap_err();
        assert!(matches!(err, CoreError::Config { .. }), "{err}");
        assert!(err.to_string().contains(needle), "`{needle}` not in {err}");
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}

#[test]
fn wrong_input_shapes_are_errors() {
    let dir = first_case();
    let device = Default::default();
    let encoder = VaeEncoder::<B>::from_pretrained(&dir, None, &device).unwrap();
    let decoder = VaeDecoder::<B>::from_pretrained(&dir, None, &device).unwrap();

    let err = encoder
        .encode(Tensor::zeros([1, 3, 33, 32], &device))
        .unwrap_err();
    assert!(err.to_string().contains("32×33"), "{err}");
    assert!(err.to_string().contains("multiples of 2"), "{err}");
    let err = encoder
        .encode(Tensor::zeros([1, 4, 32, 32], &device))
        .unwrap_err();
    assert!(err.to_string().contains("takes 3 channels, got 4"), "{err}");
    let err = decoder
        .decode(Tensor::zeros([1, 3, 8, 8], &device))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("[batch, 4, h, w], got [1, 3, 8, 8]"),
        "{err}"
    );
}

#[test]
fn image_files_round_trip_and_bad_ones_are_errors() {
    use sd_core::image_io::{load_image, save_image, tensor_to_images};
    let device = Default::default();
    let dir = std::env::temp_dir().join(format!("sd-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let image = image::RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 16, y as u8 * 32, 7]));
    let png = dir.join("ok.png");
    save_image(&image, &png).unwrap();
    let tensor = load_image::<B>(&png, 8, &device).unwrap();
    assert_eq!(tensor.dims(), [1, 3, 8, 16]);
    let back = tensor_to_images(tensor).unwrap();
    assert_eq!(back[0], image, "PNG → [-1, 1] → PNG is lossless");

    let err = load_image::<B>(&png, 16, &device).unwrap_err();
    assert!(err.to_string().contains("16×8"), "{err}");
    assert!(err.to_string().contains("ok.png"), "{err}");

    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let err = load_image::<B>(&junk, 8, &device).unwrap_err();
    assert!(matches!(err, CoreError::Image { .. }), "{err}");
    let err = load_image::<B>(dir.join("absent.jpg"), 8, &device).unwrap_err();
    assert!(err.to_string().contains("absent.jpg"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Large files are read tensor by tensor: the streaming reader gives the same tensors as the
/// in-memory one, and rejects the same broken files.
#[test]
fn streamed_files_read_the_same_and_reject_the_same() {
    use sd_core::weights::SafetensorsFile;
    let path = first_case().join("diffusion_pytorch_model.safetensors");
    let whole = SafetensorsFile::from_bytes(&path, original_bytes()).unwrap();
    let streamed = SafetensorsFile::open_streaming(&path).unwrap();
    assert_eq!(whole.entries().len(), streamed.entries().len());
    for (a, b) in whole.entries().iter().zip(streamed.entries()) {
        assert_eq!((&a.key, &a.shape), (&b.key, &b.shape));
        let dtype = burn::tensor::DType::F32;
        assert_eq!(
            whole.tensor_data(&a.key, dtype).unwrap(),
            streamed.tensor_data(&b.key, dtype).unwrap(),
            "{}",
            a.key
        );
    }
    let bytes = original_bytes();
    for cut in [0, 4, 9, 100, bytes.len() / 2, bytes.len() - 1] {
        let scratch = Scratch::raw("streamed-truncated", &bytes[..cut]);
        let file = scratch.0.join("diffusion_pytorch_model.safetensors");
        let err = SafetensorsFile::open_streaming(&file)
            .err()
            .expect("an error");
        assert!(
            matches!(err, CoreError::Safetensors { .. }),
            "cut at {cut}: {err}"
        );
    }
}
