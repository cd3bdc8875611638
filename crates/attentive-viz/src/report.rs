//! Everything about one input in one place: the numbers (JSON), the pictures (SVG) and the
//! page that shows them (one self-contained HTML file, no external URL of any kind).

use crate::error::{Result, VizError};
use crate::maps::Maps;
use crate::relevance::{relevance, Weighted};
use crate::rollout::{flow, readings_through_heads, rollout, Fusion, Reading};
use crate::stats::{head_stats, HeadStats};
use crate::svg::{bars, escape, head_view, heatmap, heatmap_within, thumbnail};
use serde_json::{json, Value};
use std::fmt::Write;

/// Above this many weights (`L·H·Nq·Nk`) the JSON leaves the maps out (and says so): 4 M
/// weights are about 40 MB of JSON text.
pub const JSON_WEIGHT_LIMIT: usize = 4 << 20;

/// Cells a side of each head's heatmap inside the page (the SVG files keep
/// [`crate::svg::CELL_BUDGET`]): a page of 144 heads stays within tens of megabytes.
pub const PAGE_CELLS: usize = 64;

/// The head view draws a line per pair: past this many tokens it is left out (said on the page).
pub const HEAD_VIEW_MAX_TOKENS: usize = 96;

/// What to compute and show for one input.
#[derive(Clone, Debug)]
pub struct Report<'a> {
    pub maps: &'a Maps,
    /// The page's heading: the text, say.
    pub title: String,
    /// A line under it: which model, which input.
    pub subtitle: String,
    /// How heads are fused for rollout and flow.
    pub fusion: Fusion,
    /// The row that explains the output, for self-attention maps (none: no rollout reading).
    pub reading: Option<Reading>,
    /// Output rows to compute attention flow for (opt-in: each row is many max-flows).
    pub flow_rows: Vec<usize>,
    /// Query rows the statistics count (the non-padding ones); all when `None`.
    pub rows: Option<Vec<bool>>,
    /// Gradient-weighted relevance to show, for self-attention maps.
    pub relevance: Option<Relevance>,
}

/// What gradient-weighted relevance explains, and the model's $\nabla A \odot A$ for it.
#[derive(Clone, Debug)]
pub struct Relevance {
    /// The same shape as the report's maps.
    pub weighted: Weighted,
    /// The explained output `y`, in words ("embedding dimension 5").
    pub target: String,
    /// `y`'s value.
    pub value: f32,
    /// Another input's relevance reading to show beside (the second sentence of a similarity):
    /// its title, tokens and values.
    pub partner: Option<(String, Vec<String>, Vec<f32>)>,
}

/// A report's files, named as they would be in its folder.
pub struct Outputs {
    /// `index.html`.
    pub html: String,
    /// `attention.json`.
    pub json: Value,
    /// `(file name, SVG)` of every view.
    pub svgs: Vec<(String, String)>,
}

