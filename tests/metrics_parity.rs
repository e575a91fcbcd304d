//! `sd-metrics` against pytorch-fid and torch-fidelity (`tests/fixtures/metrics/`, made by
//! `cargo xtask fixtures --only metrics`): the FID Inception's features on the same weights,
//! each package's input preparation on PNG and JPEG images of other sizes, and FID, KID and the
//! Inception Score from the packages' own functions.
//!
//! The Inception's convolution and classifier weights are a formula both sides compute bit for
//! bit (see the fixture script); its BatchNorm parameters, recomputed on photographs so that the
//! features vary, are the fixture's `inception_bn.safetensors`.

use crate::common;

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use common::Report;
use sd_core::backend::Flex;
use sd_core::weights::{SafetensorsFile, module_tensors};
use sd_metrics::{
    FeatureAccumulator, FeatureExtractor, Features, InceptionV3, IsOptions, KidOptions, Preprocess,
    Statistics, frechet_distance, inception_score, kernel_inception_distance,
};

type B = Flex;

fn dir() -> PathBuf {
    common::fixtures_dir().join("metrics")
}

fn manifest() -> serde_json::Value {
    common::manifest(&dir())
}

fn reference() -> SafetensorsFile {
    SafetensorsFile::open(dir().join("reference.safetensors")).unwrap()
}

fn values(file: &SafetensorsFile, key: &str) -> Vec<f32> {
    file.tensor_data(key, burn::tensor::DType::F32)
        .unwrap()
        .into_vec::<f32>()
        .unwrap()
}

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

fn splitmix64(x: u64) -> u64 {
    let z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixture script's `formula`: uniform in `[-scale, scale)`, the same bits.
fn formula(key: &str, len: usize, scale: f64) -> Vec<f32> {
    let seed = fnv1a64(key);
    let scale = scale as f32;
    (0..len as u64)
        .map(|i| {
            let u = (splitmix64(seed ^ i) >> 40) as f32;
            (u * 2f32.powi(-23) - 1.0) * scale
        })
        .collect()
}

/// The fixture's Inception written as a safetensors file under pytorch-fid's keys, and loaded
/// back through [`InceptionV3::load`].
fn inception() -> InceptionV3<B> {
    let device = Default::default();
    let bn = SafetensorsFile::open(dir().join("inception_bn.safetensors")).unwrap();
    let template = InceptionV3::<B>::new(&device);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (key, snapshot) in module_tensors(&template, &|k| Some(k.to_string())) {
        let shape = snapshot.shape.to_vec();
        let len = shape.iter().product();
        let data = if key.ends_with("conv.weight") || key == "fc.weight" {
            let fan_in: usize = shape[1..].iter().product();
            formula(&key, len, (3.0 / fan_in as f64).sqrt())
        } else if key == "fc.bias" {
            formula(&key, len, 0.1)
        } else {
            values(&bn, &key)
        };
        tensors.push((key, shape, data));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, s, d)| (k, s, d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, d)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (k.clone(), view)
        })
        .collect();
    let path = std::env::temp_dir().join(format!(
        "sd-metrics-inception-{}.safetensors",
        std::process::id()
    ));
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let model = InceptionV3::load(&path, &device).unwrap();
    std::fs::remove_file(&path).unwrap();
    model
}

fn images(set: &str) -> Vec<image::RgbImage> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir().join("images").join(set))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| sd_metrics::decode::read_rgb(p).unwrap())
        .collect()
}

