//! `attentive._attentive`: the engine's calls on NumPy arrays, for the Python package
//! (`python/attentive`), which adds PyTorch, flash-attn's call shape and HF transformers on top.
//!
//! Every array is read where it lies: a float32 array of any non-negative strides becomes an
//! engine [`View`] over its own buffer, and each output is allocated once (on 2 MiB pages where
//! it spans one) as the memory of a NumPy array that the kernel writes into. The kernel runs with the GIL released. Every engine error becomes
//! `attentive.AttentionError`, a `ValueError` carrying the engine's message.

use attentive::{Causal, HugeVec, Isa, Options, Pattern, View, ViewMut};
use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::{
    Element, PyArray1, PyArray4, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

mod variants;
mod viz;

create_exception!(
    _attentive,
    AttentionError,
    PyValueError,
    "Bad input to an attention call: the engine's message says which tensor and why."
);

/// A float32 NumPy array of any rank.
pub(crate) type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

/// The engine's error as a Python exception.
pub(crate) fn err(e: impl std::fmt::Display) -> PyErr {
    AttentionError::new_err(e.to_string())
}

/// The strides of `a` in elements, when none is negative; the shape and strides right-aligned
/// into four dimensions (missing leading ones of size 1).
fn layout<T>(name: &str, a: &ArrayViewD<T>, exact4: bool) -> PyResult<([usize; 4], [usize; 4])> {
    let nd = a.ndim();
    if (exact4 && nd != 4) || nd == 0 || nd > 4 {
        let want = if exact4 {
            "4 dimensions"
        } else {
            "1 to 4 dimensions"
        };
        return Err(err(format!(
            "{name}: expected {want}, got shape {:?}",
            a.shape()
        )));
    }
    let (mut shape, mut strides) = ([1usize; 4], [0usize; 4]);
    for (k, (&n, &s)) in a.shape().iter().zip(a.strides()).enumerate() {
        if s < 0 {
            return Err(err(format!(
                "{name}: negative strides {:?} (pass a copy, e.g. np.ascontiguousarray)",
                a.strides()
            )));
        }
        shape[4 - nd + k] = n;
        strides[4 - nd + k] = s as usize;
    }
    Ok((shape, strides))
}

/// A strided view of `a` over its own buffer (no copy).
pub(crate) fn view<'a, T: Element + Copy>(
    name: &str,
    a: &'a PyReadonlyArrayDyn<T>,
    exact4: bool,
) -> PyResult<View<'a, T>> {
    let arr = a.as_array();
    let (shape, strides) = layout(name, &arr, exact4)?;
    let len = if shape.contains(&0) {
        0
    } else {
        1 + (0..4).map(|k| (shape[k] - 1) * strides[k]).sum::<usize>()
    };
    // SAFETY: NumPy guarantees every element of the array lies in its buffer; with non-negative
    // strides the first element is at the data pointer and the last `len − 1` elements further,
    // so the slice covers exactly the span from the first element to the last. The array stays
    // borrowed (read-only) for the slice's lifetime.
    let data = unsafe { std::slice::from_raw_parts(arr.as_ptr(), len) };
    View::new(data, shape, strides).map_err(|e| err(format!("{name}: {e}")))
}

/// The memory of an output array: a [`HugeVec`], on 2 MiB pages where it spans one.
///
/// A fresh output on 4 KiB pages is mapped page by page as the kernel writes it: measured on an
/// Intel Xeon, 2 threads (32 query heads over 8, N = 2048, D = 128, a 32 MiB output), the
/// forward took 213–219 ms writing into a kept buffer, 235–247 ms into a fresh `Vec` and
/// 223–224 ms into a fresh `HugeVec`. So a buffer of 2 MiB or more is not freed when its array
/// dies but kept in [`SPARE`] for the next output of the same length (a training loop asks for
/// the same shapes at every step).
#[pyclass(frozen, module = "attentive")]
struct HugeBuffer {
    ptr: *mut f32,
    data: Option<HugeVec<f32>>,
}
// SAFETY: the buffer owns its memory as a Vec does; `ptr` points into it and is read and written
// only through the NumPy array whose base object this is.
unsafe impl Send for HugeBuffer {}
// SAFETY: as above; the struct itself is never written after it is made.
unsafe impl Sync for HugeBuffer {}

