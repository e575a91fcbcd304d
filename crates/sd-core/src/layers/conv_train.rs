//! A 2-D convolution for training, written in differentiable tensor ops: one batched matmul
//! per kernel tap on a shifted view of the zero-padded input, summed.
//!
//! Why: under `Autodiff<B>` Burn's `conv2d` differentiates through `conv_transpose2d` (the
//! input gradient) and a convolution with swapped axes (the weight gradient). On Flex these
//! are a naive single-threaded loop and strided element-by-element copies: most of a VAE
//! training step. Written as views and matmuls, the convolution differentiates into two
//! matmuls per tap (multi-threaded gemm), zero-filled slice assignments and additions; the
//! gradients are the exact ones (the same sums, in a different order). On `Autodiff<Flex>`
//! about 1.3 times as fast as Burn's for a 3×3 (stride 1 or 2) from 16² outputs up;
//! `conv_autodiff` reuses the same layout, on the inner backend, for a faster op with its own
//! backward where it can (stride 1 on Flex and NdArray).
//!
//! The layout keeps every copy a 2-D one (a run of rows of a matrix), which Flex copies at
//! near-memcpy speed; only its ≥3-D strided copies walk elements one by one:
//!
//! 1. The input is zero-padded as matrices (concatenated with zero blocks): columns on
//!    `[batch·channels·rows, width]`, then rows on `[batch·channels, rows·padded width]`, to a
//!    size that lets every tap below be one flat slice.
//! 2. With stride `s`, the padded image splits into `s²` phases (every `s`-th row from `a`,
//!    every `s`-th column from `b`). Tap `(i, j)` of the kernel reads phase `(i mod s, j mod s)`
//!    at offset `(⌊i/s⌋, ⌊j/s⌋)`, so every tap is a stride-1 shift of one phase.
//! 3. A shift of a row-major image by `(di, dj)` is a flat slice of it, starting at
//!    `di · width + dj`, if each output row is computed over the phase's whole width (the
//!    "wide" output): the columns past the true output width wrap into the next row and are
//!    dropped at the end. That wastes `⌊(k−1)/s⌋` columns per row (2 of 66 at 64² for a 3×3).
//! 4. Each tap's slice, `[batch, channels, wide pixels]`, is a view (no copy); the tap's weight
//!    `[out, channels]` multiplies it for every image (one broadcast matmul, which Flex runs on
//!    the strided view directly; Burn sums its weight gradient over the batch), and the `k²`
//!    products are added. An im2col concatenation of the taps would instead copy `k²` times the
//!    input twice (Flex's `cat` first makes each view contiguous) and keep that copy for the
//!    backward: measured slower.
//! 5. The wide columns are cropped (a 2-D slice) and the bias added along the last axis.
//!
//! Memory: the matmuls keep their tap views for the backward, which share the padded input,
//! so a convolution keeps about one padded copy of its input, as Burn's keeps the input.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{Slice, Tensor};

/// The sizes of the slices-and-matmul layout of one convolution on one input size: the
/// padded input, its phases and the wide output (module notes, steps 1 to 3).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub batch: usize,
    pub channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub padding: [usize; 4],
    pub out_h: usize,
    pub out_w: usize,
    /// A phase's rows and columns; `phase_w` is also the wide output's row length.
    pub phase_h: usize,
    pub phase_w: usize,
    /// The input's rows and columns some window reads (all of them unless the stride skips
    /// the last ones).
    pub kept_h: usize,
    pub kept_w: usize,
}

impl Geometry {
    /// The layout of `conv` on an input of `dims`, for one group, no dilation and explicit
    /// (or no) padding; `None` otherwise or when the kernel does not fit the padded input.
    pub fn new<B: Backend>(conv: &Conv2d<B>, dims: [usize; 4]) -> Option<Self> {
        let padding = match conv.padding {
            PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
            PaddingConfig2d::Valid => [0; 4],
            PaddingConfig2d::Same => return None,
        };
        if conv.groups != 1 || conv.dilation != [1, 1] {
            return None;
        }
        Self::of(dims, conv.weight.dims(), conv.stride, padding)
    }

