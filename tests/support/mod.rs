//! Probe services for the integration tests.
//!
//! A [`Probe`] answers after a simulated latency (use tokio's paused clock) and counts
//! what happened to every call it was given: started, completed, or dropped in flight,
//! plus how often it was polled for readiness and how many of its clones are alive. The
//! counters are what let a test see that a future was *dropped*, which a mock cannot.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};
use tower::Service;
use tower_backstop::outcome::Outcome;

/// What a probe answers with: where the answer came from and the value it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub from: &'static str,
    pub value: Option<u64>,
}

/// The error every probe shares, so that both branches have one error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError(pub &'static str);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed", self.0)
    }
}

impl std::error::Error for ProbeError {}

/// The accept predicate the tests use: a hit is an `Ok` that carries a value.
pub fn hit(result: &Result<Answer, ProbeError>) -> bool {
    matches!(result, Ok(Answer { value: Some(_), .. }))
}

/// How a probe reacts to one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// `Ok` with a value (a hit).
    Value(u64),
    /// `Ok` without a value (a miss).
    Empty,
    /// `Err`.
    Fail,
}

type Script = Arc<dyn Fn(u64) -> (Duration, Reply) + Send + Sync>;

/// Counters shared by a probe and all of its clones.
#[derive(Debug, Default)]
pub struct Counts {
    pub ready_polls: AtomicUsize,
    pub started: AtomicUsize,
    pub completed: AtomicUsize,
    pub dropped_in_flight: AtomicUsize,
    pub clones_alive: AtomicUsize,
    /// When each call was started, in order (tokio's clock, so exact when paused).
    pub started_at: std::sync::Mutex<Vec<tokio::time::Instant>>,
}

impl Counts {
    pub fn started(&self) -> usize {
        self.started.load(SeqCst)
    }
    pub fn completed(&self) -> usize {
        self.completed.load(SeqCst)
    }
    pub fn dropped(&self) -> usize {
        self.dropped_in_flight.load(SeqCst)
    }
    pub fn ready_polls(&self) -> usize {
        self.ready_polls.load(SeqCst)
    }
    pub fn alive(&self) -> usize {
        self.clones_alive.load(SeqCst)
    }
    /// When each call started at or after `origin`, as offsets from it.
    pub fn starts_since(&self, origin: tokio::time::Instant) -> Vec<Duration> {
        let starts = self.started_at.lock().unwrap();
        starts
            .iter()
            .filter(|t| **t >= origin)
            .map(|t| t.duration_since(origin))
            .collect()
    }
    /// Calls that were started and have neither completed nor been dropped.
    pub fn in_flight(&self) -> usize {
        self.started() - self.completed() - self.dropped()
    }
}

/// A scripted service that records the fate of every call.
pub struct Probe {
    name: &'static str,
    script: Script,
    never_ready: bool,
    counts: Arc<Counts>,
}

impl Probe {
    /// A probe that answers every request `key` with `reply(key)` after `latency(key)`.
    pub fn new(
        name: &'static str,
        script: impl Fn(u64) -> (Duration, Reply) + Send + Sync + 'static,
    ) -> Self {
        let counts = Arc::new(Counts::default());
        counts.clones_alive.fetch_add(1, SeqCst);
        Probe {
            name,
            script: Arc::new(script),
            never_ready: false,
            counts,
        }
    }

    /// A probe that answers every request with `reply` after `ms` milliseconds.
    pub fn fixed(name: &'static str, ms: u64, reply: Reply) -> Self {
        Probe::new(name, move |_| (Duration::from_millis(ms), reply))
    }

    /// Makes `poll_ready` return `Pending` forever.
    pub fn never_ready(mut self) -> Self {
        self.never_ready = true;
        self
    }

    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        self.counts.clones_alive.fetch_add(1, SeqCst);
        Probe {
            name: self.name,
            script: self.script.clone(),
            never_ready: self.never_ready,
            counts: self.counts.clone(),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.counts.clones_alive.fetch_sub(1, SeqCst);
    }
}

impl Service<u64> for Probe {
    type Response = Answer;
    type Error = ProbeError;
    type Future = ProbeFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProbeError>> {
        self.counts.ready_polls.fetch_add(1, SeqCst);
        if self.never_ready {
            // Nothing will ever wake this task on our behalf: readiness never comes.
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, key: u64) -> ProbeFuture {
        assert!(
            !self.never_ready,
            "{} was called without being ready",
            self.name
        );
        self.counts.started.fetch_add(1, SeqCst);
        let now = tokio::time::Instant::now();
        self.counts.started_at.lock().unwrap().push(now);
        let (latency, reply) = (self.script)(key);
        let name = self.name;
        let guard = FlightGuard {
            counts: self.counts.clone(),
            done: false,
        };
        ProbeFuture {
            inner: Box::pin(async move {
                let mut guard = guard;
                tokio::time::sleep(latency).await;
                guard.done = true;
                guard.counts.completed.fetch_add(1, SeqCst);
                match reply {
                    Reply::Value(v) => Ok(Answer {
                        from: name,
                        value: Some(v),
                    }),
                    Reply::Empty => Ok(Answer {
                        from: name,
                        value: None,
                    }),
                    Reply::Fail => Err(ProbeError(name)),
                }
            }),
        }
    }
}

/// Counts the call as dropped in flight unless it completed.
struct FlightGuard {
    counts: Arc<Counts>,
    done: bool,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.done {
            self.counts.dropped_in_flight.fetch_add(1, SeqCst);
        }
    }
}

/// The future of a [`Probe`] call. (The test helper boxes; the middleware does not.)
pub struct ProbeFuture {
    inner: Pin<Box<dyn Future<Output = Result<Answer, ProbeError>> + Send>>,
}

impl Future for ProbeFuture {
    type Output = Result<Answer, ProbeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Polls `fut` once, returning what it returned; the future stays alive and usable.
pub async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}

/// Shorthand for an `Infallible` service stack's result type.
pub type InfallibleResult<T> = Result<T, Infallible>;

/// The counters of a probe, kept after the probe moved into a service.
pub type CountsRef = Arc<Counts>;

/// Collects the outcomes a service reports.
#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<Vec<Outcome>>>);

impl Outcomes {
    pub fn hook(&self) -> impl Fn(&Outcome) + Send + Sync + 'static {
        let seen = self.0.clone();
        move |o: &Outcome| seen.lock().unwrap().push(o.clone())
    }
    pub fn take(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    pub fn only(&self) -> Outcome {
        let mut all = self.take();
        assert_eq!(all.len(), 1, "{all:?}");
        all.pop().unwrap()
    }
}
