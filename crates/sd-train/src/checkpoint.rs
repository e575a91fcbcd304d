//! `checkpoint-<step>/` folders: written whole into a hidden sibling and renamed into place,
//! so a crash (even SIGKILL mid-write) leaves either the complete checkpoint or none; the
//! oldest pruned past `keep`; the newest complete one found again for `--resume latest`.
//!
//! A checkpoint is a diffusers folder (`sd generate --model out/checkpoint-500` works: the
//! components that do not train are hard-linked from the base model) plus `unet_ema/`,
//! `optimizer/` (the Adam moments, saved as U-Net weight files under diffusers' keys) and
//! `training_state.json`, written last.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The file that marks a checkpoint complete and says where the run stood.
pub const STATE_FILE: &str = "training_state.json";

/// Where a run stood when a checkpoint was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimiser steps taken.
    pub step: u64,
    /// EMA updates made (`None` without EMA).
    pub ema_steps: Option<u64>,
    /// The loss scaler's state under f16 mixed precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<crate::grad_scaler::GradScalerState>,
    /// The settings of the run that wrote it.
    pub config: TrainConfig,
}

impl TrainingState {
    /// The optimiser steps actually applied: the steps less those an f16 overflow skipped
    /// (AdamW's bias correction counts these).
    pub fn optimizer_steps(&self) -> u64 {
        self.step
            - self
                .grad_scaler
                .map_or(0, |s| s.skipped_steps.min(self.step))
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// `output/checkpoint-<step>`.
pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Every `checkpoint-<step>` under `output` that has its state file, oldest first. Folders
/// without it are not checkpoints (a copy interrupted by hand, say) and are ignored.
pub fn list_checkpoints(output: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(read) = std::fs::read_dir(output) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = read
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let path = e.path();
            path.join(STATE_FILE).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// Reads a checkpoint's state file.
pub fn read_state(dir: &Path) -> Result<TrainingState> {
    let path = dir.join(STATE_FILE);
    let text = sd_core::files::read_regular_to_string(&path)?;
    serde_json::from_str(&text).map_err(|e| io(&path, format!("not a training state: {e}")))
}

/// Writes `checkpoint-<step>` under `output`: `fill` writes the contents into a temporary
/// folder, the state file goes in last, and the folder is renamed into place; then the
/// oldest checkpoints beyond `keep` (0: keep all) are removed. Returns the checkpoint's path.
pub fn write_checkpoint(
    output: &Path,
    state: &TrainingState,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let target = checkpoint_dir(output, state.step);
    let partial = output.join(format!(".checkpoint-{}.partial", state.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
    let result = (|| {
        fill(&partial)?;
        let json = serde_json::to_string_pretty(state).map_err(|e| io(&partial, e))?;
        sd_core::files::write_atomic(partial.join(STATE_FILE), |out| {
            use std::io::Write;
            out.write_all(json.as_bytes()).map_err(|e| e.to_string())
        })?;
        if target.exists() {
            // Only a checkpoint of the same step (a run redone from an earlier one).
            std::fs::remove_dir_all(&target).map_err(|e| io(&target, e))?;
        }
        std::fs::rename(&partial, &target).map_err(|e| io(&target, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if keep > 0 {
        let all = list_checkpoints(output);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
        }
    }
    Ok(target)
}

/// Removes the temporary folders a killed run left behind.
pub fn remove_partials(output: &Path) {
    if let Ok(read) = std::fs::read_dir(output) {
        for e in read.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".checkpoint-") && name.ends_with(".partial") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Copies `from` into `to`, recursively. Not hard links: a tool that later rewrites a file of
/// the copy in place (diffusers' `save_pretrained` opens with truncation) would change the
/// base model too.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
        for e in std::fs::read_dir(from).map_err(|e| io(from, e))? {
            let e = e.map_err(|e| io(from, e))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        if to.exists() {
            std::fs::remove_file(to).map_err(|e| io(to, e))?;
        }
        std::fs::copy(from, to).map(|_| ()).map_err(|e| io(to, e))
    }
}

/// Copies a diffusers folder's `model_index.json` and every component it lists, except those
/// in `except`, into `to`.
pub fn copy_components(base: &Path, to: &Path, except: &[&str]) -> Result<()> {
    let index = base.join("model_index.json");
    let text = sd_core::files::read_regular_to_string(&index)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io(&index, format!("not valid JSON: {e}")))?;
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    copy_tree(&index, &to.join("model_index.json"))?;
    if let Some(map) = value.as_object() {
        for (name, pair) in map {
            let listed = pair
                .as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|v| !v.is_null()));
            if listed && !name.starts_with('_') && !except.contains(&name.as_str()) {
                let dir = base.join(name);
                if dir.is_dir() {
                    copy_tree(&dir, &to.join(name))?;
                }
            }
        }
    }
    Ok(())
}
