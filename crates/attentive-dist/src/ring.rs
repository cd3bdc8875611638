//! The ring: what the attention algorithm needs from a transport, one implementation on
//! threads in this process, and the agreements built from its rounds.
//!
//! A round sends buffers to the next rank and receives as many from the previous rank, while
//! the caller's work (the attention of the block in hand) runs. Each round's message carries its
//! number and buffer lengths, so a rank out of step or a block of the wrong size is an error
//! where it arrives, and a rank that stops is an error at its neighbour rather than a wait
//! forever.

use crate::error::{DistError, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// A ring of `size` ranks, each sending to `rank + 1` and receiving from `rank − 1` (mod size).
pub trait Ring {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// One round: sends each `send[i]` to the next rank and fills each `recv[i]` with the
    /// previous rank's `i`-th buffer, which must arrive exactly `recv[i].len()` long, while
    /// `work` runs. `send` and `recv` have the same count (every rank does the same rounds); with
    /// none, the round is `work` alone (timed, nothing sent). An error of `work`, or of the
    /// transfer, ends the round with that error.
    fn round(
        &mut self,
        send: &[&[f32]],
        recv: &mut [&mut [f32]],
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()>;

    /// Where this rank's time in rounds went so far (zero where a ring does not keep count).
    fn timings(&self) -> Timings {
        Timings::default()
    }
}

/// Time a rank spent in rounds: computing (the work of each round), and waiting for its
/// transfers after its work was done (what overlapping did not hide).
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub rounds: usize,
    pub work: Duration,
    pub wait: Duration,
}

impl Timings {
    /// Adds one round that computed from `start` to `worked` and finished its transfers now.
    pub(crate) fn add(&mut self, start: Instant, worked: Instant) {
        self.rounds += 1;
        self.work += worked - start;
        self.wait += worked.elapsed();
    }
}

/// How long a rank waits for its neighbour's block beyond its own work: `ATTENTIVE_RING_TIMEOUT`
/// seconds, 300 by default.
pub fn timeout() -> Duration {
    let secs = std::env::var("ATTENTIVE_RING_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(secs)
}

/// What every ring does first in a round: checks that `send` and `recv` have the same count (at
/// most `max`), and runs a round with nothing to move as `work` alone, timed into `times`.
/// `None` when there is something to move.
pub(crate) fn local_round(
    times: &mut Timings,
    send: &[&[f32]],
    recv: &[&mut [f32]],
    max: usize,
    work: &mut dyn FnMut() -> Result<()>,
) -> Option<Result<()>> {
    if send.len() > max || recv.len() != send.len() {
        return Some(Err(DistError::Unsupported(format!(
            "a round carries as many buffers each way, at most {max} (got {} and {})",
            send.len(),
            recv.len()
        ))));
    }
    if !send.is_empty() {
        return None;
    }
    let start = Instant::now();
    Some(work().map(|()| times.add(start, Instant::now())))
}

/// Checks the round number and buffer lengths that arrived from `from` against this rank's.
pub(crate) fn check_arrival(
    rank: usize,
    from: usize,
    round: usize,
    got_round: usize,
    got: &[usize],
    expected: &[usize],
) -> Result<()> {
    if got_round != round {
        return Err(DistError::OutOfStep {
            rank,
            from,
            got: got_round,
            expected: round,
        });
    }
    if got.len() != expected.len() {
        return Err(DistError::BlockSize {
            rank,
            from,
            round,
            buffer: got.len().min(expected.len()),
            got: got.len(),
            expected: expected.len(),
        });
    }
    for (buffer, (&g, &e)) in got.iter().zip(expected).enumerate() {
        if g != e {
            return Err(DistError::BlockSize {
                rank,
                from,
                round,
                buffer,
                got: g,
                expected: e,
            });
        }
    }
    Ok(())
}

struct Packet {
    round: usize,
    bufs: Vec<Vec<f32>>,
}

/// A rank of a ring of threads in one process ([`threaded`]): the same algorithm as over MPI,
/// with channels for links. The transfer is a copy made before the work starts.
pub struct ThreadRing {
    rank: usize,
    size: usize,
    rounds: usize,
    times: Timings,
    tx: Sender<Packet>,
    rx: Receiver<Packet>,
    timeout: Duration,
}

impl Ring for ThreadRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn round(
        &mut self,
        send: &[&[f32]],
        recv: &mut [&mut [f32]],
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if let Some(done) = local_round(&mut self.times, send, recv, usize::MAX, work) {
            return done;
        }
        let start = Instant::now();
        let round = self.rounds;
        self.rounds += 1;
        let (next, prev) = (
            (self.rank + 1) % self.size,
            (self.rank + self.size - 1) % self.size,
        );
        let packet = Packet {
            round,
            bufs: send.iter().map(|b| b.to_vec()).collect(),
        };
        self.tx.send(packet).map_err(|_| DistError::PeerGone {
            rank: self.rank,
            from: next,
            round,
        })?;
        work()?;
        let worked = Instant::now();
        let p = self.rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => DistError::Timeout {
                rank: self.rank,
                from: prev,
                round,
                seconds: self.timeout.as_secs_f64(),
            },
            RecvTimeoutError::Disconnected => DistError::PeerGone {
                rank: self.rank,
                from: prev,
                round,
            },
        })?;
        let got: Vec<usize> = p.bufs.iter().map(Vec::len).collect();
        let expected: Vec<usize> = recv.iter().map(|b| b.len()).collect();
        check_arrival(self.rank, prev, round, p.round, &got, &expected)?;
        for (dst, src) in recv.iter_mut().zip(&p.bufs) {
            dst.copy_from_slice(src);
        }
        self.times.add(start, worked);
        Ok(())
    }

    fn timings(&self) -> Timings {
        self.times
    }
}