/// Runs `body` on a thread with a 64 MB stack: the 190 KB network, moved by value through
/// Burn's module visitors, overflows a test thread's 2 MB in the unoptimised test build.
fn big_stack(body: fn()) {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(body)
        .unwrap()
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

fn relative(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected.abs().max(1e-12)
}

fn check_scalar(report: &mut Report, what: &str, actual: f64, expected: f64, tolerance: f64) {
    let err = relative(actual, expected);
    // Reported through the tensor comparison so that `finish` counts it.
    let device = Default::default();
    let a = Tensor::<B, 1>::from_data(TensorData::new(vec![err as f32], [1]), &device);
    let zero = Tensor::<B, 1>::zeros([1], &device);
    eprintln!("    {what}: {actual} vs {expected}");
    report.check(
        &format!("{what} (relative error)"),
        a,
        zero,
        tolerance as f32,
    );
}

/// KID between two feature sets with the case's subsets, mean and std within 1e-3 of
/// torch-fidelity's.
fn check_kid(report: &mut Report, case: &serde_json::Value, (a, b): (&[f32], &[f32]), dim: usize) {
    let kid = kernel_inception_distance(
        Features { values: a, dim },
        Features { values: b, dim },
        &KidOptions {
            subsets: case["subsets"].as_u64().unwrap() as usize,
            subset_size: case["subset_size"].as_u64().unwrap() as usize,
            ..KidOptions::default()
        },
    )
    .unwrap();
    for (what, value, key) in [
        ("KID mean", kid.mean, "kernel_inception_distance_mean"),
        ("KID std", kid.std, "kernel_inception_distance_std"),
    ] {
        check_scalar(report, what, value, case[key].as_f64().unwrap(), 1e-3);
    }
}

fn as_tensor(values: Vec<f32>, rows: usize) -> Tensor<B, 2> {
    let cols = values.len() / rows;
    Tensor::from_data(TensorData::new(values, [rows, cols]), &Default::default())
}

#[test]
fn jpeg_images_decode_as_pil_decodes_them() {
    big_stack(jpeg_images_decode_as_pil_decodes_them_body);
}

fn jpeg_images_decode_as_pil_decodes_them_body() {
    let bytes = std::fs::read(dir().join("jpeg_decoded_by_pil.safetensors")).unwrap();
    let decoded = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = 0u8;
    let mut differing = 0usize;
    for (i, image) in images("jpeg").iter().enumerate() {
        let pil = decoded.tensor(&format!("{i:02}")).unwrap().data().to_vec();
        for (a, b) in image.as_raw().iter().zip(&pil) {
            worst = worst.max(a.abs_diff(*b));
            differing += (a != b) as usize;
        }
    }
    assert_eq!(
        (worst, differing),
        (0, 0),
        "our JPEG decoder differs from PIL's (libjpeg-turbo)"
    );
}

#[test]
fn features_fid_kid_and_is_match_the_packages_on_png_and_jpeg_sets() {
    big_stack(features_fid_kid_and_is_match_the_packages_on_png_and_jpeg_sets_body);
}

fn features_fid_kid_and_is_match_the_packages_on_png_and_jpeg_sets_body() {
    let reference = reference();
    let manifest = manifest();
    let model = inception();
    let device = Default::default();
    let mut report = Report::default();
    // The network alone on 96² inputs (pixels / 255 · 2 − 1, HWC to CHW): maps down to 1×1
    // after Mixed_7a, every pool's window clipped.
    let bytes = std::fs::read(dir().join("reference.safetensors")).unwrap();
    let raw = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let small = raw.tensor("small_input").unwrap().data().to_vec();
    let (count, side) = (2, 96);
    let chw: Vec<f32> = (0..count * 3 * side * side)
        .map(|i| {
            let (b, c, p) = (
                i / (3 * side * side),
                i / (side * side) % 3,
                i % (side * side),
            );
            f32::from(small[(b * side * side + p) * 3 + c]) / 255.0 * 2.0 - 1.0
        })
        .collect();
    let input = Tensor::<B, 4>::from_data(TensorData::new(chw, [count, 3, side, side]), &device);
    report.check(
        "network pool3 at 96²",
        model.forward(input).pool3,
        as_tensor(values(&reference, "small_pool3"), count),
        1e-4,
    );
    let fid_extractor = FeatureExtractor::new(model, device, Preprocess::PytorchFid);
    let mut stats = Vec::new();
    let mut fidelity = Vec::new();
    for set in ["png", "jpeg"] {
        let images = images(set);
        let features = fid_extractor.features(&images).unwrap();
        report.check(
            &format!("pytorch-fid pool3, {set}"),
            as_tensor(features.pool3.clone(), images.len()),
            as_tensor(values(&reference, &format!("fid_{set}")), images.len()),
            1e-4,
        );
        let mut acc = FeatureAccumulator::new(2048);
        acc.add(&features.pool3).unwrap();
        stats.push(acc.finish().unwrap());
        fidelity.push(images);
    }
    let fid = frechet_distance(&stats[0], &stats[1]).unwrap();
    check_scalar(
        &mut report,
        "FID png vs jpeg",
        fid,
        manifest["fid_png_jpeg"].as_f64().unwrap(),
        1e-3,
    );

    // torch-fidelity's preparation on the same network.
    let fid_model = inception();
    let extractor = FeatureExtractor::new(fid_model, device, Preprocess::TorchFidelity);
    let mut pools = Vec::new();
    let mut logits = Vec::new();
    for (set, images) in ["png", "jpeg"].iter().zip(&fidelity) {
        let features = extractor.features(images).unwrap();
        report.check(
            &format!("torch-fidelity 2048, {set}"),
            as_tensor(features.pool3.clone(), images.len()),
            as_tensor(
                values(&reference, &format!("fidelity_{set}_pool3")),
                images.len(),
            ),
            1e-4,
        );
        report.check(
            &format!("torch-fidelity logits_unbiased, {set}"),
            as_tensor(features.logits.clone(), images.len()),
            as_tensor(
                values(&reference, &format!("fidelity_{set}_logits")),
                images.len(),
            ),
            1e-4,
        );
        pools.push(features.pool3);
        logits.extend(features.logits);
    }
    check_kid(
        &mut report,
        &manifest["fidelity_kid_png_jpeg"],
        (&pools[0], &pools[1]),
        2048,
    );
    let is_case = &manifest["fidelity_isc_png_jpeg"];
    let score = inception_score(
        &logits,
        1008,
        &IsOptions {
            splits: is_case["splits"].as_u64().unwrap() as usize,
            ..IsOptions::default()
        },
    )
    .unwrap();
    check_scalar(
        &mut report,
        "IS mean",
        score.mean,
        is_case["inception_score_mean"].as_f64().unwrap(),
        1e-3,
    );
    check_scalar(
        &mut report,
        "IS std",
        score.std,
        is_case["inception_score_std"].as_f64().unwrap(),
        1e-3,
    );
    report.finish();
}

#[test]
fn the_metrics_match_the_packages_functions_on_larger_feature_sets() {
    big_stack(the_metrics_match_the_packages_functions_on_larger_feature_sets_body);
}

fn the_metrics_match_the_packages_functions_on_larger_feature_sets_body() {
    let reference = reference();
    let manifest = manifest();
    let (a, b) = (values(&reference, "maths_a"), values(&reference, "maths_b"));
    let mut report = Report::default();
    let stats: Vec<Statistics> = [&a, &b]
        .iter()
        .map(|f| {
            let mut acc = FeatureAccumulator::new(64);
            // In uneven batches, as a stream of images would come.
            for chunk in f.chunks(64 * 37) {
                acc.add(chunk).unwrap();
            }
            acc.finish().unwrap()
        })
        .collect();
    // pytorch-fid's `.npz` of the first set, written by numpy.
    let npz = Statistics::read_npz(dir().join("maths_a_stats.npz")).unwrap();
    let max_diff = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
    };
    let sigma =
        |s: &Statistics| -> Vec<f64> { (0..64 * 64).map(|k| s.sigma[(k / 64, k % 64)]).collect() };
    check_scalar(
        &mut report,
        "npz mu vs ours (max abs + 1)",
        1.0 + max_diff(&stats[0].mu, &npz.mu),
        1.0,
        1e-9,
    );
    check_scalar(
        &mut report,
        "npz sigma vs ours (max abs + 1)",
        1.0 + max_diff(&sigma(&stats[0]), &sigma(&npz)),
        1.0,
        1e-9,
    );
    let fid = frechet_distance(&npz, &stats[1]).unwrap();
    check_scalar(
        &mut report,
        "FID (npz vs features)",
        fid,
        manifest["maths_fid"].as_f64().unwrap(),
        1e-6,
    );

    check_kid(&mut report, &manifest["maths_kid"], (&a, &b), 64);
    let is_case = &manifest["maths_isc"];
    let score = inception_score(
        &values(&reference, "maths_logits"),
        40,
        &IsOptions::default(),
    )
    .unwrap();
    check_scalar(
        &mut report,
        "IS mean",
        score.mean,
        is_case["inception_score_mean"].as_f64().unwrap(),
        1e-6,
    );
    check_scalar(
        &mut report,
        "IS std",
        score.std,
        is_case["inception_score_std"].as_f64().unwrap(),
        1e-5,
    );
    report.finish();
}

