//! Process-wide tuning of the C allocator for inference's allocation pattern.
//!
//! A forward pass allocates and frees buffers of tens of megabytes, layer after layer. With
//! glibc's default settings many of them are returned to the kernel when freed and faulted back
//! in, zero-filled page by page, at the next allocation: about 180 000 page faults (0.4 s on
//! 2 cores) in one SD 1.5 U-Net step at 512². Keeping freed memory in the heap lets the next
//! layer reuse it; the peak resident memory stays the same.

/// Keeps freed memory for reuse: buffers up to 32 MiB come from the heap rather than `mmap`
/// (glibc's largest allowed threshold), and freed heap memory is not trimmed back to the
/// kernel. Process-wide, so the `sd` command and the benchmarks call it at start-up and a
/// library user opts in. Does nothing off glibc.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
