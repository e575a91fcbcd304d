//! GroupNorm as one autodiff op on `Autodiff<Flex>` (its default checkpointing), for CPU
//! training.
//!
//! Why: in tensor ops a GroupNorm is about a dozen graph nodes (reshapes, two reductions, the
//! centring, the variance, the square root, the division, the broadcast scale and shift),
//! each an element-wise pass that Flex runs on one core, forward and again backward. Here the
//! forward is `sd_kernels`' GroupNorm (two passes per group, in parallel), keeping the
//! per-group mean and `1/σ`, and the backward two passes per group
//! (`sd_kernels::cpu::norm::group_norm_backward`). The input is kept for the backward (the
//! tensor-op form keeps several tensors of its size). Norms without an affine part, other
//! backends, dtypes and checkpointing strategies take the tensor ops.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use sd_kernels::route::SameType;

use super::flex_tensor as tensor;

/// `norm.forward(x)` through the op of this module when `B` is `Autodiff<Flex>`, `x` is f32
/// and the norm has its scale and shift; `x` back otherwise.
pub fn try_group_norm_autodiff<B: Backend>(
    norm: &GroupNorm<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let route = SameType::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Flex>>>::check();
    let (true, DType::F32, Some(route), Some(gamma), Some(beta)) = (
        TypeId::of::<B>() == TypeId::of::<Autodiff<Flex>>() && norm.num_channels == x.dims()[1],
        x.dtype(),
        route,
        &norm.gamma,
        &norm.beta,
    ) else {
        return Err(x);
    };
    if gamma.val().dtype() != DType::F32 || beta.val().dtype() != DType::F32 {
        return Err(x);
    }
    let primitive = |t: FloatTensor<B>| route.to(t);
    let inputs = [
        primitive(x.clone().into_primitive().tensor()),
        primitive(gamma.val().into_primitive().tensor()),
        primitive(beta.val().into_primitive().tensor()),
    ];
    match group_norm_op(inputs, norm.num_groups, norm.epsilon as f32) {
        Some(out) => Ok(Tensor::from_primitive(TensorPrimitive::Float(
            route.back(out),
        ))),
        None => Err(x),
    }
}

#[derive(Debug)]
struct GroupNormOp;

impl Backward<Flex, 3> for GroupNormOp {
    /// The input, γ, the per-group statistics and the groups.
    type State = (
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        usize,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = tensor::<4>(grads.consume::<Flex>(&ops.node));
        let (x, gamma, stats, groups) = ops.state;
        let (x, gamma, stats) = (tensor::<4>(x), tensor::<1>(gamma), tensor::<2>(stats));
        let (dx, params) =
            sd_kernels::cpu::try_group_norm_backward(&x, &stats, Some(&gamma), &grad, groups)
                .expect("the forward's sizes and dtypes take the backward kernel");
        let (dgamma, dbeta) = params.expect("γ was given");
        let [node_x, node_gamma, node_beta] = ops.parents;
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx.into_primitive().tensor());
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, dgamma.into_primitive().tensor());
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, dbeta.into_primitive().tensor());
        }
    }
}

/// The tracked GroupNorm, or `None` when the kernel does not take these sizes.
fn group_norm_op(
    [x, gamma, beta]: [FloatTensor<Autodiff<Flex>>; 3],
    groups: usize,
    eps: f32,
) -> Option<FloatTensor<Autodiff<Flex>>> {
    let (xi, gi, bi) = (
        tensor::<4>(x.primitive.clone()),
        tensor::<1>(gamma.primitive.clone()),
        tensor::<1>(beta.primitive.clone()),
    );
    let (out, stats) = sd_kernels::cpu::try_group_norm_train(&xi, Some((&gi, &bi)), groups, eps)?;
    let out = out.into_primitive().tensor();
    Some(
        match GroupNormOp
            .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    x.primitive,
                    gamma.primitive,
                    stats.into_primitive().tensor(),
                    groups,
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
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;

    /// Values and the gradients of the input, γ and β equal those of the tensor-op form
    /// (`group_norm_2d`'s, which Burn differentiates itself), for an input reached through
    /// another op and used twice.
    #[test]
    fn the_op_matches_the_tensor_ops_and_their_gradients() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let x0 = super::super::seeded_normal::<Flex, 4>([2, 8, 5, 7], 0.5, 2.0, 3);
        let w = super::super::seeded_normal::<A, 4>([2, 8, 5, 7], 0.5, 0.3, 4);
        let norm: GroupNorm<A> = GroupNormConfig::new(4, 8).init(&device);
        let norm = GroupNorm {
            gamma: norm
                .gamma
                .map(|p| p.map(|g| (g.random_like(Distribution::Normal(1.0, 0.5))).require_grad())),
            beta: norm
                .beta
                .map(|p| p.map(|b| (b.random_like(Distribution::Normal(0.0, 0.5))).require_grad())),
            ..norm
        };
        let run = |fused: bool| {
            let x = Tensor::<A, 4>::from_inner(x0.clone()).require_grad();
            let h = x.clone() * 1.5;
            let y = if fused {
                try_group_norm_autodiff(&norm, h.clone()).expect("Autodiff<Flex> f32 takes the op")
            } else {
                super::super::norm::group_norm_by_ops(&norm, h.clone())
            };
            let loss = (y.clone() * w.clone()).sum() + h.sum();
            let grads = loss.backward();
            let gamma = norm.gamma.as_ref().unwrap().val();
            let beta = norm.beta.as_ref().unwrap().val();
            (
                [y.inner(), x.grad(&grads).expect("∂x")],
                [
                    gamma.grad(&grads).expect("∂γ"),
                    beta.grad(&grads).expect("∂β"),
                ],
            )
        };
        let (fused, ops) = (run(true), run(false));
        for (what, (a, b)) in ["output", "∂x"].iter().zip(fused.0.into_iter().zip(ops.0)) {
            super::super::assert_close(what, a, b, 2e-5);
        }
        for (what, (a, b)) in ["∂γ", "∂β"].iter().zip(fused.1.into_iter().zip(ops.1)) {
            super::super::assert_close(what, a, b, 2e-5);
        }
    }
}
