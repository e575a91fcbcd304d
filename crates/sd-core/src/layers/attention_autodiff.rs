//! Multi-head attention as one autodiff op on `Autodiff<Flex>` (its default checkpointing),
//! for CPU training.
//!
//! Why: in Burn ops, training attention splits the heads (permuted copies), multiplies, scales
//! and softmaxes in element-wise passes on one core, and differentiates every one of those
//! nodes again; on the shapes model's training step that was about a fifth of the main
//! thread's time. Here the forward is `sd_kernels`' training attention (token-major tensors,
//! heads read in place, the softmax probabilities kept) and the backward one parallel pass
//! per image and head (`sd_kernels::cpu::attention_train`). The probabilities are what the
//! tensor-op form keeps too; attentions whose probabilities exceed
//! `attention_train::MAX_PROBABILITIES`, other backends, dtypes and checkpointing strategies
//! take the tensor ops.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use sd_kernels::route::SameType;

use super::flex_tensor as tensor;

/// `multi_head_attention(q, k, v, heads, causal)` through the op of this module when `B` is
/// `Autodiff<Flex>`, the tensors are f32 and the kernel takes their sizes; the inputs back
/// otherwise.
#[allow(clippy::type_complexity)]
pub fn try_attention_autodiff<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>)> {
    let f32s = [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32);
    let route = SameType::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Flex>>>::check();
    let (true, true, Some(route)) = (
        TypeId::of::<B>() == TypeId::of::<Autodiff<Flex>>(),
        f32s,
        route,
    ) else {
        return Err((q, k, v));
    };
    let primitive = |t: Tensor<B, 3>| route.to(t.into_primitive().tensor());
    let (qp, kp, vp) = (
        primitive(q.clone()),
        primitive(k.clone()),
        primitive(v.clone()),
    );
    match attention_op(qp, kp, vp, heads, causal) {
        Some(out) => Ok(Tensor::from_primitive(TensorPrimitive::Float(
            route.back(out),
        ))),
        None => Err((q, k, v)),
    }
}

#[derive(Debug)]
struct Attention;

impl Backward<Flex, 3> for Attention {
    /// q, k, v, the probabilities and the heads.
    type State = (
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        usize,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = tensor::<3>(grads.consume::<Flex>(&ops.node));
        let (q, k, v, probs, heads) = ops.state;
        let (q, k, v, probs) = (
            tensor::<3>(q),
            tensor::<3>(k),
            tensor::<3>(v),
            tensor::<4>(probs),
        );
        let [dq, dk, dv] =
            sd_kernels::cpu::try_attention_train_backward([&q, &k, &v], &probs, &grad, heads)
                .expect("the forward's sizes and dtypes take the backward kernel");
        for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// The tracked attention, or `None` when the kernel does not take these sizes.
fn attention_op(
    q: FloatTensor<Autodiff<Flex>>,
    k: FloatTensor<Autodiff<Flex>>,
    v: FloatTensor<Autodiff<Flex>>,
    heads: usize,
    causal: bool,
) -> Option<FloatTensor<Autodiff<Flex>>> {
    let (qi, ki, vi) = (
        tensor::<3>(q.primitive.clone()),
        tensor::<3>(k.primitive.clone()),
        tensor::<3>(v.primitive.clone()),
    );
    let (out, probs) = sd_kernels::cpu::try_attention_train_forward(&qi, &ki, &vi, heads, causal)?;
    let out = out.into_primitive().tensor();
    Some(
        match Attention
            .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    q.primitive,
                    k.primitive,
                    v.primitive,
                    probs.into_primitive().tensor(),
                    heads,
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and the gradients of q, k and v equal those of the tensor-op form (heads split,
    /// Burn's attention, which Burn differentiates itself), with and without the causal mask,
    /// for a key reached through another op and used twice.
    #[test]
    fn the_op_matches_the_tensor_ops_and_their_gradients() {
        type A = Autodiff<Flex>;
        let (b, heads, d) = (2, 3, 4);
        for (seed, (lq, lk, causal)) in [(5, 7, false), (6, 6, true)].into_iter().enumerate() {
            let seed = 10 * seed as u64;
            let q0 = super::super::seeded_normal::<Flex, 3>([b, lq, heads * d], 0.0, 1.0, seed);
            let k0 = super::super::seeded_normal::<Flex, 3>([b, lk, heads * d], 0.0, 1.0, seed + 1);
            let v0 = super::super::seeded_normal::<Flex, 3>([b, lk, heads * d], 0.0, 1.0, seed + 2);
            let w = super::super::seeded_normal::<A, 3>([b, lq, heads * d], 0.5, 0.3, seed + 3);
            let run = |fused: bool| {
                let q = Tensor::<A, 3>::from_inner(q0.clone()).require_grad();
                let k = Tensor::<A, 3>::from_inner(k0.clone()).require_grad();
                let v = Tensor::<A, 3>::from_inner(v0.clone()).require_grad();
                let k2 = k.clone() * 1.5;
                let out = if fused {
                    try_attention_autodiff(q.clone(), k2.clone(), v.clone(), heads, causal)
                        .unwrap_or_else(|_| panic!("Autodiff<Flex> f32 takes the op"))
                } else {
                    let split = |t: Tensor<A, 3>| {
                        let [_, len, width] = t.dims();
                        t.reshape([b, len, heads, width / heads]).swap_dims(1, 2)
                    };
                    let o = if causal {
                        super::super::causal_attention(
                            split(q.clone()),
                            split(k2.clone()),
                            split(v.clone()),
                        )
                    } else {
                        super::super::scaled_dot_product_attention(
                            split(q.clone()),
                            split(k2.clone()),
                            split(v.clone()),
                        )
                    };
                    o.swap_dims(1, 2).reshape([b, lq, heads * d])
                };
                let loss = (out.clone() * w.clone()).sum() + k2.sum();
                let grads = loss.backward();
                let g = |t: &Tensor<A, 3>| t.grad(&grads).expect("a gradient");
                [out.inner(), g(&q), g(&k), g(&v)]
            };
            let (fused, ops) = (run(true), run(false));
            for (what, (a, b)) in ["output", "∂q", "∂k", "∂v"]
                .iter()
                .zip(fused.into_iter().zip(ops))
            {
                super::super::assert_close(&format!("causal {causal}: {what}"), a, b, 1e-5);
            }
        }
    }
}
