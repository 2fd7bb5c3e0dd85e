use std::{
    cell::Cell,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, TryLockError,
    },
    time::Duration,
};
use tokio::time::Instant;

/// `estimate_nanos` before the first estimate. A real estimate is at most one less.
const NO_ESTIMATE: u64 = u64::MAX;
/// The largest window: a bucket's counts are `u32`s and a half-window never exceeds them.
const MAX_WINDOW: u64 = u32::MAX as u64;

/// A launch delay that follows a percentile of the primary's own recent latency.
///
/// The fallback starts once the primary has been pending longer than the chosen
/// percentile `q` of its recent latency — over the last half to whole
/// [`window`](Adaptive::window) of calls, in two rotating halves: at p90, about one
/// request in ten starts its fallback early, and those are the slow ones — the ones
/// where starting early saves the most. Until [`min_samples`](Adaptive::min_samples)
/// calls have been timed, the configured initial delay applies.
///
/// # Calls cut short
///
/// A primary call dropped unanswered — the caller gave up, a timeout around the layer
/// fired, or the patience bound served the fallback — is a *censored* sample: its
/// latency is only known to exceed the time it ran. Every such call is kept, at that
/// time, next to the answered ones, and the percentile is estimated with the
/// Kaplan–Meier (product-limit) estimator: a censored call counts as one of the calls
/// still pending at every time up to its cut, and then hands its weight on to the calls
/// that ran longer. So a tail that is only ever cut short keeps its weight: with 80% of
/// calls answering in 10 ms, 20% taking 2 s and every caller giving up at 500 ms, the
/// p90 is known to lie beyond 500 ms. When the percentile lies beyond every answered
/// call like this, the estimate is the longest cut seen (the estimate is a lower bound
/// then): the fallback starts no earlier than callers are known to wait.
///
/// Cut-short calls count towards the warm-up, so a warm-up ends even if every call is
/// cut short. A call whose response future is dropped before its primary was ever found
/// pending (dropped unpolled: a caller gone, a server shedding requests before their
/// handlers run) is no sample at all: it never ran, and teaches the estimate nothing. But an estimate can never exceed what callers wait for, nor speculation
/// help a caller who gave up: **set the initial delay below any timeout around the
/// layer**, and expect no early launches when callers give up before the primary's
/// percentile.
///
/// # Range, resolution and the timer
///
/// Latencies are kept in nanoseconds, from 0 to 2<sup>64</sup> − 1 ns (about 584
/// years; anything longer counts as that long), in buckets no wider than 1/128 (0.8%)
/// of the latencies they hold. The [`estimate`](Adaptive::estimate) is the top of the
/// bucket holding the percentile: at most 0.8% above it, never below. Each `Adaptive`
/// holds about 116 KiB for its buckets, allocated once when it is built and shared by
/// all of its clones; recording never allocates.
///
/// The delay is applied on tokio's timer, which fires on whole-millisecond ticks. The
/// [`delay`](Adaptive::delay) is therefore the estimate rounded *up* to a whole
/// millisecond, and the fallback starts on the first tick at or after it (between the
/// delay and the delay + 1 ms after the primary was found pending). Rounding up only
/// ever speculates less: a primary that answers in 500 µs never starts its fallback,
/// whatever its percentile. Against a primary much faster than a millisecond, an
/// adaptive launch therefore behaves almost like
/// [`Launch::Sequential`](super::Launch::Sequential): only
/// [`Launch::Concurrent`](super::Launch::Concurrent) starts a fallback sooner than
/// the first tick (the repository's latency study measures this, scenario (c)).
///
/// # Cost
///
/// All clones of an `Adaptive`, and so all the services a layer builds, share one
/// estimate. Reading the delay is one atomic load.
///
/// A call is timed from the first poll that finds its primary pending — the moment its
/// delay starts counting — to the primary's answer or its cut: two clock reads, the
/// first shared with the delay. A primary that answers on its first poll was pending
/// for no time and reads no clock: one such call in 8, picked at random per thread, is
/// recorded, at 0, counting for 8 calls (so the window and the warm-up still count
/// calls, and the percentile still weighs the instant answers at their share). Every
/// call found pending is recorded. The per-request state that times a call is recycled
/// per thread and keeps its handle on the estimate for the next request, so a thread
/// may keep an estimate (its buckets) alive for a while after its layer is dropped.
///
/// Recording a latency takes a lock
/// that is only ever *tried*: a sample that finds it busy is skipped and counted (see
/// [`skipped`](Adaptive::skipped)) rather than making the request wait. A few times
/// per half-window the recording call also re-estimates, walking the buckets between
/// the fastest and the slowest call held.
///
/// ```
/// use std::time::Duration;
/// use tower_backstop::launch::{Adaptive, Launch};
///
/// // Start the fallback once the primary is slower than its p90, 5 ms until known.
/// let launch = Launch::Adaptive(Adaptive::new(0.9, Duration::from_millis(5)).window(2_000));
/// # let _ = launch;
/// ```
///
/// Available with the `adaptive` feature.
#[derive(Clone)]
pub struct Adaptive {
    inner: Arc<Estimator>,
}

