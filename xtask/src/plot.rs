//! Benchmark plots: panels side by side, one line per series over the number of Services
//! (log x axis), written as SVG.
//!
//! plotters is built without `ttf`/`ab_glyph`, so there are no font files to find: the SVG
//! backend writes each label as a `<text>` element and the viewer renders it; layout uses
//! plotters' built-in width estimate (about 0.45 em per character), which is close enough for
//! sans-serif labels.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One line in a panel: x = number of Services, y = the measured value.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, the y axis label and its lines.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const PANEL_W: u32 = 400;
const PANEL_H: u32 = 360;
const TITLE_H: u32 = 40;
const FONT: &str = "sans-serif";
const LEGEND_ROW_H: u32 = 18;
/// Legend entry: a short line with a marker, then the name.
const LEGEND_SWATCH_W: i32 = 22;
const LEGEND_GAP: i32 = 16;
/// Shown when a panel has nothing to draw (x range of the usual benchmark sizes).
const EMPTY_X: (f64, f64) = (10.0, 10_000.0);

/// Colours of the proxies the benchmarks compare, so a proxy looks the same in every plot.
const KNOWN_COLOURS: [(&str, RGBColor); 5] = [
    ("direct", RGBColor(90, 90, 90)),
    ("lb", RGBColor(31, 119, 180)),
    ("lb-socket", RGBColor(44, 160, 44)),
    ("iptables", RGBColor(255, 127, 14)),
    ("ipvs", RGBColor(214, 39, 40)),
];
/// Other names, by their index among the sorted other names of the whole plot.
const OTHER_COLOURS: [RGBColor; 6] = [
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(31, 31, 120),
];

/// Draws `panels` side by side (one row) under `title` into the SVG file `path`: a log x axis
/// "Services in the cluster", a linear y axis from 0, a line with point markers per series and
/// a legend under each panel. Non-finite points (and x <= 0) are skipped, and so are series
/// left without points; a panel with nothing to draw says "no data".
pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let mut svg = String::new();
    render(&mut svg, title, panels).with_context(|| format!("drawing {}", path.display()))?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// A series ready to draw: finite points sorted by x.
struct Line<'a> {
    name: &'a str,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

fn render(svg: &mut String, title: &str, panels: &[Panel]) -> Result<()> {
    let empty = [Panel { title: String::new(), y_label: String::new(), series: Vec::new() }];
    let panels = if panels.is_empty() { &empty[..] } else { panels };
    let colour = palette(panels);
    let lines: Vec<Vec<Line>> = panels
        .iter()
        .map(|panel| {
            panel
                .series
                .iter()
                .filter_map(|s| {
                    let mut points: Vec<(f64, f64)> =
                        s.points.iter().copied().filter(|&(x, y)| x.is_finite() && x > 0.0 && y.is_finite()).collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (!points.is_empty()).then(|| Line { name: &s.name, colour: colour(&s.name), points })
                })
                .collect()
        })
        .collect();

    let count = u32::try_from(panels.len()).context("too many panels")?;
    let root = SVGBackend::with_string(svg, (PANEL_W.saturating_mul(count), PANEL_H + TITLE_H)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, body) = root.split_vertically(TITLE_H);
    let (w, h) = top.dim_in_pixel();
    top.draw(&Text::new(
        title.to_owned(),
        (w as i32 / 2, h as i32 / 2 + 4),
        TextStyle::from((FONT, 22).into_font().style(FontStyle::Bold)).pos(Pos::new(HPos::Center, VPos::Center)),
    ))
    .map_err(plot_error)?;

    // The same legend height under every panel keeps the x axes aligned.
    let legend_style = TextStyle::from((FONT, 15).into_font());
    let mut layouts = Vec::new();
    for panel_lines in &lines {
        layouts.push(legend_layout(&body, &legend_style, panel_lines)?);
    }
    let rows = layouts.iter().map(|rows| rows.len()).max().unwrap_or(0).max(1) as u32;
    // Past half the panel the legend is cut off rather than squeezing the chart away.
    let legend_h = rows.saturating_mul(LEGEND_ROW_H).saturating_add(10).min(PANEL_H / 2);

    for (((area, panel), panel_lines), layout) in
        body.split_evenly((1, panels.len())).iter().zip(panels).zip(&lines).zip(&layouts)
    {
        let (chart_area, legend_area) = area.split_vertically(PANEL_H - legend_h);
        draw_chart(&chart_area, panel, panel_lines)?;
        draw_legend(&legend_area, &legend_style, layout)?;
    }
    root.present().map_err(plot_error)
}