    /// The layout of a convolution (one group, no dilation) of an input of `dims` by a weight
    /// of `weight_dims` (`[out, in, kh, kw]`) with `stride` and `padding` (`[top, left,
    /// bottom, right]`); `None` when the sizes do not fit together.
    pub fn of(
        dims: [usize; 4],
        weight_dims: [usize; 4],
        stride: [usize; 2],
        padding: [usize; 4],
    ) -> Option<Self> {
        let [batch, channels, height, width] = dims;
        let [out_channels, weight_in, kh, kw] = weight_dims;
        let [pt, pl, pb, pr] = padding;
        let [sh, sw] = stride;
        if weight_in != channels
            || sh == 0
            || sw == 0
            || kh == 0
            || kw == 0
            || height + pt + pb < kh
            || width + pl + pr < kw
        {
            return None;
        }
        let out_h = (height + pt + pb - kh) / sh + 1;
        let out_w = (width + pl + pr - kw) / sw + 1;
        // The taps' largest offsets within a phase.
        let (qh, qw) = ((kh - 1) / sh, (kw - 1) / sw);
        // A phase's rows hold every tap's slice, with one more row when the last tap's
        // slice runs `qw` elements past the last full row.
        let phase_w = out_w + qw;
        let phase_h = out_h + qh + usize::from(qw > 0);
        let (padded_h, padded_w) = (sh * phase_h, sw * phase_w);
        if pt >= padded_h || pl >= padded_w {
            return None;
        }
        Some(Self {
            batch,
            channels,
            out_channels,
            height,
            width,
            kernel: [kh, kw],
            stride: [sh, sw],
            padding: [pt, pl, pb, pr],
            out_h,
            out_w,
            phase_h,
            phase_w,
            kept_h: height.min(padded_h - pt),
            kept_w: width.min(padded_w - pl),
        })
    }

    /// Pixels of the wide output of one image and channel (`out_h · phase_w`).
    pub fn wide(&self) -> usize {
        self.out_h * self.phase_w
    }

    /// The padded input's rows and columns (`stride × phase` sizes).
    fn padded_size(&self) -> [usize; 2] {
        [self.stride[0] * self.phase_h, self.stride[1] * self.phase_w]
    }

    /// `x` zero-padded to `[batch·channels, padded_h · padded_w]` (step 1): as two padded
    /// matrices, so that the backward's slices of the padding are 2-D too.
    pub fn padded<B: Backend>(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let (batch, channels) = (self.batch, self.channels);
        let (kept_h, kept_w) = (self.kept_h, self.kept_w);
        let [pt, pl, ..] = self.padding;
        let [padded_h, padded_w] = self.padded_size();
        let x = if (kept_h, kept_w) != (self.height, self.width) {
            x.slice([0..batch, 0..channels, 0..kept_h, 0..kept_w])
        } else {
            x
        };
        let planes = batch * channels;
        let padded = zero_pad_columns(x.reshape([planes * kept_h, kept_w]), pl, padded_w);
        let padded = padded.reshape([planes, kept_h * padded_w]);
        zero_pad_columns(padded, pt * padded_w, padded_h * padded_w)
    }

    /// Phase `(a, b)` of the padded input as `[batch, channels, phase_h · phase_w]`, for the
    /// phases some tap reads (step 2), indexed by `a · stride_w + b`.
    pub fn phases<B: Backend>(&self, padded: &Tensor<B, 2>) -> Vec<Option<Tensor<B, 3>>> {
        let [sh, sw] = self.stride;
        let [kh, kw] = self.kernel;
        let [_, padded_w] = self.padded_size();
        let phase_len = self.phase_h * self.phase_w;
        let shape = [self.batch, self.channels, phase_len];
        (0..sh * sw)
            .map(|index| {
                let (a, b) = (index / sw, index % sw);
                if a >= kh || b >= kw {
                    return None;
                }
                Some(if sh == 1 && sw == 1 {
                    padded.clone().reshape(shape)
                } else {
                    // Each row of this view holds `sh` padded rows; phase row `a` is the
                    // `a`-th of them, and every `sw`-th column from `b` within it.
                    let start = a * padded_w + b;
                    let end = (a + 1) * padded_w;
                    padded
                        .clone()
                        .reshape([self.batch * self.channels * self.phase_h, sh * padded_w])
                        .slice([
                            Slice::new(0, None, 1),
                            Slice::new(start as isize, Some(end as isize), sw as isize),
                        ])
                        .reshape(shape)
                })
            })
            .collect()
    }

    /// Kernel tap `(i, j)`: the input pixels it multiplies at every wide output pixel, as
    /// `[batch, channels, wide]` (step 3), a slice of its phase.
    pub fn tap<B: Backend>(
        &self,
        phases: &[Option<Tensor<B, 3>>],
        i: usize,
        j: usize,
    ) -> Tensor<B, 3> {
        let [sh, sw] = self.stride;
        let phase = phases[(i % sh) * sw + j % sw]
            .clone()
            .expect("every tap's phase was built");
        let offset = (i / sh) * self.phase_w + j / sw;
        phase.slice([
            0..self.batch,
            0..self.channels,
            offset..offset + self.wide(),
        ])
    }
}