impl Report<'_> {
    /// A report of `maps` with the paper's defaults: mean fusion, no reading row, no flow.
    pub fn new<'a>(maps: &'a Maps, title: &str) -> Report<'a> {
        Report {
            maps,
            title: title.to_string(),
            subtitle: String::new(),
            fusion: Fusion::Mean,
            reading: None,
            flow_rows: Vec::new(),
            rows: None,
            relevance: None,
        }
    }

    /// Computes every method and draws every view.
    ///
    /// # Errors
    /// From the methods: a reading row or flow rows outside the tokens, a flow request over
    /// its limit.
    pub fn build(&self) -> Result<Outputs> {
        let m = self.maps;
        let [layers, heads, nq, nk] = m.shape();
        let (q, k) = (m.q_tokens(), m.k_tokens());
        let stats = head_stats(m, self.rows.as_deref());
        let mut svgs = Vec::new();
        let mut json = json!({
            "title": self.title,
            "shape": [layers, heads, nq, nk],
            "q_tokens": q,
            "k_tokens": k,
            "head_stats": stats.iter().map(stat_json).collect::<Vec<_>>(),
            "row_sum_warnings": m.row_sum_warnings().iter().map(|w| json!({
                "layer": w.layer, "head": w.head, "row": w.row, "sum": w.sum,
            })).collect::<Vec<_>>(),
        });
        if m.is_self_attention() {
            json["tokens"] = json!(q);
        }
        let weights = m.data().len();
        if weights <= JSON_WEIGHT_LIMIT {
            let a: Vec<Vec<Vec<Vec<f32>>>> = (0..layers)
                .map(|l| {
                    (0..heads)
                        .map(|h| m.map(l, h).chunks(nk).map(<[f32]>::to_vec).collect())
                        .collect()
                })
                .collect();
            json["attentions"] = json!(a);
        } else {
            json["attentions_omitted"] = json!(format!(
                "{weights} weights, over the limit of {JSON_WEIGHT_LIMIT} for JSON"
            ));
        }
        let mut page = Page::new(&self.title, &self.subtitle);
        page.warnings(m);
        page.model_view(m);
        // Per head, the rollout through it read at the reading row.
        let per_head = match (&self.reading, m.is_self_attention()) {
            (Some(r), true) => Some(readings_through_heads(m, self.fusion, r)?),
            _ => None,
        };
        if let (Some(p), Some(r)) = (&per_head, &self.reading) {
            json["rollout_through_heads"] = json!({ "row": r.describe(q), "values": p });
        }
        for l in 0..layers {
            for h in 0..heads {
                let t = format!("Layer {l}, head {h}");
                let hm = heatmap(m.map(l, h), (nq, nk), q, k, &t);
                let in_page = if nq.max(nk) <= PAGE_CELLS {
                    hm.clone()
                } else {
                    heatmap_within(m.map(l, h), (nq, nk), q, k, &t, PAGE_CELLS)
                };
                let hv = (nq.max(nk) <= HEAD_VIEW_MAX_TOKENS)
                    .then(|| head_view(m.map(l, h), (nq, nk), q, k, &t));
                let through = per_head.as_ref().map(|p| {
                    let title = format!("Rollout through layer {l}, head {h}");
                    bars(&p[l][h], q, &title)
                });
                page.head(l, h, &in_page, hv.as_deref(), through.as_deref());
                svgs.push((format!("heatmap-L{l}-H{h}.svg"), hm));
                if let Some(hv) = hv {
                    svgs.push((format!("headview-L{l}-H{h}.svg"), hv));
                }
                if let Some(b) = through {
                    svgs.push((format!("rollout-L{l}-H{h}.svg"), b));
                }
            }
            let mean = m.head_mean(l);
            svgs.push((
                format!("layer-mean-L{l}.svg"),
                heatmap(
                    &mean,
                    (nq, nk),
                    q,
                    k,
                    &format!("Layer {l}, mean of its {heads} heads"),
                ),
            ));
        }
        page.head_controls(layers, heads);
        if m.is_self_attention() {
            let j = rollout(m, self.fusion)?;
            let last = j.last().expect("at least one layer");
            let title = format!(
                "Attention rollout through {layers} layers ({} of heads)",
                self.fusion.name()
            );
            let map_svg = heatmap(last, (nq, nq), q, q, &title);
            json["rollout"] = json!(last.chunks(nq).map(<[f32]>::to_vec).collect::<Vec<_>>());
            json["rollout_fusion"] = json!(self.fusion.name());
            let mut read_svg = None;
            if let Some(r) = &self.reading {
                let row = r.read(last, nq)?;
                let what = r.describe(q);
                let svg = bars(&row, q, &format!("Rollout: {what}"));
                json["rollout_reading"] = json!({ "row": what, "values": row });
                svgs.push(("rollout-reading.svg".into(), svg.clone()));
                read_svg = Some((what, svg));
            }
            let mut flows = Vec::new();
            if !self.flow_rows.is_empty() {
                let f = flow(m, self.fusion, &self.flow_rows)?;
                for (&i, values) in self.flow_rows.iter().zip(&f) {
                    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
                    let svg = bars(
                        &v,
                        q,
                        &format!("Attention flow from {} (position {i})", q[i]),
                    );
                    svgs.push((format!("flow-row{i}.svg"), svg.clone()));
                    flows.push(svg);
                }
                json["flow"] = json!(self
                    .flow_rows
                    .iter()
                    .zip(&f)
                    .map(|(&i, v)| json!({"row": i, "values": v}))
                    .collect::<Vec<_>>());
            }
            page.rollout(&map_svg, read_svg.as_ref(), &flows);
            svgs.push(("rollout.svg".into(), map_svg));
        }
        if let Some(rel) = &self.relevance {
            let views = self.relevance_views(rel, &mut json)?;
            page.relevance(rel, &views);
            svgs.extend(views);
        }
        page.stats(&stats);
        Ok(Outputs {
            html: page.finish(),
            json,
            svgs,
        })
    }
}

