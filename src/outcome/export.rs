//! The export of outcomes to `tracing` and to the `metrics` facade.

#[cfg(feature = "tracing")]
use super::Outcome;

/// Records `o` on the request's span and emits its "request finished" event.
#[cfg(feature = "tracing")]
pub(crate) fn trace(span: &tracing::Span, o: &Outcome) {
    span.record("served", tracing::field::debug(o.served));
    span.record("primary", tracing::field::debug(o.primary));
    span.record("fallback", tracing::field::debug(o.fallback));
    if let Some(launched) = o.launched {
        span.record("launched", tracing::field::debug(launched));
    }
    span.record("budget_refused", o.budget_refused);
    span.record("speculation_limited", o.speculation_limited);
    span.record("fallback_first", o.fallback_first);
    if let Some(latency) = o.primary_latency {
        span.record("primary_latency_us", latency.as_micros() as u64);
    }
    if let Some(latency) = o.fallback_latency {
        span.record("fallback_latency_us", latency.as_micros() as u64);
    }
    if let Some(refill) = o.refill {
        span.record("refill", tracing::field::debug(refill));
    }
    span.record("polled", o.polled);
    tracing::debug!(
        parent: span,
        served = ?o.served,
        primary = ?o.primary,
        fallback = ?o.fallback,
        elapsed_us = o.elapsed.as_micros() as u64,
        polled = o.polled,
        "request finished"
    );
}

#[cfg(feature = "metrics")]
pub(crate) mod metrics {
    //! Outcomes through the `metrics` facade, on handles registered once per layer.
    use crate::outcome::{Fate, Launched, Outcome, Refilled, Served};
    use ::metrics::{Counter, Histogram};

    /// Every handle a layer reports into, labelled `layer = <name>`.
    pub(crate) struct Handles {
        pub(crate) layer: &'static str,
        served: [Counter; 3],
        fate: [Counter; 6],
        launched: [Counter; 7],
        budget_refusals: Counter,
        fallback_first: Counter,
        refills: [Counter; 3],
        unpolled: Counter,
        limited: Counter,
        primary_latency: Histogram,
        fallback_latency: Histogram,
    }

    impl Handles {
        pub(crate) fn register(layer: &'static str) -> Self {
            ::metrics::describe_counter!(
                "backstop_requests_total",
                "Requests finished, by who served them (primary, fallback, abandoned)."
            );
            ::metrics::describe_counter!(
                "backstop_fallback_total",
                "Requests by what became of their fallback."
            );
            ::metrics::describe_counter!(
                "backstop_fallback_launches_total",
                "Fallback calls started, by why they started when they did."
            );
            ::metrics::describe_counter!(
                "backstop_budget_refusals_total",
                "Speculative launches the budget refused."
            );
            ::metrics::describe_counter!(
                "backstop_fallback_first_total",
                "Requests whose fallback answered while the primary was still pending."
            );
            ::metrics::describe_counter!(
                "backstop_refills_total",
                "Fallback answers handed to the refill action after a miss, by result (started, skipped, failed)."
            );
            ::metrics::describe_counter!(
                "backstop_speculation_limited_total",
                "Speculative launches not made because the layer's max_speculative calls were in flight."
            );
            ::metrics::describe_counter!(
                "backstop_abandoned_unpolled_total",
                "Abandoned requests whose response future was dropped before its first poll."
            );
            ::metrics::describe_histogram!(
                "backstop_primary_latency_seconds",
                ::metrics::Unit::Seconds,
                "Time from the call to the primary's answer."
            );
            ::metrics::describe_histogram!(
                "backstop_fallback_latency_seconds",
                ::metrics::Unit::Seconds,
                "Time from the fallback's launch to its answer."
            );
            let served = |by: &'static str| ::metrics::counter!("backstop_requests_total", "layer" => layer, "served" => by);
            let fate = |fate: &'static str| ::metrics::counter!("backstop_fallback_total", "layer" => layer, "fate" => fate);
            let launched = |why: &'static str| {
                ::metrics::counter!(
                    "backstop_fallback_launches_total",
                    "layer" => layer,
                    "launched" => why
                )
            };
            let refill = |result: &'static str| ::metrics::counter!("backstop_refills_total", "layer" => layer, "result" => result);
            Handles {
                layer,
                refills: [refill("started"), refill("skipped"), refill("failed")],
                served: [served("primary"), served("fallback"), served("abandoned")],
                fate: [
                    fate("not_launched"),
                    fate("dropped_before_ready"),
                    fate("dropped_in_flight"),
                    fate("discarded"),
                    fate("served"),
                    fate("readiness_failed"),
                ],
                launched: [
                    launched("concurrent"),
                    launched("delayed"),
                    launched("adaptive"),
                    launched("after_rejection"),
                    launched("budget_refused"),
                    launched("not_eligible"),
                    launched("limit_reached"),
                ],
                budget_refusals: ::metrics::counter!("backstop_budget_refusals_total", "layer" => layer),
                unpolled: ::metrics::counter!("backstop_abandoned_unpolled_total", "layer" => layer),
                limited: ::metrics::counter!("backstop_speculation_limited_total", "layer" => layer),
                fallback_first: ::metrics::counter!("backstop_fallback_first_total", "layer" => layer),
                primary_latency: ::metrics::histogram!(
                    "backstop_primary_latency_seconds",
                    "layer" => layer
                ),
                fallback_latency: ::metrics::histogram!(
                    "backstop_fallback_latency_seconds",
                    "layer" => layer
                ),
            }
        }

