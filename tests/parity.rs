//! Every parity and round-trip test of the workspace, as modules of one test binary.
//!
//! One binary rather than one per file: each test binary links all of Burn (40-90 MB each in
//! the dev profile), and nineteen of them filled the disk of a CI machine. Run one file's cases
//! with a filter, e.g. `cargo test -p sd-tests --test parity unet_parity::`.
//! The fuzzer (`fuzz.rs`) stays a binary of its own: it installs a global allocator.

mod common;

mod clip_parity;
mod clip_vision_parity;
mod controlnet_parity;
mod diffusion_parity;
mod ip_adapter_parity;
mod lora_parity;
mod metrics_parity;
mod pipeline_parity;
mod roundtrip_parity;
mod save_roundtrip;
mod scheduler_parity;
mod tokenizer_parity;
mod training;
mod training_parity;
mod unet_parity;
mod upscale_parity;
mod vae_parity;
mod weight_errors;
mod x4_upscaler_parity;
