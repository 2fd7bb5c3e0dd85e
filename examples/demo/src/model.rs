//! The workload: which keys exist and which the cache holds, the request sequence, the
//! rows' contents, and the simulated network latencies — all drawn from a fixed seed,
//! so every launch policy sees the very same requests with the very same latencies.

use crate::Config;
use axum::http::{header::HeaderName, HeaderMap};
use std::time::Duration;

/// Rows in the database; keys are `1..=ROWS`.
pub const ROWS: u64 = 10_000;
/// Seeds the key sequence and the simulated latencies: every run sends the same requests.
const SEED: u64 = 0x5EED_CAFE_F00D_D00D;
/// The request's position in the workload, from which each service draws its latency.
pub const SEQ: HeaderName = HeaderName::from_static("x-demo-seq");
/// Which service produced an answer: `cache` or `database`.
pub const SOURCE: HeaderName = HeaderName::from_static("x-source");

/// SplitMix64's finaliser: a well-mixed hash of `x`.
fn mix(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in `[0, 1)` from `x`.
fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw from `x` (Box–Muller).
fn normal(x: u64) -> f64 {
    let u1 = unit(x ^ 0x1111).max(f64::MIN_POSITIVE);
    let u2 = unit(x ^ 0x2222);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A simulated network latency: lognormal around a median, with a slow tail.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    median_ms: f64,
    /// The lognormal's spread: about 68% of draws fall within `exp(±sigma)` of the median.
    sigma: f64,
    /// The fraction of draws in the slow tail ...
    tail: f64,
    /// ... and how many times slower they are.
    tail_factor: f64,
    /// Which stream of draws: each latency of a request is drawn independently.
    stream: u64,
}

impl Latency {
    /// A cache hit: answered by the first tier.
    pub fn cache_hit(config: &Config) -> Latency {
        Latency {
            median_ms: config.cache_ms,
            sigma: 0.25,
            tail: 0.02,
            tail_factor: 5.0,
            stream: 1,
        }
    }

    /// A cache miss: answered once the second tier has missed too.
    pub fn cache_miss(config: &Config) -> Latency {
        Latency {
            median_ms: config.miss_ms,
            sigma: 0.25,
            tail: 0.02,
            tail_factor: 3.0,
            stream: 2,
        }
    }

    /// The database's round trip.
    pub fn database(config: &Config) -> Latency {
        Latency {
            median_ms: config.db_ms,
            sigma: 0.3,
            tail: 0.01,
            tail_factor: 4.0,
            stream: 3,
        }
    }

    /// The latency of request `seq`: the same for every policy.
    pub fn draw(&self, seq: u64) -> Duration {
        let x = mix(SEED ^ self.stream.wrapping_mul(0x9E37_79B9) ^ seq);
        let mut ms = self.median_ms * (self.sigma * normal(x)).exp();
        if unit(x ^ 0x3333) < self.tail {
            ms *= self.tail_factor;
        }
        Duration::from_secs_f64(ms / 1_000.0)
    }
}

/// Which keys the cache holds: a fraction `hit_rate` of them, fixed by the seed.
pub fn is_cached(key: u64, hit_rate: f64) -> bool {
    unit(SEED ^ 0xCAC4E ^ key) < hit_rate
}

/// The key of the `i`-th request of the workload, uniform over the rows.
pub fn key_of(i: usize) -> u64 {
    1 + mix(SEED ^ 0xC0FFEE ^ i as u64) % ROWS
}

/// The row `key` is seeded with: its name, price in cents and stock.
pub fn item(key: u64) -> (String, u64, u64) {
    let h = mix(key ^ 0xD00D);
    (format!("item {key:05}"), 100 + h % 99_900, (h >> 32) % 500)
}

/// The only correct answer for `key`, whichever service gives it.
pub fn row_of(key: u64) -> String {
    let (name, price_cents, stock) = item(key);
    format!(r#"{{"id":{key},"name":"{name}","price_cents":{price_cents},"stock":{stock}}}"#)
}

/// The request's position in the workload, as sent by the load generator.
pub fn seq_of(headers: &HeaderMap) -> u64 {
    headers
        .get(&SEQ)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}
