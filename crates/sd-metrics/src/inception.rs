//! InceptionV3 as the FID literature runs it: pytorch-fid's `FIDInceptionA/C/E` variant of
//! torchvision's `Inception3` (Szegedy et al. 2016), which reproduces the 2015 TensorFlow graph
//! the original FID code used: 1008 classes, no auxiliary head, average pools that do not count
//! the padding, and a max pool in the last block's pool branch. Every field is named as the
//! weights file's keys (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch_pool.bn.running_var`,
//! `fc.weight`), so `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
//! `weights-inception-2015-12-05-6726825d.pth` load key for key.
//!
//! The network takes images already resized to 299² and scaled to `[-1, 1]`; the two reference
//! packages prepare them differently ([`crate::preprocess`]).
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::adaptive_avg_pool2d;
use sd_core::layers::{conv2d_affine_relu, pool2d};

/// The side images are resized to.
pub const INPUT_SIZE: usize = 299;
/// The width of the pool3 features FID compares.
pub const FEATURES: usize = 2048;
/// The classifier's outputs (1000 ImageNet classes and 8 unused, as in the TF graph).
pub const CLASSES: usize = 1008;

/// BatchNorm in inference: `(x − mean) / √(var + ε) · weight + bias`, ε = 0.001 as in
/// torchvision's `BasicConv2d`; applied folded into its convolution ([`BasicConv2d`]).
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    /// γ.
    pub weight: Param<Tensor<B, 1>>,
    /// β.
    pub bias: Param<Tensor<B, 1>>,
    /// The running mean.
    pub running_mean: Param<Tensor<B, 1>>,
    /// The running variance.
    pub running_var: Param<Tensor<B, 1>>,
}

impl<B: Backend> BatchNorm2d<B> {
    fn new(channels: usize, device: &B::Device) -> Self {
        let param = |v: f32| Param::from_tensor(Tensor::full([channels], v, device));
        Self {
            weight: param(1.0),
            bias: param(0.0),
            running_mean: param(0.0),
            running_var: param(1.0),
        }
    }
}

/// A convolution without bias, BatchNorm and ReLU (torchvision's `BasicConv2d`).
#[derive(Module, Debug)]
pub struct BasicConv2d<B: Backend> {
    /// The convolution.
    pub conv: Conv2d<B>,
    /// Its BatchNorm.
    pub bn: BatchNorm2d<B>,
}

impl<B: Backend> BasicConv2d<B> {
    /// `kernel`, `padding` as `[height, width]`.
    fn new(
        cin: usize,
        cout: usize,
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
        device: &B::Device,
    ) -> Self {
        let [ph, pw] = padding;
        Self {
            conv: Conv2dConfig::new([cin, cout], kernel)
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
                .with_bias(false)
                .init(device),
            bn: BatchNorm2d::new(cout, device),
        }
    }

    fn square(cin: usize, cout: usize, k: usize, device: &B::Device) -> Self {
        Self::new(cin, cout, [k, k], 1, [k / 2, k / 2], device)
    }

    /// `relu(bn(conv(x)))` as `relu(conv(x) · s + β − μ·s)`, `s = γ / √(σ² + ε)`: on the CPU
    /// one kernel that applies the BatchNorm and the ReLU to each output as it is written,
    /// instead of two broadcast passes over the activations that cost as much as the
    /// convolutions.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let bn = &self.bn;
        let scale = bn.weight.val() / (bn.running_var.val() + 1e-3).sqrt();
        let shift = bn.bias.val() - bn.running_mean.val() * scale.clone();
        conv2d_affine_relu(&self.conv, x, scale, shift)
    }
}

/// A 3×3, stride-1 pool with padding 1: the average over the cells inside the image
/// (`count_include_pad=False`, the FID variants' patch) or the maximum.
/// Through the CPU pooling kernel on Flex (Burn's walks each window element by element and
/// tracks indices: a quarter of the network's time).
fn pool3x3_same<B: Backend>(x: Tensor<B, 4>, max: bool) -> Tensor<B, 4> {
    pool2d(x, [3, 3], [1, 1], [1, 1], !max)
}

