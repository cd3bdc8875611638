//! Rollout, flow and head statistics of a hand-made 2-layer × 2-head × 3-token fixture against
//! values computed here exactly, in fractions: rollout by rational matrix products, flow as the
//! minimum cut over every cut of the layered graph (an independent route to the max-flow).

use attentive_viz::rollout::{flow, readings_through_heads, rollout, rollout_through_head};
use attentive_viz::stats::head_stats;
use attentive_viz::{Fusion, Maps, Reading, Report, VizError};

/// A fraction in lowest terms.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Q(i128, i128);

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

impl Q {
    fn new(n: i128, d: i128) -> Q {
        let g = gcd(n, d).max(1);
        Q(n / g * d.signum(), d.abs() / g)
    }
    fn add(self, o: Q) -> Q {
        Q::new(self.0 * o.1 + o.0 * self.1, self.1 * o.1)
    }
    fn mul(self, o: Q) -> Q {
        Q::new(self.0 * o.0, self.1 * o.1)
    }
    fn div(self, o: Q) -> Q {
        Q::new(self.0 * o.1, self.1 * o.0)
    }
    fn f64(self) -> f64 {
        self.0 as f64 / self.1 as f64
    }
}

const N: usize = 3;
type M = [[Q; N]; N];

/// `[layer][head]` maps as fractions (numerator, denominator): every row sums to 1.
fn fixture() -> [[M; 2]; 2] {
    let q = |r: [(i128, i128); 3]| r.map(|(n, d)| Q::new(n, d));
    [
        [
            [
                q([(1, 2), (1, 4), (1, 4)]),
                q([(0, 1), (1, 1), (0, 1)]),
                q([(1, 3), (1, 3), (1, 3)]),
            ],
            [
                q([(1, 2), (1, 2), (0, 1)]),
                q([(1, 4), (1, 2), (1, 4)]),
                q([(0, 1), (0, 1), (1, 1)]),
            ],
        ],
        [
            [
                q([(1, 1), (0, 1), (0, 1)]),
                q([(1, 2), (0, 1), (1, 2)]),
                q([(1, 4), (1, 4), (1, 2)]),
            ],
            [
                q([(0, 1), (1, 1), (0, 1)]),
                q([(0, 1), (1, 2), (1, 2)]),
                q([(1, 2), (1, 2), (0, 1)]),
            ],
        ],
    ]
}

fn tokens() -> Vec<String> {
    ["[CLS]", "hi", "."].map(String::from).to_vec()
}

fn maps() -> Maps {
    let data: Vec<f32> = fixture()
        .iter()
        .flat_map(|l| {
            l.iter()
                .flat_map(|h| h.iter().flat_map(|r| r.map(|x| x.f64() as f32)))
        })
        .collect();
    Maps::self_attention(data, [2, 2, N], tokens()).unwrap()
}

/// rownorm(mean of the heads + I), exactly.
fn hat(layer: &[M; 2]) -> M {
    let mut a = [[Q(0, 1); N]; N];
    for i in 0..N {
        for j in 0..N {
            let mean = layer[0][i][j].add(layer[1][i][j]).mul(Q::new(1, 2));
            a[i][j] = if i == j { mean.add(Q(1, 1)) } else { mean };
        }
        let s = a[i].iter().fold(Q(0, 1), |s, &x| s.add(x));
        for x in &mut a[i] {
            *x = x.div(s);
        }
    }
    a
}

fn matmul(a: &M, b: &M) -> M {
    let mut c = [[Q(0, 1); N]; N];
    for i in 0..N {
        for j in 0..N {
            c[i][j] = (0..N).fold(Q(0, 1), |s, t| s.add(a[i][t].mul(b[t][j])));
        }
    }
    c
}

