//! The few tensor operations both generators share.

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// A 3×3 convolution with padding 1 and a bias, as every layer of both generators.
pub(crate) fn conv3x3<B: Backend>(inputs: usize, outputs: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([inputs, outputs], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// `F.leaky_relu(x, slope)`.
pub(crate) fn leaky_relu<B: Backend>(x: Tensor<B, 4>, slope: f64) -> Tensor<B, 4> {
    burn::tensor::activation::leaky_relu(x, slope)
}

/// `nn.PReLU(num_parameters=C)`: `max(0, x) + a_c · min(0, x)`, one slope per channel,
/// under the key `weight` as torch names it.
#[derive(Module, Debug)]
pub struct PRelu<B: Backend> {
    /// The slope of each channel, `[C]`.
    pub weight: Param<Tensor<B, 1>>,
}

impl<B: Backend> PRelu<B> {
    /// Slopes of 0.25, torch's initial value.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::full([channels], 0.25, device)),
        }
    }

    /// Applies it to `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [c] = self.weight.dims();
        let slope = self.weight.val().reshape([1, c, 1, 1]);
        x.clone().clamp_min(0.0) + x.clamp_max(0.0) * slope
    }
}

/// `F.pixel_unshuffle(x, s)`: `[N, C, H, W]` → `[N, C·s², H/s, W/s]`.
pub(crate) fn pixel_unshuffle<B: Backend>(x: Tensor<B, 4>, s: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h / s, s, w / s, s])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([n, c * s * s, h / s, w / s])
}

/// `F.pixel_shuffle(x, s)`: `[N, C·s², H, W]` → `[N, C, H·s, W·s]`.
pub(crate) fn pixel_shuffle<B: Backend>(x: Tensor<B, 4>, s: usize) -> Tensor<B, 4> {
    let [n, cs, h, w] = x.dims();
    let c = cs / (s * s);
    x.reshape([n, c, s, s, h, w])
        .permute([0, 1, 4, 2, 5, 3])
        .reshape([n, c, h * s, w * s])
}

/// `F.interpolate(x, scale_factor=s, mode="nearest")` for an integer `s`.
pub(crate) fn upsample_nearest<B: Backend>(x: Tensor<B, 4>, s: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, s, w, s])
        .reshape([n, c, h * s, w * s])
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::backend::DefaultBackend as B;

    #[test]
    fn shuffles_invert_and_follow_torch_order() {
        let device = Default::default();
        let x = Tensor::<B, 1, burn::tensor::Int>::arange(0..32, &device)
            .float()
            .reshape([1, 2, 4, 4]);
        let down = pixel_unshuffle(x.clone(), 2);
        assert_eq!(down.dims(), [1, 8, 2, 2]);
        // torch: channel c·4 + i·2 + j holds x[c, 2y + i, 2x + j].
        let v: Vec<f32> = down.clone().into_data().to_vec().unwrap();
        assert_eq!(&v[..4], &[0.0, 2.0, 8.0, 10.0]);
        assert_eq!(&v[4..8], &[1.0, 3.0, 9.0, 11.0]);
        let back: Vec<f32> = pixel_shuffle(down, 2).into_data().to_vec().unwrap();
        let orig: Vec<f32> = x.clone().into_data().to_vec().unwrap();
        assert_eq!(back, orig);
        let up: Vec<f32> = upsample_nearest(x, 2).into_data().to_vec().unwrap();
        assert_eq!(&up[..8], &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(&up[8..10], &[0.0, 0.0]);
    }
}
