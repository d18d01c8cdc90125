//! Benchmark result rows and their outputs: a markdown table, a CSV file and PNG charts.
//!
//! Charts are drawn with `plotters` into an in-memory RGB buffer and encoded with the pure-Rust
//! `png` crate. Text is rendered through `ab_glyph` from DejaVu Sans, which is compiled into
//! the binary (`sim/assets/DejaVuSans.ttf`, license in `sim/assets/DejaVuSans-LICENSE.txt`),
//! so that neither building nor running needs fontconfig, FreeType or any installed font.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::{FontStyle, RGBColor, register_font};

/// One benchmark configuration's results; one CSV line and one markdown table row.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ResultRow {
    /// Cache policy name.
    pub policy: String,
    /// Router policy name.
    pub router: String,
    /// Number of engine replicas.
    pub replicas: u32,
    /// Device (GPU) KV cache capacity per replica, in tokens.
    pub device_tokens: u64,
    /// Host (CPU) KV cache capacity per replica, in tokens.
    pub host_tokens: u64,
    /// Arrival speed-up applied to the trace (2.0 = twice as fast).
    pub time_scale: f64,
    /// Requests completed.
    pub requests: u64,
    /// Fraction of prompt tokens served from any cache tier.
    pub hit_ratio: f64,
    /// Fraction of prompt tokens served from device memory.
    pub device_hit_ratio: f64,
    /// Fraction of prompt tokens served from host memory.
    pub host_hit_ratio: f64,
    /// Mean time to first token, seconds.
    pub ttft_mean_s: f64,
    /// Median time to first token, seconds.
    pub ttft_p50_s: f64,
    /// 99th percentile time to first token, seconds.
    pub ttft_p99_s: f64,
    /// Generated tokens per second over the run.
    pub throughput_tok_s: f64,
    /// Bytes copied host to device.
    pub h2d_bytes: u64,
    /// Bytes copied device to host.
    pub d2h_bytes: u64,
    /// Trace name.
    pub trace: String,
    /// Model name of the cost model.
    pub model: String,
    /// GPU name of the cost model.
    pub gpu: String,
    /// Mean end-to-end latency, seconds.
    pub e2e_mean_s: f64,
    /// Mean queueing delay before prefill starts, seconds.
    pub queue_mean_s: f64,
    /// Blocks evicted from device memory.
    pub device_evictions: u64,
    /// Blocks evicted from host memory.
    pub host_evictions: u64,
    /// Blocks admitted into the cache.
    pub admissions: u64,
    /// Blocks the admission policy refused.
    pub rejections: u64,
    /// Blocks promoted from host to device.
    pub promotions: u64,
    /// Wall-clock seconds the simulation took.
    pub sim_wall_s: f64,
    /// What routing cost in hits, per run (`--routing-stats`; not a CSV column).
    #[serde(skip)]
    pub routing: Option<crate::cluster::RoutingStats>,
}

/// The CSV header, in [`ResultRow`] field order; the first 16 columns are a fixed contract.
pub const CSV_COLUMNS: [&str; 27] = [
    "policy",
    "router",
    "replicas",
    "device_tokens",
    "host_tokens",
    "time_scale",
    "requests",
    "hit_ratio",
    "device_hit_ratio",
    "host_hit_ratio",
    "ttft_mean_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "throughput_tok_s",
    "h2d_bytes",
    "d2h_bytes",
    "trace",
    "model",
    "gpu",
    "e2e_mean_s",
    "queue_mean_s",
    "device_evictions",
    "host_evictions",
    "admissions",
    "rejections",
    "promotions",
    "sim_wall_s",
];