#[test]
fn rollout_equals_the_exact_product() {
    let f = fixture();
    let (h1, h2) = (hat(&f[0]), hat(&f[1]));
    let exact = [h1, matmul(&h2, &h1)];
    let got = rollout(&maps(), Fusion::Mean).unwrap();
    for (l, (g, e)) in got.iter().zip(&exact).enumerate() {
        for i in 0..N {
            for j in 0..N {
                assert!(
                    (g[i * N + j] as f64 - e[i][j].f64()).abs() < 1e-6,
                    "J_{} [{i},{j}]: {} vs {:?}",
                    l + 1,
                    g[i * N + j],
                    e[i][j]
                );
            }
        }
    }
    // Rows of a rollout stay stochastic.
    for row in got[1].chunks(N) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    // Through one head of the last layer: rownorm(A_2^h + I) · J_1.
    let mut a = f[1][1];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = row[i].add(Q(1, 1));
        let s = row.iter().fold(Q(0, 1), |s, &x| s.add(x));
        row.iter_mut().for_each(|x| *x = x.div(s));
    }
    let want = matmul(&a, &h1);
    let got = rollout_through_head(&maps(), Fusion::Mean, 1, 1).unwrap();
    for i in 0..N {
        for j in 0..N {
            assert!((got[i * N + j] as f64 - want[i][j].f64()).abs() < 1e-6);
        }
    }
    // The per-head readings the page shows: the exact row of that product, and the mean of
    // rows 0 and 2 of it.
    let rows = readings_through_heads(&maps(), Fusion::Mean, &Reading::Row(2)).unwrap();
    let mean = Reading::MeanOf(vec![true, false, true]);
    let means = readings_through_heads(&maps(), Fusion::Mean, &mean).unwrap();
    for j in 0..N {
        assert!((rows[1][1][j] as f64 - want[2][j].f64()).abs() < 1e-6);
        let m = want[0][j].add(want[2][j]).div(Q(2, 1));
        assert!((means[1][1][j] as f64 - m.f64()).abs() < 1e-6);
    }
}

#[test]
fn reading_rows_and_the_masked_mean() {
    let j = rollout(&maps(), Fusion::Mean).unwrap().pop().unwrap();
    assert_eq!(Reading::Row(0).read(&j, N).unwrap(), j[..N].to_vec());
    let mean = Reading::MeanOf(vec![true, false, true])
        .read(&j, N)
        .unwrap();
    for c in 0..N {
        assert!((mean[c] - (j[c] + j[2 * N + c]) / 2.0).abs() < 1e-7);
    }
    assert!(matches!(
        Reading::Row(3).read(&j, N),
        Err(VizError::OutOfRange { .. })
    ));
    assert!(matches!(
        Reading::MeanOf(vec![false; 3]).read(&j, N),
        Err(VizError::Empty(_))
    ));
}

/// The max-flow from (layer 2, i) to (layer 0, j) as the minimum over every s–t cut.
fn min_cut(hats: &[M; 2], i: usize, j: usize) -> Q {
    // Nodes: layer·3 + token; edges from layer l+1 token a to layer l token b, capacity Â_{l+1}[a][b].
    let (s, t) = (2 * N + i, j);
    let others: Vec<usize> = (0..3 * N).filter(|&v| v != s && v != t).collect();
    let mut best: Option<Q> = None;
    for bits in 0u32..(1 << others.len()) {
        let in_s = |v: usize| {
            v == s
                || others
                    .iter()
                    .position(|&o| o == v)
                    .is_some_and(|p| bits >> p & 1 == 1)
        };
        let mut cut = Q(0, 1);
        for l in 0..2 {
            for a in 0..N {
                for b in 0..N {
                    if in_s((l + 1) * N + a) && !in_s(l * N + b) {
                        cut = cut.add(hats[l][a][b]);
                    }
                }
            }
        }
        if best.is_none_or(|b| cut.f64() < b.f64()) {
            best = Some(cut);
        }
    }
    best.unwrap()
}