/// Colour of each series name: fixed for the known proxies, else by the name's index among the
/// sorted unknown names of all panels, so a name has one colour across the plot.
fn palette(panels: &[Panel]) -> impl Fn(&str) -> RGBColor {
    let others: Vec<String> = panels
        .iter()
        .flat_map(|p| &p.series)
        .map(|s| s.name.as_str())
        .filter(|name| !KNOWN_COLOURS.iter().any(|(known, _)| known == name))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_owned)
        .collect();
    move |name| {
        KNOWN_COLOURS.iter().find(|(known, _)| *known == name).map(|&(_, c)| c).unwrap_or_else(|| {
            let i = others.iter().position(|o| o == name).unwrap_or(0);
            OTHER_COLOURS[i % OTHER_COLOURS.len()]
        })
    }
}

fn draw_chart(area: &DrawingArea<SVGBackend, Shift>, panel: &Panel, lines: &[Line]) -> Result<()> {
    let xs: Vec<f64> = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)).collect();
    let ys = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let (x_min, x_max) = if xs.is_empty() {
        EMPTY_X
    } else {
        (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(f64::NEG_INFINITY, f64::max))
    };
    // Pad the log range so the end markers sit inside the plot, and a single x value still
    // gets a range: at least a third of a decade each side.
    let pad = ((x_max / x_min).log10() * 0.08).max(0.33);
    let (x_lo, x_hi) = (x_min / 10f64.powf(pad), x_max * 10f64.powf(pad));
    // Ticks at the measured sizes (the usual sizes when there is no data).
    let mut ticks: Vec<f64> = if xs.is_empty() {
        vec![10.0, 100.0, 1000.0, 10_000.0]
    } else {
        xs.iter().map(|&x| x.to_bits()).collect::<BTreeSet<_>>().into_iter().map(f64::from_bits).collect()
    };
    ticks.sort_by(f64::total_cmp);
    let light = log_grid(x_lo, x_hi, &ticks);

    let y_max = ys().fold(0.0, f64::max);
    let y_min = ys().fold(0.0, f64::min);
    let y_hi = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let y_lo = if y_min < 0.0 { y_min * 1.15 } else { 0.0 };

    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 18))
        .margin_top(6)
        .margin_left(6)
        .margin_right(18)
        .x_label_area_size(44)
        .y_label_area_size(62)
        .build_cartesian_2d((x_lo..x_hi).log_scale().with_key_points(ticks).with_light_points(light), y_lo..y_hi)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("Services in the cluster")
        .y_desc(&panel.y_label)
        .x_label_formatter(&|x| format_number(*x))
        .y_label_formatter(&|y| format_number(*y))
        .y_labels(7)
        .y_max_light_lines(1)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.04))
        .draw()
        .map_err(plot_error)?;

    if lines.is_empty() {
        chart
            .plotting_area()
            .draw(&Text::new(
                "no data",
                ((x_lo * x_hi).sqrt(), (y_lo + y_hi) / 2.0),
                (FONT, 18).into_font().color(&BLACK.mix(0.5)).pos(Pos::new(HPos::Center, VPos::Center)),
            ))
            .map_err(plot_error)?;
    }
    for line in lines {
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), line.colour.stroke_width(2)))
            .map_err(plot_error)?;
        chart.draw_series(line.points.iter().map(|&p| Circle::new(p, 3, line.colour.filled()))).map_err(plot_error)?;
    }
    Ok(())
}

