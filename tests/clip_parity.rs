//! CLIP text encoders against transformers on every case under `tests/fixtures/clip/`: every
//! hidden state, the last hidden state, the pooled output (first EOS, or the largest id for old
//! configs) and the projection.

use crate::common;

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use common::{Reference, Report, cases, manifest};
use sd_conditioner::ClipTextModel;

fn check_case<B: Backend>(case: &Path, device: &B::Device, report: &mut Report) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let manifest = manifest(case);
    let tol = manifest["tolerance"].as_f64().unwrap() as f32;
    let reference = Reference::open(case);
    let model = match ClipTextModel::<B>::from_pretrained(case.join("text_encoder"), device) {
        Ok(m) => m,
        Err(e) => return report.fail(format!("{name}: loading: {e}")),
    };
    let ids: Tensor<B, 2> = reference.tensor("input_ids", device);
    let [b, n] = ids.dims();
    let flat = ids.into_data().to_vec::<f32>().unwrap();
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|i| flat[i * n..(i + 1) * n].iter().map(|&t| t as u32).collect())
        .collect();
    let out = model.forward(&ids).unwrap();
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
    match (out.text_embeds, reference.has("text_embeds")) {
        (Some(embeds), true) => {
            report.check(
                &format!("{name} text_embeds"),
                embeds,
                reference.tensor("text_embeds", device),
                tol,
            );
        }
        (None, false) => {
            report.check(
                &format!("{name} pooled"),
                out.pooled,
                reference.tensor("pooled", device),
                tol,
            );
        }
        _ => report.fail(format!("{name}: projection present on one side only")),
    }
}

fn check_all<B: Backend>(device: &B::Device) {
    let mut report = Report::default();
    for case in cases("clip") {
        check_case::<B>(&case, device, &mut report);
    }
    report.finish();
}

#[test]
fn clip_text_matches_transformers_on_flex() {
    check_all::<sd_core::backend::Flex>(&Default::default());
}

#[test]
fn clip_text_matches_transformers_on_ndarray() {
    check_all::<sd_core::backend::NdArray>(&Default::default());
}

#[test]
fn bad_token_ids_are_errors() {
    type B = sd_core::backend::Flex;
    let case = cases("clip").into_iter().next().unwrap();
    let model = ClipTextModel::<B>::from_pretrained(case.join("text_encoder"), &Default::default())
        .unwrap();
    let err = model.forward(&[vec![1000, 1]]).unwrap_err();
    assert!(
        err.to_string()
            .contains("token id 1000 is outside the vocabulary of 1000"),
        "{err}"
    );
    let err = model.forward(&[vec![1; 78]]).unwrap_err();
    assert!(err.to_string().contains("78 tokens is more than"), "{err}");
    let err = model.forward(&[vec![1, 2], vec![1]]).unwrap_err();
    assert!(err.to_string().contains("equal-length"), "{err}");
    assert!(model.forward(&[]).is_err());
}