/// `t` (a matrix) with `before` zero columns in front and zeros after it up to `width`
/// columns, as one concatenation with two thin zero blocks: a single pass over `t`, where a
/// slice assignment into zeros (Burn's `pad`) makes three on Flex (its zeros are allocated,
/// copied to a realigned buffer, then written over). Its backward is two 2-D slices.
pub(crate) fn zero_pad_columns<B: Backend>(
    t: Tensor<B, 2>,
    before: usize,
    width: usize,
) -> Tensor<B, 2> {
    let [rows, columns] = t.dims();
    if columns == width {
        return t;
    }
    let after = width - before - columns;
    let (device, dtype) = (t.device(), t.dtype());
    let parts = [(before, None), (columns, Some(t)), (after, None)]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, t)| t.unwrap_or_else(|| Tensor::zeros([rows, n], (&device, dtype))))
        .collect();
    Tensor::cat(parts, 1)
}

/// The fewest output pixels per image and channel for which the training paths in tensor ops
/// (this module's, and `conv_autodiff`'s on NdArray or in half precision) beat Burn's `conv2d`
/// on `Autodiff<Flex>`: measured about even at 8², twice as slow at 4² (the per-tap matmuls
/// get tiny, and the wide output wastes a third of them), 1.3 to 2 times faster from 16² up.
/// `conv_autodiff` on Flex in f32 runs `sd_kernels`' `conv_taps` at every size instead: the
/// shapes model's training step (8² and 4² maps) went from 1.9 to 1.5 s with it.
const MIN_OUTPUT_PIXELS: usize = 16 * 16;

/// Whether `conv2d_forward` should train `conv` on `x` through these paths: a layout fits it
/// and the output has at least [`MIN_OUTPUT_PIXELS`] pixels.
pub fn takes<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> bool {
    Geometry::new(conv, x.dims()).is_some_and(|g| g.out_h * g.out_w >= MIN_OUTPUT_PIXELS)
}

/// `conv.forward(x)` as a sum of per-tap matmuls (see the module notes), for a convolution
/// with one group, no dilation and explicit (or no) padding; `x` back otherwise, or when the
/// kernel does not fit the padded input.
pub fn conv2d_by_matmul<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let Some(geometry) = Geometry::new(conv, x.dims()) else {
        return Err(x);
    };
    let bias = conv.bias.as_ref().map(|b| b.val());
    Ok(conv_by_taps(x, conv.weight.val(), bias, &geometry))
}

/// The convolution of `x` by `weight` (`[out, in, kh, kw]`) plus `bias`, laid out by
/// `geometry` (made for these sizes): `Σ_taps weight[:, :, i, j] · tap(i, j)`, one batched
/// matmul per tap on a view of the padded input, then the wide columns cropped and the bias
/// added along the last axis. Any backend, tracked or not.
pub(crate) fn conv_by_taps<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    geometry: &Geometry,
) -> Tensor<B, 4> {
    conv_by_taps_padded(&geometry.padded(x), weight, bias, geometry)
}

/// [`conv_by_taps`] of an input already padded by [`Geometry::padded`].
pub(crate) fn conv_by_taps_padded<B: Backend>(
    padded: &Tensor<B, 2>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    geometry: &Geometry,
) -> Tensor<B, 4> {
    let Geometry {
        batch,
        channels,
        out_channels,
        out_h,
        out_w,
        phase_w,
        kernel: [kh, kw],
        ..
    } = *geometry;
    let phases = geometry.phases(padded);
    // On Flex, the taps' `[out, in]` matrices as one `[kh·kw, out, in]` tensor laid out once
    // in parallel (`contiguous`): a slice of the `[out, in, kh, kw]` weight per tap was a
    // strided copy per tap, on one core. Elsewhere (autodiff graphs among them) that
    // permutation would itself be the slow copy: each tap is sliced as before.
    #[cfg(feature = "flex")]
    let flex = sd_kernels::cpu::is_flex::<B>();
    #[cfg(not(feature = "flex"))]
    let flex = false;
    let taps = flex.then(|| {
        super::contiguous(weight.clone().permute([2, 3, 0, 1])).reshape([
            kh * kw,
            out_channels,
            channels,
        ])
    });
    let out = (0..kh)
        .flat_map(|i| (0..kw).map(move |j| (i, j)))
        .map(|(i, j)| {
            let tap_weight = match &taps {
                Some(taps) => {
                    let t = i * kw + j;
                    taps.clone().slice([t..t + 1, 0..out_channels, 0..channels])
                }
                None => weight
                    .clone()
                    .slice([0..out_channels, 0..channels, i..i + 1, j..j + 1])
                    .reshape([1, out_channels, channels]),
            };
            tap_weight.matmul(geometry.tap(&phases, i, j))
        })
        .reduce(|sum, product| sum + product)
        .expect("a kernel has at least one tap");

    let rows = batch * out_channels;
    let out = if phase_w != out_w {
        out.reshape([rows * out_h, phase_w])
            .slice([0..rows * out_h, 0..out_w])
            .reshape([rows, out_h * out_w])
    } else {
        out.reshape([rows, out_h * out_w])
    };
    let out = match bias {
        Some(bias) => {
            let per_row = bias
                .reshape([1, out_channels])
                .repeat_dim(0, batch)
                .reshape([rows, 1]);
            out + per_row
        }
        None => out,
    };
    out.reshape([batch, out_channels, out_h, out_w])
}

