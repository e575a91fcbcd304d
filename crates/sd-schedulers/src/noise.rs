//! Where stochastic samplers get their noise.

use std::collections::VecDeque;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sd_core::noise::host_noise;

/// A source of standard normal noise for the stochastic samplers (Euler ancestral, SDE
/// variants, DDIM with η > 0).
pub trait NoiseSource<B: Backend> {
    /// Standard normal noise of `shape` on `device`.
    fn standard_normal(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4>;
}

/// Noise from seeded host generators: the same seed gives the same noise on every backend.
/// With one stream per image ([`HostNoise::per_image`]), image `i` of a batch draws from the
/// stream of `seed + i`, so it is the same image as a single generation with that seed.
pub struct HostNoise {
    streams: Vec<StdRng>,
}

impl HostNoise {
    /// One stream, seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Self::per_image(seed, 1)
    }

    /// One stream per image of a batch of `images`, seeded `seed`, `seed + 1`, ...
    pub fn per_image(seed: u64, images: usize) -> Self {
        Self {
            streams: (0..images.max(1) as u64)
                .map(|i| StdRng::seed_from_u64(seed.wrapping_add(i)))
                .collect(),
        }
    }
}

impl<B: Backend> NoiseSource<B> for HostNoise {
    /// A batch of as many samples as there are streams takes one sample from each; any other
    /// shape is drawn from the first stream.
    fn standard_normal(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        let [b, c, h, w] = shape;
        if b != self.streams.len() || b == 1 {
            return host_noise(shape, &mut self.streams[0], device);
        }
        Tensor::cat(
            self.streams
                .iter_mut()
                .map(|rng| host_noise([1, c, h, w], rng, device))
                .collect(),
            0,
        )
    }
}

/// Noise given in advance, served in order: to replay another implementation's draws exactly.
pub struct ReplayNoise<B: Backend> {
    queue: VecDeque<Tensor<B, 4>>,
}

impl<B: Backend> ReplayNoise<B> {
    /// A source that hands out `noise` in order, one tensor per draw.
    pub fn new(noise: impl IntoIterator<Item = Tensor<B, 4>>) -> Self {
        Self {
            queue: noise.into_iter().collect(),
        }
    }

    /// How many tensors have not been asked for yet.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl<B: Backend> NoiseSource<B> for ReplayNoise<B> {
    /// # Panics
    /// When the recording is exhausted or has the wrong shape: a replay that diverges from its
    /// recording is a bug in the caller's test, not an input error.
    fn standard_normal(&mut self, shape: [usize; 4], _device: &B::Device) -> Tensor<B, 4> {
        let next = self.queue.pop_front().expect("replayed noise exhausted");
        assert_eq!(next.dims(), shape, "replayed noise has another shape");
        next
    }
}
