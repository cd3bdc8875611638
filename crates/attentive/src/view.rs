//! Strided 4-D views over borrowed slices: how tensors enter and leave the engine.
//!
//! A view is a slice plus a shape `[d0, d1, d2, d3]` and element strides. Element
//! `(a, b, c, d)` lives at `a·s0 + b·s1 + c·s2 + d·s3`. Attention tensors are read as
//! `[B, H, N, D]`; storage laid out as `[B, N, H, D]` (what a fused QKV projection produces) is the
//! same data seen with other strides, so [`View::from_bnhd`] costs nothing.

use crate::error::{AttnError, Result};

/// Largest offset a shape/stride pair reaches, plus one (0 for an empty shape).
fn extent(shape: &[usize; 4], strides: &[usize; 4]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0usize;
    for (&n, &s) in shape.iter().zip(strides) {
        last = last.checked_add((n - 1).checked_mul(s)?)?;
    }
    last.checked_add(1)
}

fn check_bounds(
    tensor: &'static str,
    len: usize,
    shape: [usize; 4],
    strides: [usize; 4],
) -> Result<()> {
    let out_of_bounds = |needed| AttnError::OutOfBounds {
        tensor,
        shape: shape.to_vec(),
        strides: strides.to_vec(),
        needed,
        len,
    };
    match extent(&shape, &strides) {
        Some(e) if e <= len => Ok(()),
        Some(e) => Err(out_of_bounds(e)),
        None => Err(out_of_bounds(usize::MAX)),
    }
}

/// Elements of a shape; `None` where their count passes `usize` (a broadcast view, whose zero
/// strides make any shape valid over a few values, can be that large).
pub(crate) fn elements(shape: [usize; 4]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x))
}

/// Whether `strides` lay `shape` out row-major without gaps (size-1 dimensions may have any
/// stride).
pub(crate) fn is_row_major(shape: [usize; 4], strides: [usize; 4]) -> bool {
    let want = contiguous_strides(shape);
    (0..4).all(|k| shape[k] <= 1 || strides[k] == want[k])
}

/// Row-major strides of a shape, saturating at `usize::MAX` where the shape is too large to be
/// stored (no slice reaches that far, so the bounds check then refuses the view).
pub fn contiguous_strides(shape: [usize; 4]) -> [usize; 4] {
    let m = |a: usize, b: usize| a.saturating_mul(b);
    [
        m(m(shape[1], shape[2]), shape[3]),
        m(shape[2], shape[3]),
        shape[3],
        1,
    ]
}

/// Row-major strides of `[B, H, N, D]` stored as `[B, N, H, D]`, saturating as
/// [`contiguous_strides`] does.
fn bnhd_strides([_, n, h, d]: [usize; 4]) -> [usize; 4] {
    let m = |a: usize, b: usize| a.saturating_mul(b);
    [m(m(n, h), d), d, m(h, d), 1]
}

/// The element count of a row-major `shape` (padded to four), or the error for a slice that
/// cannot hold it.
fn row_major_len(tensor: &'static str, len: usize, shape: [usize; 4]) -> Result<usize> {
    let need = elements(shape).ok_or_else(|| AttnError::OutOfBounds {
        tensor,
        shape: shape.to_vec(),
        strides: contiguous_strides(shape).to_vec(),
        needed: usize::MAX,
        len,
    })?;
    if len != need {
        return Err(AttnError::LengthMismatch {
            tensor,
            expected: need,
            got: len,
        });
    }
    Ok(need)
}

/// Shape of 1 to 4 dimensions, right-aligned into four with leading ones (NumPy broadcasting).
fn pad_shape(tensor: &'static str, shape: &[usize]) -> Result<[usize; 4]> {
    if shape.is_empty() || shape.len() > 4 {
        return Err(AttnError::ShapeMismatch {
            tensor,
            expected: vec![1, 1, 1, 1],
            got: shape.to_vec(),
        });
    }
    let mut out = [1; 4];
    out[4 - shape.len()..].copy_from_slice(shape);
    Ok(out)
}

