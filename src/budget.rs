//! The budget that caps speculative fallback launches, re-exported from tower so that
//! naming it needs no `tower` dependency of your own.
//!
//! Available with the `budget` feature.
//!
//! A budget is shared by every service a layer builds. Every request deposits into it,
//! at the first poll of its response future (a future dropped unpolled is a request
//! that never ran, and deposits nothing); every *speculative* launch (a fallback started before the primary was rejected)
//! withdraws from it, and a refused withdrawal makes that one request sequential. See
//! the [`launch`](crate::launch) module for how to size it.
//!
//! ```
//! use std::{convert::Infallible, sync::Arc, time::Duration};
//! use tower::service_fn;
//! use tower_backstop::{
//!     budget::{Budget, TpsBudget},
//!     FallbackLayer,
//! };
//!
//! let db = service_fn(|key: u32| async move { Ok::<_, Infallible>(key) });
//! // Speculate for at most 10% of the requests over a 10 s window, and at least once a
//! // second whatever the traffic.
//! let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.1));
//! let reads = FallbackLayer::new(db.clone()).shared_budget(budget.clone());
//! // A second layer drawing on the same budget.
//! let scans = FallbackLayer::new(db).shared_budget(budget.clone());
//! // The handle is a `Budget` too: `deposit` and `withdraw` by hand if you must.
//! budget.deposit();
//! # let _ = (reads, scans);
//! ```

pub use tower::retry::budget::{Budget, TpsBudget};
