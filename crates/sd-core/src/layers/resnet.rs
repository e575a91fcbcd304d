use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{
    add_per_channel, conv2d, conv2d_forward, group_norm, group_norm_silu_2d, linear_forward, silu,
};

/// Configuration of a [`ResnetBlock2d`] (diffusers `ResnetBlock2D`, `time_embedding_norm`
/// "default", SiLU).
#[derive(Debug, Clone)]
pub struct ResnetBlock2dConfig {
    /// Channels of the input.
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// Width of the time embedding added after the first convolution; `None` in the VAE.
    pub temb_channels: Option<usize>,
    /// Groups of both GroupNorms.
    pub groups: usize,
    /// The GroupNorms' epsilon.
    pub eps: f64,
    /// The output is divided by this (1.0 in Stable Diffusion).
    pub output_scale_factor: f64,
}

impl ResnetBlock2dConfig {
    /// A block without time embedding and an `output_scale_factor` of 1.
    pub fn new(in_channels: usize, out_channels: usize, groups: usize, eps: f64) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels: None,
            groups,
            eps,
            output_scale_factor: 1.0,
        }
    }

    /// Sets the width of the time embedding (`None` for none).
    pub fn with_temb_channels(mut self, temb_channels: Option<usize>) -> Self {
        self.temb_channels = temb_channels;
        self
    }

    /// `count` blocks in a row at one resolution: the first goes from `in_channels` to
    /// `out_channels`, the others keep `out_channels` (how every diffusers block stacks them).
    pub fn init_stack<B: Backend>(
        &self,
        count: usize,
        device: &B::Device,
    ) -> Vec<ResnetBlock2d<B>> {
        (0..count)
            .map(|i| {
                let in_channels = if i == 0 {
                    self.in_channels
                } else {
                    self.out_channels
                };
                Self {
                    in_channels,
                    ..self.clone()
                }
                .init(device)
            })
            .collect()
    }

    /// The block with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2d<B> {
        let (cin, cout) = (self.in_channels, self.out_channels);
        ResnetBlock2d {
            norm1: group_norm(self.groups, cin, self.eps, device),
            conv1: conv2d(cin, cout, 3, 1, 1, device),
            time_emb_proj: self
                .temb_channels
                .map(|t| LinearConfig::new(t, cout).init(device)),
            norm2: group_norm(self.groups, cout, self.eps, device),
            conv2: conv2d(cout, cout, 3, 1, 1, device),
            // A 1×1 projection only where the residual changes width.
            conv_shortcut: (cin != cout).then(|| conv2d(cin, cout, 1, 1, 0, device)),
            output_scale_factor: self.output_scale_factor,
        }
    }
}

/// Two GroupNorm–SiLU–conv stages with a residual connection (He et al. 2016), optionally
/// conditioned on a time embedding (Ho et al. 2020).
#[derive(Module, Debug)]
pub struct ResnetBlock2d<B: Backend> {
    /// The GroupNorm before the first convolution.
    pub norm1: GroupNorm<B>,
    /// The first 3×3 convolution, `in_channels` to `out_channels`.
    pub conv1: Conv2d<B>,
    /// The projection of the time embedding onto `out_channels`; `None` in the VAE.
    pub time_emb_proj: Option<Linear<B>>,
    /// The GroupNorm before the second convolution.
    pub norm2: GroupNorm<B>,
    /// The second 3×3 convolution, `out_channels` to `out_channels`.
    pub conv2: Conv2d<B>,
    /// The 1×1 convolution on the residual path, only where the width changes.
    pub conv_shortcut: Option<Conv2d<B>>,
    /// The output is divided by this (1.0 in Stable Diffusion).
    pub output_scale_factor: f64,
}

impl<B: Backend> ResnetBlock2d<B> {
    /// `x`: `[batch, in_channels, h, w]`; `temb`: `[batch, temb_channels]` when the block has a
    /// time-embedding projection (ignored otherwise).
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut h = conv2d_forward(&self.conv1, group_norm_silu_2d(&self.norm1, x.clone()));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t: Tensor<B, 2> = linear_forward(proj, silu(temb));
            h = add_per_channel(h, t);
        }
        let h = conv2d_forward(&self.conv2, group_norm_silu_2d(&self.norm2, h));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv2d_forward(conv, x),
            None => x,
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}
