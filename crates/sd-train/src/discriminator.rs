//! The patch discriminator of the latent diffusion paper's autoencoder training (Rombach et al.
//! 2022, app. G: "a patch-based discriminator", after Esser et al. 2021 and pix2pix's PatchGAN,
//! Isola et al. 2017): strided 4 × 4 convolutions with BatchNorm and LeakyReLU(0.2) ending in
//! one logit per overlapping patch, trained on the hinge loss. Its weights are kept under the
//! keys of the paper's code (`main.<i>.*` of its `nn.Sequential`; a latent diffusion training
//! checkpoint holds them under `loss.discriminator.`).

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use sd_core::layers::{conv2d, conv2d_forward};
use sd_core::weights::{LoadOptions, SafetensorsFile, TensorSnapshot};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// `sd train vae`'s adversarial term (`discriminator` in train.toml; on with
/// `--discriminator-start`). The defaults are the paper's KL autoencoders' (`disc_start`
/// 50001, `disc_weight` 0.5, `disc_factor` 1, `NLayerDiscriminator(ndf=64, n_layers=3)`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscriminatorConfig {
    /// The first step (counted from 0) on which the adversarial terms count: before it the
    /// autoencoder trains on reconstruction and KL alone and the discriminator does not train.
    pub start: u64,
    /// Multiplies the adaptive weight of the generator's term (`disc_weight`).
    pub weight: f64,
    /// Multiplies both adversarial terms from `start` on (`disc_factor`).
    pub factor: f64,
    /// Channels of the first convolution (`ndf`); they double at each layer, up to 8×.
    pub channels: usize,
    /// Convolutions with BatchNorm after the first (`n_layers`); all but the last halve the
    /// resolution.
    pub layers: usize,
}

impl Default for DiscriminatorConfig {
    fn default() -> Self {
        Self {
            start: 50_001,
            weight: 0.5,
            factor: 1.0,
            channels: 64,
            layers: 3,
        }
    }
}

impl DiscriminatorConfig {
    /// Checks each value against its meaning.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return bad(format!(
                "the discriminator weight must be ≥ 0, got {}",
                self.weight
            ));
        }
        if !(self.factor.is_finite() && self.factor >= 0.0) {
            return bad(format!(
                "the discriminator factor must be ≥ 0, got {}",
                self.factor
            ));
        }
        if !(1..=1024).contains(&self.channels) || !(1..=8).contains(&self.layers) {
            return bad(format!(
                "the discriminator needs 1-1024 channels and 1-8 layers, got {} and {}",
                self.channels, self.layers
            ));
        }
        Ok(())
    }

    /// The smallest square image side the discriminator can score (each 4 × 4 convolution
    /// with padding 1 and stride 2 halves the side, with stride 1 takes one off).
    pub fn min_side(&self) -> usize {
        // Backwards from a 1 × 1 output: two stride-1 convolutions, then `layers` stride-2.
        let mut side = 3;
        for _ in 0..self.layers {
            side *= 2;
        }
        side
    }
}

/// One strided convolution, BatchNorm and LeakyReLU (`main.<3i+2>` and `main.<3i+3>`).
#[derive(Module, Debug)]
pub struct DiscriminatorBlock<B: Backend> {
    /// The 4 × 4 convolution, no bias (BatchNorm follows).
    pub conv: Conv2d<B>,
    /// Normalises with the batch's statistics while training.
    pub norm: BatchNorm<B>,
}

/// pix2pix's `NLayerDiscriminator` with BatchNorm, as the latent diffusion code builds it.
#[derive(Module, Debug)]
pub struct PatchDiscriminator<B: Backend> {
    /// `main.0`: RGB to `channels`, stride 2, with bias.
    pub first: Conv2d<B>,
    /// `main.2`-`main.<3·layers>`.
    pub blocks: Vec<DiscriminatorBlock<B>>,
    /// `main.<3·layers + 2>`: one logit per patch, with bias.
    pub last: Conv2d<B>,
}

