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
