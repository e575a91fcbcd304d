//! Layers shared by the VAE halves and the U-Net. Field names follow diffusers' module names so
//! that a diffusers state dict maps onto them key for key.

pub mod adapters;
mod attention;
#[cfg(all(feature = "autodiff", feature = "flex"))]
mod attention_autodiff;
#[cfg(all(feature = "autodiff", any(feature = "flex", feature = "ndarray")))]
mod conv_autodiff;
mod conv_train;
#[cfg(all(feature = "autodiff", feature = "flex"))]
mod geglu_autodiff;
#[cfg(all(feature = "autodiff", feature = "flex"))]
mod group_norm_autodiff;
mod mid_block;
mod norm;
mod resnet;
mod sampling;
#[cfg(all(feature = "autodiff", feature = "flex"))]
mod silu_autodiff;

pub use attention::{
    AttentionBlock2d, AttentionBlock2dConfig, MAX_SCORES, causal_attention, chunked_attention,
    multi_head_attention, scaled_dot_product_attention,
};
pub use mid_block::{MidBlock2d, MidBlock2dConfig};
pub use norm::{add_per_channel, group_norm, group_norm_2d, group_norm_silu_2d, layer_norm};

pub use resnet::{ResnetBlock2d, ResnetBlock2dConfig};
pub use sampling::{
    Downsample2d, Downsample2dConfig, Upsample2d, Upsample2dConfig, upsample_nearest2x,
};

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// `t` in `dtype`, itself when it already is (a bf16 copy under mixed-precision training
/// meets f32 inputs built on the host).
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `x` with its elements laid out in order: on Flex a strided view (a permutation, a slice) is
/// gathered in one parallel tiled pass (`sd_kernels::cpu::vector::gather_strided`) where Flex
/// would copy it on one core, element by element for three or more axes; a contiguous tensor,
/// and every other backend's, is returned as it is.
pub fn contiguous<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(flat) = sd_kernels::cpu::try_flatten_strided(&x) {
        return flat.reshape(x.dims());
    }
    x
}

/// SiLU, `x · σ(x)` (Elfwing et al. 2018): in place on Flex; elsewhere written as
/// `x / (1 + e^(−x))`, four cheap element-wise passes instead of Burn's `silu`, whose
/// per-element sigmoid is the slower path on CPU backends.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let x = match sd_kernels::cpu::try_swish(x, 1.0) {
        Ok(out) => return out,
        Err(x) => x,
    };
    #[cfg(all(feature = "autodiff", feature = "flex"))]
    let x = match silu_autodiff::try_silu_autodiff(x) {
        Ok(out) => return out,
        Err(x) => x,
    };
    x.clone() / (x.neg().exp() + 1.0)
}

/// GEGLU's gating, `h ⊙ GELU(g)` with `[h, g]` the two halves of the last axis (Shazeer 2020,
/// eq. 5; exact, erf-based GELU): one vectorised pass on Flex.
pub fn geglu<B: Backend>(projected: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_geglu(&projected) {
        return out;
    }
    #[cfg(all(feature = "autodiff", feature = "flex"))]
    let projected = match geglu_autodiff::try_geglu_autodiff(projected) {
        Ok(out) => return out,
        Err(projected) => projected,
    };
    let [b, n, two_inner] = projected.dims();
    let inner = two_inner / 2;
    let hidden = projected.clone().slice([0..b, 0..n, 0..inner]);
    let gate = projected.slice([0..b, 0..n, inner..two_inner]);
    hidden * burn::tensor::activation::gelu(gate)
}

/// CLIP's quick GELU, `x · σ(1.702 x)`: in place on Flex, else as `x / (1 + e^(−1.702x))`
/// (cheaper passes than Burn's sigmoid).
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let x = match sd_kernels::cpu::try_swish(x, 1.702) {
        Ok(out) => return out,
        Err(x) => x,
    };
    x.clone() / ((x * -1.702).exp() + 1.0)
}

/// `layer.forward(x)` (`x W + b` over the last axis), through one multiply onto the bias
/// (`sd_kernels::cpu::linear`) on Flex, through Burn's `linear` otherwise; plus the low-rank
/// updates attached to the layer's weight ([`adapters`]), if any.
pub fn linear_forward<B: Backend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let updates = adapters::linear_updates(layer);
    if updates.is_empty() {
        return linear_base(layer, x);
    }
    let mut out = linear_base(layer, x.clone());
    for (down, up) in &updates {
        out = out + linear_base(up, linear_base(down, x.clone()));
    }
    out
}

