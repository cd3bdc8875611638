//! Scratch memory: buffers aligned to cache lines, and large ones reused from call to call.
//!
//! Every kernel buffer is an [`AVec`], whose first element starts a 64-byte cache line: a
//! 512-bit load that straddles two lines costs two loads, and on cores with two 512-bit FMA
//! ports (Intel Xeon) the micro-kernel measured 195 GFLOP/s on aligned operands, 173 at 32
//! bytes off and 131 at 16 bytes off, which is where the system allocator puts large blocks.
//!
//! A fresh allocation of many megabytes comes from the operating system as untouched pages, and
//! the first write to each 4 KiB page costs a page fault and a page clear: for a sliding-window
//! forward at N = 16384 the packed Kᵀ alone (32 MiB) spent a tenth of the call there. Buffers
//! taken here go back to a small process-wide pool when dropped, so repeated calls (every layer,
//! every step) touch memory that is already mapped.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Most buffers the pool keeps; a call holds at most three at a time (the residue path: the
/// band's output for a chunk of heads, the decode path's partials and the packed Kᵀ of the
/// part running).
const KEEP: usize = 4;

static POOL: Mutex<Vec<AVec>> = Mutex::new(Vec::new());

/// One cache line of floats: the unit an [`AVec`] allocates in.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; LINE]);

/// Floats per 64-byte cache line.
const LINE: usize = 16;

/// A growable `f32` buffer whose first element is 64-byte aligned.
#[derive(Clone, Default)]
pub(crate) struct AVec {
    lines: Vec<Line>,
    len: usize,
}

impl AVec {
    /// `len` copies of `x`.
    pub fn filled(len: usize, x: f32) -> Self {
        let mut v = Self::default();
        v.resize(len, x);
        v
    }

    /// Sets the length to `len`; elements past the old length are `x`.
    pub fn resize(&mut self, len: usize, x: f32) {
        let old = self.len;
        self.lines.resize(len.div_ceil(LINE), Line([0.0; LINE]));
        self.len = len;
        if len > old {
            self[old..].fill(x);
        }
    }

    /// Elements the buffer holds without reallocating.
    pub fn capacity(&self) -> usize {
        self.lines.capacity() * LINE
    }
}

impl Deref for AVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` initialised floats (repr(C) arrays of f32).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl DerefMut for AVec {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// A buffer of `f32` on loan from the pool; its contents are whatever the last user left.
pub(crate) struct Buffer(AVec);

impl Buffer {
    /// A buffer of `len` elements with unspecified contents: the caller writes before it reads.
    pub fn uninit(len: usize) -> Self {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest kept buffer that is large enough, else the largest one (grown below).
        let pick = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .or_else(|| pool.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
            .map(|(n, _)| n);
        let mut v = pick.map(|n| pool.swap_remove(n)).unwrap_or_default();
        drop(pool);
        v.resize(len, 0.0);
        Buffer(v)
    }

    /// A buffer of `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::uninit(len);
        b.0.fill(0.0);
        b
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(std::mem::take(&mut self.0));
        if pool.len() > KEEP {
            // Keep the largest ones: they serve every smaller request.
            let smallest = (0..pool.len())
                .min_by_key(|&n| pool[n].capacity())
                .expect("non-empty");
            pool.swap_remove(smallest);
        }
    }
}

impl Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}
