//! The views as standalone SVG: each carries its title, axis labels and colour scale on an
//! opaque white background, so it reads the same in a page, a paper or on a dark slide.

use std::fmt::Write;

/// Heatmaps larger than this many cells a side are averaged over blocks of rows and columns
/// (mean and max both kept in the JSON): a 4096-token map becomes 128 × 128 cells of 32 × 32.
pub const CELL_BUDGET: usize = 128;

const FONT: &str = "DejaVu Sans, Verdana, Arial, sans-serif";

/// Escapes text for SVG and HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// White to dark blue through blue, perceptually even enough for weights in [0, 1]:
/// the colour of `x / vmax`.
pub fn colour(x: f32, vmax: f32) -> String {
    const STOPS: [(f32, [f32; 3]); 5] = [
        (0.0, [255.0, 255.0, 255.0]),
        (0.25, [198.0, 219.0, 239.0]),
        (0.5, [107.0, 174.0, 214.0]),
        (0.75, [33.0, 113.0, 181.0]),
        (1.0, [8.0, 48.0, 107.0]),
    ];
    let t = if vmax > 0.0 {
        (x / vmax).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let k = STOPS.iter().rposition(|&(s, _)| s <= t).unwrap_or(0).min(3);
    let ((s0, c0), (s1, c1)) = (STOPS[k], STOPS[k + 1]);
    let u = (t - s0) / (s1 - s0);
    let c: Vec<u8> = (0..3)
        .map(|i| (c0[i] + u * (c1[i] - c0[i])).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// A map averaged over blocks so that neither side has more than [`CELL_BUDGET`] cells.
pub struct Downsampled {
    /// Block means, `rows × cols`.
    pub mean: Vec<f32>,
    /// Block maxima, `rows × cols`.
    pub max: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// Labels of the row and column blocks: the token itself, or `first … last (count)`.
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
}

/// `m` (`nq × nk`) in blocks of at most [`CELL_BUDGET`] a side.
pub fn downsample(m: &[f32], nq: usize, nk: usize, q: &[String], k: &[String]) -> Downsampled {
    downsample_to(m, (nq, nk), q, k, CELL_BUDGET)
}

/// `m` (`nq × nk`) in blocks of at most `budget` a side.
pub fn downsample_to(
    m: &[f32],
    (nq, nk): (usize, usize),
    q: &[String],
    k: &[String],
    budget: usize,
) -> Downsampled {
    let budget = budget.max(1);
    // Blocks of at least one token, so that an empty side (a model that wrote no output
    // token) gives an empty map.
    let (bq, bk) = (nq.div_ceil(budget).max(1), nk.div_ceil(budget).max(1));
    let (rows, cols) = (nq.div_ceil(bq), nk.div_ceil(bk));
    let (mut mean, mut max) = (vec![0.0f32; rows * cols], vec![0.0f32; rows * cols]);
    for i in 0..nq {
        for j in 0..nk {
            let c = (i / bq) * cols + j / bk;
            let a = m[i * nk + j];
            mean[c] += a;
            max[c] = max[c].max(a);
        }
    }
    for r in 0..rows {
        for c in 0..cols {
            let size = ((r * bq + bq).min(nq) - r * bq) * ((c * bk + bk).min(nk) - c * bk);
            mean[r * cols + c] /= size as f32;
        }
    }
    let labels = |t: &[String], b: usize, n: usize| -> Vec<String> {
        (0..n.div_ceil(b))
            .map(|g| {
                let (lo, hi) = (g * b, (g * b + b).min(n));
                if hi - lo == 1 {
                    t[lo].clone()
                } else {
                    format!("{} … {} ({})", t[lo], t[hi - 1], hi - lo)
                }
            })
            .collect()
    };
    Downsampled {
        mean,
        max,
        rows,
        cols,
        row_labels: labels(q, bq, nq),
        col_labels: labels(k, bk, nk),
    }
}

/// A heatmap of `m` (`nq × nk`): rows are queries (labelled on the left), columns keys (labelled
/// along the top), a colour scale from 0 to the map's largest value on the right, and `title`.
/// Maps past [`CELL_BUDGET`] a side show their block means (said in the title).
pub fn heatmap(m: &[f32], dims: (usize, usize), q: &[String], k: &[String], title: &str) -> String {
    heatmap_within(m, dims, q, k, title, CELL_BUDGET)
}

/// [`heatmap`] with at most `budget` cells a side. Up to 48 × 48 cells each cell is a
/// rectangle with its value as a tooltip; past that the cells are drawn as one path per colour
/// (32 shades), a tenth of the size.
pub fn heatmap_within(
    m: &[f32],
    (nq, nk): (usize, usize),
    q: &[String],
    k: &[String],
    title: &str,
    budget: usize,
) -> String {
    let d = downsample_to(m, (nq, nk), q, k, budget);
    let title = if (d.rows, d.cols) == (nq, nk) {
        title.to_string()
    } else {
        format!(
            "{title} (means of blocks of {}×{} tokens)",
            nq.div_ceil(d.rows.max(1)),
            nk.div_ceil(d.cols.max(1))
        )
    };
    let vmax = d.mean.iter().copied().fold(0.0f32, f32::max);
    let cell = if d.rows.max(d.cols) > 48 { 6.0 } else { 22.0 };
    // Labels are drawn only where cells are tall enough to hold them.
    let (label_w, label_h) = if cell >= 10.0 {
        (
            label_width(&d.row_labels, cell),
            label_width(&d.col_labels, cell),
        )
    } else {
        (10.0, 0.0)
    };
    let (x0, y0) = (label_w + 10.0, 40.0 + label_h);
    let (w, h) = (
        x0 + d.cols as f64 * cell + 90.0,
        y0 + d.rows as f64 * cell + 20.0,
    );
    let mut s = open(w, h, &title);
    let font = (cell * 0.55).clamp(7.0, 12.0);
    for (r, label) in d.row_labels.iter().enumerate().filter(|_| cell >= 10.0) {
        let y = y0 + (r as f64 + 0.5) * cell;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{y:.1}" font-size="{font}" text-anchor="end" dominant-baseline="middle">{}</text>"#,
            x0 - 4.0,
            escape(label)
        );
    }
    for (c, label) in d.col_labels.iter().enumerate().filter(|_| cell >= 10.0) {
        let x = x0 + (c as f64 + 0.5) * cell;
        let _ = write!(
            s,
            r#"<text transform="translate({x:.1},{:.1}) rotate(-60)" font-size="{font}" dominant-baseline="middle">{}</text>"#,
            y0 - 4.0,
            escape(label)
        );
    }
    if d.rows * d.cols <= 48 * 48 {
        for r in 0..d.rows {
            for c in 0..d.cols {
                let v = d.mean[r * d.cols + c];
                let _ = write!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{cell}" height="{cell}" fill="{}"><title>{} → {}: {v:.4}</title></rect>"#,
                    x0 + c as f64 * cell,
                    y0 + r as f64 * cell,
                    colour(v, vmax),
                    escape(&d.row_labels[r]),
                    escape(&d.col_labels[c]),
                );
            }
        }
    } else {
        // One path per shade: "M x y h w v w h -w z" for each cell of that shade.
        const SHADES: usize = 32;
        let mut paths = vec![String::new(); SHADES];
        for r in 0..d.rows {
            for c in 0..d.cols {
                let v = d.mean[r * d.cols + c];
                let t = if vmax > 0.0 { v / vmax } else { 0.0 };
                let shade = ((t * SHADES as f32) as usize).min(SHADES - 1);
                if shade > 0 {
                    let _ = write!(
                        paths[shade],
                        "M{:.0} {:.0}h{cell}v{cell}h-{cell}z",
                        x0 + c as f64 * cell,
                        y0 + r as f64 * cell
                    );
                }
            }
        }
        for (shade, p) in paths.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            let v = vmax * (shade as f32 + 0.5) / SHADES as f32;
            let _ = write!(s, r#"<path d="{p}" fill="{}"/>"#, colour(v, vmax));
        }
    }
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{:.1}" height="{:.1}" fill="none" stroke="#444" stroke-width="0.5"/>"##,
        d.cols as f64 * cell,
        d.rows as f64 * cell
    );
    s += &scale(
        x0 + d.cols as f64 * cell + 20.0,
        y0,
        (d.rows as f64 * cell).max(80.0),
        vmax,
    );
    let _ = write!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555">queries ↓  keys →</text>"##,
        x0,
        y0 + d.rows as f64 * cell + 14.0
    );
    s + "</svg>"
}