/// A read-only strided 4-D view. `T` is `f32` for tensors and `bool` for masks.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T = f32> {
    data: &'a [T],
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<'a, T: Copy> View<'a, T> {
    /// A view with explicit element strides. Fails if any element lies past the slice's end.
    ///
    /// ```
    /// # use attentive::View;
    /// let data = vec![0.0f32; 2 * 3 * 4 * 5];
    /// let v = View::new(&data, [2, 3, 4, 5], [60, 20, 5, 1]).unwrap();
    /// assert_eq!(v.shape(), [2, 3, 4, 5]);
    /// assert!(View::new(&data, [2, 3, 4, 6], [60, 20, 5, 1]).is_err());
    /// ```
    pub fn new(data: &'a [T], shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        check_bounds("view", data.len(), shape, strides)?;
        Ok(Self {
            data,
            shape,
            strides,
        })
    }

    /// A row-major view of 1 to 4 dimensions; fewer than four get leading dimensions of size one,
    /// as NumPy broadcasting reads them (`[Nq, Nk]` becomes `[1, 1, Nq, Nk]`).
    pub fn contiguous(data: &'a [T], shape: &[usize]) -> Result<Self> {
        let shape = pad_shape("view", shape)?;
        row_major_len("view", data.len(), shape)?;
        Self::new(data, shape, contiguous_strides(shape))
    }

    /// A `[B, H, N, D]` view of data stored as `[B, N, H, D]`, without a copy.
    pub fn from_bnhd(data: &'a [T], [b, n, h, d]: [usize; 4]) -> Result<Self> {
        Self::new(data, [b, h, n, d], bnhd_strides([b, n, h, d]))
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }

    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Element `(a, b, c, d)`.
    ///
    /// # Panics
    /// If the index is outside the shape.
    #[inline]
    pub fn at(&self, a: usize, b: usize, c: usize, d: usize) -> T {
        assert!(a < self.shape[0] && b < self.shape[1] && c < self.shape[2] && d < self.shape[3]);
        self.data[self.offset(a, b, c, d)]
    }

    #[inline]
    pub(crate) fn offset(&self, a: usize, b: usize, c: usize, d: usize) -> usize {
        a * self.strides[0] + b * self.strides[1] + c * self.strides[2] + d * self.strides[3]
    }

    /// The same data broadcast to `target`: each dimension must equal the target's or be 1
    /// (a dimension of size 1 is repeated with stride 0).
    pub fn broadcast_to(&self, tensor: &'static str, target: [usize; 4]) -> Result<Self> {
        let mut strides = self.strides;
        for k in 0..4 {
            if self.shape[k] == target[k] {
                continue;
            }
            if self.shape[k] != 1 {
                return Err(AttnError::NotBroadcastable {
                    tensor,
                    shape: self.shape.to_vec(),
                    target: target.to_vec(),
                });
            }
            strides[k] = 0;
        }
        Ok(Self {
            data: self.data,
            shape: target,
            strides,
        })
    }

    /// Copies the view into a row-major vector, or refuses with
    /// [`AttnError::OutOfMemory`] where the copy would not fit: a broadcast view (zero strides
    /// over a few values) can stand for more elements than memory holds.
    ///
    /// ```
    /// # use attentive::View;
    /// let one = [1.0f32];
    /// let wide = View::new(&one, [1 << 20, 1 << 20, 1 << 20, 1], [0, 0, 0, 0]).unwrap();
    /// assert!(wide.try_to_vec().is_err());
    /// ```
    pub fn try_to_vec(&self) -> Result<Vec<T>> {
        let what = "copy of a view";
        let n = elements(self.shape).ok_or_else(|| AttnError::OutOfMemory {
            what,
            bytes: (self.shape.iter())
                .fold(size_of::<T>() as u128, |a, &x| a.saturating_mul(x as u128)),
            available: crate::available_memory(),
        })?;
        crate::check_memory(what, n, size_of::<T>())?;
        Ok(self.to_vec())
    }

    /// Copies the view into a row-major vector.
    ///
    /// # Panics
    /// Where the copy cannot be allocated; [`try_to_vec`](Self::try_to_vec) refuses instead.
    pub fn to_vec(&self) -> Vec<T> {
        let [s0, s1, s2, s3] = self.shape;
        let n = elements(self.shape).expect("a view's elements fit in memory");
        let mut out = Vec::with_capacity(n);
        for a in 0..s0 {
            for b in 0..s1 {
                for c in 0..s2 {
                    if self.strides[3] == 1 && s3 > 0 {
                        let at = self.offset(a, b, c, 0);
                        out.extend_from_slice(&self.data[at..at + s3]);
                        continue;
                    }
                    for d in 0..s3 {
                        out.push(self.data[self.offset(a, b, c, d)]);
                    }
                }
            }
        }
        out
    }
}

