//! AdamW (Loshchilov & Hutter 2019, algorithm 2) as `torch.optim.AdamW` computes it, with the
//! defaults of diffusers' training scripts (β 0.9 / 0.999, ε 1e-8, weight decay 1e-2).

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use sd_core::optim::{AdamWScalars, adamw_update};

use crate::error::{Result, TrainError};
use crate::gradients::Gradients;
use crate::params::{flat_params, with_flat_params};

/// AdamW's hyper-parameters (the learning rate comes with each step, from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Decay of the first moment (`--adam_beta1`).
    pub beta1: f64,
    /// Decay of the second moment (`--adam_beta2`).
    pub beta2: f64,
    /// Added to the root of the second moment (`--adam_epsilon`).
    pub epsilon: f64,
    /// Decoupled weight decay, multiplied by the learning rate (`--adam_weight_decay`).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Checks each value against its meaning.
    pub fn validate(&self) -> Result<()> {
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(TrainError::Config(format!(
                    "AdamW {name} must be in [0, 1), got {beta}"
                )));
            }
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(TrainError::Config(format!(
                "AdamW epsilon must be positive, got {}",
                self.epsilon
            )));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(TrainError::Config(format!(
                "AdamW weight decay must be ≥ 0, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// The optimiser and its state: the step count and, per parameter in visiting order, the first
/// and second moments (`exp_avg`, `exp_avg_sq`).
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    step: u64,
    moments: Vec<Option<(Tensor<B, 1>, Tensor<B, 1>)>>,
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimiser (no steps taken).
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            moments: Vec::new(),
        })
    }

    /// A fresh optimiser that has counted `steps` steps on all-zero gradients, as torch's does
    /// when a loss weighted by 0 is stepped (Lightning steps the latent diffusion
    /// discriminator's optimiser every batch, its loss 0 before `disc_start`). With weight
    /// decay 0 such steps leave the moments and weights as they were; only the count, and so
    /// the later bias corrections, move.
    pub fn after_zero_steps(config: AdamWConfig, steps: u64) -> Result<Self> {
        if config.weight_decay != 0.0 {
            return Err(TrainError::Config(
                "steps on zero gradients change the weights when weight decay is not 0".into(),
            ));
        }
        Ok(Self {
            step: steps,
            ..Self::new(config)?
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// How many steps have been taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`:
    ///
    /// ```text
    /// θ ← θ (1 − lr λ)
    /// m ← m + (1 − β₁)(g − m)          v ← β₂ v + (1 − β₂) g²
    /// θ ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
    /// ```
    ///
    /// in that order of operations, as torch's implementation. Parameters without a gradient
    /// are not touched (not even decayed), as torch skips a parameter whose `grad` is `None`.
    pub fn step<AB, M>(&mut self, module: M, mut grads: Gradients<B>, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step += 1;
        let t = self.step as i32;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        struct Update<'a, B: Backend> {
            grads: std::vec::IntoIter<Option<Tensor<B, 1>>>,
            moments: &'a mut Vec<Option<(Tensor<B, 1>, Tensor<B, 1>)>>,
            index: usize,
            config: AdamWConfig,
            lr: f64,
            step_size: f64,
            bias2_sqrt: f64,
        }
        impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB::InnerBackend> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<AB, D>>,
            ) -> Param<Tensor<AB, D>> {
                let index = self.index;
                self.index += 1;
                if self.moments.len() <= index {
                    self.moments.resize(index + 1, None);
                }
                let Some(grad) = self.grads.next().flatten() else {
                    return param;
                };
                let (id, tensor, mapper) = param.consume();
                let require_grad = tensor.is_require_grad();
                let dims = tensor.dims();
                let n = grad.shape().num_elements();
                let c = self.config;
                let theta = tensor.inner().reshape([n]);
                let scalars = AdamWScalars {
                    lr: self.lr,
                    weight_decay: c.weight_decay,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    epsilon: c.epsilon,
                    step_size: self.step_size,
                    bias2_sqrt: self.bias2_sqrt,
                };
                let (theta, (m, v)) =
                    adamw_update(theta, grad, self.moments[index].take(), &scalars);
                self.moments[index] = Some((m, v));
                let mut tensor = Tensor::<AB, D>::from_inner(theta.reshape(dims));
                if require_grad {
                    tensor = tensor.require_grad();
                }
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
        let mut update = Update::<B> {
            grads: grads.take().into_iter(),
            moments: &mut self.moments,
            index: 0,
            config: c,
            lr,
            step_size: lr / bias1,
            bias2_sqrt,
        };
        module.map(&mut update)
    }

    /// The moments as two modules shaped like `template` (the model's inner module), so that
    /// they are saved with the model's own weight writer and key names; a parameter that has
    /// no moment yet gets zeros.
    pub fn moment_modules<M: Module<B>>(&self, template: &M) -> Result<(M, M)> {
        let params = flat_params(template);
        let pick = |second: bool| -> Vec<Tensor<B, 1>> {
            params
                .iter()
                .enumerate()
                .map(
                    |(i, p)| match self.moments.get(i).and_then(Option::as_ref) {
                        Some((m, v)) => if second { v } else { m }.clone(),
                        None => p.zeros_like(),
                    },
                )
                .collect()
        };
        Ok((
            with_flat_params(template.clone(), pick(false))?,
            with_flat_params(template.clone(), pick(true))?,
        ))
    }

    /// An optimiser that resumes after `step` steps with the moments of [`Self::moment_modules`]
    /// as read back from files.
    pub fn from_moment_modules<M: Module<B>>(
        config: AdamWConfig,
        step: u64,
        first: &M,
        second: &M,
    ) -> Result<Self> {
        config.validate()?;
        let m = flat_params(first);
        let v = flat_params(second);
        if m.len() != v.len() {
            return Err(TrainError::State(format!(
                "{} first moments but {} second moments",
                m.len(),
                v.len()
            )));
        }
        Ok(Self {
            config,
            step,
            moments: m.into_iter().zip(v).map(Some).collect(),
        })
    }

    /// The moments, in visiting order (`None` where a parameter has had no gradient yet).
    pub fn moments(&self) -> &[Option<(Tensor<B, 1>, Tensor<B, 1>)>] {
        &self.moments
    }
}
