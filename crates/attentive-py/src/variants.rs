//! The other math (`attentive::variants`) on NumPy arrays, forward only, each variant's
//! parameters passed explicitly.

use crate::{err, f32_array, on_threads, view, zeros, Array, Out};
use attentive::variants::{
    adaptive_span, additive, gated, han, linear, linformer, lsh, nystrom, performer,
};
use attentive::{Isa, View, ViewMut};
use numpy::{PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// A contiguous slice of a 1-D (or any contiguous) array.
fn flat<'a, T: numpy::Element>(name: &str, a: &'a PyReadonlyArrayDyn<T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| err(format!("{name}: expected a contiguous array")))
}

/// Runs a variant's forward on `q`, `k`, `v` ([B, H, N, D] views) into a fresh
/// `[B, Hq, Nq, Dv]` output, without the GIL.
fn run<'py>(
    py: Python<'py>,
    (q, k, v): (&Bound<'py, PyAny>, &Bound<'py, PyAny>, &Bound<'py, PyAny>),
    f: impl FnOnce(View, View, View, &mut ViewMut) -> attentive::Result<()> + Send,
) -> PyResult<Array<'py>> {
    let (qa, ka, va) = (f32_array("q", q)?, f32_array("k", k)?, f32_array("v", v)?);
    let (qv, kv, vv) = (
        view("q", &qa, true)?,
        view("k", &ka, true)?,
        view("v", &va, true)?,
    );
    let [b, hq, nq, _] = qv.shape();
    let shape = [b, hq, nq, vv.shape()[3]];
    let o = zeros(py, &shape)?;
    let out = Out::of(&o);
    py.detach(move || {
        on_threads(move || {
            // SAFETY: o is a fresh array held by this function for the whole call.
            let mut ov = ViewMut::contiguous(unsafe { out.slice() }, shape)?;
            f(qv, kv, vv, &mut ov)
        })
    })
    .map_err(err)?;
    Ok(o)
}

/// Linear attention (Katharopoulos et al., 2020), φ = elu + 1.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, causal=false, eps=linear::EPS, key_mask=None))]
fn linear_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    causal: bool,
    eps: f32,
    key_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<Array<'py>> {
    let mask = key_mask.as_ref().map(|m| flat("key_mask", m)).transpose()?;
    run(py, (q, k, v), move |q, k, v, o| {
        let opts = linear::Linear {
            causal,
            eps,
            key_mask: mask,
            isa: Isa::best(),
        };
        linear::forward(q, k, v, &opts, o)
    })
}

/// Decayed (RetNet: `log_decay` per key/value head) or gated (GLA: `log_gates`
/// [B, Hkv, N, D]) linear attention.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, log_decay=None, log_gates=None, scale=None))]
fn gated_linear_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    log_decay: Option<PyReadonlyArray1<'py, f32>>,
    log_gates: Option<PyReadonlyArrayDyn<'py, f32>>,
    scale: Option<f32>,
) -> PyResult<Array<'py>> {
    let decay = match (&log_decay, &log_gates) {
        (Some(d), None) => gated::Decay::PerHead(
            d.as_slice()
                .map_err(|_| err("log_decay: expected a contiguous array"))?,
        ),
        (None, Some(g)) => gated::Decay::Gates(view("log_gates", g, true)?),
        _ => {
            return Err(err(
                "gated_linear_attention: give log_decay or log_gates, not both",
            ))
        }
    };
    run(py, (q, k, v), move |q, k, v, o| {
        let mut opts = gated::Gated::new(decay);
        opts.scale = scale;
        gated::forward(q, k, v, &opts, o)
    })
}

/// Performer's FAVOR+ with `num_features` positive orthogonal random features drawn from
/// `seed` (or the `features` given, [m, D]).
#[pyfunction]
#[pyo3(signature = (q, k, v, *, num_features=256, seed=0, features=None, causal=false,
    key_mask=None))]
#[allow(clippy::too_many_arguments)]
fn performer_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    num_features: usize,
    seed: u64,
    features: Option<PyReadonlyArrayDyn<'py, f32>>,
    causal: bool,
    key_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<Array<'py>> {
    let d = f32_array("q", q)?.shape().last().copied().unwrap_or(0);
    let drawn;
    let feats = match &features {
        Some(f) => flat("features", f)?,
        None => {
            drawn = performer::draw_features(num_features, d, seed);
            &drawn[..]
        }
    };
    let mask = key_mask.as_ref().map(|m| flat("key_mask", m)).transpose()?;
    run(py, (q, k, v), move |q, k, v, o| {
        let mut opts = performer::Performer::new(feats);
        opts.causal = causal;
        opts.key_mask = mask;
        performer::forward(q, k, v, &opts, o)
    })
}

