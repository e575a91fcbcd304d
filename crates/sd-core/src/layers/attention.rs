use burn::module::Module;
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::group_norm;

/// Scaled dot-product attention, `softmax(q kᵀ / sqrt(d)) v` (Vaswani et al. 2017, eq. 1).
///
/// `q`: `[batch, heads, len_q, d]`, `k`/`v`: `[batch, heads, len_k, d]`. Goes through Burn's
/// `attention` op, which backends with a fused kernel (Flex's tiled online-softmax kernel, the
/// CubeCL flash kernels on CUDA and WGPU) accelerate, and which autodiff differentiates through
/// its reference decomposition.
///
/// Backends without a fused kernel (and autodiff, which differentiates the reference form)
/// materialise the `[batch, heads, len_q, len_k]` score matrix: for a 512² image's 4096-token
/// self-attention that is 8 × 4096² floats per image. Queries are therefore processed in chunks
/// that keep each score block under [`MAX_SCORES`] elements; every chunk attends to all keys, so
/// the result is the same.
pub fn scaled_dot_product_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    chunked_attention(q, k, v, MAX_SCORES)
}

/// Causal self-attention (each position attends to itself and earlier ones), for text
/// encoders' short sequences: Burn's `attention` with `is_causal`.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let options = AttentionModuleOptions {
        is_causal: true,
        ..AttentionModuleOptions::default()
    };
    attention(q, k, v, None, None, options)
}

/// Multi-head attention on token-major tensors: `q`: `[batch, len_q, heads · d]`, `k`:
/// `[batch, len_k, heads · d]`, `v`: `[batch, len_k, heads · d_v]` (as the projections write
/// them); returns `[batch, len_q, heads · d_v]`. With `causal`, query `i` sees keys up to `i`.
///
/// On Flex with f32 tensors this is one fused kernel (`crate::cpu`) that reads the heads in
/// place; elsewhere (other backends, half precision, autodiff) the heads are split out and go
/// through [`scaled_dot_product_attention`] or [`causal_attention`].
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_attention(&q, &k, &v, heads, causal) {
        return out;
    }
    #[cfg(all(feature = "autodiff", feature = "flex"))]
    let (q, k, v) = match super::attention_autodiff::try_attention_autodiff(q, k, v, heads, causal)
    {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    let [b, lq, _] = q.dims();
    let split = |t: Tensor<B, 3>| {
        let [_, len, width] = t.dims();
        t.reshape([b, len, heads, width / heads]).swap_dims(1, 2)
    };
    let (q, k, v) = (split(q), split(k), split(v));
    let out = if causal {
        causal_attention(q, k, v)
    } else {
        scaled_dot_product_attention(q, k, v)
    };
    let [_, _, _, dv] = out.dims();
    out.swap_dims(1, 2).reshape([b, lq, heads * dv])
}

/// The largest score block one attention call materialises: 2²⁵ floats, 128 MiB in f32.
pub const MAX_SCORES: usize = 1 << 25;

/// [`scaled_dot_product_attention`] with queries split so that no chunk's score block exceeds
/// `max_scores` elements.
pub fn chunked_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    max_scores: usize,
) -> Tensor<B, 4> {
    match split_heads_across_threads(&q, &k, &v, max_scores) {
        Some(out) => out,
        None => chunked_attention_one_thread(q, k, v, max_scores),
    }
}

/// Score blocks at least this large are worth spreading over threads.
const THREADED_SCORES: usize = 1 << 18;

/// Flex's attention kernel runs each call on one thread: on that backend, large attentions
/// (a 512² image's 4096-token self-attention) are split by heads into one call per core, run
/// side by side. Other backends (their kernels are parallel; autodiff records one graph) and
/// small attentions take the single call.
fn split_heads_across_threads<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    max_scores: usize,
) -> Option<Tensor<B, 4>> {
    let [_, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    if B::name(&q.device()) != "flex" || h < 2 || lq * lk < THREADED_SCORES {
        return None;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(h);
    if threads < 2 {
        return None;
    }
    let per = h.div_ceil(threads);
    let parts: Vec<Tensor<B, 4>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..h)
            .step_by(per)
            .map(|start| {
                let len = per.min(h - start);
                let (q, k, v) = (
                    q.clone().narrow(1, start, len),
                    k.clone().narrow(1, start, len),
                    v.clone().narrow(1, start, len),
                );
                // The parts run at once: together they keep the caller's bound on the scores.
                let bound = (max_scores / threads).max(1);
                scope.spawn(move || chunked_attention_one_thread(q, k, v, bound))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("an attention thread panicked"))
            .collect()
    });
    Some(Tensor::cat(parts, 1))
}

