use hdrhistogram::Histogram;
use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, TryLockError,
    },
    time::Duration,
};
use tokio::time::Instant;

/// The highest latency the estimate tracks; slower answers count as this long.
const MAX_TRACKED: Duration = Duration::from_secs(60);
/// `threshold_micros` before the first estimate.
const NO_ESTIMATE: u64 = u64::MAX;

/// A launch delay that follows a percentile of the primary's own recent latency.
///
/// The fallback starts once the primary has been pending longer than the chosen
/// percentile of its recent latency — over the last half to whole
/// [`window`](Adaptive::window) of answers, in two rotating halves: at p90,
/// about one request in ten starts its fallback early, and those are the slow ones —
/// the ones where starting early saves the most. Until
/// [`min_samples`](Adaptive::min_samples) latencies have been seen, the configured
/// initial delay applies.
///
/// Calls cut short — the primary dropped unanswered because the caller gave up, a
/// timeout fired, or the patience bound served the fallback — still count: a call that
/// was pending longer than the current estimate is recorded as at least that slow. (A
/// tail that only ever gets cut short would otherwise vanish from the estimate, and the
/// delay would drift too low.)
///
/// All clones of an `Adaptive`, and so all the services a layer builds, share one
/// estimate. Reading the delay is one atomic load. Recording a latency takes a lock
/// that is only ever *tried*: a sample that finds it busy is skipped and counted (see
/// [`skipped`](Adaptive::skipped)) rather than making the request wait.
///
/// ```
/// use std::time::Duration;
/// use tower_backstop::launch::{Adaptive, Launch};
///
/// // Start the fallback once the primary is slower than its p90, 5 ms until known.
/// let launch = Launch::Adaptive(Adaptive::new(0.9, Duration::from_millis(5)).window(2_000));
/// # let _ = launch;
/// ```
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
    threshold_micros: AtomicU64,
    skipped: AtomicU64,
    recorder: Mutex<Recorder>,
}

/// Two half-windows: samples go into `current`; when it is full it replaces
/// `previous`. The estimate covers the last `window / 2` to `window` samples.
struct Recorder {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    scratch: Histogram<u64>,
    since_estimate: u64,
}

impl Adaptive {
    /// Follows the `quantile` (e.g. `0.9` for p90) of the primary's latency, with
    /// `initial_delay` until enough latencies have been seen.
    ///
    /// A `quantile` outside `0.0..=1.0` is clamped into it (`NaN` counts as `1.0`).
    /// Defaults: a window of 1,000 answers, an estimate from 100 answers on.
    pub fn new(quantile: f64, initial_delay: Duration) -> Self {
        let quantile = if quantile.is_nan() {
            1.0
        } else {
            quantile.clamp(0.0, 1.0)
        };
        Adaptive::build(quantile, initial_delay, 1_000, 100)
    }

    fn build(quantile: f64, initial: Duration, window: u64, min_samples: u64) -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, MAX_TRACKED.as_micros() as u64, 2)
                .expect("bounds are valid")
        };
        Adaptive {
            inner: Arc::new(Estimator {
                quantile,
                initial,
                window: window.max(2),
                // The two halves may hold as few as `window / 2` answers once full, so
                // a longer warm-up might never end: the builders keep what was asked
                // for, and this is what applies.
                min_samples: min_samples.clamp(1, window.max(2) / 2),
                asked_min_samples: min_samples,
                threshold_micros: AtomicU64::new(NO_ESTIMATE),
                skipped: AtomicU64::new(0),
                recorder: Mutex::new(Recorder {
                    current: histogram(),
                    previous: histogram(),
                    scratch: histogram(),
                    since_estimate: 0,
                }),
            }),
        }
    }

    /// Sets how many recent answers the estimate covers (at least 2). Default: 1,000.
    ///
    /// A shorter window follows a change in the primary's latency sooner and is noisier.
    /// Starts a new, empty estimate.
    pub fn window(self, answers: u64) -> Self {
        let e = &self.inner;
        Adaptive::build(e.quantile, e.initial, answers, e.asked_min_samples)
    }

    /// Sets how many answers must be seen before the estimate replaces the initial
    /// delay: at least 1 and at most half the window (a larger value is lowered to
    /// that, since the estimate may hold no more). Default: 100. Starts a new, empty
    /// estimate.
    pub fn min_samples(self, answers: u64) -> Self {
        let e = &self.inner;
        Adaptive::build(e.quantile, e.initial, e.window, answers)
    }

    /// The current estimate of the percentile, or `None` while warming up.
    pub fn estimate(&self) -> Option<Duration> {
        match self.inner.threshold_micros.load(Ordering::Relaxed) {
            NO_ESTIMATE => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// The delay a request starting now would get: the estimate, or the initial delay.
    pub fn delay(&self) -> Duration {
        self.estimate().unwrap_or(self.inner.initial)
    }

    /// How many latencies were dropped because another request was recording at the
    /// same moment.
    pub fn skipped(&self) -> u64 {
        self.inner.skipped.load(Ordering::Relaxed)
    }

    /// A timer for this request's primary call, if it is sampled.
    #[inline]
    pub(crate) fn sampler(&self) -> Option<Sampler> {
        Some(Sampler::start(self))
    }

    fn record(&self, latency: Duration) {
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
            scratch,
            since_estimate,
        } = &mut *recorder;

        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        current.saturating_record(micros);
        *since_estimate += 1;

        let half = e.window / 2;
        if current.len() >= half {
            std::mem::swap(current, previous);
            current.reset();
        }
        // Re-estimate a few times per half-window (the quantile walks every bucket), and
        // as soon as the warm-up ends.
        let held = current.len() + previous.len();
        let warming_up = e.threshold_micros.load(Ordering::Relaxed) == NO_ESTIMATE;
        if held >= e.min_samples && (warming_up || *since_estimate >= (half / 4).max(1)) {
            *since_estimate = 0;
            scratch.reset();
            // The three histograms share their bounds, so adding cannot fail.
            let _ = scratch.add(&*previous);
            let _ = scratch.add(&*current);
            let estimate = scratch.value_at_quantile(e.quantile);
            e.threshold_micros.store(estimate, Ordering::Relaxed);
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
            .finish()
    }
}

/// Times one primary call for the estimate.
pub(crate) struct Sampler {
    adaptive: Adaptive,
    start: Instant,
}

impl Sampler {
    /// Starts timing a primary call now.
    fn start(adaptive: &Adaptive) -> Self {
        Sampler {
            adaptive: adaptive.clone(),
            start: Instant::now(),
        }
    }

    /// The primary answered now.
    pub(crate) fn record(self) {
        self.adaptive.record(self.start.elapsed());
    }

    /// The primary was dropped unanswered now. Its latency is at least the time so far;
    /// that tells the percentile something only if it already exceeds the current
    /// delay, in which case it is recorded as that slow. A call cut short sooner might
    /// have been fast or slow, and is left out rather than counted as fast.
    pub(crate) fn record_at_least(self) {
        let so_far = self.start.elapsed();
        if so_far >= self.adaptive.delay() {
            self.adaptive.record(so_far);
        }
    }
}