/// A writable strided 4-D view. Its strides must not make two elements share an address.
#[derive(Debug)]
pub struct ViewMut<'a> {
    data: &'a mut [f32],
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<'a> ViewMut<'a> {
    /// The elements as one row-major slice, when the view is stored so (size-1 dimensions may
    /// have any stride).
    pub(crate) fn row_major_mut(&mut self) -> Option<&mut [f32]> {
        // An output view's elements are distinct slots of its slice: their count fits.
        let len = elements(self.shape)?;
        is_row_major(self.shape, self.strides).then(|| &mut self.data[..len])
    }

    /// A writable view with explicit strides; fails if it reaches past the slice or overlaps itself.
    pub fn new(data: &'a mut [f32], shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        check_bounds("output", data.len(), shape, strides)?;
        // No two elements alias if, with dimensions sorted by stride, each stride is at least the
        // extent of all smaller ones.
        let empty = shape.contains(&0);
        let mut dims: Vec<usize> = (0..4).filter(|&k| shape[k] > 1 && !empty).collect();
        dims.sort_by_key(|&k| strides[k]);
        let mut reach = 1usize;
        for &k in &dims {
            if strides[k] < reach {
                return Err(AttnError::OverlappingOutput {
                    tensor: "output",
                    shape: shape.to_vec(),
                    strides: strides.to_vec(),
                });
            }
            // (n − 1)·s lies within the slice (checked above), so n·s is at most twice its length.
            reach = strides[k] * shape[k];
        }
        Ok(Self {
            data,
            shape,
            strides,
        })
    }

    /// A writable view whose distinct elements the caller knows to be distinct addresses (a
    /// residue class of rows, say, which the general check cannot always prove); bounds are
    /// still checked.
    pub(crate) fn new_disjoint(
        data: &'a mut [f32],
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        check_bounds("output", data.len(), shape, strides)?;
        Ok(Self {
            data,
            shape,
            strides,
        })
    }

    /// A row-major writable view of exactly `shape`.
    pub fn contiguous(data: &'a mut [f32], shape: [usize; 4]) -> Result<Self> {
        row_major_len("output", data.len(), shape)?;
        Self::new(data, shape, contiguous_strides(shape))
    }

    /// A `[B, H, N, D]` writable view of storage laid out as `[B, N, H, D]`.
    pub fn from_bnhd(data: &'a mut [f32], [b, n, h, d]: [usize; 4]) -> Result<Self> {
        Self::new(data, [b, h, n, d], bnhd_strides([b, n, h, d]))
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }

    /// Calls `f(b, h, n, row)` on every row `[b, h, n, :]` as a contiguous slice (a copy, written
    /// back, when the last stride is not 1).
    pub fn for_each_row(&mut self, mut f: impl FnMut(usize, usize, usize, &mut [f32])) {
        let [nb, nh, nn, d] = self.shape;
        let st = self.strides;
        let mut tmp = vec![0.0f32; d];
        for b in 0..nb {
            for h in 0..nh {
                for n in 0..nn {
                    let o = b * st[0] + h * st[1] + n * st[2];
                    if st[3] == 1 {
                        f(b, h, n, &mut self.data[o..o + d]);
                    } else {
                        for (c, x) in tmp.iter_mut().enumerate() {
                            *x = self.data[o + c * st[3]];
                        }
                        f(b, h, n, &mut tmp);
                        for (c, x) in tmp.iter().enumerate() {
                            self.data[o + c * st[3]] = *x;
                        }
                    }
                }
            }
        }
    }

    /// A read-only view of the same elements.
    pub fn as_view(&self) -> View<'_, f32> {
        View {
            data: self.data,
            shape: self.shape,
            strides: self.strides,
        }
    }

    /// Rows `first + c + n·t` (c < `g`, t < `rows`) of batch entry `b`, heads `h0..h0 + hc`,
    /// as a `[g, hc, rows, D]` view: the residue classes `first..first + g` (mod `n ≥ g`).
    pub(crate) fn fold_rows(
        &mut self,
        b: usize,
        (h0, hc): (usize, usize),
        (first, g, n, rows): (usize, usize, usize, usize),
    ) -> Result<ViewMut<'_>> {
        let s = self.strides;
        let at = b * s[0] + h0 * s[1] + first * s[2];
        let d = self.shape[3];
        let data = self.data.get_mut(at..).unwrap_or_default();
        // Distinct (c, t) give distinct rows first + c + n·t because g ≤ n.
        debug_assert!(g <= n);
        ViewMut::new_disjoint(data, [g, hc, rows, d], [s[2], s[1], s[2] * n, s[3]])
    }

    pub(crate) fn raw(&mut self) -> RawOut {
        RawOut {
            ptr: self.data.as_mut_ptr(),
            strides: self.strides,
        }
    }
}

