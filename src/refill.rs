//! Writing the fallback's answer back into the primary after a miss.
//!
//! A cache in front of a database is only as good as its refills: after a miss, the
//! database's answer should go into the cache so that the next request for the same
//! key is a hit. A [`Refill`] action is that write. It sees the request (through the
//! [`Key`](Refill::Key) it keeps of it) and the response **only when the fallback's
//! answer is served because the primary's answer was rejected** — a miss — and
//! only for an `Ok` response; not after a hit, not when the fallback answered because
//! the primary was too slow (the patience bound), not for errors.
//!
//! The action runs synchronously, just before the response is handed out, and must
//! not wait: the response is not delayed by the write. An action that writes over the
//! network starts the write (spawns a task, sends on a channel) and returns. It says
//! what it did: [`Write::Started`] when it started a write, [`Write::Skipped`] when the
//! answer holds nothing to write (a `404`, an empty row). A failure it returns is
//! counted and dropped; it never fails the request or changes its answer. A write it
//! spawned can report its own later failure with
//! [`Stats::refill_write_failed`](crate::outcome::Stats::refill_write_failed), so that
//! it is counted too.
//!
//! Install one with [`Fallback::refill`](crate::Fallback::refill) or
//! [`FallbackLayer::refill`](crate::FallbackLayer::refill). What became of each
//! request's refill is in its [`Outcome`](crate::outcome::Outcome) ([`Refilled`]) and
//! counted in [`Snapshot::refills`](crate::outcome::Snapshot::refills) (writes
//! started), [`refills_skipped`](crate::outcome::Snapshot::refills_skipped),
//! [`refill_failures`](crate::outcome::Snapshot::refill_failures) and
//! [`refill_writes_failed`](crate::outcome::Snapshot::refill_writes_failed).
//!
//! [`NoRefill`], the default, keeps nothing and does nothing: a layer without a refill
//! costs exactly what it did before.
//!
//! Any `FnMut(Req, &Res) -> Result<Write, E>` is a refill, with `Key = Req`: it keeps a
//! clone of every request until the answer comes. Implement [`Refill`] on a type of
//! your own to keep less (only the cache key) or to refill only some requests.
//!
//! ```
//! use std::convert::Infallible;
//! use tower_backstop::refill::{NoRefill, Refill, Write};
//!
//! // What a refill keeps of a request: the key, and only for reads.
//! #[derive(Clone)]
//! enum Op { Get(u64), Put(u64, String) }
//!
//! #[derive(Clone)]
//! struct WriteBack {
//!     // In a real service: a cache client; the write is spawned, not awaited.
//!     writes: std::sync::mpsc::Sender<(u64, String)>,
//! }
//!
//! impl Refill<Op, Option<String>> for WriteBack {
//!     type Key = u64;
//!     type Error = std::sync::mpsc::SendError<(u64, String)>;
//!
//!     fn key(&mut self, op: &Op) -> Option<u64> {
//!         match op {
//!             Op::Get(key) => Some(*key),
//!             Op::Put(..) => None, // writes are never refilled
//!         }
//!     }
//!
//!     fn refill(&mut self, key: u64, row: &Option<String>) -> Result<Write, Self::Error> {
//!         match row {
//!             Some(row) => self.writes.send((key, row.clone())).map(|()| Write::Started),
//!             None => Ok(Write::Skipped), // nothing to cache
//!         }
//!     }
//! }
//!
//! let (writes, written) = std::sync::mpsc::channel();
//! let mut refill = WriteBack { writes };
//! let key = refill.key(&Op::Get(7)).unwrap();
//! assert_eq!(refill.refill(key, &Some("seven".to_owned())), Ok(Write::Started));
//! assert_eq!(written.recv().unwrap(), (7, "seven".to_owned()));
//! assert_eq!(refill.refill(key, &None), Ok(Write::Skipped));
//!
//! // Closures are refills too, keeping the whole request.
//! let mut log = Vec::new();
//! let mut closure = |op: Op, _row: &Option<String>| {
//!     if let Op::Get(key) = op { log.push(key) }
//!     Ok::<_, Infallible>(Write::Started)
//! };
//! let key = Refill::<Op, Option<String>>::key(&mut closure, &Op::Get(8)).unwrap();
//! Refill::<Op, Option<String>>::refill(&mut closure, key, &None).unwrap();
//! assert_eq!(log, [8]);
//!
//! // And the default does nothing at all.
//! assert!(Refill::<Op, Option<String>>::key(&mut NoRefill, &Op::Get(9)).is_none());
//! ```

use std::convert::Infallible;

pub use crate::outcome::Refilled;

/// What a refill action did with the answer it was handed: the `Ok` of
/// [`Refill::refill`].
///
/// Counted apart in [`Stats`](crate::outcome::Stats) and reported in the request's
/// [`Outcome::refill`](crate::outcome::Outcome::refill) ([`Refilled::Started`],
/// [`Refilled::Skipped`]), so that a cache fed nothing by answers it cannot hold (a
/// `404`, `Ok(None)`) does not look refilled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Write {
    /// A write was started (or made).
    Started,
    /// Nothing needed writing: the answer holds nothing to cache.
    Skipped,
}

/// Writes the fallback's answer back after a miss. See the [module docs](self).
///
/// The layer calls [`key`](Refill::key) once per request, in `call`, before the request
/// is handed to the services, and keeps what it returns in the response future. If
/// the request ends with the fallback's `Ok` answer served because the primary's
/// answer was rejected, the layer calls [`refill`](Refill::refill) with that key and
/// a reference to the response, once, just before returning it. Otherwise the key is
/// dropped unused.
///
/// Each response future holds its own clone of the action, as it does of the
/// [`Accept`](crate::accept::Accept) predicate: keep clones cheap.
pub trait Refill<Req, Res> {
    /// What is kept of a request until its answer is known.
    type Key;
    /// A failed refill. It is counted and dropped: it never fails the request.
    type Error;

    /// What to keep of `req` for a refill, or `None` if this request is never refilled
    /// (nothing is then kept, and [`refill`](Refill::refill) is not called).
    fn key(&mut self, req: &Req) -> Option<Self::Key>;

    /// Starts writing `res` back for `key`, and says whether it did: `Ok(Write::Started)`
    /// for a write started, `Ok(Write::Skipped)` when `res` holds nothing to write. Must
    /// not block: the response waits for this call to return.
    fn refill(&mut self, key: Self::Key, res: &Res) -> Result<Write, Self::Error>;
}

impl<F, Req, Res, E> Refill<Req, Res> for F
where
    F: FnMut(Req, &Res) -> Result<Write, E>,
    Req: Clone,
{
    type Key = Req;
    type Error = E;

    fn key(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }

    fn refill(&mut self, key: Req, res: &Res) -> Result<Write, E> {
        self(key, res)
    }
}

/// The refill that does nothing, the default: it keeps nothing of any request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoRefill;

impl<Req, Res> Refill<Req, Res> for NoRefill {
    type Key = Infallible;
    type Error = Infallible;

    #[inline]
    fn key(&mut self, _req: &Req) -> Option<Infallible> {
        None
    }

    #[inline]
    fn refill(&mut self, key: Infallible, _res: &Res) -> Result<Write, Infallible> {
        match key {}
    }
}
