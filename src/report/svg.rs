//! Charts as inline SVG, drawn by hand so the page needs no script, font or network.
//!
//! [`plot`] draws numeric series (lines, dots or grouped bars) on shared axes; [`bars`] draws
//! one value per category as horizontal bars. Both use the same frame, ticks, palette and legend.
//! Every chart is an `<svg class="chart">` whose `data-points` counts what it drew (the browser
//! test checks it is never empty).

use std::fmt::Write;

const WIDTH: f64 = 540.0;
const HEIGHT: f64 = 280.0;
/// The plot area: left, top, right, bottom (the legend sits right of it).
const AREA: (f64, f64, f64, f64) = (60.0, 30.0, 390.0, 230.0);
/// Tableau 10: distinguishable, and readable by most colour-blind readers.
pub const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// A named set of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Lines,
    Dots,
    /// Bars centred on each x, side by side per series (histograms).
    Bars,
}

/// A chart of numeric series.
pub struct Plot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub mark: Mark,
    pub series: &'a [Series],
}

/// Text safe inside HTML or SVG.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A short label for a number: SI suffixes from a thousand up, few digits below.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if a < 0.01 {
        return format!("{v:.1e}");
    }
    for (scale, suffix) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if a >= scale {
            return format!("{}{suffix}", trim(format!("{:.1}", v / scale)));
        }
    }
    trim(format!("{v:.3}"))
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Tick labels with the digits their step needs (11.99k, 12.00k, 12.01k; not 12k three times).
fn tick_labels(ticks: &[f64]) -> Vec<String> {
    let top = ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
    if top < 0.01 {
        return ticks.iter().map(|t| short(*t)).collect();
    }
    let step = ticks.windows(2).map(|w| w[1] - w[0]).next().unwrap_or(1.0);
    let (scale, suffix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(s, _)| top >= *s)
        .unwrap_or((1.0, ""));
    let decimals = ((-(step / scale).log10()).ceil().max(0.0) as usize).min(6);
    ticks
        .iter()
        .map(|t| match t / scale {
            0.0 => "0".to_string(),
            v => format!("{v:.decimals$}{suffix}"),
        })
        .collect()
}

/// Round tick values covering `lo..=hi` (steps of 1, 2 or 5 × 10^k, about five of them).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A linear map from a data range onto a pixel range.
#[derive(Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Scale {
    fn at(&self, v: f64) -> f64 {
        self.from + (v - self.lo) / (self.hi - self.lo) * (self.to - self.from)
    }
}

/// The `<svg>` element with a title, opened; [`close`] ends it.
fn open(out: &mut String, kind: &str, title: &str, points: usize) {
    let _ = write!(
        out,
        r#"<svg class="chart" data-chart="{kind}" data-points="{points}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg"><title>{t}</title><text x="{x}" y="18" class="t">{t}</text>"#,
        t = escape(title),
        x = AREA.0,
    );
}

fn close(out: &mut String) {
    out.push_str("</svg>");
}

/// A legend right of the plot area, one line per name (at most 12, then "…").
fn legend(out: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate().take(12) {
        let y = AREA.1 + 8.0 + 16.0 * i as f64;
        let label = if i == 11 && names.len() > 12 {
            "…".to_string()
        } else {
            escape(&clip_middle(name, 20))
        };
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{y0}" width="10" height="10" fill="{c}"/><text x="{tx}" y="{ty}">{label}</text>"#,
            x = AREA.2 + 12.0,
            y0 = y - 9.0,
            c = PALETTE[i % PALETTE.len()],
            tx = AREA.2 + 26.0,
            ty = y,
        );
    }
}

/// At most `n` characters, with "…" when cut.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n.saturating_sub(1)).collect();
        c.push('…');
        c
    }
}

/// At most `n` characters, the middle cut out for "…" when too long, so that the run's
/// directory and its stage (`runs/a/train-1 · pretrain` → `runs/a/t… pretrain`) both show.
fn clip_middle(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= n {
        return s.to_string();
    }
    let tail = (n - 1) / 2;
    let head = n - 1 - tail;
    let mut c: String = chars[..head].iter().collect();
    c.push('…');
    c.extend(&chars[chars.len() - tail..]);
    c
}

