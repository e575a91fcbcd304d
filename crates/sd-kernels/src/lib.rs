//! The workspace's hand-written kernels, kept apart from the models that call them.
//!
//! Nothing here is specific to Stable Diffusion: convolutions, attention, linear layers,
//! GroupNorm and activations written against raw f32 buffers, and the allocator settings they
//! are tuned to. This crate holds the libraries' only `unsafe` (pointer arithmetic for
//! `gemm`, shared output buffers across rayon tasks, `mallopt`); `sd-core` forbids it and
//! reaches the kernels only from its layer entry points (`sd_core::layers::conv2d_forward`
//! and the like), which fall back to Burn's own ops for every other backend, dtype or shape.
//!
//! - [`cpu`] (feature `flex`): fused kernels on Burn's Flex backend, through `try_*` functions
//!   that take Burn tensors and modules and give the input back when they do not apply;
//! - [`route`]: the typed check that a generic backend is a concrete one, and the conversion
//!   of its tensors, with no conversion that can fail;
//! - [`allocator`]: glibc settings that keep freed buffers for the next layer.

pub mod allocator;
#[cfg(feature = "flex")]
pub mod cpu;
pub mod route;