/// Light grid lines at 1..9 x 10^k inside (lo, hi), except at the ticks.
fn log_grid(lo: f64, hi: f64, ticks: &[f64]) -> Vec<f64> {
    let mut grid = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi && grid.len() < 200 {
        for m in 1..10 {
            let v = decade * f64::from(m);
            if v > lo && v < hi && !ticks.iter().any(|t| ((t - v) / v).abs() < 1e-9) {
                grid.push(v);
            }
        }
        decade *= 10.0;
    }
    grid
}

/// A legend entry placed at (x offset, row), with its name and colour.
struct Entry<'a> {
    x: i32,
    row: usize,
    name: &'a str,
    colour: RGBColor,
}

/// Lays the entries out in rows that fit the panel width, each row centred.
fn legend_layout<'a>(
    area: &DrawingArea<SVGBackend, Shift>,
    style: &TextStyle,
    lines: &[Line<'a>],
) -> Result<Vec<Vec<Entry<'a>>>> {
    let max_w = PANEL_W as i32 - 20;
    let mut rows: Vec<Vec<Entry>> = Vec::new();
    let mut widths: Vec<i32> = Vec::new();
    for line in lines {
        let text_w = area.estimate_text_size(line.name, style).map_err(plot_error)?.0 as i32;
        let w = LEGEND_SWATCH_W + 4 + text_w;
        match (rows.last_mut(), widths.last_mut()) {
            (Some(row), Some(row_w)) if *row_w + LEGEND_GAP + w <= max_w => {
                row.push(Entry { x: *row_w + LEGEND_GAP, row: 0, name: line.name, colour: line.colour });
                *row_w += LEGEND_GAP + w;
            }
            _ => {
                rows.push(vec![Entry { x: 0, row: 0, name: line.name, colour: line.colour }]);
                widths.push(w);
            }
        }
    }
    for (i, (row, w)) in rows.iter_mut().zip(widths).enumerate() {
        let shift = (PANEL_W as i32 - w) / 2;
        for entry in row {
            entry.x += shift;
            entry.row = i;
        }
    }
    Ok(rows)
}

