//! Serves N requests of one row of the overhead bench through the same awaited loop,
//! for counting instructions per request under `valgrind --tool=callgrind`.
//!
//! ```text
//! instructions --build           # the build: `default`, `all-features`, ...
//! instructions --list            # the rows of this build, with their paths
//! instructions ROW hit|miss N    # serve N requests of ROW, in one `block_on`
//! ```
//!
//! `benches/instructions.sh` builds this, runs every row at two N and prints the
//! difference per request, so start-up and the runtime's set-up cancel out. Run by
//! `cargo bench` with no arguments, it prints its usage and does nothing.

mod support;

use std::{fmt::Debug, hint::black_box, process::ExitCode};
use support::{http_stack, Cache, Db, Floor, Rows};
use tokio::runtime::Runtime;
use tower::Service;

/// Runs the named row, or lists every row.
struct One<'a> {
    want: Option<&'a str>,
    hit_path: bool,
    n: u64,
    rt: &'a Runtime,
    found: bool,
}

impl One<'_> {
    fn hits(&self) -> u64 {
        black_box(if self.hit_path { 100 } else { 0 })
    }

    /// Whether `id` is the row to run; lists it when listing.
    fn is(&mut self, id: &str) -> bool {
        match self.want {
            None => {
                println!("{id} {}", if self.hit_path { "hit" } else { "miss" });
                false
            }
            Some(want) if want == id => {
                self.found = true;
                true
            }
            Some(_) => false,
        }
    }
}

impl Rows for One<'_> {
    fn floor(&mut self, id: &'static str, which: Floor) {
        if self.is(id) {
            let (mut cache, mut db) = (Cache { hits: self.hits() }, Db);
            let n = self.n;
            black_box(
                self.rt
                    .block_on(support::floor_batch(which, &mut cache, &mut db, 0, n)),
            );
        }
    }

    fn service<S>(&mut self, id: &'static str, mut svc: S)
    where
        S: Service<u64, Response = Option<u64>> + 'static,
        S::Error: Debug,
    {
        if self.is(id) {
            let n = self.n;
            let sum = self.rt.block_on(support::service_batch(&mut svc, 0, n));
            black_box(sum.expect("no row fails"));
        }
    }

    /// Not the TSC clock's row: its calibration loops until its error is small enough,
    /// a different number of times in every process, so the difference between two
    /// runs is noise. It is timed in `overhead` only.
    fn wants(&self, id: &str) -> bool {
        id != "concurrent_hook_tsc"
    }

    fn hit_path(&self) -> bool {
        self.hit_path
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: instructions --build | --list | ROW hit|miss N");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");

    if args.first().map(String::as_str) == Some("--build") {
        println!("{}", support::build());
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--list") {
        for hit_path in [true, false] {
            let mut one = One {
                want: None,
                hit_path,
                n: 0,
                rt: &rt,
                found: false,
            };
            let hits = one.hits();
            support::rows(&mut one, hits);
            for (id, _) in http_stack::rows(0) {
                one.is(id);
            }
        }
        return ExitCode::SUCCESS;
    }

    let [row, path, n] = args.as_slice() else {
        return usage();
    };
    let hit_path = match path.as_str() {
        "hit" => true,
        "miss" => false,
        _ => return usage(),
    };
    let Ok(n) = n.parse::<u64>() else {
        return usage();
    };
    let mut one = One {
        want: Some(row),
        hit_path,
        n,
        rt: &rt,
        found: false,
    };
    let hits = one.hits();
    support::rows(&mut one, hits);
    for (id, mut router) in http_stack::rows(hits) {
        if one.is(id) {
            let uris = http_stack::uris();
            // Every URI is cloned once before the measured batch: a `Uri` made from a
            // `String` allocates its shared header on its first clone.
            black_box(rt.block_on(http_stack::batch(&mut router, &uris, 0, 100)));
            black_box(rt.block_on(http_stack::batch(&mut router, &uris, 0, n)));
        }
    }
    if one.found {
        ExitCode::SUCCESS
    } else {
        eprintln!("no row `{row}` in this build ({})", support::build());
        ExitCode::FAILURE
    }
}
