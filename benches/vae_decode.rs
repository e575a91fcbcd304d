//! VAE decode: the tiny fixture shape (16×16 latent) and Stable Diffusion 1.5's VAE (64×64 latent
//! to a 512×512 image), random weights, default backend. `cargo bench -p sd-benches`.

use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use sd_core::AutoencoderKlConfig;
use sd_core::backend::DefaultBackend as B;
use sd_decoder::VaeDecoder;

fn bench_decode(c: &mut Criterion, name: &str, config: AutoencoderKlConfig, side: usize) {
    sd_benches::tune_allocator();
    let device = Default::default();
    let decoder = VaeDecoder::<B>::new(&config, &device).expect("valid config");
    let z = Tensor::<B, 4>::random([1, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    c.bench_function(name, |b| {
        b.iter(|| {
            let image = decoder.decode(z.clone()).expect("decode");
            image.slice([0..1, 0..1, 0..1, 0..1]).into_data()
        })
    });
}

fn tiny(c: &mut Criterion) {
    let config = AutoencoderKlConfig {
        block_out_channels: vec![32, 64],
        down_block_types: vec!["DownEncoderBlock2D".into(); 2],
        up_block_types: vec!["UpDecoderBlock2D".into(); 2],
        norm_num_groups: 8,
        ..AutoencoderKlConfig::default()
    };
    bench_decode(c, "vae_decode_tiny_16x16", config, 16);
}

fn sd15(c: &mut Criterion) {
    bench_decode(
        c,
        "vae_decode_sd15_64x64_to_512x512",
        AutoencoderKlConfig::sd15(),
        64,
    );
}

criterion_group!(small, tiny);
criterion_group! {
    name = full_size;
    // One decode takes seconds on a CPU: ten samples are plenty.
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(60));
    targets = sd15
}
criterion_main!(small, full_size);
