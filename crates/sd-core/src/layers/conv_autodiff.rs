//! A 2-D convolution as one autodiff op with its own backward, for `Autodiff<Flex>` and
//! `Autodiff<NdArray>` (CPU training).
//!
//! Why: Burn's autodiff `conv2d` computes the input gradient with `conv_transpose2d` and the
//! weight gradient with a convolution of the input by the output gradient (batch and channel
//! axes swapped). On Flex the first is a naive single-threaded loop and the second a
//! convolution with a huge kernel and a 3×3 output, behind strided element-by-element copies
//! of the swapped tensors: together about 2.5 times the forward's time. Here:
//!
//! - forward: `conv_train`'s sum of per-tap matmuls on views of the padded input, on the
//!   inner backend (no graph nodes), which on Flex took about half the time of its `conv2d`
//!   (an im2col per 512-pixel tile and a gemm per tile, much of it spent packing operands);
//!   the padded input is kept for the weight gradient in place of the input;
//! - input gradient: a stride-1 convolution of the output gradient (zero-padded by
//!   `k − 1 − padding`, cropped where that is negative) with the kernel flipped in space and
//!   transposed in channels, `∂L/∂x[r] = Σᵢ W[i] · ∂L/∂y[r − i]`, computed like the forward;
//! - weight gradient: for each kernel tap `(i, j)`, one batched matmul of the output gradient
//!   (widened to the phase width) by the tap's input slice, transposed (the im2col layout of
//!   `conv_train`, whose taps are views of the padded input: no im2col copy), summed over the
//!   batch;
//! - bias gradient: the output gradient summed over batch and pixels.
//!
//! Stride-1 convolutions only (nearly all of the VAE's and U-Net's): for a stride `s` the
//! input gradient as a convolution would multiply a gradient spread out with `s² − 1` zeros
//! in every `s²` pixels, and `conv_train`'s differentiable path is faster there.
//!
//! The results are the exact gradients (the same sums in another order); the unit tests in
//! `conv_train` compare them with Burn's. Other autodiff backends take `conv_train`'s path,
//! written in differentiable tensor ops.

use std::any::TypeId;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use sd_kernels::route::SameType;

use super::conv_train::{Geometry, conv_by_taps, conv_by_taps_padded, zero_pad_columns};

/// `conv.forward(x)` through the op of this module when `B` is `Autodiff<Flex>` or
/// `Autodiff<NdArray>` (with their default checkpointing) and the convolution fits
/// [`Geometry`]; `x` back otherwise.
pub fn try_conv2d_autodiff<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    #[cfg(feature = "flex")]
    let x = match on_inner::<B, burn::backend::Flex>(conv, x) {
        Ok(out) => return Ok(out),
        Err(x) => x,
    };
    #[cfg(feature = "ndarray")]
    let x = match on_inner::<B, burn::backend::NdArray>(conv, x) {
        Ok(out) => return Ok(out),
        Err(x) => x,
    };
    Err(x)
}

/// Whether the op runs on `sd_kernels`' `conv_taps` (`Autodiff<Flex>`, f32), which beats
/// Burn's convolution at every size; in tensor ops it does only from `conv_train`'s smallest
/// output up.
pub fn runs_kernels<B: Backend>(x: &Tensor<B, 4>) -> bool {
    #[cfg(feature = "flex")]
    {
        TypeId::of::<B>() == TypeId::of::<Autodiff<burn::backend::Flex>>()
            && x.dtype() == burn::tensor::DType::F32
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = x;
        false
    }
}

/// The op for `B = Autodiff<I>`; `x` back for any other `B`.
fn on_inner<B: Backend, I: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I>>() {
        return Err(x);
    }
    let Some(route) = SameType::<B::FloatTensorPrimitive, FloatTensor<Autodiff<I>>>::check() else {
        return Err(x);
    };
    let Some(geometry) = Geometry::new(conv, x.dims()).filter(|g| InputGrad::new(g).is_some())
    else {
        return Err(x);
    };
    let x = match x.into_primitive() {
        TensorPrimitive::Float(x) => route.to(x),
        quantized => return Err(Tensor::from_primitive(quantized)),
    };
    let weight = route.to(conv.weight.val().into_primitive().tensor());
    let bias = conv
        .bias
        .as_ref()
        .map(|b| route.to(b.val().into_primitive().tensor()));
    let out = conv2d_op::<I>(x, weight, bias, geometry);
    Ok(Tensor::from_primitive(TensorPrimitive::Float(
        route.back(out),
    )))
}

