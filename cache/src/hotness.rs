//! Exponentially decayed access counts, stored so that comparing two nodes never needs a decay.
//!
//! A node's hotness at time `t` is `H(t) = sum over accesses a of 2^(-(t - t_a) / half_life)`:
//! every access adds 1 and the total halves every `half_life` seconds. Instead of the pair
//! (value, last update) we keep the single number `key = log2(H(t)) + t / half_life`, which does
//! not change while time passes (decay shifts both terms equally). Hence
//! - reading the hotness at any time is O(1): `H(t) = 2^(key - t / half_life)`;
//! - the order of two nodes by hotness is the order of their keys and never changes between
//!   accesses, so eviction candidates can live in ordered sets keyed by it;
//! - an access at time `t` sets `key = t / half_life + log2(1 + 2^(key - t / half_life))`.

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
    /// Records one access at time `now` (seconds).
    pub fn touch(&mut self, now: f64, half_life_s: f64) {
        let base = now / half_life_s;
        let current = (self.key - base).exp2();
        self.key = base + (1.0 + current).log2();
    }

    /// The decayed access count at time `now`.
    pub fn value_at(&self, now: f64, half_life_s: f64) -> f64 {
        (self.key - now / half_life_s).exp2()
    }

    /// The time-invariant ordering key, `log2(H(t)) + t / half_life`.
    pub fn key(&self) -> f64 {
        self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_adds_one_and_halves_every_half_life() {
        let mut h = Hotness::default();
        assert_eq!(h.value_at(0.0, 10.0), 0.0);
        h.touch(0.0, 10.0);
        assert!((h.value_at(0.0, 10.0) - 1.0).abs() < 1e-12);
        assert!((h.value_at(10.0, 10.0) - 0.5).abs() < 1e-12);
        h.touch(10.0, 10.0);
        assert!((h.value_at(10.0, 10.0) - 1.5).abs() < 1e-12);
        assert!((h.value_at(30.0, 10.0) - 0.375).abs() < 1e-12);
    }

    #[test]
    fn order_is_time_invariant() {
        let mut old_hot = Hotness::default();
        for _ in 0..4 {
            old_hot.touch(0.0, 10.0);
        }
        let mut fresh = Hotness::default();
        fresh.touch(25.0, 10.0);
        // At t=25, 4 accesses 2.5 half-lives ago are worth 4/2^2.5 = 0.707 < 1.
        assert!(fresh.key() > old_hot.key());
        assert!(fresh.value_at(100.0, 10.0) > old_hot.value_at(100.0, 10.0));
    }

    #[test]
    fn large_times_stay_finite() {
        let mut h = Hotness::default();
        for i in 0..1000 {
            h.touch(1e7 + i as f64, 600.0);
        }
        assert!(h.key().is_finite());
        // Sum of 2^(-k/600) for k = 1..=1000 is about 592.
        let v = h.value_at(1e7 + 1000.0, 600.0);
        assert!((v - 592.0).abs() < 1.0, "{v}");
    }
}
