//! The process's memory: glibc's allocator tuned for a long-running service, and freed memory
//! handed back to the system at the end of a phase. Memory must not follow the size of a batch
//! (BENCHMARKS.md, "Memory does not grow with the batch", has the figures behind each setting).

/// Tunes glibc's malloc for a long-running service whose memory must not follow the size of a
/// batch; to be called before the process starts threads. Each setting is left to glibc where
/// the operator set its environment variable.
///
/// - Arenas capped at one per core (`MALLOC_ARENA_MAX`). glibc lets threads create up to eight
///   arenas per core, each keeping memory it freed: the service's threads (actix's, tokio's
///   blocking pool's) spread a long batch's allocations over more arenas than a short batch
///   reaches, and the peak grew with the batch.
/// - Blocks of 128 KiB and more mapped on their own and unmapped when freed, and the heap's
///   free top returned beyond 128 KiB (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).
///   Those are glibc's defaults, but glibc raises both each time it unmaps a block, up to
///   32 MiB: from then on a chunk's buffers (its rows, the statement's arrays) came from the
///   heap and stayed with the process after being freed, more of them the longer the batch.
///
/// BENCHMARKS.md has the peak RSS before and after each setting.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        let block = 128 * 1024;
        for (variable, parameter, value) in [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, arenas),
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, block),
            ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, block),
        ] {
            if std::env::var_os(variable).is_none() {
                // SAFETY: `mallopt` sets one of the allocator's parameters and touches nothing
                // else; it is documented as safe to call at any time, and this runs before
                // other threads exist.
                unsafe {
                    libc::mallopt(parameter, value);
                }
            }
        }
    }
}

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`), at the end of
/// a phase of a batch that went through many allocations (an upload, a preparation or a batch's
/// run). glibc returns only the free top of its main heap by itself: what a phase freed below it
/// stayed with the process, and the next phase's peak came on top (figures in BENCHMARKS.md).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages of the allocator's heaps to the system; it
    // takes the allocator's own locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
