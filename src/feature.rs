//! Traits that are never implemented, so that a builder method called without its
//! feature fails with a message naming the feature rather than `E0599`.

#![allow(unreachable_pub)]

/// Never implemented: bounds the stand-ins of the `budget` methods.
#[diagnostic::on_unimplemented(
    message = "this method needs the `budget` feature of tower-backstop",
    label = "called without the `budget` feature",
    note = "enable it: tower-backstop = {{ version = \"0.1\", features = [\"budget\"] }}"
)]
pub trait NeedsBudget {}

/// Never implemented: bounds the stand-in of `patience`.
#[diagnostic::on_unimplemented(
    message = "this method needs the `time` feature of tower-backstop (on by default)",
    label = "called without the `time` feature",
    note = "enable it: tower-backstop = {{ version = \"0.1\", features = [\"time\"] }}"
)]
pub trait NeedsTime {}

/// Never implemented: bounds the stand-in of `metrics`.
#[diagnostic::on_unimplemented(
    message = "this method needs the `metrics` feature of tower-backstop",
    label = "called without the `metrics` feature",
    note = "enable it: tower-backstop = {{ version = \"0.1\", features = [\"metrics\"] }}"
)]
pub trait NeedsMetrics {}

/// Never implemented: bounds the stand-ins of the `http` builder methods.
#[diagnostic::on_unimplemented(
    message = "this method needs the `http` feature of tower-backstop",
    label = "called without the `http` feature",
    note = "enable it: tower-backstop = {{ version = \"0.1\", features = [\"http\"] }}"
)]
pub trait NeedsHttp {}

/// Never implemented: bounds the stand-ins of `peek_grpc_status` and `read_primary_body`.
#[diagnostic::on_unimplemented(
    message = "this method needs the `http` and `time` features of tower-backstop",
    label = "called without the `http` and `time` features",
    note = "enable them: tower-backstop = {{ version = \"0.1\", features = [\"http\", \"time\"] }}"
)]
pub trait NeedsHttpAndTime {}