/// Grid lines and tick labels of the y axis (left) and, when `x` is given, the x axis.
fn axes(out: &mut String, x: Option<(Scale, &[f64])>, y: (Scale, &[f64]), labels: (&str, &str)) {
    let (ys, yt) = y;
    for (&t, label) in yt.iter().zip(tick_labels(yt)) {
        let py = ys.at(t);
        let _ = write!(
            out,
            r#"<line class="g" x1="{}" x2="{}" y1="{py:.1}" y2="{py:.1}"/><text class="yl" x="{}" y="{:.1}">{}</text>"#,
            AREA.0,
            AREA.2,
            AREA.0 - 4.0,
            py + 4.0,
            label
        );
    }
    if let Some((xs, xt)) = x {
        for (&t, label) in xt.iter().zip(tick_labels(xt)) {
            let px = xs.at(t);
            let _ = write!(
                out,
                r#"<line class="g" x1="{px:.1}" x2="{px:.1}" y1="{}" y2="{}"/><text class="xl" x="{px:.1}" y="{}">{}</text>"#,
                AREA.1,
                AREA.3,
                AREA.3 + 14.0,
                label
            );
        }
    }
    let _ = write!(
        out,
        r#"<rect class="frame" x="{}" y="{}" width="{}" height="{}"/><text class="xl" x="{}" y="{}">{}</text><text class="yl" transform="translate(14 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        AREA.0,
        AREA.1,
        AREA.2 - AREA.0,
        AREA.3 - AREA.1,
        (AREA.0 + AREA.2) / 2.0,
        AREA.3 + 34.0,
        escape(labels.0),
        (AREA.1 + AREA.3) / 2.0,
        escape(labels.1)
    );
}

/// The range of `values` widened to its ticks (and to include `floor` when given).
fn range(values: impl Iterator<Item = f64>, floor: Option<f64>) -> (f64, f64, Vec<f64>) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if let Some(f) = floor {
        lo = lo.min(f);
        hi = hi.max(f);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let t = ticks(lo, hi);
    let (a, b) = (t[0], t[t.len() - 1]);
    (a, b, t)
}

/// A chart of numeric series; bars start at zero.
pub fn plot(p: &Plot) -> String {
    let points = || p.series.iter().flat_map(|s| s.points.iter());
    let count = points()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .count();
    let (x0, x1, xt) = range(points().map(|p| p.0), None);
    // Bars need half a bar of room on each side of the outer x values.
    let gap = min_gap(p.series).unwrap_or(1.0);
    let (x0, x1) = if p.mark == Mark::Bars {
        (
            x0.min(xt[0] - gap / 2.0),
            x1.max(xt[xt.len() - 1] + gap / 2.0),
        )
    } else {
        (x0, x1)
    };
    let floor = (p.mark == Mark::Bars).then_some(0.0);
    let (y0, y1, yt) = range(points().map(|p| p.1), floor);
    let xs = Scale {
        lo: x0,
        hi: x1,
        from: AREA.0,
        to: AREA.2,
    };
    let ys = Scale {
        lo: y0,
        hi: y1,
        from: AREA.3,
        to: AREA.1,
    };
    let mut out = String::new();
    open(&mut out, "plot", p.title, count);
    let xt: Vec<f64> = xt.into_iter().filter(|t| *t >= x0 && *t <= x1).collect();
    axes(&mut out, Some((xs, &xt)), (ys, &yt), (p.x_label, p.y_label));
    let n = p.series.len().max(1) as f64;
    for (i, s) in p.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let finite = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite());
        match p.mark {
            Mark::Lines => {
                let d: Vec<String> = finite
                    .map(|&(x, y)| format!("{:.1},{:.1}", xs.at(x), ys.at(y)))
                    .collect();
                if !d.is_empty() {
                    let _ = write!(
                        out,
                        r#"<path class="line" fill="none" stroke="{colour}" d="M{}"/>"#,
                        d.join("L")
                    );
                }
                if d.len() == 1 {
                    // A single point draws no line; show it.
                    let (x, y) = s.points[0];
                    dot(&mut out, xs.at(x), ys.at(y), colour);
                }
            }
            Mark::Dots => finite.for_each(|&(x, y)| dot(&mut out, xs.at(x), ys.at(y), colour)),
            Mark::Bars => {
                let width = (xs.at(x0 + gap) - xs.at(x0)) * 0.9 / n;
                for &(x, y) in finite {
                    let left = xs.at(x) - width * n / 2.0 + width * i as f64;
                    let (top, bottom) = (ys.at(y.max(0.0)), ys.at(0.0));
                    let _ = write!(
                        out,
                        r#"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect>"#,
                        width.max(0.5),
                        (bottom - top).max(0.0),
                        short(x),
                        short(y)
                    );
                }
            }
        }
    }
    let names: Vec<&str> = p.series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, &names);
    close(&mut out);
    out
}

fn dot(out: &mut String, x: f64, y: f64, colour: &str) {
    let _ = write!(
        out,
        r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{colour}" fill-opacity="0.75"/>"#
    );
}

