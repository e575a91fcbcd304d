//! Dynamic loss scaling for f16 mixed precision: PyTorch's `torch.amp.GradScaler`, as
//! accelerate drives it under `--mixed_precision fp16` (Micikevicius et al. 2018, "Mixed
//! Precision Training", §3.2). Burn 0.21 has none.
//!
//! f16's smallest normal number is 6·10⁻⁵: most gradients of a diffusion loss are smaller and
//! would flush to zero in an f16 backward pass. The loss is multiplied by a large scale before
//! the backward pass, the gradients divided by it before clipping and the optimiser step; when
//! a scaled gradient overflows to ±∞ or NaN the step is skipped (weights, moments and the
//! learning-rate schedule left as they are; accelerate's scheduler does not advance on a
//! skipped step) and the scale halved, and after `growth_interval` good steps in a row it is
//! doubled.

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::gradients::Gradients;

/// `GradScaler`'s settings (its defaults, which accelerate keeps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradScalerConfig {
    /// The first scale (`init_scale`, 2¹⁶).
    pub init_scale: f64,
    /// The factor after `growth_interval` good steps (2).
    pub growth_factor: f64,
    /// The factor after a step with a non-finite gradient (0.5).
    pub backoff_factor: f64,
    /// Good steps in a row before the scale grows (2000).
    pub growth_interval: u64,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl GradScalerConfig {
    /// Checks each field against its meaning, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(TrainError::Config(format!("grad_scaler.{what}")));
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return bad("init_scale must be a finite number > 0");
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad("growth_factor must be a finite number > 1");
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad("backoff_factor must be between 0 and 1");
        }
        if self.growth_interval == 0 {
            return bad("growth_interval must be at least 1");
        }
        Ok(())
    }
}

/// The scaler's state: what a checkpoint keeps so that a resumed run scales and skips exactly
/// as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// The current scale (an f32 in PyTorch; powers of two stay exact).
    pub scale: f64,
    /// Good steps since the scale last changed (`_growth_tracker`).
    pub growth_tracker: u64,
    /// Optimiser steps skipped so far (the learning-rate schedule runs on the steps taken).
    pub skipped_steps: u64,
}

/// `torch.amp.GradScaler`.
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    config: GradScalerConfig,
    state: GradScalerState,
}

impl GradScaler {
    /// A scaler at `config.init_scale`.
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: GradScalerState {
                scale: f32_value(config.init_scale),
                growth_tracker: 0,
                skipped_steps: 0,
            },
        })
    }

    /// A scaler that goes on from a checkpoint's state.
    pub fn restore(config: GradScalerConfig, state: GradScalerState) -> Result<Self> {
        config.validate()?;
        if !(state.scale.is_finite() && state.scale > 0.0) {
            return Err(TrainError::Config(format!(
                "grad scaler state: scale {} is not a finite number > 0",
                state.scale
            )));
        }
        Ok(Self { config, state })
    }

    /// The state a checkpoint keeps.
    pub fn state(&self) -> GradScalerState {
        self.state
    }

    /// The factor the loss is multiplied by before its backward pass (`scaler.scale(loss)`).
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// Optimiser steps skipped so far.
    pub fn skipped_steps(&self) -> u64 {
        self.state.skipped_steps
    }

    /// `scaler.unscale_(optimizer)`: divides every gathered gradient by the scale (a
    /// multiplication by the f32 reciprocal, as PyTorch does) and says whether any was
    /// non-finite (`found_inf`), in which case the step must be skipped.
    pub fn unscale<B: Backend>(&self, all: &mut [&mut Gradients<B>]) -> bool {
        let inverse = f32_value(1.0 / self.state.scale);
        let mut found_inf = false;
        for grads in all.iter_mut() {
            found_inf |= grads.any_non_finite();
            grads.scale(inverse);
        }
        found_inf
    }

    /// `scaler.update()` after a step: back off after a non-finite gradient (and count the
    /// skipped step), grow after `growth_interval` good steps in a row.
    pub fn update(&mut self, found_inf: bool) {
        let state = &mut self.state;
        if found_inf {
            state.scale = f32_value(state.scale * self.config.backoff_factor);
            state.growth_tracker = 0;
            state.skipped_steps += 1;
        } else {
            state.growth_tracker += 1;
            if state.growth_tracker == self.config.growth_interval {
                // PyTorch keeps the old scale when the grown one would overflow f32.
                let grown = f32_value(state.scale * self.config.growth_factor);
                if grown.is_finite() {
                    state.scale = grown;
                }
                state.growth_tracker = 0;
            }
        }
    }
}

/// `x` rounded to f32, as PyTorch keeps the scale.
fn f32_value(x: f64) -> f64 {
    x as f32 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scale sequence of `torch.amp.GradScaler(init_scale=8, growth_interval=2)` over the
    /// found_inf pattern below, as PyTorch's `_amp_update_scale_` computes it.
    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let mut scaler = GradScaler::new(GradScalerConfig {
            init_scale: 8.0,
            growth_interval: 2,
            ..Default::default()
        })
        .unwrap();
        let pattern = [false, true, false, false, false, true, true, false, false];
        let mut scales = vec![scaler.scale()];
        for found_inf in pattern {
            scaler.update(found_inf);
            scales.push(scaler.scale());
        }
        assert_eq!(
            scales,
            [8.0, 8.0, 4.0, 4.0, 8.0, 8.0, 4.0, 2.0, 2.0, 4.0],
            "{scales:?}"
        );
        assert_eq!(scaler.skipped_steps(), 3);
        let restored = GradScaler::restore(scaler.config, scaler.state()).unwrap();
        assert_eq!(restored, scaler);
    }

    #[test]
    fn refuses_settings_that_cannot_scale() {
        for config in [
            GradScalerConfig {
                init_scale: 0.0,
                ..Default::default()
            },
            GradScalerConfig {
                growth_factor: 1.0,
                ..Default::default()
            },
            GradScalerConfig {
                backoff_factor: 1.5,
                ..Default::default()
            },
            GradScalerConfig {
                growth_interval: 0,
                ..Default::default()
            },
        ] {
            let e = GradScaler::new(config).unwrap_err().to_string();
            assert!(e.contains("grad_scaler."), "{e}");
        }
    }
}
