//! Memory: buffers aligned to cache lines, large ones reused from call to call, and
//! [`HugeVec`], on huge pages, for large inputs.
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
        let n = len.div_ceil(LINE);
        // A buffer of several huge pages (a packed Kᵀ or V copy, the backward's partials) is
        // advised onto them before its first write, as `HugeVec` is: GQA forward Hq=32 Hkv=8
        // N=2048 D=128 271.9 → 268.6 ms and causal N=4096 D=64 74.4 → 71.0 ms on the Xeon
        // (medians of 8 and 6, alternating; faster in 7 of 8 and 5 of 6 pairs).
        if n > self.lines.capacity() && n * 64 >= 2 * HUGE_PAGE {
            self.lines.reserve_exact(n - self.lines.len());
            advise_huge(self.lines.as_mut_ptr().cast(), self.lines.capacity() * 64);
        }
        self.lines.resize(n, Line([0.0; LINE]));
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

/// Per-thread scratch kept between calls: rayon runs a task's `init` for every piece of work
/// it splits off, and a fresh scratch is a few hundred KiB allocated and zeroed (with AMX, the
/// forward's page faults took 2.75% of its time at D = 128). `fits` is what a kept one was
/// sized for; at most [`POOLED_PER_THREAD`] per thread are kept.
pub(crate) struct Pool<T, K> {
    kept: Mutex<Vec<(K, T)>>,
}

/// Scratches a [`Pool`] keeps per thread of the current pool.
const POOLED_PER_THREAD: usize = 2;

/// A scratch from a [`Pool`], returned to it when dropped.
pub(crate) struct Pooled<'p, T, K> {
    pool: &'p Pool<T, K>,
    item: Option<(K, T)>,
}

impl<T, K: PartialEq> Pool<T, K> {
    pub const fn new() -> Self {
        Self {
            kept: Mutex::new(Vec::new()),
        }
    }

    /// A kept scratch sized for `fits`, or `make()`.
    pub fn take(&self, fits: K, make: impl FnOnce() -> T) -> Pooled<'_, T, K> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let found = kept
            .iter()
            .position(|(k, _)| *k == fits)
            .map(|i| kept.swap_remove(i));
        drop(kept);
        Pooled {
            pool: self,
            item: Some(found.unwrap_or_else(|| (fits, make()))),
        }
    }
}

impl<T, K> Pooled<'_, T, K> {
    /// Drops the scratch instead of returning it to the pool.
    pub fn discard(mut self) {
        self.item = None;
    }
}

impl<T, K> Deref for Pooled<'_, T, K> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item.as_ref().expect("taken only on drop").1
    }
}

impl<T, K> DerefMut for Pooled<'_, T, K> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.item.as_mut().expect("taken only on drop").1
    }
}

impl<T, K> Drop for Pooled<'_, T, K> {
    fn drop(&mut self) {
        let mut kept = self.pool.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < POOLED_PER_THREAD * rayon::current_num_threads() {
            kept.extend(self.item.take());
        }
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

/// Bytes of one transparent huge page on x86-64 and most aarch64 Linux systems.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// A fixed-length buffer for large inputs, a KV cache above all, placed on 2 MiB pages where the
/// operating system offers them.
///
/// Decoding reads all of K and V once per token, so its speed is the memory's read rate. On
/// 4 KiB pages every page is a new TLB entry and a point where the hardware prefetcher stops,
/// and a stream slows at each; on 2 MiB pages it does not. Measured on an Intel Xeon, 2 threads
/// (1 query, 32 heads, 32768 keys, D = 128, K and V 1 GiB together): 56.1 ms with K and V in a
/// `Vec`, 47.1 ms in a `HugeVec` (median of 6, alternating). NumPy and PyTorch advise the kernel
/// the same way for their large arrays.
///
/// Buffers of 2 MiB or more start on a 2 MiB boundary and, on Linux, are advised as
/// `MADV_HUGEPAGE`, which transparent huge pages honour in both their `always` and `madvise`
/// modes; smaller ones start on a 64-byte cache line. Elsewhere, or where the kernel declines,
/// the pages are ordinary and the buffer still works.
///
/// ```
/// use attentive::{forward, HugeVec, Options, View, ViewMut};
/// let (h, n, d) = (4, 4096, 64);
/// // A KV cache: allocate once, write each token's keys and values into it.
/// let mut k = HugeVec::<f32>::zeroed(h * n * d)?;
/// let mut v = HugeVec::<f32>::zeroed(h * n * d)?;
/// for (i, (k, v)) in k.iter_mut().zip(v.iter_mut()).enumerate() {
///     (*k, *v) = ((i % 7) as f32 * 0.1, (i % 5) as f32);
/// }
/// let q = vec![0.5f32; h * d];
/// let mut o = vec![0.0f32; h * d];
/// forward(
///     View::contiguous(&q, &[1, h, 1, d])?,
///     View::contiguous(&k, &[1, h, n, d])?,
///     View::contiguous(&v, &[1, h, n, d])?,
///     &Options::new(),
///     &mut ViewMut::contiguous(&mut o, [1, h, 1, d])?,
///     None,
/// )?;
/// # Ok::<(), attentive::AttnError>(())
/// ```
pub struct HugeVec<T: Element> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    layout: std::alloc::Layout,
}

