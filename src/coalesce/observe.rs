//! What a coalescing layer tells its observers: `Stats`, `metrics`, `tracing`.

use crate::outcome::Stats;
#[cfg(feature = "metrics")]
use std::sync::Arc;

/// How a coalesced call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// It answered, and every waiter still there got the answer.
    Answered,
    /// Its last waiter left before it answered: its future was dropped.
    Dropped,
    /// Its future (or the clone of its answer) panicked.
    Panicked,
}

/// The observers of one coalescing layer, kept with its calls in flight.
#[derive(Clone, Default)]
pub(crate) struct Observers {
    pub(crate) stats: Option<Stats>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<Arc<crate::outcome::CoalesceMetrics>>,
}

impl Observers {
    /// A request joined a call already in flight.
    #[inline]
    pub(crate) fn joined(&self) {
        if let Some(stats) = &self.stats {
            stats.count_coalesce_joined();
        }
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.joined();
        }
        #[cfg(feature = "tracing")]
        tracing::debug!("joined a coalesced call in flight");
    }

    /// A call `joined` requests joined ended as `end`.
    #[inline]
    pub(crate) fn ended(&self, end: End, joined: usize) {
        if let Some(stats) = &self.stats {
            stats.count_coalesce_end(end as usize);
        }
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            metrics.ended(end as usize);
        }
        // Only calls that were shared, or did not answer, are worth an event.
        #[cfg(feature = "tracing")]
        if joined > 0 || end != End::Answered {
            tracing::debug!(end = ?end, joined, "coalesced call ended");
        }
        let _ = joined;
    }
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("Observers");
        s.field("stats", &self.stats.is_some());
        #[cfg(feature = "metrics")]
        s.field("metrics", &self.metrics.is_some());
        s.finish()
    }
}
