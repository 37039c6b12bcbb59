//! Gives freed heap memory back to the operating system. glibc's allocator keeps the
//! pages of freed chunks that sit below chunks still in use (only the top of the heap is
//! returned by itself), so memory used for a while by work that comes and goes (the rounds
//! out, their envelopes, delivery sessions) would stay in the pod's RSS, between the
//! queue's long-lived index chunks, for the life of the process. `malloc_trim(0)` returns
//! those pages (`MADV_DONTNEED`); running it every few seconds keeps RSS near what is in
//! use, which is what a memory limit is measured against (issue 17).
//!
//! It also has large allocations mapped on their own ([`return_large_allocations`]), so
//! that they go back to the system as soon as they are freed.
//!
//! Owns nothing and changes no data; on other C libraries it does nothing.

use std::time::Duration;

/// How often freed pages are returned.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Returns freed pages every [`TRIM_INTERVAL`], until the runtime stops.
pub async fn trim_periodically() {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Off the async threads: a trim walks the heap.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim only inspects and releases the allocator's free memory; it is
    // safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Large allocations (Argon2's 19 MiB per password check, big messages) each get their own
/// mapping, returned to the system when freed. Without this glibc raises its mmap threshold
/// after the first such free and serves later ones from per-thread arenas that it seldom
/// trims, so memory taken by a burst of AUTHs stays (issue 13, item 1). musl already maps
/// large allocations separately.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn return_large_allocations() {
    // SAFETY: mallopt only sets an allocator tunable; `main` calls this once, first,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_large_allocations() {}
