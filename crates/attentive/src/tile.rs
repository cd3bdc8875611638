//! The tile sizes of the fused kernel, shared by everything that lays work out per tile (the
//! kernel itself, block masks, relative positions): below all of them, so none imports another
//! for them.

/// Queries per tile. With `BC` keys per tile the score tile is 64×64 f32 = 16 KiB; with the Kᵀ
/// tile (16 KiB at D = 64) and the V tile (16 KiB) the working set of one step fits the 48 KiB L1
/// of the target cores, and 64 rows amortise each K/V tile load over many queries.
pub(crate) const BR: usize = 64;
/// Keys per tile (see [`BR`]); a multiple of every vector width (16 lanes).
pub(crate) const BC: usize = 64;
