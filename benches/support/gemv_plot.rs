//! The gemv bench's chart: one panel per shape, achieved GB/s per (B, E)
//! and bit width for each fused kernel, against the measured copy bandwidth.

use std::path::{Path, PathBuf};

use super::Record;

/// Registers a TrueType font for the chart's labels, if one can be found.
fn load_font() -> bool {
    let mut candidates: Vec<PathBuf> = std::env::var_os("MESWITCH_FONT")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ]
        .map(PathBuf::from),
    );
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // plotters keeps fonts for the program's lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return true;
            }
        }
    }
    eprintln!("no TrueType font found (set MESWITCH_FONT): the chart is drawn without labels");
    false
}

/// One panel per shape: achieved GB/s of the fused kernel per (B, E) for each
/// bit width (circles: 128-column kernel, triangles: wide kernel), with the
/// measured copy bandwidth and 85% of it as lines.
pub fn plot(
    path: &Path,
    device: &str,
    copy_gbps: f64,
    records: &[Record],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let labels = load_font();
    let mut shapes: Vec<(usize, usize)> = records
        .iter()
        .map(|r| (r.out_features, r.in_features))
        .collect();
    shapes.sort_unstable();
    shapes.dedup();
    let root = BitMapBackend::new(path, (1400, 450 * shapes.len().div_ceil(2).max(1) as u32))
        .into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((shapes.len().div_ceil(2).max(1), 2));
    let colors = [RED, BLUE, GREEN];
    for (panel, &(o, i)) in panels.iter().zip(&shapes) {
        let mut configs: Vec<(usize, usize)> = records
            .iter()
            .filter(|r| (r.out_features, r.in_features) == (o, i))
            .map(|r| (r.batch, r.experts))
            .collect();
        configs.sort_unstable();
        configs.dedup();
        let y_max = records
            .iter()
            .filter(|r| (r.out_features, r.in_features) == (o, i) && r.variant.starts_with("fused"))
            .map(Record::gbps)
            .fold(copy_gbps, f64::max)
            * 1.15;
        let mut builder = ChartBuilder::on(panel);
        builder.margin(12);
        if labels {
            builder
                .caption(format!("{o}x{i} fused GEMV, {device}"), ("sans-serif", 18))
                .x_label_area_size(40)
                .y_label_area_size(55);
        }
        let mut chart =
            builder.build_cartesian_2d(-0.5f64..configs.len() as f64 - 0.5, 0f64..y_max)?;
        if labels {
            let names = configs.clone();
            chart
                .configure_mesh()
                .x_labels(configs.len())
                .x_label_formatter(&|v| {
                    let k = v.round() as usize;
                    names
                        .get(k)
                        .map_or(String::new(), |(b, e)| format!("B{b} E{e}"))
                })
                .y_desc("GB/s (minimal bytes)")
                .draw()?;
        }
        for (level, style) in [
            (copy_gbps, BLACK.stroke_width(2)),
            (0.85 * copy_gbps, BLACK.mix(0.4).stroke_width(1)),
        ] {
            let series = chart.draw_series(LineSeries::new(
                [(-0.5, level), (configs.len() as f64 - 0.5, level)],
                style,
            ))?;
            if labels {
                let name = if level == copy_gbps {
                    "copy bandwidth"
                } else {
                    "85% of copy"
                };
                series
                    .label(name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
            }
        }
        // 128-column kernel: circles; wide kernel: triangles, same colours.
        for ((bits, color), variant) in [1u32, 2, 4]
            .into_iter()
            .zip(colors)
            .flat_map(|bc| [(bc, "fused"), (bc, "fused_wide")])
        {
            let points: Vec<(f64, f64)> = records
                .iter()
                .filter(|r| {
                    (r.out_features, r.in_features, r.bits) == (o, i, bits) && r.variant == variant
                })
                .filter_map(|r| {
                    configs
                        .iter()
                        .position(|&c| c == (r.batch, r.experts))
                        .map(|k| (k as f64, r.gbps()))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            chart.draw_series(LineSeries::new(points.clone(), color))?;
            if variant == "fused" {
                let series =
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
                if labels {
                    series
                        .label(format!("INT{bits}"))
                        .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
                }
            } else {
                let series = chart.draw_series(
                    points
                        .iter()
                        .map(|&p| TriangleMarker::new(p, 6, color.filled())),
                )?;
                if labels {
                    series
                        .label(format!("INT{bits} wide"))
                        .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
                }
            }
        }
        if labels {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
