//! Standard normal noise from a seeded host generator: the one noise function of the
//! workspace, for training draws and inference samplers alike, so that the same seed gives the
//! same noise on every backend.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, RngExt};
use rand_distr::StandardNormal;

/// Standard normal noise of `shape` from a host generator.
pub fn host_noise<B: Backend, const D: usize>(
    shape: [usize; D],
    rng: &mut impl Rng,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}