/// A `Tensor` around an inner primitive.
fn tensor<I: Backend, const D: usize>(primitive: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The tracked convolution: its forward on the inner backend, and the backward of the
/// module notes registered for the inputs that need gradients.
fn conv2d_op<I: Backend>(
    x: FloatTensor<Autodiff<I>>,
    weight: FloatTensor<Autodiff<I>>,
    bias: Option<FloatTensor<Autodiff<I>>>,
    geometry: Geometry,
) -> FloatTensor<Autodiff<I>> {
    #[derive(Debug)]
    struct WithBias;
    #[derive(Debug)]
    struct NoBias;

    impl<I: Backend> Backward<I, 3> for WithBias {
        type State = (FloatTensor<I>, NodeId, Geometry);

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight, node_bias] = ops.parents;
            let grad = tensor::<I, 4>(grads.consume::<I>(&ops.node));
            let (padded, weight, geometry) = ops.state;
            input_and_weight_grads::<I>(
                [node_x, node_weight, node_bias].map(|n| n.map(|n| n.id)),
                (tensor(padded), weight),
                grad,
                &geometry,
                grads,
                checkpointer,
            );
        }
    }

    impl<I: Backend> Backward<I, 2> for NoBias {
        type State = (FloatTensor<I>, NodeId, Geometry);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight] = ops.parents;
            let grad = tensor::<I, 4>(grads.consume::<I>(&ops.node));
            let (padded, weight, geometry) = ops.state;
            input_and_weight_grads::<I>(
                [node_x.map(|n| n.id), node_weight.map(|n| n.id), None],
                (tensor(padded), weight),
                grad,
                &geometry,
                grads,
                checkpointer,
            );
        }
    }

    // The forward, and the padded input it multiplies, kept for the weight gradient (about
    // the input's size: Burn's conv keeps the input itself).
    let forward = |x: FloatTensor<I>, weight: FloatTensor<I>, bias: Option<FloatTensor<I>>| {
        #[cfg(feature = "flex")]
        if let Some((padded, out)) = sd_kernels::cpu::try_conv_taps_forward(
            &tensor::<I, 4>(x.clone()),
            &tensor(weight.clone()),
            bias.clone().map(tensor).as_ref(),
            tap_conv(&geometry),
        ) {
            return (
                padded.into_primitive().tensor(),
                out.into_primitive().tensor(),
            );
        }
        let padded = geometry.padded(tensor::<I, 4>(x));
        let out = conv_by_taps_padded(&padded, tensor(weight), bias.map(tensor), &geometry);
        (
            padded.into_primitive().tensor(),
            out.into_primitive().tensor(),
        )
    };
    type C = NoCheckpointing;
    match bias {
        Some(bias) => match WithBias
            .prepare::<C>([x.node.clone(), weight.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let weight_state = prep.checkpoint(&weight);
                let (padded, out) = forward(x.primitive, weight.primitive, Some(bias.primitive));
                prep.finish((padded, weight_state, geometry), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(x.primitive, weight.primitive, Some(bias.primitive)).1)
            }
        },
        None => match NoBias
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let weight_state = prep.checkpoint(&weight);
                let (padded, out) = forward(x.primitive, weight.primitive, None);
                prep.finish((padded, weight_state, geometry), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, weight.primitive, None).1),
        },
    }
}

/// The sizes [`sd_kernels::cpu::conv_taps`] works with: a stride-1 `geometry`'s (its padded
/// planes are the same `phase_h × phase_w`).
#[cfg(feature = "flex")]
fn tap_conv(g: &Geometry) -> sd_kernels::cpu::TapConv {
    sd_kernels::cpu::TapConv {
        batch: g.batch,
        channels: g.channels,
        out_channels: g.out_channels,
        height: g.height,
        width: g.width,
        kernel: g.kernel,
        padding: g.padding,
    }
}

/// Registers the input's, the weight's and the bias's gradients, for those that need one.
fn input_and_weight_grads<I: Backend>(
    [node_x, node_weight, node_bias]: [Option<NodeId>; 3],
    (padded, weight): (Tensor<I, 2>, NodeId),
    grad: Tensor<I, 4>,
    geometry: &Geometry,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let weight =
        node_x.map(|_| tensor::<I, 4>(checkpointer.retrieve_node_output::<FloatTensor<I>>(weight)));
    // On Flex: the kernels' backward, each product accumulated into its gradient.
    #[cfg(feature = "flex")]
    if let Some(out) = sd_kernels::cpu::try_conv_taps_backward(
        &padded,
        weight.as_ref(),
        &grad,
        tap_conv(geometry),
        [node_x, node_weight, node_bias].map(|n| n.is_some()),
    ) {
        let pairs = [
            (node_x, out.x.map(|t| t.into_primitive().tensor())),
            (node_weight, out.weight.map(|t| t.into_primitive().tensor())),
            (node_bias, out.bias.map(|t| t.into_primitive().tensor())),
        ];
        for (node, grad) in pairs {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<I>(node, grad);
            }
        }
        return;
    }
    if let Some(node) = node_bias {
        let [batch, out_channels, h, w] = grad.dims();
        let sum = grad
            .clone()
            .reshape([batch, out_channels, h * w])
            .sum_dim(2)
            .sum_dim(0)
            .reshape([out_channels]);
        grads.register::<I>(node, sum.into_primitive().tensor());
    }
    // Both gradients read `grad` as a matrix of output rows; reshaped once, so that a strided
    // `grad` (a slice of a sum's gradient, say) is copied once.
    let dims = grad.dims();
    let grad = grad.reshape([dims[0] * dims[1] * dims[2], dims[3]]);
    if let Some(node) = node_weight {
        let grad_weight = weight_grad(&padded, grad.clone(), geometry);
        grads.register::<I>(node, grad_weight.into_primitive().tensor());
    }
    let grad = grad.reshape(dims);
    if let (Some(node), Some(weight)) = (node_x, weight) {
        let input = InputGrad::new(geometry).expect("checked before the op was built");
        let grad_x = input.compute(grad, weight);
        grads.register::<I>(node, grad_x.into_primitive().tensor());
    }
}

