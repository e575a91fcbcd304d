//! `sd eval fid|kid|is|stats` as a person runs them: pytorch-fid statistics files compared
//! without a network, and every bad input one clear line with a non-zero exit. (The metrics'
//! numbers against pytorch-fid and torch-fidelity on images are `tests/metrics_parity.rs`.)

mod common;

use std::path::{Path, PathBuf};

use common::sd;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/metrics")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-cli-{}-eval-metrics", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The statistics of the fixture's second feature set, written as pytorch-fid writes them.
fn second_stats() -> PathBuf {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let values: Vec<f32> = file
        .tensor("maths_b")
        .unwrap()
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut acc = sd_metrics::FeatureAccumulator::new(64);
    acc.add(&values).unwrap();
    let path = temp("b.npz");
    acc.finish().unwrap().write_npz(&path).unwrap();
    path
}

#[test]
fn fid_between_two_statistics_files_is_pytorch_fids() {
    let a = fixtures().join("maths_a_stats.npz");
    let b = second_stats();
    let (ok, out, err) = sd(&[
        "eval",
        "fid",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let (got, want) = (
        json["fid"]["value"].as_f64().unwrap(),
        manifest["maths_fid"].as_f64().unwrap(),
    );
    assert!((got - want).abs() / want < 1e-6, "{got} vs {want}");
    let (ok, out, _) = sd(&["eval", "fid", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(ok && out.starts_with("FID "), "{out}");
}

#[test]
fn bad_inputs_are_one_clear_line() {
    let empty = temp("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let not_npz = temp("bad.npz");
    std::fs::write(&not_npz, b"not a zip").unwrap();
    let no_weights = temp("missing.pth");
    let a = fixtures().join("maths_a_stats.npz");
    let png = fixtures().join("images/png");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (args, expected) in [
        (
            vec!["eval".into(), "fid".into(), s(&a), s(&not_npz)],
            "not an .npz archive",
        ),
        (
            vec![
                "eval".into(),
                "stats".into(),
                s(&empty),
                "-o".into(),
                s(&temp("o.npz")),
                "--inception".into(),
                s(&no_weights),
            ],
            "holds no image",
        ),
        (
            vec![
                "eval".into(),
                "stats".into(),
                s(&png),
                "-o".into(),
                s(&temp("o.npz")),
                "--inception".into(),
                s(&no_weights),
            ],
            "missing.pth",
        ),
        (
            vec![
                "eval".into(),
                "is".into(),
                s(&png),
                "--inception".into(),
                s(&fixtures().join("sample_zip.pth")),
            ],
            "weight problem",
        ),
        (
            vec![
                "eval".into(),
                "kid".into(),
                s(&png),
                s(&png),
                "--batch-size".into(),
                "0".into(),
            ],
            "--batch-size",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = sd(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

/// `sd eval clip-score` on the CLIP fixture: the score of `sd-metrics` (itself checked against
/// torchmetrics' formula), from a prompt file or from each PNG's `parameters`; bad input is
/// one line.
#[test]
fn clip_score_from_a_prompt_file_or_the_pngs_parameters() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let clip = fixtures.join("clip_score/model");
    let dir = std::env::temp_dir().join(format!("sd-clip-score-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sources = ["png/00.png", "jpeg/01.jpg", "png/02.png"];
    let prompts = [
        "a red circle",
        "rocks by the sea",
        "a blue square above a red circle",
    ];
    let mut lines = String::new();
    for (i, (source, prompt)) in sources.iter().zip(prompts).enumerate() {
        let picture = image::open(fixtures.join("metrics/images").join(source))
            .unwrap()
            .to_rgb8();
        picture.save(dir.join(format!("{i:05}.png"))).unwrap();
        lines.push_str(prompt);
        lines.push('\n');
    }
    let file = dir.join("prompts.txt");
    std::fs::write(&file, lines).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "clip-score",
            dir.to_str().unwrap(),
            "--clip",
            clip.to_str().unwrap(),
            "--json",
            "-q",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run(&["--prompts", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["images"], 3);
    let from_file = json["clip_score"].as_f64().unwrap();
    assert!(from_file.is_finite() && from_file >= 0.0);

    // The same prompts from the PNGs' parameters (A1111's layout: negative prompt and settings
    // lines after the prompt).
    for (i, prompt) in prompts.iter().enumerate() {
        let path = dir.join(format!("{i:05}.png"));
        let picture = image::open(&path).unwrap().to_rgb8();
        let text =
            format!("{prompt}\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 1");
        sd::save_png(&picture, &path, &text).unwrap();
    }
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let from_parameters = json["clip_score"].as_f64().unwrap();
    assert!(
        (from_parameters - from_file).abs() < 1e-9,
        "{from_parameters} vs {from_file}"
    );

    // A line without its image, and a folder that is not a CLIP model.
    std::fs::write(&file, "a red circle\nb\nc\nd\n").unwrap();
    let out = run(&["--prompts", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 3 has no image"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
        .args([
            "eval",
            "clip-score",
            dir.to_str().unwrap(),
            "--clip",
            dir.to_str().unwrap(),
            "-q",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sd convert --inception`: the weights checked key for key and written under the same keys
/// (here in f16), which `sd eval --inception` and `InceptionV3::load` read back; a file of
/// other weights, or an output that is not `.safetensors`, is one line.
#[test]
fn convert_writes_the_inception_as_safetensors() {
    use burn::tensor::DType;
    use sd_core::backend::Flex;
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            let device = Default::default();
            let source = temp("inception.safetensors");
            let model = sd_metrics::InceptionV3::<Flex>::new(&device);
            let keys = |k: &str| Some(k.to_string());
            sd_core::weights::save_safetensors(&model, &source, &keys, DType::F32, None).unwrap();
            let out = temp("converted.safetensors");
            let s = |p: &Path| p.to_str().unwrap().to_string();
            let (ok, stdout, err) = sd(&[
                "convert",
                "--inception",
                &s(&source),
                &s(&out),
                "--dtype",
                "f16",
            ]);
            assert!(ok, "{err}");
            assert!(stdout.contains("the FID Inception, f16"), "{stdout}");
            let written = sd_core::weights::SafetensorsFile::open(&out).unwrap();
            let original = sd_core::weights::SafetensorsFile::open(&source).unwrap();
            assert_eq!(written.entries().len(), original.entries().len());
            for key in [
                "Conv2d_1a_3x3.conv.weight",
                "Mixed_7c.branch_pool.bn.running_var",
                "fc.weight",
            ] {
                let a = written
                    .tensor_data(key, DType::F32)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap();
                let b = original
                    .tensor_data(key, DType::F32)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap();
                let worst = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    worst <= 1e-3 * b.iter().fold(0f32, |m, v| m.max(v.abs())),
                    "{key}: {worst}"
                );
            }
            sd_metrics::InceptionV3::<Flex>::load(&out, &device).unwrap();

            for (args, expected) in [
                (
                    vec![
                        "convert".into(),
                        "--inception".into(),
                        s(&fixtures().join("sample_zip.pth")),
                        s(&temp("partial.safetensors")),
                    ],
                    "weight problem",
                ),
                (
                    vec![
                        "convert".into(),
                        "--inception".into(),
                        s(&source),
                        s(&temp("x.pth")),
                    ],
                    "name the output *.safetensors",
                ),
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (ok, _, err) = sd(&args);
                assert!(!ok, "{args:?} succeeded");
                assert!(err.contains(expected), "{args:?}: {err}");
                assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            }
            assert!(!temp("partial.safetensors").exists());
        })
        .unwrap()
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}
