//! Image-generation metrics with the numbers of the Python packages researchers quote:
//! the Fréchet Inception Distance as pytorch-fid computes it ([`fid`]), the Kernel Inception
//! Distance and Inception Score as torch-fidelity does ([`kid`],
//! [`inception_score`](mod@inception_score)), over the FID InceptionV3 ([`inception`]) fed as
//! each package feeds it ([`preprocess`]), with feature statistics accumulated in f64 and kept
//! in pytorch-fid's `.npz` files ([`stats`]), and the CLIP score as torchmetrics defines it on a transformers CLIP model ([`clip_score`]).
//!
//! Why a crate of its own: each reference package resizes images its own way, draws its own
//! random subsets and takes the matrix square root its own way, and a few hundredths of FID hang
//! on those details; one crate keeps them exact and in one place, so that `sd eval` and library
//! users get the number of the paper they compare against.

pub mod clip_score;
pub mod decode;
mod error;
pub mod extract;
pub mod fid;
pub mod folder;
pub mod inception;
pub mod inception_score;
pub mod kid;
pub mod numpy_random;
pub mod preprocess;
pub mod stats;

pub use clip_score::ClipScorer;
pub use error::{MetricsError, Result};
pub use extract::{BatchFeatures, FeatureExtractor};
pub use fid::frechet_distance;
pub use inception::InceptionV3;
pub use inception_score::{InceptionScore, IsOptions, inception_score};
pub use kid::{Features, Kid, KidOptions, kernel_inception_distance};
pub use preprocess::Preprocess;
pub use stats::{FeatureAccumulator, Statistics};