impl ResultRow {
    /// The row's CSV cells, in [`CSV_COLUMNS`] order, not yet quoted. Floats use Rust's
    /// shortest round-trip formatting, so the CSV loses no precision.
    fn csv_cells(&self) -> [String; 27] {
        [
            self.policy.clone(),
            self.router.clone(),
            self.replicas.to_string(),
            self.device_tokens.to_string(),
            self.host_tokens.to_string(),
            self.time_scale.to_string(),
            self.requests.to_string(),
            self.hit_ratio.to_string(),
            self.device_hit_ratio.to_string(),
            self.host_hit_ratio.to_string(),
            self.ttft_mean_s.to_string(),
            self.ttft_p50_s.to_string(),
            self.ttft_p99_s.to_string(),
            self.throughput_tok_s.to_string(),
            self.h2d_bytes.to_string(),
            self.d2h_bytes.to_string(),
            self.trace.clone(),
            self.model.clone(),
            self.gpu.clone(),
            self.e2e_mean_s.to_string(),
            self.queue_mean_s.to_string(),
            self.device_evictions.to_string(),
            self.host_evictions.to_string(),
            self.admissions.to_string(),
            self.rejections.to_string(),
            self.promotions.to_string(),
            self.sim_wall_s.to_string(),
        ]
    }
}

/// Why a report file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Creating or writing the file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The output file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The data cannot be drawn (no finite values, mismatched lengths, ...).
    #[error("cannot plot {}: {reason}", path.display())]
    BadData {
        /// The output file.
        path: PathBuf,
        /// What is wrong with the data.
        reason: String,
    },
    /// The drawing library or the PNG encoder failed.
    #[error("cannot draw {}: {message}", path.display())]
    Draw {
        /// The output file.
        path: PathBuf,
        /// The library's error message.
        message: String,
    },
}

