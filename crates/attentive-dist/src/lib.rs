//! # attentive-dist: exact attention across processes
//!
//! Ring attention: a sequence too long for one machine's memory or time, split between `P`
//! ranks, each holding a block of its rows ([`Layout`]). Key/value blocks travel around a ring of
//! ranks; each rank attends its queries to the block in hand with the fused kernel of
//! [`attentive`] while the next block is in transit, and merges the partial results by their
//! log-sum-exp ([`attentive::merge`]). The result is exact attention over the whole sequence,
//! forward and backward ([`RingAttention`]), with memory O(N/P) per rank.
//!
//! * [`layout`] — which rows each rank holds: plain blocks, or the zigzag split that balances a
//!   causal mask;
//! * [`ring`] — the transport as a trait ([`Ring`]), a ring of threads in one process
//!   ([`threaded`]), and the agreements built from rounds;
//! * [`attention`] — the forward and backward over any [`Ring`];
//! * `mpi` (feature `mpi`) — the ring over MPI between processes and machines.
//!
//! Data flows down this list. Without the `mpi` feature nothing here needs an MPI library: the
//! threaded ring runs the same algorithm, which is what the tests check.

pub mod attention;
mod error;
pub mod layout;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod ring;

pub use attention::RingAttention;
pub use error::{DistError, Result};
pub use layout::{Layout, Split};
pub use ring::{all_ok, same_everywhere, threaded, timeout, Ring, ThreadRing, Timings};
