//! GEGLU as one autodiff op on `Autodiff<Flex>` (its default checkpointing), for CPU training.
//!
//! Why: in tensor ops GEGLU is two slices of the projection (strided views), an erf-based GELU
//! and a product: Flex runs element-wise ops on strided views one element at a time on one
//! core (libm's `erff` and `expf` for the GELU and its derivative), and the backward adds the
//! two halves' gradients into a zeroed tensor of the projection's shape. On the shapes
//! model's training step (batch 32, U-Net and text encoder) that was about a tenth of the
//! main thread's time. Here the forward is `sd_kernels`' vectorised GEGLU and the backward one
//! parallel pass writing both halves of `∂L/∂projection` (see
//! `sd_kernels::cpu::vector::geglu_backward_rows`); the projection is kept for the backward
//! (the tensor-op form keeps as much). Other backends, dtypes and checkpointing strategies
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

/// `h ⊙ GELU(g)` for `[h, g]` the halves of `projected`'s last axis, through the op of this
/// module when `B` is `Autodiff<Flex>` and `projected` is f32 with an even last axis;
/// `projected` back otherwise.
pub fn try_geglu_autodiff<B: Backend>(
    projected: Tensor<B, 3>,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<Flex>>()
        || projected.dtype() != DType::F32
        || !projected.dims()[2].is_multiple_of(2)
    {
        return Err(projected);
    }
    let Some(route) = SameType::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Flex>>>::check()
    else {
        return Err(projected);
    };
    let projected = match projected.into_primitive() {
        TensorPrimitive::Float(x) => route.to(x),
        quantized => return Err(Tensor::from_primitive(quantized)),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(
        route.back(geglu_op(projected)),
    )))
}

/// The tensor-op form (any backend): what the kernels compute.
fn geglu_by_ops<B: Backend>(projected: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, n, two_inner] = projected.dims();
    let inner = two_inner / 2;
    let hidden = projected.clone().slice([0..b, 0..n, 0..inner]);
    let gate = projected.slice([0..b, 0..n, inner..two_inner]);
    hidden * burn::tensor::activation::gelu(gate)
}

#[derive(Debug)]
struct Geglu;

impl Backward<Flex, 1> for Geglu {
    /// The projection.
    type State = FloatTensor<Flex>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = tensor(grads.consume::<Flex>(&ops.node));
        let Some(node) = node else {
            return;
        };
        let projected = tensor(ops.state);
        let grad_projected = sd_kernels::cpu::try_geglu_backward(&projected, &grad)
            .expect("Flex f32 tensors of matching shapes take the GEGLU backward kernel");
        grads.register::<Flex>(node.id, grad_projected.into_primitive().tensor());
    }
}

/// The tracked GEGLU: the forward on Flex, the projection kept when a gradient is wanted.
fn geglu_op(projected: FloatTensor<Autodiff<Flex>>) -> FloatTensor<Autodiff<Flex>> {
    let forward = |x: FloatTensor<Flex>| -> FloatTensor<Flex> {
        let x = tensor(x);
        let y = sd_kernels::cpu::try_geglu(&x).unwrap_or_else(|| geglu_by_ops(x));
        y.into_primitive().tensor()
    };
    match Geglu
        .prepare::<NoCheckpointing>([projected.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = projected.primitive.clone();
            prep.finish(state, forward(projected.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(projected.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and input gradients equal those of the tensor-op form (which Burn differentiates
    /// itself), for a projection reached through another op and used twice. Burn's GELU uses
    /// libm's erf, the kernel an approximation to 1.5e-7, so a · GELU(g) may differ by
    /// |a| · |g| · 0.75e-7, which for a and g drawn from N(0, 3²) passes 2e-6 (CI once saw 2.06e-6
    /// on unseeded inputs against a 2e-6 tolerance). The inputs are seeded (worst here 1.8e-6 of
    /// 1 + |want|, on AVX-512) and the tolerance is 1e-5: a tanh GELU in place of erf's fails by
    /// 3.3e-3.
    #[test]
    fn the_op_matches_the_tensor_ops_and_their_gradients() {
        type A = Autodiff<Flex>;
        let x0 = super::super::seeded_normal::<Flex, 3>([2, 19, 2 * 24], 0.0, 2.0, 7);
        let weights = super::super::seeded_normal::<A, 3>([2, 19, 24], 0.5, 0.3, 8);
        let run = |fused: bool| {
            let x = Tensor::<A, 3>::from_inner(x0.clone()).require_grad();
            let h = x.clone() * 1.5;
            let y = if fused {
                try_geglu_autodiff(h.clone()).expect("Autodiff<Flex> f32 takes the op")
            } else {
                geglu_by_ops(h.clone())
            };
            let loss = (y.clone() * weights.clone()).sum() + y.clone().sum() + h.sum();
            let grads = loss.backward();
            let grad = x.grad(&grads).expect("a gradient for x");
            (y.inner(), grad)
        };
        let ((fused_y, fused), (ops_y, ops)) = (run(true), run(false));
        super::super::assert_close("value", fused_y, ops_y, 1e-5);
        super::super::assert_close("∂x", fused, ops, 1e-5);
    }
}