fn draw_legend(area: &DrawingArea<SVGBackend, Shift>, style: &TextStyle, rows: &[Vec<Entry>]) -> Result<()> {
    for entry in rows.iter().flatten() {
        let y = entry.row as i32 * LEGEND_ROW_H as i32 + LEGEND_ROW_H as i32 / 2 + 2;
        let x = entry.x;
        area.draw(&PathElement::new(vec![(x, y), (x + LEGEND_SWATCH_W, y)], entry.colour.stroke_width(2)))
            .map_err(plot_error)?;
        area.draw(&Circle::new((x + LEGEND_SWATCH_W / 2, y), 3, entry.colour.filled())).map_err(plot_error)?;
        area.draw(&Text::new(
            entry.name,
            (x + LEGEND_SWATCH_W + 4, y),
            style.color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(plot_error)?;
    }
    Ok(())
}

/// Tick label: 0, 0.25, 12.5, 1000, 25k, 1.2M.
fn format_number(v: f64) -> String {
    let a = v.abs();
    let (v, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let a = v.abs();
    let decimals = if a == 0.0 || a >= 100.0 {
        0
    } else if a >= 1.0 {
        2
    } else {
        ((-a.log10()).ceil() as usize + 2).min(6)
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    if s == "-0" {
        s = "0".to_owned();
    }
    s + suffix
}

/// plotters' errors borrow nothing but are generic over the backend's error; flatten them.
fn plot_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("{e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|s| s.split_once('>'))
            .map(|(_, rest)| rest.split("</text>").next().unwrap_or("").trim().to_owned())
            .collect()
    }

    fn series(name: &str, ys: [f64; 3]) -> Series {
        Series { name: name.to_owned(), points: [10.0, 1000.0, 10_000.0].into_iter().zip(ys).collect() }
    }

    #[test]
    fn plot_three_panels() {
        let panels = [
            Panel {
                title: "Throughput".to_owned(),
                y_label: "Gbit/s".to_owned(),
                series: vec![
                    series("direct", [41.2, 40.8, 40.9]),
                    series("lb", [38.5, 38.1, 37.9]),
                    series("iptables", [36.0, 33.2, 29.5]),
                ],
            },
            Panel {
                title: "Connections/s".to_owned(),
                y_label: "connections/s".to_owned(),
                series: vec![
                    series("direct", [52_000.0, 51_500.0, 51_800.0]),
                    series("lb", [48_000.0, 47_600.0, 47_100.0]),
                    series("iptables", [45_000.0, 31_000.0, 12_500.0]),
                ],
            },
            Panel {
                title: "p99 latency".to_owned(),
                y_label: "ms".to_owned(),
                series: vec![
                    series("direct", [0.21, 0.22, 0.21]),
                    series("lb", [0.25, 0.26, 0.25]),
                    series("iptables", [0.3, 0.9, 4.2]),
                ],
            },
        ];
        let path = std::env::temp_dir().join(format!("lb-plot-test-{}.svg", std::process::id()));
        draw(&path, "Service proxies", &panels).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.contains("<svg"));
        let texts = texts(&svg);
        for want in
            ["Service proxies", "Throughput", "Connections/s", "p99 latency", "direct", "lb", "iptables", "10", "10k"]
        {
            assert!(texts.iter().any(|t| t == want), "no <text> {want:?} in {texts:?}");
        }
        assert_eq!(texts.iter().filter(|t| *t == "Services in the cluster").count(), 3);
        // Same name, same colour in every panel.
        let lb = KNOWN_COLOURS[1].1;
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", lb.0, lb.1, lb.2);
        assert!(svg.matches(&stroke).count() >= 6, "{stroke} not in every panel and legend");
    }

    #[test]
    fn plot_degenerate_inputs() {
        let path = std::env::temp_dir().join(format!("lb-plot-test-degenerate-{}.svg", std::process::id()));
        let one = |name: &str, points: Vec<(f64, f64)>| Series { name: name.to_owned(), points };
        let panels = [
            Panel {
                title: "single x".to_owned(),
                y_label: "y".to_owned(),
                series: vec![one("lb", vec![(1000.0, 5.0)])],
            },
            Panel {
                title: "two x".to_owned(),
                y_label: "y".to_owned(),
                series: vec![one("a", vec![(10.0, 1.0), (100.0, f64::NAN)]), one("b", vec![(10.0, 2.0), (100.0, 3.0)])],
            },
            Panel {
                title: "junk".to_owned(),
                y_label: "y".to_owned(),
                series: vec![
                    one("gone", vec![(f64::NAN, 1.0), (0.0, 1.0), (f64::INFINITY, 2.0), (5.0, f64::NEG_INFINITY)]),
                    one("empty", vec![]),
                ],
            },
            Panel { title: "zeros".to_owned(), y_label: "y".to_owned(), series: vec![one("z", vec![(10.0, 0.0)])] },
            Panel { title: String::new(), y_label: String::new(), series: vec![] },
        ];
        draw(&path, "degenerate", &panels).unwrap();
        let texts = texts(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(texts.iter().filter(|t| *t == "no data").count(), 2);
        assert!(texts.iter().any(|t| t == "1000"));
        assert!(!texts.iter().any(|t| t == "gone" || t == "empty"), "pointless series in a legend: {texts:?}");
        draw(&path, "", &[]).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("no data"));
        std::fs::remove_file(&path).unwrap();

        let err = draw(Path::new("/nonexistent-dir/plot.svg"), "x", &panels).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent-dir/plot.svg"), "{err:#}");
    }

    #[test]
    fn plot_number_format() {
        let got: Vec<String> = [0.0, 0.25, 0.021, 2.5, 12.5, 100.0, 1000.0, 2500.0, 10_000.0, 12_500.0, 1.2e6, -0.0001]
            .map(format_number)
            .into();
        assert_eq!(
            got,
            ["0", "0.25", "0.021", "2.5", "12.5", "100", "1000", "2500", "10k", "12.5k", "1.2M", "-0.0001"]
        );
    }
}