struct Estimator {
    quantile: f64,
    initial: Duration,
    window: u64,
    min_samples: u64,
    asked_min_samples: u64,
    estimate_nanos: AtomicU64,
    skipped: AtomicU64,
    recorder: Mutex<Recorder>,
}

/// Two half-windows: samples go into `current`; when it is full it replaces
/// `previous`. The estimate covers the last `window / 2` to `window` samples.
struct Recorder {
    current: Half,
    previous: Half,
    since_estimate: u64,
}

impl Adaptive {
    /// Follows the `quantile` (e.g. `0.9` for p90) of the primary's latency, with
    /// `initial_delay` until enough calls have been timed.
    ///
    /// A `quantile` outside `0.0..=1.0` is clamped into it (`NaN` counts as `1.0`).
    /// Defaults: a window of 1,000 calls, an estimate from 100 calls on.
    pub fn new(quantile: f64, initial_delay: Duration) -> Self {
        let quantile = if quantile.is_nan() {
            1.0
        } else {
            quantile.clamp(0.0, 1.0)
        };
        Adaptive::build(quantile, initial_delay, 1_000, 100)
    }

    fn build(quantile: f64, initial: Duration, window: u64, min_samples: u64) -> Self {
        let window = window.clamp(2, MAX_WINDOW);
        Adaptive {
            inner: Arc::new(Estimator {
                quantile,
                initial,
                window,
                // The two halves may hold as few as `window / 2` calls once full, so
                // a longer warm-up might never end: the builders keep what was asked
                // for, and this is what applies.
                min_samples: min_samples.clamp(1, window / 2),
                asked_min_samples: min_samples,
                estimate_nanos: AtomicU64::new(NO_ESTIMATE),
                skipped: AtomicU64::new(0),
                recorder: Mutex::new(Recorder {
                    current: Half::new(),
                    previous: Half::new(),
                    since_estimate: 0,
                }),
            }),
        }
    }

    /// Sets how many recent primary calls the estimate covers, answered or cut short:
    /// from 2 to 2<sup>32</sup> − 1 (values outside are clamped). Default: 1,000.
    ///
    /// A shorter window follows a change in the primary's latency sooner and is noisier.
    /// The memory held does not depend on it. Starts a new, empty estimate.
    pub fn window(self, calls: u64) -> Self {
        let e = &self.inner;
        Adaptive::build(e.quantile, e.initial, calls, e.asked_min_samples)
    }

    /// Sets how many primary calls, answered or cut short, must be timed before the
    /// estimate replaces the initial delay: at least 1 and at most half the window (a
    /// larger value is lowered to that, since the estimate may hold no more). Default:
    /// 100. Starts a new, empty estimate.
    pub fn min_samples(self, calls: u64) -> Self {
        let e = &self.inner;
        Adaptive::build(e.quantile, e.initial, e.window, calls)
    }