/// A raw handle on a validated output, shared by the threads that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct RawOut {
    ptr: *mut f32,
    strides: [usize; 4],
}

// SAFETY: a RawOut is only created from a `&mut` view that outlives the parallel region, and the
// kernels hand each element to exactly one task, so no two threads write the same address.
unsafe impl Send for RawOut {}
unsafe impl Sync for RawOut {}

impl RawOut {
    /// Writes `row` to elements `(a, b, c, 0..row.len())`.
    ///
    /// # Safety
    /// The index must be inside the validated shape and no other thread may write that row.
    #[inline]
    pub(crate) unsafe fn write_row(&self, a: usize, b: usize, c: usize, row: &[f32]) {
        let s = self.strides;
        let base = self.ptr.add(a * s[0] + b * s[1] + c * s[2]);
        if s[3] == 1 {
            std::ptr::copy_nonoverlapping(row.as_ptr(), base, row.len());
        } else {
            for (d, &x) in row.iter().enumerate() {
                *base.add(d * s[3]) = x;
            }
        }
    }
}

/// A raw handle on a validated flat output (such as the log-sum-exp), shared like [`RawOut`].
#[derive(Clone, Copy)]
pub(crate) struct RawSlice {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: as for RawOut: created from a `&mut [f32]` that outlives the parallel region, and each
// element is written by exactly one task.
unsafe impl Send for RawSlice {}
unsafe impl Sync for RawSlice {}

impl RawSlice {
    pub(crate) fn new(s: &mut [f32]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// Writes `src` at `start..start + src.len()`.
    ///
    /// # Safety
    /// No other thread may write that range.
    #[inline]
    pub(crate) unsafe fn write(&self, start: usize, src: &[f32]) {
        assert!(start + src.len() <= self.len);
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(start), src.len());
    }

    /// The elements `start..start + len`, borrowed mutably.
    ///
    /// # Safety
    /// No other thread may touch that range while the borrow lives.
    // A shared handle that hands out disjoint mutable ranges is this type's purpose; the
    // disjointness is the caller's obligation, stated under Safety.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub(crate) unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}
