use burn::nn::{GroupNorm, GroupNormConfig};
use burn::tensor::backend::Backend;

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
