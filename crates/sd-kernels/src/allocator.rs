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

/// A vector of `len` zeros whose memory the kernel is asked to back with transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`, where `/sys/kernel/mm/transparent_hugepage/enabled` is
/// `madvise`, as on Debian): one fault per 2 MiB instead of per 4 KiB. For buffers that are
/// filled once and kept, such as a model's weights (SD 1.5's U-Net: 3.4 GB of f32, 830 000
/// faults with small pages; its load from an f16 file 3.7 s → 2.8 s). Elsewhere, or for small
/// buffers, an ordinary vector.
pub fn zeroed_huge<T: bytemuck::Zeroable + Clone>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * size_of::<T>();
        if bytes >= 2 * HUGE {
            let start = v.as_mut_ptr() as usize;
            let first = start.next_multiple_of(HUGE);
            let end = (start + bytes) & !(HUGE - 1);
            if end > first {
                // SAFETY: the range lies inside `v`'s allocation (its capacity, not yet
                // touched); MADV_HUGEPAGE only changes how the kernel backs those pages and
                // never their contents or the mapping's validity. A failure is harmless.
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v.resize(len, T::zeroed());
    v
}
