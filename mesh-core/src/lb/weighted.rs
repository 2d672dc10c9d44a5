//! Smooth weighted round robin on an earliest-deadline-first scheduler.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::mem;

/// Once the virtual clock passes this, every deadline is shifted back towards
/// zero, so deadlines keep an absolute precision of about 2^-32 forever.
const REBASE_AT: f64 = (1u64 << 20) as f64;

/// When an entry is next due on the virtual clock.
///
/// The deadline is recomputed as `anchor + steps / weight` rather than
/// accumulated, so rounding never drifts and entries whose ideal deadlines
/// coincide tie exactly (which keeps the interleaving smooth).
#[derive(Clone, Copy, Debug)]
struct Timing {
    deadline: f64,
    anchor: f64,
    steps: u64,
    weight: u32,
}

impl Timing {
    /// First deadline of an entry added at `now`: `now + 1/weight`.
    fn starting_at(now: f64, weight: u32) -> Self {
        let mut timing = Self { deadline: now, anchor: now, steps: 0, weight };
        timing.advance();
        timing
    }

    fn advance(&mut self) {
        self.steps += 1;
        self.deadline = self.anchor + self.steps as f64 / f64::from(self.weight);
    }

    /// Keeps the current deadline; the new weight applies from the next pick.
    fn reweight(&mut self, weight: u32) {
        if weight != self.weight {
            *self = Self { anchor: self.deadline, steps: 0, weight, ..*self };
        }
    }

    fn shift_back(&mut self, by: f64) {
        let deadline = self.deadline - by;
        *self = Self { deadline, anchor: deadline, steps: 0, ..*self };
    }
}

#[derive(Clone, Debug)]
struct Slot<K> {
    timing: Timing,
    /// Insertion order; breaks deadline ties (older first).
    seq: u64,
    key: K,
}

impl<K> Ord for Slot<K> {
    /// Reversed, so that the max-heap pops the earliest deadline, then the oldest insertion.
    fn cmp(&self, other: &Self) -> Ordering {
        other.timing.deadline.total_cmp(&self.timing.deadline).then(other.seq.cmp(&self.seq))
    }
}

impl<K> PartialOrd for Slot<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K> PartialEq for Slot<K> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<K> Eq for Slot<K> {}

/// Smooth weighted round robin following Envoy's earliest-deadline-first (EDF)
/// scheduler.
///
/// Each entry with weight `w > 0` has a deadline on a virtual clock; a pick
/// takes the earliest deadline (ties go to the entry inserted first), moves the
/// clock there and pushes that entry's deadline `1/w` further. Over any window
/// an entry is picked in proportion to its weight, and picks are interleaved
/// rather than bursty. Weight-0 entries are never picked.
#[derive(Clone, Debug)]
pub struct WeightedRoundRobin<K> {
    heap: BinaryHeap<Slot<K>>,
    now: f64,
    next_seq: u64,
}

impl<K> Default for WeightedRoundRobin<K> {
    fn default() -> Self {
        Self { heap: BinaryHeap::new(), now: 0.0, next_seq: 0 }
    }
}

impl<K: Clone + Eq + Hash> WeightedRoundRobin<K> {
    /// Creates an empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the set of entries without resetting the schedule.
    ///
    /// Keys that stay keep their current deadline (a changed weight applies
    /// from their next pick), new keys are scheduled at `now + 1/w` in input
    /// order, and keys that are missing or have weight 0 are removed. If a key
    /// appears more than once, its last weight wins.
    pub fn update(&mut self, items: impl IntoIterator<Item = (K, u32)>) {
        let mut wanted: HashMap<K, (usize, u32)> = HashMap::new();
        for (order, (key, weight)) in items.into_iter().enumerate() {
            wanted.entry(key).and_modify(|e| e.1 = weight).or_insert((order, weight));
        }
        let mut wanted: Vec<_> = wanted.into_iter().filter(|(_, (_, weight))| *weight > 0).collect();
        wanted.sort_unstable_by_key(|(_, (order, _))| *order);

        let mut current: HashMap<K, (Timing, u64)> = self.heap.drain().map(|slot| (slot.key, (slot.timing, slot.seq))).collect();
        let mut slots = Vec::with_capacity(wanted.len());
        for (key, (_, weight)) in wanted {
            let (timing, seq) = match current.remove(&key) {
                Some((mut timing, seq)) => {
                    timing.reweight(weight);
                    (timing, seq)
                }
                None => (Timing::starting_at(self.now, weight), self.bump_seq()),
            };
            slots.push(Slot { timing, seq, key });
        }
        self.heap = slots.into();
    }

    /// Returns the entry with the earliest deadline, or `None` if empty.
    pub fn pick(&mut self) -> Option<K> {
        let seq = self.next_seq;
        let mut top = self.heap.peek_mut()?;
        self.now = top.timing.deadline;
        top.timing.advance();
        top.seq = seq;
        let key = top.key.clone();
        drop(top);
        self.next_seq += 1;
        if self.now >= REBASE_AT {
            self.rebase();
        }
        Some(key)
    }

