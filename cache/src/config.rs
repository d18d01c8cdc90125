//! Validated configuration of a [`crate::PrefixCache`]: capacities, block geometry and policy knobs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::CacheError;

/// Which eviction/admission/promotion policy drives the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Ours: coldest-leaf eviction, selective host admission, periodic promotion, write-through.
    HotPrefix,
    /// Device only, leaf LRU (SGLang RadixAttention).
    Lru,
    /// LRU on both tiers, every device eviction written to host (SGLang HiCache write-back).
    LruOffload,
    /// Host admission only for blocks seen at least twice, LRU host (vLLM offloading connector).
    ReuseOffload,
}

impl PolicyKind {
    /// All policies, in the order reports list them.
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::HotPrefix,
        PolicyKind::Lru,
        PolicyKind::LruOffload,
        PolicyKind::ReuseOffload,
    ];

    /// The name used on command lines and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::HotPrefix => "hotprefix",
            PolicyKind::Lru => "lru",
            PolicyKind::LruOffload => "lru-offload",
            PolicyKind::ReuseOffload => "reuse-offload",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            CacheError::InvalidConfig(format!(
                "unknown cache policy {s:?}; expected one of hotprefix, lru, lru-offload, reuse-offload"
            ))
        })
    }
}

/// Knobs of the hotness model and of the `hotprefix` policy. The baselines read only
/// `half_life_s` (for the hotness they report in summaries).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HotnessConfig {
    /// Half-life of the exponentially decayed access count, in seconds, when
    /// `half_life_turnovers` is `None`. The design notes found hit ratios flat between 200 s and
    /// 1,200 s on one tier; 600 s sits in the middle.
    pub half_life_s: f64,
    /// If set, hotness decays on a *churn clock* instead of wall time: the clock advances by one
    /// each time the cache has allocated as many new blocks as both tiers hold, and the half-life
    /// is this many turnovers. Frequency older than what the cache can remember is worthless,
    /// and how long that is depends on capacity and load; the churn clock adapts to both, so one
    /// setting serves a small GPU under heavy load and a large one idling. `half_life_s` is then
    /// unused. Default: 2 turnovers. Measured on the Mooncake traces (docs/benchmarks.md), 2
    /// sat in the flat part of the range 0.25 to 8 on both traces, while the best wall-clock
    /// half-life differed by trace and by load.
    pub half_life_turnovers: Option<f64>,

    /// Minimum current hotness (decayed accesses) a node evicted from the device needs to be
    /// admitted to the host tier. The default 0.5 admits a node accessed once within the last
    /// half-life; a single access decays below 1.0 at once, so a floor of 1.0 would silently turn
    /// into a "seen twice" filter.
    pub admission_floor: f64,
    /// How often [`crate::PrefixCache::tick`] promotes hot host-only prefixes, in seconds.
    pub promotion_interval_s: f64,
    /// Bytes the promotions of one interval may move host to device; 0 (the default) turns
    /// promotion off. In this design a host-only node gains no hotness while on the host (any
    /// access loads it), so promotion can only bring back nodes that were once judged colder
    /// than the device's residents; it pays when a burst of one-off prompts displaced frequently
    /// used ones (scan resistance). On the Mooncake traces it lowered hit ratios and raised TTFT
    /// at every budget tried (docs/benchmarks.md), so it is opt-in.
    pub promotion_budget_bytes: u64,
    /// Nodes at least this hot are copied to host while still on the device, so evicting them
    /// later costs no transfer. `None` disables write-through.
    pub write_through_hotness: Option<f64>,
    /// Cost weighting by depth: a block at token depth `d` is worth `1 + d / depth_weight_tokens`
    /// times a block at the root, because recomputing it also pays attention over `d` tokens of
    /// context. Zero (the default) disables the weighting: on the Mooncake conversation trace
    /// it lowered the hit ratio (0.081 with 30,000 against 0.098 without, single tier of 4,168
    /// 512-token blocks), because deep blocks are reused less often than their higher recompute
    /// cost pays back.
    pub depth_weight_tokens: f64,
    /// Whether and how promotion may displace device nodes. `None` (the default): promotion
    /// only fills free device slots, using idle host-link bandwidth and never evicting anything.
    /// `Some(m)`: a host-only node may displace device nodes worth `2^m` times less (hysteresis:
    /// without it a node promoted over a slightly colder one sends that one to the host, which
    /// can come back the same way). Measured on the Mooncake traces, displacing promotion lowered
    /// hit ratios and raised TTFT at every budget tried (docs/benchmarks.md), because it trades
    /// recently used device blocks for blocks that were hot long ago.
    pub promotion_margin: Option<f64>,
    /// Count a queued request (`PrefixCache::hint_queued`) as an access of its cached prefix.
    pub queue_hints: bool,
}

