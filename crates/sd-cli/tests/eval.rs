//! `sd eval shapes` as a person runs it: on the tiny fixture model (which draws noise, so
//! nothing passes) the report has every image's verdict and the shares add up, and the grid
//! is drawn.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipeline/tiny_sd1/model")
}

#[test]
fn eval_shapes_reports_every_image_and_the_adherence_of_each_kind() {
    let dir = std::env::temp_dir().join(format!("sd-cli-{}-eval", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let grid = dir.join("grid.png");
    let out = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(["eval", "shapes", "--model"])
        .arg(tiny_model())
        .args(["--prompts", "2", "--seeds", "2", "--steps", "2", "--out"])
        .arg(&report)
        .arg("--grid")
        .arg(&grid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let whole: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for kind in ["held_out", "seen"] {
        let s = &summary["summary"][kind];
        assert_eq!(s["images"], 4, "{summary}");
        assert_eq!(s["passed"], 0, "noise passes nothing: {summary}");
        // Every failure is counted once, by kind, and the one- and two-object prompts add up.
        let failed: u64 = s["failures"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(failed, 4, "{summary}");
        let split = s["one_object"]["images"].as_u64().unwrap()
            + s["two_objects"]["images"].as_u64().unwrap();
        assert_eq!(split, 4, "{summary}");
        let images = whole["images"][kind].as_array().unwrap();
        assert_eq!(images.len(), 4);
        let held_out = images.iter().all(|i| {
            let prompt = i["prompt"].as_str().unwrap();
            prompt.parse::<sd_shapes::Prompt>().unwrap().is_held_out()
        });
        assert_eq!(held_out, kind == "held_out");
        assert!(images.iter().all(|i| i["verdict"]["failure"].is_string()));
    }
    // The grid: a row per prompt (2 of each kind), the tiny model's 32x32 images drawn at
    // twice their size with a frame, side by side.
    let picture = image::open(&grid).unwrap().to_rgb8();
    assert!(
        picture.width() >= 2 * (32 * 2 + 6),
        "{:?}",
        picture.dimensions()
    );
    assert!(
        picture.height() >= 4 * (32 * 2 + 6),
        "{:?}",
        picture.dimensions()
    );
    // A bad setting is one line and a failure, before any model is read.
    let bad = Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(["eval", "shapes", "--seeds", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