/// Bytes of a transparent huge page: smaller outputs come from malloc's free lists anyway.
const HUGE_PAGE: usize = 2 << 20;

/// Most bytes of dead outputs kept for reuse: the outputs and gradients of one attention call
/// of 32 heads, N = 2048, D = 128 (32 MiB each for O and dQ, 8 MiB each for dK and dV of 8
/// key/value heads) fit twice. The oldest go first when a new one would pass it.
const SPARE_BYTES: usize = 160 << 20;

/// Dead outputs of 2 MiB or more, most recent last, with their total bytes.
static SPARE: std::sync::Mutex<(Vec<HugeVec<f32>>, usize)> = std::sync::Mutex::new((Vec::new(), 0));

fn spare() -> std::sync::MutexGuard<'static, (Vec<HugeVec<f32>>, usize)> {
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for HugeBuffer {
    fn drop(&mut self) {
        let Some(data) = self.data.take() else { return };
        let bytes = std::mem::size_of_val(&data[..]);
        if !(HUGE_PAGE..=SPARE_BYTES).contains(&bytes) {
            return;
        }
        let mut spare = spare();
        spare.1 += bytes;
        spare.0.push(data);
        while spare.1 > SPARE_BYTES {
            let old = spare.0.remove(0);
            spare.1 -= std::mem::size_of_val(&old[..]);
        }
    }
}

/// A float32 array of `shape` for the kernel to overwrite, its memory a [`HugeBuffer`]: a kept
/// one of the same length, holding an earlier output's values, or a fresh zeroed one. Only for
/// outputs the engine writes in full (its tests fill them with NaN first and check every
/// element).
pub(crate) fn output<'py>(py: Python<'py>, shape: &[usize]) -> PyResult<Array<'py>> {
    let len = shape.iter().product::<usize>();
    let kept = {
        let mut spare = spare();
        let at = spare.0.iter().rposition(|b| b.len() == len);
        at.map(|at| {
            let b = spare.0.remove(at);
            spare.1 -= std::mem::size_of_val(&b[..]);
            b
        })
    };
    let data = match kept {
        Some(b) => b,
        None => HugeVec::<f32>::zeroed(len).map_err(err)?,
    };
    wrap(py, shape, data)
}

/// A fresh zeroed float32 array of `shape`, its memory a [`HugeBuffer`].
pub(crate) fn zeros<'py>(py: Python<'py>, shape: &[usize]) -> PyResult<Array<'py>> {
    let len = shape.iter().product::<usize>();
    wrap(py, shape, HugeVec::<f32>::zeroed(len).map_err(err)?)
}

/// `data` as a NumPy array of `shape` (`data.len()` elements) that owns it.
fn wrap<'py>(py: Python<'py>, shape: &[usize], mut data: HugeVec<f32>) -> PyResult<Array<'py>> {
    let ptr = data.as_mut_ptr();
    let owner = Bound::new(py, HugeBuffer { ptr, data: Some(data) })?;
    // SAFETY: `ptr` holds `shape`'s product of initialised floats owned by `owner`, which
    // becomes the array's base object and so outlives it.
    let view = unsafe { ArrayViewD::from_shape_ptr(IxDyn(shape), owner.get().ptr.cast_const()) };
    // SAFETY: as above: `owner` owns the memory `view` points to and is never reallocated.
    Ok(unsafe { PyArrayDyn::borrow_from_array(&view, owner.into_any()) })
}

