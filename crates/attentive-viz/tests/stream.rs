//! Streamed accumulation (rows block by block) against the direct methods on the whole maps.

use attentive_viz::rollout::rollout;
use attentive_viz::stats::head_stats;
use attentive_viz::stream::Streamed;
use attentive_viz::{svg, Fusion, Maps, VizError};

/// `[L, H, n, n]` softmax rows of a fixed pseudo-random pattern.
fn random_maps(l: usize, h: usize, n: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(l * h * n * n);
    for _ in 0..l * h * n {
        let row: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state % 1000) as f32 / 250.0).exp()
            })
            .collect();
        let s: f32 = row.iter().sum();
        out.extend(row.iter().map(|x| x / s));
    }
    out
}

#[test]
fn streamed_equals_direct() {
    let (l, h, n) = (3, 2, 300);
    let tokens: Vec<String> = (0..n)
        .map(|i| match i {
            0 => "[CLS]".into(),
            _ if i % 17 == 0 => ",".into(),
            _ => format!("w{i}"),
        })
        .collect();
    let data = random_maps(l, h, n);
    let maps = Maps::self_attention(data.clone(), [l, h, n], tokens.clone()).unwrap();
    let mut s = Streamed::new(l, h, tokens).unwrap();
    for layer in 0..l {
        for head in 0..h {
            // Blocks of 64 rows, the last one short.
            for r0 in (0..n).step_by(64) {
                let rows = 64.min(n - r0);
                s.add_rows(
                    layer,
                    head,
                    r0,
                    &maps.map(layer, head)[r0 * n..(r0 + rows) * n],
                )
                .unwrap();
            }
        }
        s.end_layer().unwrap();
    }
    let f = s.finish().unwrap();
    assert_eq!(f.stats, head_stats(&maps, None));
    let want = rollout(&maps, Fusion::Mean).unwrap().pop().unwrap();
    let worst = f
        .rollout
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "rollout differs by {worst}");
    // The coarse maps are the heatmaps' block means (300 tokens: blocks of 3, 100 cells).
    assert_eq!(f.coarse.shape(), [l, h, 100, 100]);
    for (layer, head) in [(0, 0), (2, 1)] {
        let d = svg::downsample(
            maps.map(layer, head),
            n,
            n,
            maps.q_tokens(),
            maps.k_tokens(),
        );
        let c = f.coarse.map(layer, head);
        assert!(c.iter().zip(&d.mean).all(|(a, b)| (a - b).abs() < 1e-6));
        assert_eq!(f.maxima[layer * h + head], d.max);
        assert_eq!(f.coarse.q_tokens()[1], d.row_labels[1]);
    }
}

#[test]
fn streamed_refuses_rows_out_of_order() {
    let tokens: Vec<String> = (0..4).map(|i| format!("t{i}")).collect();
    let mut s = Streamed::new(2, 1, tokens).unwrap();
    let row = [0.25f32; 4];
    assert!(matches!(
        s.add_rows(1, 0, 0, &row),
        Err(VizError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.add_rows(0, 1, 0, &row),
        Err(VizError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.add_rows(0, 0, 3, &[0.25; 8]),
        Err(VizError::Shape { .. })
    ));
    assert!(matches!(
        s.add_rows(0, 0, 0, &[0.25, f32::NAN, 0.25, 0.25]),
        Err(VizError::Weight { .. })
    ));
    s.add_rows(0, 0, 0, &row).unwrap();
    assert!(
        matches!(s.end_layer(), Err(VizError::Shape { .. })),
        "three rows missing"
    );
    s.add_rows(0, 0, 1, &[0.25; 12]).unwrap();
    s.end_layer().unwrap();
    assert!(matches!(
        Streamed::new(0, 1, vec!["a".into()]),
        Err(VizError::Empty(_))
    ));
    assert!(
        matches!(s.finish(), Err(VizError::Shape { .. })),
        "layer 1 never ended"
    );
}
