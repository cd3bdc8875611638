//! The one error type of the engine.

use thiserror::Error;

/// Every way a call into the engine can be refused. Inputs are checked once, before any work
/// starts, so an error never leaves an output half written.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AttnError {
    /// A tensor does not have the shape the call needs.
    #[error("{tensor}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        tensor: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A dimension has size zero (an empty batch, head, sequence or feature axis).
    #[error("{tensor}: dimension {dim} has size zero (shape {shape:?})")]
    EmptyDimension {
        tensor: &'static str,
        dim: usize,
        shape: Vec<usize>,
    },
    /// The strides address memory beyond the end of the slice.
    #[error("{tensor}: shape {shape:?} with strides {strides:?} reaches element {needed}, but the slice holds {len}")]
    OutOfBounds {
        tensor: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
        needed: usize,
        len: usize,
    },
    /// An output whose strides make two elements share one address.
    #[error("{tensor}: strides {strides:?} make distinct elements of shape {shape:?} overlap")]
    OverlappingOutput {
        tensor: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },
    /// Grouped-query attention needs the query heads to be a multiple of the key/value heads.
    #[error("{q_heads} query heads are not a multiple of {kv_heads} key/value heads")]
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },
    /// A mask or bias that cannot be broadcast to [B, Hq, Nq, Nk].
    #[error("{tensor}: shape {shape:?} does not broadcast to {target:?}")]
    NotBroadcastable {
        tensor: &'static str,
        shape: Vec<usize>,
        target: Vec<usize>,
    },
    /// A scalar option outside the values it can take.
    #[error("{option} = {value} is invalid: {reason}")]
    InvalidOption {
        option: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// Two options that exclude each other.
    #[error("options {a} and {b} cannot be given together: {reason}")]
    ConflictingOptions {
        a: &'static str,
        b: &'static str,
        reason: &'static str,
    },
    /// A code path was forced that this CPU cannot run.
    #[error("instruction set {isa:?} is not available on this CPU")]
    IsaUnavailable { isa: crate::Isa },
    /// A per-head or per-position input of the wrong length.
    #[error("{tensor}: expected {expected} elements, got {got}")]
    LengthMismatch {
        tensor: &'static str,
        expected: usize,
        got: usize,
    },
    /// A buffer (an output the engine allocates, a [`HugeVec`](crate::HugeVec)) larger than
    /// the address space, than the memory available to this process (`available`, in bytes,
    /// where known: see [`available_memory`](crate::available_memory)), or than the system gave
    /// when asked. Refused before any of it is written.
    #[error("{what}: {}", too_large(*.bytes, *.available))]
    OutOfMemory {
        what: &'static str,
        bytes: u128,
        available: Option<u64>,
    },
}

/// `bytes` (and what was available) in words, binary units.
fn too_large(bytes: u128, available: Option<u64>) -> String {
    let human = |b: u128| {
        let units = [
            "bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB",
        ];
        let (mut x, mut u) = (b as f64, 0);
        while x >= 1024.0 && u + 1 < units.len() {
            x /= 1024.0;
            u += 1;
        }
        if u == 0 {
            format!("{b} bytes")
        } else {
            format!("{x:.1} {}", units[u])
        }
    };
    match available {
        Some(a) => format!(
            "{} bytes ({}) would exceed the {} of memory available",
            bytes,
            human(bytes),
            human(a as u128)
        ),
        None => format!(
            "{} bytes ({}): the system refused them",
            bytes,
            human(bytes)
        ),
    }
}

/// Result of the engine's calls.
pub type Result<T> = std::result::Result<T, AttnError>;

/// `got` must be `expected`, else a [`AttnError::ShapeMismatch`] naming `tensor`.
pub(crate) fn expect_shape(
    tensor: &'static str,
    got: [usize; 4],
    expected: [usize; 4],
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(AttnError::ShapeMismatch {
            tensor,
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}

/// `len` must be `expected`, else a [`AttnError::LengthMismatch`] naming `tensor`.
pub(crate) fn expect_len(tensor: &'static str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(AttnError::LengthMismatch {
            tensor,
            expected,
            got: len,
        })
    }
}