    /// Number of pickable (non-zero weight) entries.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether there is nothing to pick.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn bump_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Moves the clock back to zero, shifting every deadline by the same amount.
    fn rebase(&mut self) {
        let mut slots = mem::take(&mut self.heap).into_vec();
        for slot in &mut slots {
            slot.timing.shift_back(self.now);
        }
        self.heap = slots.into();
        self.now = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(wrr: &mut WeightedRoundRobin<&'static str>, picks: usize) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for _ in 0..picks {
            *counts.entry(wrr.pick().unwrap()).or_default() += 1;
        }
        counts
    }

    fn assert_near(counts: &HashMap<&str, usize>, key: &str, expected: usize, slack: usize) {
        let got = counts.get(key).copied().unwrap_or(0);
        assert!(got.abs_diff(expected) <= slack, "{key}: got {got}, expected {expected}±{slack}");
    }

    #[test]
    fn exact_proportions() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("a", 1), ("b", 2), ("c", 3)]);
        let c = counts(&mut wrr, 6000);
        assert_near(&c, "a", 1000, 1);
        assert_near(&c, "b", 2000, 1);
        assert_near(&c, "c", 3000, 1);
    }

    #[test]
    fn weight_change_midway_keeps_proportions() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("a", 1), ("b", 2), ("c", 3)]);
        counts(&mut wrr, 3001);
        wrr.update([("a", 3), ("b", 2), ("c", 1)]);
        let c = counts(&mut wrr, 6000);
        assert_near(&c, "a", 3000, 3);
        assert_near(&c, "b", 2000, 3);
        assert_near(&c, "c", 1000, 3);
    }

    #[test]
    fn smooth_interleaving() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("heavy", 5), ("light", 1)]);
        let (mut run, mut longest) = (0, 0);
        for _ in 0..600 {
            run = if wrr.pick() == Some("heavy") { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        assert_eq!(longest, 5);
    }

    #[test]
    fn long_runs_stay_exact_and_smooth() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("a", 3), ("b", 7), ("c", 10)]);
        let mut counts = HashMap::new();
        let (mut run, mut longest) = (0, 0);
        for _ in 0..200_000 {
            let key = wrr.pick().unwrap();
            *counts.entry(key).or_insert(0usize) += 1;
            run = if key == "c" { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        assert_near(&counts, "a", 30_000, 1);
        assert_near(&counts, "b", 70_000, 1);
        assert_near(&counts, "c", 100_000, 1);
        assert!(longest <= 2, "{longest}");
    }

    #[test]
    fn ties_follow_insertion_order() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("x", 1), ("y", 1), ("z", 1)]);
        let picks: Vec<_> = (0..6).map(|_| wrr.pick().unwrap()).collect();
        assert_eq!(picks, ["x", "y", "z", "x", "y", "z"]);
    }

    #[test]
    fn update_keeps_existing_deadlines() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("a", 1), ("b", 2), ("c", 3)]);
        counts(&mut wrr, 7);
        let mut updated = wrr.clone();
        updated.update([("c", 3), ("a", 1), ("b", 2)]);
        let before: Vec<_> = (0..50).map(|_| wrr.pick()).collect();
        let after: Vec<_> = (0..50).map(|_| updated.pick()).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn new_keys_start_at_current_time() {
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("old", 1)]);
        counts(&mut wrr, 100);
        wrr.update([("old", 1), ("new", 1)]);
        // "new" starts one period after now, tied with "old" but inserted later.
        let picks: Vec<_> = (0..4).map(|_| wrr.pick().unwrap()).collect();
        assert_eq!(picks, ["old", "new", "old", "new"]);
    }

    #[test]
    fn removal_zero_weight_and_duplicates() {
        let mut wrr = WeightedRoundRobin::new();
        assert!(wrr.is_empty());
        assert_eq!(wrr.pick(), None);
        wrr.update([("a", 1), ("b", 0), ("c", 2), ("c", 0), ("d", 0), ("d", 4)]);
        assert_eq!(wrr.len(), 2);
        let c = counts(&mut wrr, 500);
        assert_eq!(c.keys().count(), 2);
        assert_near(&c, "a", 100, 1);
        assert_near(&c, "d", 400, 1);
        wrr.update([("d", 4)]);
        assert!((0..10).all(|_| wrr.pick() == Some("d")));
        wrr.update([]);
        assert_eq!(wrr.pick(), None);
    }

    #[test]
    fn rebase_preserves_the_schedule() {
        // Power-of-two weights keep all deadline arithmetic exact.
        let mut wrr = WeightedRoundRobin::new();
        wrr.update([("a", 4), ("b", 2), ("c", 1)]);
        counts(&mut wrr, 123);
        let mut rebased = wrr.clone();
        rebased.rebase();
        assert_eq!(rebased.now, 0.0);
        let expected: Vec<_> = (0..200).map(|_| wrr.pick()).collect();
        let got: Vec<_> = (0..200).map(|_| rebased.pick()).collect();
        assert_eq!(expected, got);
    }
}