impl<B: Backend> PatchDiscriminator<B> {
    /// Random weights as the paper's code initialises them (`weights_init`): convolution
    /// weights N(0, 0.02), BatchNorm scales N(1, 0.02) and shifts 0; the two convolution
    /// biases keep PyTorch's default (uniform ±1/√fan_in).
    pub fn new(config: &DiscriminatorConfig, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let normal = |conv: Conv2d<B>| -> Conv2d<B> {
            let mut conv = conv;
            let shape = conv.weight.shape();
            conv.weight = Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                device,
            ));
            conv
        };
        let ch = config.channels;
        let first = normal(conv2d(3, ch, 4, 2, 1, device));
        let mut blocks = Vec::with_capacity(config.layers);
        let mut mult = 1;
        for n in 1..=config.layers {
            let prev = mult;
            mult = (1 << n).min(8);
            let stride = if n < config.layers { 2 } else { 1 };
            let mut conv = normal(conv2d(ch * prev, ch * mult, 4, stride, 1, device));
            conv.bias = None;
            let mut norm = BatchNormConfig::new(ch * mult).init(device);
            norm.gamma = Param::from_tensor(Tensor::random(
                [ch * mult],
                Distribution::Normal(1.0, 0.02),
                device,
            ));
            blocks.push(DiscriminatorBlock { conv, norm });
        }
        let last = normal(conv2d(ch * mult, 1, 4, 1, 1, device));
        Ok(Self {
            first,
            blocks,
            last,
        })
    }

    /// The logits of every patch, `[b, 1, h', w']`, for images `[b, 3, h, w]` in `[-1, 1]`.
    /// On an autodiff backend BatchNorm uses the batch's statistics (training mode, as the
    /// discriminator always runs in the paper's code).
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = leaky_relu(conv2d_forward(&self.first, images), 0.2);
        let x = self.blocks.iter().fold(x, |x, block| {
            leaky_relu(block.norm.forward(conv2d_forward(&block.conv, x)), 0.2)
        });
        conv2d_forward(&self.last, x)
    }

    /// The file key of a parameter path (`blocks.1.norm.weight` → `main.6.weight`).
    fn file_key(&self, path: &str) -> Option<String> {
        let (head, rest) = path.split_once('.')?;
        let index = match head {
            "first" => return Some(format!("main.0.{rest}")),
            "last" => return Some(format!("main.{}.{rest}", 3 * self.blocks.len() + 2)),
            "blocks" => rest,
            _ => return None,
        };
        let (i, rest) = index.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let (part, rest) = rest.split_once('.')?;
        let offset = match part {
            "conv" => 2,
            "norm" => 3,
            _ => return None,
        };
        Some(format!("main.{}.{rest}", 3 * i + offset))
    }

    /// The parameter path of a file key (the inverse of [`Self::file_key`]).
    fn module_path(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix("main.")?;
        let (i, rest) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let last = 3 * self.blocks.len() + 2;
        match i {
            0 => Some(format!("first.{rest}")),
            i if i == last => Some(format!("last.{rest}")),
            i if i >= 2 && (i - 2) % 3 == 0 => Some(format!("blocks.{}.conv.{rest}", (i - 2) / 3)),
            i if i >= 3 && i % 3 == 0 => Some(format!("blocks.{}.norm.{rest}", (i - 3) / 3)),
            _ => None,
        }
    }

    /// The weights (and BatchNorm's running statistics) under the paper's code's keys.
    pub fn weight_tensors(&self) -> Vec<(String, TensorSnapshot)> {
        sd_core::weights::module_tensors(self, &|path| self.file_key(path))
    }

    /// Writes the weights as one safetensors file (f32), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        sd_core::weights::save_tensors(self.weight_tensors(), path, DType::F32, None)?;
        Ok(())
    }

    /// Fills the weights from a file written by [`Self::save`] (or the paper's code's
    /// `main.*` keys): every parameter must be there with its shape.
    pub fn load(self, path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let paths: Vec<Option<String>> = file
            .entries()
            .iter()
            .map(|e| self.module_path(&e.key))
            .collect();
        let keys: Vec<String> = file.entries().iter().map(|e| e.key.clone()).collect();
        let map = move |key: &str| {
            keys.iter()
                .position(|k| k == key)
                .and_then(|i| paths[i].clone())
        };
        Ok(sd_core::weights::load_safetensors(
            self,
            &file,
            &map,
            LoadOptions::default(),
        )?)
    }
}

/// The generator's hinge term: `−mean(D(x̂))`.
pub fn generator_hinge_loss<B: Backend>(logits_fake: Tensor<B, 4>) -> Tensor<B, 1> {
    logits_fake.mean().neg()
}

/// The discriminator's hinge loss: `½ (mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))`.
pub fn discriminator_hinge_loss<B: Backend>(
    logits_real: Tensor<B, 4>,
    logits_fake: Tensor<B, 4>,
) -> Tensor<B, 1> {
    let real = relu(logits_real.neg().add_scalar(1.0)).mean();
    let fake = relu(logits_fake.add_scalar(1.0)).mean();
    (real + fake).mul_scalar(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::backend::Flex;

    #[test]
    fn keys_are_the_papers_and_map_back() {
        let config = DiscriminatorConfig {
            channels: 4,
            layers: 3,
            ..Default::default()
        };
        let d = PatchDiscriminator::<Flex>::new(&config, &Default::default()).unwrap();
        let keys: Vec<String> = d.weight_tensors().into_iter().map(|(k, _)| k).collect();
        for key in [
            "main.0.weight",
            "main.0.bias",
            "main.2.weight",
            "main.3.weight",
            "main.3.bias",
            "main.3.running_mean",
            "main.3.running_var",
            "main.5.weight",
            "main.9.weight",
            "main.11.weight",
            "main.11.bias",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
            let path = d.module_path(key).unwrap();
            assert_eq!(d.file_key(&path).as_deref(), Some(key));
        }
        assert!(!keys.iter().any(|k| k == "main.2.bias"));
        // 24 × 24 → 12 → 6 → 3 → 2 → 1: the smallest side that leaves one patch.
        assert_eq!(config.min_side(), 24);
        let x = Tensor::<Flex, 4>::zeros([1, 3, 24, 24], &Default::default());
        assert_eq!(d.forward(x).dims(), [1, 1, 1, 1]);
    }
}
