use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{AttentionBlock2d, AttentionBlock2dConfig, ResnetBlock2d, ResnetBlock2dConfig};

/// Configuration of a [`MidBlock2d`] (diffusers `UNetMidBlock2D`, as the VAE uses it).
#[derive(Debug, Clone)]
pub struct MidBlock2dConfig {
    /// Channels in and out of every layer.
    pub channels: usize,
    /// Groups of every GroupNorm.
    pub groups: usize,
    /// The GroupNorms' epsilon.
    pub eps: f64,
    /// `mid_block_add_attention` in the VAE config.
    pub add_attention: bool,
    /// Width of a time embedding for the resnets (`None` in the VAE).
    pub temb_channels: Option<usize>,
}

impl MidBlock2dConfig {
    /// The block with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MidBlock2d<B> {
        let resnet = || {
            ResnetBlock2dConfig::new(self.channels, self.channels, self.groups, self.eps)
                .with_temb_channels(self.temb_channels)
                .init(device)
        };
        let attentions = if self.add_attention {
            vec![
                AttentionBlock2dConfig {
                    channels: self.channels,
                    head_dim: self.channels,
                    groups: self.groups,
                    eps: self.eps,
                }
                .init(device),
            ]
        } else {
            Vec::new()
        };
        MidBlock2d {
            resnets: vec![resnet(), resnet()],
            attentions,
        }
    }
}

/// ResNet, attention, ResNet at the lowest resolution.
#[derive(Module, Debug)]
pub struct MidBlock2d<B: Backend> {
    /// The two ResNet blocks, before and after the attention.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// The attention between them; empty without `add_attention`.
    pub attentions: Vec<AttentionBlock2d<B>>,
}

impl<B: Backend> MidBlock2d<B> {
    /// `x`: `[batch, channels, h, w]`; `temb` goes to the ResNets when they take one. Same shape
    /// out.
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, temb.clone());
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            if let Some(attention) = self.attentions.get(i - 1) {
                x = attention.forward(x);
            }
            x = resnet.forward(x, temb.clone());
        }
        x
    }
}
