//! Per-request overhead of the `Fallback` middleware, measured the way callers pay it,
//! next to the same work written by hand and next to the alternatives, in one run.
//!
//! Every row is served inside one `block_on` of a current-thread tokio runtime (with
//! time enabled) per timed batch: a loop of `svc.ready().await?.call(key).await`, as
//! an axum or tonic stack awaits a service, so the response future is built, moved
//! into the caller's state machine and polled there. The floors are the same work as
//! an `async fn`, awaited the same way, on the same services. Criterion's
//! `iter_custom` times a batch of N requests per `block_on`.
//!
//! Two paths, one criterion group each: `hit` (the cache answers `Some`, the
//! predicate accepts it) and `miss` (the cache answers `None`, the database's answer
//! is served). The cache decides per request, from the key and a hit ratio read
//! through `black_box`.
//!
//! Before a row is timed its answers are checked, its allocations per request are
//! counted by a counting global allocator (the difference between two batch sizes,
//! outside the timed loop), and its response future's size is taken with
//! `size_of_val`. The run ends with a markdown table (median ns per request read back
//! from criterion's `estimates.json`, × floor, allocations, future size) whose every
//! row names the build it was measured in.
//!
//! ```text
//! cargo bench --bench overhead                  # the default build
//! cargo bench --bench overhead --all-features   # every feature compiled in
//! ```
//!
//! `benches/instructions.sh` counts instructions per request for the same rows.

mod support;

#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;

use criterion::{measurement::WallTime, BenchmarkGroup, Criterion};
use std::{
    fmt::Debug,
    fs,
    hint::black_box,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};
use support::{http_stack, Cache, Db, Floor, Rows};
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

/// Requests per batch while allocations are counted: the count is the difference
/// between a batch of `2 * COUNTED` and one of `COUNTED`, so per-batch costs cancel.
const COUNTED: u64 = 5_000;

/// One measured row.
struct Row {
    path: &'static str,
    id: &'static str,
    floor: &'static str,
    allocations: f64,
    future_bytes: Option<usize>,
}

/// One criterion group (one path) being filled.
struct Bench<'a, 'c> {
    group: BenchmarkGroup<'c, WallTime>,
    path: &'static str,
    hits: u64,
    rt: &'a Runtime,
    rows: &'a mut Vec<Row>,
}

impl Bench<'_, '_> {
    /// Counts the allocations per request of `batch(start, n)`.
    fn allocations(&self, mut batch: impl FnMut(u64, u64)) -> f64 {
        batch(0, 200); // warm-up: first-use allocations are not per request
        let (one, ()) = counting_alloc::allocations_in(|| batch(0, COUNTED));
        let (two, ()) = counting_alloc::allocations_in(|| batch(0, 2 * COUNTED));
        (two as f64 - one as f64) / COUNTED as f64
    }

    fn expected_sum(&self, n: u64) -> u64 {
        (0..n).fold(0_u64, |s, k| {
            s.wrapping_add(support::expected(k, self.hits))
        })
    }

    fn push(
        &mut self,
        id: &'static str,
        floor: &'static str,
        allocations: f64,
        size: Option<usize>,
    ) {
        self.rows.push(Row {
            path: self.path,
            id,
            floor,
            allocations,
            future_bytes: size,
        });
    }
}

impl Rows for Bench<'_, '_> {
    fn floor(&mut self, id: &'static str, which: Floor) {
        let rt = self.rt;
        let (mut cache, mut db) = (Cache { hits: self.hits }, Db);
        let sum = rt.block_on(support::floor_batch(which, &mut cache, &mut db, 0, 100));
        assert_eq!(
            sum,
            self.expected_sum(100),
            "{}/{id} answers wrongly",
            self.path
        );
        let allocations = self.allocations(|start, n| {
            black_box(rt.block_on(support::floor_batch(which, &mut cache, &mut db, start, n)));
        });
        let size = support::floor_future_size(which, self.hits);
        self.push(id, "floor", allocations, Some(size));
        self.group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                black_box(rt.block_on(support::floor_batch(which, &mut cache, &mut db, 0, iters)));
                started.elapsed()
            })
        });
    }

    fn service<S>(&mut self, id: &'static str, mut svc: S)
    where
        S: Service<u64, Response = Option<u64>> + 'static,
        S::Error: Debug,
    {
        let rt = self.rt;
        let sum = rt.block_on(support::service_batch(&mut svc, 0, 100));
        assert_eq!(
            sum.expect("no row fails"),
            self.expected_sum(100),
            "{}/{id} answers wrongly",
            self.path
        );
        let allocations = self.allocations(|start, n| {
            black_box(rt.block_on(support::service_batch(&mut svc, start, n)).ok());
        });
        let size = rt.block_on(async {
            let ready = svc.ready().await.expect("ready");
            std::mem::size_of_val(&ready.call(0))
        });
        self.push(id, "floor", allocations, Some(size));
        self.group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                black_box(rt.block_on(support::service_batch(&mut svc, 0, iters)).ok());
                started.elapsed()
            })
        });
    }

    fn hit_path(&self) -> bool {
        self.path == "hit"
    }
}