/// Element types of a [`HugeVec`]: plain numbers whose all-zero bits are zero.
pub trait Element: Copy + private::Sealed {}
impl Element for f32 {}
impl Element for half::f16 {}
mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

// SAFETY: a HugeVec owns its elements as a Vec does; f32 and f16 are Send and Sync.
unsafe impl<T: Element + Send> Send for HugeVec<T> {}
// SAFETY: as above; shared access hands out only `&[T]`.
unsafe impl<T: Element + Sync> Sync for HugeVec<T> {}

/// Requests of this many bytes or more are checked against [`available_memory`] before they are
/// made: reading `/proc/meminfo` costs tens of microseconds, nothing beside the milliseconds it
/// takes to zero such a buffer, and a smaller request cannot take a machine down.
const CHECKED_FROM: u128 = 64 << 20;

/// Bytes this process can still be given, where the system says: memory available now
/// (`MemAvailable`, which counts caches the kernel can drop) plus free swap, or less where a
/// cgroup (v2) limit leaves less, or where `ATTENTIVE_MAX_MEMORY` (bytes, or with a `K`, `M`,
/// `G` or `T` suffix, powers of 1024) sets a lower cap: a service can bound what one request
/// may take. `None` where neither is known (not Linux, no cap).
///
/// ```
/// if let Some(bytes) = attentive::available_memory() {
///     assert!(bytes > 0);
/// }
/// ```
pub fn available_memory() -> Option<u64> {
    let cap = std::env::var("ATTENTIVE_MAX_MEMORY")
        .ok()
        .and_then(|v| parse_bytes(&v));
    match (system_memory(), cap) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// `"512M"` as 512·2²⁰, `"2G"` as 2·2³⁰, a plain number as bytes; `None` if unreadable.
fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, shift) = match v.chars().last()?.to_ascii_uppercase() {
        'K' => (&v[..v.len() - 1], 10),
        'M' => (&v[..v.len() - 1], 20),
        'G' => (&v[..v.len() - 1], 30),
        'T' => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn system_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    };
    let mut bytes = field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0));
    let cgroup = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    if let (Some(max), Some(current)) = (cgroup("memory.max"), cgroup("memory.current")) {
        if let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>()) {
            bytes = bytes.min(max.saturating_sub(current));
        }
    }
    Some(bytes)
}

/// `elements` of `elem_bytes` each, in bytes, when that is an amount this process can be given:
/// else [`AttnError::OutOfMemory`](crate::AttnError::OutOfMemory) naming `what`, before anything
/// is allocated. Outputs the engine allocates itself (the weights of
/// [`probabilities`](crate::probabilities), a [`HugeVec`]) are checked so; callers that
/// allocate large outputs of their own can ask the same.
///
/// ```
/// let n = 1_000_000; // probabilities of a million queries over a million keys
/// let e = attentive::check_memory("probabilities", n * n, 4).unwrap_err();
/// assert!(e.to_string().contains("4000000000000 bytes (3.6 TiB)"));
/// ```
pub fn check_memory(
    what: &'static str,
    elements: usize,
    elem_bytes: usize,
) -> crate::Result<usize> {
    let bytes = elements as u128 * elem_bytes as u128;
    let refuse = |available| crate::AttnError::OutOfMemory {
        what,
        bytes,
        available,
    };
    if bytes > isize::MAX as u128 {
        return Err(refuse(available_memory()));
    }
    if bytes >= CHECKED_FROM {
        if let Some(a) = available_memory().filter(|&a| bytes > a as u128) {
            return Err(refuse(Some(a)));
        }
    }
    Ok(bytes as usize)
}

