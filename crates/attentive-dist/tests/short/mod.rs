//! A ring that corrupts one block, for the fault tests of both rings.

use attentive_dist::Ring;

/// A ring one of whose ranks sends its first block one value short, in round `round`.
pub struct Short<'a, R: Ring> {
    ring: &'a mut R,
    rounds: usize,
    round: usize,
}

impl<'a, R: Ring> Short<'a, R> {
    pub fn new(ring: &'a mut R, round: usize) -> Self {
        Self {
            ring,
            rounds: 0,
            round,
        }
    }
}

impl<R: Ring> Ring for Short<'_, R> {
    fn rank(&self) -> usize {
        self.ring.rank()
    }
    fn size(&self) -> usize {
        self.ring.size()
    }
    fn round(
        &mut self,
        send: &[&[f32]],
        recv: &mut [&mut [f32]],
        work: &mut dyn FnMut() -> attentive_dist::Result<()>,
    ) -> attentive_dist::Result<()> {
        self.rounds += 1;
        if self.rounds - 1 == self.round && !send.is_empty() && !send[0].is_empty() {
            let mut s = send.to_vec();
            s[0] = &send[0][..send[0].len() - 1];
            return self.ring.round(&s, recv, work);
        }
        self.ring.round(send, recv, work)
    }
}
