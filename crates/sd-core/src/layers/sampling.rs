use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, PadMode};

use super::{conv2d, conv2d_forward};

/// Configuration of a [`Downsample2d`] (diffusers `Downsample2D` with `use_conv=True`).
#[derive(Debug, Clone)]
pub struct Downsample2dConfig {
    /// Channels of the input.
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// 0: the VAE's asymmetric `(0, 1, 0, 1)` zero pad before an unpadded stride-2 conv;
    /// 1: the U-Net's stride-2 conv with padding 1.
    pub padding: usize,
}

impl Downsample2dConfig {
    /// The layer with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Downsample2d<B> {
        Downsample2d {
            conv: conv2d(
                self.in_channels,
                self.out_channels,
                3,
                2,
                self.padding,
                device,
            ),
            pad_right_bottom: self.padding == 0,
        }
    }
}

/// Halves the resolution with a 3×3 stride-2 convolution.
#[derive(Module, Debug)]
pub struct Downsample2d<B: Backend> {
    /// The 3×3 stride-2 convolution.
    pub conv: Conv2d<B>,
    /// Whether a zero row and column go below and right of the map first (the VAE's padding 0).
    pub pad_right_bottom: bool,
}

impl<B: Backend> Downsample2d<B> {
    /// `x`: `[batch, in_channels, h, w]`; returns `out_channels` channels at half the height and
    /// width.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.pad_right_bottom {
            // (left, right, top, bottom), as torch.nn.functional.pad(x, (0, 1, 0, 1)).
            x.pad((0, 1, 0, 1), PadMode::Constant(0.0))
        } else {
            x
        };
        conv2d_forward(&self.conv, x)
    }
}

/// Configuration of an [`Upsample2d`] (diffusers `Upsample2D` with `use_conv=True`).
#[derive(Debug, Clone)]
pub struct Upsample2dConfig {
    /// Channels of the input.
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
}

impl Upsample2dConfig {
    /// The layer with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Upsample2d<B> {
        Upsample2d {
            conv: conv2d(self.in_channels, self.out_channels, 3, 1, 1, device),
        }
    }
}

/// Doubles the resolution: nearest-neighbour ×2, then a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2d<B: Backend> {
    /// The 3×3 convolution after the upsampling.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2d<B> {
    /// `x`: `[batch, in_channels, h, w]`; returns `[batch, out_channels, 2h, 2w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d_forward(&self.conv, upsample_nearest2x(x))
    }

    /// Nearest-neighbour to an explicit size (the U-Net's skip size when a side was odd).
    pub fn forward_to(&self, x: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
        let x = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        conv2d_forward(&self.conv, x)
    }
}

/// Nearest-neighbour ×2 upsampling (`F.interpolate(x, scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    interpolate(
        x,
        [2 * h, 2 * w],
        InterpolateOptions::new(InterpolateMode::Nearest),
    )
}
