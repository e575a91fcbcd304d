//! SiLU as one autodiff op on `Autodiff<Flex>` (its default checkpointing), for CPU training.
//!
//! Why: written as `x / (1 + e^(−x))` in tensor ops, SiLU is four graph nodes whose forward
//! and backward are element-wise passes that Flex runs on one core, its `exp` through libm
//! element by element: on the tiny fixture U-Net's training step that `exp` alone was about a
//! fifth of the time. Here the forward is `sd_kernels`' vectorised swish and the backward one
//! pass of `∂L/∂x = ∂L/∂y · σ(x)(1 + x(1 − σ(x)))`, both in parallel; the input is kept for
//! the backward (the tensor-op form keeps as much). Other backends, dtypes and checkpointing
//! strategies take the tensor ops.

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

/// `x · σ(x)` through the op of this module when `B` is `Autodiff<Flex>` and `x` is f32; `x`
/// back otherwise.
pub fn try_silu_autodiff<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<Flex>>() || x.dtype() != DType::F32 {
        return Err(x);
    }
    let Some(route) = SameType::<B::FloatTensorPrimitive, FloatTensor<Autodiff<Flex>>>::check()
    else {
        return Err(x);
    };
    let x = match x.into_primitive() {
        TensorPrimitive::Float(x) => route.to(x),
        quantized => return Err(Tensor::from_primitive(quantized)),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(
        route.back(silu_op::<D>(x)),
    )))
}

#[derive(Debug)]
struct Silu<const D: usize>;

impl<const D: usize> Backward<Flex, 1> for Silu<D> {
    /// The input.
    type State = FloatTensor<Flex>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = tensor::<D>(grads.consume::<Flex>(&ops.node));
        let Some(node) = node else {
            return;
        };
        let x = tensor::<D>(ops.state);
        let grad_x = sd_kernels::cpu::try_silu_backward(&x, &grad).unwrap_or_else(|| {
            let s = burn::tensor::activation::sigmoid(x.clone());
            grad * s.clone() * (x * (s.neg() + 1.0) + 1.0)
        });
        grads.register::<Flex>(node.id, grad_x.into_primitive().tensor());
    }
}

/// The tracked SiLU: the forward on Flex, the input kept when a gradient is wanted.
fn silu_op<const D: usize>(x: FloatTensor<Autodiff<Flex>>) -> FloatTensor<Autodiff<Flex>> {
    let forward = |x: FloatTensor<Flex>| -> FloatTensor<Flex> {
        // The input is shared with the state: the in-place kernel writes a copy.
        let y = match sd_kernels::cpu::try_swish(tensor::<D>(x), 1.0) {
            Ok(y) => y,
            Err(x) => x.clone() / (x.neg().exp() + 1.0),
        };
        y.into_primitive().tensor()
    };
    match Silu::<D>
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = x.primitive.clone();
            prep.finish(state, forward(x.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and input gradients equal those of the tensor-op form (which Burn differentiates
    /// itself), for a tensor reached through another op and used twice.
    #[test]
    fn the_op_matches_the_tensor_ops_and_their_gradients() {
        type A = Autodiff<Flex>;
        let x0 = super::super::seeded_normal::<Flex, 4>([2, 3, 17, 19], 0.0, 3.0, 1);
        let weights = super::super::seeded_normal::<A, 4>([2, 3, 17, 19], 0.5, 0.3, 2);
        let run = |fused: bool| {
            let x = Tensor::<A, 4>::from_inner(x0.clone()).require_grad();
            let h = x.clone() * 2.0;
            let y = if fused {
                try_silu_autodiff(h).expect("Autodiff<Flex> f32 takes the op")
            } else {
                h.clone() / (h.neg().exp() + 1.0)
            };
            let loss = (y.clone() * weights.clone()).sum() + y.sum();
            let grads = loss.backward();
            let grad = x.grad(&grads).expect("a gradient for x");
            (x.clone().inner(), grad)
        };
        let ((_, fused), (_, ops)) = (run(true), run(false));
        super::super::assert_close("∂x", fused, ops, 1e-5);
    }
}
