//! The chart of a run: one panel per metric, a bar per path at its median, a whisker from the
//! lowest to the highest round.

use std::path::Path as FsPath;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::Results;

/// A path's colour: stromd stands out, each peer keeps its colour from chart to chart.
fn color(path: &str) -> RGBColor {
    match path {
        "stromd" => RGBColor(0xd9, 0x48, 0x1c),
        "stromd-pol" => RGBColor(0xf2, 0x9e, 0x4c),
        "stromd-generic" => RGBColor(0xc4, 0x4e, 0x8a),
        "kernel" => RGBColor(0x4c, 0x72, 0xb0),
        "kernel-nat" => RGBColor(0x55, 0xa8, 0x68),
        "testpmd" => RGBColor(0x81, 0x72, 0xb2),
        _ => RGBColor(0x93, 0x78, 0x60),
    }
}

/// Writes the chart of `r` as SVG.
pub fn svg(r: &Results, file: &FsPath) -> Result<()> {
    let metrics = r.metrics();
    if metrics.is_empty() {
        return Err(anyhow!("no samples to chart"));
    }
    let names = r.path_names();
    let cols = metrics.len().min(4);
    let rows = metrics.len().div_ceil(cols);
    let size = (330 * cols as u32, 60 + 300 * rows as u32);
    let root = SVGBackend::new(file, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(
            &format!(
                "strom-bench {} ({} rounds × {} s); bars: median, whiskers: lowest–highest round",
                r.meta.started, r.meta.rounds, r.meta.secs
            ),
            ("sans-serif", 18),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((rows, cols));
    for (panel, metric) in panels.iter().zip(&metrics) {
        let stats: Vec<_> = names.iter().map(|p| r.stat(p, *metric)).collect();
        let top = stats
            .iter()
            .flatten()
            .map(|s| s.max)
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.15;
        let n = names.len() as i32;
        let mut chart = ChartBuilder::on(panel)
            .caption(metric.label(), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            // A segmented integer axis has a segment for each value of the range, both ends
            // included: 0..n-1 gives one per path.
            .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
            .map_err(|e| anyhow!("{e}"))?;
        let label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => names
                .get(*i as usize)
                .map_or(String::new(), |s| s.to_string()),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(names.len())
            .x_label_formatter(&label)
            .x_label_style(("sans-serif", 11))
            .y_label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, s) in stats.iter().enumerate() {
            let Some(s) = s else { continue };
            let i = i as i32;
            let color = color(names[i as usize]);
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), s.median),
                ],
                color.mix(0.85).filled(),
            );
            bar.set_margin(0, 0, 10, 10);
            chart
                .draw_series(std::iter::once(bar))
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![
                        (SegmentValue::CenterOf(i), s.min),
                        (SegmentValue::CenterOf(i), s.max),
                    ],
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
