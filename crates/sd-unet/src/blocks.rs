//! The U-Net's down, mid and up blocks: ResNet blocks conditioned on the time embedding, each
//! followed by a spatial transformer in the cross-attention blocks.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::{
    Downsample2d, Downsample2dConfig, ResnetBlock2d, ResnetBlock2dConfig, Upsample2d,
    Upsample2dConfig,
};

use crate::transformer::Transformer2d;

/// What every block's layers share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSettings {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    /// `Some((heads, transformer layers, context width, only cross-attention))` for
    /// cross-attention blocks.
    pub attention: Option<(usize, usize, usize, bool)>,
}

impl BlockSettings {
    fn resnet<B: Backend>(&self, cin: usize, cout: usize, device: &B::Device) -> ResnetBlock2d<B> {
        ResnetBlock2dConfig::new(cin, cout, self.groups, self.eps)
            .with_temb_channels(Some(self.temb))
            .init(device)
    }

    fn transformer<B: Backend>(
        &self,
        channels: usize,
        device: &B::Device,
    ) -> Option<Transformer2d<B>> {
        self.attention.map(|(heads, layers, context, only_cross)| {
            Transformer2d::new(
                channels,
                heads,
                layers,
                context,
                only_cross,
                self.groups,
                device,
            )
        })
    }
}

/// `DownBlock2D` or `CrossAttnDownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    /// The ResNet blocks, `layers_per_block` of them.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// Empty for `DownBlock2D`.
    pub attentions: Vec<Transformer2d<B>>,
    /// The stride-2 downsample; empty in the last block.
    pub downsamplers: Vec<Downsample2d<B>>,
}

impl<B: Backend> DownBlock<B> {
    pub(crate) fn new(
        s: BlockSettings,
        cin: usize,
        cout: usize,
        layers: usize,
        downsample: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..layers)
            .map(|j| s.resnet(if j == 0 { cin } else { cout }, cout, device))
            .collect();
        let attentions = (0..layers)
            .filter_map(|_| s.transformer(cout, device))
            .collect();
        let downsamplers = downsample
            .map(|padding| {
                Downsample2dConfig {
                    in_channels: cout,
                    out_channels: cout,
                    padding,
                }
                .init(device)
            })
            .into_iter()
            .collect();
        Self {
            resnets,
            attentions,
            downsamplers,
        }
    }

    /// Returns the output and pushes every intermediate state the up path will reuse.
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(x, context.clone());
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn` (or `UNetMidBlock2D` without attention): ResNet, then
/// (transformer, ResNet) per layer.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    /// The ResNet blocks: one more than the transformers.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// The transformers between the ResNets; empty for `UNetMidBlock2D`.
    pub attentions: Vec<Transformer2d<B>>,
}

impl<B: Backend> MidBlock<B> {
    pub(crate) fn new(s: BlockSettings, channels: usize, scale: f64, device: &B::Device) -> Self {
        let resnet = || {
            let mut r = s.resnet(channels, channels, device);
            r.output_scale_factor = scale;
            r
        };
        Self {
            resnets: vec![resnet(), resnet()],
            attentions: s.transformer(channels, device).into_iter().collect(),
        }
    }

    /// `x`: `[batch, channels, h, w]`, with the time embedding `temb` and the text `context`; same
    /// shape out.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, Some(temb.clone()));
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            if let Some(attention) = self.attentions.get(i - 1) {
                x = attention.forward(x, context.clone());
            }
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`: each ResNet takes a skip connection concatenated on the
/// channels.
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    /// The ResNet blocks, `layers_per_block + 1` of them, each taking one skip.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// A transformer after each ResNet; empty for `UpBlock2D`.
    pub attentions: Vec<Transformer2d<B>>,
    /// The ×2 upsample; empty in the last block.
    pub upsamplers: Vec<Upsample2d<B>>,
}

impl<B: Backend> UpBlock<B> {
    /// `prev`: the width coming from below; `skip_in`: the width of the deepest skip this block
    /// takes last (the next block's output width on the down path).
    pub(crate) fn new(
        s: BlockSettings,
        prev: usize,
        cout: usize,
        skip_in: usize,
        layers: usize,
        upsample: bool,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j == layers - 1 { skip_in } else { cout };
                let resnet_in = if j == 0 { prev } else { cout };
                s.resnet(resnet_in + skip, cout, device)
            })
            .collect();
        let attentions = (0..layers)
            .filter_map(|_| s.transformer(cout, device))
            .collect();
        let upsamplers = if upsample {
            vec![
                Upsample2dConfig {
                    in_channels: cout,
                    out_channels: cout,
                }
                .init(device),
            ]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            upsamplers,
        }
    }

    /// Takes one skip per ResNet off the end of `skips`; `upsample_size` is the upsampled size when
    /// it is not twice the input's (a side was odd on the way down).
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("one skip per resnet, checked by the U-Net");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb.clone()));
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(x, context.clone());
            }
        }
        for up in &self.upsamplers {
            x = match upsample_size {
                Some(size) => up.forward_to(x, size),
                None => up.forward(x),
            };
        }
        x
    }
}
