//! Real-ESRGAN's compact generator (`SRVGGNetCompact`, used by `realesr-general-x4v3` and the
//! anime-video models): 3×3 convolutions and PReLUs at the input's size, a pixel shuffle to the
//! output's, and the nearest-upsampled input added (the network learns the residual).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::conv2d_forward;

use crate::ops::{PRelu, conv3x3, pixel_shuffle, upsample_nearest};

/// The shape of a [`SrVggNetCompact`] (`SRVGGNetCompact(num_in_ch, num_out_ch, num_feat,
/// num_conv, upscale, act_type="prelu")`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrVggNetCompactConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// Feature channels (64).
    pub features: usize,
    /// Convolutions between the first and the last (32 in `realesr-general-x4v3`, 16 in the
    /// anime-video models).
    pub convs: usize,
    /// The upscaling factor.
    pub scale: usize,
}

/// The compact network. Its released key names are one `body` list alternating convolution
/// and PReLU (`body.0` conv, `body.1` PReLU, …, `body.{2n+2}` the last conv); here the two
/// kinds are two lists, and [`Self::module_path`] / [`Self::checkpoint_key`] map between them.
#[derive(Module, Debug)]
pub struct SrVggNetCompact<B: Backend> {
    convs: Vec<Conv2d<B>>,
    acts: Vec<PRelu<B>>,
    scale: usize,
}

impl<B: Backend> SrVggNetCompact<B> {
    /// The dtype the weights are in (and the network computes in).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.convs[0].weight.val().dtype()
    }

    /// A network of this shape with torch-style random weights.
    pub fn new(config: &SrVggNetCompactConfig, device: &B::Device) -> Self {
        let f = config.features;
        let mut convs = vec![conv3x3(config.in_channels, f, device)];
        convs.extend((0..config.convs).map(|_| conv3x3(f, f, device)));
        convs.push(conv3x3(
            f,
            config.out_channels * config.scale * config.scale,
            device,
        ));
        Self {
            convs,
            acts: (0..=config.convs).map(|_| PRelu::new(f, device)).collect(),
            scale: config.scale,
        }
    }

    /// The released file's key for a parameter path: `convs.i.*` is `body.{2i}.*`,
    /// `acts.i.weight` is `body.{2i+1}.weight`.
    pub fn checkpoint_key(path: &str) -> Option<String> {
        let (list, rest) = path.split_once('.')?;
        let (index, field) = rest.split_once('.')?;
        let index: usize = index.parse().ok()?;
        match list {
            "convs" => Some(format!("body.{}.{field}", 2 * index)),
            "acts" => Some(format!("body.{}.{field}", 2 * index + 1)),
            _ => None,
        }
    }

    /// The parameter path of a released file's key: the inverse of [`Self::checkpoint_key`].
    pub fn module_path(key: &str) -> Option<String> {
        let rest = key.strip_prefix("body.")?;
        let (index, field) = rest.split_once('.')?;
        let index: usize = index.parse().ok()?;
        let list = if index.is_multiple_of(2) {
            "convs"
        } else {
            "acts"
        };
        Some(format!("{list}.{}.{field}", index / 2))
    }

    /// `[N, C, H, W]` in `[0, 1]` to `[N, C, s·H, s·W]`, unclamped.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut out = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            out = conv2d_forward(conv, out);
            if let Some(act) = self.acts.get(i) {
                out = act.forward(out);
            }
        }
        pixel_shuffle(out, self.scale) + upsample_nearest(x, self.scale)
    }
}