/// The least distance between neighbouring x values of any series (the width a bar may take).
fn min_gap(series: &[Series]) -> Option<f64> {
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| x.is_finite())
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    xs.windows(2)
        .map(|w| w[1] - w[0])
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.min(g))))
}

/// One horizontal bar per (label, value), in the order given (at most 20).
pub fn bars(title: &str, value_label: &str, rows: &[(String, f64)]) -> String {
    let rows = &rows[..rows.len().min(20)];
    let height = AREA.1 + 18.0 * rows.len() as f64 + 40.0;
    let label_width = 170.0;
    let (_, hi, xt) = range(rows.iter().map(|r| r.1), Some(0.0));
    let xs = Scale {
        lo: 0.0,
        hi,
        from: label_width,
        to: WIDTH - 20.0,
    };
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" data-chart="bars" data-points="{n}" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" xmlns="http://www.w3.org/2000/svg"><title>{t}</title><text x="{x}" y="18" class="t">{t}</text>"#,
        n = rows.len(),
        t = escape(title),
        x = AREA.0,
    );
    let bottom = height - 30.0;
    for (&t, label) in xt.iter().zip(tick_labels(&xt)) {
        let px = xs.at(t);
        let _ = write!(
            out,
            r#"<line class="g" x1="{px:.1}" x2="{px:.1}" y1="{}" y2="{bottom}"/><text class="xl" x="{px:.1}" y="{}">{}</text>"#,
            AREA.1,
            bottom + 14.0,
            label
        );
    }
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = AREA.1 + 4.0 + 18.0 * i as f64;
        let _ = write!(
            out,
            r#"<text class="yl" x="{}" y="{}">{}</text><rect x="{label_width}" y="{y}" width="{:.1}" height="13" fill="{}"><title>{}: {}</title></rect>"#,
            label_width - 6.0,
            y + 11.0,
            escape(&clip(label, 28)),
            (xs.at(*v) - label_width).max(0.5),
            PALETTE[0],
            escape(label),
            short(*v)
        );
    }
    let _ = write!(
        out,
        r#"<text class="xl" x="{}" y="{}">{}</text>"#,
        (label_width + WIDTH) / 2.0,
        height - 4.0,
        escape(value_label)
    );
    close(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.13, 0.87);
        assert!(t[0] <= 0.13 && *t.last().unwrap() >= 0.87, "{t:?}");
        // One value: a unit around it, 2.4 to 3.6 in steps of 0.2.
        let one = ticks(3.0, 3.0);
        assert_eq!(one.len(), 7);
        assert!(one[0] < 3.0 && one[6] > 3.0, "{one:?}");
    }

    #[test]
    fn tick_labels_tell_ticks_apart() {
        assert_eq!(
            tick_labels(&[11_990.0, 12_000.0, 12_010.0]),
            ["11.99k", "12.00k", "12.01k"]
        );
        assert_eq!(tick_labels(&[0.0, 0.5, 1.0]), ["0", "0.5", "1.0"]);
        assert_eq!(
            tick_labels(&[0.0, 50_000.0, 100_000.0]),
            ["0", "50k", "100k"]
        );
        assert_eq!(tick_labels(&[2e-4, 4e-4]), ["2.0e-4", "4.0e-4"]);
    }

    #[test]
    fn legends_keep_both_ends() {
        assert_eq!(clip_middle("short", 20), "short");
        assert_eq!(
            clip_middle("recipe-run/train-c6a1058e · pretrain", 20),
            "recipe-run… pretrain"
        );
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(1500.0), "1.5k");
        assert_eq!(short(2_000_000.0), "2M");
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(0.0003), "3.0e-4");
        assert_eq!(short(12.0), "12");
    }

    /// Each mark draws one element per point (a line one path), and counts the points.
    #[test]
    fn plots_draw_their_points() {
        let s = vec![Series {
            name: "a<b".into(),
            points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)],
        }];
        let plot_of = |mark| {
            plot(&Plot {
                title: "t",
                x_label: "x",
                y_label: "y",
                mark,
                series: &s,
            })
        };
        let lines = plot_of(Mark::Lines);
        assert!(lines.contains(r#"data-points="3""#) && lines.contains("<path"));
        assert!(lines.contains("a&lt;b"), "the legend is escaped");
        assert_eq!(plot_of(Mark::Dots).matches("<circle").count(), 3);
        assert_eq!(plot_of(Mark::Bars).matches("<rect x").count(), 3 + 1); // + the legend swatch
        let b = bars("t", "v", &[("x".into(), 2.0), ("y".into(), 1.0)]);
        assert!(b.contains(r#"data-points="2""#));
    }
}
