//! One classifier-free-guidance step of the SD 1.5 U-Net (batch 2, 64×64 latent, 77-token
//! context, random weights) on the default backend. `cargo bench -p sd-benches --bench unet_step`.

use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use sd_core::backend::DefaultBackend as B;
use sd_unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn sd15_step(c: &mut Criterion) {
    sd_benches::tune_allocator();
    let device = Default::default();
    let unet = UNet2DConditionModel::<B>::new(&UNet2DConditionConfig::sd15(), &device)
        .expect("valid config");
    let latents = Tensor::<B, 4>::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<B, 3>::random([2, 77, 768], Distribution::Normal(0.0, 1.0), &device);
    c.bench_function("unet_sd15_cfg_step_64x64", |b| {
        b.iter(|| {
            let out = unet
                .forward(latents.clone(), &[500.0], context.clone(), None)
                .expect("forward");
            out.slice([0..1, 0..1, 0..1, 0..1]).into_data()
        })
    });
}

criterion_group! {
    name = unet;
    // One step takes seconds on a CPU: ten samples are plenty.
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(120));
    targets = sd15_step
}
criterion_main!(unet);
