//! An exponential moving average of the weights, as diffusers' `EMAModel` keeps it: after each
//! optimiser step `θ̄ ← θ̄ − (1 − d)(θ̄ − θ)`, with the decay `d` rising from 0 as training goes
//! on (so that the average does not remember the random initialisation).

use burn::module::Module;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::params::{flat_params, with_flat_params};

/// `EMAModel`'s arguments, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// The largest decay.
    pub decay: f64,
    /// The smallest decay (once past `update_after_step`).
    pub min_decay: f64,
    /// Steps before the average starts to lag (until then it copies the weights).
    pub update_after_step: u64,
    /// The warm-up form `1 − (1 + step / inv_gamma)^−power` instead of `(1 + step) / (10 + step)`.
    pub use_ema_warmup: bool,
    /// The warm-up's `inv_gamma`; positive.
    pub inv_gamma: f64,
    /// The warm-up's `power`.
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EmaConfig {
    /// Checks each value against its meaning.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.decay) || !(0.0..=1.0).contains(&self.min_decay) {
            return Err(TrainError::Config(format!(
                "EMA decay and min_decay must be in [0, 1], got {} and {}",
                self.decay, self.min_decay
            )));
        }
        if !(self.inv_gamma.is_finite() && self.inv_gamma > 0.0 && self.power.is_finite()) {
            return Err(TrainError::Config(format!(
                "EMA inv_gamma must be positive and power finite, got {} and {}",
                self.inv_gamma, self.power
            )));
        }
        Ok(())
    }

    /// The decay used at optimisation step `step` (counted from 1), `EMAModel.get_decay`.
    pub fn decay_at(&self, step: u64) -> f64 {
        let step = step.saturating_sub(self.update_after_step + 1);
        if step == 0 {
            return 0.0;
        }
        let s = step as f64;
        let value = if self.use_ema_warmup {
            1.0 - (1.0 + s / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + s) / (10.0 + s)
        };
        value.min(self.decay).max(self.min_decay)
    }
}

/// The averaged weights, a module of the model's (inner) type, so that they are saved and
/// loaded with the model's own weight files.
#[derive(Debug, Clone)]
pub struct Ema<M> {
    config: EmaConfig,
    model: M,
    steps: u64,
}

impl<M> Ema<M> {
    /// Starts the average at `model`'s weights (diffusers copies the parameters).
    pub fn new(config: EmaConfig, model: M) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            model,
            steps: 0,
        })
    }

    /// Resumes an average saved after `steps` updates.
    pub fn resume(config: EmaConfig, model: M, steps: u64) -> Result<Self> {
        let mut ema = Self::new(config, model)?;
        ema.steps = steps;
        Ok(ema)
    }

    /// The averaged weights.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// How many updates have been made.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The settings.
    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    /// One update towards `current` (the trained model's inner module, after the optimiser
    /// step); returns the decay used.
    pub fn update<B: Backend>(&mut self, current: &M) -> Result<f64>
    where
        M: Module<B>,
    {
        self.steps += 1;
        let decay = self.config.decay_at(self.steps);
        let one_minus = 1.0 - decay;
        let averaged: Vec<_> = flat_params(&self.model)
            .into_iter()
            .zip(flat_params(current))
            .map(|(avg, now)| sd_core::optim::ema_toward(avg, now, one_minus))
            .collect();
        self.model = with_flat_params(self.model.clone(), averaged)?;
        Ok(decay)
    }
}