/// [`linear_forward`] without the layer's attached low-rank updates.
fn linear_base<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_linear(layer, &x) {
        return out;
    }
    match widened_linear(layer, x.dtype()) {
        Some(wide) => linear_by_rows(&wide, x),
        None => linear_by_rows(layer, x),
    }
}

/// Burn's `linear` on `x`'s rows as one matrix. On a batch of matrices its backward sums the
/// weight gradient over the batch with a `sum_dim` per leading axis (a full copy of the
/// gradient even for one matrix: 5 % of the SD 1.5 U-Net's training step on Flex); on one
/// matrix the multiply does that sum.
fn linear_by_rows<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    if D <= 2 {
        return layer.forward(x);
    }
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let out = layer.forward(x.reshape([rows, dims[D - 1]]));
    dims[D - 1] = out.dims()[1];
    out.reshape(dims)
}

/// `layer` with its weight and bias cast to `dtype`, when they are held in another (the
/// matrices kept in f16 under f32 arithmetic, `LoadOptions::matrix_dtype`) and no kernel
/// widened them as it multiplied; `None` when they already match (the usual case).
fn widened_linear<B: Backend>(layer: &Linear<B>, dtype: DType) -> Option<Linear<B>> {
    if layer.weight.val().dtype() == dtype {
        return None;
    }
    let mut wide = layer.clone();
    wide.weight = wide.weight.map(|w| w.cast(dtype));
    wide.bias = wide.bias.map(|b| b.map(|b| to_dtype(b, dtype)));
    Some(wide)
}

/// [`widened_linear`] for a convolution.
fn widened_conv<B: Backend>(conv: &Conv2d<B>, dtype: DType) -> Option<Conv2d<B>> {
    if conv.weight.val().dtype() == dtype {
        return None;
    }
    let mut wide = conv.clone();
    wide.weight = wide.weight.map(|w| w.cast(dtype));
    wide.bias = wide.bias.map(|b| b.map(|b| to_dtype(b, dtype)));
    Some(wide)
}

/// A linear map over the channels of a channels-first `x` (`[batch, d_in, tokens]`, a feature
/// map's pixels), giving token-major `[batch, tokens, d_out]`: the transformer's way in. On
/// Flex one multiply reads `x` transposed in place.
pub fn linear_from_channels<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let updates = adapters::linear_updates(layer);
    let mut out = linear_from_channels_base(layer, x.clone());
    for (down, up) in &updates {
        out = out + linear_base(up, linear_from_channels_base(down, x.clone()));
    }
    out
}

/// [`linear_from_channels`] without the layer's attached low-rank updates.
fn linear_from_channels_base<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_linear_from_channels(layer, &x) {
        return out;
    }
    linear_base(layer, x.swap_dims(1, 2))
}

/// `residual + (x W + b)ᵀ` for token-major `x` (`[batch, tokens, d_in]`) and a channels-first
/// `residual` (`[batch, d_out, tokens]`): the transformer's way back to the feature map. On
/// Flex one multiply writes the transposed result onto the residual.
pub fn linear_to_channels<B: Backend>(
    layer: &Linear<B>,
    x: Tensor<B, 3>,
    residual: Tensor<B, 3>,
) -> Tensor<B, 3> {
    // Each attached update goes onto the residual the same way: `residual + (x A B)ᵀ`.
    let mut residual = residual;
    for (down, up) in &adapters::linear_updates(layer) {
        residual = linear_to_channels_base(up, linear_base(down, x.clone()), residual);
    }
    linear_to_channels_base(layer, x, residual)
}

/// [`linear_to_channels`] without the layer's attached low-rank updates.
fn linear_to_channels_base<B: Backend>(
    layer: &Linear<B>,
    x: Tensor<B, 3>,
    residual: Tensor<B, 3>,
) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_linear_to_channels(layer, &x, &residual) {
        return out;
    }
    linear_base(layer, x).swap_dims(1, 2) + residual
}

/// `conv.forward(x)` (plus the low-rank updates attached to its weight, [`adapters`]), through
/// the fused CPU kernel (`sd_kernels::cpu::conv`) on Flex for
/// stride-1 convolutions (most of the U-Net's and VAE's work); through Burn's `conv2d` otherwise,
/// except under autodiff (training). There Burn's `conv2d` backward runs a transposed
/// convolution (a naive single-threaded loop on Flex) and strided element-wise copies, so:
/// on `Autodiff<Flex>` and `Autodiff<NdArray>`, stride 1, an op with its own backward made of
/// per-tap matmuls (`conv_autodiff`; forward and backward 1.3 to 2 times as fast as Burn's on
/// Flex for a 3×3, 3 to 4 times for a 1×1); on other autodiff backends and strides, the same
/// per-tap matmuls written in differentiable tensor ops (`conv_train`). Both give the exact
/// gradients. Maps below 16² outputs stay on Burn's `conv2d`, faster there.
pub fn conv2d_forward<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let delta = adapters::conv_delta(conv, &x);
    let out = conv2d_base(conv, x);
    match delta {
        Some(delta) => out + delta,
        None => out,
    }
}

