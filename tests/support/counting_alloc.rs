//! A counting global allocator, shared by the allocation tests and the overhead bench.
//!
//! Include it with `#[path = ".."] mod counting_alloc;` in a test or bench binary: it
//! installs itself as that binary's global allocator. [`allocations_in`] counts the
//! allocations the current thread makes while a closure runs; one window is open at a
//! time, so tests may run in parallel. Set `ALLOC_BACKTRACE=1` to print a backtrace of
//! the first few allocations counted in each window.
#![allow(dead_code, unreachable_pub)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    backtrace::Backtrace,
    cell::Cell,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex, PoisonError,
    },
};

struct CountingAllocator;

/// Allocations made while counting was on, on any thread.
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// Whether counted allocations print a backtrace (`ALLOC_BACKTRACE` set), read when a
/// window opens: reading the environment allocates.
static BACKTRACES: AtomicBool = AtomicBool::new(false);

/// Backtraces printed per window, at most.
const MAX_BACKTRACES: usize = 3;

thread_local! {
    /// Whether this thread's allocations are counted. `const`-initialized and without a
    /// destructor, so reading it never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Set while a backtrace is captured and printed: those allocations are the
    /// report's own, neither counted nor reported.
    static REPORTING: Cell<bool> = const { Cell::new(false) };
    /// Backtraces printed in the current window.
    static REPORTED: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: the allocator can run while this thread's locals are being torn down.
    if !COUNTING.try_with(Cell::get).unwrap_or(false)
        || REPORTING.try_with(Cell::get).unwrap_or(true)
    {
        return;
    }
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    if BACKTRACES.load(Ordering::Relaxed) && REPORTED.with(Cell::get) < MAX_BACKTRACES {
        REPORTED.with(|n| n.set(n.get() + 1));
        REPORTING.with(|r| r.set(true));
        eprintln!(
            "allocation counted in a window, at:\n{}",
            Backtrace::force_capture()
        );
        REPORTING.with(|r| r.set(false));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// only addition is an atomic counter update, which does not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Only one measured window is open at a time, so `ALLOCATIONS` changes only for it.
static WINDOW: Mutex<()> = Mutex::new(());

/// Turns counting off when the window closes, even if the measured code panics.
struct CountingOn;

impl CountingOn {
    fn start() -> Self {
        COUNTING.with(|c| c.set(true));
        CountingOn
    }
}

impl Drop for CountingOn {
    fn drop(&mut self) {
        COUNTING.with(|c| c.set(false));
    }
}

/// Runs `f` and returns how many allocations this thread made meanwhile, with `f`'s
/// output.
pub fn allocations_in<R>(f: impl FnOnce() -> R) -> (usize, R) {
    // A test that failed while holding the lock leaves the counter consistent: counting
    // was switched off by `CountingOn`'s drop before the lock was released.
    let _window = WINDOW.lock().unwrap_or_else(PoisonError::into_inner);
    BACKTRACES.store(
        std::env::var_os("ALLOC_BACKTRACE").is_some(),
        Ordering::Relaxed,
    );
    REPORTED.with(|n| n.set(0));
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let counting = CountingOn::start();
    let output = f();
    drop(counting);
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    (after - before, output)
}
