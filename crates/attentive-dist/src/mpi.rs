//! The ring over MPI (feature `mpi`): rank `r` of `MPI_COMM_WORLD` sends to `r + 1` and receives
//! from `r − 1`, so `mpiexec -n P` runs one rank per process, on one machine or many.
//!
//! A round's transfers run on a helper thread, non-blocking sends and receives it drives to
//! completion, while the calling thread computes (MPI is initialized with
//! `MPI_THREAD_SERIALIZED`: one thread at a time calls it). First a header of the round number and
//! buffer lengths crosses, so a rank out of step or a block of the wrong size is reported as
//! such, then the buffers. MPI waits forever for a rank that hangs; here a rank that has finished
//! its own work and waited [`timeout`](crate::timeout) more for its neighbour reports it and
//! ends the job (`MPI_Abort`), as it does after any error the other ranks cannot learn of.

use crate::error::{DistError, Result};
use crate::ring::{check_arrival, local_round, Ring, Timings};
use mpi::environment::Universe;
use mpi::request::{LocalScope, Request};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buffers one round may carry (the backward sends two).
const MAX_BUFFERS: usize = 6;

/// This process's rank of the ring of all processes of the MPI job. MPI is finalized when it is
/// dropped.
pub struct MpiRing {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    rounds: usize,
    times: Timings,
    timeout: Duration,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

impl MpiRing {
    /// Initializes MPI (once per process) and joins the ring of `MPI_COMM_WORLD`.
    pub fn init() -> Result<Self> {
        let fail = |reason: String| DistError::Mpi { rank: 0, reason };
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| fail("MPI was already initialized in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(fail(format!(
                "the MPI library offers threading {threading:?}; ring attention needs Serialized"
            )));
        }
        let world = universe.world();
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            rounds: 0,
            times: Timings::default(),
            timeout: crate::ring::timeout(),
            _universe: universe,
        })
    }

    /// Ends every process of the job at once with exit code `code` (`MPI_Abort`): after an
    /// error that the other ranks cannot learn of through the ring.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Sends `send` to the next rank and receives the previous rank's into `recv`, header first;
    /// `finished` tells when the caller's work ended, from when the wait is timed.
    fn transfer(
        &self,
        round: usize,
        send: &[&[f32]],
        recv: &mut [&mut [f32]],
        finished: &Mutex<Option<Instant>>,
    ) -> Result<()> {
        let (next, prev) = (
            (self.rank + 1) % self.size,
            (self.rank + self.size - 1) % self.size,
        );
        let (to, from) = (
            self.world.process_at_rank(next as i32),
            self.world.process_at_rank(prev as i32),
        );
        let mut head = [0u64; 2 + MAX_BUFFERS];
        head[0] = round as u64;
        head[1] = send.len() as u64;
        for (h, s) in head[2..].iter_mut().zip(send) {
            *h = s.len() as u64;
        }
        let mut theirs = [0u64; 2 + MAX_BUFFERS];
        mpi::request::scope(|scope| {
            let reqs = vec![
                to.immediate_send_with_tag(scope, &head[..], 0),
                from.immediate_receive_into_with_tag(scope, &mut theirs[..], 0),
            ];
            self.complete(reqs, round, prev, finished);
        });
        let count = (theirs[1] as usize).min(MAX_BUFFERS);
        let got: Vec<usize> = theirs[2..2 + count].iter().map(|&x| x as usize).collect();
        let expected: Vec<usize> = recv.iter().map(|b| b.len()).collect();
        check_arrival(self.rank, prev, round, theirs[0] as usize, &got, &expected)?;
        mpi::request::scope(|scope| {
            let mut reqs = Vec::with_capacity(2 * send.len());
            for (i, (s, r)) in send.iter().zip(recv.iter_mut()).enumerate() {
                reqs.push(to.immediate_send_with_tag(scope, &s[..], 1 + i as i32));
                reqs.push(from.immediate_receive_into_with_tag(scope, &mut r[..], 1 + i as i32));
            }
            self.complete(reqs, round, prev, finished);
        });
        Ok(())
    }

    /// Drives `reqs` to completion. Once the caller's work has finished and `timeout` more has
    /// passed, reports the silent neighbour and ends the job: MPI cannot cancel a transfer a
    /// peer never answers.
    fn complete<'a, D: ?Sized>(
        &self,
        mut reqs: Vec<Request<'a, D, &LocalScope<'a>>>,
        round: usize,
        prev: usize,
        finished: &Mutex<Option<Instant>>,
    ) {
        let mut spins = 0u32;
        while !reqs.is_empty() {
            reqs = reqs.into_iter().filter_map(|r| r.test().err()).collect();
            if reqs.is_empty() {
                break;
            }
            let since = *finished.lock().unwrap_or_else(|e| e.into_inner());
            if since.is_some_and(|t| t.elapsed() > self.timeout) {
                let e = DistError::Timeout {
                    rank: self.rank,
                    from: prev,
                    round,
                    seconds: self.timeout.as_secs_f64(),
                };
                eprintln!("error: {e}");
                self.world.abort(3);
            }
            // Spin briefly (a transfer on loopback takes microseconds), then yield the core to
            // the computation.
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

impl Ring for MpiRing {
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
        if let Some(done) = local_round(&mut self.times, send, recv, MAX_BUFFERS, work) {
            return done;
        }
        let start = Instant::now();
        let round = self.rounds;
        self.rounds += 1;
        let finished = Mutex::new(None);
        let this = &*self;
        let (moved, worked, at) = std::thread::scope(|s| {
            let comm = s.spawn(|| this.transfer(round, send, recv, &finished));
            let worked = work();
            let at = Instant::now();
            *finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
            (comm.join(), worked, at)
        });
        worked?;
        moved.unwrap_or_else(|e| std::panic::resume_unwind(e))?;
        self.times.add(start, at);
        Ok(())
    }

    fn timings(&self) -> Timings {
        self.times
    }
}