    /// The current estimate of the percentile, or `None` while warming up.
    ///
    /// Nanosecond resolution, at most 0.8% above the percentile of the calls held (see
    /// [Range, resolution and the timer](Adaptive#range-resolution-and-the-timer)). If
    /// the percentile lies beyond every answered call, this is the longest time a call
    /// was seen to run before it was cut short.
    pub fn estimate(&self) -> Option<Duration> {
        match self.inner.estimate_nanos.load(Ordering::Relaxed) {
            NO_ESTIMATE => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// The delay a request whose primary is first found pending now would get (the
    /// estimate is read when the delay is armed), as tokio's timer applies it: the
    /// estimate (or, while warming up, the initial delay) rounded up to a whole
    /// millisecond. The fallback starts on the first timer tick at or after it.
    pub fn delay(&self) -> Duration {
        super::on_timer(self.target())
    }

    /// The estimate, or the initial delay, before the timer's rounding.
    #[inline]
    pub(crate) fn target(&self) -> Duration {
        self.estimate().unwrap_or(self.inner.initial)
    }

    /// How many latencies were dropped because another request was recording at the
    /// same moment.
    pub fn skipped(&self) -> u64 {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// Whether `self` and `other` share one estimate.
    #[inline]
    fn same(&self, other: &Adaptive) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Records `weight` calls of this latency.
    fn record(&self, latency: Duration, answered: bool, weight: u32) {
        let e = &*self.inner;
        let mut recorder = match e.recorder.try_lock() {
            Ok(recorder) => recorder,
            // Recording never panics while holding the lock, but stay usable if it did.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                e.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Recorder {
            current,
            previous,
            since_estimate,
        } = &mut *recorder;

        // Longer than 2^64 - 1 ns (584 years) counts as that long.
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        current.record(bucket(nanos), answered, weight);
        *since_estimate += u64::from(weight);

        let half = e.window / 2;
        if current.len >= half {
            std::mem::swap(current, previous);
            current.reset();
        }
        // Re-estimate a few times per half-window (the walk covers every bucket between
        // the fastest and the slowest call held), and as soon as the warm-up ends.
        let held = current.len + previous.len;
        let warming_up = e.estimate_nanos.load(Ordering::Relaxed) == NO_ESTIMATE;
        if held >= e.min_samples && (warming_up || *since_estimate >= (half / 4).max(1)) {
            *since_estimate = 0;
            let estimate = product_limit(current, previous, e.quantile);
            e.estimate_nanos
                .store(estimate.min(NO_ESTIMATE - 1), Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for Adaptive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adaptive")
            .field("quantile", &self.inner.quantile)
            .field("initial_delay", &self.inner.initial)
            .field("window", &self.inner.window)
            .field("min_samples", &self.inner.min_samples)
            .field("estimate", &self.estimate())
            .field("delay", &self.delay())
            .finish()
    }
}

/// Sub-buckets per power of two: a bucket is at most 1/`SUB` of its lowest latency wide.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Latencies below `2 * SUB` ns have a bucket each; each power of two above has `SUB`.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) << SUB_BITS;

/// The bucket of a latency in nanoseconds. Monotonic: a longer latency never lands in a
/// lower bucket, so ordering buckets orders latencies.
fn bucket(nanos: u64) -> usize {
    if nanos < SUB {
        return nanos as usize;
    }
    let shift = 63 - nanos.leading_zeros() - SUB_BITS;
    (((shift + 1) as usize) << SUB_BITS) + ((nanos >> shift) - SUB) as usize
}

/// The longest latency that lands in bucket `index`.
fn top(index: usize) -> u64 {
    if index < SUB as usize {
        return index as u64;
    }
    let shift = (index >> SUB_BITS) as u32 - 1;
    let low = ((index as u64 & (SUB - 1)) + SUB) << shift;
    low + ((1u64 << shift) - 1)
}

/// Answered and cut-short calls in one bucket.
#[derive(Clone, Copy, Default)]
struct Count {
    answered: u32,
    cut_short: u32,
}

/// Half of the window: counts per bucket, and the range of buckets in use.
struct Half {
    counts: Box<[Count]>,
    len: u64,
    /// The lowest and highest bucket in use; `lowest > highest` when empty.
    lowest: usize,
    highest: usize,
}

impl Half {
    fn new() -> Self {
        Half {
            counts: vec![Count::default(); BUCKETS].into_boxed_slice(),
            len: 0,
            lowest: BUCKETS,
            highest: 0,
        }
    }

    fn record(&mut self, index: usize, answered: bool, weight: u32) {
        let count = &mut self.counts[index];
        // A half holds fewer than `MAX_WINDOW` calls (plus one weight), so this never
        // saturates.
        if answered {
            count.answered = count.answered.saturating_add(weight);
        } else {
            count.cut_short = count.cut_short.saturating_add(weight);
        }
        self.len += u64::from(weight);
        self.lowest = self.lowest.min(index);
        self.highest = self.highest.max(index);
    }

    fn reset(&mut self) {
        if self.lowest <= self.highest {
            self.counts[self.lowest..=self.highest].fill(Count::default());
        }
        self.len = 0;
        self.lowest = BUCKETS;
        self.highest = 0;
    }
}

/// The `quantile` of the calls held in `a` and `b`, in nanoseconds, by the Kaplan–Meier
/// (product-limit) estimator over the buckets.
///
/// Walking the buckets upwards, the survival `S` — the share of calls slower than the
/// current bucket — is multiplied by `1 - answered / at_risk` at each bucket, where
/// `at_risk` counts the calls, answered or cut short, that were still pending when that
/// bucket began. A call cut short leaves `at_risk` only after its bucket, so its weight
/// passes on to the slower calls instead of being counted as fast or thrown away. Within
/// one bucket, answers are taken to come before cuts: that can only keep `S` higher,
/// and so the estimate later — never earlier — than the exact order would.
/// The estimate is the top of the first bucket where `S <= 1 - quantile`; if there is
/// none (the tail beyond the last answer was only ever cut short), the top of the
/// highest bucket, where the longest cut lies.
///
/// Only bucket indices are compared here, never a latency against an estimate, so no
/// bucket's rounding can decide whether a sample counts.
fn product_limit(a: &Half, b: &Half, quantile: f64) -> u64 {
    let (lowest, highest) = (a.lowest.min(b.lowest), a.highest.max(b.highest));
    let mut at_risk = a.len + b.len;
    // Tolerance for the rounding of the product: without cuts, `S` is `1 - k / n` and
    // must meet `1 - quantile` exactly where the empirical quantile lies.
    let target = 1.0 - quantile + 1e-9;
    let mut survival = 1.0f64;
    for index in lowest..=highest {
        let (x, y) = (a.counts[index], b.counts[index]);
        let answered = u64::from(x.answered) + u64::from(y.answered);
        let leaving = answered + u64::from(x.cut_short) + u64::from(y.cut_short);
        if leaving == 0 {
            continue;
        }
        if answered > 0 {
            survival *= 1.0 - answered as f64 / at_risk as f64;
        }
        if survival <= target {
            return top(index);
        }
        at_risk -= leaving;
    }
    top(highest)
}

/// One in this many calls whose primary answers on its first poll is recorded, with
/// this weight.
const INSTANT_SAMPLE: u32 = 8;

thread_local! {
    /// The state of a per-thread xorshift generator that picks which instant answers are
    /// recorded: random, so that no pattern of calls (two layers taking turns on one
    /// thread, say) can hide one layer's calls from the sampling.
    static PICK: Cell<u32> = const { Cell::new(0x9E37_79B9) };
}

/// Whether to record this instant answer: true for one in `INSTANT_SAMPLE`, at random.
#[inline]
fn pick_instant() -> bool {
    PICK.try_with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        state.set(x);
        x % INSTANT_SAMPLE == 0
    })
    .unwrap_or(false)
}

/// Times one primary call for the estimate, from the first poll that finds it pending —
/// the moment a launch delay starts counting from — to its answer or its cut.
///
/// A call whose primary answers on its first poll was pending for no time at all: it
/// reads no clock, and one in `INSTANT_SAMPLE` of them is recorded (picked at random,
/// per thread) with a weight of `INSTANT_SAMPLE`, at 0. Every call that was found
/// pending is recorded: those are the calls that read the clock anyway, to start their
/// delay, and the ones the percentile is about.
///
/// A `Sampler` outlives its request: it lives in the response future's recycled cold
/// part and keeps its `Adaptive` handle for the next request of a layer with the same
/// estimate, so that timing a call costs no reference-count traffic. (The handle holds
/// the estimate only: keeping it runs no user code. A pooled part may keep an estimate
/// — about 116 KiB — alive after its layer is gone, until the part is reused or the
/// thread ends.)
#[derive(Default)]
pub(crate) struct Sampler {
    adaptive: Option<Adaptive>,
    /// This request is being timed, and has not been recorded yet.
    active: bool,
    /// This request's launch waits on the estimate, read when the delay is armed.
    waits: bool,
    pending_since: Option<Instant>,
}

impl Sampler {
    /// Starts timing a request's primary call for `adaptive`; `waits` if its launch
    /// waits on the estimate.
    #[inline]
    pub(crate) fn begin(&mut self, adaptive: &Adaptive, waits: bool) {
        if !self
            .adaptive
            .as_ref()
            .is_some_and(|kept| kept.same(adaptive))
        {
            self.adaptive = Some(adaptive.clone());
        }
        self.active = true;
        self.waits = waits;
        self.pending_since = None;
    }

    /// The launch delay to arm now, once, if this request's launch waits on the estimate:
    /// the estimate as it is when the primary is first found pending (unrounded:
    /// `Plan::deadline` rounds it for the timer). Read then rather than at `call`, so
    /// that a primary answering on its first poll never reads it.
    #[inline]
    pub(crate) fn take_delay(&mut self) -> Option<Duration> {
        if !(self.active && std::mem::take(&mut self.waits)) {
            return None;
        }
        self.adaptive.as_ref().map(Adaptive::target)
    }

    /// The primary was found pending at `now`: the call is timed from the first such
    /// poll.
    #[inline]
    pub(crate) fn pending_at(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    /// Whether the call is being sampled but not timed yet.
    #[inline]
    pub(crate) fn needs_start(&self) -> bool {
        self.active && self.pending_since.is_none()
    }

    /// The primary answered now.
    #[inline]
    pub(crate) fn record(&mut self) {
        self.finish(true);
    }

    /// The primary was dropped unanswered now: its latency is only known to exceed the
    /// time so far. Always recorded, as a cut-short (censored) sample, whatever the
    /// current estimate: see [`product_limit`].
    #[inline]
    pub(crate) fn record_at_least(&mut self) {
        self.finish(false);
    }

    /// Inline: a request that is not sampled gets no further than the first check.
    #[inline(always)]
    fn finish(&mut self, answered: bool) {
        if self.active {
            self.record_sample(answered);
        }
    }

    #[inline(never)]
    fn record_sample(&mut self, answered: bool) {
        self.active = false;
        self.waits = false;
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        match self.pending_since {
            Some(since) => adaptive.record(since.elapsed(), answered, 1),
            // CORRECTNESS: never found pending and never answered, the call never ran —
            // its response future was dropped before its first poll (a caller gone, a
            // server shedding load) — and says nothing of the primary's latency. Recorded,
            // it would be a cut at 0 that ends the warm-up with an estimate of 0: every
            // later request would speculate, just when the fallback can least afford it.
            None if !answered => {}
            None if pick_instant() => adaptive.record(Duration::ZERO, answered, INSTANT_SAMPLE),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        let samples = (0..100_000u64)
            .chain((0..64).map(|p| 1u64 << p))
            .chain((1..64).map(|p| (1u64 << p) - 1))
            .chain([u64::MAX, u64::MAX - 1, 600_000_000_000, 50_700]);
        for nanos in samples {
            let index = bucket(nanos);
            assert!(index < BUCKETS, "{nanos}");
            assert!(top(index) >= nanos, "{nanos}");
            // Relative width at most 1/SUB.
            assert!(top(index) - nanos <= nanos / SUB, "{nanos}");
            if index > 0 {
                assert!(top(index - 1) < nanos, "{nanos}");
            }
        }
        assert!((1..100_000u64).all(|n| bucket(n) >= bucket(n - 1)));
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(top(BUCKETS - 1), u64::MAX);
    }
}