/// Linformer: keys and values projected along the sequence by `e` ([N, k]) and `f` (`e` when
/// None), then exact softmax attention.
#[pyfunction]
#[pyo3(signature = (q, k, v, e, f=None, *, scale=None))]
#[allow(clippy::too_many_arguments)]
fn linformer_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    e: PyReadonlyArrayDyn<'py, f32>,
    f: Option<PyReadonlyArrayDyn<'py, f32>>,
    scale: Option<f32>,
) -> PyResult<Array<'py>> {
    let proj = *e.shape().last().ok_or_else(|| err("e: expected [N, k]"))?;
    let (es, fs) = (
        flat("e", &e)?,
        f.as_ref().map(|f| flat("f", f)).transpose()?,
    );
    run(py, (q, k, v), move |q, k, v, o| {
        let mut opts = linformer::Linformer::new(es, fs, proj);
        opts.scale = scale;
        linformer::forward(q, k, v, &opts, o)
    })
}

/// Nyströmformer with `landmarks` landmarks (dividing N) and `iterations` of the
/// pseudo-inverse.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, landmarks, iterations=None))]
fn nystrom_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    landmarks: usize,
    iterations: Option<usize>,
) -> PyResult<Array<'py>> {
    run(py, (q, k, v), move |q, k, v, o| {
        let mut opts = nystrom::Nystrom::new(landmarks);
        if let Some(it) = iterations {
            opts.iterations = it;
        }
        nystrom::forward(q, k, v, &opts, o)
    })
}

/// Reformer's LSH attention over shared queries and keys `x` ([B, H, N, D]) and values `v`:
/// `n_hashes` rounds of `n_buckets` buckets (random rotations from `seed`), chunks of
/// `bucket_size`.
#[pyfunction]
#[pyo3(signature = (x, v, *, n_buckets, n_hashes=2, bucket_size=64, causal=false, seed=0,
    key_mask=None))]
#[allow(clippy::too_many_arguments)]
fn lsh_attention<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    n_buckets: usize,
    n_hashes: usize,
    bucket_size: usize,
    causal: bool,
    seed: u64,
    key_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<Array<'py>> {
    let d = f32_array("x", x)?.shape().last().copied().unwrap_or(0);
    if !n_buckets.is_multiple_of(2) || n_buckets == 0 {
        return Err(err(format!(
            "n_buckets: {n_buckets} is not a positive even number"
        )));
    }
    let rotations = lsh::draw_rotations(n_hashes, d, n_buckets, seed);
    let mask = key_mask.as_ref().map(|m| flat("key_mask", m)).transpose()?;
    run(py, (x, x, v), move |x, _, v, o| {
        let mut opts = lsh::Lsh::new(&rotations, n_hashes, n_buckets, bucket_size);
        opts.causal = causal;
        opts.key_mask = mask;
        lsh::forward(x, v, &opts, o)
    })
}

/// Adaptive attention span (causal): each query head's learned span fraction `current` ([Hq]),
/// the largest span `max_span` and the ramp's width `ramp`.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, current, max_span, ramp=32))]
fn adaptive_span_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    current: PyReadonlyArray1<'py, f32>,
    max_span: usize,
    ramp: usize,
) -> PyResult<Array<'py>> {
    let cur = current
        .as_slice()
        .map_err(|_| err("current: expected a contiguous array"))?;
    run(py, (q, k, v), move |q, k, v, o| {
        let span = adaptive_span::AdaptiveSpan {
            current: cur,
            max_span,
            ramp,
        };
        adaptive_span::forward(q, k, v, &span, o, None)
    })
}

/// A weight the score needs, as a contiguous slice.
fn need<'a>(
    score: &str,
    name: &str,
    a: &'a Option<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<&'a [f32]> {
    let a = a
        .as_ref()
        .ok_or_else(|| err(format!("{score} score: {name} is required")))?;
    flat(name, a)
}

