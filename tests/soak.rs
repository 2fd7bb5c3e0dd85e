//! The short soak, run by `cargo test`: 20,000 requests through the layer in front of
//! real hyper servers on loopback, with every check of `examples/soak.rs` (whose code
//! this is): no lost or mismatched answer, no branch future, server handler,
//! connection or task left behind, the layer's counters in agreement, and a resident
//! set that stays flat after the first round.
//!
//! The full million: `cargo run --release --all-features --example soak -- --requests 1000000
//! --concurrency 256`.

#[allow(dead_code)]
#[path = "../examples/soak.rs"]
mod soak;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_requests_lose_nothing_and_leak_nothing() {
    let config = soak::Config {
        requests: 20_000,
        concurrency: 256,
        rounds: 4,
        deadline: std::time::Duration::from_secs(120),
        verbose: true,
        ..soak::Config::default()
    };
    let report = soak::run(&config).await;
    println!("{report}");
    assert!(report.failures.is_empty(), "{report}");
}
