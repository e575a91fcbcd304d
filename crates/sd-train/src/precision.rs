//! Mixed precision (accelerate's `--mixed_precision bf16|fp16`, as `train_text_to_image.py`
//! runs it): the trained weights, their gradients, the optimiser's moments, the EMA and the
//! loss stay in f32, and each step runs the forward and backward passes on a bf16 or f16 copy
//! of the weights. The copy is cast inside the autodiff graph, so each weight's gradient reaches the
//! f32 weight through the cast's backward (a cast back to f32) and the optimiser step is the
//! f32 one.
//!
//! PyTorch's autocast picks a dtype per op (matmuls and convolutions in the low precision, the
//! normalisations' statistics, softmax and the loss in f32); here every op of the copy runs in
//! the low precision except the GroupNorm and LayerNorm of an f16 input (in f32, see
//! `sd_core::layers::{group_norm_2d, layer_norm}`), and the prediction is cast to f32 before the loss. bf16
//! keeps f32's exponent range, so it needs no loss scaling; f16 runs with
//! [`crate::GradScaler`], PyTorch's dynamic loss scaler.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
pub use sd_core::layers::to_dtype;
use serde::{Deserialize, Serialize};

/// The dtype the trained models compute in (`--mixed-precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// Forward and backward passes in IEEE half precision, the weights and optimiser in f32,
    /// the loss scaled by [`crate::GradScaler`] (accelerate's `fp16` is read as well).
    #[serde(alias = "fp16")]
    F16,
    /// Forward and backward passes in bfloat16, the weights and optimiser in f32.
    Bf16,
}

impl MixedPrecision {
    /// The dtype of the forward and backward passes.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::No => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// `module` as the step computes with it: a clone in f32, else a copy whose float
    /// parameters are cast to the compute dtype inside the graph (each keeps its `ParamId`,
    /// so attached adapters still find their weights).
    pub fn compute_copy<B: Backend, M: Module<B>>(self, module: &M) -> M {
        // A lazily initialised parameter's clone draws its own values: initialise `module`'s
        // in place first, so that the copy holds (or is cast from) the very tensors the
        // gradients must reach.
        module.visit(&mut Initialise);
        match self {
            Self::No => module.clone(),
            other => module.clone().map(&mut CastParams(other.compute_dtype())),
        }
    }
}

/// Initialises every lazily initialised float parameter it visits.
struct Initialise;

impl<B: Backend> ModuleVisitor<B> for Initialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// Casts every float parameter to one dtype.
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, to_dtype(tensor, self.0), mapper)
    }
}
