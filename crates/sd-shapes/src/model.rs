//! The shapes model: a small latent diffusion model (VAE, CLIP text encoder, U-Net) trained
//! from scratch on this crate's dataset by `cargo xtask train-shapes`, embedded in the binary
//! so that `sd generate "a red circle above a blue square"` draws with nothing downloaded.
//!
//! The model is a diffusers folder (f16 weights, about 22 MB). The loaders read folders, so
//! [`install`] writes the embedded files once into a folder named by their content hash (a
//! temporary folder renamed into place, so a crash never leaves half a model) and later calls
//! reuse it.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Result, ShapesError};

#[cfg(shapes_model)]
macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../model/", $path)) as &[u8])),*]
    };
}

/// The model's files: path inside the diffusers folder, content. Empty in a build made before
/// the model was trained (see [`is_built_in`]).
#[cfg(not(shapes_model))]
pub const FILES: &[(&str, &[u8])] = &[];

/// The model's files: path inside the diffusers folder, content.
#[cfg(shapes_model)]
pub const FILES: &[(&str, &[u8])] = embedded![
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// True when this build holds the trained model (its files were in `model/` when it was built).
pub const fn is_built_in() -> bool {
    !FILES.is_empty()
}

/// The sampling steps `sd generate` uses for this model unless told otherwise: 30 steps of its
/// own sampler (Euler ancestral, trailing spacing), the best of the settings measured with
/// `sd eval shapes` (docs/shapes.md).
pub const DEFAULT_STEPS: usize = 30;

/// The classifier-free guidance scale `sd generate` uses for this model unless told otherwise:
/// 3, measured best (7.5 drew more duplicated objects and fewer passing images; 1, no
/// guidance, fewer as well).
pub const DEFAULT_GUIDANCE: f64 = 3.0;

/// The first 16 hex digits of the SHA-256 over every file's path and content: the name of the
/// folder [`install`] writes, so that another build's model never reuses it.
pub fn content_hash() -> String {
    let mut hasher = sha2::Sha256::new();
    for (path, bytes) in FILES {
        hasher.update((path.len() as u64).to_le_bytes());
        hasher.update(path.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where [`install`] puts the model when not told: `$SD_CACHE`, else `$XDG_CACHE_HOME/sd`,
/// else `~/.cache/sd`, else the system's temporary folder.
pub fn default_cache() -> PathBuf {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    env("SD_CACHE")
        .map(PathBuf::from)
        .or_else(|| env("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sd")))
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache/sd")))
        .unwrap_or_else(|| std::env::temp_dir().join("sd"))
}

fn io(path: &Path, source: std::io::Error) -> ShapesError {
    ShapesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// True if `dir` holds every embedded file with its exact content.
fn is_whole(dir: &Path) -> bool {
    FILES.iter().all(|(path, bytes)| {
        std::fs::read(dir.join(path)).is_ok_and(|on_disk| on_disk.as_slice() == *bytes)
    })
}

/// The model as a diffusers folder under `cache` (`shapes-model-HASH`), written there first if
/// it is missing or damaged. Returns the folder.
pub fn install(cache: &Path) -> Result<PathBuf> {
    if !is_built_in() {
        return Err(ShapesError::NoModel);
    }
    let dir = cache.join(format!("shapes-model-{}", content_hash()));
    if is_whole(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(|e| io(cache, e))?;
    // Written beside its final place and renamed: readers see the whole model or none.
    let partial = cache.join(format!(
        ".shapes-model-{}.partial-{}",
        content_hash(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    for (path, bytes) in FILES {
        let file = partial.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let mut out = std::fs::File::create(&file).map_err(|e| io(&file, e))?;
        out.write_all(bytes)
            .and_then(|()| out.sync_all())
            .map_err(|e| io(&file, e))?;
    }
    if dir.exists() {
        // A damaged copy (or one another process is replacing): set it aside first.
        let _ = std::fs::remove_dir_all(&dir);
    }
    match std::fs::rename(&partial, &dir) {
        Ok(()) => Ok(dir),
        // Another process installed the same model meanwhile.
        Err(_) if is_whole(&dir) => {
            let _ = std::fs::remove_dir_all(&partial);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(io(&dir, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(not(shapes_model), ignore = "the model is not trained yet")]
    fn install_writes_every_file_once_and_repairs_a_damaged_copy() {
        let cache = std::env::temp_dir().join(format!("sd-shapes-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let dir = install(&cache).unwrap();
        assert!(is_whole(&dir));
        let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
        let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
        assert_eq!(install(&cache).unwrap(), dir);
        assert_eq!(
            std::fs::metadata(&weights).unwrap().modified().unwrap(),
            written,
            "a whole copy is reused, not rewritten"
        );
        std::fs::write(&weights, b"truncated").unwrap();
        assert_eq!(install(&cache).unwrap(), dir);
        assert!(is_whole(&dir), "a damaged copy is rewritten");
        let leftovers: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    #[cfg_attr(not(shapes_model), ignore = "the model is not trained yet")]
    fn the_model_is_a_diffusers_folder_within_the_size_budget() {
        let weights: usize = FILES
            .iter()
            .filter(|(p, _)| p.ends_with(".safetensors"))
            .map(|(_, b)| b.len())
            .sum();
        assert!(weights <= 25_000_000, "{weights} bytes of weights");
        let index: serde_json::Value = serde_json::from_slice(
            FILES
                .iter()
                .find(|(p, _)| *p == "model_index.json")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    }
}