/// The shape an output of `[B, H, N, D]` is allocated in: as is, or `[B, N, H, D]`.
fn layout_of([b, h, n, d]: [usize; 4], bnhd: bool) -> [usize; 4] {
    if bnhd {
        [b, n, h, d]
    } else {
        [b, h, n, d]
    }
}

/// The `[B, H, N, D]` view the kernel writes of an output allocated by [`layout_of`].
fn out_view(data: &mut [f32], shape: [usize; 4], bnhd: bool) -> attentive::Result<ViewMut<'_>> {
    let [b, h, n, d] = shape;
    if bnhd {
        ViewMut::from_bnhd(data, [b, n, h, d])
    } else {
        ViewMut::contiguous(data, shape)
    }
}

/// A raw pointer the closure run without the GIL may carry (the arrays it points into outlive
/// the call and no Python code can reach them meanwhile: they are fresh outputs).
pub(crate) struct Out(*mut f32, usize);
// SAFETY: the pointer is used by one call at a time, on a buffer no other thread touches.
unsafe impl Send for Out {}

impl Out {
    pub(crate) fn of(a: &Bound<PyArrayDyn<f32>>) -> Out {
        Out(a.data(), a.len())
    }
    /// # Safety
    /// The array behind the pointer is alive and not aliased.
    pub(crate) unsafe fn slice<'a>(&self) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

fn parse_isa(s: &str) -> PyResult<Isa> {
    match s {
        "amx" => Ok(Isa::Amx),
        "avx512" => Ok(Isa::Avx512),
        "avx2" => Ok(Isa::Avx2),
        "scalar" => Ok(Isa::Scalar),
        _ => Err(err(format!(
            "isa: {s:?} is not one of amx, avx512, avx2, scalar"
        ))),
    }
}

/// The instruction sets this CPU runs, fastest first.
#[pyfunction]
fn instruction_sets() -> Vec<&'static str> {
    Isa::all_available()
        .into_iter()
        .map(|i| match i {
            Isa::Amx => "amx",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        })
        .collect()
}

/// A structured pattern tabulated per tile for `batch × heads` problems of `nq` queries and `nk`
/// keys: build once, pass as `block_mask=` to every call of that shape.
#[pyclass(frozen, module = "attentive")]
struct BlockMask {
    inner: attentive::BlockMask,
    pattern: String,
}

#[pymethods]
impl BlockMask {
    #[new]
    #[pyo3(signature = (pattern, nq, nk, batch=1, heads=1))]
    fn new(pattern: &str, nq: usize, nk: usize, batch: usize, heads: usize) -> PyResult<Self> {
        let p: Pattern = pattern.parse().map_err(err)?;
        let inner = attentive::BlockMask::new(&p, batch, heads, nq, nk).map_err(err)?;
        Ok(Self {
            inner,
            pattern: pattern.to_string(),
        })
    }

    /// Whether query `i` sees key `j` in batch `b`, head `h`.
    #[pyo3(signature = (i, j, b=0, h=0))]
    fn visible(&self, i: usize, j: usize, b: usize, h: usize) -> bool {
        self.inner.visible(b, h, i, j)
    }

    /// Tiles kept whole, kept in part, and skipped: `(full, partial, empty)`.
    fn counts(&self) -> (usize, usize, usize) {
        let c = self.inner.counts();
        (c.full, c.partial, c.empty)
    }

    fn __repr__(&self) -> String {
        format!("BlockMask({:?})", self.pattern)
    }
}

/// The options of one call, as Python passed them; [`Opts::options`] borrows them as the engine's.
struct Opts<'py> {
    scale: Option<f32>,
    causal: Option<Causal>,
    window: Option<(usize, usize)>,
    softcap: Option<f32>,
    alibi: Option<PyReadonlyArray1<'py, f32>>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    bias: Option<PyReadonlyArrayDyn<'py, f32>>,
    docs: Option<(PyReadonlyArray1<'py, u32>, PyReadonlyArray1<'py, u32>)>,
    pattern: Option<Pattern>,
    block_mask: Option<Bound<'py, BlockMask>>,
    dropout: Option<(f32, u64)>,
    isa: Option<Isa>,
}

