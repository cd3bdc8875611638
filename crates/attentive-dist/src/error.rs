//! The one error type of ring attention.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DistError {
    /// The engine refused a block's attention (the inputs' shapes, the memory cap).
    #[error(transparent)]
    Attention(#[from] attentive::AttnError),
    /// A local tensor whose shape does not match the problem and this rank's rows.
    #[error("rank {rank}: {tensor} has shape {got:?}, expected {expected:?}")]
    Shape {
        rank: usize,
        tensor: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A problem the ring cannot split: causal attention between sequences of different lengths,
    /// a head count that does not divide, a zero-sized ring.
    #[error("{0}")]
    Unsupported(String),
    /// The ranks were started on different problems (other files, other options).
    #[error("rank {rank}: the ranks disagree on the problem: {detail}")]
    Disagree { rank: usize, detail: String },
    /// A block that arrived with another length than its sender's rows imply.
    #[error(
        "rank {rank}: buffer {buffer} of round {round} from rank {from} holds {got} values, expected {expected}"
    )]
    BlockSize {
        rank: usize,
        from: usize,
        round: usize,
        buffer: usize,
        got: usize,
        expected: usize,
    },
    /// A message of another round than the one this rank is in.
    #[error("rank {rank}: rank {from} sent round {got} while this rank is in round {expected}")]
    OutOfStep {
        rank: usize,
        from: usize,
        got: usize,
        expected: usize,
    },
    /// The previous rank stopped (it failed or was killed) before sending this round.
    #[error("rank {rank}: rank {from} stopped before sending round {round}")]
    PeerGone {
        rank: usize,
        from: usize,
        round: usize,
    },
    /// Nothing came from the previous rank in the time allowed: it, or a rank it waits for in
    /// turn, hangs or was stopped, which MPI itself would wait for forever.
    #[error("rank {rank}: nothing from rank {from} in round {round} after {seconds} s: it or a rank before it on the ring hangs or was stopped (ATTENTIVE_RING_TIMEOUT sets the limit)")]
    Timeout {
        rank: usize,
        from: usize,
        round: usize,
        seconds: f64,
    },
    /// The MPI library reported an error.
    #[error("rank {rank}: MPI: {reason}")]
    Mpi { rank: usize, reason: String },
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;
