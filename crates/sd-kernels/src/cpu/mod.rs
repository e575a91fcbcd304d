//! Fused kernels for the Flex (CPU) backend, for the operations where composing Burn ops costs
//! the most:
//! - [`attention`]: scores, softmax and the weighted sum in one pass over cache-sized blocks;
//! - [`conv`]: convolutions by the fastest method for their shape: [`winograd`] F(4×4, 3×3) or
//!   F(2×2, 3×3) for 3×3 maps of 16² and up (batch 2), cache-sized blocks of output positions
//!   (gathered, multiplied and finished by one core) for the rest; the bias, or a BatchNorm and
//!   a ReLU, applied as the output is written;
//! - [`linear`]: `x W + b` in one multiply over all rows, onto the broadcast bias;
//! - [`norm`]: GroupNorm, with the SiLU after it, in two passes;
//! - [`pool`]: max and average pooling (padding not counted), a plane per task;
//! - [`vector`]: the element-wise activations (GEGLU, SiLU, quick GELU) in one vectorised pass.
//!
//! The layers reach them through the `try_*` functions here, which work on the Flex tensors'
//! own buffers (reached through [`crate::route`], with no conversion that can fail) and give
//! their inputs back for any other backend or dtype, and for autodiff graphs: those take the
//! generic Burn path, so every model still trains.

#[macro_use]
pub mod vector;
pub mod attention;
pub mod attention_train;
pub mod conv;
pub mod conv_taps;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod winograd;

use burn::backend::flex::FlexTensor;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use crate::route::SameType;