impl Report<'_> {
    /// Relevance's numbers into `json`, and its views: the map of $R - I$, its reading row,
    /// and the partner's row.
    fn relevance_views(&self, rel: &Relevance, json: &mut Value) -> Result<Vec<(String, String)>> {
        let m = self.maps;
        if rel.weighted.shape() != m.shape() {
            return Err(VizError::Shape {
                shape: rel.weighted.shape(),
                reason: format!(
                    "gradient-weighted maps must have the maps' shape {:?}",
                    m.shape()
                ),
            });
        }
        let n = m.shape()[2];
        let q = m.q_tokens();
        let r = relevance(&rel.weighted)?.pop().expect("at least one layer");
        // R − I: what attention added to the identity the residual connections carry.
        let mut added = r.clone();
        (0..n).for_each(|i| added[i * n + i] -= 1.0);
        let what = format!("{} = {:.4}", rel.target, rel.value);
        let mut views = vec![(
            "relevance.svg".to_string(),
            heatmap(
                &added,
                (n, n),
                q,
                q,
                &format!("Relevance to {what} (R − I)"),
            ),
        )];
        json["relevance"] = json!({
            "target": rel.target,
            "value": rel.value,
            "matrix": r.chunks(n).map(<[f32]>::to_vec).collect::<Vec<_>>(),
        });
        if let Some(reading) = &self.reading {
            let row = reading.read(&added, n)?;
            let desc = reading.describe(q);
            json["relevance"]["reading"] = json!({ "row": desc, "values": row });
            views.push((
                "relevance-reading.svg".into(),
                bars(&row, q, &format!("Relevance to {what}: {desc} of R − I")),
            ));
        }
        if let Some((title, tokens, values)) = &rel.partner {
            json["relevance"]["partner"] =
                json!({ "title": title, "tokens": tokens, "values": values });
            views.push(("relevance-partner.svg".into(), bars(values, tokens, title)));
        }
        Ok(views)
    }
}

fn stat_json(s: &HeadStats) -> Value {
    json!({
        "layer": s.layer, "head": s.head, "entropy": s.entropy, "distance": s.distance,
        "special": s.special, "punctuation": s.punctuation,
        "previous": s.neighbours.map(|n| n[0]), "same": s.neighbours.map(|n| n[1]),
        "next": s.neighbours.map(|n| n[2]), "max": s.max,
    })
}

/// The page, section by section.
struct Page {
    html: String,
}

const STYLE: &str = "body{font-family:'DejaVu Sans',Verdana,Arial,sans-serif;margin:24px;color:#111;background:#fafafa;max-width:1400px}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}p.sub{color:#555;margin:0 0 12px}\
.grid{display:grid;gap:3px;align-items:center}.thumb{padding:0;border:2px solid transparent;background:none;cursor:pointer;line-height:0}\
.thumb.on{border-color:#d62728}.thumb:hover{border-color:#888}.rowlabel,.collabel{font-size:11px;color:#555;text-align:center}\
.pair{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}.view[hidden]{display:none}\
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}\
th{cursor:pointer;background:#eee;user-select:none}th:hover{background:#ddd}.warn{color:#a33}\
select{font-size:14px;margin-right:12px}";

const SCRIPT: &str = r#"
function show(l, h) {
  document.querySelectorAll('.view').forEach(v => { v.hidden = !(v.dataset.l == l && v.dataset.h == h); });
  document.querySelectorAll('.thumb').forEach(t => t.classList.toggle('on', t.dataset.l == l && t.dataset.h == h));
  document.getElementById('head-title').textContent = 'Layer ' + l + ', head ' + h;
  document.getElementById('layer').value = l;
  document.getElementById('head').value = h;
}
document.querySelectorAll('.thumb').forEach(t => t.addEventListener('click', () => {
  show(t.dataset.l, t.dataset.h);
  document.getElementById('head-section').scrollIntoView();
}));
['layer', 'head'].forEach(id => document.getElementById(id).addEventListener('change', () =>
  show(document.getElementById('layer').value, document.getElementById('head').value)));
document.querySelectorAll('#stats-table th').forEach((th, col) => th.addEventListener('click', () => {
  const body = document.querySelector('#stats-table tbody');
  const down = th.dataset.dir !== 'down';
  th.dataset.dir = down ? 'down' : 'up';
  const key = r => parseFloat(r.children[col].textContent) || 0;
  [...body.rows].sort((a, b) => down ? key(b) - key(a) : key(a) - key(b)).forEach(r => body.appendChild(r));
}));
show(0, 0);
"#;