/// The option names a call takes, as `attentive.attention` passes them.
const OPTION_NAMES: [&str; 13] = [
    "scale",
    "causal",
    "window",
    "softcap",
    "alibi",
    "mask",
    "bias",
    "docs",
    "pattern",
    "block_mask",
    "dropout",
    "seed",
    "isa",
];

impl<'py> Opts<'py> {
    /// The options in `d` (names as [`OPTION_NAMES`]; a missing or None entry is unset).
    fn from_dict(d: Option<&Bound<'py, PyDict>>) -> PyResult<Self> {
        fn get<'py, T: FromPyObjectOwned<'py>>(
            d: Option<&Bound<'py, PyDict>>,
            name: &str,
        ) -> PyResult<Option<T>> {
            match d.map(|d| d.get_item(name)).transpose()?.flatten() {
                Some(x) if !x.is_none() => match x.extract::<T>() {
                    Ok(v) => Ok(Some(v)),
                    Err(e) => {
                        let e: PyErr = e.into();
                        Err(PyTypeError::new_err(format!("{name}: {}", e.value(x.py()))))
                    }
                },
                _ => Ok(None),
            }
        }
        if let Some(d) = d {
            for key in d.keys() {
                let k: String = key.extract()?;
                if !OPTION_NAMES.contains(&k.as_str()) {
                    return Err(err(format!("unknown option {k:?}")));
                }
            }
        }
        let causal = match get::<String>(d, "causal")?.as_deref() {
            None => None,
            Some("top-left") => Some(Causal::TopLeft),
            Some("bottom-right") => Some(Causal::BottomRight),
            Some(c) => {
                return Err(err(format!(
                    "causal: {c:?} is not \"top-left\" or \"bottom-right\""
                )))
            }
        };
        // A negative side is open, as flash-attn's window_size=(-1, -1).
        let side = |x: i64| usize::try_from(x).unwrap_or(usize::MAX);
        let window: Option<(i64, i64)> = get(d, "window")?;
        let dropout: f32 = get(d, "dropout")?.unwrap_or(0.0);
        let seed: u64 = get(d, "seed")?.unwrap_or(0);
        Ok(Self {
            scale: get(d, "scale")?,
            causal,
            window: window.map(|(l, r)| (side(l), side(r))),
            softcap: get(d, "softcap")?,
            alibi: get(d, "alibi")?,
            mask: get(d, "mask")?,
            bias: get(d, "bias")?,
            docs: get(d, "docs")?,
            pattern: get::<String>(d, "pattern")?
                .map(|p| p.parse::<Pattern>())
                .transpose()
                .map_err(err)?,
            block_mask: get(d, "block_mask")?,
            dropout: (dropout != 0.0).then_some((dropout, seed)),
            isa: get::<String>(d, "isa")?
                .as_deref()
                .map(parse_isa)
                .transpose()?,
        })
    }

    /// The engine's options, borrowing the arrays.
    fn options(&self) -> PyResult<Options<'_>> {
        let mut o = Options::new();
        o.scale = self.scale;
        o.causal = self.causal;
        if let Some((l, r)) = self.window {
            o = o.window(l, r);
        }
        o.softcap = self.softcap;
        if let Some(a) = &self.alibi {
            o.alibi_slopes = Some(slice1("alibi_slopes", a)?);
        }
        if let Some(m) = &self.mask {
            o.mask = Some(view("attn_mask", m, false)?);
        }
        if let Some(b) = &self.bias {
            o.bias = Some(view("attn_mask", b, false)?);
        }
        if let Some((q, k)) = &self.docs {
            o = o.docs(slice1("docs", q)?, slice1("docs", k)?);
        }
        o.pattern = self.pattern.as_ref();
        o.block_mask = self.block_mask.as_ref().map(|b| &b.get().inner);
        if let Some((p, seed)) = self.dropout {
            o = o.dropout(p, seed);
        }
        o.isa = self.isa;
        Ok(o)
    }
}

