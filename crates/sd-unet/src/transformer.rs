//! The U-Net's spatial transformer (diffusers `Transformer2DModel` with `BasicTransformerBlock`):
//! self-attention over the pixels, cross-attention to the text context, and a GEGLU feed-forward
//! (Rombach et al. 2022, sec. 3.3; Shazeer 2020 for GEGLU).

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use sd_core::layers::{
    geglu, group_norm, layer_norm, linear_forward, linear_from_channels, linear_to_channels,
    multi_head_attention,
};

/// Multi-head attention with separate query/key/value projections (diffusers `Attention`):
/// self-attention when no context is given, cross-attention otherwise.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// The query projection, without bias.
    pub to_q: Linear<B>,
    /// The key projection from the context, without bias.
    pub to_k: Linear<B>,
    /// The value projection from the context, without bias.
    pub to_v: Linear<B>,
    /// A list, as diffusers' `to_out` (`to_out.0`).
    pub to_out: Vec<Linear<B>>,
    /// Attention heads; they split `query_dim`.
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    /// Attention with random weights: queries of width `query_dim`, keys and values from a context
    /// of width `context_dim`.
    pub fn new(query_dim: usize, context_dim: usize, heads: usize, device: &B::Device) -> Self {
        let projection = |from| {
            LinearConfig::new(from, query_dim)
                .with_bias(false)
                .init(device)
        };
        Self {
            to_q: projection(query_dim),
            to_k: projection(context_dim),
            to_v: projection(context_dim),
            to_out: vec![LinearConfig::new(query_dim, query_dim).init(device)],
            heads,
        }
    }

    /// `x`: `[batch, tokens, dim]`; `context`: `[batch, context tokens, context dim]`.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        self.forward_with_image(x, context, None)
    }

    /// [`Attention::forward`] plus IP-Adapter's decoupled attention to image tokens, added
    /// before `to_out` (Ye et al. 2023, eq. 5).
    pub fn forward_with_image(
        &self,
        x: Tensor<B, 3>,
        context: Option<Tensor<B, 3>>,
        image: Option<(&IpAttention<B>, Tensor<B, 3>)>,
    ) -> Tensor<B, 3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = linear_forward(&self.to_q, x);
        let k = linear_forward(&self.to_k, context.clone());
        let v = linear_forward(&self.to_v, context);
        let mut out = multi_head_attention(q.clone(), k, v, self.heads, false);
        if let Some((ip, tokens)) = image {
            out = out + ip.attend(q, tokens, self.heads);
        }
        self.to_out
            .iter()
            .fold(out, |t, linear| linear_forward(linear, t))
    }
}

/// The largest GEGLU projection one feed-forward call materialises: 2²² floats (16 MiB in f32;
/// 1638 of a 512² image's first-level tokens). Chunks this size stay in the last-level cache
/// between the projection and the gating; on SD 1.5's U-Net (batch 2, Flex, 2 cores) a step took
/// 8.9 s with 2²⁴, 8.8 s with 2²², 9.1 s with 2²⁰.
const FF_CHUNK_ELEMENTS: usize = 1 << 22;

/// GEGLU feed-forward: `W₂ (h ⊙ GELU(g))` with `[h, g] = W₁ x`, 4× wide.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// diffusers' `net` list as it is keyed: the GEGLU projection (`net.0.proj`), the dropout
    /// (`net.1`, no weights; inference and our training use none) and `W₂` (`net.2`).
    pub net: (Geglu<B>, Dropout, Linear<B>),
}

