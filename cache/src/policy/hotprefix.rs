//! `hotprefix`: hotness-aware scheduling after the HotPrefix paper (SIGMOD 2025).
//!
//! - Eviction from either tier removes the unlocked leaf with the lowest *value*, where value is
//!   the decayed hotness weighted by what a miss on the node would cost (see [`crate`] docs).
//! - Selective admission: a node evicted from the device goes to the host only if its current
//!   hotness clears `admission_floor` and, when the host is full, its value beats the value of
//!   every host node it would displace. The threshold adapts by itself: it is the value of the
//!   host's coldest resident node, which rises when the host fills with hot prefixes and falls as
//!   they cool.
//! - Promotion (opt-in, `promotion_budget_bytes > 0`): every `promotion_interval_s` the hottest
//!   host-only nodes whose parent is on the device are loaded back, top-down, within a byte
//!   budget. Without `promotion_margin` it only fills free device slots; with it, it may also
//!   displace device leaves worth `2^promotion_margin` times less.
//! - Write-through (opt-in, `write_through_hotness`): once the device is nearly full, a device
//!   node whose hotness reaches the threshold is copied to the host while still resident, so its
//!   eviction later costs no transfer and no admission.
//!
//! Hotness decays on the churn clock by default (half-life in cache turnovers), so the policy
//! behaves the same at any arrival rate. `HotnessConfig` documents each default and the
//! measurement behind it.

use super::{NodeInfo, Policy, Promotion};
use crate::config::{HotnessConfig, PolicyKind};

/// The hotness-aware policy.
#[derive(Debug, Clone)]
pub struct HotPrefixPolicy {
    cfg: HotnessConfig,
}

impl HotPrefixPolicy {
    /// A policy with the given knobs.
    pub fn new(cfg: HotnessConfig) -> Self {
        HotPrefixPolicy { cfg }
    }

    /// Value in the time-invariant log domain: `log2(hotness) + log2(depth weight)`.
    fn value(&self, n: &NodeInfo) -> f64 {
        let w = if self.cfg.depth_weight_tokens > 0.0 {
            (1.0 + n.depth_tokens as f64 / self.cfg.depth_weight_tokens).log2()
        } else {
            0.0
        };
        n.hotness.key() + w
    }
}

impl Policy for HotPrefixPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::HotPrefix
    }
    fn uses_host(&self) -> bool {
        true
    }
    fn device_priority(&self, n: &NodeInfo) -> f64 {
        self.value(n)
    }
    fn host_priority(&self, n: &NodeInfo) -> f64 {
        self.value(n)
    }
    fn admit(&self, n: &NodeInfo, now: f64, victim: Option<f64>) -> bool {
        if n.hotness.value_at(now) < self.cfg.admission_floor {
            return false;
        }
        victim.is_none_or(|v| self.value(n) > v)
    }
    fn promotion(&self) -> Option<Promotion> {
        (self.cfg.promotion_budget_bytes > 0).then_some(Promotion {
            interval_s: self.cfg.promotion_interval_s,
            budget_bytes: self.cfg.promotion_budget_bytes,
            margin: self.cfg.promotion_margin,
        })
    }
    fn uses_queue_hints(&self) -> bool {
        self.cfg.queue_hints
    }
    fn write_through(&self, n: &NodeInfo, now: f64) -> bool {
        self.cfg
            .write_through_hotness
            .is_some_and(|t| n.hotness.value_at(now) >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hotness::Hotness;

    fn info(accesses_at: &[f64], depth_tokens: u64) -> NodeInfo {
        let mut h = Hotness::default();
        for &t in accesses_at {
            h.touch(t / 600.0);
        }
        NodeInfo {
            hotness: h,
            last_access: 0.0,
            accesses: accesses_at.len() as u32,
            depth_tokens,
        }
    }

    #[test]
    fn admission_needs_the_floor_and_to_beat_the_victim() {
        let p = HotPrefixPolicy::new(HotnessConfig {
            admission_floor: 1.5,
            ..Default::default()
        });
        let once = info(&[0.0], 0);
        let thrice = info(&[0.0, 1.0, 2.0], 0);
        // The policy reads the clock in half-lives: 3 s at a 600 s half-life.
        let now = 3.0 / 600.0;
        assert!(
            !p.admit(&once, now, None),
            "one access is below the 1.5 floor"
        );
        assert!(p.admit(&thrice, now, None));
        let hot_victim = p.host_priority(&info(&[2.0, 2.0, 2.0, 2.0], 0));
        assert!(!p.admit(&thrice, now, Some(hot_victim)));
        let cold_victim = p.host_priority(&info(&[0.0, 0.0], 0));
        assert!(p.admit(&thrice, now, Some(cold_victim)));
    }

    #[test]
    fn deeper_prefixes_are_worth_more_at_equal_hotness() {
        let p = HotPrefixPolicy::new(HotnessConfig {
            depth_weight_tokens: 30_000.0,
            ..HotnessConfig::default()
        });
        assert!(p.device_priority(&info(&[1.0], 20_000)) > p.device_priority(&info(&[1.0], 16)));
    }
}
