//! Learning-rate schedules as diffusers' `get_scheduler` builds them (`LambdaLR` factors of the
//! base rate, indexed by the number of optimiser steps already taken).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The schedule's shape, by diffusers' `--lr_scheduler` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// The base rate throughout (warm-up steps are ignored, as diffusers does).
    Constant,
    /// Linear warm-up from 0, then the base rate.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at the last step.
    Linear,
    /// Linear warm-up, then half a cosine down to 0 at the last step.
    Cosine,
    /// Linear warm-up, then `num_cycles` cosine cycles, each restarting from the base rate.
    CosineWithRestarts,
    /// Linear warm-up, then polynomial decay (power 1) to `lr_end` = 1e-7.
    Polynomial,
}

impl LrScheduleKind {
    /// The diffusers name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts => "cosine_with_restarts",
            Self::Polynomial => "polynomial",
        }
    }

    /// Parses a diffusers name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts,
            "polynomial" => Self::Polynomial,
            other => {
                return Err(TrainError::Config(format!(
                    "unknown learning-rate schedule `{other}` (constant, constant_with_warmup, \
                     linear, cosine, cosine_with_restarts, polynomial)"
                )));
            }
        })
    }
}

/// A schedule over `total_steps` optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The base learning rate.
    pub base: f64,
    /// The schedule's shape.
    pub kind: LrScheduleKind,
    /// Steps of linear warm-up from 0 (ignored by `constant`).
    pub warmup_steps: u64,
    /// The run's optimiser steps: where the decaying schedules reach their end.
    pub total_steps: u64,
    /// Cycles of `cosine_with_restarts` (diffusers' `--lr_num_cycles`, default 1).
    pub num_cycles: f64,
}

impl LrSchedule {
    /// A schedule, checked.
    pub fn new(
        base: f64,
        kind: LrScheduleKind,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self> {
        if !(base.is_finite() && base >= 0.0) {
            return Err(TrainError::Config(format!(
                "the learning rate must be ≥ 0, got {base}"
            )));
        }
        Ok(Self {
            base,
            kind,
            warmup_steps,
            total_steps,
            num_cycles: 1.0,
        })
    }

    /// The learning rate of the optimiser step taken after `step` steps (0 for the first).
    pub fn lr(&self, step: u64) -> f64 {
        self.base * self.factor(step)
    }

    /// The factor of the base rate after `step` steps, as diffusers' lambdas compute it.
    pub fn factor(&self, step: u64) -> f64 {
        let s = step as f64;
        let warmup = self.warmup_steps as f64;
        let total = self.total_steps as f64;
        if self.kind != LrScheduleKind::Constant && step < self.warmup_steps {
            return s / warmup.max(1.0);
        }
        match self.kind {
            LrScheduleKind::Constant | LrScheduleKind::ConstantWithWarmup => 1.0,
            LrScheduleKind::Linear => 0f64.max((total - s) / (total - warmup).max(1.0)),
            LrScheduleKind::Cosine => {
                // `num_cycles` 0.5: half a period, from 1 down to 0.
                let progress = (s - warmup) / (total - warmup).max(1.0);
                0f64.max(0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos()))
            }
            LrScheduleKind::CosineWithRestarts => {
                let progress = (s - warmup) / (total - warmup).max(1.0);
                if progress >= 1.0 {
                    return 0.0;
                }
                0f64.max(0.5 * (1.0 + (PI * ((self.num_cycles * progress) % 1.0)).cos()))
            }
            LrScheduleKind::Polynomial => {
                let lr_end = 1e-7;
                if step > self.total_steps {
                    return lr_end / self.base.max(f64::MIN_POSITIVE);
                }
                let range = self.base - lr_end;
                let remaining = 1.0 - (s - warmup) / (total - warmup).max(1.0);
                (range * remaining + lr_end) / self.base.max(f64::MIN_POSITIVE)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors(kind: LrScheduleKind, warmup: u64, total: u64) -> Vec<f64> {
        let s = LrSchedule::new(1.0, kind, warmup, total).unwrap();
        (0..=total).map(|i| s.factor(i)).collect()
    }

    #[test]
    fn warmup_then_decay_as_diffusers() {
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(
            &factors(LrScheduleKind::ConstantWithWarmup, 2, 4),
            &[0.0, 0.5, 1.0, 1.0, 1.0]
        ));
        assert!(close(
            &factors(LrScheduleKind::Linear, 1, 5),
            &[0.0, 1.0, 0.75, 0.5, 0.25, 0.0]
        ));
        assert!(close(
            &factors(LrScheduleKind::Cosine, 0, 4),
            &[
                1.0,
                0.853_553_390_593_273_7,
                0.5,
                0.146_446_609_406_726_3,
                0.0
            ]
        ));
        assert!(close(
            &factors(LrScheduleKind::Constant, 3, 2),
            &[1.0, 1.0, 1.0]
        ));
        assert!(LrScheduleKind::from_name("cosine_warm").is_err());
    }
}