#[test]
fn flow_equals_the_minimum_cut() {
    let f = fixture();
    let hats = [hat(&f[0]), hat(&f[1])];
    let rows = [0, 1, 2];
    let got = flow(&maps(), Fusion::Mean, &rows).unwrap();
    for (&i, g) in rows.iter().zip(&got) {
        let cuts: Vec<Q> = (0..N).map(|j| min_cut(&hats, i, j)).collect();
        let total = cuts.iter().fold(Q(0, 1), |s, &c| s.add(c));
        for j in 0..N {
            let want = cuts[j].div(total).f64();
            // The capacities are the f32 maps' Â (a few f32 roundings each); the flow itself is
            // summed in f64.
            assert!(
                (g[j] - want).abs() < 1e-6,
                "flow {i}→{j}: {} vs {want}",
                g[j]
            );
        }
    }
}

#[test]
fn flow_refuses_work_past_its_limit() {
    let n = 120;
    let tokens: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    let m = Maps::self_attention(vec![1.0 / n as f32; 12 * n * n], [12, 1, n], tokens).unwrap();
    let rows: Vec<usize> = (0..n).collect();
    assert!(matches!(
        flow(&m, Fusion::Mean, &rows),
        Err(VizError::TooLarge { .. })
    ));
    assert!(matches!(
        flow(&maps(), Fusion::Mean, &[3]),
        Err(VizError::OutOfRange { .. })
    ));
}

#[test]
fn head_statistics_equal_their_formulas() {
    let f = fixture();
    let stats = head_stats(&maps(), None);
    assert_eq!(stats.len(), 4);
    for s in &stats {
        let a = &f[s.layer][s.head];
        let mean = |g: &dyn Fn(usize) -> f64| (0..N).map(g).sum::<f64>() / N as f64;
        let entropy = mean(&|i| {
            -a[i]
                .iter()
                .map(|x| x.f64())
                .filter(|&x| x > 0.0)
                .map(|x| x * x.ln())
                .sum::<f64>()
        });
        let distance = mean(&|i| {
            (0..N)
                .map(|j| a[i][j].f64() * (i as f64 - j as f64).abs())
                .sum()
        });
        let special = mean(&|i| a[i][0].f64()); // [CLS]
        let punct = mean(&|i| a[i][2].f64()); // "."
        let prev = mean(&|i| if i > 0 { a[i][i - 1].f64() } else { 0.0 });
        let same = mean(&|i| a[i][i].f64());
        let next = mean(&|i| if i + 1 < N { a[i][i + 1].f64() } else { 0.0 });
        let max = mean(&|i| a[i].iter().map(|x| x.f64()).fold(0.0, f64::max));
        let close = |x: f64, y: f64| (x - y).abs() < 1e-6;
        assert!(close(s.entropy, entropy), "{s:?}: entropy {entropy}");
        assert!(close(s.distance.unwrap(), distance));
        assert!(close(s.special, special) && close(s.punctuation, punct));
        let [p, sm, nx] = s.neighbours.unwrap();
        assert!(close(p, prev) && close(sm, same) && close(nx, next));
        assert!(close(s.max, max));
    }
    // Only the rows asked for count: row 1 alone.
    let one = head_stats(&maps(), Some(&[false, true, false]));
    assert!((one[0].entropy - 0.0).abs() < 1e-12 && (one[0].max - 1.0).abs() < 1e-6);
}

