//! Folders of images as the reference packages list them, and their features batch by batch.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::decode::read_rgb;
use crate::error::{MetricsError, Result};
use crate::extract::{BatchFeatures, FeatureExtractor};

/// The extensions pytorch-fid's `fid_score` takes (compared case-insensitively here;
/// torch-fidelity takes `png`, `jpg` and `jpeg`).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];

/// The images directly in `dir` (not in sub-folders), sorted by path as pytorch-fid sorts them;
/// an error when `dir` is not a folder or holds no image.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let fail = |reason: String| MetricsError::Image {
        path: dir.to_path_buf(),
        reason,
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| fail(format!("not a readable folder ({e})")))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| fail(e.to_string()))?.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(fail(format!(
            "holds no image (looked for {})",
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    files.sort();
    Ok(files)
}

/// The features of `files`, `batch` images per forward pass; `progress` is told how many images
/// are done after each batch.
pub fn features_of_files<B: Backend>(
    extractor: &FeatureExtractor<B>,
    files: &[PathBuf],
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<BatchFeatures> {
    let mut all = BatchFeatures::default();
    for chunk in files.chunks(batch.max(1)) {
        let images = chunk
            .iter()
            .map(|p| read_rgb(p))
            .collect::<Result<Vec<_>>>()?;
        let features = extractor.features(&images)?;
        all.pool3.extend(features.pool3);
        all.logits.extend(features.logits);
        progress(chunk.len());
    }
    Ok(all)
}
