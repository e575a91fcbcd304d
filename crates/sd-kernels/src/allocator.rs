//! Process-wide tuning of the C allocator for inference's allocation pattern.
//!
//! A forward pass allocates and frees buffers of tens of megabytes, layer after layer. With
//! glibc's default settings many of them are returned to the kernel when freed and faulted back
//! in, zero-filled page by page, at the next allocation: about 180 000 page faults (0.4 s on
//! 2 cores) in one SD 1.5 U-Net step at 512². Keeping freed memory in the heap lets the next
//! layer reuse it; the peak resident memory stays the same.

/// Keeps freed memory for reuse: every buffer comes from the heap rather than its own `mmap`
/// (`M_MMAP_MAX` 0; a threshold can only be raised to 32 MiB, and a training step's weight-sized
/// gradients are larger: SD 1.5's 1280² 3×3 kernels are 59 MB), and freed heap memory is never
/// trimmed back to the kernel. A buffer that was mapped for one use is unmapped when freed
/// (a TLB shootdown on every core) and faulted back in, page by page, zero-filled, at its next
/// use: that was over 40 % of an SD 1.5 training step's time in the kernel, and the step took
/// 16.4 s against 11.0 s with every buffer from the heap (this machine: AMD EPYC, AVX-512, 2
/// cores), at the same peak memory; a 512² VAE decode 6.8 s against 5.5 s. Process-wide, so
/// the `sd` command and the benchmarks call it at start-up and a library user opts in. Does
/// nothing off glibc.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1: never (mallopt(3)); `i32::MAX` let a free that left over 2 GiB at the heap's top
        // return it (2 GB of an SD 1.5 training step, faulted back in at the next).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// A vector of `len` zeros whose memory the kernel is asked to back with transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`, where `/sys/kernel/mm/transparent_hugepage/enabled` is
/// `madvise`, as on Debian): one fault per 2 MiB instead of per 4 KiB. For buffers that are
/// filled once and kept, such as a model's weights (SD 1.5's U-Net: 3.4 GB of f32, 830 000
/// faults with small pages; its load from an f16 file 3.7 s → 2.8 s). The zeros come from
/// `calloc`, which leaves fresh pages untouched (the kernel zeroes them as they are first
/// written), so the advice comes before any fault and the buffer is written once, by its
/// owner. Off Linux, or for small buffers, just zeroed memory.
pub fn zeroed_huge<T: bytemuck::Zeroable>(len: usize) -> Vec<T> {
    let layout = std::alloc::Layout::array::<T>(len).expect("a buffer the size of a tensor");
    if layout.size() == 0 {
        return (0..len).map(|_| T::zeroed()).collect();
    }
    // SAFETY: `layout` has a non-zero size; the allocation is checked for null.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if layout.size() >= 2 * HUGE {
            let start = ptr as usize;
            let first = start.next_multiple_of(HUGE);
            let end = (start + layout.size()) & !(HUGE - 1);
            if end > first {
                // SAFETY: the range lies inside the allocation just made; MADV_HUGEPAGE only
                // changes how the kernel backs those pages, never their contents or the
                // mapping's validity. A failure is harmless.
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    // SAFETY: `ptr` comes from the global allocator with `Layout::array::<T>(len)` (the
    // layout a `Vec<T>` of capacity `len` has), and its `len` elements are zero bytes, a valid
    // `T` (`Zeroable`).
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

#[cfg(test)]
mod tests {
    /// Zeros of every size (empty, small, huge-page sized), writable and freed as any vector.
    #[test]
    fn zeroed_huge_is_a_vector_of_zeros() {
        for len in [0, 1, 1000, 3 << 20] {
            let mut v = super::zeroed_huge::<f32>(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
            v.iter_mut().for_each(|x| *x = 1.0);
            v.push(2.0);
            assert_eq!(v.len(), len + 1);
        }
        assert!(super::zeroed_huge::<u16>(5).iter().all(|&x| x == 0));
    }
}