/// Bahdanau's additive score (`w_q` [A, Dq], `w_k` [A, Dk], `v_a` [A]) or Luong's dot, general
/// (`w` [Dq, Dk]) or concat (`w` [A, Dq + Dk], `v_a` [A]) score, softmax over the keys:
/// returns (output, weights [B, Hq, Nq, Nk]).
#[pyfunction]
#[pyo3(signature = (q, k, v, *, score="additive", w_q=None, w_k=None, w=None, v_a=None,
    key_mask=None))]
#[allow(clippy::too_many_arguments)]
fn additive_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    score: &str,
    w_q: Option<PyReadonlyArrayDyn<'py, f32>>,
    w_k: Option<PyReadonlyArrayDyn<'py, f32>>,
    w: Option<PyReadonlyArrayDyn<'py, f32>>,
    v_a: Option<PyReadonlyArrayDyn<'py, f32>>,
    key_mask: Option<PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<(Array<'py>, Array<'py>)> {
    let s = match score {
        "additive" => additive::Score::Additive {
            w_q: need(score, "w_q", &w_q)?,
            w_k: need(score, "w_k", &w_k)?,
            v: need(score, "v_a", &v_a)?,
        },
        "dot" => additive::Score::Dot,
        "general" => additive::Score::General {
            w: need(score, "w", &w)?,
        },
        "concat" => additive::Score::Concat {
            w: need(score, "w", &w)?,
            v: need(score, "v_a", &v_a)?,
        },
        _ => {
            return Err(err(format!(
                "score: {score:?} is not additive, dot, general or concat"
            )))
        }
    };
    let mask = key_mask.as_ref().map(|m| flat("key_mask", m)).transpose()?;
    let (qa, ka) = (f32_array("q", q)?, f32_array("k", k)?);
    let [b, hq, nq, _] = view("q", &qa, true)?.shape();
    let nk = view("k", &ka, true)?.shape()[2];
    let weights = zeros(py, &[b, hq, nq, nk])?;
    let wout = Out::of(&weights);
    let o = run(py, (q, k, v), move |q, k, v, o| {
        let mut opts = additive::Additive::new(s);
        opts.key_mask = mask;
        // SAFETY: weights is a fresh array held by this function for the whole call.
        additive::forward(q, k, v, &opts, o, Some(unsafe { wout.slice() }))
    })?;
    Ok((o, weights))
}

/// Hierarchical attention pooling of `h` ([groups, N, D]) with a level's weights `w` [A, D],
/// `b` [A] and context `c` [A]: returns (pooled [groups, D], weights [groups, N]).
#[pyfunction]
#[pyo3(signature = (h, w, b, c, mask=None))]
fn han_pool<'py>(
    py: Python<'py>,
    h: PyReadonlyArrayDyn<'py, f32>,
    w: PyReadonlyArrayDyn<'py, f32>,
    b: PyReadonlyArrayDyn<'py, f32>,
    c: PyReadonlyArrayDyn<'py, f32>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
) -> PyResult<(Array<'py>, Array<'py>)> {
    let &[groups, n, d] = h.shape() else {
        return Err(err(format!(
            "h: expected [groups, N, D], got {:?}",
            h.shape()
        )));
    };
    let level = han::Level {
        w: flat("w", &w)?,
        b: flat("b", &b)?,
        c: flat("c", &c)?,
    };
    let hs = h.as_array().as_standard_layout().into_owned();
    let m = mask.as_ref().map(|m| flat("mask", m)).transpose()?;
    let (s, alpha) = py
        .detach(|| han::pool(hs.as_slice().unwrap_or(&[]), (groups, n, d), m, &level))
        .map_err(err)?;
    let s = numpy::PyArray1::from_vec(py, s).reshape(vec![groups, d])?;
    let alpha = numpy::PyArray1::from_vec(py, alpha).reshape(vec![groups, n])?;
    Ok((s, alpha))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(linear_attention, m)?)?;
    m.add_function(wrap_pyfunction!(gated_linear_attention, m)?)?;
    m.add_function(wrap_pyfunction!(performer_attention, m)?)?;
    m.add_function(wrap_pyfunction!(linformer_attention, m)?)?;
    m.add_function(wrap_pyfunction!(nystrom_attention, m)?)?;
    m.add_function(wrap_pyfunction!(lsh_attention, m)?)?;
    m.add_function(wrap_pyfunction!(adaptive_span_attention, m)?)?;
    m.add_function(wrap_pyfunction!(additive_attention, m)?)?;
    m.add_function(wrap_pyfunction!(han_pool, m)?)?;
    Ok(())
}
