//! The `tracing` feature: one debug-level span per request carrying the outcome's
//! fields, a debug event when it finishes, and nothing at info level or above.

mod support;

use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicU64, Ordering::SeqCst},
        Arc, Mutex,
    },
};
use support::{hit, Probe, Reply};
use tower::ServiceExt;
use tower_backstop::Fallback;
use tracing::{
    field::{Field, Visit},
    span, Event, Level, Metadata, Subscriber,
};

/// What the capturing subscriber saw.
#[derive(Default, Debug)]
struct Seen {
    spans: Vec<(String, Level)>,
    fields: Vec<(String, String)>,
    events: Vec<(Level, Vec<(String, String)>)>,
}

/// Records what it sees; one that `panics` panics on every event instead.
#[derive(Clone, Default)]
struct Capture {
    seen: Arc<Mutex<Seen>>,
    next_id: Arc<AtomicU64>,
    panics: bool,
}

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &span::Attributes<'_>) -> span::Id {
        let meta = span.metadata();
        let mut seen = self.seen.lock().unwrap();
        seen.spans.push((meta.name().to_string(), *meta.level()));
        span::Id::from_u64(self.next_id.fetch_add(1, SeqCst) + 1)
    }
    fn record(&self, _: &span::Id, values: &span::Record<'_>) {
        let mut fields = Fields(Vec::new());
        values.record(&mut fields);
        self.seen.lock().unwrap().fields.extend(fields.0);
    }
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        if self.panics {
            panic!("subscriber panicked on purpose");
        }
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        let level = *event.metadata().level();
        self.seen.lock().unwrap().events.push((level, fields.0));
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn one_debug_span_per_request_with_the_outcome() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let svc = Fallback::new(
        Probe::fixed("cache", 3, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit);
    svc.clone().oneshot(1).await.unwrap();

    let seen = capture.seen.lock().unwrap();
    assert_eq!(seen.spans, vec![("backstop".to_string(), Level::DEBUG)]);
    let field = |name: &str| {
        seen.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("served").as_deref(), Some("Fallback"));
    assert_eq!(field("primary").as_deref(), Some("Rejected"));
    assert_eq!(field("fallback").as_deref(), Some("Served"));
    assert_eq!(field("launched").as_deref(), Some("Concurrent"));
    assert_eq!(field("primary_latency_us").as_deref(), Some("3000"));
    assert_eq!(field("fallback_latency_us").as_deref(), Some("10000"));

    assert_eq!(seen.events.len(), 1);
    let (level, fields) = &seen.events[0];
    assert_eq!(*level, Level::DEBUG);
    assert!(fields.contains(&("message".into(), "request finished".into())));
    assert!(
        seen.events.iter().all(|(level, _)| *level > Level::INFO),
        "nothing at info or above: {:?}",
        seen.events
    );
}

#[tokio::test(start_paused = true)]
async fn no_span_without_a_subscriber() {
    // With no subscriber, no request is tracked at all.
    let mut svc = Fallback::new(
        Probe::fixed("cache", 3, Reply::Empty),
        Probe::fixed("db", 10, Reply::Value(2)),
    );
    let fut = tower::Service::call(&mut svc, 1);
    assert!(format!("{fut:?}").contains("observed: false"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_subscriber_leaves_nothing_of_the_layer_behind() {
    use futures_util::FutureExt;
    use tower_backstop::outcome::{Outcome, Stats};
    // The subscriber panics on the finished request's event, which comes before the
    // hook. The request's cold part goes back to this thread's free list all the same:
    // it must keep neither the layer's hook nor the span there, and the next request
    // to take it — a counting layer's — must not run that hook.
    let in_hook = Arc::new(());
    let held = Arc::clone(&in_hook);
    let hooked = Arc::new(AtomicU64::new(0));
    let calls = Arc::clone(&hooked);
    let svc = Fallback::new(
        Probe::fixed("cache", 3, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit)
    .on_outcome(move |_: &Outcome| {
        let _ = &held;
        calls.fetch_add(1, SeqCst);
    });
    let panicking = Capture {
        panics: true,
        ..Capture::default()
    };
    let guard = tracing::subscriber::set_default(panicking);
    let served = std::panic::AssertUnwindSafe(svc.oneshot(1))
        .catch_unwind()
        .await;
    drop(guard);
    assert!(served.is_err(), "the subscriber's panic reaches the caller");
    assert_eq!(
        Arc::strong_count(&in_hook),
        1,
        "only the test holds the hook's Arc"
    );

    let stats = Stats::new();
    Fallback::new(
        Probe::fixed("cache", 3, Reply::Value(1)),
        Probe::fixed("db", 10, Reply::Value(2)),
    )
    .accept(hit)
    .stats(stats.clone())
    .oneshot(1)
    .await
    .unwrap();
    assert_eq!(stats.snapshot().requests, 1);
    assert_eq!(hooked.load(SeqCst), 0, "the hook never ran");
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_request_reports_the_time_to_its_drop() {
    use support::poll_once;
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let mut svc = Fallback::new(
        Probe::fixed("cache", 1_000, Reply::Value(1)),
        Probe::fixed("db", 1_000, Reply::Value(2)),
    )
    .accept(hit);
    // Polled at 0, dropped at 500 ms with no poll then.
    let mut fut = Box::pin(tower::Service::call(&mut svc, 1));
    assert!(poll_once(&mut fut).await.is_pending());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(fut);
    // And one dropped before its first poll.
    drop(tower::Service::call(&mut svc, 2));

    let seen = capture.seen.lock().unwrap();
    let field = |fields: &[(String, String)], name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(seen.events.len(), 2);
    let (_, polled) = &seen.events[0];
    assert_eq!(field(polled, "elapsed_us").as_deref(), Some("500000"));
    assert_eq!(field(polled, "polled").as_deref(), Some("true"));
    let (_, unpolled) = &seen.events[1];
    assert_eq!(field(unpolled, "served").as_deref(), Some("Abandoned"));
    assert_eq!(field(unpolled, "polled").as_deref(), Some("false"));
}