/// The head view (bertviz's): the tokens twice, queries on the left and keys on the right, a
/// line from each query to each key it attends to, as opaque as the weight.
pub fn head_view(
    m: &[f32],
    (nq, nk): (usize, usize),
    q: &[String],
    k: &[String],
    title: &str,
) -> String {
    let row = 18.0;
    let lw = label_width(q, row).max(40.0) + 10.0;
    let rw = label_width(k, row).max(40.0) + 10.0;
    let (xl, xr) = (lw + 10.0, lw + 10.0 + 160.0);
    let h = 50.0 + nq.max(nk) as f64 * row + 10.0;
    let mut s = open(xr + rw + 20.0, h, title);
    let y = |i: usize| 50.0 + (i as f64 + 0.5) * row;
    for i in 0..nq {
        for j in 0..nk {
            let a = m[i * nk + j];
            if a >= 0.01 {
                let _ = write!(
                    s,
                    r##"<line x1="{xl:.1}" y1="{:.1}" x2="{xr:.1}" y2="{:.1}" stroke="#2171b5" stroke-width="{:.2}" stroke-opacity="{:.3}"/>"##,
                    y(i),
                    y(j),
                    0.5 + 2.5 * a,
                    a.min(1.0)
                );
            }
        }
    }
    for (i, t) in q.iter().enumerate() {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end" dominant-baseline="middle">{}</text>"#,
            xl - 6.0,
            y(i),
            escape(t)
        );
    }
    for (j, t) in k.iter().enumerate() {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" dominant-baseline="middle">{}</text>"#,
            xr + 6.0,
            y(j),
            escape(t)
        );
    }
    s + "</svg>"
}