/// [`chunked_attention`] without the split across threads.
fn chunked_attention_one_thread<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    max_scores: usize,
) -> Tensor<B, 4> {
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    let chunk = (max_scores / (b * h * lk).max(1)).max(1);
    if chunk >= lq {
        return attention(q, k, v, None, None, AttentionModuleOptions::default());
    }
    let parts = (0..lq)
        .step_by(chunk)
        .map(|start| {
            let len = chunk.min(lq - start);
            attention(
                q.clone().narrow(2, start, len),
                k.clone(),
                v.clone(),
                None,
                None,
                AttentionModuleOptions::default(),
            )
        })
        .collect();
    Tensor::cat(parts, 2)
}

/// Configuration of an [`AttentionBlock2d`].
#[derive(Debug, Clone)]
pub struct AttentionBlock2dConfig {
    /// Channels of the feature map, and the width of every projection.
    pub channels: usize,
    /// Channels per head; the VAE uses one head as wide as the block.
    pub head_dim: usize,
    /// Groups of the GroupNorm in front.
    pub groups: usize,
    /// The GroupNorm's epsilon.
    pub eps: f64,
}

impl AttentionBlock2dConfig {
    /// The block with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> AttentionBlock2d<B> {
        let c = self.channels;
        let linear = || LinearConfig::new(c, c).init(device);
        AttentionBlock2d {
            group_norm: group_norm(self.groups, c, self.eps, device),
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: vec![linear()],
            heads: (c / self.head_dim.max(1)).max(1),
        }
    }
}

/// Self-attention over the pixels of a feature map, with a GroupNorm in front and a residual
/// connection around it: the VAE's mid-block attention (diffusers `Attention` with
/// `residual_connection=True`). `to_out` is a list, as in diffusers (`to_out.0`).
#[derive(Module, Debug)]
pub struct AttentionBlock2d<B: Backend> {
    /// The GroupNorm in front of the projections.
    pub group_norm: GroupNorm<B>,
    /// The query projection.
    pub to_q: Linear<B>,
    /// The key projection.
    pub to_k: Linear<B>,
    /// The value projection.
    pub to_v: Linear<B>,
    /// The output projection, as diffusers' one-element list (`to_out.0`).
    pub to_out: Vec<Linear<B>>,
    /// Attention heads: `channels / head_dim`, at least 1.
    pub heads: usize,
}

impl<B: Backend> AttentionBlock2d<B> {
    /// `x`: `[batch, channels, h, w]`; returns `x` plus the attention over its pixels, same shape.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let heads = self.heads;
        // The projections read the normalised map and write back onto `x` channels-first, as
        // the U-Net's spatial transformer does.
        let normed = super::group_norm_2d(&self.group_norm, x.clone()).reshape([b, c, h * w]);
        let q = super::linear_from_channels(&self.to_q, normed.clone());
        let k = super::linear_from_channels(&self.to_k, normed.clone());
        let v = super::linear_from_channels(&self.to_v, normed);
        let attended = multi_head_attention(q, k, v, heads, false);
        let residual = x.reshape([b, c, h * w]);
        let out = match self.to_out.split_last() {
            Some((last, rest)) => {
                let t = rest
                    .iter()
                    .fold(attended, |t, linear| super::linear_forward(linear, t));
                super::linear_to_channels(last, t, residual)
            }
            None => attended.swap_dims(1, 2) + residual,
        };
        out.reshape([b, c, h, w])
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::backend::Flex;

    #[test]
    fn chunked_queries_give_the_same_attention() {
        let device = Default::default();
        let q = Tensor::<Flex, 4>::random([2, 3, 37, 8], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<Flex, 4>::random([2, 3, 21, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<Flex, 4>::random([2, 3, 21, 8], Distribution::Normal(0.0, 1.0), &device);
        let whole = chunked_attention(q.clone(), k.clone(), v.clone(), usize::MAX);
        // 2·3·21 scores per query: chunks of 5 queries.
        let chunked = chunked_attention(q, k, v, 2 * 3 * 21 * 5);
        let diff: f32 = (whole - chunked).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
    }

    /// Large attentions on Flex are split by heads across threads: the same numbers as the
    /// single call, and as the plain softmax(q kᵀ/√d) v.
    #[test]
    fn heads_split_across_threads_give_the_same_attention() {
        let device = Default::default();
        let shape = [1, 3, 1024, 8];
        let q = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let split = split_heads_across_threads(&q, &k, &v, MAX_SCORES);
        let single = chunked_attention_one_thread(q.clone(), k.clone(), v.clone(), MAX_SCORES);
        let scores = q.matmul(k.swap_dims(2, 3)) / (8f64).sqrt();
        let plain = burn::tensor::activation::softmax(scores, 3).matmul(v);
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            let split = split.expect("split on a multi-core machine");
            let diff: f32 = (split - single.clone()).abs().max().into_scalar();
            assert!(diff < 1e-6, "{diff}");
        }
        let diff: f32 = (single - plain).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }
}
