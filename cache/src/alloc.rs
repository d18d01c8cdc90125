//! Fixed-capacity block slot allocators, one per tier.

use serde::{Deserialize, Serialize};

/// Index of one block slot in a tier's pool. The engine maps it to memory (device pool offset or
/// host arena offset); the cache only counts and hands out slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SlotId(pub u32);

/// A free list over `0..capacity`. Slots come out lowest first on a fresh pool, which keeps a
/// lightly used pool's memory footprint compact.
#[derive(Debug, Clone)]
pub(crate) struct SlotPool {
    free: Vec<SlotId>,
    capacity: u32,
}

impl SlotPool {
    pub(crate) fn new(capacity: u32) -> Self {
        SlotPool {
            free: (0..capacity).rev().map(SlotId).collect(),
            capacity,
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(crate) fn free_count(&self) -> usize {
        self.free.len()
    }

    /// The free slots, for invariant checks.
    pub(crate) fn free_slots(&self) -> &[SlotId] {
        &self.free
    }

    /// Takes `n` slots, or none if fewer than `n` are free.
    pub(crate) fn take(&mut self, n: usize) -> Option<Vec<SlotId>> {
        if self.free.len() < n {
            return None;
        }
        let at = self.free.len() - n;
        let mut out = self.free.split_off(at);
        out.reverse();
        Some(out)
    }

    /// Returns slots to the pool.
    pub(crate) fn give_back(&mut self, slots: impl IntoIterator<Item = SlotId>) {
        self.free.extend(slots);
        debug_assert!(
            self.free.len() <= self.capacity as usize,
            "slot pool over-freed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_lowest_first_and_refuses_overdraw() {
        let mut p = SlotPool::new(4);
        assert_eq!(p.take(2).unwrap(), vec![SlotId(0), SlotId(1)]);
        assert!(p.take(3).is_none());
        assert_eq!(p.free_count(), 2);
        p.give_back([SlotId(1)]);
        assert_eq!(p.take(3).unwrap().len(), 3);
        assert_eq!(p.free_count(), 0);
        assert_eq!(p.capacity(), 4);
    }
}
