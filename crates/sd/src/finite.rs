//! Numbers that went NaN or infinite are stopped where they appear, naming the stage, rather
//! than written out as a black image.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{Result, SdError};

/// How many values of `data` (any float dtype) are NaN or infinite.
pub(crate) fn non_finite_values(data: &TensorData) -> usize {
    match data.clone().convert::<f32>().to_vec::<f32>() {
        Ok(values) => values.iter().filter(|v| !v.is_finite()).count(),
        Err(_) => 0,
    }
}

/// Stops a run whose numbers went NaN or infinite, naming the stage, rather than writing a black
/// image: `stage` says where (the text encoder, U-Net step i of n, the VAE decoder).
pub fn check_finite<B: Backend, const D: usize>(t: &Tensor<B, D>, stage: &str) -> Result<()> {
    let bad = t.clone().is_finite().bool_not().any().into_scalar();
    if burn::tensor::ElementConversion::elem::<bool>(bad) {
        Err(SdError::NonFinite(stage.to_string()))
    } else {
        Ok(())
    }
}
