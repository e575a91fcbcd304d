//! `--cache-latents`: each training image's VAE posterior (mean and standard deviation),
//! computed once and kept as a safetensors file named by the image's content and the
//! transform, so that later runs (and resumes) skip the encoder. An entry is trusted only if
//! it reads back whole with the expected shapes; anything else is recomputed and rewritten.
//! The posterior is cached rather than a sample of it, so every step still draws its own
//! latent, as without the cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_data::{Dataset, Transform, load_example_image};
use sd_encoder::VaeEncoder;
use sha2::Digest;

use crate::error::{Result, TrainError};

/// One image's posterior, `[c, h, w]` each, flat.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPosterior {
    /// The posterior's mean.
    pub mean: Vec<f32>,
    /// The posterior's standard deviation.
    pub std: Vec<f32>,
}

/// The posteriors of a dataset's images, by image path.
#[derive(Debug, Clone)]
pub struct LatentCache {
    entries: HashMap<PathBuf, CachedPosterior>,
    shape: [usize; 3],
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// The cache file of an image: its content's SHA-256 and the transform in the name.
fn entry_name(bytes: &[u8], transform: &Transform, vae_hash: &str) -> String {
    let digest = sha2::Sha256::digest(bytes);
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{hex}-{}px-{}-{vae_hash}.safetensors",
        transform.resolution,
        if transform.center_crop {
            "centre"
        } else {
            "random"
        }
    )
}

fn read_entry(path: &Path, n: usize) -> Option<CachedPosterior> {
    let bytes = std::fs::read(path).ok()?;
    let file = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let read = |name: &str| -> Option<Vec<f32>> {
        let view = file.tensor(name).ok()?;
        if view.dtype() != safetensors::Dtype::F32 || view.shape().iter().product::<usize>() != n {
            return None;
        }
        Some(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    };
    let (mean, std) = (read("mean")?, read("std")?);
    (mean.iter().chain(&std).all(|v| v.is_finite())).then_some(CachedPosterior { mean, std })
}

fn write_entry(path: &Path, entry: &CachedPosterior, shape: [usize; 3]) -> Result<()> {
    let as_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (mean, std) = (as_bytes(&entry.mean), as_bytes(&entry.std));
    let views = [("mean", &mean), ("std", &std)].map(|(name, data)| {
        (
            name,
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), data),
        )
    });
    let mut tensors = Vec::new();
    for (name, view) in views {
        tensors.push((name, view.map_err(|e| io(path, e))?));
    }
    let bytes = safetensors::serialize(tensors, None).map_err(|e| io(path, e))?;
    sd_core::files::write_atomic(path, |out| {
        use std::io::Write;
        out.write_all(&bytes).map_err(|e| e.to_string())
    })?;
    Ok(())
}

impl LatentCache {
    /// Fills the cache for every image of `dataset` under `dir`: reads the entries that are
    /// there and whole, encodes (and writes) the others. `vae_hash` names the encoder's
    /// weights, so that another VAE never reuses these entries.
    pub fn build<B: Backend>(
        dataset: &Dataset,
        transform: &Transform,
        (encoder, latent_channels, vae_hash): (&VaeEncoder<B>, usize, &str),
        dir: &Path,
        device: &B::Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if !transform.center_crop || transform.random_flip {
            return Err(TrainError::Config(
                "--cache-latents needs the same pixels every epoch: not with --random-crop or \
                 --random-flip"
                    .into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let side = transform.resolution as usize;
        let latent = side / encoder.downsample_factor();
        let shape = [latent_channels, latent, latent];
        let n = shape.iter().product();
        let mut images: Vec<&PathBuf> = dataset.examples().iter().map(|e| &e.image).collect();
        images.sort();
        images.dedup();
        let mut entries = HashMap::new();
        let total = images.len();
        for (i, image) in images.into_iter().enumerate() {
            let bytes = sd_core::files::read_regular(image)?;
            let path = dir.join(entry_name(&bytes, transform, vae_hash));
            let entry = match read_entry(&path, n) {
                Some(entry) => entry,
                None => {
                    // Centre crop, no flip: the transform draws nothing from the generator.
                    let mut rng = sd_data::sample_rng(0, 0);
                    let pixels = load_example_image(image, transform, &mut rng)?;
                    let x = Tensor::<B, 4>::from_data(
                        TensorData::new(pixels, [1, 3, side, side]),
                        device,
                    );
                    let posterior = encoder.encode(x)?;
                    let flat = |t: Tensor<B, 4>| -> Result<Vec<f32>> {
                        t.into_data()
                            .convert::<f32>()
                            .to_vec()
                            .map_err(|e| TrainError::Io(format!("{e:?}")))
                    };
                    let entry = CachedPosterior {
                        mean: flat(posterior.mean)?,
                        std: flat(posterior.std)?,
                    };
                    write_entry(&path, &entry, shape)?;
                    entry
                }
            };
            entries.insert(image.clone(), entry);
            progress(i + 1, total);
        }
        Ok(Self { entries, shape })
    }

    /// The posterior of `image`.
    pub fn get(&self, image: &Path) -> Option<&CachedPosterior> {
        self.entries.get(image)
    }

    /// `[c, h, w]` of every entry.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }
}