/// Writes `rows` as CSV: a header line with [`CSV_COLUMNS`], then one line per row. Missing
/// parent directories are created.
pub fn write_csv(path: &Path, rows: &[ResultRow]) -> Result<(), ReportError> {
    let mut text = String::new();
    text.push_str(&CSV_COLUMNS.join(","));
    text.push('\n');
    for row in rows {
        let cells: Vec<String> = row.csv_cells().iter().map(|c| csv_quote(c)).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    write_file(path, text.as_bytes())
}

/// Quotes a CSV cell when it contains a separator, a quote or a line break (RFC 4180).
fn csv_quote(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let io_err = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    let mut file = std::fs::File::create(path).map_err(io_err)?;
    file.write_all(bytes).map_err(io_err)?;
    file.flush().map_err(io_err)
}

/// Renders the routing statistics of `rows` (those that have them) as a markdown table. Every
/// token figure is a share of the routed prompt tokens, so it compares with the hit ratio:
/// `best held` is what an omniscient affine router could have reused at each decision, `chosen
/// held` what the chosen replica held, and the three `missed` columns split the difference by
/// cause.
pub fn routing_table(rows: &[ResultRow]) -> String {
    const HEADER: [&str; 15] = [
        "policy",
        "router",
        "decisions",
        "reasons",
        "off best",
        "best held",
        "chosen held",
        "missed unseen",
        "missed score",
        "missed hot-spot",
        "summary short",
        "memory covered",
        "over-estimate",
        "lost / gained in queue",
        "copies per block",
    ];
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", HEADER.join(" | "));
    let _ = writeln!(out, "|:--|:--|{}", "--:|".repeat(HEADER.len() - 2));
    for r in rows {
        let Some(st) = &r.routing else { continue };
        let share = |t: u64| {
            if st.prompt_tokens == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", t as f64 / st.prompt_tokens as f64)
            }
        };
        let reasons: Vec<String> = st
            .reasons
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let cells = [
            markdown_escape(&r.policy),
            markdown_escape(&r.router),
            st.decisions.to_string(),
            reasons.join(", "),
            st.off_best.to_string(),
            share(st.best_held_tokens),
            share(st.chosen_held_tokens),
            share(st.missed_unseen_tokens),
            share(st.missed_score_tokens),
            share(st.missed_hot_spot_tokens),
            share(st.summary_short_tokens),
            share(st.memory_covered_tokens),
            share(st.chosen_overestimate_tokens),
            format!(
                "{} / {}",
                share(st.lost_in_queue_tokens),
                share(st.gained_in_queue_tokens)
            ),
            if st.distinct_blocks == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", st.replication())
            },
        ];
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// Renders `rows` as a GitHub markdown table with the columns a reader compares: ratios with
/// 3 decimals, times in seconds with about 3 significant digits, transfers in GiB.
pub fn markdown_table(rows: &[ResultRow]) -> String {
    const HEADER: [&str; 15] = [
        "policy",
        "router",
        "replicas",
        "device tokens",
        "host tokens",
        "time scale",
        "hit",
        "device hit",
        "host hit",
        "TTFT mean (s)",
        "TTFT p50 (s)",
        "TTFT p99 (s)",
        "throughput (tok/s)",
        "H2D (GiB)",
        "D2H (GiB)",
    ];
    // Numbers are right-aligned so that magnitudes line up in a rendered table.
    const ALIGN: [&str; 15] = [
        ":--", ":--", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:",
        "--:", "--:",
    ];
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", HEADER.join(" | "));
    let _ = writeln!(out, "|{}|", ALIGN.join("|"));
    for r in rows {
        let cells = [
            markdown_escape(&r.policy),
            markdown_escape(&r.router),
            r.replicas.to_string(),
            r.device_tokens.to_string(),
            r.host_tokens.to_string(),
            format_significant(r.time_scale),
            format!("{:.3}", r.hit_ratio),
            format!("{:.3}", r.device_hit_ratio),
            format!("{:.3}", r.host_hit_ratio),
            format_significant(r.ttft_mean_s),
            format_significant(r.ttft_p50_s),
            format_significant(r.ttft_p99_s),
            format!("{:.0}", r.throughput_tok_s),
            format_significant(gib(r.h2d_bytes)),
            format_significant(gib(r.d2h_bytes)),
        ];
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Keeps a name from breaking the table: a `|` would start a new cell.
fn markdown_escape(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// Formats `x` with about three significant digits and no exponent: 1234 -> "1234",
/// 12.345 -> "12.3", 0.012345 -> "0.0123". Very small magnitudes stop at 6 decimals.
pub fn format_significant(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let magnitude = x.abs().log10().floor();
    // Digits after the decimal point so that about three significant digits show.
    let decimals = (2.0 - magnitude).clamp(0.0, 6.0) as usize;
    format!("{x:.decimals$}")
}

/// The embedded font, DejaVu Sans 2.37.
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FONT: &str = "sans-serif";

/// Registers the embedded font with plotters once per process; plotters keeps fonts in a
/// global table, so later calls only return the first outcome.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT, FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "the embedded DejaVu Sans font is not a valid TrueType font".into())
        })
        .clone()
}

/// Chart size in pixels; large enough for 18 px tick labels to stay legible when the image is
/// scaled down in a report.
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 720;

/// The Tableau 10 palette: distinguishable colours that also survive most colour blindness.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Draws into an RGB buffer with `draw` and writes it to `path` as a PNG.
fn render_png(
    path: &Path,
    draw: impl FnOnce(
        &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    ) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), ReportError> {
    let draw_err = |message: String| ReportError::Draw {
        path: path.to_path_buf(),
        message,
    };
    ensure_font().map_err(draw_err)?;
    let mut pixels = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        draw(&root).map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    let mut encoded = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut encoded, WIDTH, HEIGHT);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| draw_err(e.to_string()))?;
        writer
            .write_image_data(&pixels)
            .map_err(|e| draw_err(e.to_string()))?;
        writer.finish().map_err(|e| draw_err(e.to_string()))?;
    }
    write_file(path, &encoded)
}

