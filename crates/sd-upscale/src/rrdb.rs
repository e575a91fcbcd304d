//! ESRGAN's generator (Wang et al. 2018, §3.1, Fig. 4): residual-in-residual dense blocks
//! with residual scaling 0.2, in Real-ESRGAN's `RRDBNet` layout and key names.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::conv2d_forward;

use crate::ops::{conv3x3, leaky_relu, pixel_unshuffle, upsample_nearest};

/// Residual scaling of every dense block and RRDB (ESRGAN §3.1: "scaling down the residuals by
/// multiplying a constant between 0 and 1 before adding them to the main path").
const RESIDUAL_SCALE: f64 = 0.2;
/// The leaky ReLU slope everywhere in the network.
const SLOPE: f64 = 0.2;

/// The shape of an [`RrdbNet`] (`RRDBNet(num_in_ch, num_out_ch, scale, num_feat, num_block,
/// num_grow_ch)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RrdbNetConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// The upscaling factor: 4, or 2 / 1 with the input pixel-unshuffled by 2 / 4 first.
    pub scale: usize,
    /// Feature channels (64).
    pub features: usize,
    /// RRDB blocks (23 in `RealESRGAN_x4plus`, 6 in the anime model).
    pub blocks: usize,
    /// Channels each dense layer adds (32).
    pub growth: usize,
}

impl RrdbNetConfig {
    /// `RealESRGAN_x4plus`'s: 3 → 3 channels, ×4, 64 features, 23 blocks, growth 32.
    pub fn x4plus() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            scale: 4,
            features: 64,
            blocks: 23,
            growth: 32,
        }
    }

    /// How much the input is pixel-unshuffled before the first convolution (so that the two
    /// ×2 upsamplings give `scale`).
    pub fn unshuffle(&self) -> usize {
        4 / self.scale
    }
}

/// Five densely connected 3×3 convolutions (each sees the block's input and every earlier
/// output), the last scaled by 0.2 onto the input.
#[derive(Module, Debug)]
pub struct ResidualDenseBlock<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    conv3: Conv2d<B>,
    conv4: Conv2d<B>,
    conv5: Conv2d<B>,
}

impl<B: Backend> ResidualDenseBlock<B> {
    fn new(features: usize, growth: usize, device: &B::Device) -> Self {
        Self {
            conv1: conv3x3(features, growth, device),
            conv2: conv3x3(features + growth, growth, device),
            conv3: conv3x3(features + 2 * growth, growth, device),
            conv4: conv3x3(features + 3 * growth, growth, device),
            conv5: conv3x3(features + 4 * growth, features, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut seen = vec![x.clone()];
        for conv in [&self.conv1, &self.conv2, &self.conv3, &self.conv4] {
            let out = leaky_relu(conv2d_forward(conv, Tensor::cat(seen.clone(), 1)), SLOPE);
            seen.push(out);
        }
        let x5 = conv2d_forward(&self.conv5, Tensor::cat(seen, 1));
        x5 * RESIDUAL_SCALE + x
    }
}

/// Residual in residual: three dense blocks, scaled by 0.2 onto the input.
#[derive(Module, Debug)]
pub struct Rrdb<B: Backend> {
    rdb1: ResidualDenseBlock<B>,
    rdb2: ResidualDenseBlock<B>,
    rdb3: ResidualDenseBlock<B>,
}

impl<B: Backend> Rrdb<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = self
            .rdb3
            .forward(self.rdb2.forward(self.rdb1.forward(x.clone())));
        out * RESIDUAL_SCALE + x
    }
}

/// ESRGAN's generator: a convolution, the RRDB trunk with a long skip, two nearest ×2
/// upsamplings each followed by a convolution, and two more convolutions.
#[derive(Module, Debug)]
pub struct RrdbNet<B: Backend> {
    conv_first: Conv2d<B>,
    body: Vec<Rrdb<B>>,
    conv_body: Conv2d<B>,
    conv_up1: Conv2d<B>,
    conv_up2: Conv2d<B>,
    conv_hr: Conv2d<B>,
    conv_last: Conv2d<B>,
    unshuffle: usize,
}

impl<B: Backend> RrdbNet<B> {
    /// The dtype the weights are in (and the network computes in).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.conv_first.weight.val().dtype()
    }

    /// A network of this shape with torch-style random weights (load real ones over them).
    pub fn new(config: &RrdbNetConfig, device: &B::Device) -> Self {
        let unshuffle = config.unshuffle();
        let f = config.features;
        Self {
            conv_first: conv3x3(config.in_channels * unshuffle * unshuffle, f, device),
            body: (0..config.blocks)
                .map(|_| Rrdb {
                    rdb1: ResidualDenseBlock::new(f, config.growth, device),
                    rdb2: ResidualDenseBlock::new(f, config.growth, device),
                    rdb3: ResidualDenseBlock::new(f, config.growth, device),
                })
                .collect(),
            conv_body: conv3x3(f, f, device),
            conv_up1: conv3x3(f, f, device),
            conv_up2: conv3x3(f, f, device),
            conv_hr: conv3x3(f, f, device),
            conv_last: conv3x3(f, config.out_channels, device),
            unshuffle,
        }
    }

    /// `[N, C, H, W]` in `[0, 1]` (H and W multiples of the unshuffle factor) to
    /// `[N, C, s·H, s·W]`, unclamped.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.unshuffle > 1 {
            pixel_unshuffle(x, self.unshuffle)
        } else {
            x
        };
        let feat = conv2d_forward(&self.conv_first, x);
        let mut trunk = feat.clone();
        for block in &self.body {
            trunk = block.forward(trunk);
        }
        let feat = feat + conv2d_forward(&self.conv_body, trunk);
        let feat = leaky_relu(
            conv2d_forward(&self.conv_up1, upsample_nearest(feat, 2)),
            SLOPE,
        );
        let feat = leaky_relu(
            conv2d_forward(&self.conv_up2, upsample_nearest(feat, 2)),
            SLOPE,
        );
        conv2d_forward(
            &self.conv_last,
            leaky_relu(conv2d_forward(&self.conv_hr, feat), SLOPE),
        )
    }
}
