//! The load generator: the workload's requests, a fixed number of them at a fixed
//! concurrency, each answer checked and its latency measured at the client.

use crate::{
    model::{is_cached, key_of, row_of, SEQ, SOURCE},
    Config,
};
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use indicatif::ProgressBar;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};
use tower_backstop::http::X_SERVED_BY;

/// A request that takes longer than this counts as an error (and ends its worker's wait).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one run of the workload measured, at the client.
pub struct Run {
    /// Every request's latency, sorted.
    pub latencies: Vec<Duration>,
    pub wall: Duration,
    /// Requests that failed, timed out, or were not answered `200`.
    pub errors: usize,
    /// `200` answers with the wrong row, or from the wrong service, or marked by the
    /// layer as served by the wrong branch.
    pub wrong: usize,
}

/// Sends requests `0..count` of the workload to `target`, `concurrency` at a time.
pub async fn load(target: SocketAddr, config: &Config, count: usize, bar: &ProgressBar) -> Run {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.min(count) {
        let (client, next, bar, hit_rate) = (
            client.clone(),
            Arc::clone(&next),
            bar.clone(),
            config.hit_rate,
        );
        workers.spawn(async move {
            let mut run = Run {
                latencies: Vec::new(),
                wall: Duration::ZERO,
                errors: 0,
                wrong: 0,
            };
            // Bounded: every worker stops once `count` requests have been handed out.
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= count {
                    return run;
                }
                let key = key_of(i);
                let req = Request::get(format!("http://{target}/item/{key}"))
                    .header(SEQ, i)
                    .body(Empty::new())
                    .expect("a valid request");
                let t = Instant::now();
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let res = client.request(req).await.ok()?;
                    let status = res.status();
                    let source = res.headers().get(&SOURCE).cloned();
                    let served_by = res.headers().get(&X_SERVED_BY).cloned();
                    let body = res.into_body().collect().await.ok()?.to_bytes();
                    Some((status, source, served_by, body))
                })
                .await;
                run.latencies.push(t.elapsed());
                bar.inc(1);
                match answer {
                    Ok(Some((StatusCode::OK, source, served_by, body))) => {
                        // What the service that answered says, and what the layer says.
                        let expected = if is_cached(key, hit_rate) {
                            ("cache", "primary")
                        } else {
                            ("database", "fallback")
                        };
                        if body != row_of(key).as_bytes()
                            || source.is_none_or(|s| s != expected.0)
                            || served_by.is_none_or(|s| s != expected.1)
                        {
                            run.wrong += 1;
                        }
                    }
                    _ => run.errors += 1,
                }
            }
        });
    }
    let mut total = Run {
        latencies: Vec::with_capacity(count),
        wall: Duration::ZERO,
        errors: 0,
        wrong: 0,
    };
    while let Some(run) = workers.join_next().await {
        let run = run.expect("a load worker panicked");
        total.latencies.extend(run.latencies);
        total.errors += run.errors;
        total.wrong += run.wrong;
    }
    total.wall = started.elapsed();
    total.latencies.sort_unstable();
    total
}