impl Page {
    fn new(title: &str, subtitle: &str) -> Self {
        let mut html = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1>",
            t = escape(title)
        );
        if !subtitle.is_empty() {
            let _ = write!(html, "<p class=\"sub\">{}</p>", escape(subtitle));
        }
        Self { html }
    }

    fn warnings(&mut self, m: &Maps) {
        let w = m.row_sum_warnings();
        if let Some(first) = w.first() {
            let _ = write!(
                self.html,
                "<p class=\"warn\">{} rows do not sum to 1 (shown as given, not renormalised); the first: layer {}, head {}, row {}, sum {:.4}.</p>",
                w.len(), first.layer, first.head, first.row, first.sum
            );
        }
    }

    fn model_view(&mut self, m: &Maps) {
        let [layers, heads, nq, nk] = m.shape();
        let size = if heads > 12 { 40.0 } else { 64.0 };
        let _ = write!(
            self.html,
            "<h2>Model view</h2><p class=\"sub\">Every layer (rows) and head (columns); click a map to enlarge it below.</p><div class=\"grid\" id=\"model-view\" style=\"grid-template-columns:auto repeat({heads},auto)\"><div></div>"
        );
        for h in 0..heads {
            let _ = write!(self.html, "<div class=\"collabel\">head {h}</div>");
        }
        for l in 0..layers {
            let _ = write!(self.html, "<div class=\"rowlabel\">layer {l}</div>");
            for h in 0..heads {
                let _ = write!(
                    self.html,
                    "<button class=\"thumb\" data-l=\"{l}\" data-h=\"{h}\" title=\"layer {l}, head {h}\">{}</button>",
                    thumbnail(m.map(l, h), (nq, nk), size)
                );
            }
        }
        self.html +=
            "</div><h2 id=\"head-section\"><span id=\"head-title\">Layer 0, head 0</span></h2>";
    }

    fn head(
        &mut self,
        l: usize,
        h: usize,
        heatmap: &str,
        head_view: Option<&str>,
        through: Option<&str>,
    ) {
        let side = head_view.map_or_else(
            || format!("<p class=\"sub\">The head view is drawn up to {HEAD_VIEW_MAX_TOKENS} tokens.</p>"),
            |v| v.to_string(),
        );
        let through = through.map_or(String::new(), |t| format!("<div>{t}</div>"));
        let _ = write!(
            self.html,
            "<div class=\"view pair\" data-l=\"{l}\" data-h=\"{h}\" hidden><div>{heatmap}</div><div>{side}</div>{through}</div>"
        );
    }

    fn head_controls(&mut self, layers: usize, heads: usize) {
        let opts = |n: usize| {
            (0..n)
                .map(|i| format!("<option value=\"{i}\">{i}</option>"))
                .collect::<String>()
        };
        let _ = write!(
            self.html,
            "<p><label>Layer <select id=\"layer\">{}</select></label><label>Head <select id=\"head\">{}</select></label></p>",
            opts(layers),
            opts(heads)
        );
    }

    fn rollout(&mut self, map: &str, reading: Option<&(String, String)>, flows: &[String]) {
        self.html += "<h2>Attention rollout</h2><p class=\"sub\">Row i: how much of position i in the last layer comes from each input token, following attention and the residual connection through every layer (Abnar &amp; Zuidema, 2020).</p><div class=\"pair\">";
        let _ = write!(self.html, "<div>{map}</div>");
        if let Some((_, svg)) = reading {
            let _ = write!(self.html, "<div>{svg}</div>");
        }
        for f in flows {
            let _ = write!(self.html, "<div>{f}</div>");
        }
        self.html += "</div>";
    }

    fn relevance(&mut self, rel: &Relevance, views: &[(String, String)]) {
        let _ = write!(
            self.html,
            "<h2>Gradient-weighted relevance</h2><p class=\"sub\">How relevant each input token is to {} (value {:.4}): each layer's attention weighted by the gradient of that output, positive part, averaged over heads, chained through the layers from the identity (Chefer, Gur &amp; Wolf, 2021). Shown without the identity the residual connections carry.</p><div class=\"pair\">",
            escape(&rel.target),
            rel.value
        );
        for (_, svg) in views {
            let _ = write!(self.html, "<div>{svg}</div>");
        }
        self.html += "</div>";
    }

    fn stats(&mut self, stats: &[HeadStats]) {
        self.html += "<h2>Head statistics</h2><p class=\"sub\">Means over the query rows (Clark et al., 2019): entropy in nats, attention distance in tokens, shares of attention to special tokens and punctuation, to the previous, same and next token, and the largest weight. Click a column to sort.</p><table id=\"stats-table\"><thead><tr>";
        for c in [
            "layer", "head", "entropy", "distance", "special", "punct.", "previous", "same",
            "next", "max",
        ] {
            let _ = write!(self.html, "<th>{c}</th>");
        }
        self.html += "</tr></thead><tbody>";
        let opt = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.3}"));
        for s in stats {
            let nb = s.neighbours.map(|n| n.map(Some)).unwrap_or([None; 3]);
            let _ = write!(
                self.html,
                "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td></tr>",
                s.layer, s.head, s.entropy, opt(s.distance), s.special, s.punctuation,
                opt(nb[0]), opt(nb[1]), opt(nb[2]), s.max
            );
        }
        self.html += "</tbody></table>";
    }

    /// The page, its SVGs inline without their namespace attribute (HTML does not need it, and
    /// the page then names no URL at all).
    fn finish(self) -> String {
        let body = self
            .html
            .replace(r#" xmlns="http://www.w3.org/2000/svg""#, "");
        format!("{body}<script>{SCRIPT}</script></body></html>")
    }
}
