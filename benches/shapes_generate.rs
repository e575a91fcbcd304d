//! One image from the built-in shapes model at `sd generate`'s default settings for it (its
//! steps, guidance and sampler; 64×64), prompt encoding and VAE decoding included: the
//! shapes issue asks for at most 2 s on the 2-core machine.
//! `cargo bench -p sd-benches --bench shapes_generate`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sd_core::backend::DefaultBackend as B;

fn shapes_image(c: &mut Criterion) {
    if !sd_shapes::model::is_built_in() {
        eprintln!("shapes_generate: this build has no built-in model (crates/sd-shapes/model/)");
        return;
    }
    sd_benches::tune_allocator();
    let dir = sd_shapes::model::install(&sd_shapes::model::default_cache()).expect("install");
    let model = sd::Model::from_folder(&dir, None).expect("the built-in model loads");
    let device = Default::default();
    let options = sd::GenerateOptions {
        prompt: "a red circle above a blue square".into(),
        sampling: sd::Sampling {
            steps: sd_shapes::model::DEFAULT_STEPS,
            ..Default::default()
        },
        guidance: sd::Guidance {
            scale: sd_shapes::model::DEFAULT_GUIDANCE,
            ..Default::default()
        },
        ..sd::GenerateOptions::default()
    };
    c.bench_function("shapes_default_image_64x64", |b| {
        b.iter(|| {
            let out = sd::generate::<B>(&model, &options, &device, None).expect("generate");
            out.images.into_data()
        })
    });
}

criterion_group! {
    name = shapes;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(30));
    targets = shapes_image
}
criterion_main!(shapes);