/// The matmul path against Burn's `conv2d` under autodiff: outputs and the gradients of a
/// random linear functional of them with respect to the input, weight and bias, for 1×1, 3×3
/// and odd kernels, strides 1 to 3, symmetric, one-sided and no padding, odd sizes and channel
/// counts that are not multiples of 8.
#[cfg(all(test, feature = "autodiff"))]
mod tests {
    use burn::backend::Autodiff;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Distribution, Tensor};

    use super::conv2d_by_matmul;

    /// `(in, out, [h, w], [kh, kw], [sh, sw], [top, left, bottom, right], bias)`.
    type Case = (
        usize,
        usize,
        [usize; 2],
        [usize; 2],
        [usize; 2],
        [usize; 4],
        bool,
    );

    const CASES: [Case; 15] = [
        (5, 7, [9, 11], [3, 3], [1, 1], [1, 1, 1, 1], true),
        (3, 6, [8, 7], [3, 3], [1, 1], [0, 0, 0, 0], true),
        (6, 5, [13, 10], [1, 1], [1, 1], [0, 0, 0, 0], true),
        (5, 3, [9, 9], [1, 1], [1, 1], [1, 1, 1, 1], false),
        (7, 4, [17, 15], [3, 3], [2, 2], [1, 1, 1, 1], true),
        // diffusers' Downsample2d: pad right and bottom by one, then a 3×3 of stride 2.
        (6, 5, [16, 14], [3, 3], [2, 2], [0, 0, 1, 1], true),
        (4, 3, [10, 11], [3, 3], [2, 2], [0, 0, 0, 0], true),
        (3, 5, [9, 8], [1, 1], [2, 2], [0, 0, 0, 0], true),
        // The stride skips the last column: the input is cropped before padding.
        (3, 4, [11, 9], [2, 2], [2, 2], [0, 0, 0, 0], true),
        (2, 3, [12, 10], [5, 5], [3, 3], [2, 1, 0, 2], true),
        (3, 2, [7, 9], [3, 2], [2, 1], [1, 0, 2, 1], true),
        (9, 10, [6, 5], [3, 3], [1, 1], [2, 2, 2, 2], false),
        // Stride 1 with rectangular kernels, one-sided padding, and padding wider than the
        // kernel (the input gradient's crop).
        (4, 3, [7, 8], [3, 2], [1, 1], [1, 0, 2, 1], true),
        (3, 4, [10, 9], [5, 3], [1, 1], [2, 1, 2, 1], true),
        (4, 5, [7, 6], [3, 3], [1, 1], [3, 0, 1, 3], true),
    ];

    /// `max |a − b| / max |b|`.
    fn relative<B: burn::tensor::backend::Backend, const D: usize>(
        a: Tensor<B, D>,
        b: Tensor<B, D>,
    ) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let scale: f32 = b.clone().abs().max().into_scalar().elem();
        let diff: f32 = (a - b).abs().max().into_scalar().elem();
        diff / scale.max(f32::MIN_POSITIVE)
    }

    use burn::tensor::ElementConversion;

    /// A convolution under test: `Err` when it does not handle the case.
    type Under<B> = fn(&Conv2d<B>, Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>>;

    /// Compares `under_test` with Burn on every case it handles; `handles` says which those
    /// must be.
    fn check<B: AutodiffBackend>(
        device: &B::Device,
        under_test: Under<B>,
        handles: fn(&Case) -> bool,
    ) {
        for case in CASES {
            let (cin, cout, [h, w], kernel, stride, [pt, pl, pb, pr], bias) = case;
            let conv: Conv2d<B> = Conv2dConfig::new([cin, cout], kernel)
                .with_stride(stride)
                .with_padding(PaddingConfig2d::Explicit(pt, pl, pb, pr))
                .with_bias(bias)
                .init(device);
            let normal = Distribution::Normal(0.0, 1.0);
            let x = Tensor::<B, 4>::random([3, cin, h, w], normal, device).require_grad();
            let expected = conv.forward(x.clone());
            let ours = match under_test(&conv, x.clone()) {
                Ok(out) => out,
                Err(_) if !handles(&case) => continue,
                Err(_) => panic!("{case:?} is not handled"),
            };
            assert!(handles(&case), "{case:?} is handled");
            let case = format!("{cin}→{cout} {h}×{w} k{kernel:?} s{stride:?} p{pt},{pl},{pb},{pr}");
            let forward = relative(ours.clone().inner(), expected.clone().inner());
            assert!(forward < 1e-5, "{case}: outputs differ by {forward}");

            let probe = Tensor::<B, 4>::random(expected.dims(), normal, device);
            let want = (expected * probe.clone()).sum().backward();
            let got = (ours * probe).sum().backward();
            let grad_x = relative(x.grad(&got).unwrap(), x.grad(&want).unwrap());
            assert!(grad_x < 1e-5, "{case}: input gradients differ by {grad_x}");
            let weight = &conv.weight;
            let grad_w = relative(weight.grad(&got).unwrap(), weight.grad(&want).unwrap());
            assert!(grad_w < 1e-5, "{case}: weight gradients differ by {grad_w}");
            if let Some(b) = &conv.bias {
                let grad_b = relative(b.grad(&got).unwrap(), b.grad(&want).unwrap());
                assert!(grad_b < 1e-5, "{case}: bias gradients differ by {grad_b}");
            }
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn matches_burns_conv2d_on_autodiff_flex() {
        check::<Autodiff<burn::backend::Flex>>(&Default::default(), conv2d_by_matmul, |_| true);
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn matches_burns_conv2d_on_autodiff_ndarray() {
        check::<Autodiff<burn::backend::NdArray>>(&Default::default(), conv2d_by_matmul, |_| true);
    }

    /// The cases `conv_autodiff`'s op takes: stride 1.
    fn stride_one(case: &Case) -> bool {
        case.4 == [1, 1]
    }

    /// The same comparisons for `conv_autodiff`'s op with its own backward.
    #[cfg(feature = "flex")]
    #[test]
    fn autodiff_op_matches_burns_conv2d_on_flex() {
        let under_test = super::super::conv_autodiff::try_conv2d_autodiff;
        check::<Autodiff<burn::backend::Flex>>(&Default::default(), under_test, stride_one);
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn autodiff_op_matches_burns_conv2d_on_ndarray() {
        let under_test = super::super::conv_autodiff::try_conv2d_autodiff;
        check::<Autodiff<burn::backend::NdArray>>(&Default::default(), under_test, stride_one);
    }

    /// `conv2d_forward` under autodiff (the op for stride 1, the slices-and-matmuls path for
    /// stride 2) keeps Burn's outputs and input gradients, and its values when nothing is
    /// tracked.
    #[cfg(feature = "flex")]
    #[test]
    fn conv2d_forward_under_autodiff_keeps_burns_results() {
        use burn::module::Module;
        type B = Autodiff<burn::backend::Flex>;
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        // Inputs large enough for the training paths (16² outputs and more).
        for (stride, [h, w]) in [(1, [18, 20]), (2, [34, 36])] {
            let conv = crate::layers::conv2d::<B>(6, 5, 3, stride, 1, &device);
            assert!(super::takes(
                &conv,
                &Tensor::<B, 4>::zeros([2, 6, h, w], &device)
            ));
            let x = Tensor::<B, 4>::random([2, 6, h, w], normal, &device).require_grad();
            let ours = crate::layers::conv2d_forward(&conv, x.clone());
            let expected = conv.forward(x.clone());
            assert!(relative(ours.clone().inner(), expected.clone().inner()) < 1e-5);
            let grads = ours.sum().backward();
            let want = expected.sum().backward();
            let (got, want) = (x.grad(&grads).unwrap(), x.grad(&want).unwrap());
            assert!(relative(got, want) < 1e-5, "stride {stride}");

            let frozen = conv.no_grad();
            let x = x.detach();
            let ours = crate::layers::conv2d_forward(&frozen, x.clone()).inner();
            assert!(relative(ours, frozen.forward(x).inner()) < 1e-5);
        }
    }
}
