//! `train_log.jsonl`: one JSON line per optimiser step, appended as the run goes, trimmed back
//! to the checkpoint on resume, read back for the loss plot.

use std::path::Path;

use crate::error::{Result, TrainError};

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    /// The step just taken, from 1.
    pub step: u64,
    /// The mean loss over its micro-batches.
    pub loss: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// The gradient norm before clipping (NaN, written `null`, on a step an f16 overflow
    /// skipped).
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    /// Seconds since the run (or its resume) started.
    pub time: f64,
    /// Under f16 mixed precision: the loss scale the step used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Under f16 mixed precision: the step's gradients overflowed and the optimiser step was
    /// skipped (weights and learning-rate schedule unchanged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// `sd train vae` with a discriminator, from its start: the adversarial term's weight
    /// (factor × weight × the adaptive ratio; the mean over micro-batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversarial_weight: Option<f64>,
    /// `sd train vae` with a discriminator, from its start: the discriminator's hinge loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discriminator_loss: Option<f64>,
}

/// serde_json writes a non-finite number as `null`; read it back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Opens the log for appending, keeping only the lines of steps up to `start` (a resume drops
/// what the interrupted run logged past its checkpoint).
pub(crate) fn keep_log(path: &Path, start: u64) -> Result<std::fs::File> {
    let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", path.display()));
    let kept: String = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|line| {
                serde_json::from_str::<StepLog>(line).is_ok_and(|entry| entry.step <= start)
            })
            .map(|line| format!("{line}\n"))
            .collect(),
        Err(_) => String::new(),
    };
    std::fs::write(path, kept).map_err(io)?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io)
}

/// Reads a run's `train_log.jsonl`.
pub fn read_log(path: &Path) -> Result<Vec<StepLog>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}
