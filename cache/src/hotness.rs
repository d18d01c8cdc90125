//! Exponentially decayed access counts, stored so that comparing two nodes never needs a decay.
//!
//! Time is measured by a `HotClock` in *half-lives*: `u(t)` grows by one each time a half-life
//! passes (of wall time, or of cache churn). A node's hotness at clock `u` is
//! `H(u) = sum over accesses a of 2^-(u - u_a)`: every access adds 1 and the total halves every
//! half-life. Instead of the pair (value, last update) we keep the single number
//! `key = log2(H(u)) + u`, which does not change while time passes (decay shifts both terms
//! equally). Hence
//! - reading the hotness at any time is O(1): `H(u) = 2^(key - u)`;
//! - the order of two nodes by hotness is the order of their keys and never changes between
//!   accesses, so eviction candidates can live in ordered sets keyed by it;
//! - an access at clock `u` sets `key = u + log2(1 + 2^(key - u))`.

/// A decayed access count in the time-invariant log domain (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hotness {
    key: f64,
}

impl Default for Hotness {
    /// Never accessed: hotness zero, colder than anything accessed.
    fn default() -> Self {
        Hotness {
            key: f64::NEG_INFINITY,
        }
    }
}

impl Hotness {
    /// Records one access at clock `u` (half-lives).
    pub fn touch(&mut self, u: f64) {
        let current = (self.key - u).exp2();
        self.key = u + (1.0 + current).log2();
    }

    /// The decayed access count at clock `u` (half-lives).
    pub fn value_at(&self, u: f64) -> f64 {
        (self.key - u).exp2()
    }

    /// The time-invariant ordering key, `log2(H(u)) + u`.
    pub fn key(&self) -> f64 {
        self.key
    }
}

/// The hotness clock: wall seconds, or blocks allocated, converted to half-lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HotClock {
    /// Input units per half-life: seconds, or blocks (turnovers times capacity).
    unit: f64,
}

impl HotClock {
    /// A clock whose half-life is `half_life` times `scale` input units (seconds with scale 1,
    /// or turnovers with the capacity in blocks as scale).
    pub(crate) fn new(half_life: f64, scale: f64) -> Self {
        HotClock {
            unit: half_life * scale,
        }
    }

    /// The clock in half-lives at `input` (seconds or allocated blocks).
    pub(crate) fn at(&self, input: f64) -> f64 {
        input / self.unit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_adds_one_and_halves_every_half_life() {
        let mut h = Hotness::default();
        assert_eq!(h.value_at(0.0), 0.0);
        h.touch(0.0);
        assert!((h.value_at(0.0) - 1.0).abs() < 1e-12);
        assert!((h.value_at(1.0) - 0.5).abs() < 1e-12);
        h.touch(1.0);
        assert!((h.value_at(1.0) - 1.5).abs() < 1e-12);
        assert!((h.value_at(3.0) - 0.375).abs() < 1e-12);
    }

    #[test]
    fn order_is_time_invariant() {
        let mut old_hot = Hotness::default();
        for _ in 0..4 {
            old_hot.touch(0.0);
        }
        let mut fresh = Hotness::default();
        fresh.touch(2.5);
        // At 2.5 half-lives, 4 accesses at 0 are worth 4/2^2.5 = 0.707 < 1.
        assert!(fresh.key() > old_hot.key());
        assert!(fresh.value_at(10.0) > old_hot.value_at(10.0));
    }

    #[test]
    fn large_times_stay_finite() {
        let mut h = Hotness::default();
        for i in 0..1000 {
            h.touch((1e7 + i as f64) / 600.0);
        }
        assert!(h.key().is_finite());
        // Sum of 2^(-k/600) for k = 1..=1000 is about 592.
        let v = h.value_at((1e7 + 1000.0) / 600.0);
        assert!((v - 592.0).abs() < 1.0, "{v}");
    }

    #[test]
    fn the_clock_counts_half_lives() {
        assert_eq!(HotClock::new(10.0, 1.0).at(20.0), 2.0);
        // Two turnovers of a 100-block cache.
        assert_eq!(HotClock::new(2.0, 100.0).at(400.0), 2.0);
    }
}
