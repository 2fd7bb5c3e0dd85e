//! The report: the table of latencies and counters per policy, and the latency plot.

use crate::load::Run;
use plotters::prelude::*;
use std::{error::Error, fmt::Write as _, path::Path, time::Duration};
use tower_backstop::outcome::Snapshot;

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// The nearest-rank `q` quantile of sorted latencies.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What one policy's run measured, at the client, in the layer, and in the database.
pub struct Row {
    pub name: String,
    pub run: Run,
    pub stats: Snapshot,
    pub queries: u64,
}

/// The table of results, in Markdown.
pub fn table(rows: &[Row], requests: usize) -> String {
    let per_req = |n: u64| n as f64 / requests as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {:<27} | {:>8} | {:>8} | {:>8} | {:>6} | {:>11} | {:>12} | {:>9} | {:>6} |",
        "policy",
        "p50",
        "p99",
        "p99.9",
        "req/s",
        "queries/req",
        "launches/req",
        "cancelled",
        "wasted"
    );
    let _ = writeln!(
        out,
        "|{:-<29}|{:->10}|{:->10}|{:->10}|{:->8}|{:->13}|{:->14}|{:->11}|{:->8}|",
        ":", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    for r in rows {
        let l = &r.run.latencies;
        let _ = writeln!(
            out,
            "| {:<27} | {:>5.1} ms | {:>5.1} ms | {:>5.1} ms | {:>6.0} | {:>11.3} | {:>12.3} | {:>9} | {:>6} |",
            r.name,
            ms(quantile(l, 0.5)),
            ms(quantile(l, 0.99)),
            ms(quantile(l, 0.999)),
            l.len() as f64 / r.run.wall.as_secs_f64(),
            per_req(r.queries),
            per_req(r.stats.fallback_launches),
            r.stats.fallbacks_cancelled,
            r.stats.fallbacks_wasted,
        );
    }
    out
}

/// The plot's y coordinate of quantile `q`: thousandths of its "nines", -log10(1 - q).
/// (An integer axis: plotters formats custom tick marks only on integer axes.)
fn nines(q: f64) -> i32 {
    (-1_000.0 * (1.0 - q).log10()).round() as i32
}

/// Writes the latency CDF of every run to `path`, an SVG file.
pub fn plot(rows: &[Row], path: &Path) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = rows
        .iter()
        .map(|r| ms(r.run.latencies[0]))
        .fold(f64::MAX, f64::min)
        .max(0.01);
    let hi = rows
        .iter()
        .map(|r| ms(*r.run.latencies.last().unwrap()))
        .fold(0.0, f64::max);
    let n = rows[0].run.latencies.len();
    let top = nines((n as f64 - 1.0) / n as f64).max(1);
    let keys: Vec<i32> = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999]
        .into_iter()
        .map(nines)
        .filter(|&y| y <= top)
        .collect();
    // Ticks at 1, 2, 5 times the powers of ten, from 0.1 ms to 500 s.
    let x_keys: Vec<f64> = (-1..=5)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|x| (lo * 0.9..=hi * 1.1).contains(x))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "tower-backstop demo: latency seen by the client",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (lo * 0.9..hi * 1.1).log_scale().with_key_points(x_keys),
            (0..top).with_key_points(keys),
        )?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("percentile of requests")
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| {
            let p = 100.0 * (1.0 - 10f64.powf(-f64::from(*y) / 1_000.0));
            format!("p{}", (p * 100.0).round() / 100.0)
        })
        .draw()?;
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
    ];
    for (r, &color) in rows.iter().zip(colors.iter().cycle()) {
        let l = &r.run.latencies;
        let points = (0..=500).map(|k| {
            let y = top * k / 500;
            let q = 1.0 - 10f64.powf(-f64::from(y) / 1_000.0);
            (ms(quantile(l, q)), y)
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(r.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    // Lower right: below every CDF curve (a low percentile at a high latency), so no
    // line crosses the legend.
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
