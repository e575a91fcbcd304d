//! Where stochastic samplers get their noise.

use std::collections::VecDeque;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sd_diffusion::training::host_noise;

/// A source of standard normal noise for the stochastic samplers (Euler ancestral, SDE
/// variants, DDIM with η > 0).
pub trait NoiseSource<B: Backend> {
    fn standard_normal(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4>;
}

/// Noise from a seeded host generator: the same seed gives the same noise on every backend.
pub struct HostNoise {
    rng: StdRng,
}

impl HostNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl<B: Backend> NoiseSource<B> for HostNoise {
    fn standard_normal(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        host_noise(shape, &mut self.rng, device)
    }
}

/// Noise given in advance, served in order: to replay another implementation's draws exactly.
pub struct ReplayNoise<B: Backend> {
    queue: VecDeque<Tensor<B, 4>>,
}

impl<B: Backend> ReplayNoise<B> {
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