impl Bench<'_, '_> {
    /// The HTTP rows: an axum router driven in-process, with and without the layer.
    fn http(&mut self) {
        let rt = self.rt;
        let uris = http_stack::uris();
        let body = if self.hits > 0 {
            http_stack::CACHED
        } else {
            http_stack::ORIGIN
        };
        for (id, mut router) in http_stack::rows(self.hits) {
            let total = rt.block_on(http_stack::batch(&mut router, &uris, 0, 100));
            if id != "http_bare" || self.hits > 0 {
                assert_eq!(
                    total,
                    100 * body.len(),
                    "{}/{id} answers wrongly",
                    self.path
                );
            }
            let allocations = self.allocations(|start, n| {
                black_box(rt.block_on(http_stack::batch(&mut router, &uris, start, n)));
            });
            // axum boxes a route's future: the size is that of a pointer, not telling.
            self.push(id, "http_bare", allocations, None);
            self.group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    black_box(rt.block_on(http_stack::batch(&mut router, &uris, 0, iters)));
                    started.elapsed()
                })
            });
        }
    }
}

// ---- reading criterion's results back ----

/// Where criterion writes this build's results: `$CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else the `criterion` folder of the target directory
/// this bench was built in; then a folder per build, so the builds never compare
/// against each other.
fn criterion_dir() -> PathBuf {
    let root = if let Some(home) = std::env::var_os("CRITERION_HOME") {
        home.into()
    } else if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        Path::new(&target).join("criterion")
    } else {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.ancestors().nth(3).map(|t| t.join("criterion")))
            .unwrap_or_else(|| "target/criterion".into())
    };
    root.join(support::build())
}

/// The median time per request, in nanoseconds, of a row timed by this run.
fn median_ns(dir: &Path, path: &str, id: &str, since: SystemTime) -> Option<f64> {
    let file = dir.join(path).join(id).join("new/estimates.json");
    if fs::metadata(&file).ok()?.modified().ok()? < since {
        return None;
    }
    let json = fs::read_to_string(file).ok()?;
    let median = &json[json.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn print_table(rows: &[Row], dir: &Path, since: SystemTime) {
    let build = support::build();
    let find = |path: &str, id: &str| rows.iter().find(|r| r.path == path && r.id == id);
    let time = |path: &str, row: &Row| {
        let ns = median_ns(dir, path, row.id, since);
        let floor = median_ns(dir, path, row.floor, since);
        match (ns, floor) {
            (Some(ns), Some(f)) => format!("{ns:.1} | {:.2}", ns / f),
            (Some(ns), None) => format!("{ns:.1} | —"),
            _ => "— | —".to_owned(),
        }
    };
    println!(
        "\n| row | build | does | hit ns | hit × floor | miss ns | miss × floor | \
         allocs/req hit, miss | future bytes |\n|---|---|---|---:|---:|---:|---:|---|---:|"
    );
    let mut seen: Vec<&str> = Vec::new();
    for row in rows {
        if seen.contains(&row.id) {
            continue;
        }
        seen.push(row.id);
        let (hit, miss) = (find("hit", row.id), find("miss", row.id));
        let cell = |r: Option<&Row>, path| r.map_or("— | —".to_owned(), |r| time(path, r));
        let allocs =
            |r: Option<&Row>| r.map_or("—".to_owned(), |r| format!("{:.2}", r.allocations));
        println!(
            "| `{}` | {build} | {} | {} | {} | {}, {} | {} |",
            row.id,
            support::describe(row.id),
            cell(hit, "hit"),
            cell(miss, "miss"),
            allocs(hit),
            allocs(miss),
            row.future_bytes
                .map_or("boxed".to_owned(), |b| b.to_string()),
        );
    }
}

fn main() {
    let started = SystemTime::now();
    let load_before = load_average();
    let dir = criterion_dir();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args()
        .output_directory(&dir);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");

    let mut rows = Vec::new();
    for (path, hits) in [("hit", 100), ("miss", 0)] {
        let mut b = Bench {
            group: c.benchmark_group(path),
            path,
            hits: black_box(hits),
            rt: &rt,
            rows: &mut rows,
        };
        let hits = b.hits;
        support::rows(&mut b, hits);
        b.http();
        b.group.finish();
    }
    c.final_summary();

    println!(
        "\nbuild: {}; {} cores; load average (1, 5, 15 min) {load_before} before the run, {} after",
        support::build(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
    );
    print_table(&rows, &dir, started);
}
