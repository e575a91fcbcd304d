//! Gradients gathered over one or more backward passes (gradient accumulation), and clipping
//! by their global norm as `torch.nn.utils.clip_grad_norm_` does.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

/// One gradient slot per float parameter of a module, in visiting order (see
/// [`crate::flat_params`]); `None` for a parameter no loss reached (frozen, or not in the
/// graph), which the optimiser then leaves alone.
#[derive(Debug, Clone)]
pub struct Gradients<B: Backend> {
    slots: Vec<Option<Tensor<B, 1>>>,
}

impl<B: Backend> Default for Gradients<B> {
    fn default() -> Self {
        Self { slots: Vec::new() }
    }
}

impl<B: Backend> Gradients<B> {
    /// No gradients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `module`'s gradients out of `grads` (from `loss.backward()`) and adds them to the
    /// ones gathered so far. For accumulation over `n` micro-batches, divide each loss by `n`
    /// before its backward pass, as accelerate does, so that the sum is the mean gradient.
    pub fn accumulate<AB, M>(&mut self, module: &M, grads: &mut AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        struct Take<'a, AB: AutodiffBackend> {
            grads: &'a mut AB::Gradients,
            slots: &'a mut Vec<Option<Tensor<AB::InnerBackend, 1>>>,
            index: usize,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for Take<'_, AB> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                if self.slots.len() <= self.index {
                    self.slots.resize(self.index + 1, None);
                }
                if let Some(grad) = param.val().grad_remove(self.grads) {
                    let grad = sd_core::optim::flatten(grad);
                    let slot = &mut self.slots[self.index];
                    *slot = Some(match slot.take() {
                        Some(sum) => sum + grad,
                        None => grad,
                    });
                }
                self.index += 1;
            }
        }
        let mut take = Take::<AB> {
            grads,
            slots: &mut self.slots,
            index: 0,
        };
        module.visit(&mut take);
    }

    /// The gradient slots, in visiting order.
    pub fn slots(&self) -> &[Option<Tensor<B, 1>>] {
        &self.slots
    }

    /// Takes the slots out, leaving no gradients.
    pub fn take(&mut self) -> Vec<Option<Tensor<B, 1>>> {
        std::mem::take(&mut self.slots)
    }

    /// Puts slots back (those [`Self::take`] took, transformed).
    pub fn restore(&mut self, slots: Vec<Option<Tensor<B, 1>>>) {
        self.slots = slots;
    }

    /// Whether no gradient has been gathered.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The 2-norm over every gradient value (the norm of the per-tensor norms, as torch
    /// computes it).
    pub fn global_norm(&self) -> f64 {
        self.slots
            .iter()
            .flatten()
            .map(sd_core::optim::squared_norm)
            .sum::<f64>()
            .sqrt()
    }

    /// Scales every gradient so that the global norm is at most `max_norm`, as
    /// `clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, capped at 1), and
    /// returns the norm before clipping. Burn's `GradientClipping::Norm` clips each tensor by
    /// its own norm, which changes the direction of the update: not the same thing.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        let coefficient = (max_norm / (norm + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            self.scale(coefficient);
        }
        norm
    }

    /// [`Self::clip_global_norm`] over several models' gradients at once (a U-Net and a text
    /// encoder trained together): one norm over all of them, as torch clips the chained
    /// parameter list.
    pub fn clip_global_norm_all(all: &mut [&mut Self], max_norm: f64) -> f64 {
        let norm = all
            .iter()
            .map(|g| g.global_norm().powi(2))
            .sum::<f64>()
            .sqrt();
        let coefficient = (max_norm / (norm + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            for g in all.iter_mut() {
                g.scale(coefficient);
            }
        }
        norm
    }

    /// Whether any gathered gradient value is ±∞ or NaN (an f16 backward pass that
    /// overflowed; see [`crate::GradScaler`]).
    pub fn any_non_finite(&self) -> bool {
        self.slots.iter().flatten().any(|g| {
            g.clone()
                .is_finite()
                .bool_not()
                .any()
                .into_scalar()
                .elem::<bool>()
        })
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for slot in self.slots.iter_mut() {
            // Taken out, so that an unshared buffer is scaled in place.
            if let Some(grad) = slot.take() {
                *slot = Some(sd_core::optim::scale(grad, factor));
            }
        }
    }
}
