//! Training maths as library code, so that `sd train`'s loop stays thin and every piece can be
//! checked against the reference on its own.
//!
//! Burn 0.21 has the building blocks but not diffusers' semantics: its AdamW defaults differ
//! (ε 1e-5, weight decay 1e-4), `GradientClipping::Norm` clips each tensor alone where
//! `torch.nn.utils.clip_grad_norm_` clips by the norm over all parameters, its gradient
//! accumulator sums, it has no EMA, and its optimiser records are keyed by `ParamId`s that a
//! model rebuilt from safetensors does not keep. Here every per-parameter state is held in the
//! module's own parameter order and saved as a module of the same type, so it is written and
//! read back through the model's own key map, exactly like its weights.
//!
//! - [`Gradients`]: gradients gathered from one or more backward passes, their global norm and
//!   clipping by it.
//! - [`AdamW`]: `torch.optim.AdamW` with diffusers' training-script defaults.
//! - [`LrSchedule`]: diffusers' `get_scheduler` learning-rate schedules.
//! - [`Ema`]: diffusers' `EMAModel` (its decay rule and warm-up form).
//! - [`DenoisingObjective`]: the loss of `train_text_to_image.py` (ε, v or x₀ targets,
//!   Min-SNR-γ weighting, input perturbation).
//! - [`VaeObjective`]: the autoencoder's reconstruction + KL objective, optionally with the
//!   adversarial term of a [`PatchDiscriminator`].
//! - [`MixedPrecision`]: forward and backward passes in bf16 or f16 on f32 weights.
//! - [`GradScaler`]: `torch.amp.GradScaler`'s dynamic loss scaling, which f16 needs.
//! - [`Peer`]: data-parallel training on `burn-collective` (gradients averaged across
//!   threads and machines before each step).
//! - [`train_unet`]: the loop that composes them with the data, checkpoints and resume.

mod adamw;
pub mod checkpoint;
mod config;
mod discriminator;
mod ema;
mod error;
mod grad_scaler;
mod gradients;
mod inpainting;
mod latent_cache;
mod lora;
mod lr;
mod node_link;
mod objective;
mod parallel;
mod params;
mod plot;
mod precision;
mod run;
mod run_vae;
mod summary_dropout;
mod text_cache;
mod train_log;
mod vae;

pub use adamw::{AdamW, AdamWConfig};

/// Set by [`request_stop`]: the loops checkpoint after the step in progress and return
/// [`TrainError::Stopped`].
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running loop to stop after its current step, with a checkpoint (what `sd train`
/// does on Ctrl-C or SIGTERM). Safe to call from a signal handler's thread.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}
pub use config::{LoraConfig, TrainConfig};
pub use discriminator::{
    DiscriminatorBlock, DiscriminatorConfig, PatchDiscriminator, discriminator_hinge_loss,
    generator_hinge_loss,
};
pub use ema::{Ema, EmaConfig};
pub use error::{Result, TrainError};
pub use grad_scaler::{GradScaler, GradScalerConfig, GradScalerState};
pub use gradients::Gradients;
pub use latent_cache::{CacheSize, CachedPosterior, LatentCache};
pub use lr::{LrSchedule, LrScheduleKind};
pub use objective::{DenoisingBatch, DenoisingObjective};
pub use parallel::{ParallelConfig, Peer};
pub use params::{flat_params, with_flat_params};
pub use plot::{plot_loss, register_font};
pub use precision::{MixedPrecision, to_dtype};
pub use run::{Event, Resume, train_unet, train_unet_parallel};
pub use run_vae::{train_vae, train_vae_parallel};
pub use train_log::{StepLog, read_log};
pub use vae::{AdversarialLosses, Reconstruction, VaeLosses, VaeObjective};