/// A bar per token: how much of the explained output each input token carries (a rollout or
/// flow row).
pub fn bars(values: &[f32], tokens: &[String], title: &str) -> String {
    let (bw, plot_h) = (26.0, 120.0);
    let lh = label_width(tokens, bw);
    let vmax = values.iter().copied().fold(0.0f32, f32::max).max(1e-12);
    let (x0, y0) = (50.0, 40.0);
    let w = x0 + values.len() as f64 * bw + 20.0;
    let mut s = open(w.max(320.0), y0 + plot_h + lh + 20.0, title);
    for (j, &v) in values.iter().enumerate() {
        let bh = plot_h * (v / vmax) as f64;
        let x = x0 + j as f64 * bw;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}" stroke="#444" stroke-width="0.4"><title>{}: {v:.4}</title></rect>"##,
            x + 2.0,
            y0 + plot_h - bh,
            bw - 4.0,
            colour(v, vmax),
            escape(&tokens[j])
        );
        let _ = write!(
            s,
            r#"<text transform="translate({:.1},{:.1}) rotate(60)" font-size="11" dominant-baseline="middle">{}</text>"#,
            x + bw / 2.0,
            y0 + plot_h + 6.0,
            escape(&tokens[j])
        );
    }
    let _ = write!(
        s,
        r##"<line x1="{x0}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#444"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">0</text>"##,
        y0 + plot_h,
        w - 20.0,
        y0 + plot_h,
        x0 - 4.0,
        y0 + 4.0,
        number(vmax),
        x0 - 4.0,
        y0 + plot_h
    );
    s + "</svg>"
}

/// A small map for the model view: no labels, one cell a pixel or more.
pub fn thumbnail(m: &[f32], (nq, nk): (usize, usize), size: f64) -> String {
    let blank = |n: usize| vec![String::new(); n];
    // A cell per two pixels at most.
    let d = downsample_to(m, (nq, nk), &blank(nq), &blank(nk), (size / 2.0) as usize);
    let vmax = d.mean.iter().copied().fold(0.0f32, f32::max);
    let (cw, ch) = (size / d.cols as f64, size / d.rows as f64);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" shape-rendering="crispEdges"><rect width="{size}" height="{size}" fill="white"/>"#
    );
    for r in 0..d.rows {
        for c in 0..d.cols {
            let v = d.mean[r * d.cols + c];
            if v > vmax * 0.02 {
                let _ = write!(
                    s,
                    r#"<rect x="{:.2}" y="{:.2}" width="{cw:.2}" height="{ch:.2}" fill="{}"/>"#,
                    c as f64 * cw,
                    r as f64 * ch,
                    colour(v, vmax)
                );
            }
        }
    }
    s + "</svg>"
}

/// The opening of a standalone SVG with a white background and a title.
fn open(w: f64, h: f64, title: &str) -> String {
    // Room for the title at 14 px bold (about 8.5 px a character).
    let w = w.max(16.0 + 8.5 * title.chars().count() as f64);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="{FONT}" fill="#111"><rect width="100%" height="100%" fill="white"/><text x="8" y="20" font-size="14" font-weight="bold">{}</text>"##,
        escape(title)
    )
}

/// A vertical colour bar from 0 (bottom) to `vmax` (top), with three ticks.
fn scale(x: f64, y: f64, h: f64, vmax: f32) -> String {
    let mut s = String::new();
    let steps = 32;
    for i in 0..steps {
        let v = vmax * (steps - i) as f32 / steps as f32;
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="{:.2}" fill="{}"/>"#,
            y + h * i as f64 / steps as f64,
            h / steps as f64 + 0.3,
            colour(v, vmax)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{x:.1}" y="{y:.1}" width="14" height="{h:.1}" fill="none" stroke="#444" stroke-width="0.5"/>"##
    );
    for (f, v) in [(0.0, vmax), (0.5, vmax / 2.0), (1.0, 0.0)] {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" dominant-baseline="middle">{}</text>"#,
            x + 18.0,
            y + h * f,
            number(v)
        );
    }
    s
}

/// A weight for a tick: three decimals, or three significant digits below 0.01.
fn number(v: f32) -> String {
    if v == 0.0 || v >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// Room for the longest label at a font that fits cells of `cell` pixels.
fn label_width(labels: &[String], cell: f64) -> f64 {
    let font = (cell * 0.55).clamp(7.0, 12.0);
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
    (longest as f64 * font * 0.62).clamp(20.0, 240.0)
}
