//! `attentive_viz` on attention maps given as arrays `[layers, heads, Nq, Nk]` with their
//! tokens: rollout, flow, head statistics, and the HTML report and SVG views.

use crate::err;
use attentive_viz::rollout::{self as roll, Fusion};
use attentive_viz::{stats, svg, Maps, Report};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Validated maps from an array and its tokens (`k_tokens` for cross-attention).
fn to_maps(
    a: &PyReadonlyArrayDyn<f32>,
    tokens: Vec<String>,
    k_tokens: Option<Vec<String>>,
) -> PyResult<Maps> {
    let &[l, h, nq, nk] = a.shape() else {
        return Err(err(format!(
            "maps: expected [layers, heads, Nq, Nk], got {:?}",
            a.shape()
        )));
    };
    let data = a.as_array().iter().copied().collect();
    let k = k_tokens.unwrap_or_else(|| tokens.clone());
    Maps::new(data, [l, h, nq, nk], tokens, k).map_err(err)
}

fn fusion(name: &str) -> PyResult<Fusion> {
    match name {
        "mean" => Ok(Fusion::Mean),
        "max" => Ok(Fusion::Max),
        "min" => Ok(Fusion::Min),
        _ => Err(err(format!("fusion: {name:?} is not mean, max or min"))),
    }
}

/// Attention rollout (Abnar & Zuidema, 2020) of self-attention maps: `[layers, N, N]`, layer
/// `l` holding the rollout through layers `0..=l` (heads fused by `fusion`, the residual added).
#[pyfunction]
#[pyo3(signature = (maps, tokens, fusion="mean"))]
fn rollout<'py>(
    py: Python<'py>,
    maps: PyReadonlyArrayDyn<'py, f32>,
    tokens: Vec<String>,
    fusion: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let m = to_maps(&maps, tokens, None)?;
    let f = self::fusion(fusion)?;
    let [l, _, n, _] = m.shape();
    let r = py.detach(|| roll::rollout(&m, f)).map_err(err)?.concat();
    PyArray1::from_vec(py, r).reshape(vec![l, n, n])
}

/// Every head's statistics (Clark et al., 2019), layer by layer: a list of dicts with layer,
/// head, entropy, distance, special, punctuation, neighbours and max. `rows` (bool, [Nq])
/// restricts them to the query rows where it is True (the non-padding tokens).
#[pyfunction]
#[pyo3(signature = (maps, tokens, k_tokens=None, rows=None))]
fn head_stats<'py>(
    py: Python<'py>,
    maps: PyReadonlyArrayDyn<'py, f32>,
    tokens: Vec<String>,
    k_tokens: Option<Vec<String>>,
    rows: Option<Vec<bool>>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let m = to_maps(&maps, tokens, k_tokens)?;
    stats::head_stats(&m, rows.as_deref())
        .into_iter()
        .map(|s| {
            let d = PyDict::new(py);
            d.set_item("layer", s.layer)?;
            d.set_item("head", s.head)?;
            d.set_item("entropy", s.entropy)?;
            d.set_item("distance", s.distance)?;
            d.set_item("special", s.special)?;
            d.set_item("punctuation", s.punctuation)?;
            d.set_item("neighbours", s.neighbours.map(|n| n.to_vec()))?;
            d.set_item("max", s.max)?;
            Ok(d)
        })
        .collect()
}

/// The offline HTML report of the maps (every view inline, no external URL): its `index.html`
/// as a string. `svgs=True` also returns each view's SVG, as `(html, {name: svg})`.
#[pyfunction]
#[pyo3(signature = (maps, tokens, title="attention", k_tokens=None, svgs=false))]
fn report<'py>(
    py: Python<'py>,
    maps: PyReadonlyArrayDyn<'py, f32>,
    tokens: Vec<String>,
    title: &str,
    k_tokens: Option<Vec<String>>,
    svgs: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let m = to_maps(&maps, tokens, k_tokens)?;
    let out = py.detach(|| Report::new(&m, title).build()).map_err(err)?;
    if !svgs {
        return Ok(out.html.into_pyobject(py)?.into_any());
    }
    let views = PyDict::new(py);
    for (name, s) in out.svgs {
        views.set_item(name, s)?;
    }
    Ok((out.html, views).into_pyobject(py)?.into_any())
}

/// One map ([Nq, Nk]) as a standalone SVG heatmap with its tokens.
#[pyfunction]
#[pyo3(signature = (map, q_tokens, k_tokens=None, title=""))]
fn heatmap_svg(
    map: PyReadonlyArrayDyn<'_, f32>,
    q_tokens: Vec<String>,
    k_tokens: Option<Vec<String>>,
    title: &str,
) -> PyResult<String> {
    let &[nq, nk] = map.shape() else {
        return Err(err(format!(
            "map: expected [Nq, Nk], got {:?}",
            map.shape()
        )));
    };
    let k = k_tokens.unwrap_or_else(|| q_tokens.clone());
    if q_tokens.len() != nq || k.len() != nk {
        return Err(err(format!(
            "tokens: {} query and {} key tokens for a {nq} × {nk} map",
            q_tokens.len(),
            k.len()
        )));
    }
    let data: Vec<f32> = map.as_array().iter().copied().collect();
    if data.iter().any(|x| !x.is_finite()) {
        return Err(err("map: weights must be finite"));
    }
    Ok(svg::heatmap(&data, (nq, nk), &q_tokens, &k, title))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rollout, m)?)?;
    m.add_function(wrap_pyfunction!(head_stats, m)?)?;
    m.add_function(wrap_pyfunction!(report, m)?)?;
    m.add_function(wrap_pyfunction!(heatmap_svg, m)?)?;
    Ok(())
}