/// diffusers' `GEGLU`: the projection to `[h, g]`, gated in [`FeedForward::forward`].
#[derive(Module, Debug)]
pub struct Geglu<B: Backend> {
    /// `W₁`, `dim` to twice the inner width.
    pub proj: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// A feed-forward with random weights on tokens of width `dim`.
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = 4 * dim;
        Self {
            net: (
                Geglu {
                    proj: LinearConfig::new(dim, 2 * inner).init(device),
                },
                DropoutConfig::new(0.0).init(),
                LinearConfig::new(inner, dim).init(device),
            ),
        }
    }

    /// Tokens are independent here, so long sequences go through in chunks of tokens (as
    /// diffusers' `enable_forward_chunking`), the batch's tokens taken as one run of rows: the
    /// 8×-wide intermediate of a 1024² image's 16,384 tokens would otherwise take over a
    /// gigabyte.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_in_chunks(x, FF_CHUNK_ELEMENTS)
    }

    /// [`FeedForward::forward`] with at most `max_elements` in each chunk's projection.
    pub fn forward_in_chunks(&self, x: Tensor<B, 3>, max_elements: usize) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        // All tokens of the batch as rows: chunks of rows are contiguous.
        let rows = x.reshape([1, b * n, d]);
        let chunk = (max_elements / (8 * d).max(1)).max(1);
        if chunk >= b * n {
            return self.forward_all(rows).reshape([b, n, d]);
        }
        let parts = (0..b * n)
            .step_by(chunk)
            .map(|start| self.forward_all(rows.clone().narrow(1, start, chunk.min(b * n - start))))
            .collect();
        Tensor::cat(parts, 1).reshape([b, n, d])
    }

    fn forward_all(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, _, out) = &self.net;
        linear_forward(out, geglu(linear_forward(&gate.proj, x)))
    }
}

/// IP-Adapter's image-prompt projections for one cross-attention ([`crate::IpAdapter`];
/// diffusers' `IPAdapterAttnProcessor`'s
/// `to_k_ip.0` / `to_v_ip.0`), with the scale λ and the number of image tokens at the end of the
/// context they read.
#[derive(Module, Debug)]
pub struct IpAttention<B: Backend> {
    /// The image tokens' keys, without bias.
    pub to_k_ip: Linear<B>,
    /// The image tokens' values, without bias.
    pub to_v_ip: Linear<B>,
    /// λ: how much the image prompt weighs against the text.
    pub scale: f64,
    /// The image tokens at the end of the context.
    pub tokens: usize,
}

impl<B: Backend> IpAttention<B> {
    /// The image part of the cross-attention: `Attention(q, K_ip, V_ip)` on the last
    /// [`IpAttention::tokens`] tokens of the context, times λ (before `to_out`).
    pub fn attend(
        &self,
        q: Tensor<B, 3>,
        image_tokens: Tensor<B, 3>,
        heads: usize,
    ) -> Tensor<B, 3> {
        let k = linear_forward(&self.to_k_ip, image_tokens.clone());
        let v = linear_forward(&self.to_v_ip, image_tokens);
        multi_head_attention(q, k, v, heads, false) * self.scale
    }
}

/// Pre-norm self-attention, cross-attention and feed-forward, each with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    /// The LayerNorm before self-attention.
    pub norm1: LayerNorm<B>,
    /// Self-attention over the tokens.
    pub attn1: Attention<B>,
    /// The LayerNorm before cross-attention.
    pub norm2: LayerNorm<B>,
    /// Cross-attention to the text context.
    pub attn2: Attention<B>,
    /// The LayerNorm before the feed-forward.
    pub norm3: LayerNorm<B>,
    /// The GEGLU feed-forward.
    pub ff: FeedForward<B>,
    /// IP-Adapter's image-prompt projections for `attn2`, when an adapter is attached
    /// ([`crate::UNet2DConditionModel::with_ip_adapter`]): the context's last tokens are then
    /// the image prompt's.
    pub ip: Option<IpAttention<B>>,
    /// `only_cross_attention`: `attn1` attends to the context too, not to the tokens.
    only_cross: bool,
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// A block with random weights on tokens of width `dim`, attending to a context of width
    /// `context_dim` (with `only_cross`, in its first attention as well).
    pub fn new(
        dim: usize,
        heads: usize,
        context_dim: usize,
        only_cross: bool,
        device: &B::Device,
    ) -> Self {
        let norm = || LayerNormConfig::new(dim).with_epsilon(1e-5).init(device);
        let attn1_context = if only_cross { context_dim } else { dim };
        Self {
            norm1: norm(),
            attn1: Attention::new(dim, attn1_context, heads, device),
            norm2: norm(),
            attn2: Attention::new(dim, context_dim, heads, device),
            norm3: norm(),
            ff: FeedForward::new(dim, device),
            ip: None,
            only_cross,
        }
    }

    /// `x`: `[batch, tokens, dim]`; `context`: `[batch, context tokens, context_dim]`. Same shape
    /// out.
    pub fn forward(&self, x: Tensor<B, 3>, context: Tensor<B, 3>) -> Tensor<B, 3> {
        // With an IP-Adapter the context is `[text; image tokens]` (the U-Net appends them).
        let (context, image) = match &self.ip {
            Some(ip) => {
                let [_, n, _] = context.dims();
                let text = n.saturating_sub(ip.tokens);
                let image = context.clone().narrow(1, text, n - text);
                (context.narrow(1, 0, text), Some((ip, image)))
            }
            None => (context, None),
        };
        let first = self.only_cross.then(|| context.clone());
        let x = self
            .attn1
            .forward(layer_norm(&self.norm1, x.clone()), first)
            + x;
        let x =
            self.attn2
                .forward_with_image(layer_norm(&self.norm2, x.clone()), Some(context), image)
                + x;
        self.ff.forward(layer_norm(&self.norm3, x.clone())) + x
    }
}

