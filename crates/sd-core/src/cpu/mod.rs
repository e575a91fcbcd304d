//! Fused kernels for the Flex (CPU) backend, for the operations where composing Burn ops costs
//! the most:
//! - [`attention`]: scores, softmax and the weighted sum in one pass over cache-sized blocks;
//! - [`conv`]: stride-1 convolutions as shifted matrix multiplies, without im2col.
//!
//! The layers reach them through the `try_*` functions here, which work on the Flex tensors'
//! own buffers and give their inputs back for any other backend or dtype, and for autodiff
//! graphs: those take the generic Burn path, so every model still trains.

pub mod attention;
pub mod conv;
pub mod vector;

use std::any::Any;

use burn::backend::flex::FlexTensor;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

pub use attention::AttentionShape;
pub use conv::Conv2dShape;

/// True when `B` is the plain Flex backend (not wrapped in autodiff or anything else).
pub fn is_flex<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>()
}

/// The contiguous Flex tensor behind `t`, when `B` is Flex and `t` is f32; a strided view is
/// copied, a contiguous one shared.
fn flex_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    if !is_flex::<B>() || t.dtype() != DType::F32 {
        return None;
    }
    let primitive: Box<dyn Any> = Box::new(t.clone().into_primitive().tensor());
    let flex = *primitive.downcast::<FlexTensor>().ok()?;
    Some(if flex.as_slice::<f32>().is_some() {
        flex
    } else {
        flex.to_contiguous()
    })
}

/// A `B` tensor (`B` is Flex, checked by the caller) holding `data` in the given shape.
fn from_f32<B: Backend, const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Option<Tensor<B, D>> {
    let flex: Box<dyn Any> = Box::new(FlexTensor::from_data(TensorData::new(data, shape)));
    let primitive = *flex.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(primitive)))
}

/// [`attention::attention`] on token-major tensors (`[batch, tokens, heads · dim]`), when `B`
/// is Flex and the tensors are f32; `None` otherwise (or when the sizes do not fit together).
pub fn try_attention<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Option<Tensor<B, 3>> {
    let [batch, len_q, qk_width] = q.dims();
    let [_, len_k, _] = k.dims();
    let [_, _, v_width] = v.dims();
    if heads == 0 || qk_width % heads != 0 || v_width % heads != 0 || (causal && len_k < len_q) {
        return None;
    }
    let shape = AttentionShape {
        batch,
        heads,
        len_q,
        len_k,
        head_dim: qk_width / heads,
        value_dim: v_width / heads,
    };
    let (qf, kf, vf) = (flex_f32(q)?, flex_f32(k)?, flex_f32(v)?);
    let out = attention::attention(
        qf.as_slice()?,
        kf.as_slice()?,
        vf.as_slice()?,
        shape,
        causal,
    )?;
    from_f32(out, [batch, len_q, v_width])
}

/// [`conv::conv2d`] for a Burn `Conv2d` with stride 1, no dilation and one group, when `B` is
/// Flex and the tensors are f32; `None` otherwise.
pub fn try_conv2d<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    if conv.stride != [1, 1] || conv.dilation != [1, 1] || conv.groups != 1 {
        return None;
    }
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Same => return None,
    };
    let [batch, in_channels, height, width] = x.dims();
    let [out_channels, weight_in, kh, kw] = conv.weight.dims();
    if weight_in != in_channels {
        return None;
    }
    let shape = Conv2dShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: [kh, kw],
        padding,
    };
    let xf = flex_f32(x)?;
    let wf = flex_f32(&conv.weight.val())?;
    let bf = match &conv.bias {
        Some(bias) => Some(flex_f32(&bias.val())?),
        None => None,
    };
    let bias = match &bf {
        Some(b) => Some(b.as_slice::<f32>()?),
        None => None,
    };
    let out = conv::conv2d(xf.as_slice()?, wf.as_slice()?, bias, shape)?;
    let [out_h, out_w] = shape.output_size();
    from_f32(out, [batch, out_channels, out_h, out_w])
}