#[test]
fn bad_maps_are_clear_errors_and_odd_rows_are_reported() {
    let t = tokens();
    let good = vec![1.0 / 3.0; 9];
    assert!(matches!(
        Maps::self_attention(good.clone(), [1, 1, 4], t.clone()),
        Err(VizError::Shape { .. })
    ));
    assert!(matches!(
        Maps::self_attention(good.clone(), [1, 1, 3], t[..2].to_vec()),
        Err(VizError::Shape { .. })
    ));
    assert!(matches!(
        Maps::self_attention(vec![], [0, 1, 3], t.clone()),
        Err(VizError::Shape { .. })
    ));
    for bad in [f32::NAN, -0.1, f32::INFINITY] {
        let mut d = good.clone();
        d[5] = bad;
        match Maps::self_attention(d, [1, 1, 3], t.clone()) {
            Err(VizError::Weight { row: 1, col: 2, .. }) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
    let mut d = good.clone();
    d[3] = 0.9; // row 1 sums to 1.567
    let m = Maps::self_attention(d, [1, 1, 3], t.clone()).unwrap();
    assert_eq!(m.row_sum_warnings().len(), 1);
    assert_eq!(m.row_sum_warnings()[0].row, 1);
    assert_eq!(m.map(0, 0)[3], 0.9, "kept as given, not renormalised");
    let out = Report::new(&m, "odd").build().unwrap();
    assert!(out.html.contains("do not sum to 1"));
    assert_eq!(out.json["row_sum_warnings"][0]["row"], 1);
    // Cross-attention: no rollout, said so.
    let cross = Maps::new(vec![0.5; 6], [1, 1, 3, 2], t, vec!["a".into(), "b".into()]).unwrap();
    assert!(matches!(
        rollout(&cross, Fusion::Mean),
        Err(VizError::NotSelfAttention { .. })
    ));
    assert!(Report::new(&cross, "cross")
        .build()
        .unwrap()
        .json
        .get("rollout")
        .is_none());
}

#[test]
fn the_report_holds_every_number_and_names_no_url() {
    let m = maps();
    let mut r = Report::new(&m, "fixture");
    r.reading = Some(Reading::Row(0));
    r.flow_rows = vec![0];
    let out = r.build().unwrap();
    for key in [
        "tokens",
        "attentions",
        "rollout",
        "rollout_reading",
        "flow",
        "head_stats",
    ] {
        assert!(out.json.get(key).is_some(), "attention.json lacks {key}");
    }
    assert_eq!(out.json["attentions"][1][0][1][2], 0.5);
    assert_eq!(out.json["head_stats"].as_array().unwrap().len(), 4);
    assert!(!out.html.contains("http") && !out.html.contains("src="));
    assert_eq!(out.html.matches("class=\"thumb\"").count(), 4);
    let names: Vec<&str> = out.svgs.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "heatmap-L1-H0.svg",
        "headview-L0-H1.svg",
        "rollout.svg",
        "rollout-reading.svg",
        "flow-row0.svg",
    ] {
        assert!(names.contains(&want), "no {want} in {names:?}");
    }
    for (name, svg) in &out.svgs {
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{name}");
        assert!(
            svg.contains(r#"fill="white""#),
            "{name}: no opaque background"
        );
    }
}

#[test]
fn views_render_as_png_with_an_opaque_background() {
    let m = maps();
    let svg = attentive_viz::svg::heatmap(m.map(0, 0), (N, N), m.q_tokens(), m.k_tokens(), "L0 H0");
    let png = attentive_viz::png::png(&svg, 2.0).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    // IHDR: width and height, twice the SVG's.
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    let sw: f64 = svg
        .split("width=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(w, (2.0 * sw).round() as u32);
    assert!(h > 100);
    assert!(matches!(
        attentive_viz::png::png("<svg", 1.0),
        Err(VizError::Render(_))
    ));
}

/// Gradient-weighted relevance on hand-made gradient-weighted maps whose values are exact in
/// binary, against the rules worked by hand: negative parts dropped, heads averaged,
/// R ← R + Ā·R; and the encoder–decoder rule with R̄ = rownorm(R − I) + I and its transpose.
#[test]
fn relevance_rules_on_a_worked_fixture() {
    use attentive_viz::relevance::{
        relevance, relevance_encoder_decoder, residual_normalised, Weighted,
    };
    // Layer 1: heads [[.5, −.5], [0, 1]] and [[.5, .5], [−1, 0]] → Ā₁ = [[.5, .25], [0, .5]].
    // Layer 2: heads [[0, 1], [.5, 0]] and [[0, 0], [.5, 0]] → Ā₂ = [[0, .5], [.5, 0]].
    let w = Weighted::new(
        vec![
            0.5, -0.5, 0.0, 1.0, 0.5, 0.5, -1.0, 0.0, //
            0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.5, 0.0,
        ],
        [2, 2, 2, 2],
    )
    .unwrap();
    let r = relevance(&w).unwrap();
    assert_eq!(r[0], [1.5, 0.25, 0.0, 1.5]); // I + Ā₁
    assert_eq!(r[1], [1.5, 1.0, 0.75, 1.625]); // R₁ + Ā₂R₁
                                               // rownorm(R − I) + I, a zero row of R − I left as it is.
    assert_eq!(
        residual_normalised(&[1.0, 3.0, 0.0, 1.0], 2),
        [1.0, 1.0, 0.0, 1.0]
    );

    // Encoder Ā = [[0, 1], [0, 0]]: R^{ii} = [[1, 1], [0, 1]] = R̄^{ii}.
    // Decoder self Ā = [[0, 0], [1, 0]]: R^{tt} = [[1, 0], [1, 1]], R^{ti} stays 0;
    // R̄^{tt} = [[1, 0], [1, 1]]. Cross Ā = [[1, 0], [0, 2]]:
    // R^{ti} = (R̄^{tt})ᵀ·Ā·R̄^{ii} = [[1, 1], [0, 1]]·[[1, 1], [0, 2]] = [[1, 3], [0, 2]].
    let one = |v: Vec<f32>| Weighted::new(v, [1, 1, 2, 2]).unwrap();
    let ed = relevance_encoder_decoder(
        &one(vec![0.0, 1.0, 0.0, 0.0]),
        &one(vec![0.0, 0.0, 1.0, 0.0]),
        &one(vec![1.0, 0.0, 0.0, 2.0]),
    )
    .unwrap();
    assert_eq!(ed.encoder, [1.0, 1.0, 0.0, 1.0]);
    assert_eq!(ed.decoder, [1.0, 0.0, 1.0, 1.0]);
    assert_eq!(ed.cross, [1.0, 3.0, 0.0, 2.0]);

    // Bad input: NaN, a wrong length, cross-attention of the wrong size.
    assert!(matches!(
        Weighted::new(vec![f32::NAN, 0.0, 0.0, 0.0], [1, 1, 2, 2]),
        Err(VizError::Weight { row: 0, col: 0, .. })
    ));
    assert!(matches!(
        Weighted::new(vec![0.0; 3], [1, 1, 2, 2]),
        Err(VizError::Shape { .. })
    ));
    let wide = Weighted::new(vec![0.0; 6], [1, 1, 2, 3]).unwrap();
    assert!(matches!(
        relevance(&wide),
        Err(VizError::NotSelfAttention { .. })
    ));
    let e = relevance_encoder_decoder(&one(vec![0.0; 4]), &one(vec![0.0; 4]), &wide);
    assert!(matches!(e, Err(VizError::Shape { .. })));
}

#[test]
fn heatmaps_of_an_empty_side_are_empty_maps() {
    // A model that wrote no output token has an alignment of zero rows: drawn, not a panic,
    // whether or not the other side needs blocks.
    let names = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>();
    for (nq, nk, budget) in [
        (0, 5, 64),
        (0, 500, 64),
        (5, 0, 64),
        (0, 0, 1),
        (300, 0, 64),
    ] {
        let svg =
            attentive_viz::svg::heatmap_within(&[], (nq, nk), &names(nq), &names(nk), "t", budget);
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{nq}×{nk}"
        );
        let d = attentive_viz::svg::downsample_to(&[], (nq, nk), &names(nq), &names(nk), budget);
        assert_eq!(d.mean.len(), d.rows * d.cols);
        assert_eq!(d.rows * d.cols, 0);
    }
}
