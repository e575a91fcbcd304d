//! The CLIP vision tower against transformers' `CLIPVisionModelWithProjection` on every case
//! under `tests/fixtures/clip_vision/`: every hidden state, the last one and the projected
//! image embedding.

use crate::common;

use std::path::Path;

use burn::backend::{Flex, NdArray};
use burn::tensor::backend::Backend;
use common::{Reference, Report, cases, manifest};
use sd_conditioner::ClipVisionModel;

fn check_case<B: Backend>(case: &Path, device: &B::Device, report: &mut Report) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let manifest = manifest(case);
    let tol = manifest["tolerance"].as_f64().unwrap() as f32;
    let reference = Reference::open(case);
    let model = match ClipVisionModel::<B>::from_pretrained(case.join("image_encoder"), device) {
        Ok(m) => m,
        Err(e) => return report.fail(format!("{name}: loading: {e}")),
    };
    let out = model
        .forward(reference.tensor("pixel_values", device))
        .unwrap();
    let count = manifest["hidden_states"].as_u64().unwrap() as usize;
    if out.hidden_states.len() != count {
        report.fail(format!(
            "{name}: {} hidden states, transformers has {count}",
            out.hidden_states.len()
        ));
    }
    for (i, h) in out.hidden_states.iter().enumerate() {
        report.check(
            &format!("{name} hidden_states[{i}]"),
            h.clone(),
            reference.tensor(&format!("hidden_state_{i}"), device),
            tol,
        );
    }
    report.check(
        &format!("{name} last_hidden_state"),
        out.last_hidden_state,
        reference.tensor("last_hidden_state", device),
        tol,
    );
    report.check(
        &format!("{name} image_embeds"),
        out.image_embeds,
        reference.tensor("image_embeds", device),
        tol,
    );
}

fn check_all<B: Backend>(device: &B::Device) {
    let mut report = Report::default();
    for case in cases("clip_vision") {
        check_case::<B>(&case, device, &mut report);
    }
    report.finish();
}

#[test]
fn vision_tower_matches_transformers_on_flex() {
    check_all::<Flex>(&Default::default());
}

#[test]
fn vision_tower_matches_transformers_on_ndarray() {
    check_all::<NdArray>(&Default::default());
}

#[test]
fn wrong_image_size_is_an_error() {
    let case = cases("clip_vision").remove(0);
    let device = Default::default();
    let model =
        ClipVisionModel::<Flex>::from_pretrained(case.join("image_encoder"), &device).unwrap();
    let err = model
        .forward(burn::tensor::Tensor::zeros([1, 3, 31, 31], &device))
        .unwrap_err();
    assert!(err.to_string().contains("[1, 3, 31, 31]"), "{err}");
}