/// A 1-D array's elements, which must be contiguous.
fn slice1<'a, T: Element>(name: &str, a: &'a PyReadonlyArray1<T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| err(format!("{name}: expected a contiguous array")))
}

/// Keys and values as the forward reads them: float32, or float16 (a half-precision KV cache).
enum Kv<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, attentive::f16>),
}

impl<'py> Kv<'py> {
    fn extract(name: &str, x: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = x.extract::<PyReadonlyArrayDyn<f32>>() {
            return Ok(Kv::F32(a));
        }
        if let Ok(a) = x.extract::<PyReadonlyArrayDyn<attentive::f16>>() {
            return Ok(Kv::F16(a));
        }
        Err(PyTypeError::new_err(format!(
            "{name}: expected a float32 (or, for k and v, float16) NumPy array, got {}",
            describe(x)
        )))
    }
}

fn describe(x: &Bound<PyAny>) -> String {
    match x.getattr("dtype") {
        Ok(d) => format!("{} of dtype {d}", x.get_type()),
        Err(_) => x.get_type().to_string(),
    }
}

pub(crate) fn f32_array<'py>(
    name: &str,
    x: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    x.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name}: expected a float32 NumPy array, got {}",
            describe(x)
        ))
    })
}

/// Exact attention: `(o [B, Hq, Nq, Dv], lse [B, Hq, Nq])`; `out_bnhd` allocates `o` as
/// `[B, Nq, Hq, Dv]` instead. `k` and `v` may be float16.
#[pyfunction]
#[pyo3(signature = (q, k, v, opts=None, *, out_bnhd=false))]
fn forward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
    out_bnhd: bool,
) -> PyResult<(Array<'py>, Array<'py>)> {
    let opts = Opts::from_dict(opts)?;
    let q = f32_array("q", q)?;
    let (k, v) = (Kv::extract("k", k)?, Kv::extract("v", v)?);
    let qv = view("q", &q, true)?;
    let [b, hq, nq, _] = qv.shape();
    let dv = match &v {
        Kv::F32(a) => a.shape(),
        Kv::F16(a) => a.shape(),
    }
    .last()
    .copied()
    .unwrap_or(0);
    let shape = [b, hq, nq, dv];
    let o = output(py, &layout_of(shape, out_bnhd))?;
    let lse = output(py, &[b, hq, nq])?;
    let (po, pl) = (Out::of(&o), Out::of(&lse));
    let options = opts.options()?;
    // The forward on either K/V type, without the GIL, into o and lse.
    let run = move |f: &(dyn Fn(&mut ViewMut, &mut [f32]) -> attentive::Result<()> + Sync)| {
        py.detach(move || {
            on_threads(move || {
                // SAFETY: o and lse are fresh arrays held above for the whole call.
                let (os, ls) = unsafe { (po.slice(), pl.slice()) };
                f(&mut out_view(os, shape, out_bnhd)?, ls)
            })
        })
    };
    let run = match (&k, &v) {
        (Kv::F32(k), Kv::F32(v)) => {
            let (kv, vv) = (view("k", k, true)?, view("v", v, true)?);
            run(&|out, ls| attentive::forward(qv, kv, vv, &options, out, Some(ls)))
        }
        (Kv::F16(k), Kv::F16(v)) => {
            let (kv, vv) = (view("k", k, true)?, view("v", v, true)?);
            run(&|out, ls| attentive::forward_half_kv(qv, kv, vv, &options, out, Some(ls)))
        }
        _ => {
            return Err(PyTypeError::new_err(
                "k and v: both float32 or both float16",
            ))
        }
    };
    run.map_err(err)?;
    Ok((o, lse))
}

