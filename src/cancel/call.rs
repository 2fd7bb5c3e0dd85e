//! Which call is running on this thread: an id for each of [`OnCancel`]'s calls, and
//! the marker that its `call` and its response future set while they run.
//!
//! A [`Slot`] carries its call's id. Dropped while the marker names that id, it was
//! dropped by its own call's code — the call ran to its end, or returned early — and
//! runs nothing; dropped while the marker names anything else, its call's future was
//! dropped from outside, unanswered.
//!
//! Per call this costs a few thread-local reads and writes: no atomic read-modify-write
//! (a thread takes its ids from a shared counter in blocks of [`BLOCK`]), no lock, no
//! allocation.
//!
//! [`OnCancel`]: super::OnCancel
//! [`Slot`]: super::Slot

use std::{
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

/// Ids a thread takes from [`NEXT_BLOCK`] at a time.
const BLOCK: u64 = 1 << 20;
/// The next block to hand out: block `b` holds the ids `b * BLOCK ..`. Block 0 is
/// never handed out, so no call's id is 0, the id of "no call".
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's next id and the end of its block; `(0, 0)` before its first call.
    static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// The id of the call running on this thread (inside its `call`, or a poll of its
    /// response future), 0 for none.
    static RUNNING: Cell<u64> = const { Cell::new(0) };
}

/// One call's id, unique in the process (ids would repeat after 2^64 calls); 0 for a
/// slot that belongs to no call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallId(u64);

impl CallId {
    /// The id of no call: a slot made by hand.
    pub(crate) const NONE: CallId = CallId(0);

    /// A fresh id.
    #[inline]
    pub(crate) fn new() -> CallId {
        IDS.try_with(|ids| {
            let (mut next, mut end) = ids.get();
            if next == end {
                (next, end) = new_block();
            }
            ids.set((next + 1, end));
            CallId(next)
        })
        // Only while this thread's thread-locals are torn down: a slot of no call then
        // runs its action whenever it is dropped filled, the safe side.
        .unwrap_or(CallId::NONE)
    }

    /// Whether this call is running on this thread now.
    #[inline]
    pub(crate) fn is_running(self) -> bool {
        self.0 != 0 && RUNNING.try_with(|r| r.get() == self.0).unwrap_or(false)
    }
}

/// Out of line: once per [`BLOCK`] calls of a thread.
#[cold]
fn new_block() -> (u64, u64) {
    // Wraps after 2^44 blocks, never 0.
    let block = NEXT_BLOCK.fetch_add(1, Relaxed) % (1 << 44);
    let start = block.max(1) * BLOCK;
    (start, start + BLOCK)
}

/// Marks a call as running on this thread until dropped, then restores the call it
/// interrupted (a nested call's `call` or poll runs inside its caller's poll).
///
/// CORRECTNESS: restoring in `drop` keeps the marker right when a panic unwinds out of
/// the call: the caller's own slots are not mistaken for the interrupted call's.
pub(crate) struct Running {
    interrupted: u64,
}

impl Running {
    #[inline]
    pub(crate) fn enter(call: CallId) -> Running {
        Running {
            interrupted: RUNNING.try_with(|r| r.replace(call.0)).unwrap_or(0),
        }
    }
}

impl Drop for Running {
    #[inline]
    fn drop(&mut self) {
        let _ = RUNNING.try_with(|r| r.set(self.interrupted));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_across_threads_and_blocks() {
        let mine: Vec<CallId> = (0..BLOCK + 10).map(|_| CallId::new()).collect();
        let theirs: Vec<CallId> = std::thread::spawn(|| (0..10).map(|_| CallId::new()).collect())
            .join()
            .unwrap();
        let mut all: Vec<u64> = mine.iter().chain(&theirs).map(|id| id.0).collect();
        assert!(all.iter().all(|&id| id != 0));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len() as u64, BLOCK + 20);
    }

    #[test]
    fn the_marker_nests_and_is_restored() {
        let (outer, inner) = (CallId::new(), CallId::new());
        assert!(!outer.is_running());
        {
            let _outer = Running::enter(outer);
            assert!(outer.is_running());
            {
                let _inner = Running::enter(inner);
                assert!(inner.is_running() && !outer.is_running());
            }
            assert!(outer.is_running() && !inner.is_running());
        }
        assert!(!outer.is_running());
        assert!(!CallId::NONE.is_running());
    }
}
