//! Stable Diffusion in Rust: load a model a user has on disk (a diffusers folder, a single-file
//! `.safetensors` checkpoint, or a Hugging Face repo id in the local cache) and generate images.
//!
//! ```no_run
//! use sd::{GenerateOptions, Model, generate, save_png};
//! use sd::backend::{Backend, DefaultBackend};
//!
//! # fn main() -> sd::Result<()> {
//! let model = Model::open("stable-diffusion-v1-5")?;
//! let options = GenerateOptions {
//!     prompt: sd::PromptOptions::new("a photograph of an astronaut riding a horse"),
//!     sampling: sd::Sampling {
//!         seed: 42,
//!         ..Default::default()
//!     },
//!     ..GenerateOptions::default()
//! };
//! let device = Default::default();
//! let out = generate::<DefaultBackend>(&model, &options, &device, None)?;
//! for image in sd::to_images(out.images)? {
//!     save_png(&image, "astronaut.png", &sd::parameters_text(&model, &options, &out.sampler))?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The stage crates are re-exported for custom pipelines.

mod control;
mod error;
mod family;
mod finite;
mod image_prompt;
mod latent_tiles;
pub mod memory;
mod model;
mod output;
mod pipeline;
mod save;
mod single_file;
mod upscale_x4;

pub use control::{Control, ControlNetSource, ControlStack, canny_edges, control_image_data};
pub use error::{Result, SdError};
pub use family::ModelFamily;
pub use finite::check_finite;
pub use image_prompt::ImagePrompt;
pub use latent_tiles::{LatentTiling, TilePlan};
pub use model::{LoraApplication, MAX_CLIP_SKIP, Model, UpscalerParts, hub_cache_snapshot};
pub use output::{parameters_text, prompt_of_parameters, read_parameters, save_png, to_images};
pub use pipeline::{
    Denoiser, GenerateOptions, Generated, Guidance, ImageConditioning, ImageTask, InpaintLatents,
    InpaintTask, MAX_GUIDANCE, MAX_IMAGES, MAX_SIDE, MAX_STEPS, MicroConditioning,
    PromptConditioning, PromptOptions, Sampling, StepCallback, StepProgress, Task, decode,
    encode_prompts, generate, generate_with_noise, initial_latents, inpainting_latents,
    noised_image_latents, reconstruct,
};
pub use save::check_model_output;
pub use sd_core::vae_keys::ldm_vae_key;
pub use single_file::{CheckpointLayout, TextPrefix, detect as detect_checkpoint};
pub use upscale_x4::{DEFAULT_NOISE_LEVEL, upscale_x4_with_noise};

pub use sd_conditioner as conditioner;
pub use sd_core as core;
pub use sd_core::backend;
pub use sd_decoder as decoder;
pub use sd_diffusion as diffusion;
pub use sd_encoder as encoder;
pub use sd_lora as lora;
pub use sd_schedulers as schedulers;
pub use sd_unet as unet;
