//! Finding the examples of a data folder in any of the three layouts (see the crate docs).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// The image file extensions read (lower case): PNG, JPEG and WebP.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// One training image and the captions it may be shown with (one is picked per use; none
/// means the empty caption).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The image file.
    pub image: PathBuf,
    /// Its captions; empty for the empty caption.
    pub captions: Vec<String>,
}

/// The examples of a data folder, repeats expanded.
#[derive(Debug, Clone)]
pub struct Dataset {
    root: PathBuf,
    examples: Vec<Example>,
    layout: &'static str,
}

fn layout_error(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Layout {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The sorted entries of a folder (sorted, so that the dataset's order does not depend on the
/// file system's).
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| layout_error(dir, e.to_string()))?;
    let mut out = Vec::new();
    for entry in read {
        out.push(entry.map_err(|e| layout_error(dir, e.to_string()))?.path());
    }
    out.sort();
    Ok(out)
}

/// kohya's caption file beside an image: `name.txt`, else `name.caption`; its first line.
fn caption_file(image: &Path) -> Result<Option<String>> {
    for ext in ["txt", "caption"] {
        let path = image.with_extension(ext);
        if path.is_file() {
            let text = sd_core::files::read_regular_to_string(&path)?;
            return Ok(Some(
                text.lines().next().unwrap_or_default().trim().to_string(),
            ));
        }
    }
    Ok(None)
}

/// An image whose header reads and whose size [`sd_core::image_io::decode_image`] accepts.
fn check_header(path: &Path) -> Result<()> {
    let (w, h) = sd_core::image_io::image_dimensions(path)?;
    let (side, pixels) = (
        sd_core::image_io::MAX_IMAGE_SIDE,
        sd_core::image_io::MAX_IMAGE_PIXELS,
    );
    if w == 0 || h == 0 || w > side || h > side || u64::from(w) * u64::from(h) > pixels {
        return Err(layout_error(
            path,
            format!(
                "the image is {w}×{h}; sides from 1 to {side} pixels and at most {} Mpx are read",
                pixels / 1_000_000
            ),
        ));
    }
    Ok(())
}

/// `N_name` → `(N, name)` for kohya's repeat folders.
fn repeat_folder(path: &Path) -> Option<(usize, String)> {
    let name = path.file_name()?.to_str()?;
    let (n, rest) = name.split_once('_')?;
    let n: usize = n.parse().ok()?;
    Some((n, rest.replace('_', " ")))
}

/// The most repeats one folder may ask for: more is surely a typo, and would only make the
/// example list huge.
const MAX_REPEATS: usize = 10_000;

impl Dataset {
    /// Reads the folder `root`. `caption_column` names the caption field of a `metadata.jsonl`
    /// (`text` when `None`, as diffusers' `--caption_column` defaults). Fails before any work
    /// when the folder does not exist, holds no image, or its metadata is malformed.
    pub fn open(root: impl AsRef<Path>, caption_column: Option<&str>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(layout_error(&root, "the data folder does not exist"));
        }
        let metadata = root.join("metadata.jsonl");
        let (examples, layout) = if metadata.is_file() {
            (
                Self::imagefolder(&root, &metadata, caption_column.unwrap_or("text"))?,
                "imagefolder (metadata.jsonl)",
            )
        } else {
            let repeat_dirs: Vec<(PathBuf, usize, String)> = entries(&root)?
                .into_iter()
                .filter(|p| p.is_dir())
                .filter_map(|p| repeat_folder(&p).map(|(n, name)| (p, n, name)))
                .collect();
            if repeat_dirs.is_empty() {
                (Self::caption_files(&root, 1, None)?, "caption files")
            } else {
                let mut all = Vec::new();
                for (dir, n, name) in repeat_dirs {
                    if n == 0 || n > MAX_REPEATS {
                        return Err(layout_error(
                            &dir,
                            format!("repeat count {n} must be from 1 to {MAX_REPEATS}"),
                        ));
                    }
                    all.extend(Self::caption_files(&dir, n, Some(&name))?);
                }
                (all, "repeat folders (N_name)")
            }
        };
        if examples.is_empty() {
            return Err(layout_error(
                &root,
                format!(
                    "no training images found (looked for {} files)",
                    IMAGE_EXTENSIONS.join(", ")
                ),
            ));
        }
        Ok(Self {
            root,
            examples,
            layout,
        })
    }

    fn imagefolder(root: &Path, metadata: &Path, column: &str) -> Result<Vec<Example>> {
        let text = sd_core::files::read_regular_to_string(metadata)?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| DataError::Metadata {
                path: metadata.to_path_buf(),
                line: line_no,
                reason,
            };
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
            let Some(object) = value.as_object() else {
                return Err(bad("not a JSON object".into()));
            };
            let file = object
                .get("file_name")
                .and_then(|f| f.as_str())
                .ok_or_else(|| bad("no `file_name` string".into()))?;
            let captions = match object.get(column) {
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                Some(serde_json::Value::Array(list)) => {
                    let captions: Option<Vec<String>> =
                        list.iter().map(|v| v.as_str().map(String::from)).collect();
                    captions.ok_or_else(|| bad(format!("`{column}` holds a non-string")))?
                }
                Some(_) => return Err(bad(format!("`{column}` is not a string or a list"))),
                None => {
                    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
                    keys.sort_unstable();
                    return Err(bad(format!(
                        "no caption column `{column}` (the line has: {})",
                        keys.join(", ")
                    )));
                }
            };
            let image = root.join(file);
            if Path::new(file).is_absolute() || file.split(['/', '\\']).any(|part| part == "..") {
                return Err(bad(format!(
                    "`{file}` is not a path inside the data folder"
                )));
            }
            if !image.is_file() {
                return Err(bad(format!("the image `{file}` does not exist")));
            }
            out.push(Example { image, captions });
        }
        Ok(out)
    }

    fn caption_files(dir: &Path, repeats: usize, fallback: Option<&str>) -> Result<Vec<Example>> {
        let mut out = Vec::new();
        for path in entries(dir)? {
            if !path.is_file() || !is_image(&path) {
                continue;
            }
            let caption = match caption_file(&path)? {
                Some(c) => c,
                None => fallback.unwrap_or_default().to_string(),
            };
            let example = Example {
                image: path,
                captions: vec![caption],
            };
            out.extend(std::iter::repeat_n(example, repeats));
        }
        Ok(out)
    }

    /// Reads every image's header (cheap: no pixels are decoded) and returns the first that
    /// cannot be read or whose size is refused (0×0, a decompression bomb), so that a bad file
    /// stops the run before any work rather than hours in.
    pub fn check_images(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for example in &self.examples {
            if seen.insert(&example.image) {
                check_header(&example.image)?;
            }
        }
        Ok(())
    }

    /// The dataset without the images [`Self::check_images`] would refuse, and the refusals
    /// (kohya's and diffusers' users expect `--skip-bad-images` to skip and count them).
    pub fn without_bad_images(mut self) -> (Self, Vec<DataError>) {
        let mut bad = Vec::new();
        let mut verdicts: std::collections::HashMap<PathBuf, bool> = Default::default();
        self.examples.retain(|e| {
            *verdicts
                .entry(e.image.clone())
                .or_insert_with(|| match check_header(&e.image) {
                    Ok(()) => true,
                    Err(err) => {
                        bad.push(err);
                        false
                    }
                })
        });
        (self, bad)
    }

    /// The data folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Which layout was recognised, for messages.
    pub fn layout(&self) -> &'static str {
        self.layout
    }

    /// The examples, repeats expanded.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// How many examples (repeats counted).
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example (never, for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}