/// GroupNorm, a projection to tokens, transformer blocks, a projection back, and a residual
/// (diffusers `Transformer2DModel`). `proj_in`/`proj_out` are linear layers: the 1×1
/// convolutions of SD 1.x checkpoints load into them, since on tokens they are the same map.
#[derive(Module, Debug)]
pub struct Transformer2d<B: Backend> {
    /// The GroupNorm in front (epsilon 1e-6).
    pub norm: GroupNorm<B>,
    /// The projection of the pixels into tokens.
    pub proj_in: Linear<B>,
    /// The transformer blocks (more than one in SDXL's deeper levels).
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// The projection of the tokens back onto the channels.
    pub proj_out: Linear<B>,
}

impl<B: Backend> Transformer2d<B> {
    /// A transformer with random weights on `channels` channels, with `layers` blocks of `heads`
    /// heads attending to a context of width `context_dim` (`only_cross`: in both attentions).
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        only_cross: bool,
        groups: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            norm: group_norm(groups, channels, 1e-6, device),
            proj_in: LinearConfig::new(channels, channels).init(device),
            transformer_blocks: (0..layers)
                .map(|_| {
                    BasicTransformerBlock::new(channels, heads, context_dim, only_cross, device)
                })
                .collect(),
            proj_out: LinearConfig::new(channels, channels).init(device),
        }
    }

    /// `x`: `[batch, channels, h, w]`; `context`: `[batch, context tokens, context_dim]`. Same
    /// shape out.
    pub fn forward(&self, x: Tensor<B, 4>, context: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let normed = sd_core::layers::group_norm_2d(&self.norm, x.clone()).reshape([b, c, h * w]);
        // Into tokens and back with the projections reading and writing channels-first maps.
        let tokens = linear_from_channels(&self.proj_in, normed);
        let tokens = self
            .transformer_blocks
            .iter()
            .fold(tokens, |t, block| block.forward(t, context.clone()));
        linear_to_channels(&self.proj_out, tokens, x.reshape([b, c, h * w])).reshape([b, c, h, w])
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use sd_core::backend::Flex;

    use super::FeedForward;

    #[test]
    fn chunked_feed_forward_is_the_same() {
        let device = Default::default();
        let ff = FeedForward::<Flex>::new(16, &device);
        let x = Tensor::<Flex, 3>::random([2, 37, 16], Distribution::Normal(0.0, 1.0), &device);
        let whole = ff.forward_in_chunks(x.clone(), usize::MAX);
        // 2·8·16 = 256 elements per token: chunks of 5 tokens.
        let chunked = ff.forward_in_chunks(x, 256 * 5);
        let diff: f32 = (whole - chunked).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
    }
}
