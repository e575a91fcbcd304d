//! The optimiser's passes over every parameter: AdamW's element-wise update, a gradient's
//! squared norm, its scaling. Written as Burn tensor ops they are about fifteen passes over the
//! model per step, each on one core (Flex runs element-wise ops serially); on Flex each is one
//! parallel pass through `sd_kernels::cpu`, in the same f32 arithmetic. The optimiser's state
//! and its order of steps stay in `sd-train`.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

/// The constants of one AdamW step (Loshchilov & Hutter 2019, Algorithm 2, with PyTorch's
/// arrangement of the bias corrections), in f64 as the optimiser computes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// The learning rate.
    pub lr: f64,
    /// The decoupled weight decay `λ`.
    pub weight_decay: f64,
    /// `β₁`.
    pub beta1: f64,
    /// `β₂`.
    pub beta2: f64,
    /// `ε`, added to `√v̂`.
    pub epsilon: f64,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f64,
    /// `√(1 − β₂ᵗ)`.
    pub bias2_sqrt: f64,
}

/// One AdamW step on a flat parameter with its gradient and moments (`None` before the first
/// step, as zeros): `θ ← θ(1 − lrλ)`, `m ← m + (g − m)(1 − β₁)`, `v ← vβ₂ + g²(1 − β₂)`,
/// `θ ← θ − m / (√v / √(1 − β₂ᵗ) + ε) · lr / (1 − β₁ᵗ)`. Returns `(θ, (m, v))`.
pub fn adamw_update<B: Backend>(
    theta: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    s: &AdamWScalars,
) -> (Tensor<B, 1>, (Tensor<B, 1>, Tensor<B, 1>)) {
    #[cfg(feature = "flex")]
    let (theta, moments) = {
        // The f64 constants rounded to f32 as Burn's scalar ops round them: the same bits.
        let step = sd_kernels::cpu::vector::AdamWStep {
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            one_minus_beta1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            one_minus_beta2: (1.0 - s.beta2) as f32,
            bias2_sqrt: s.bias2_sqrt as f32,
            epsilon: s.epsilon as f32,
            step_size: s.step_size as f32,
        };
        match sd_kernels::cpu::try_adamw(theta, &grad, moments, step) {
            Ok([theta, m, v]) => return (theta, (m, v)),
            Err(back) => back,
        }
    };
    adamw_by_ops(theta, grad, moments, s)
}

/// [`adamw_update`] as Burn tensor ops, for every backend.
fn adamw_by_ops<B: Backend>(
    theta: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    s: &AdamWScalars,
) -> (Tensor<B, 1>, (Tensor<B, 1>, Tensor<B, 1>)) {
    let theta = theta.mul_scalar(1.0 - s.lr * s.weight_decay);
    let (m, v) = match moments {
        Some(moments) => moments,
        None => (grad.zeros_like(), grad.zeros_like()),
    };
    let m = m.clone() + (grad.clone() - m).mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + grad.clone().mul(grad).mul_scalar(1.0 - s.beta2);
    let denom = v
        .clone()
        .sqrt()
        .div_scalar(s.bias2_sqrt)
        .add_scalar(s.epsilon);
    let theta = theta - m.clone().div(denom).mul_scalar(s.step_size);
    (theta, (m, v))
}

/// `x` on one axis, in its logical order (a gradient as the optimiser keeps it). Backward
/// passes hand back many weight gradients as permuted views; on Flex they are gathered in
/// parallel.
pub fn flatten<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 1> {
    let n = x.shape().num_elements();
    crate::layers::contiguous(x).reshape([n])
}

/// `Σ x²` (summed in f64 on Flex, in the tensor's dtype elsewhere).
pub fn squared_norm<B: Backend, const D: usize>(x: &Tensor<B, D>) -> f64 {
    #[cfg(feature = "flex")]
    if let Some(sum) = sd_kernels::cpu::try_sum_of_squares(x) {
        return sum;
    }
    x.clone().powi_scalar(2).sum().into_scalar().elem()
}

/// An exponential moving average's step: `avg − (avg − now)·(1 − decay)`, one parallel pass
/// on Flex (in place where `avg`'s buffer is not shared), the same f32 arithmetic as the
/// tensor ops elsewhere.
pub fn ema_toward<B: Backend, const D: usize>(
    avg: Tensor<B, D>,
    now: Tensor<B, D>,
    one_minus_decay: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let avg = match sd_kernels::cpu::try_ema(avg, &now, one_minus_decay as f32) {
        Ok(averaged) => return averaged,
        Err(avg) => avg,
    };
    avg.clone() - (avg - now).mul_scalar(one_minus_decay)
}

/// `x · factor`, in place where the buffer is not shared.
pub fn scale<B: Backend, const D: usize>(x: Tensor<B, D>, factor: f64) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let x = match sd_kernels::cpu::try_scale(x, factor as f32) {
        Ok(scaled) => return scaled,
        Err(x) => x,
    };
    x.mul_scalar(factor)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// Flex's fused pass gives the tensor ops' bits, from zero moments and from given ones.
    #[test]
    fn the_fused_adamw_step_equals_the_tensor_ops() {
        let device = Default::default();
        let n = 100_003;
        let normal =
            |scale: f64| Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, scale), &device);
        let (theta, grad) = (normal(0.1), normal(1e-3));
        let moments = (normal(1e-4), normal(1e-6).abs());
        let s = AdamWScalars {
            lr: 1e-3,
            weight_decay: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            step_size: 1e-3 / (1.0 - 0.9f64.powi(2)),
            bias2_sqrt: (1.0 - 0.999f64.powi(2)).sqrt(),
        };
        let theta_before = theta.clone().into_data();
        for moments in [None, Some(moments)] {
            let fused = adamw_update(theta.clone(), grad.clone(), moments.clone(), &s);
            let ops = adamw_by_ops(theta.clone(), grad.clone(), moments, &s);
            let bits = |t: Tensor<Flex, 1>| t.into_data().to_vec::<f32>().unwrap();
            assert_eq!(bits(fused.0), bits(ops.0), "θ");
            assert_eq!(bits(fused.1.0), bits(ops.1.0), "m");
            assert_eq!(bits(fused.1.1), bits(ops.1.1), "v");
        }
        // A parameter whose buffer is shared is copied, not changed under its other owner.
        assert_eq!(theta.clone().into_data(), theta_before);
        let squares: f64 = grad.clone().powi_scalar(2).sum().into_scalar().elem();
        assert!((squared_norm(&grad) - squares).abs() < 1e-5 * squares);
        // A permuted view flattens in its logical order: element [c, a, b] is a·12 + b·4 + c.
        let values: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let permuted = Tensor::<Flex, 1>::from_floats(values.as_slice(), &device)
            .reshape([2, 3, 4])
            .permute([2, 0, 1]);
        let mut expected = Vec::new();
        for c in 0..4 {
            for a in 0..2 {
                for b in 0..3 {
                    expected.push((a * 12 + b * 4 + c) as f32);
                }
            }
        }
        let flat = flatten(permuted).into_data().to_vec::<f32>().unwrap();
        assert_eq!(flat, expected);
        // The moving average's fused step gives the tensor ops' bits.
        let averaged = ema_toward(theta.clone(), grad.clone(), 1e-3);
        let by_ops = theta.clone() - (theta.clone() - grad.clone()).mul_scalar(1e-3);
        assert_eq!(averaged.into_data(), by_ops.into_data());
        let scaled = scale(grad.clone(), 0.5);
        assert_eq!(scaled.into_data(), (grad * 0.5).into_data());
    }
}