/// Gradients `(dq, dk, dv)` of attention from the forward's output `o` and `lse`, given `d_o`,
/// with the options the forward ran with; `grads_bnhd` allocates them as `[B, N, H, D]`.
#[pyfunction]
#[pyo3(signature = (q, k, v, o, lse, d_o, opts=None, *, grads_bnhd=false))]
#[allow(clippy::too_many_arguments)]
fn backward<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    o: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    d_o: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
    grads_bnhd: bool,
) -> PyResult<(Array<'py>, Array<'py>, Array<'py>)> {
    let opts = Opts::from_dict(opts)?;
    let arrays = [
        f32_array("q", q)?,
        f32_array("k", k)?,
        f32_array("v", v)?,
        f32_array("o", o)?,
        f32_array("d_o", d_o)?,
    ];
    let lse = f32_array("lse", lse)?;
    let lse_s = lse.as_slice().map_err(|_| err("lse: not contiguous"))?;
    let [qv, kv, vv, ov, dov] = [
        view("q", &arrays[0], true)?,
        view("k", &arrays[1], true)?,
        view("v", &arrays[2], true)?,
        view("o", &arrays[3], true)?,
        view("d_o", &arrays[4], true)?,
    ];
    let (sq, sk, sv) = (qv.shape(), kv.shape(), vv.shape());
    let dq = output(py, &layout_of(sq, grads_bnhd))?;
    let dk = output(py, &layout_of(sk, grads_bnhd))?;
    let dvv = output(py, &layout_of(sv, grads_bnhd))?;
    let (pq, pk, pv) = (Out::of(&dq), Out::of(&dk), Out::of(&dvv));
    let options = opts.options()?;
    py.detach(move || {
        on_threads(move || {
            // SAFETY: dq, dk and dv are fresh arrays held above for the whole call.
            let (a, b, c) = unsafe { (pq.slice(), pk.slice(), pv.slice()) };
            attentive::backward(
                qv,
                kv,
                vv,
                ov,
                lse_s,
                dov,
                &options,
                &mut out_view(a, sq, grads_bnhd)?,
                &mut out_view(b, sk, grads_bnhd)?,
                &mut out_view(c, sv, grads_bnhd)?,
            )
        })
    })
    .map_err(err)?;
    Ok((dq, dk, dvv))
}

/// The attention weights themselves, `[B, Hq, Nq, Nk]` (0 where a key is masked).
#[pyfunction]
#[pyo3(signature = (q, k, opts=None))]
fn probabilities<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyArray4<f32>>> {
    let opts = Opts::from_dict(opts)?;
    let (q, k) = (f32_array("q", q)?, f32_array("k", k)?);
    let (qv, kv) = (view("q", &q, true)?, view("k", &k, true)?);
    let options = opts.options()?;
    let [b, hq, nq, _] = qv.shape();
    let nk = kv.shape()[2];
    let p = py
        .detach(move || on_threads(move || attentive::probabilities(qv, kv, &options)))
        .map_err(err)?;
    PyArray1::from_vec(py, p)
        .reshape([b, hq, nq, nk])
        .map_err(|e| err(e.to_string()))
}

