//! Files in and out, as a careful Unix tool handles them.
//!
//! - Inputs must be regular files: reading a FIFO or a device blocks forever or never ends, so
//!   every file the workspace reads (weights, configs, tokenizer files, images, latents) goes
//!   through [`regular_file`] first.
//! - Outputs never replace what is not ours: [`check_output_path`] refuses a path that exists
//!   and is not a regular file (a folder, a device node, a FIFO, a symlink), and
//!   [`write_atomic`] writes beside the target and renames into place, removing the temporary
//!   file on every error path, so a failure leaves neither a half-written file nor a stray one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// What a path that is not a regular file is, in words for an error message.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        special_kind(t)
    }
}

#[cfg(unix)]
fn special_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: std::fs::FileType) -> &'static str {
    "not a regular file"
}

fn not_regular(path: &Path, what: &str) -> CoreError {
    CoreError::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {what}, not a regular file"),
        ),
    )
}

/// The metadata of `path` (symlinks followed) when it is a regular file; a clear error naming
/// the path when it is missing, a folder, a FIFO or a device.
pub fn regular_file(path: impl AsRef<Path>) -> Result<std::fs::Metadata> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| CoreError::io(path, e))?;
    if meta.is_file() {
        Ok(meta)
    } else {
        Err(not_regular(path, kind_of(&meta)))
    }
}

/// Whether `path` is a regular file (symlinks followed); `false` when it is missing.
pub fn is_regular_file(path: impl AsRef<Path>) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Reads a regular file whole.
pub fn read_regular(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    regular_file(path)?;
    std::fs::read(path).map_err(|e| CoreError::io(path, e))
}

/// Reads a regular file whole as UTF-8 text.
pub fn read_regular_to_string(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    regular_file(path)?;
    std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))
}

/// Checks that `path` can be written as an output of ours: its folder exists and is a folder,
/// and the path itself is absent or a regular file (which is then replaced). A symlink is
/// refused rather than followed out of the folder, and so is anything else that is not ours
/// to replace.
pub fn check_output_path(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let dir = output_dir(path);
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) => {
            return Err(CoreError::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "is {}, so it cannot hold the output {}",
                        kind_of(&meta),
                        path.display()
                    ),
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CoreError::io(
                &dir,
                std::io::Error::new(e.kind(), "the output folder does not exist"),
            ));
        }
        Err(e) => return Err(CoreError::io(&dir, e)),
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) => Err(CoreError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "exists and is {}; outputs only replace regular files",
                    kind_of(&meta)
                ),
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CoreError::io(path, e)),
    }
}

/// The folder an output path lands in (`.` for a bare file name).
fn output_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Writes `path` atomically: `write` fills a temporary file in the same folder (so the rename
/// stays on one file system), which is flushed and renamed over `path` only when complete.
/// Any error, `write`'s own included, removes the temporary file. The target is checked with
/// [`check_output_path`] first.
pub fn write_atomic<F>(path: impl AsRef<Path>, write: F) -> Result<()>
where
    F: FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::result::Result<(), String>,
{
    let path = path.as_ref();
    check_output_path(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    // The process and a per-process count: two threads writing the same path (peers filling
    // one cache) each write their own partial file, and the last rename wins whole.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = output_dir(path).join(format!(".{name}.{}.{n}.partial", std::process::id()));
    let fail = |reason: String| CoreError::io(path, std::io::Error::other(reason));
    let result = (|| -> std::result::Result<(), String> {
        // `create_new`: never open (and truncate) something that appeared in the meantime.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        let mut out = std::io::BufWriter::new(file);
        write(&mut out)?;
        out.flush().map_err(|e| e.to_string())?;
        let file = out.into_inner().map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        drop(file);
        // Checked again just before the rename: the path may have changed while writing.
        check_output_path(path).map_err(|e| e.to_string())?;
        std::fs::rename(&partial, path).map_err(|e| e.to_string())
    })();
    result.map_err(|reason| {
        let _ = std::fs::remove_file(&partial);
        fail(reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sd-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn inputs_must_be_regular_files() {
        let dir = temp_dir("inputs");
        let err = read_regular(&dir).unwrap_err().to_string();
        assert!(err.contains("is a folder, not a regular file"), "{err}");
        let err = read_regular("/dev/null").unwrap_err().to_string();
        assert!(err.contains("is a device"), "{err}");
        let file = dir.join("a.txt");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(read_regular_to_string(&file).unwrap(), "x");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[test]
    fn outputs_replace_only_regular_files_and_leave_no_partial_file() {
        let dir = temp_dir("outputs");
        let target = dir.join("out.bin");
        write_atomic(&target, |f| f.write_all(b"one").map_err(|e| e.to_string())).unwrap();
        write_atomic(&target, |f| f.write_all(b"two").map_err(|e| e.to_string())).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        // A failing writer leaves the old file and nothing else.
        let err = write_atomic(&target, |_| Err("refused".into())).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // A folder, a symlink and a device are not replaced.
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(write_atomic(&sub, |_| Ok(())).is_err());
        let link = dir.join("link.png");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let err = write_atomic(&link, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(check_output_path("/dev/null").is_err());
        // A file as the folder.
        let err = check_output_path(target.join("x.png"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot hold the output"), "{err}");
        let err = check_output_path(dir.join("missing/x.png"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