/// `Σ_b Σ_pixels ∂L/∂y[b, o, ·] · tap(i, j)[b, c, ·]` for every tap, as `[out, in, kh, kw]`,
/// from `∂L/∂y` as `[batch · out · out_h, out_w]`.
fn weight_grad<I: Backend>(
    padded: &Tensor<I, 2>,
    grad: Tensor<I, 2>,
    g: &Geometry,
) -> Tensor<I, 4> {
    let (batch, out_channels, channels) = (g.batch, g.out_channels, g.channels);
    let [kh, kw] = g.kernel;
    let phases = g.phases(padded);
    // The gradient of the wide output: zero in the columns past the true output width.
    let grad = zero_pad_columns(grad, 0, g.phase_w).reshape([batch, out_channels, g.wide()]);
    let taps = (0..kh)
        .flat_map(|i| (0..kw).map(move |j| (i, j)))
        .map(|(i, j)| {
            grad.clone()
                .matmul(g.tap(&phases, i, j).swap_dims(1, 2))
                .sum_dim(0)
                .reshape([out_channels, channels, 1])
        })
        .collect();
    Tensor::cat(taps, 2).reshape([out_channels, channels, kh, kw])
}

/// The input gradient as a stride-1 convolution of the output gradient: how it is cropped and
/// zero-padded for it.
#[derive(Clone, Copy, Debug)]
struct InputGrad {
    /// Rows and columns cut from `[top, left, bottom, right]` of the output gradient, where
    /// `k − 1 − padding` is negative, and zeros added where it is positive.
    crop: [usize; 4],
    pad: [usize; 4],
}

impl InputGrad {
    /// `None` for strides other than 1 (`conv_train`'s path differentiates those without the
    /// zeros a spread-out gradient would multiply), or when the crops would leave nothing
    /// (padding wider than kernel and output).
    fn new(g: &Geometry) -> Option<Self> {
        if g.stride != [1, 1] {
            return None;
        }
        let [kh, kw] = g.kernel;
        let [pt, pl, _, _] = g.padding;
        // Zeros before and after the output gradient, so that a valid correlation with the
        // flipped kernel gives exactly `height × width`: `∂L/∂x[r] = Σᵢ W[i] · ∂L/∂y[r − i]`
        // reads `∂L/∂y` from `k − 1 − top` rows before the first input row to `height + top
        // − out_h` rows after the last.
        let ends = [
            kh as isize - 1 - pt as isize,
            kw as isize - 1 - pl as isize,
            (g.height + pt) as isize - g.out_h as isize,
            (g.width + pl) as isize - g.out_w as isize,
        ];
        let crop = ends.map(|e| (-e).max(0) as usize);
        let pad = ends.map(|e| e.max(0) as usize);
        let fits = crop[0] + crop[2] < g.out_h && crop[1] + crop[3] < g.out_w;
        fits.then_some(Self { crop, pad })
    }

    /// `∂L/∂x` from `∂L/∂y` (`grad`) and the weight `[out, in, kh, kw]`.
    fn compute<I: Backend>(&self, grad: Tensor<I, 4>, weight: Tensor<I, 4>) -> Tensor<I, 4> {
        let [batch, out_channels, out_h, out_w] = grad.dims();
        let [ct, cl, cb, cr] = self.crop;
        let grad = if self.crop != [0; 4] {
            grad.slice([0..batch, 0..out_channels, ct..out_h - cb, cl..out_w - cr])
        } else {
            grad
        };
        let flipped = weight.flip([2, 3]).swap_dims(0, 1);
        let geometry = Geometry::of(grad.dims(), flipped.dims(), [1, 1], self.pad)
            .expect("the input gradient's sizes fit by construction");
        conv_by_taps(grad, flipped, None, &geometry)
    }
}
