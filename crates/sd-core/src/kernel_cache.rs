//! Compiled GPU kernels kept on disk between runs.
//!
//! CubeCL, Burn's GPU runtime, compiles every kernel the first time a shape meets it (CubeCL IR
//! to CUDA C++, then NVRTC to PTX), on one CPU core. A first SD 1.x U-Net forward on an H200
//! had not finished compiling after four minutes. CubeCL can keep the PTX it compiled and load
//! it on the next run instead, but only where its settings name a folder for it
//! (`compilation.cache`, unset by default); its autotune results are kept already (in the
//! workspace's `target/`, else the user's cache folder). [`keep_gpu_kernels`] names one before
//! the runtime starts, unless the user's own `cubecl.toml` (or `burn.toml`'s `[cubecl]`) does.
//! The cached kernels sit under a folder per CubeCL version, so an upgrade compiles afresh.

use std::path::{Path, PathBuf};

use cubecl_runtime::config::cache::CacheConfig;
use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

/// What [`keep_gpu_kernels`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelCache {
    /// Compiled kernels go to this folder from now on.
    Kept(PathBuf),
    /// The user's CubeCL settings name the folder already (`cubecl.toml`, `CubeCL.toml` or
    /// `burn.toml`'s `[cubecl]` in the working folder or one above it): they are left as they are.
    UsersOwn,
    /// The runtime had read its settings already (a GPU tensor was made before the call): they
    /// can no longer change, and kernels are kept wherever they said.
    TooLate,
}

/// CubeCL's settings as it would read them itself (the user's files, then its environment
/// variables) with `dir` as the compiled kernels' folder where they name none.
pub fn with_kernel_folder(settings: CubeClRuntimeConfig, dir: &Path) -> CubeClRuntimeConfig {
    let mut settings = settings;
    if settings.compilation.cache.is_none() {
        settings.compilation.cache = Some(CacheConfig::File(dir.to_path_buf()));
    }
    settings
}

/// Makes CubeCL keep the kernels it compiles under `dir` (created when the first one is
/// written) and load them from there on later runs. Call it at the start of the process, before
/// the first tensor on a GPU backend; harmless on the CPU backends, which compile nothing.
pub fn keep_gpu_kernels(dir: &Path) -> KernelCache {
    // `set` panics once the settings are read: look first (nothing else runs this early).
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return KernelCache::TooLate;
    }
    let own = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if own.compilation.cache.is_some() {
        return KernelCache::UsersOwn;
    }
    CubeClRuntimeConfig::set(with_kernel_folder(own, dir));
    KernelCache::Kept(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folder is named where the settings name none, a user's own is kept, and the call
    /// after the settings were set says it is too late instead of panicking as CubeCL's `set`
    /// would. (The only test in this crate that touches CubeCL's process-wide settings.)
    #[test]
    fn the_kernel_folder_is_named_once_and_never_over_the_users() {
        let dir = Path::new("/tmp/sd-kernels");
        let named = with_kernel_folder(CubeClRuntimeConfig::default(), dir);
        assert!(matches!(
            named.compilation.cache,
            Some(CacheConfig::File(ref path)) if path == dir
        ));
        let mut users = CubeClRuntimeConfig::default();
        users.compilation.cache = Some(CacheConfig::Global);
        let kept = with_kernel_folder(users, dir);
        assert!(matches!(kept.compilation.cache, Some(CacheConfig::Global)));

        // The test runs in the crate's folder, which has no cubecl.toml.
        assert_eq!(keep_gpu_kernels(dir), KernelCache::Kept(dir.to_path_buf()));
        assert!(matches!(
            CubeClRuntimeConfig::get().compilation.cache,
            Some(CacheConfig::File(ref path)) if path == dir
        ));
        assert_eq!(keep_gpu_kernels(dir), KernelCache::TooLate);
    }
}
