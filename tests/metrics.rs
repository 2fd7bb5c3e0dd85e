//! The `metrics` feature: outcomes reach the metrics facade on handles registered once
//! per layer, with the layer's name as a label.

mod support;

use metrics_util::{
    debugging::{DebugValue, DebuggingRecorder},
    CompositeKey, MetricKind,
};
use support::{hit, Probe, Reply};
use tower::ServiceExt;
use tower_backstop::Fallback;

type Entry = (
    CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
);

/// The value of the metric `name` of the layer "cache", with `label` if given.
fn value<'a>(
    snapshot: &'a [Entry],
    name: &str,
    label: Option<(&str, &str)>,
) -> Option<&'a DebugValue> {
    snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let labels_match = key
            .labels()
            .any(|l| l.key() == "layer" && l.value() == "cache")
            && label.is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v));
        (key.name() == name && labels_match).then_some(value)
    })
}

#[test]
fn outcomes_are_exported_through_the_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let svc = metrics::with_local_recorder(&recorder, || {
        Fallback::new(
            Probe::new("cache", |key| match key {
                0 => (std::time::Duration::from_millis(2), Reply::Value(1)),
                _ => (std::time::Duration::from_millis(3), Reply::Empty),
            }),
            Probe::fixed("db", 10, Reply::Value(2)),
        )
        .accept(hit)
        // Both misses are refilled: key 1 starts a write, key 2 has nothing to write.
        .refill(|key: u64, _: &support::Answer| {
            Ok::<_, std::convert::Infallible>(match key {
                1 => tower_backstop::refill::Write::Started,
                _ => tower_backstop::refill::Write::Skipped,
            })
        })
        .metrics("cache")
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        for key in [0, 1, 2] {
            svc.clone().oneshot(key).await.unwrap();
        }
        // Dropped before its first poll: abandoned, and unpolled.
        drop(tower::Service::call(&mut svc.clone(), 3));
    });

    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name, label| match value(&snapshot, name, label) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {label:?}: {other:?}"),
    };
    assert_eq!(
        counter("backstop_requests_total", Some(("served", "primary"))),
        1
    );
    assert_eq!(
        counter("backstop_requests_total", Some(("served", "fallback"))),
        2
    );
    assert_eq!(
        counter("backstop_requests_total", Some(("served", "abandoned"))),
        1
    );
    assert_eq!(counter("backstop_abandoned_unpolled_total", None), 1);
    assert_eq!(
        counter(
            "backstop_fallback_total",
            Some(("fate", "dropped_in_flight"))
        ),
        1
    );
    assert_eq!(
        counter("backstop_fallback_total", Some(("fate", "served"))),
        2
    );
    assert_eq!(
        counter(
            "backstop_fallback_launches_total",
            Some(("launched", "concurrent"))
        ),
        3
    );
    for result in ["started", "skipped"] {
        assert_eq!(
            counter("backstop_refills_total", Some(("result", result))),
            1,
            "{result}"
        );
    }
    match value(&snapshot, "backstop_fallback_latency_seconds", None) {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 2);
            assert!(samples.iter().all(|s| s.into_inner() == 0.010));
        }
        other => panic!("{other:?}"),
    }
    assert!(snapshot
        .iter()
        .any(|(k, ..)| k.kind() == MetricKind::Histogram
            && k.key().name() == "backstop_primary_latency_seconds"));
}

#[test]
fn coalescing_is_exported_whatever_the_order_of_the_builder_calls() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // `metrics` before `coalesce_by`: the coalescer reports all the same.
    let svc = metrics::with_local_recorder(&recorder, || {
        Fallback::new(
            Probe::fixed("cache", 2, Reply::Empty),
            Probe::fixed("db", 10, Reply::Value(2)),
        )
        .accept(hit)
        .metrics("cache")
        .coalesce_by(|key: &u64| Some(*key))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let answers = futures_util::future::join_all((0..4).map(|_| svc.clone().oneshot(1))).await;
        assert!(answers.iter().all(Result::is_ok));
    });

    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name, label| match value(&snapshot, name, label) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {label:?}: {other:?}"),
    };
    assert_eq!(counter("backstop_coalesce_joined_total", None), 3);
    assert_eq!(
        counter("backstop_coalesce_calls_total", Some(("end", "answered"))),
        1
    );
    assert_eq!(
        counter("backstop_coalesce_calls_total", Some(("end", "dropped"))),
        0
    );
}
