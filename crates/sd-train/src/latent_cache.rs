//! `--cache-latents`: each training image's VAE posterior (mean and standard deviation),
//! computed once and kept as a safetensors file named by the image's content and the
//! transform, so that later runs (and resumes) skip the encoder. An entry is trusted only if
//! it reads back whole with the expected shapes; anything else is recomputed and rewritten.
//! The posterior is cached rather than a sample of it, so every step still draws its own
//! latent, as without the cache. With aspect-ratio buckets each image is encoded at its
//! bucket's size (kohya's `--cache_latents` with `--enable_bucket`), and the bucket and the
//! resize are in the entry's name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sd_data::{
    CropInfo, Dataset, Transform, load_bucketed_image_cropped, load_example_image_cropped,
};
use sd_encoder::VaeEncoder;
use sha2::Digest;

use crate::error::{Result, TrainError};

/// One image's posterior, `[c, h, w]` each, flat.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPosterior {
    /// `[c, h, w]` of `mean` and `std`.
    pub shape: [usize; 3],
    /// The posterior's mean.
    pub mean: Vec<f32>,
    /// The posterior's standard deviation.
    pub std: Vec<f32>,
    /// Where the encoded pixels came from (SDXL's size and crop conditioning).
    pub crop: CropInfo,
}

/// The posteriors of a dataset's images, by image path.
#[derive(Debug, Clone)]
pub struct LatentCache {
    entries: HashMap<PathBuf, CachedPosterior>,
}

/// The pixels an image is encoded from: a square crop at the transform's resolution, or its
/// aspect-ratio bucket (`(width, height)`) after a resize to `resized`
/// ([`sd_data::BucketConfig::assign`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSize {
    /// The transform's `resolution × resolution` centre crop.
    Square,
    /// A bucket and the size the image is resized to before its centre crop.
    Bucket {
        /// The crop, `(width, height)`.
        bucket: (u32, u32),
        /// The size before the crop, `(width, height)`.
        resized: (u32, u32),
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// The cache file of an image: its content's SHA-256 and the transform (with buckets, the
/// bucket and the resize) in the name.
fn entry_name(bytes: &[u8], transform: &Transform, size: CacheSize, vae_hash: &str) -> String {
    let digest = sha2::Sha256::digest(bytes);
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let crop = if transform.center_crop {
        "centre"
    } else {
        "random"
    };
    match size {
        CacheSize::Square => format!(
            "{hex}-{}px-{crop}-{vae_hash}.safetensors",
            transform.resolution
        ),
        CacheSize::Bucket {
            bucket: (bw, bh),
            resized: (rw, rh),
        } => format!("{hex}-{bw}x{bh}-from-{rw}x{rh}-{crop}-{vae_hash}.safetensors"),
    }
}

fn read_entry(path: &Path, shape: [usize; 3]) -> Option<CachedPosterior> {
    let n = shape.iter().product::<usize>();
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
    // `[original width, height, crop left, top]`; an entry written before it was kept is
    // encoded again.
    let crop = {
        let view = file.tensor("crop").ok()?;
        if view.dtype() != safetensors::Dtype::U32 || view.shape() != [4] {
            return None;
        }
        let v: Vec<u32> = view
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        CropInfo {
            original: (v[0], v[1]),
            top_left: (v[2], v[3]),
        }
    };
    (mean.iter().chain(&std).all(|v| v.is_finite())).then_some(CachedPosterior {
        shape,
        mean,
        std,
        crop,
    })
}

fn write_entry(path: &Path, entry: &CachedPosterior) -> Result<()> {
    let shape = entry.shape;
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
    let c = entry.crop;
    let crop: Vec<u8> = [c.original.0, c.original.1, c.top_left.0, c.top_left.1]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::U32, vec![4], &crop);
    tensors.push(("crop", view.map_err(|e| io(path, e))?));
    let bytes = safetensors::serialize(tensors, None).map_err(|e| io(path, e))?;
    sd_core::files::write_atomic(path, |out| {
        use std::io::Write;
        out.write_all(&bytes).map_err(|e| e.to_string())
    })?;
    Ok(())
}

impl LatentCache {
    /// Fills the cache for every image of `dataset` under `dir`: reads the entries that are
    /// there and whole, encodes (and writes) the others. `size_of(i)` is the crop of the
    /// dataset's `i`-th example. `vae_hash` names the encoder's weights, so that another VAE
    /// never reuses these entries. With `share = Some((rank, world))` only every `world`-th
    /// image from the `rank`-th is taken (data-parallel peers filling one cache together
    /// before each reads all of it).
    #[allow(clippy::too_many_arguments)]
    pub fn build<B: Backend>(
        dataset: &Dataset,
        transform: &Transform,
        size_of: &dyn Fn(usize) -> CacheSize,
        (encoder, latent_channels, vae_hash): (&VaeEncoder<B>, usize, &str),
        dir: &Path,
        device: &B::Device,
        share: Option<(usize, usize)>,
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
        let factor = encoder.downsample_factor();
        // One entry per image file (a repeated image is one example several times over, with
        // one size: the size follows from the file).
        let mut images: Vec<(&PathBuf, CacheSize)> = dataset
            .examples()
            .iter()
            .enumerate()
            .map(|(i, e)| (&e.image, size_of(i)))
            .collect();
        images.sort_by(|a, b| a.0.cmp(b.0));
        images.dedup_by(|a, b| a.0 == b.0);
        if let Some((rank, world)) = share {
            images = images
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % world.max(1) == rank)
                .map(|(_, image)| image)
                .collect();
        }
        let mut entries = HashMap::new();
        let total = images.len();
        for (i, (image, size)) in images.into_iter().enumerate() {
            let (w, h) = match size {
                CacheSize::Square => (transform.resolution, transform.resolution),
                CacheSize::Bucket { bucket, .. } => bucket,
            };
            let (w, h) = (w as usize, h as usize);
            let shape = [latent_channels, h / factor, w / factor];
            let bytes = sd_core::files::read_regular(image)?;
            let path = dir.join(entry_name(&bytes, transform, size, vae_hash));
            let entry = match read_entry(&path, shape) {
                Some(entry) => entry,
                None => {
                    // Centre crop, no flip: the transform draws nothing from the generator.
                    let mut rng = sd_data::sample_rng(0, 0);
                    let (pixels, crop) = match size {
                        CacheSize::Square => {
                            load_example_image_cropped(image, transform, &mut rng)?
                        }
                        CacheSize::Bucket { bucket, resized } => load_bucketed_image_cropped(
                            image, bucket, resized, transform, &mut rng,
                        )?,
                    };
                    let x =
                        Tensor::<B, 4>::from_data(TensorData::new(pixels, [1, 3, h, w]), device);
                    let posterior = encoder.encode(x)?;
                    let flat = |t: Tensor<B, 4>| -> Result<Vec<f32>> {
                        t.into_data()
                            .convert::<f32>()
                            .to_vec()
                            .map_err(|e| TrainError::Io(format!("{e:?}")))
                    };
                    let entry = CachedPosterior {
                        shape,
                        mean: flat(posterior.mean)?,
                        std: flat(posterior.std)?,
                        crop,
                    };
                    write_entry(&path, &entry)?;
                    entry
                }
            };
            entries.insert(image.clone(), entry);
            progress(i + 1, total);
        }
        Ok(Self { entries })
    }

    /// The posterior of `image`.
    pub fn get(&self, image: &Path) -> Option<&CachedPosterior> {
        self.entries.get(image)
    }
}