/// A linear `f64` axis with explicitly chosen tick positions: category centres for bar charts
/// and 1-2-5 values for log axes. plotters' own `with_key_points` wrapper would do, but it
/// loses the value formatter that the mesh needs, so this is the small equivalent.
#[derive(Clone, Debug)]
struct FixedTicks {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for FixedTicks {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = self.hi - self.lo;
        if span <= 0.0 {
            return (limit.0 + limit.1) / 2;
        }
        let fraction = (value - self.lo) / span;
        // The same rounding as plotters' numeric axes, so bars and grid lines align.
        limit.0 + (f64::from(limit.1 - limit.0) * fraction + 1e-3).floor() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Only bold (labelled) points: light grid lines between categories would be noise.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Formats an axis tick compactly: 1500 -> "1.5k", 2000000 -> "2M", 0.25 -> "0.25".
fn format_tick(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    // Trim the trailing zeros of a fixed 4-decimal rendering so that ticks such as 0.1 and
    // 2 do not show as 0.1000 and 2.0000, while 0.0025 keeps its digits.
    let mut text = format!("{scaled:.4}");
    if text.contains('.') {
        while text.ends_with('0') {
            text.pop();
        }
        if text.ends_with('.') {
            text.pop();
        }
    }
    if text == "-0" {
        text = "0".to_string();
    }
    format!("{text}{suffix}")
}

/// Draws a grouped bar chart: one group per category, one coloured bar per series in each
/// group, and a legend naming the series. Every series must have one value per category;
/// non-finite values leave their bar out.
pub fn plot_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<(), ReportError> {
    let bad = |reason: String| ReportError::BadData {
        path: path.to_path_buf(),
        reason,
    };
    if categories.is_empty() || series.is_empty() {
        return Err(bad("need at least one category and one series".into()));
    }
    if let Some((name, values)) = series.iter().find(|(_, v)| v.len() != categories.len()) {
        return Err(bad(format!(
            "series {name:?} has {} values for {} categories",
            values.len(),
            categories.len()
        )));
    }
    let finite: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    if finite.is_empty() {
        return Err(bad("no finite value to plot".into()));
    }
    let lo = finite.iter().copied().fold(0.0, f64::min);
    let hi = finite.iter().copied().fold(0.0, f64::max);
    // Head room above the tallest bar keeps the legend, drawn in the upper right corner, from
    // covering bars; it grows with the number of legend entries.
    let span = if hi - lo > 0.0 { hi - lo } else { 1.0 };
    let legend_room = 0.12 + 0.07 * series.len() as f64;
    let y_top = if hi > 0.0 || lo == 0.0 {
        hi + span * legend_room.min(1.0)
    } else {
        0.0
    };
    let y_bottom = if lo < 0.0 { lo - span * 0.05 } else { 0.0 };
    let n = categories.len();
    let key_points: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let label_size = if n > 12 { 13 } else { 18 };

    render_png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 30))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(90)
            .build_cartesian_2d(
                FixedTicks {
                    lo: -0.5,
                    hi: n as f64 - 0.5,
                    ticks: key_points,
                },
                y_bottom..y_top,
            )?;
        let category_label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                categories[i as usize].clone()
            } else {
                String::new()
            }
        };
        let value_label = |y: &f64| format_tick(*y);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(y_label)
            .x_label_formatter(&category_label)
            .y_label_formatter(&value_label)
            .label_style((FONT, label_size))
            .axis_desc_style((FONT, 22))
            .max_light_lines(2)
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(205, 205, 205))
            .draw()?;
        let group_width = 0.8;
        let bar_width = group_width / series.len() as f64;
        for (s, (name, values)) in series.iter().enumerate() {
            let c = color(s);
            let bars = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(move |(i, &v)| {
                    let x0 = i as f64 - group_width / 2.0 + s as f64 * bar_width;
                    // A one-pixel-ish gap between neighbouring bars keeps them distinct.
                    let x1 = x0 + bar_width * 0.92;
                    Rectangle::new([(x0, 0.0), (x1, v)], c.filled())
                });
            chart
                .draw_series(bars)?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 16, y + 7)], c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 18))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
        Ok(())
    })
}