/// `relu(conv(x) · scale + shift)` with one `scale` and `shift` per output channel: a
/// bias-free convolution followed by an inference BatchNorm and a ReLU (Inception's
/// `BasicConv2d`), in one CPU kernel on Flex (the scale and shift applied to each output as it
/// is written, in PyTorch's order: convolution, then the affine map); through
/// [`conv2d_forward`] and broadcast ops otherwise (other backends, autodiff, attached
/// low-rank updates, a convolution with a bias).
pub fn conv2d_affine_relu<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
    scale: Tensor<B, 1>,
    shift: Tensor<B, 1>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if !adapters::has_updates(conv)
        && let Some(out) = sd_kernels::cpu::try_conv2d_affine_relu(conv, &x, &scale, &shift)
    {
        return out;
    }
    let [channels] = scale.dims();
    let y = conv2d_forward(conv, x);
    burn::tensor::activation::relu(
        y * scale.reshape([1, channels, 1, 1]) + shift.reshape([1, channels, 1, 1]),
    )
}

/// [`conv2d_forward`] without the layer's attached low-rank updates.
fn conv2d_base<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_conv2d(conv, &x) {
        return out;
    }
    if let Some(wide) = widened_conv(conv, x.dtype()) {
        return conv2d_base(&wide, x);
    }
    let x = if B::ad_enabled(&x.device()) {
        let large = conv_train::takes(conv, &x);
        #[cfg(all(feature = "autodiff", any(feature = "flex", feature = "ndarray")))]
        let x = if large || conv_autodiff::runs_kernels(&x) {
            match conv_autodiff::try_conv2d_autodiff(conv, x) {
                Ok(out) => return out,
                Err(x) => x,
            }
        } else {
            x
        };
        if large {
            match conv_train::conv2d_by_matmul(conv, x) {
                Ok(out) => return out,
                Err(x) => x,
            }
        } else {
            x
        }
    } else {
        x
    };
    conv.forward(x)
}

/// Max or average pooling of `[n, c, h, w]` with zero padding left out of the averages
/// (`count_include_pad=False`) and no dilation: through the CPU kernel on Flex (Burn's walks
/// each window element by element and tracks indices), Burn's `max_pool2d`/`avg_pool2d`
/// otherwise.
pub fn pool2d<B: Backend>(
    x: Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    average: bool,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_pool2d(&x, kernel, stride, padding, average) {
        return out;
    }
    if average {
        burn::tensor::module::avg_pool2d(x, kernel, stride, padding, false, false)
    } else {
        burn::tensor::module::max_pool2d(x, kernel, stride, padding, [1, 1], false)
    }
}

/// A `k`×`k` convolution with symmetric zero padding `padding` and stride `stride`, as
/// `torch.nn.Conv2d(in, out, k, stride, padding)`.
pub fn conv2d<B: Backend>(
    channels_in: usize,
    channels_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([channels_in, channels_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .init(device)
}

/// A Flex `Tensor` around a primitive (the training ops' inner tensors).
#[cfg(all(feature = "autodiff", feature = "flex"))]
pub(crate) fn flex_tensor<const D: usize>(
    primitive: burn::tensor::ops::FloatTensor<burn::backend::Flex>,
) -> Tensor<burn::backend::Flex, D> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(primitive))
}

/// A tensor of normal draws from a fixed seed: the training ops' tests compare a fused kernel
/// with Burn's ops to a tolerance an error bound sets, and a bound holds for the inputs it was
/// worked out on, so those inputs do not change from run to run (Burn's `random` does).
#[cfg(all(test, feature = "autodiff", feature = "flex"))]
pub(crate) fn seeded_normal<B: burn::tensor::backend::Backend, const D: usize>(
    shape: [usize; D],
    mean: f32,
    std: f32,
    seed: u64,
) -> Tensor<B, D> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let normal = rand_distr::Normal::new(mean, std).expect("a finite, non-negative deviation");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| normal.sample(&mut rng))
        .collect();
    Tensor::from_data(
        burn::tensor::TensorData::new(values, shape),
        &Default::default(),
    )
}