#[test]
fn pytorch_files_are_read_in_both_formats_and_a_partial_one_is_refused() {
    big_stack(pytorch_files_are_read_in_both_formats_and_a_partial_one_is_refused_body);
}

fn pytorch_files_are_read_in_both_formats_and_a_partial_one_is_refused_body() {
    let reference = reference();
    let device = Default::default();
    for name in ["sample_zip.pth", "sample_legacy.pth"] {
        let path = dir().join(name);
        let reader = burn_store::pytorch::PytorchReader::new(&path).unwrap();
        for (key, expected) in [
            ("Conv2d_1a_3x3.conv.weight", "sample_conv"),
            ("Conv2d_1a_3x3.bn.running_var", "sample_running_var"),
            ("fc.bias", "sample_fc_bias"),
        ] {
            let got = reader
                .get(key)
                .unwrap()
                .to_data()
                .unwrap()
                .into_vec::<f32>()
                .unwrap();
            assert_eq!(got, values(&reference, expected), "{name}: {key}");
        }
        let err = InceptionV3::<B>::load(&path, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("missing"), "{err}");
    }
}

#[test]
fn clean_fids_resize_is_pils_antialiased_bicubic() {
    let bytes = std::fs::read(dir().join("clean_resize.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        file.tensor(key)
            .unwrap()
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let big = file.tensor("clean_big_input").unwrap();
    let big = image::RgbImage::from_raw(
        big.shape()[1] as u32,
        big.shape()[0] as u32,
        big.data().to_vec(),
    )
    .unwrap();
    let cases = [
        ("clean_png0_299", images("png").remove(0), (299, 299)),
        ("clean_jpeg0_37x29", images("jpeg").remove(0), (37, 29)),
        ("clean_big_150x113", big, (150, 113)),
    ];
    for (key, image, (w, h)) in cases {
        let (iw, ih) = (image.width() as usize, image.height() as usize);
        let expected = floats(key);
        let mut worst = 0.0f32;
        for c in 0..3 {
            let channel: Vec<f32> = image.pixels().map(|p| p[c] as f32).collect();
            let resized = sd_metrics::preprocess::pil_bicubic(&channel, iw, ih, w, h);
            for (i, v) in resized.iter().enumerate() {
                let e = expected[i * 3 + c];
                worst = worst.max((v.clamp(0.0, 255.0) - e).abs());
            }
        }
        eprintln!("{key}: max abs error {worst:e}");
        assert!(worst <= 1e-4, "{key}: max abs error {worst}");
    }
}

/// The CLIP score against torchmetrics' formula on a random transformers `CLIPModel`
/// (`tests/fixtures/clip_score/`, `cargo xtask fixtures --only clip_score`): the 8-bit
/// 224² crops equal `CLIPImageProcessorPil`'s byte for byte (PIL's fixed-point bicubic), the
/// embeddings agree within 1e-4, each pair's score and the mean within 1e-3; the caption past
/// 77 tokens keeps its end token.
#[test]
fn clip_score_matches_the_torchmetrics_formula() {
    big_stack(clip_score_body);
}

fn clip_score_body() {
    let root = common::fixtures_dir().join("clip_score");
    let manifest = common::manifest(&root);
    let tolerance = manifest["tolerance"].as_f64().unwrap();
    let embeds_tolerance = manifest["embeds_tolerance"].as_f64().unwrap() as f32;
    let captions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("captions.json")).unwrap())
            .unwrap();
    let reference = SafetensorsFile::open(root.join("reference.safetensors")).unwrap();
    let device = Default::default();
    let scorer = sd_metrics::ClipScorer::<B>::load(root.join("model"), &device)
        .unwrap_or_else(|e| panic!("{e}"));
    let files: Vec<String> = captions["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let pictures: Vec<image::RgbImage> = files
        .iter()
        .map(|f| sd_metrics::decode::read_rgb(&dir().join("images").join(f)).unwrap())
        .collect();
    let mut report = Report::default();

    // The crops, byte for byte (reference: [n, 3, 224, 224]).
    let bytes = std::fs::read(root.join("reference.safetensors")).unwrap();
    let raw = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let resized = raw.tensor("resized").unwrap().data().to_vec();
    let plane = 224 * 224;
    let mut differing = 0;
    for (i, picture) in pictures.iter().enumerate() {
        let (w, h) = picture.dimensions();
        let crop = sd_metrics::preprocess::clip_crop(picture.as_raw(), w as usize, h as usize);
        for (p, pixel) in crop.chunks_exact(3).enumerate() {
            for c in 0..3 {
                differing += usize::from(pixel[c] != resized[(i * 3 + c) * plane + p]);
            }
        }
    }
    let total = Tensor::<B, 1>::from_data(TensorData::new(vec![differing as f32], [1]), &device);
    report.check(
        "CLIP crops: values that differ from CLIPImageProcessorPil's",
        total,
        Tensor::zeros([1], &device),
        0.0,
    );

    let texts: Vec<&str> = files
        .iter()
        .map(|f| captions["captions"][f].as_str().unwrap())
        .collect();
    let image_embeds = scorer.image_embeds(&pictures).unwrap();
    let text_embeds = scorer.text_embeds(&texts).unwrap();
    let expected = |key: &str, rows: usize| as_tensor(values(&reference, key), rows);
    let n = files.len();
    report.check(
        "CLIP image embeddings",
        image_embeds.clone(),
        expected("image_embeds", n),
        embeds_tolerance,
    );
    report.check(
        "CLIP text embeddings",
        text_embeds.clone(),
        expected("text_embeds", n),
        embeds_tolerance,
    );
    let scores = sd_metrics::ClipScorer::<B>::scores(image_embeds, text_embeds).unwrap();
    let want = values(&reference, "scores");
    let got: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
    report.check(
        "CLIP scores",
        as_tensor(got, 1),
        as_tensor(want, 1),
        tolerance as f32,
    );
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    check_scalar(
        &mut report,
        "CLIP score (mean)",
        mean,
        f64::from(values(&reference, "mean")[0]),
        tolerance,
    );
    report.finish();
}
