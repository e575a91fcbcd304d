//! Scheduler overhead: one sampler step (host arithmetic plus one tensor update) next to one
//! forward of a tiny U-Net on the same latent (2×4×64×64). The goal is a step well under 1 % of
//! the U-Net call. `cargo bench -p sd-benches --bench scheduler_step`.

use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use sd_core::backend::DefaultBackend as B;
use sd_schedulers::{HostNoise, SchedulerConfig, from_name};
use sd_unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};

fn overhead(c: &mut Criterion) {
    let device = Default::default();
    let latents = Tensor::<B, 4>::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    // The tiny SD 1.x-shaped U-Net of the parity fixtures.
    let config = UNet2DConditionConfig {
        block_out_channels: vec![32, 64],
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        cross_attention_dim: PerBlock::One(32),
        norm_num_groups: 8,
        ..UNet2DConditionConfig::default()
    };
    let unet = UNet2DConditionModel::<B>::new(&config, &device).expect("valid config");
    let context = Tensor::<B, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);
    let mut group = c.benchmark_group("scheduler_overhead");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("tiny_unet_forward", |b| {
        b.iter(|| {
            let out = unet
                .forward(latents.clone(), &[500.0], context.clone(), None)
                .expect("forward");
            out.slice([0..1, 0..1, 0..1, 0..1]).into_data()
        })
    });
    for name in ["Euler", "DPM++ 2M Karras", "UniPC"] {
        let mut scheduler = from_name::<B>(name, SchedulerConfig::default()).expect("known");
        let mut noise = HostNoise::new(0);
        scheduler.set_timesteps(1000).expect("steps");
        group.bench_function(format!("step_{name}"), |b| {
            b.iter(|| {
                // Start over after the last step (once in 1000 steps).
                if scheduler.step_index() >= scheduler.timesteps().len() {
                    scheduler.set_timesteps(1000).expect("steps");
                }
                let out = scheduler
                    .step(latents.clone(), latents.clone(), &mut noise)
                    .expect("step");
                out.prev_sample.slice([0..1, 0..1, 0..1, 0..1]).into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