pub use attention::AttentionShape;
pub use conv::Conv2dShape;
pub use conv_taps::TapConv;

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` when `accumulate`, for an
/// `m × k` `lhs` and a `k × n` `rhs`; each matrix is a pointer and its `[row, column]` strides in
/// elements. `parallel` spreads the multiply over rayon's threads (for callers not already
/// inside a parallel task). The kernels' one entry to `gemm`.
///
/// # Safety
/// Every element the sizes and strides address must lie inside its matrix's allocation, and
/// `dst` must not overlap `lhs` or `rhs` nor be written by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply(
    [m, n, k]: [usize; 3],
    (dst, [dst_row, dst_col]): (*mut f32, [usize; 2]),
    (lhs, [lhs_row, lhs_col]): (*const f32, [usize; 2]),
    (rhs, [rhs_row, rhs_col]): (*const f32, [usize; 2]),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract above is gemm's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_col as isize,
            dst_row as isize,
            accumulate,
            lhs,
            lhs_col as isize,
            lhs_row as isize,
            rhs,
            rhs_col as isize,
            rhs_row as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// An output buffer the tasks of one kernel share; each task writes only its own disjoint
/// part of it (rows, columns or pixels, as each kernel's SAFETY notes say), and the buffer
/// outlives the parallel loop.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: see above: tasks write disjoint elements of a buffer that outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// True when `B` is the plain Flex backend (not wrapped in autodiff or anything else).
pub fn is_flex<B: Backend>() -> bool {
    std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>()
}

/// The way from `B`'s tensors to Flex's own and back: it exists only when `B` is Flex.
struct FlexRoute<B: Backend>(SameType<B::FloatTensorPrimitive, FlexTensor>);

// Manual impls: the derives would ask `B: Copy`.
impl<B: Backend> Clone for FlexRoute<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for FlexRoute<B> {}

impl<B: Backend> FlexRoute<B> {
    /// The route when `B` is the plain Flex backend; `None` for every other backend.
    fn check() -> Option<Self> {
        if !is_flex::<B>() {
            return None;
        }
        SameType::check().map(Self)
    }

    /// The contiguous Flex tensor behind `t` when it is f32 (a strided view is copied, a
    /// contiguous one shared).
    fn input<const D: usize>(self, t: &Tensor<B, D>) -> Option<FlexTensor> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let flex = self.0.to(t.clone().into_primitive().tensor());
        Some(if flex.as_slice::<f32>().is_some() {
            flex
        } else {
            flex.to_contiguous()
        })
    }

    /// The Flex tensor behind `t` with its own contiguous buffer (copied only when shared or
    /// strided), when `t` is f32; `t` back otherwise.
    fn owned<const D: usize>(self, t: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
        if t.dtype() != DType::F32 {
            return Err(t);
        }
        let flex = self.0.to(t.into_primitive().tensor());
        let whole = flex.layout().num_elements() * 4 == flex.bytes().len();
        Ok(match flex.layout().contiguous_offsets() {
            Some((0, _)) if whole && flex.is_unique() => flex,
            _ => flex.to_contiguous(),
        })
    }

    /// A layer's weight as f32 values: the tensor's own buffer when it is f32; widened into a
    /// new one when it is held in f16 or bf16 (a model loaded with its matrices narrower than
    /// its arithmetic, half the memory), which costs one pass over the weight per call (F16C
    /// on x86), next to the multiply's `rows` passes.
    fn weight<const D: usize>(self, t: &Tensor<B, D>) -> Option<Weight> {
        match t.dtype() {
            DType::F32 => self.input(t).map(Weight::Shared),
            DType::F16 | DType::BF16 => {
                let flex = self.narrow(t);
                let narrow = narrow_values(&flex)?;
                let mut wide = WIDENED.take(narrow.len());
                const CHUNK: usize = 1 << 15;
                wide.par_chunks_mut(CHUNK)
                    .enumerate()
                    .for_each(|(i, w)| narrow.widen_into(i * CHUNK, w));
                Some(Weight::Widened(wide))
            }
            _ => None,
        }
    }

    /// The contiguous Flex tensor behind `t`, whatever its dtype.
    fn narrow<const D: usize>(self, t: &Tensor<B, D>) -> FlexTensor {
        let flex = self.0.to(t.clone().into_primitive().tensor());
        if flex.layout().contiguous_offsets().is_some() {
            flex
        } else {
            flex.to_contiguous()
        }
    }

    /// A `B` tensor around a Flex tensor.
    fn output<const D: usize>(self, flex: FlexTensor) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(self.0.back(flex)))
    }

    /// A `B` tensor holding `data` in the given shape.
    fn output_f32<const D: usize>(self, data: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        self.output(FlexTensor::from_data(TensorData::new(data, shape)))
    }
}

/// Max or average (padding not counted, `count_include_pad=False`) pooling of `[n, c, h, w]`
/// when `B` is Flex and `x` is f32 (`None` otherwise, or when the window does not fit).
pub fn try_pool2d<B: Backend>(
    x: &Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    average: bool,
) -> Option<Tensor<B, 4>> {
    let route = FlexRoute::<B>::check()?;
    let [n, c, h, w] = x.dims();
    let shape = pool::PoolShape {
        planes: n * c,
        size: [h, w],
        kernel,
        stride,
        padding,
    };
    let [oh, ow] = shape.output_size()?;
    let flex = route.input(x)?;
    let out = pool::pool2d(flex.as_slice()?, shape, average)?;
    Some(route.output_f32(out, [n, c, oh, ow]))
}

/// GEGLU (`h ⊙ GELU(g)` for `[h, g]` the two halves of the last axis) in one pass, when `B` is
/// Flex and the tensor is f32; `None` otherwise.
pub fn try_geglu<B: Backend>(projected: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    let route = FlexRoute::<B>::check()?;
    let [b, n, two_inner] = projected.dims();
    if two_inner % 2 != 0 {
        return None;
    }
    let flex = route.input(projected)?;
    let out = vector::geglu(flex.as_slice()?, two_inner / 2);
    Some(route.output_f32(out, [b, n, two_inner / 2]))
}

/// A stride-1 convolution's forward for training ([`conv_taps`]): the zero-padded input
/// (`[batch · in, plane]`, what the weight gradient reads) and the output, when `B` is Flex and
/// every tensor is f32 of `g`'s sizes; `None` otherwise.
pub fn try_conv_taps_forward<B: Backend>(
    x: &Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    g: TapConv,
) -> Option<(Tensor<B, 2>, Tensor<B, 4>)> {
    let route = FlexRoute::<B>::check()?;
    let [out_h, out_w] = g.output_size()?;
    let [phase_h, phase_w] = g.phase()?;
    let [kh, kw] = g.kernel;
    if x.dims() != [g.batch, g.channels, g.height, g.width]
        || weight.dims() != [g.out_channels, g.channels, kh, kw]
        || bias.is_some_and(|b| b.dims() != [g.out_channels])
    {
        return None;
    }
    let (xf, wf) = (route.input(x)?, route.input(weight)?);
    let bf = match bias {
        Some(b) => Some(route.input(b)?),
        None => None,
    };
    let bias = match &bf {
        Some(b) => Some(b.as_slice::<f32>()?),
        None => None,
    };
    let padded = conv_taps::pad(xf.as_slice()?, &g)?;
    let taps = conv_taps::tap_matrices(wf.as_slice()?, &g)?;
    let out = conv_taps::forward(&padded, &taps, bias, &g)?;
    Some((
        route.output_f32(padded, [g.batch * g.channels, phase_h * phase_w]),
        route.output_f32(out, [g.batch, g.out_channels, out_h, out_w]),
    ))
}

/// The gradients a stride-1 convolution's backward asks for.
pub struct TapGrads<B: Backend> {
    /// `∂L/∂x`, `[batch, in, height, width]`.
    pub x: Option<Tensor<B, 4>>,
    /// `∂L/∂W`, `[out, in, kh, kw]`.
    pub weight: Option<Tensor<B, 4>>,
    /// `∂L/∂b`, `[out]`.
    pub bias: Option<Tensor<B, 1>>,
}

/// The input, weight and bias gradients (those `wanted`, in that order) of a stride-1
/// convolution from [`try_conv_taps_forward`]'s padded input, the weight (needed for the input
/// gradient) and the output gradient, when `B` is Flex and every tensor is f32 of `g`'s sizes;
/// `None` otherwise, or when the input gradient's padding would be negative.
pub fn try_conv_taps_backward<B: Backend>(
    padded: &Tensor<B, 2>,
    weight: Option<&Tensor<B, 4>>,
    grad: &Tensor<B, 4>,
    g: TapConv,
    [want_x, want_weight, want_bias]: [bool; 3],
) -> Option<TapGrads<B>> {
    let route = FlexRoute::<B>::check()?;
    let [out_h, out_w] = g.output_size()?;
    let [phase_h, phase_w] = g.phase()?;
    let [kh, kw] = g.kernel;
    if grad.dims() != [g.batch, g.out_channels, out_h, out_w]
        || padded.dims() != [g.batch * g.channels, phase_h * phase_w]
    {
        return None;
    }
    let gf = route.input(grad)?;
    let grad = gf.as_slice::<f32>()?;
    let x = if want_x {
        let weight = weight.filter(|w| w.dims() == [g.out_channels, g.channels, kh, kw])?;
        let wf = route.input(weight)?;
        let out = conv_taps::input_grad(grad, wf.as_slice()?, &g)?;
        Some(route.output_f32(out, [g.batch, g.channels, g.height, g.width]))
    } else {
        None
    };
    let weight = if want_weight {
        let pf = route.input(padded)?;
        let out = conv_taps::weight_grad(pf.as_slice()?, grad, &g)?;
        Some(route.output_f32(out, [g.out_channels, g.channels, kh, kw]))
    } else {
        None
    };
    let bias = if want_bias {
        let out = conv_taps::bias_grad(grad, g.batch, g.out_channels)?;
        Some(route.output_f32(out, [g.out_channels]))
    } else {
        None
    };
    Some(TapGrads { x, weight, bias })
}

/// GEGLU's input gradient ([`vector::geglu_backward`]) from its input (`[b, n, 2·inner]`) and
/// output gradient (`[b, n, inner]`), when `B` is Flex and both are f32; `None` otherwise.
pub fn try_geglu_backward<B: Backend>(
    projected: &Tensor<B, 3>,
    grad: &Tensor<B, 3>,
) -> Option<Tensor<B, 3>> {
    let route = FlexRoute::<B>::check()?;
    let [b, n, two_inner] = projected.dims();
    if two_inner % 2 != 0 || grad.dims() != [b, n, two_inner / 2] {
        return None;
    }
    let (pf, gf) = (route.input(projected)?, route.input(grad)?);
    let out = vector::geglu_backward(pf.as_slice()?, gf.as_slice()?, two_inner / 2);
    Some(route.output_f32(out, [b, n, two_inner]))
}

/// Swish, `x · σ(βx)` (SiLU for β = 1), in place when `B` is Flex and `x` is f32; `x` back
/// otherwise.
pub fn try_swish<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    beta: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let Some(route) = FlexRoute::<B>::check() else {
        return Err(x);
    };
    let mut flex = route.owned(x)?;
    vector::swish(flex.storage_mut::<f32>(), beta);
    Ok(route.output(flex))
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
    let route = FlexRoute::<B>::check()?;
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
    let (qf, kf, vf) = (route.input(q)?, route.input(k)?, route.input(v)?);
    let out = attention::attention(
        qf.as_slice()?,
        kf.as_slice()?,
        vf.as_slice()?,
        shape,
        causal,
    )?;
    Some(route.output_f32(out, [batch, len_q, v_width]))
}

/// The attention shape of token-major `q`, `k`, `v` split into `heads`; `None` when the sizes
/// do not fit together.
fn attention_shape(
    q: [usize; 3],
    k: [usize; 3],
    v: [usize; 3],
    heads: usize,
    causal: bool,
) -> Option<AttentionShape> {
    let ([batch, len_q, qk_width], [kb, len_k, kw], [vb, vl, v_width]) = (q, k, v);
    let fits = heads > 0
        && qk_width % heads == 0
        && v_width % heads == 0
        && kb == batch
        && vb == batch
        && kw == qk_width
        && vl == len_k
        && !(causal && len_k < len_q);
    fits.then_some(AttentionShape {
        batch,
        heads,
        len_q,
        len_k,
        head_dim: qk_width / heads,
        value_dim: v_width / heads,
    })
}

/// [`attention_train::forward`]: the output (`[batch, len_q, heads · d_v]`) and the softmax
/// probabilities (`[batch, heads, len_q, len_k]`) for the backward, when `B` is Flex, the
/// tensors are f32 and the probabilities fit [`attention_train::MAX_PROBABILITIES`].
pub fn try_attention_train_forward<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Option<(Tensor<B, 3>, Tensor<B, 4>)> {
    let route = FlexRoute::<B>::check()?;
    let shape = attention_shape(q.dims(), k.dims(), v.dims(), heads, causal)?;
    let (qf, kf, vf) = (route.input(q)?, route.input(k)?, route.input(v)?);
    let (out, probs) = attention_train::forward(
        qf.as_slice()?,
        kf.as_slice()?,
        vf.as_slice()?,
        shape,
        causal,
    )?;
    Some((
        route.output_f32(out, [shape.batch, shape.len_q, v.dims()[2]]),
        route.output_f32(probs, [shape.batch, heads, shape.len_q, shape.len_k]),
    ))
}

/// [`attention_train::backward`]: `(∂q, ∂k, ∂v)` from the inputs, the probabilities of
/// [`try_attention_train_forward`] and the output gradient, when `B` is Flex and the tensors
/// are f32 of matching sizes.
pub fn try_attention_train_backward<B: Backend>(
    [q, k, v]: [&Tensor<B, 3>; 3],
    probs: &Tensor<B, 4>,
    grad: &Tensor<B, 3>,
    heads: usize,
) -> Option<[Tensor<B, 3>; 3]> {
    let route = FlexRoute::<B>::check()?;
    let shape = attention_shape(q.dims(), k.dims(), v.dims(), heads, false)?;
    if grad.dims() != [shape.batch, shape.len_q, v.dims()[2]] {
        return None;
    }
    let (qf, kf, vf) = (route.input(q)?, route.input(k)?, route.input(v)?);
    let (pf, gf) = (route.input(probs)?, route.input(grad)?);
    let (dq, dk, dv) = attention_train::backward(
        qf.as_slice()?,
        kf.as_slice()?,
        vf.as_slice()?,
        pf.as_slice()?,
        gf.as_slice()?,
        shape,
    )?;
    Some([
        route.output_f32(dq, q.dims()),
        route.output_f32(dk, k.dims()),
        route.output_f32(dv, v.dims()),
    ])
}

/// [`conv::conv2d`] for a Burn `Conv2d` without dilation and with one group, when `B` is
/// Flex and the tensors are f32; `None` otherwise.
pub fn try_conv2d<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let route = FlexRoute::<B>::check()?;
    let bias = optional_weight(route, conv.bias.as_ref().map(|b| b.val()))?;
    conv2d_route(route, conv, x, &None, &bias, false, None)
}

/// `relu(conv(x) · scale + shift)`, with `scale` and `shift` one value per output channel (an
/// inference BatchNorm after a bias-free convolution, and its ReLU) in one kernel, when `B` is
/// Flex, the tensors are f32 and the convolution has no bias of its own; `None` otherwise.
/// Always by the blocks, never Winograd: this is the FID Inception's layer, whose features are
/// compared with PyTorch's to 1e-4, and F(4×4, 3×3)'s rounding compounded over its 94 layers
/// took a good part of that (features 7.8e-5 from pytorch-fid's, 5.3e-5 by the blocks alone),
/// for about 1 % of its time.
pub fn try_conv2d_affine_relu<B: Backend>(
    conv: &Conv2d<B>,
    x: &Tensor<B, 4>,
    scale: &Tensor<B, 1>,
    shift: &Tensor<B, 1>,
) -> Option<Tensor<B, 4>> {
    let route = FlexRoute::<B>::check()?;
    if conv.bias.is_some() {
        return None;
    }
    let (scale, shift) = (route.weight(scale)?, route.weight(shift)?);
    let exact = Some(conv::ConvMethod::Blocked);
    conv2d_route(route, conv, x, &Some(scale), &Some(shift), true, exact)
}

/// The convolution with the given epilogue by `method` (`choose`'s when `None`).
fn conv2d_route<B: Backend>(
    route: FlexRoute<B>,
    conv: &Conv2d<B>,
    x: &Tensor<B, 4>,
    scale: &Option<Weight>,
    shift: &Option<Weight>,
    relu: bool,
    method: Option<conv::ConvMethod>,
) -> Option<Tensor<B, 4>> {
    if conv.stride.contains(&0) || conv.dilation != [1, 1] || conv.groups != 1 {
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
        stride: conv.stride,
    };
    let xf = route.input(x)?;
    let epilogue = conv::Epilogue {
        scale: bias_slice(scale)?,
        shift: bias_slice(shift)?,
        relu,
    };
    let method = method.unwrap_or_else(|| conv::ConvMethod::choose(shape));
    let weight = conv.weight.val();
    let out = match weight.dtype() {
        // Narrow filters go to Winograd as they are (widened a filter at a time, in cache, as
        // they are transformed); the blocks take them widened whole.
        DType::F16 | DType::BF16 if method.winograd_tile(shape).is_some() => {
            let flex = route.narrow(&weight);
            conv::conv2d_filters(
                method,
                xf.as_slice()?,
                narrow_values(&flex)?,
                epilogue,
                shape,
            )?
        }
        _ => {
            let wf = route.weight(&weight)?;
            conv::conv2d_with(method, xf.as_slice()?, wf.as_slice()?, epilogue, shape)?
        }
    };
    let [out_h, out_w] = shape.output_size();
    Some(route.output_f32(out, [batch, out_channels, out_h, out_w]))
}

/// The values of a contiguous f16 or bf16 Flex tensor.
fn narrow_values(flex: &FlexTensor) -> Option<winograd::Filters<'_>> {
    match flex.as_slice::<half::f16>() {
        Some(w) => Some(winograd::Filters::F16(w)),
        None => flex.as_slice::<half::bf16>().map(winograd::Filters::Bf16),
    }
}

/// A layer's weight as f32 values ([`FlexRoute::weight`]).
enum Weight {
    /// The parameter's own f32 buffer.
    Shared(FlexTensor),
    /// An f16 or bf16 parameter, widened for this call.
    Widened(Scratch),
}

impl Weight {
    fn as_slice(&self) -> Option<&[f32]> {
        match self {
            Weight::Shared(t) => t.as_slice::<f32>(),
            Weight::Widened(w) => Some(w),
        }
    }
}

/// A buffer kept between calls for a kernel's scratch values: the layers run one after
/// another, and a new buffer the size of a large layer's (52 MB for SD 1.5's widest weight)
/// would be zeroed, or faulted in page by page, at every call. At most one is kept per use
/// (the largest asked for); a call that finds it taken (another thread's model) makes its own.
pub(crate) struct Spare(std::sync::Mutex<Vec<f32>>);

impl Spare {
    pub(crate) const fn new() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }

    /// At least `len` values, whatever an earlier call left in them.
    pub(crate) fn take(&'static self, len: usize) -> Scratch {
        let mut buffer = self
            .0
            .try_lock()
            .map(|mut spare| std::mem::take(&mut *spare))
            .unwrap_or_default();
        if buffer.len() < len {
            buffer = vec![0f32; len];
        }
        Scratch {
            home: self,
            buffer,
            len,
        }
    }
}

/// The first `len` values of a [`Spare`]'s buffer, given back when dropped.
pub(crate) struct Scratch {
    home: &'static Spare,
    buffer: Vec<f32>,
    len: usize,
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buffer[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(mut spare) = self.home.0.try_lock()
            && spare.len() < self.buffer.len()
        {
            *spare = std::mem::take(&mut self.buffer);
        }
    }
}

/// Where widened weights are written.
static WIDENED: Spare = Spare::new();

/// The `Option<FlexTensor>` of an optional bias (or scale), widened like a weight.
fn optional_weight<B: Backend, const D: usize>(
    route: FlexRoute<B>,
    t: Option<Tensor<B, D>>,
) -> Option<Option<Weight>> {
    match t {
        Some(t) => Some(Some(route.weight(&t)?)),
        None => Some(None),
    }
}

/// A `Linear`'s weight (`[d_in, d_out]`) and bias as f32 values.
fn linear_params<B: Backend>(
    route: FlexRoute<B>,
    layer: &Linear<B>,
) -> Option<(Weight, Option<Weight>)> {
    let weight = route.weight(&layer.weight.val())?;
    let bias = optional_weight(route, layer.bias.as_ref().map(|b| b.val()))?;
    Some((weight, bias))
}

/// The elements of a bias (or scale), if any (`None` inside when it is not a plain f32
/// buffer).
fn bias_slice(bias: &Option<Weight>) -> Option<Option<&[f32]>> {
    match bias {
        Some(b) => Some(Some(b.as_slice()?)),
        None => Some(None),
    }
}

/// [`linear::linear`] for a Burn `Linear` (`x W + b` over the last axis), when `B` is Flex and
/// the tensors are f32; `None` otherwise.
pub fn try_linear<B: Backend, const D: usize>(
    layer: &Linear<B>,
    x: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let route = FlexRoute::<B>::check()?;
    let [d_in, d_out] = layer.weight.dims();
    let mut dims = x.dims();
    if D == 0 || dims[D - 1] != d_in {
        return None;
    }
    let xf = route.input(x)?;
    let (weight, bias) = linear_params(route, layer)?;
    let out = linear::linear(
        xf.as_slice()?,
        weight.as_slice()?,
        bias_slice(&bias)?,
        d_in,
        d_out,
    )?;
    dims[D - 1] = d_out;
    Some(route.output_f32(out, dims))
}

/// [`linear::linear_from_channels`]: `x` `[batch, d_in, tokens]` to `[batch, tokens, d_out]`.
pub fn try_linear_from_channels<B: Backend>(
    layer: &Linear<B>,
    x: &Tensor<B, 3>,
) -> Option<Tensor<B, 3>> {
    let route = FlexRoute::<B>::check()?;
    let [d_in, d_out] = layer.weight.dims();
    let [batch, channels, tokens] = x.dims();
    if channels != d_in {
        return None;
    }
    let xf = route.input(x)?;
    let (weight, bias) = linear_params(route, layer)?;
    let out = linear::linear_from_channels(
        xf.as_slice()?,
        weight.as_slice()?,
        bias_slice(&bias)?,
        d_in,
        d_out,
        tokens,
    )?;
    Some(route.output_f32(out, [batch, tokens, d_out]))
}

/// [`linear::linear_to_channels`]: `residual + (x W + b)ᵀ`, `x` `[batch, tokens, d_in]`,
/// `residual` `[batch, d_out, tokens]`.
pub fn try_linear_to_channels<B: Backend>(
    layer: &Linear<B>,
    x: &Tensor<B, 3>,
    residual: &Tensor<B, 3>,
) -> Option<Tensor<B, 3>> {
    let route = FlexRoute::<B>::check()?;
    let [d_in, d_out] = layer.weight.dims();
    let [batch, tokens, channels] = x.dims();
    if channels != d_in || residual.dims() != [batch, d_out, tokens] {
        return None;
    }
    let (xf, rf) = (route.input(x)?, route.input(residual)?);
    let (weight, bias) = linear_params(route, layer)?;
    let out = linear::linear_to_channels(
        xf.as_slice()?,
        weight.as_slice()?,
        bias_slice(&bias)?,
        rf.as_slice()?,
        [d_in, d_out, tokens],
    )?;
    Some(route.output_f32(out, [batch, d_out, tokens]))
}

/// [`norm::group_norm`] for a Burn `GroupNorm` on `x: [batch, channels, h, w]`, followed by
/// SiLU when `silu`, when `B` is Flex and the tensors are f32; `None` otherwise.
pub fn try_group_norm<B: Backend>(
    norm: &GroupNorm<B>,
    x: &Tensor<B, 4>,
    silu: bool,
) -> Option<Tensor<B, 4>> {
    let route = FlexRoute::<B>::check()?;
    let [batch, channels, h, w] = x.dims();
    if norm.num_channels != channels {
        return None;
    }
    let xf = route.input(x)?;
    let params = match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => Some((route.input(&gamma.val())?, route.input(&beta.val())?)),
        (None, None) => None,
        _ => return None,
    };
    let affine = match &params {
        Some((g, b)) => Some((g.as_slice::<f32>()?, b.as_slice::<f32>()?)),
        None => None,
    };
    let shape = norm::GroupNormShape {
        batch,
        channels,
        spatial: h * w,
        groups: norm.num_groups,
    };
    let out = norm::group_norm(xf.as_slice()?, shape, norm.epsilon as f32, affine, silu)?;
    Some(route.output_f32(out, [batch, channels, h, w]))
}

/// [`norm::group_norm_train`] for a GroupNorm's input, `gamma` and `beta` (f32 tensors on
/// Flex): the output and the per-group `[mean, 1/σ]` as a `[batch · groups, 2]` tensor;
/// `None` otherwise.
pub fn try_group_norm_train<B: Backend>(
    x: &Tensor<B, 4>,
    affine: Option<(&Tensor<B, 1>, &Tensor<B, 1>)>,
    groups: usize,
    eps: f32,
) -> Option<(Tensor<B, 4>, Tensor<B, 2>)> {
    let route = FlexRoute::<B>::check()?;
    let [batch, channels, h, w] = x.dims();
    let xf = route.input(x)?;
    let params = match affine {
        Some((g, b)) => Some((route.input(g)?, route.input(b)?)),
        None => None,
    };
    let affine = match &params {
        Some((g, b)) => Some((g.as_slice::<f32>()?, b.as_slice::<f32>()?)),
        None => None,
    };
    let shape = norm::GroupNormShape {
        batch,
        channels,
        spatial: h * w,
        groups,
    };
    let (out, stats) = norm::group_norm_train(xf.as_slice()?, shape, eps, affine)?;
    let stats: Vec<f32> = stats.into_iter().flatten().collect();
    Some((
        route.output_f32(out, [batch, channels, h, w]),
        route.output_f32(stats, [batch * groups, 2]),
    ))
}

/// [`norm::group_norm_backward`]: `∂L/∂x` and, with `gamma`, `(∂L/∂γ, ∂L/∂β)`, when `B` is Flex
/// and the tensors are f32 of matching sizes.
#[allow(clippy::type_complexity)]
pub fn try_group_norm_backward<B: Backend>(
    x: &Tensor<B, 4>,
    stats: &Tensor<B, 2>,
    gamma: Option<&Tensor<B, 1>>,
    grad: &Tensor<B, 4>,
    groups: usize,
) -> Option<(Tensor<B, 4>, Option<(Tensor<B, 1>, Tensor<B, 1>)>)> {
    let route = FlexRoute::<B>::check()?;
    let [batch, channels, h, w] = x.dims();
    if grad.dims() != x.dims() || stats.dims() != [batch * groups, 2] {
        return None;
    }
    let (xf, sf, gf) = (route.input(x)?, route.input(stats)?, route.input(grad)?);
    let gammaf = match gamma {
        Some(g) => Some(route.input(g)?),
        None => None,
    };
    let gamma = match &gammaf {
        Some(g) => Some(g.as_slice::<f32>()?),
        None => None,
    };
    let stats: Vec<[f32; 2]> = sf
        .as_slice::<f32>()?
        .chunks_exact(2)
        .map(|p| [p[0], p[1]])
        .collect();
    let shape = norm::GroupNormShape {
        batch,
        channels,
        spatial: h * w,
        groups,
    };
    let (dx, params) =
        norm::group_norm_backward(xf.as_slice()?, &stats, gamma, gf.as_slice()?, shape)?;
    Some((
        route.output_f32(dx, [batch, channels, h, w]),
        params.map(|(dg, db)| {
            (
                route.output_f32(dg, [channels]),
                route.output_f32(db, [channels]),
            )
        }),
    ))
}

/// A flat parameter and its two AdamW moments.
pub type AdamWState<B> = (Tensor<B, 1>, Option<(Tensor<B, 1>, Tensor<B, 1>)>);

/// One AdamW step ([`vector::adamw`]) on a flat parameter, its gradient and its moments (`None`
/// before the first step: zeros), when `B` is Flex and every tensor is f32 of one length: the
/// updated parameter, first and second moments, each in place when its buffer is not shared.
/// The parameter and moments come back untouched otherwise.
pub fn try_adamw<B: Backend>(
    theta: Tensor<B, 1>,
    grad: &Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    step: vector::AdamWStep,
) -> Result<[Tensor<B, 1>; 3], AdamWState<B>> {
    let Some(route) = FlexRoute::<B>::check() else {
        return Err((theta, moments));
    };
    let n = theta.dims()[0];
    let fits = |t: &Tensor<B, 1>| t.dtype() == DType::F32 && t.dims()[0] == n;
    if !(fits(&theta) && fits(grad) && moments.as_ref().is_none_or(|(m, v)| fits(m) && fits(v))) {
        return Err((theta, moments));
    }
    let Some(g) = route.input(grad) else {
        return Err((theta, moments));
    };
    let Some(g) = g.as_slice::<f32>() else {
        return Err((theta, moments));
    };
    let mut t = match route.owned(theta) {
        Ok(t) => t,
        Err(theta) => return Err((theta, moments)),
    };
    let (mut m, mut v) = match moments {
        None => {
            let zeros = || FlexTensor::from_data(TensorData::new(vec![0f32; n], [n]));
            (zeros(), zeros())
        }
        Some((m, v)) => match (route.owned(m), route.owned(v)) {
            (Ok(m), Ok(v)) => (m, v),
            (m, v) => {
                let back =
                    |r: Result<FlexTensor, Tensor<B, 1>>| r.map_or_else(|t| t, |f| route.output(f));
                return Err((route.output(t), Some((back(m), back(v)))));
            }
        },
    };
    vector::adamw(t.storage_mut(), g, m.storage_mut(), v.storage_mut(), step);
    Ok([route.output(t), route.output(m), route.output(v)])
}

/// `x` on one axis in its logical order, when `B` is Flex, `x` is f32 and its buffer is a
/// strided view (positive strides): one parallel gather ([`vector::gather_strided`]) instead of
/// Flex's copy. `None` otherwise; a contiguous tensor reshapes without a copy.
pub fn try_flatten_strided<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, 1>> {
    let route = FlexRoute::<B>::check()?;
    if x.dtype() != DType::F32 {
        return None;
    }
    let flex = route.0.to(x.clone().into_primitive().tensor());
    let layout = flex.layout();
    if layout.contiguous_offsets().is_some() {
        return None;
    }
    let strides: Vec<usize> = layout
        .strides()
        .iter()
        .map(|&s| usize::try_from(s).ok())
        .collect::<Option<_>>()?;
    let shape = x.dims();
    if strides.len() != shape.len() {
        return None;
    }
    let out = vector::gather_strided(
        flex.storage::<f32>(),
        layout.start_offset(),
        &shape,
        &strides,
    );
    let n = out.len();
    Some(route.output_f32(out, [n]))
}

/// SiLU's input gradient ([`vector::silu_backward`]) from its input and output gradient,
/// when `B` is Flex, both are f32 and of one shape; `None` otherwise.
pub fn try_silu_backward<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    grad: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let route = FlexRoute::<B>::check()?;
    if x.dims() != grad.dims() {
        return None;
    }
    let (xf, gf) = (route.input(x)?, route.input(grad)?);
    let out = vector::silu_backward(xf.as_slice()?, gf.as_slice()?);
    Some(route.output_f32(out, x.dims()))
}

/// `Σ x²` in f64 ([`vector::sum_of_squares`]), when `B` is Flex and `x` is f32.
pub fn try_sum_of_squares<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<f64> {
    let route = FlexRoute::<B>::check()?;
    let flex = route.input(x)?;
    Some(vector::sum_of_squares(flex.as_slice()?))
}

/// `avg − (avg − now)·w` ([`vector::ema`]), in place in `avg`'s buffer when it is not shared,
/// when `B` is Flex and both are f32 of one shape; `avg` back otherwise.
pub fn try_ema<B: Backend, const D: usize>(
    avg: Tensor<B, D>,
    now: &Tensor<B, D>,
    w: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let Some(route) = FlexRoute::<B>::check() else {
        return Err(avg);
    };
    if avg.dims() != now.dims() {
        return Err(avg);
    }
    let Some(nf) = route.input(now) else {
        return Err(avg);
    };
    let Some(n) = nf.as_slice::<f32>() else {
        return Err(avg);
    };
    let mut a = route.owned(avg)?;
    vector::ema(a.storage_mut(), n, w);
    Ok(route.output(a))
}

/// `x·a` in place ([`vector::scale`]) when `B` is Flex and `x` is f32; `x` back otherwise.
pub fn try_scale<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    a: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let Some(route) = FlexRoute::<B>::check() else {
        return Err(x);
    };
    let mut flex = route.owned(x)?;
    vector::scale(flex.storage_mut(), a);
    Ok(route.output(flex))
}

/// Test inputs: `n` values spread evenly over `[−spread/2, spread/2)` by a 64-bit linear
/// congruential generator (Knuth's MMIX constants), the same for a seed on every machine.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The typed route finds Flex, so the kernels run (a route that never matched would leave
    /// every layer on Burn's ops, correct but slow, and no parity test would notice).
    #[test]
    fn flex_tensors_take_the_kernels_and_keep_their_values() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::from_floats([[[-1.0, 0.0, 2.0, 3.0]]], &device);
        let swished = try_swish(x.clone(), 1.0).expect("Flex f32 takes the kernel");
        let expected = x.clone() / (x.clone().neg().exp() + 1.0);
        swished
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Default::default());
        assert!(try_geglu(&x).is_some());
        // Another dtype gives the input back.
        let half = x.cast(DType::F16);
        assert!(try_swish(half, 1.0).is_err());
    }
}