impl Default for HotnessConfig {
    fn default() -> Self {
        HotnessConfig {
            half_life_s: 600.0,
            half_life_turnovers: Some(2.0),
            admission_floor: 0.5,
            promotion_interval_s: 1.0,
            promotion_budget_bytes: 0,
            write_through_hotness: None,
            depth_weight_tokens: 0.0,
            promotion_margin: None,
            queue_hints: true,
        }
    }
}

/// Everything a [`crate::PrefixCache`] needs to be built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Bytes of KV one block occupies (all layers, K and V); used for byte counters and budgets.
    pub block_bytes: u64,
    /// Block slots in the device tier.
    pub device_blocks: u32,
    /// Block slots in the host tier (ignored by `lru`, which has no host tier).
    pub host_blocks: u32,
    /// The policy.
    pub policy: PolicyKind,
    /// Hotness and `hotprefix` knobs.
    pub hotness: HotnessConfig,
}

impl CacheConfig {
    /// A configuration with default hotness knobs.
    pub fn new(
        policy: PolicyKind,
        block_tokens: usize,
        block_bytes: u64,
        device_blocks: u32,
        host_blocks: u32,
    ) -> Self {
        CacheConfig {
            block_tokens,
            block_bytes,
            device_blocks,
            host_blocks,
            policy,
            hotness: HotnessConfig::default(),
        }
    }

    /// Checks ranges and cross-field constraints.
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |m: String| Err(CacheError::InvalidConfig(m));
        if self.block_tokens == 0 {
            return bad("block_tokens must be at least 1".into());
        }
        if self.block_bytes == 0 {
            return bad("block_bytes must be at least 1".into());
        }
        if self.device_blocks == 0 {
            return bad("device_blocks must be at least 1".into());
        }
        if self.device_blocks == u32::MAX || self.host_blocks == u32::MAX {
            return bad("tier capacities must be below 2^32 - 1 blocks".into());
        }
        let h = &self.hotness;
        if !(h.half_life_s.is_finite() && h.half_life_s > 0.0) {
            return bad(format!(
                "half_life_s must be positive and finite, got {}",
                h.half_life_s
            ));
        }
        if let Some(t) = h.half_life_turnovers
            && !(t.is_finite() && t > 0.0)
        {
            return bad(format!(
                "half_life_turnovers must be positive and finite, got {t}"
            ));
        }
        if !(h.admission_floor.is_finite() && h.admission_floor >= 0.0) {
            return bad(format!(
                "admission_floor must be >= 0, got {}",
                h.admission_floor
            ));
        }
        if !(h.promotion_interval_s.is_finite() && h.promotion_interval_s > 0.0) {
            return bad(format!(
                "promotion_interval_s must be positive and finite, got {}",
                h.promotion_interval_s
            ));
        }
        if let Some(w) = h.write_through_hotness
            && !(w.is_finite() && w > 0.0)
        {
            return bad(format!("write_through_hotness must be positive, got {w}"));
        }
        if let Some(m) = h.promotion_margin
            && !(m.is_finite() && m >= 0.0)
        {
            return bad(format!("promotion_margin must be >= 0, got {m}"));
        }
        if !(h.depth_weight_tokens.is_finite() && h.depth_weight_tokens >= 0.0) {
            return bad(format!(
                "depth_weight_tokens must be >= 0, got {}",
                h.depth_weight_tokens
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        for p in PolicyKind::ALL {
            assert_eq!(p.as_str().parse::<PolicyKind>().unwrap(), p);
        }
        let err = "fifo".parse::<PolicyKind>().unwrap_err().to_string();
        assert!(err.contains("unknown cache policy \"fifo\""), "{err}");
    }

    #[test]
    fn validation_rejects_nonsense() {
        let ok = CacheConfig::new(PolicyKind::HotPrefix, 16, 1024, 10, 40);
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.block_tokens = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.device_blocks = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.hotness.half_life_s = f64::NAN;
        assert!(c.validate().is_err());
        let mut c = ok;
        c.hotness.write_through_hotness = Some(-1.0);
        assert!(c.validate().is_err());
    }
}
