//! Plain round robin.

/// Rotates over `0..n`, tolerating `n` changing between picks.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// Creates a picker whose first pick is `start % n`.
    pub fn new(start: usize) -> Self {
        Self { next: start }
    }

    /// Returns the next index in `0..n`, or `None` if `n == 0`.
    pub fn pick(&mut self, n: usize) -> Option<usize> {
        let index = self.next.checked_rem(n)?;
        self.next = index + 1;
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_from_start() {
        let mut rr = RoundRobin::new(2);
        let picks: Vec<_> = (0..5).map(|_| rr.pick(3).unwrap()).collect();
        assert_eq!(picks, [2, 0, 1, 2, 0]);
    }

    #[test]
    fn empty_and_shrinking_sets() {
        let mut rr = RoundRobin::new(usize::MAX);
        assert_eq!(rr.pick(0), None);
        assert_eq!(rr.pick(4), Some(usize::MAX % 4));
        rr.pick(4);
        rr.pick(4);
        assert_eq!(rr.pick(2), Some(0));
        assert_eq!(rr.pick(2), Some(1));
        assert_eq!(rr.pick(1), Some(0));
    }
}
