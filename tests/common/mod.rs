//! Shared helpers for the parity tests: finding case folders and comparing tensors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use sd_core::weights::SafetensorsFile;

/// `tests/fixtures`, wherever the tests run from.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every case folder of a kind (`tests/fixtures/<kind>/*/manifest.json`), sorted. A kind with no
/// case is a broken checkout, not a pass.
pub fn cases(kind: &str) -> Vec<PathBuf> {
    let dir = fixtures_dir().join(kind);
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no fixture cases under {}",
        dir.display()
    );
    cases
}

/// A case's `manifest.json`.
pub fn manifest(case: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(case.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

/// The reference tensors of a case.
pub struct Reference {
    file: SafetensorsFile,
}

impl Reference {
    pub fn open(case: &Path) -> Self {
        let file = SafetensorsFile::open(case.join("reference.safetensors"))
            .unwrap_or_else(|e| panic!("{e}"));
        Self { file }
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.entries().iter().any(|e| e.key == name)
    }

    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let data = self
            .file
            .tensor_data(name, DType::F32)
            .unwrap_or_else(|e| panic!("{e}"));
        Tensor::from_data(data, device)
    }
}

/// Largest absolute difference between two tensors of equal shape; infinite when the shapes
/// differ or either holds a NaN, so that no such result ever passes a tolerance.
pub fn max_abs_diff<B: Backend, const D: usize>(
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
) -> f32 {
    if actual.dims() != expected.dims() {
        return f32::INFINITY;
    }
    let a = actual.into_data().convert::<f32>();
    let e = expected.into_data().convert::<f32>();
    let (a, e) = (a.as_slice::<f32>().unwrap(), e.as_slice::<f32>().unwrap());
    a.iter().zip(e).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() { f32::INFINITY } else { m.max(d) }
    })
}

/// Collects comparison results so that one run reports every mismatch, not just the first.
#[derive(Default)]
pub struct Report {
    failures: Vec<String>,
    checked: usize,
}

impl Report {
    pub fn check<B: Backend, const D: usize>(
        &mut self,
        what: &str,
        actual: Tensor<B, D>,
        expected: Tensor<B, D>,
        tolerance: f32,
    ) -> f32 {
        let shapes = (actual.dims(), expected.dims());
        let err = max_abs_diff(actual, expected);
        self.checked += 1;
        if err > tolerance {
            self.failures.push(format!(
                "{what}: max abs error {err:e} > {tolerance:e} (shapes {:?} vs {:?})",
                shapes.0, shapes.1
            ));
        } else {
            eprintln!("ok  {what}: max abs error {err:e}");
        }
        err
    }

    pub fn fail(&mut self, message: String) {
        self.failures.push(message);
    }

    pub fn finish(self) {
        assert!(self.checked > 0, "nothing was compared");
        assert!(
            self.failures.is_empty(),
            "{} of {} comparisons failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
    }
}
