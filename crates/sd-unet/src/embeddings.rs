//! Timestep embeddings: the sinusoidal features of Vaswani et al. (2017, sec. 3.5) as DDPM uses
//! them for the noise level, and the MLP that widens them.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_core::layers::{linear_forward, silu};

/// diffusers' `get_timestep_embedding`: `[sin(t ω_k), cos(t ω_k)]` with
/// `ω_k = 10000^(−k / (half − shift))`, swapped to cos first when `flip_sin_to_cos`.
/// `timesteps` may be fractional and differ per sample.
pub fn timestep_embedding<B: Backend>(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let mut values = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        // float32 throughout, as diffusers computes it.
        let t = t as f32;
        let args: Vec<f32> = (0..half)
            .map(|k| {
                let exponent = -(10000f32.ln()) * k as f32 / (half as f32 - freq_shift as f32);
                t * exponent.exp()
            })
            .collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let (first, second) = if flip_sin_to_cos {
            (cos, sin)
        } else {
            (sin, cos)
        };
        values.extend(first);
        values.extend(second);
        if dim % 2 == 1 {
            values.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(values, [timesteps.len(), dim]), device)
}

/// `Linear → SiLU → Linear` (diffusers `TimestepEmbedding`).
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    /// The first layer, from the sinusoidal features to the embedding width.
    pub linear_1: Linear<B>,
    /// The second layer, embedding width to embedding width.
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// The MLP with random weights: `in_dim` features to `out_dim`.
    pub fn new(in_dim: usize, out_dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LinearConfig::new(in_dim, out_dim).init(device),
            linear_2: LinearConfig::new(out_dim, out_dim).init(device),
        }
    }

    /// `x`: `[batch, in_dim]`; returns `[batch, out_dim]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        linear_forward(&self.linear_2, silu(linear_forward(&self.linear_1, x)))
    }
}
