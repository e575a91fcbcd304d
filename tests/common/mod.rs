//! Shared helpers for the parity tests: finding case folders and comparing tensors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use sd_core::weights::SafetensorsFile;

/// The CUDA device, with CubeCL told (once, before the first kernel) to keep what it compiles
/// in `target/gpu-kernels`, so that a second run of the GPU cases skips minutes of compiling.
#[cfg(feature = "cuda")]
pub fn cuda_device() -> burn::backend::cuda::CudaDevice {
    static KEEP: std::sync::Once = std::sync::Once::new();
    KEEP.call_once(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gpu-kernels");
        sd_core::kernel_cache::keep_gpu_kernels(&dir);
    });
    Default::default()
}

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

/// A generation's final latents and decoded images against a run's references
/// (`{run}.latents_out`, `{run}.image`), through [`check_latents_and_image`].
pub fn check_generated<B: Backend>(
    report: &mut Report,
    reference: &Reference,
    run: &str,
    latents: Tensor<B, 4>,
    images: Tensor<B, 4>,
    tolerance: f32,
    device: &B::Device,
) {
    check_latents_and_image(
        report,
        run,
        (latents, images),
        (
            reference.tensor(&format!("{run}.latents_out"), device),
            reference.tensor(&format!("{run}.image"), device),
        ),
        tolerance,
    );
}

/// Final latents and decoded images (in `[-1, 1]`) against the reference latents and image (in
/// `[0, 1]`, as diffusers' `output_type="np"`), reported as `{label} latents` / `{label} image`.
/// The latents' bound scales with their largest reference value: latents of a Karras schedule
/// start at σ ≈ 15, and f32 resolves `tolerance` only relative to the values' size.
pub fn check_latents_and_image<B: Backend>(
    report: &mut Report,
    label: &str,
    (latents, images): (Tensor<B, 4>, Tensor<B, 4>),
    (expected_latents, expected_image): (Tensor<B, 4>, Tensor<B, 4>),
    tolerance: f32,
) {
    let scale = magnitude(&expected_latents);
    report.check(
        &format!("{label} latents"),
        latents,
        expected_latents,
        tolerance * scale,
    );
    report.check(
        &format!("{label} image"),
        ((images + 1.0) / 2.0).clamp(0.0, 1.0),
        expected_image,
        tolerance,
    );
}

/// The largest |value| of a reference tensor, at least 1: latents' tolerances scale with it.
pub fn magnitude<B: Backend>(t: &Tensor<B, 4>) -> f32 {
    use burn::tensor::ElementConversion;
    t.clone().abs().max().into_scalar().elem::<f32>().max(1.0)
}

/// The options of a fixture's `generation` section (prompt, negative prompt, guidance, steps,
/// size) from the given initial latents with the folder's own scheduler: how the LoRA and
/// round-trip fixture scripts rendered their reference images.
pub fn generation_options(
    g: &serde_json::Value,
    latents: burn::tensor::TensorData,
) -> sd::GenerateOptions {
    sd::GenerateOptions {
        prompt: sd::PromptOptions {
            text: g["prompt"].as_str().unwrap().to_string(),
            negative: g["negative_prompt"].as_str().map(String::from),
            ..Default::default()
        },
        guidance: sd::Guidance {
            scale: g["guidance_scale"].as_f64().unwrap(),
            ..Default::default()
        },
        sampling: sd::Sampling {
            steps: g["steps"].as_u64().unwrap() as usize,
            ..Default::default()
        },
        width: g["width"].as_u64().map(|v| v as usize),
        height: g["height"].as_u64().map(|v| v as usize),
        task: sd::Task::Text {
            latents: Some(latents),
        },
        ..sd::GenerateOptions::default()
    }
}

/// The options of a fixture run made by the ControlNet, IP-Adapter and x4 upscaler scripts:
/// prompt, negative prompt, steps, guidance, the sampler with its whole config after the run,
/// plain prompt reading, and the run's initial latents.
pub fn run_options<B: Backend>(
    run: &serde_json::Value,
    reference: &Reference,
    device: &B::Device,
) -> sd::GenerateOptions {
    let name = run["name"].as_str().unwrap();
    let latents_in: Tensor<B, 4> = reference.tensor(&format!("{name}.latents_in"), device);
    sd::GenerateOptions {
        prompt: sd::PromptOptions {
            text: run["prompt"].as_str().unwrap().into(),
            negative: run["negative_prompt"].as_str().map(String::from),
            syntax: sd::conditioner::PromptSyntax::Plain,
            ..Default::default()
        },
        guidance: sd::Guidance {
            scale: run["guidance_scale"].as_f64().unwrap(),
            ..Default::default()
        },
        sampling: sd::Sampling {
            steps: run["steps"].as_u64().unwrap() as usize,
            scheduler: Some(
                run["scheduler"]
                    .as_str()
                    .unwrap_or("DDIMScheduler")
                    .to_string(),
            ),
            config: Some(
                sd::schedulers::SchedulerConfig::from_json(&run["scheduler_config"].to_string())
                    .unwrap(),
            ),
            ..Default::default()
        },
        task: sd::Task::Text {
            latents: Some(latents_in.into_data()),
        },
        ..sd::GenerateOptions::default()
    }
}