impl<T: Element> HugeVec<T> {
    /// `len` zeros.
    ///
    /// # Errors
    /// [`AttnError::OutOfMemory`](crate::AttnError::OutOfMemory) when `len` elements exceed the
    /// address space or the memory available ([`check_memory`]), or the system refuses them.
    pub fn zeroed(len: usize) -> crate::Result<Self> {
        let size = std::mem::size_of::<T>();
        let bytes = check_memory("buffer", len, size)?;
        let refuse = crate::AttnError::OutOfMemory {
            what: "buffer",
            bytes: bytes as u128,
            available: None,
        };
        let (align, bytes) = if bytes >= HUGE_PAGE {
            let whole = bytes.checked_next_multiple_of(HUGE_PAGE);
            (HUGE_PAGE, whole.ok_or(refuse.clone())?)
        } else {
            (64, bytes.max(1))
        };
        let layout =
            std::alloc::Layout::from_size_align(bytes, align).map_err(|_| refuse.clone())?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr = std::ptr::NonNull::new(raw.cast::<T>()).ok_or(refuse)?;
        advise_huge(raw, bytes);
        // Zeroed after the advice: the first write maps each page, and an allocator's own
        // zeroing (`alloc_zeroed` at this alignment) would map them all as small pages first.
        // SAFETY: `raw` holds `bytes` writable bytes.
        unsafe { std::ptr::write_bytes(raw, 0, bytes) };
        Ok(Self { ptr, len, layout })
    }

    /// A copy of `src`.
    ///
    /// # Errors
    /// As [`HugeVec::zeroed`].
    pub fn from_slice(src: &[T]) -> crate::Result<Self> {
        let mut v = Self::zeroed(src.len())?;
        v.copy_from_slice(src);
        Ok(v)
    }
}

impl<T: Element> Drop for HugeVec<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, and freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

impl<T: Element> Deref for HugeVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the allocation holds `len` zero-initialised or written elements of T, for
        // which all-zero bits are a valid value.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Element> DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Element> Clone for HugeVec<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self).unwrap_or_else(|_| std::alloc::handle_alloc_error(self.layout))
    }
}

impl<T: Element + std::fmt::Debug> std::fmt::Debug for HugeVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Advises the whole 2 MiB pages inside `[p, p + bytes)`, an allocation of the caller's, as
/// huge pages (Linux; elsewhere nothing). Pages already written keep their backing.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn advise_huge(p: *mut u8, bytes: usize) {
    // (Miri runs no system calls: the advice is skipped there.)
    #[cfg(any(miri, not(target_os = "linux")))]
    let _ = (p, bytes);
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        let start = (p as usize).next_multiple_of(HUGE_PAGE);
        let end = (p as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: whole pages inside one live allocation. The advice changes how the kernel
            // backs them, never their contents; where it fails (no transparent huge pages) the
            // pages stay ordinary, so its result is not needed.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_vec_holds_zeros_then_what_is_written() {
        for len in [
            0,
            1,
            17,
            HUGE_PAGE / 4 - 1,
            HUGE_PAGE / 4,
            3 * HUGE_PAGE / 4 + 5,
        ] {
            let mut v = HugeVec::<f32>::zeroed(len).unwrap();
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
            let align = if len * 4 >= HUGE_PAGE { HUGE_PAGE } else { 64 };
            assert_eq!(v.as_ptr() as usize % align, 0, "len {len}");
            for (i, x) in v.iter_mut().enumerate() {
                *x = i as f32;
            }
            let w = v.clone();
            assert!(w.iter().enumerate().all(|(i, &x)| x == i as f32));
            assert_eq!(&*HugeVec::from_slice(&w).unwrap(), &*w);
        }
        let h = HugeVec::from_slice(&[half::f16::ONE; 3]).unwrap();
        assert_eq!(&*h, &[half::f16::ONE; 3]);
    }

    #[test]
    fn memory_caps_read_with_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes(" 2g "), Some(2 << 30));
        assert_eq!(parse_bytes("1T"), Some(1 << 40));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("99999999999T"), None);
    }

    #[test]
    fn huge_vec_refuses_impossible_sizes() {
        for len in [usize::MAX, usize::MAX / 4 + 1, isize::MAX as usize / 4] {
            match HugeVec::<f32>::zeroed(len).unwrap_err() {
                crate::AttnError::OutOfMemory { what, bytes, .. } => {
                    assert_eq!((what, bytes), ("buffer", len as u128 * 4));
                }
                e => panic!("{e}"),
            }
        }
        // More than the machine has, though within the address space: refused before any of
        // it is asked for, with the sizes in the message.
        if let Some(a) = available_memory() {
            let len = (a / 4 + (1 << 30)) as usize;
            let e = HugeVec::<f32>::zeroed(len).unwrap_err().to_string();
            assert!(
                e.contains("would exceed") && e.contains(&(len as u128 * 4).to_string()),
                "{e}"
            );
        }
    }

    #[test]
    fn pooled_buffers_start_on_cache_lines_at_every_size() {
        for len in [1, 100, HUGE_PAGE, 3 * HUGE_PAGE / 4 + 7] {
            let b = Buffer::zeroed(len);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert!(b.iter().all(|&x| x == 0.0));
        }
    }
}
