//! A rank-32 LoRA on the SD 1.5 U-Net (random weights) on the default backend, kohya's default
//! targets (every linear and 1×1 projection inside the transformer blocks: to_q, to_k, to_v,
//! to_out.0, proj_in, proj_out, the feed-forward's two):
//! - `lora_merge_rank32_sd15_unet`: merging it (issue 16 asks for under 2 s);
//! - `unet_step_sd15_{32x32,64x64}/{base,lora_on_the_fly}`: one U-Net evaluation (77 tokens;
//!   32 × 32 latents in a batch of 2, as with classifier-free guidance; 64 × 64, SD 1.5's
//!   512 × 512 images, in a batch of 1) without and with the LoRA attached (`sd_lora::attach`):
//!   the on-the-fly overhead, which issue 16 asks to keep under 10 %.
//!
//! `cargo bench -p sd-benches --bench lora`.

use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use sd_benches::kohya_lora;
use sd_core::backend::DefaultBackend as B;
use sd_lora::{Component, MergeOptions};
use sd_unet::{UNet2DConditionConfig, UNet2DConditionModel};

const RANK: usize = 32;

fn merge_sd15(c: &mut Criterion) {
    sd_benches::tune_allocator();
    let device = Default::default();
    let unet = UNet2DConditionModel::<B>::new(&UNet2DConditionConfig::sd15(), &device)
        .expect("valid config");
    let lora = kohya_lora(&unet, RANK);
    eprintln!("{} LoRA layers of rank {RANK}", lora.layers.len());
    c.bench_function("lora_merge_rank32_sd15_unet", |b| {
        b.iter(|| {
            let (merged, record) = sd_lora::merge(
                unet.clone(),
                Component::Unet,
                &[(&lora, 0.8)],
                &sd_unet::checkpoint_key,
                None,
                MergeOptions::default(),
                &device,
            )
            .expect("merge");
            (merged.parameter_count(), record.weights)
        })
    });
}

fn on_the_fly_step_sd15(c: &mut Criterion) {
    sd_benches::tune_allocator();
    let device = Default::default();
    let unet = UNet2DConditionModel::<B>::new(&UNet2DConditionConfig::sd15(), &device)
        .expect("valid config");
    let lora = kohya_lora(&unet, RANK);
    for (batch, side) in [(2, 32), (1, 64)] {
        let latents = Tensor::<B, 4>::random(
            [batch, 4, side, side],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let context =
            Tensor::<B, 3>::random([batch, 77, 768], Distribution::Normal(0.0, 1.0), &device);
        let t = vec![500.0; batch];
        let step = |unet: &UNet2DConditionModel<B>| {
            unet.forward(latents.clone(), &t, context.clone(), None)
                .expect("forward")
                .into_data()
        };
        let mut group = c.benchmark_group(format!("unet_step_sd15_{side}x{side}"));
        group.bench_function("base", |b| b.iter(|| step(&unet)));
        let attached = sd_lora::attach(
            &unet,
            Component::Unet,
            &[(&lora, 0.8)],
            &sd_unet::checkpoint_key,
            None,
            MergeOptions::default(),
            &device,
        )
        .expect("attach");
        eprintln!("{} weights adapted on the fly", attached.weights);
        group.bench_function("lora_on_the_fly", |b| b.iter(|| step(&unet)));
        group.finish();
        attached.detach();
    }
}

criterion_group! {
    name = lora;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(30));
    targets = merge_sd15, on_the_fly_step_sd15
}
criterion_main!(lora);