/// Runs `f` on `ranks` threads, each with its rank of one ring, and returns their results in
/// rank order. A rank that returns (or fails) closes its links, so its neighbours' next rounds
/// fail with [`DistError::PeerGone`] instead of waiting; each waits at most `timeout` for a block.
///
/// # Panics
/// If the system cannot start `ranks` threads, or a rank panics.
///
/// ```
/// use attentive_dist::{threaded, Ring};
/// use std::time::{Duration, Instant};
/// // Each rank passes its number to the next one.
/// let got = threaded(3, Duration::from_secs(10), |ring| {
///     let mut from_prev = [0.0f32];
///     ring.round(&[&[ring.rank() as f32]], &mut [&mut from_prev], &mut || Ok(())).map(|_| from_prev[0])
/// });
/// assert_eq!(got.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [2.0, 0.0, 1.0]);
/// ```
pub fn threaded<T: Send>(
    ranks: usize,
    timeout: Duration,
    f: impl Fn(&mut ThreadRing) -> T + Sync,
) -> Vec<T> {
    let (txs, mut rxs): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel()).unzip();
    // Link r carries rank r's blocks to rank r + 1, so rank r receives on link r − 1.
    rxs.rotate_right(1);
    let mut rings: Vec<ThreadRing> = txs
        .into_iter()
        .zip(rxs)
        .enumerate()
        .map(|(rank, (tx, rx))| ThreadRing {
            rank,
            size: ranks,
            rounds: 0,
            times: Timings::default(),
            tx,
            rx,
            timeout,
        })
        .collect();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = rings
            .drain(..)
            .map(|mut ring| s.spawn(move || f(&mut ring)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Whether every rank passed `ok`: `size − 1` rounds carrying the smallest value seen.
pub fn all_ok(ring: &mut dyn Ring, ok: bool) -> Result<bool> {
    let mut seen = [if ok { 1.0f32 } else { 0.0 }];
    for _ in 1..ring.size() {
        let mut got = [0.0f32];
        ring.round(&[&seen], &mut [&mut got], &mut || Ok(()))?;
        seen[0] = seen[0].min(got[0]);
    }
    Ok(seen[0] == 1.0)
}

/// Checks that every rank was started on the same problem, described by `facts` (named values):
/// each rank compares its neighbour's with its own, then all learn whether any differed, so
/// that every rank fails with [`DistError::Disagree`], not only the one that saw it.
pub fn same_everywhere(ring: &mut dyn Ring, facts: &[(&str, u64)]) -> Result<()> {
    // Each u64 travels as two f32 bit patterns (moved, never computed on).
    let mine: Vec<f32> = facts
        .iter()
        .flat_map(|&(_, x)| [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)])
        .collect();
    let mut theirs = vec![0.0f32; mine.len()];
    ring.round(&[&mine], &mut [&mut theirs], &mut || Ok(()))?;
    let prev = (ring.rank() + ring.size() - 1) % ring.size();
    let differ: Vec<String> = facts
        .iter()
        .zip(theirs.chunks(2))
        .filter_map(|(&(name, x), t)| {
            let y = u64::from(t[0].to_bits()) | u64::from(t[1].to_bits()) << 32;
            (x != y).then(|| format!("{name} is {x} here and {y} on rank {prev}"))
        })
        .collect();
    if all_ok(ring, differ.is_empty())? {
        return Ok(());
    }
    Err(DistError::Disagree {
        rank: ring.rank(),
        detail: if differ.is_empty() {
            "another rank found its neighbour's differ from its own".into()
        } else {
            differ.join(", ")
        },
    })
}
