//! Cache policies: which node to evict from each tier, what the host tier admits, and what gets
//! promoted back to the device. One trait, one file per implementation, built by [`build`].
//!
//! Policies only *rank* and *decide*; the tree mechanics (locks, residency, transfers, counters)
//! live in [`crate::PrefixCache`] and are identical for every policy, so the comparison between
//! policies is a comparison of decisions alone.

mod hotprefix;
mod lru;
mod lru_offload;
mod reuse_offload;

pub use hotprefix::HotPrefixPolicy;
pub use lru::LruPolicy;
pub use lru_offload::LruOffloadPolicy;
pub use reuse_offload::ReuseOffloadPolicy;

use crate::config::{HotnessConfig, PolicyKind};
use crate::hotness::Hotness;

/// What a policy may know about a node when ranking it. Everything here changes only when the
/// node is accessed or split, which is what lets the cache keep candidates in ordered sets.
#[derive(Clone, Copy, Debug)]
pub struct NodeInfo {
    /// Decayed access count, stored time-invariantly (see [`Hotness`]).
    pub hotness: Hotness,
    /// Time of the last access, seconds.
    pub last_access: f64,
    /// Number of accesses ever (matches plus inserts), for "seen twice" rules.
    pub accesses: u32,
    /// Token depth of the node's last block from the root.
    pub depth_tokens: u64,
}

/// Settings of periodic promotion, for the policies that promote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Promotion {
    /// Seconds between promotion rounds.
    pub interval_s: f64,
    /// Bytes one round may move from host to device.
    pub budget_bytes: u64,
    /// How much more (in the log2 priority domain) a candidate must be worth than every device
    /// node it displaces; `None`: promotion only fills free device slots.
    pub margin: Option<f64>,
}

/// A cache policy. Priorities are "keep" scores: the node with the *lowest* priority in a tier is
/// evicted first. A priority must depend only on [`NodeInfo`], so that it changes only when the
/// node is accessed; the cache re-ranks a node exactly then.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;
    /// Whether the host tier is used at all.
    fn uses_host(&self) -> bool;
    /// Keep score on the device tier.
    fn device_priority(&self, n: &NodeInfo) -> f64;
    /// Keep score on the host tier.
    fn host_priority(&self, n: &NodeInfo) -> f64;
    /// Whether a node being evicted from the device is written to the host. `now` is the
    /// hotness clock, in half-lives (see [`Hotness`]). `victim` is the host
    /// priority of the node that would have to make room, or `None` when the host has room.
    /// Called once per victim needed; every call must agree for the node to be admitted.
    fn admit(&self, n: &NodeInfo, now: f64, victim: Option<f64>) -> bool;
    /// Periodic promotion, if this policy promotes.
    fn promotion(&self) -> Option<Promotion> {
        None
    }
    /// Whether [`crate::PrefixCache::hint_queued`] counts a queued request as an access.
    fn uses_queue_hints(&self) -> bool {
        false
    }
    /// Whether a device node that has just been accessed should also be copied to the host now
    /// (`now` in half-lives).
    fn write_through(&self, _n: &NodeInfo, _now: f64) -> bool {
        false
    }
}

/// Builds the policy selected by `kind`.
pub fn build(kind: PolicyKind, hotness: &HotnessConfig) -> Box<dyn Policy> {
    match kind {
        PolicyKind::HotPrefix => Box::new(HotPrefixPolicy::new(hotness.clone())),
        PolicyKind::Lru => Box::new(LruPolicy),
        PolicyKind::LruOffload => Box::new(LruOffloadPolicy),
        PolicyKind::ReuseOffload => Box::new(ReuseOffloadPolicy),
    }
}