/// Draws a line chart with one line plus circle markers per series and a legend. With `log_x`
/// the x axis is logarithmic (base 10) and points with `x <= 0` are left out; non-finite
/// points are always left out.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> Result<(), ReportError> {
    // Points are mapped to plot coordinates first: with a log axis, x is drawn as log10(x) on a
    // linear axis whose ticks are labelled with the original values. That keeps one code path
    // for both axis kinds and full control over where log ticks go.
    let to_plot = |x: f64| if log_x { x.log10() } else { x };
    let kept: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, points)| {
            let points = points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
                .map(|&(x, y)| (to_plot(x), y))
                .collect();
            (name.clone(), points)
        })
        .collect();
    let all: Vec<(f64, f64)> = kept.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return Err(ReportError::BadData {
            path: path.to_path_buf(),
            reason: "no finite point to plot".into(),
        });
    }
    let (x_lo, x_hi) = padded_range(all.iter().map(|p| p.0), 0.04);
    let (mut y_lo, y_hi) = padded_range(all.iter().map(|p| p.1), 0.08);
    // Non-negative quantities (ratios, latencies, throughput) are drawn from zero so that the
    // visual gap between lines is proportional to the real difference.
    if all.iter().all(|p| p.1 >= 0.0) {
        y_lo = 0.0;
    }
    let x_ticks = if log_x {
        log_ticks(x_lo, x_hi)
    } else {
        Vec::new()
    };

    render_png(path, |root| {
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(title, (FONT, 30))
            .margin(16)
            .x_label_area_size(64)
            .y_label_area_size(90);
        let x_label_fn = |x: &f64| format_tick(if log_x { 10f64.powf(*x) } else { *x });
        let y_label_fn = |y: &f64| format_tick(*y);
        // The two axis kinds have different coordinate types, so the shared drawing steps live
        // in a macro rather than a function generic over plotters' coordinate traits.
        macro_rules! draw_chart {
            ($x_range:expr) => {{
                let mut chart = builder.build_cartesian_2d($x_range, y_lo..y_hi)?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_label_formatter(&x_label_fn)
                    .y_label_formatter(&y_label_fn)
                    .label_style((FONT, 18))
                    .axis_desc_style((FONT, 22))
                    .max_light_lines(2)
                    .light_line_style(RGBColor(235, 235, 235))
                    .bold_line_style(RGBColor(205, 205, 205))
                    .draw()?;
                for (s, (name, points)) in kept.iter().enumerate() {
                    let c = color(s);
                    chart
                        .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(3)))?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                        });
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, c.filled())))?;
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .label_font((FONT, 18))
                    .background_style(WHITE.mix(0.9))
                    .border_style(RGBColor(160, 160, 160))
                    .draw()?;
            }};
        }
        if log_x {
            draw_chart!(FixedTicks {
                lo: x_lo,
                hi: x_hi,
                ticks: x_ticks,
            });
        } else {
            draw_chart!(x_lo..x_hi);
        }
        Ok(())
    })
}

/// The range of `values` widened by `pad` of its span on each side; a single value gets a unit
/// span around it so the axis is never empty.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = hi - lo;
    if span > 0.0 {
        (lo - span * pad, hi + span * pad)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

/// Tick positions (as log10 values) for a log axis spanning `lo..hi` (also log10 values): the
/// 1-2-5 sequence of every decade when that gives a readable number of ticks, else decades
/// only, thinned to at most 12.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let first = lo.floor() as i32;
    let last = hi.ceil() as i32;
    let in_range = |t: &f64| *t >= lo - 1e-9 && *t <= hi + 1e-9;
    let dense: Vec<f64> = (first..=last)
        .flat_map(|d| [1.0f64, 2.0, 5.0].map(|m| f64::from(d) + m.log10()))
        .filter(in_range)
        .collect();
    if (2..=12).contains(&dense.len()) {
        return dense;
    }
    if dense.len() < 2 {
        // Less than a decade on screen: evenly spaced round values read better than one or
        // no tick at all.
        return linear_ticks(10f64.powf(lo), 10f64.powf(hi))
            .into_iter()
            .map(f64::log10)
            .collect();
    }
    let decades: Vec<f64> = (first..=last).map(f64::from).filter(in_range).collect();
    let step = decades.len().div_ceil(12);
    decades.into_iter().step_by(step).collect()
}