/// Merges attention over two disjoint key sets: `(o, lse)` of their union, from each part's
/// output and log-sum-exp (the same shapes).
#[pyfunction]
fn merge<'py>(
    py: Python<'py>,
    o1: PyReadonlyArrayDyn<'py, f32>,
    lse1: PyReadonlyArrayDyn<'py, f32>,
    o2: PyReadonlyArrayDyn<'py, f32>,
    lse2: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<(Array<'py>, Array<'py>)> {
    if o1.shape() != o2.shape() || lse1.shape() != lse2.shape() {
        return Err(err(format!(
            "merge: shapes differ: o {:?} and {:?}, lse {:?} and {:?}",
            o1.shape(),
            o2.shape(),
            lse1.shape(),
            lse2.shape()
        )));
    }
    let copy = |a: &PyReadonlyArrayDyn<f32>| {
        PyArrayDyn::from_owned_array(py, a.as_array().as_standard_layout().into_owned())
    };
    let (o, lse) = (copy(&o1), copy(&lse1));
    let o2c = o2.as_array().as_standard_layout().into_owned();
    let l2c = lse2.as_array().as_standard_layout().into_owned();
    {
        let mut ow = o.readwrite();
        let mut lw = lse.readwrite();
        let (os, ls) = (
            ow.as_slice_mut().map_err(err)?,
            lw.as_slice_mut().map_err(err)?,
        );
        let (o2s, l2s) = (o2c.as_slice().unwrap_or(&[]), l2c.as_slice().unwrap_or(&[]));
        attentive::merge(os, ls, o2s, l2s).map_err(err)?;
    }
    Ok((o, lse))
}

/// Threads each calling Python thread runs its kernels on; 0: rayon's global pool (one thread
/// per core, or `RAYON_NUM_THREADS`), shared by every caller.
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This Python thread's own pools, by thread count, when [`THREADS`] asks for one. The
    /// first counts the calling thread itself as its worker 0, so a call runs on the calling
    /// thread with n − 1 helpers instead of being handed to a pool thread and back: that
    /// hand-over cost about 20 µs a call (a 1×1×1×8 forward from Python: 23 µs against 2 µs,
    /// Intel Xeon, 2 threads). rayon lets a thread belong to one pool only, so pools of other
    /// sizes built later by the same thread take the call over as before.
    static POOLS: RefCell<Vec<(usize, rayon::ThreadPool)>> = const { RefCell::new(Vec::new()) };
}

/// A pool of rayon's default size for threads that set [`THREADS`] back to 0 after joining a
/// pool of their own (rayon would otherwise run their calls on that pool); `None` if the
/// system refused the threads.
fn shared_pool() -> Option<&'static rayon::ThreadPool> {
    static SHARED: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| rayon::ThreadPoolBuilder::new().build().ok())
        .as_ref()
}

/// Runs `f` (a kernel call, without the GIL) on the calling thread's share of threads.
pub(crate) fn on_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let n = THREADS.load(Ordering::Relaxed);
    POOLS.with_borrow_mut(|pools| {
        if n == 0 {
            return match shared_pool().filter(|_| !pools.is_empty()) {
                Some(p) => p.install(f),
                None => f(),
            };
        }
        if !pools.iter().any(|(m, _)| *m == n) {
            let builder = rayon::ThreadPoolBuilder::new().num_threads(n);
            let builder = if pools.is_empty() {
                builder.use_current_thread()
            } else {
                builder
            };
            match builder.build() {
                Ok(p) => pools.push((n, p)),
                Err(_) => return f(),
            }
        }
        let (_, p) = pools.iter().find(|(m, _)| *m == n).expect("built above");
        p.install(f)
    })
}

/// Sets how many threads each Python thread's attention calls run on: `n` threads of its own,
/// the calling thread among them (two Python threads calling at once then use 2n), or 0 for one
/// shared pool of one thread per core (the default). Returns True.
#[pyfunction]
fn set_num_threads(n: usize) -> bool {
    THREADS.store(n, Ordering::Relaxed);
    true
}

/// How many threads a call from this Python thread runs on.
#[pyfunction]
fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => match shared_pool().filter(|_| POOLS.with_borrow(|p| !p.is_empty())) {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        },
        n => n,
    }
}

#[pymodule]
fn _attentive(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("AttentionError", m.py().get_type::<AttentionError>())?;
    m.add_class::<BlockMask>()?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(probabilities, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(instruction_sets, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    variants::register(m)?;
    viz::register(m)?;
    Ok(())
}