/// Asserts that the training ops' values or gradients agree with the Burn-op form's, element by
/// element, to `tolerance · (1 + |want|)`.
#[cfg(all(test, feature = "autodiff", feature = "flex"))]
pub(crate) fn assert_close<const D: usize>(
    what: &str,
    got: Tensor<burn::backend::Flex, D>,
    want: Tensor<burn::backend::Flex, D>,
    tolerance: f32,
) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let got = got.into_data().to_vec::<f32>().unwrap();
    let want = want.into_data().to_vec::<f32>().unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= tolerance * (1.0 + b.abs()),
            "{what} {i}: {a} against {b}"
        );
    }
}

/// The Flex kernels behind the entry points against Burn's own ops on the same backend, at
/// sizes that reach each kernel's paths (Winograd, blocks of one image's rows or of whole
/// images, strided and 1×1 convolutions;
/// multi-block attention).
#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::nn::{GroupNormConfig, LinearConfig};
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::backend::Flex;

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn convolutions_match_burns() {
        let device = Default::default();
        // (in, out, side, kernel, stride, padding): Winograd (2·32² pixels), blocks of whole
        // images (small), of rows (large, kernel 3 with padding 0), 1×1, and a stride-2
        // downsampler.
        for (cin, cout, side, kernel, stride, padding) in [
            (8, 12, 32, 3, 1, 1),
            (16, 8, 8, 3, 1, 1),
            (32, 6, 200, 3, 1, 0),
            (12, 5, 16, 1, 1, 0),
            (6, 7, 17, 3, 2, 1),
        ] {
            let conv = conv2d::<Flex>(cin, cout, kernel, stride, padding, &device);
            let x = random([2, cin, side, side]);
            let diff = max_diff(conv2d_forward(&conv, x.clone()), conv.forward(x));
            assert!(
                diff < 1e-4,
                "{cin}→{cout} at {side}², k{kernel} s{stride}: {diff}"
            );
        }
    }

    #[test]
    fn linear_maps_match_burns() {
        let device = Default::default();
        let layer = LinearConfig::new(24, 40).init::<Flex>(&device);
        let x = random([2, 50, 24]);
        assert!(max_diff(linear_forward(&layer, x.clone()), layer.forward(x.clone())) < 1e-4);
        let map = random([2, 24, 50]);
        let from = linear_from_channels(&layer, map.clone());
        assert!(max_diff(from, layer.forward(map.swap_dims(1, 2))) < 1e-4);
        let square = LinearConfig::new(24, 24).init::<Flex>(&device);
        let residual = random([2, 24, 50]);
        let to = linear_to_channels(&square, x.clone(), residual.clone());
        assert!(max_diff(to, square.forward(x).swap_dims(1, 2) + residual) < 1e-4);
    }

    #[test]
    fn attention_and_activations_match_burns() {
        let device = Default::default();
        // 600 keys: blocks of queries; 3 heads of 8 channels.
        let (q, k, v) = (
            random([2, 600, 24]),
            random([2, 600, 24]),
            random([2, 600, 24]),
        );
        let split = |t: Tensor<Flex, 3>| t.reshape([2, 600, 3, 8]).swap_dims(1, 2);
        let expected =
            scaled_dot_product_attention(split(q.clone()), split(k.clone()), split(v.clone()))
                .swap_dims(1, 2)
                .reshape([2, 600, 24]);
        assert!(
            max_diff(
                multi_head_attention(q.clone(), k.clone(), v.clone(), 3, false),
                expected
            ) < 1e-4
        );
        let causal = causal_attention(split(q.clone()), split(k.clone()), split(v.clone()))
            .swap_dims(1, 2)
            .reshape([2, 600, 24]);
        assert!(max_diff(multi_head_attention(q, k, v, 3, true), causal) < 1e-4);

        let x = random([2, 16, 9, 11]);
        let norm = GroupNormConfig::new(4, 16).init::<Flex>(&device);
        let burn_silu = |t: Tensor<Flex, 4>| burn::tensor::activation::silu(t);
        assert!(max_diff(group_norm_2d(&norm, x.clone()), norm.forward(x.clone())) < 1e-4);
        assert!(
            max_diff(
                group_norm_silu_2d(&norm, x.clone()),
                burn_silu(norm.forward(x.clone()))
            ) < 1e-4
        );
        assert!(max_diff(silu(x.clone()), burn_silu(x.clone())) < 1e-5);
        let quick = x.clone() * burn::tensor::activation::sigmoid(x.clone() * 1.702);
        assert!(max_diff(quick_gelu(x.clone()), quick) < 1e-5);
        let projected = random([2, 7, 32]);
        let gate = projected.clone().slice([0..2, 0..7, 16..32]);
        let expected =
            projected.clone().slice([0..2, 0..7, 0..16]) * burn::tensor::activation::gelu(gate);
        assert!(max_diff(geglu(projected), expected) < 1e-5);
    }
}