        /// The coalescing counters of a layer with the same name.
        pub(crate) fn coalesce(&self) -> CoalesceHandles {
            CoalesceHandles::register(self.layer)
        }

        pub(crate) fn record(&self, o: &Outcome) {
            let served = match o.served {
                Served::Primary => 0,
                Served::Fallback => 1,
                Served::Abandoned => 2,
            };
            self.served[served].increment(1);
            let fate = match o.fallback {
                Fate::NotLaunched => 0,
                Fate::DroppedBeforeReady => 1,
                Fate::DroppedInFlight => 2,
                Fate::Discarded => 3,
                Fate::Served => 4,
                Fate::ReadinessFailed => 5,
            };
            self.fate[fate].increment(1);
            if let Some(why) = o.launched {
                let why = match why {
                    Launched::Concurrent => 0,
                    Launched::Delayed => 1,
                    Launched::Adaptive => 2,
                    Launched::AfterRejection => 3,
                    Launched::BudgetRefused => 4,
                    Launched::NotEligible => 5,
                    Launched::LimitReached => 6,
                };
                self.launched[why].increment(1);
            }
            if o.budget_refused {
                self.budget_refusals.increment(1);
            }
            if o.fallback_first {
                self.fallback_first.increment(1);
            }
            if o.speculation_limited {
                self.limited.increment(1);
            }
            if !o.polled {
                self.unpolled.increment(1);
            }
            match o.refill {
                Some(Refilled::Started) => self.refills[0].increment(1),
                Some(Refilled::Skipped) => self.refills[1].increment(1),
                Some(Refilled::Failed) => self.refills[2].increment(1),
                None => {}
            }
            if let Some(latency) = o.primary_latency {
                self.primary_latency.record(latency.as_secs_f64());
            }
            if let Some(latency) = o.fallback_latency {
                self.fallback_latency.record(latency.as_secs_f64());
            }
        }
    }

    /// The counters of a coalescing layer, labelled `layer = <name>`.
    pub(crate) struct CoalesceHandles {
        joined: Counter,
        ends: [Counter; 3],
    }

    impl CoalesceHandles {
        pub(crate) fn register(layer: &'static str) -> Self {
            ::metrics::describe_counter!(
                "backstop_coalesce_joined_total",
                "Requests that joined a coalesced call in flight rather than starting one."
            );
            ::metrics::describe_counter!(
                "backstop_coalesce_calls_total",
                "Coalesced calls ended, by how (answered, dropped: last waiter gone, panicked)."
            );
            let end = |end: &'static str| ::metrics::counter!("backstop_coalesce_calls_total", "layer" => layer, "end" => end);
            CoalesceHandles {
                joined: ::metrics::counter!("backstop_coalesce_joined_total", "layer" => layer),
                ends: [end("answered"), end("dropped"), end("panicked")],
            }
        }

        pub(crate) fn joined(&self) {
            self.joined.increment(1);
        }

        /// Answered (0), dropped (1), panicked (2).
        pub(crate) fn ended(&self, end: usize) {
            self.ends[end].increment(1);
        }
    }
}
