use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::to_dtype;

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)`. Callers check that `groups`
/// divides `channels` when they validate their configuration.
pub fn group_norm<B: Backend>(
    groups: usize,
    channels: usize,
    eps: f64,
    device: &B::Device,
) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `norm` applied to `x: [batch, channels, h, w]`: the same arithmetic as Burn's
/// `GroupNorm::forward` (mean, centred variance, scale and shift per channel), with the
/// per-channel scale and shift applied along the last axis of a `[batch·channels, h·w]` view.
/// Broadcasting a `[1, channels, 1, 1]` tensor over the middle axes is 40× slower on Flex than
/// broadcasting over the last axis; this keeps a GroupNorm at the cost of a few elementwise
/// passes.
pub fn group_norm_2d<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_group_norm(norm, &x, false) {
        return out;
    }
    #[cfg(all(feature = "autodiff", feature = "flex"))]
    let x = match super::group_norm_autodiff::try_group_norm_autodiff(norm, x) {
        Ok(out) => return out,
        Err(x) => x,
    };
    group_norm_by_ops(norm, x)
}

/// [`group_norm_2d`] in tensor ops (any backend, tracked or not).
pub(crate) fn group_norm_by_ops<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    // f16 tops out at 65504: a group's sum of squares passes that easily. The statistics of an
    // f16 input are taken in f32 (as PyTorch's autocast runs `group_norm`) and the result
    // cast back.
    let dtype = x.dtype();
    let stats = if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    };
    let [b, c, h, w] = x.dims();
    let g = norm.num_groups;
    let n = c / g * h * w;
    let grouped = to_dtype(x, stats).reshape([b, g, n]);
    let mean = grouped.clone().sum_dim(2) / n as f64;
    let centred = grouped - mean;
    let var = centred.clone().square().sum_dim(2) / n as f64;
    let normed = centred / (var + norm.epsilon).sqrt();
    let out = match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => {
            let per_row = |p: Tensor<B, 1>| {
                to_dtype(p, stats)
                    .unsqueeze_dim::<2>(0)
                    .repeat_dim(0, b)
                    .reshape([b * c, 1])
            };
            (normed.reshape([b * c, h * w]) * per_row(gamma.val()) + per_row(beta.val()))
                .reshape([b, c, h, w])
        }
        _ => normed.reshape([b, c, h, w]),
    };
    to_dtype(out, dtype)
}

/// [`group_norm_2d`] followed by SiLU (every ResNet block's and the output head's
/// `norm → SiLU`): one fused pass on Flex.
pub fn group_norm_silu_2d<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_group_norm(norm, &x, true) {
        return out;
    }
    super::silu(group_norm_2d(norm, x))
}

/// `x + v[:, :, None, None]` for `x: [batch, channels, h, w]`, `v: [batch, channels]` (the
/// time embedding added in a ResNet block), broadcast along the last axis for the reason
/// [`group_norm_2d`] gives.
pub fn add_per_channel<B: Backend>(x: Tensor<B, 4>, v: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    (x.reshape([b * c, h * w]) + v.reshape([b * c, 1])).reshape([b, c, h, w])
}

/// `norm(x)` (torch's `layer_norm` over the last axis), with an f16 input normalised in f32 and
/// the result cast back, as PyTorch's autocast and its f16 kernels do. Burn's own LayerNorm
/// squares the centred values in the input's dtype where a backend has no fused kernel (the
/// autodiff backend, so an f16 mixed-precision training copy): one activation of 256 already
/// squares past f16's 65504, and CLIP's residual stream holds larger ones.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    if x.dtype() != DType::F16 {
        return norm.forward(x);
    }
    // A copy of the module in f32 (its epsilon is private); the casts sit in the autodiff
    // graph, so gradients still reach the f16 parameters.
    let mut f32_norm = norm.clone();
    f32_norm.gamma = f32_norm.gamma.map(|t| to_dtype(t, DType::F32));
    f32_norm.beta = f32_norm.beta.map(|b| b.map(|t| to_dtype(t, DType::F32)));
    to_dtype(f32_norm.forward(to_dtype(x, DType::F32)), DType::F16)
}