fn max_pool_3x3_s2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    pool2d(x, [3, 3], [2, 2], [0, 0], false)
}

/// Mixed_5b/5c/5d (`FIDInceptionA`).
#[derive(Module, Debug)]
pub struct InceptionA<B: Backend> {
    /// 1×1.
    pub branch1x1: BasicConv2d<B>,
    /// 1×1 before the 5×5.
    pub branch5x5_1: BasicConv2d<B>,
    /// 5×5.
    pub branch5x5_2: BasicConv2d<B>,
    /// 1×1 before two 3×3.
    pub branch3x3dbl_1: BasicConv2d<B>,
    /// The first 3×3.
    pub branch3x3dbl_2: BasicConv2d<B>,
    /// The second 3×3.
    pub branch3x3dbl_3: BasicConv2d<B>,
    /// 1×1 after the average pool.
    pub branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionA<B> {
    fn new(cin: usize, pool_features: usize, d: &B::Device) -> Self {
        Self {
            branch1x1: BasicConv2d::square(cin, 64, 1, d),
            branch5x5_1: BasicConv2d::square(cin, 48, 1, d),
            branch5x5_2: BasicConv2d::square(48, 64, 5, d),
            branch3x3dbl_1: BasicConv2d::square(cin, 64, 1, d),
            branch3x3dbl_2: BasicConv2d::square(64, 96, 3, d),
            branch3x3dbl_3: BasicConv2d::square(96, 96, 3, d),
            branch_pool: BasicConv2d::square(cin, pool_features, 1, d),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self
            .branch5x5_2
            .forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_1.forward(x.clone());
        let b3 = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(b3));
        let bp = self.branch_pool.forward(pool3x3_same(x, false));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

/// Mixed_6a (torchvision's `InceptionB`): 35² → 17².
#[derive(Module, Debug)]
pub struct InceptionB<B: Backend> {
    /// 3×3, stride 2.
    pub branch3x3: BasicConv2d<B>,
    /// 1×1 before two 3×3.
    pub branch3x3dbl_1: BasicConv2d<B>,
    /// 3×3.
    pub branch3x3dbl_2: BasicConv2d<B>,
    /// 3×3, stride 2.
    pub branch3x3dbl_3: BasicConv2d<B>,
}

impl<B: Backend> InceptionB<B> {
    fn new(cin: usize, d: &B::Device) -> Self {
        Self {
            branch3x3: BasicConv2d::new(cin, 384, [3, 3], 2, [0, 0], d),
            branch3x3dbl_1: BasicConv2d::square(cin, 64, 1, d),
            branch3x3dbl_2: BasicConv2d::square(64, 96, 3, d),
            branch3x3dbl_3: BasicConv2d::new(96, 96, [3, 3], 2, [0, 0], d),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_1.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(bd));
        Tensor::cat(vec![b3, bd, max_pool_3x3_s2(x)], 1)
    }
}

/// Mixed_6b..6e (`FIDInceptionC`): factorised 7×7 convolutions.
#[derive(Module, Debug)]
pub struct InceptionC<B: Backend> {
    /// 1×1.
    pub branch1x1: BasicConv2d<B>,
    /// 1×1.
    pub branch7x7_1: BasicConv2d<B>,
    /// 1×7.
    pub branch7x7_2: BasicConv2d<B>,
    /// 7×1.
    pub branch7x7_3: BasicConv2d<B>,
    /// 1×1.
    pub branch7x7dbl_1: BasicConv2d<B>,
    /// 7×1.
    pub branch7x7dbl_2: BasicConv2d<B>,
    /// 1×7.
    pub branch7x7dbl_3: BasicConv2d<B>,
    /// 7×1.
    pub branch7x7dbl_4: BasicConv2d<B>,
    /// 1×7.
    pub branch7x7dbl_5: BasicConv2d<B>,
    /// 1×1 after the average pool.
    pub branch_pool: BasicConv2d<B>,
}

impl<B: Backend> InceptionC<B> {
    fn new(cin: usize, c7: usize, d: &B::Device) -> Self {
        let row = |a, b| BasicConv2d::new(a, b, [1, 7], 1, [0, 3], d);
        let col = |a, b| BasicConv2d::new(a, b, [7, 1], 1, [3, 0], d);
        Self {
            branch1x1: BasicConv2d::square(cin, 192, 1, d),
            branch7x7_1: BasicConv2d::square(cin, c7, 1, d),
            branch7x7_2: row(c7, c7),
            branch7x7_3: col(c7, 192),
            branch7x7dbl_1: BasicConv2d::square(cin, c7, 1, d),
            branch7x7dbl_2: col(c7, c7),
            branch7x7dbl_3: row(c7, c7),
            branch7x7dbl_4: col(c7, c7),
            branch7x7dbl_5: row(c7, 192),
            branch_pool: BasicConv2d::square(cin, 192, 1, d),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let mut b7 = self.branch7x7_1.forward(x.clone());
        for conv in [&self.branch7x7_2, &self.branch7x7_3] {
            b7 = conv.forward(b7);
        }
        let mut bd = self.branch7x7dbl_1.forward(x.clone());
        for conv in [
            &self.branch7x7dbl_2,
            &self.branch7x7dbl_3,
            &self.branch7x7dbl_4,
            &self.branch7x7dbl_5,
        ] {
            bd = conv.forward(bd);
        }
        let bp = self.branch_pool.forward(pool3x3_same(x, false));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

/// Mixed_7a (torchvision's `InceptionD`): 17² → 8².
#[derive(Module, Debug)]
pub struct InceptionD<B: Backend> {
    /// 1×1.
    pub branch3x3_1: BasicConv2d<B>,
    /// 3×3, stride 2.
    pub branch3x3_2: BasicConv2d<B>,
    /// 1×1.
    pub branch7x7x3_1: BasicConv2d<B>,
    /// 1×7.
    pub branch7x7x3_2: BasicConv2d<B>,
    /// 7×1.
    pub branch7x7x3_3: BasicConv2d<B>,
    /// 3×3, stride 2.
    pub branch7x7x3_4: BasicConv2d<B>,
}

impl<B: Backend> InceptionD<B> {
    fn new(cin: usize, d: &B::Device) -> Self {
        Self {
            branch3x3_1: BasicConv2d::square(cin, 192, 1, d),
            branch3x3_2: BasicConv2d::new(192, 320, [3, 3], 2, [0, 0], d),
            branch7x7x3_1: BasicConv2d::square(cin, 192, 1, d),
            branch7x7x3_2: BasicConv2d::new(192, 192, [1, 7], 1, [0, 3], d),
            branch7x7x3_3: BasicConv2d::new(192, 192, [7, 1], 1, [3, 0], d),
            branch7x7x3_4: BasicConv2d::new(192, 192, [3, 3], 2, [0, 0], d),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self
            .branch3x3_2
            .forward(self.branch3x3_1.forward(x.clone()));
        let mut b7 = self.branch7x7x3_1.forward(x.clone());
        for conv in [
            &self.branch7x7x3_2,
            &self.branch7x7x3_3,
            &self.branch7x7x3_4,
        ] {
            b7 = conv.forward(b7);
        }
        Tensor::cat(vec![b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

/// Mixed_7b (`FIDInceptionE_1`, average pool) and Mixed_7c (`FIDInceptionE_2`, max pool).
#[derive(Module, Debug)]
pub struct InceptionE<B: Backend> {
    /// 1×1.
    pub branch1x1: BasicConv2d<B>,
    /// 1×1.
    pub branch3x3_1: BasicConv2d<B>,
    /// 1×3.
    pub branch3x3_2a: BasicConv2d<B>,
    /// 3×1.
    pub branch3x3_2b: BasicConv2d<B>,
    /// 1×1.
    pub branch3x3dbl_1: BasicConv2d<B>,
    /// 3×3.
    pub branch3x3dbl_2: BasicConv2d<B>,
    /// 1×3.
    pub branch3x3dbl_3a: BasicConv2d<B>,
    /// 3×1.
    pub branch3x3dbl_3b: BasicConv2d<B>,
    /// 1×1 after the pool.
    pub branch_pool: BasicConv2d<B>,
    /// Max pool in the pool branch (Mixed_7c; pytorch-fid: "likely an error in this specific
    /// Inception implementation", kept for the numbers) instead of the average.
    pub max_pool: bool,
}

impl<B: Backend> InceptionE<B> {
    fn new(cin: usize, max_pool: bool, d: &B::Device) -> Self {
        let row = |a, b| BasicConv2d::new(a, b, [1, 3], 1, [0, 1], d);
        let col = |a, b| BasicConv2d::new(a, b, [3, 1], 1, [1, 0], d);
        Self {
            branch1x1: BasicConv2d::square(cin, 320, 1, d),
            branch3x3_1: BasicConv2d::square(cin, 384, 1, d),
            branch3x3_2a: row(384, 384),
            branch3x3_2b: col(384, 384),
            branch3x3dbl_1: BasicConv2d::square(cin, 448, 1, d),
            branch3x3dbl_2: BasicConv2d::square(448, 384, 3, d),
            branch3x3dbl_3a: row(384, 384),
            branch3x3dbl_3b: col(384, 384),
            branch_pool: BasicConv2d::square(cin, 192, 1, d),
            max_pool,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(
            vec![
                self.branch3x3_2a.forward(b3.clone()),
                self.branch3x3_2b.forward(b3),
            ],
            1,
        );
        let bd = self.branch3x3dbl_1.forward(x.clone());
        let bd = self.branch3x3dbl_2.forward(bd);
        let bd = Tensor::cat(
            vec![
                self.branch3x3dbl_3a.forward(bd.clone()),
                self.branch3x3dbl_3b.forward(bd),
            ],
            1,
        );
        let bp = self.branch_pool.forward(pool3x3_same(x, self.max_pool));
        Tensor::cat(vec![b1, b3, bd, bp], 1)
    }
}

/// What one forward pass gives.
#[derive(Debug, Clone)]
pub struct InceptionOutput<B: Backend> {
    /// The pool3 features, `[batch, 2048]`: what FID and KID compare.
    pub pool3: Tensor<B, 2>,
    /// `fc` without its bias, `[batch, 1008]`: torch-fidelity's `logits_unbiased`, what its
    /// Inception Score uses.
    pub logits_unbiased: Tensor<B, 2>,
}

/// The FID InceptionV3.
#[derive(Module, Debug)]
pub struct InceptionV3<B: Backend> {
    /// 3 → 32, 3×3, stride 2.
    pub Conv2d_1a_3x3: BasicConv2d<B>,
    /// 32 → 32, 3×3.
    pub Conv2d_2a_3x3: BasicConv2d<B>,
    /// 32 → 64, 3×3, padding 1.
    pub Conv2d_2b_3x3: BasicConv2d<B>,
    /// 64 → 80, 1×1.
    pub Conv2d_3b_1x1: BasicConv2d<B>,
    /// 80 → 192, 3×3.
    pub Conv2d_4a_3x3: BasicConv2d<B>,
    /// 192 → 256.
    pub Mixed_5b: InceptionA<B>,
    /// 256 → 288.
    pub Mixed_5c: InceptionA<B>,
    /// 288 → 288.
    pub Mixed_5d: InceptionA<B>,
    /// 288 → 768, 35² → 17².
    pub Mixed_6a: InceptionB<B>,
    /// 768 → 768.
    pub Mixed_6b: InceptionC<B>,
    /// 768 → 768.
    pub Mixed_6c: InceptionC<B>,
    /// 768 → 768.
    pub Mixed_6d: InceptionC<B>,
    /// 768 → 768.
    pub Mixed_6e: InceptionC<B>,
    /// 768 → 1280, 17² → 8².
    pub Mixed_7a: InceptionD<B>,
    /// 1280 → 2048.
    pub Mixed_7b: InceptionE<B>,
    /// 2048 → 2048.
    pub Mixed_7c: InceptionE<B>,
    /// The 1008-class classifier.
    pub fc: Linear<B>,
}

impl<B: Backend> InceptionV3<B> {
    /// The network with placeholder weights (load a weights file into it).
    pub fn new(device: &B::Device) -> Self {
        let d = device;
        Self {
            Conv2d_1a_3x3: BasicConv2d::new(3, 32, [3, 3], 2, [0, 0], d),
            Conv2d_2a_3x3: BasicConv2d::new(32, 32, [3, 3], 1, [0, 0], d),
            Conv2d_2b_3x3: BasicConv2d::square(32, 64, 3, d),
            Conv2d_3b_1x1: BasicConv2d::square(64, 80, 1, d),
            Conv2d_4a_3x3: BasicConv2d::new(80, 192, [3, 3], 1, [0, 0], d),
            Mixed_5b: InceptionA::new(192, 32, d),
            Mixed_5c: InceptionA::new(256, 64, d),
            Mixed_5d: InceptionA::new(288, 64, d),
            Mixed_6a: InceptionB::new(288, d),
            Mixed_6b: InceptionC::new(768, 128, d),
            Mixed_6c: InceptionC::new(768, 160, d),
            Mixed_6d: InceptionC::new(768, 160, d),
            Mixed_6e: InceptionC::new(768, 192, d),
            Mixed_7a: InceptionD::new(768, d),
            Mixed_7b: InceptionE::new(1280, false, d),
            Mixed_7c: InceptionE::new(2048, true, d),
            fc: LinearConfig::new(FEATURES, CLASSES).init(d),
        }
    }

    /// `x`: `[batch, 3, 299, 299]` in `[-1, 1]` (see [`crate::preprocess`]).
    pub fn forward(&self, x: Tensor<B, 4>) -> InceptionOutput<B> {
        let x = self.Conv2d_1a_3x3.forward(x);
        let x = self.Conv2d_2a_3x3.forward(x);
        let x = max_pool_3x3_s2(self.Conv2d_2b_3x3.forward(x));
        let x = self.Conv2d_3b_1x1.forward(x);
        let x = max_pool_3x3_s2(self.Conv2d_4a_3x3.forward(x));
        let x = self.Mixed_5b.forward(x);
        let x = self.Mixed_5c.forward(x);
        let x = self.Mixed_5d.forward(x);
        let x = self.Mixed_6a.forward(x);
        let x = self.Mixed_6b.forward(x);
        let x = self.Mixed_6c.forward(x);
        let x = self.Mixed_6d.forward(x);
        let x = self.Mixed_6e.forward(x);
        let x = self.Mixed_7a.forward(x);
        let x = self.Mixed_7b.forward(x);
        let x = self.Mixed_7c.forward(x);
        let [batch, channels, _, _] = x.dims();
        let pool3: Tensor<B, 2> = adaptive_avg_pool2d(x, [1, 1]).reshape([batch, channels]);
        let logits_unbiased = pool3.clone().matmul(self.fc.weight.val());
        InceptionOutput {
            pool3,
            logits_unbiased,
        }
    }
}

impl<B: Backend> InceptionV3<B> {
    /// The network with the weights of `path`: pytorch-fid's `pt_inception-…​.pth` or
    /// torch-fidelity's `weights-inception-…​.pth` (PyTorch's zip format or the legacy pre-1.6
    /// one, read by burn-store's parser, which runs no pickled code), or a `.safetensors` with
    /// the same keys. Strict: every weight must be there with its shape, and nothing else.
    pub fn load(path: impl AsRef<std::path::Path>, device: &B::Device) -> crate::Result<Self> {
        use sd_core::weights::{LoadOptions, SafetensorsFile, load_safetensors};
        let path = path.as_ref();
        let file = SafetensorsFile::open_any(path)?;
        let keys = |k: &str| Some(k.to_string());
        let loaded = load_safetensors(Self::new(device), &file, &keys, LoadOptions::default());
        match loaded {
            Ok(model) => Ok(model),
            // A whole list for a file of another network would bury the point: say what it is
            // and show the first problem.
            Err(sd_core::CoreError::Weights { path, problems }) => {
                Err(crate::MetricsError::Checkpoint {
                    path,
                    reason: format!(
                        "not the FID Inception's weights: {} weight problem(s), the first: {}",
                        problems.len(),
                        problems
                            .first()
                            .map(ToString::to_string)
                            .unwrap_or_default()
                    ),
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use sd_core::backend::Flex;
    use sd_core::layers::conv2d_forward;

    /// A direct sum over the taps, zero padding.
    fn naive(x: &[f32], dims: [usize; 4], w: &[f32], wd: [usize; 4], pad: [usize; 2]) -> Vec<f32> {
        let [n, c, h, wi] = dims;
        let [o, _, kh, kw] = wd;
        let (oh, ow) = (h + 2 * pad[0] - kh + 1, wi + 2 * pad[1] - kw + 1);
        let mut out = vec![0.0; n * o * oh * ow];
        for b in 0..n {
            for oc in 0..o {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut s = 0.0;
                        for ic in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let (iy, ix) = (y + ky, xx + kx);
                                    if iy < pad[0]
                                        || ix < pad[1]
                                        || iy - pad[0] >= h
                                        || ix - pad[1] >= wi
                                    {
                                        continue;
                                    }
                                    s += x[((b * c + ic) * h + iy - pad[0]) * wi + ix - pad[1]]
                                        * w[((oc * c + ic) * kh + ky) * kw + kx];
                                }
                            }
                        }
                        out[((b * o + oc) * oh + y) * ow + xx] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn factorised_convolutions_are_right_on_maps_smaller_than_their_kernels() {
        for (side, kernel, pad, stride) in [
            (4, [1, 7], [0, 3], 1),
            (4, [7, 1], [3, 0], 1),
            (1, [1, 3], [0, 1], 1),
            (17, [1, 7], [0, 3], 1),
            (9, [3, 3], [0, 0], 2),
            (4, [3, 3], [0, 0], 2),
            (47, [3, 3], [0, 0], 2),
            (9, [5, 5], [2, 2], 1),
            (22, [3, 3], [0, 0], 1),
            (9, [1, 1], [0, 0], 1),
            (9, [3, 3], [1, 1], 1),
            (2, [3, 3], [1, 1], 1),
        ] {
            check(3, 5, side, kernel, pad, stride);
        }
        // The stem at a 96² input.
        check(3, 32, 96, [3, 3], [0, 0], 2);
        check(32, 32, 47, [3, 3], [0, 0], 1);
        check(32, 64, 45, [3, 3], [1, 1], 1);
        check(64, 80, 22, [1, 1], [0, 0], 1);
        check(80, 192, 22, [3, 3], [0, 0], 1);
        check(192, 64, 9, [1, 1], [0, 0], 1);
    }

    fn check(
        cin: usize,
        cout: usize,
        side: usize,
        kernel: [usize; 2],
        pad: [usize; 2],
        stride: usize,
    ) {
        let device = burn::tensor::Device::<Flex>::default();
        {
            let conv = BasicConv2d::<Flex>::new(cin, cout, kernel, stride, pad, &device).conv;
            let x = Tensor::<Flex, 4>::random(
                [2, cin, side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let got = conv2d_forward(&conv, x.clone())
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            let w = conv.weight.val().into_data().into_vec::<f32>().unwrap();
            let xs = x.into_data().into_vec::<f32>().unwrap();
            let full = naive(
                &xs,
                [2, cin, side, side],
                &w,
                [cout, cin, kernel[0], kernel[1]],
                pad,
            );
            let (oh, ow) = (
                side + 2 * pad[0] - kernel[0] + 1,
                side + 2 * pad[1] - kernel[1] + 1,
            );
            let (sh, sw) = ((oh - 1) / stride + 1, (ow - 1) / stride + 1);
            let mut want = Vec::new();
            for bo in 0..2 * cout {
                for y in 0..sh {
                    for x in 0..sw {
                        want.push(full[(bo * oh + y * stride) * ow + x * stride]);
                    }
                }
            }
            assert_eq!(got.len(), want.len(), "{side}² {kernel:?} stride {stride}");
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err < 1e-3,
                "{cin}→{cout} {side}² {kernel:?} stride {stride}: {err}"
            );
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod pool_tests {
    use super::*;
    use burn::tensor::Distribution;
    use sd_core::backend::Flex;

    #[test]
    fn pools_are_right_on_small_maps() {
        let device = Default::default();
        for side in [1usize, 2, 4, 9] {
            let x = Tensor::<Flex, 4>::random(
                [1, 2, side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let xs = x.clone().into_data().into_vec::<f32>().unwrap();
            let at = |c: usize, y: isize, xx: isize| -> Option<f32> {
                (y >= 0 && xx >= 0 && (y as usize) < side && (xx as usize) < side)
                    .then(|| xs[(c * side + y as usize) * side + xx as usize])
            };
            for max in [false, true] {
                let got = pool3x3_same(x.clone(), max)
                    .into_data()
                    .into_vec::<f32>()
                    .unwrap();
                for c in 0..2 {
                    for y in 0..side {
                        for xx in 0..side {
                            let cells: Vec<f32> = (-1..=1)
                                .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
                                .filter_map(|(dy, dx)| at(c, y as isize + dy, xx as isize + dx))
                                .collect();
                            let want = if max {
                                cells.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
                            } else {
                                cells.iter().sum::<f32>() / cells.len() as f32
                            };
                            let g = got[(c * side + y) * side + xx];
                            assert!(
                                (g - want).abs() < 1e-5,
                                "side {side} max {max} ({y},{xx}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod strided_pool_tests {
    use super::*;
    use burn::tensor::Distribution;
    use sd_core::backend::Flex;

    #[test]
    fn strided_max_pools_are_right_on_even_and_odd_maps() {
        let device = Default::default();
        for side in [4usize, 9, 20, 22, 35] {
            let x = Tensor::<Flex, 4>::random(
                [1, 2, side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let xs = x.clone().into_data().into_vec::<f32>().unwrap();
            let got = max_pool_3x3_s2(x);
            let out = (side - 3) / 2 + 1;
            assert_eq!(got.dims(), [1, 2, out, out], "side {side}");
            let got = got.into_data().into_vec::<f32>().unwrap();
            for c in 0..2 {
                for y in 0..out {
                    for xx in 0..out {
                        let mut m = f32::NEG_INFINITY;
                        for dy in 0..3 {
                            for dx in 0..3 {
                                m = m.max(xs[(c * side + 2 * y + dy) * side + 2 * xx + dx]);
                            }
                        }
                        let g = got[(c * out + y) * out + xx];
                        assert_eq!(g, m, "side {side} ({c},{y},{xx})");
                    }
                }
            }
        }
    }
}
