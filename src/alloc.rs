//! Allocator tuning for the `fer-cam` binary and the benches, which use mimalloc as the global
//! allocator.
//!
//! A training step at batch 64 allocates and frees several GiB of activation tensors, many above
//! mimalloc's 32 MiB chunk size. mimalloc returns freed memory to the OS after `purge_delay`
//! (1 s by default), which is shorter than one step, so every step faulted all of it back in and
//! the kernel spent about a third of the step zeroing pages (`perf`: `clear_page_erms` 30%).

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (mimalloc.h); the Rust bindings have no
/// named constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped for `ms` milliseconds before mimalloc returns it to the OS.
///
/// Only meaningful when mimalloc is the global allocator; harmless otherwise.
pub fn keep_freed_memory_ms(ms: i32) {
    // SAFETY: setting a mimalloc option is thread-safe and takes plain integers.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms.into()) }
}