/// About five round (1-2-5 step) tick values within `lo..=hi`.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 {
        return vec![lo];
    }
    let raw = span / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    fn sample_row(policy: &str) -> ResultRow {
        ResultRow {
            policy: policy.to_string(),
            router: "cache-aware".into(),
            replicas: 4,
            device_tokens: 1_000_000,
            host_tokens: 8_000_000,
            time_scale: 2.0,
            requests: 12031,
            hit_ratio: 0.61234,
            device_hit_ratio: 0.5,
            host_hit_ratio: 0.11234,
            ttft_mean_s: 0.123456,
            ttft_p50_s: 0.0987,
            ttft_p99_s: 1.23456,
            throughput_tok_s: 12345.6,
            h2d_bytes: 3 << 30,
            d2h_bytes: 1 << 29,
            trace: "conv".into(),
            sim_wall_s: 1.5,
            ..ResultRow::default()
        }
    }

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes[..8], PNG_SIGNATURE);
        assert!(bytes.len() > 10_000, "only {} bytes", bytes.len());
    }

    #[test]
    fn csv_header_pins_the_first_16_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/results.csv");
        write_csv(&path, &[sample_row("lru"), sample_row("a,\"b\"")]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(
            header[..16],
            [
                "policy",
                "router",
                "replicas",
                "device_tokens",
                "host_tokens",
                "time_scale",
                "requests",
                "hit_ratio",
                "device_hit_ratio",
                "host_hit_ratio",
                "ttft_mean_s",
                "ttft_p50_s",
                "ttft_p99_s",
                "throughput_tok_s",
                "h2d_bytes",
                "d2h_bytes"
            ]
        );
        assert_eq!(header.len(), 27);
        let first = lines.next().unwrap();
        assert!(first.starts_with(
            "lru,cache-aware,4,1000000,8000000,2,12031,0.61234,0.5,0.11234,0.123456,0.0987,\
             1.23456,12345.6,3221225472,536870912,conv,,,0,0,0,0,0,0,0,1.5"
        ));
        let second = lines.next().unwrap();
        assert!(
            second.starts_with("\"a,\"\"b\"\"\",cache-aware,"),
            "{second}"
        );
        assert!(lines.next().is_none());
    }

    #[test]
    fn csv_columns_match_the_struct_fields() {
        // The serde field names are the struct's own, so this catches a field added to
        // ResultRow but forgotten in CSV_COLUMNS or csv_cells.
        let value = serde_json::to_value(sample_row("x")).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut columns = CSV_COLUMNS.to_vec();
        fields.sort_unstable();
        columns.sort_unstable();
        assert_eq!(fields, columns);
        let row = sample_row("x");
        let cells = row.csv_cells();
        let object = value.as_object().unwrap();
        for (name, cell) in CSV_COLUMNS.iter().zip(cells.iter()) {
            let v = &object[*name];
            let expected = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // serde_json writes 2.0 as "2.0" where Display writes "2"; compare as numbers.
            match (expected.parse::<f64>(), cell.parse::<f64>()) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}"),
                _ => assert_eq!(&expected, cell, "{name}"),
            }
        }
    }

    #[test]
    fn routing_table_shows_shares_of_prompt_tokens() {
        let mut row = sample_row("hotprefix");
        row.routing = Some(crate::cluster::RoutingStats {
            decisions: 10,
            reasons: vec![("prefix", 8), ("hot-spot", 2)],
            prompt_tokens: 1000,
            best_held_tokens: 400,
            chosen_held_tokens: 300,
            off_best: 2,
            missed_score_tokens: 60,
            missed_hot_spot_tokens: 40,
            resident_blocks: 30,
            distinct_blocks: 20,
            ..Default::default()
        });
        // Rows without statistics (one replica, the offline bound) are left out.
        let table = routing_table(&[row, sample_row("optimal")]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert_eq!(lines[0].matches('|').count(), 16);
        assert_eq!(
            lines[2],
            "| hotprefix | cache-aware | 10 | prefix 8, hot-spot 2 | 2 | 0.400 | 0.300 | 0.000 | \
             0.060 | 0.040 | 0.000 | 0.000 | 0.000 | 0.000 / 0.000 | 1.500 |"
        );
    }

    #[test]
    fn markdown_table_formats_columns() {
        let table = markdown_table(&[sample_row("lru"), sample_row("pipe|name")]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| policy | router | replicas |"));
        assert_eq!(lines[1].matches('|').count(), 16);
        assert_eq!(
            lines[2],
            "| lru | cache-aware | 4 | 1000000 | 8000000 | 2.00 | 0.612 | 0.500 | 0.112 | \
             0.123 | 0.0987 | 1.23 | 12346 | 3.00 | 0.500 |"
        );
        assert!(lines[3].starts_with("| pipe\\|name |"));
    }

    #[test]
    fn significant_formatting() {
        assert_eq!(format_significant(1234.5), "1234");
        assert_eq!(format_significant(12.345), "12.3");
        assert_eq!(format_significant(0.012345), "0.0123");
        assert_eq!(format_significant(0.0), "0");
        assert_eq!(format_significant(1e-9), "0.000000");
        assert_eq!(format_tick(1500.0), "1500");
        assert_eq!(format_tick(25_000.0), "25k");
        assert_eq!(format_tick(2_000_000.0), "2M");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(-0.0), "0");
    }

    #[test]
    fn bar_chart_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.png");
        let categories: Vec<String> = ["lru", "lfu", "s3fifo", "hotprefix"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let series = vec![
            ("device hit".to_string(), vec![0.42, 0.45, 0.51, 0.58]),
            ("host hit".to_string(), vec![0.10, 0.12, f64::NAN, 0.15]),
        ];
        plot_bars(
            &path,
            "Hit ratio by policy",
            "hit ratio",
            &categories,
            &series,
        )
        .unwrap();
        assert_png(&path);
        if let Ok(dir) = std::env::var("HOTPREFIX_PLOT_DIR") {
            std::fs::copy(&path, Path::new(&dir).join("bars.png")).unwrap();
        }
    }

    #[test]
    fn line_charts_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            (
                "lru".to_string(),
                vec![(1e5, 0.8), (3e5, 0.45), (1e6, 0.3), (3e6, 0.2), (1e7, 0.18)],
            ),
            (
                "hotprefix".to_string(),
                vec![
                    (1e5, 0.5),
                    (3e5, 0.3),
                    (1e6, 0.21),
                    (3e6, 0.15),
                    (1e7, 0.14),
                ],
            ),
        ];
        for log_x in [false, true] {
            let path = dir.path().join(format!("lines_{log_x}.png"));
            plot_lines(
                &path,
                "TTFT p99 vs device cache size",
                "device cache (tokens)",
                "TTFT p99 (s)",
                &series,
                log_x,
            )
            .unwrap();
            assert_png(&path);
            if let Ok(out) = std::env::var("HOTPREFIX_PLOT_DIR") {
                std::fs::copy(&path, Path::new(&out).join(format!("lines_{log_x}.png"))).unwrap();
            }
        }
    }

    #[test]
    fn bad_plot_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let cats = vec!["a".to_string(), "b".to_string()];
        let e = plot_bars(&path, "t", "y", &cats, &[("s".into(), vec![1.0])]).unwrap_err();
        assert!(e.to_string().contains("1 values for 2 categories"), "{e}");
        let e = plot_bars(&path, "t", "y", &cats, &[]).unwrap_err();
        assert!(matches!(e, ReportError::BadData { .. }));
        let e = plot_lines(
            &path,
            "t",
            "x",
            "y",
            &[("s".into(), vec![(0.0, 1.0)])],
            true,
        )
        .unwrap_err();
        assert!(matches!(e, ReportError::BadData { .. }));
        assert!(!path.exists());
    }

    #[test]
    fn single_point_and_negative_values_still_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        plot_lines(
            &path,
            "t",
            "x",
            "y",
            &[("s".into(), vec![(3.0, -2.0)])],
            false,
        )
        .unwrap();
        assert_png(&path);
        let cats = vec!["a".to_string()];
        plot_bars(&path, "t", "y", &cats, &[("s".into(), vec![-1.0])]).unwrap();
        assert_png(&path);
    }

    #[test]
    fn log_ticks_cover_the_range() {
        assert_eq!(log_ticks(0.0, 1.0).len(), 4); // 1, 2, 5, 10
        let wide = log_ticks(0.0, 30.0);
        assert!(wide.len() <= 12 && wide.len() >= 2, "{wide:?}");
        // 2.24 .. 3.98 holds no 1-2-5 value, so round linear values are used instead.
        let narrow: Vec<f64> = log_ticks(0.35, 0.6)
            .iter()
            .map(|t| 10f64.powf(*t))
            .collect();
        assert!(narrow.len() >= 2, "{narrow:?}");
        assert!((narrow[0] - 2.5).abs() < 1e-9, "{narrow:?}");
    }
}
