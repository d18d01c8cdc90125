//! Counters the cache keeps for metrics, summaries and the simulator's reports.

use serde::Serialize;

/// Monotonic counters since the cache was built. Token counters come from matches; block
/// counters from evictions, admissions and promotions; byte counters from planned transfers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Calls to `match_*`.
    pub lookups: u64,
    /// Prompt tokens looked up.
    pub query_tokens: u64,
    /// Prompt tokens served from device-resident blocks.
    pub device_hit_tokens: u64,
    /// Prompt tokens served from host-resident blocks (loaded to the device).
    pub host_hit_tokens: u64,
    /// Prompt tokens not cached in either tier.
    pub miss_tokens: u64,
    /// Blocks evicted from the device tier.
    pub device_evicted_blocks: u64,
    /// Blocks evicted (dropped) from the host tier.
    pub host_evicted_blocks: u64,
    /// Device-evicted blocks admitted to the host tier.
    pub admitted_blocks: u64,
    /// Device-evicted blocks the admission rule turned away.
    pub rejected_blocks: u64,
    /// Blocks promoted host to device by `tick`.
    pub promoted_blocks: u64,
    /// Blocks copied to the host ahead of eviction.
    pub write_through_blocks: u64,
    /// Bytes of planned host-to-device transfers (hit loads and promotions).
    pub h2d_bytes: u64,
    /// Bytes of planned device-to-host transfers (admissions and write-through).
    pub d2h_bytes: u64,
    /// Transfers reported failed (loads are planned again, so their bytes count twice).
    pub failed_transfers: u64,
}

impl CacheStats {
    /// Fraction of looked-up prompt tokens that were cached in either tier.
    pub fn hit_ratio(&self) -> f64 {
        ratio(
            self.device_hit_tokens + self.host_hit_tokens,
            self.query_tokens,
        )
    }
    /// Fraction of looked-up prompt tokens served from the device tier.
    pub fn device_hit_ratio(&self) -> f64 {
        ratio(self.device_hit_tokens, self.query_tokens)
    }
    /// Fraction of looked-up prompt tokens served from the host tier.
    pub fn host_hit_ratio(&self) -> f64 {
        ratio(self.host_hit_tokens, self.query_tokens)
    }
    /// Every counter divided by `n` (rounded down), for the mean of `n` runs or replicas.
    pub fn div(&self, n: u64) -> CacheStats {
        let n = n.max(1);
        CacheStats {
            lookups: self.lookups / n,
            query_tokens: self.query_tokens / n,
            device_hit_tokens: self.device_hit_tokens / n,
            host_hit_tokens: self.host_hit_tokens / n,
            miss_tokens: self.miss_tokens / n,
            device_evicted_blocks: self.device_evicted_blocks / n,
            host_evicted_blocks: self.host_evicted_blocks / n,
            admitted_blocks: self.admitted_blocks / n,
            rejected_blocks: self.rejected_blocks / n,
            promoted_blocks: self.promoted_blocks / n,
            write_through_blocks: self.write_through_blocks / n,
            h2d_bytes: self.h2d_bytes / n,
            d2h_bytes: self.d2h_bytes / n,
            failed_transfers: self.failed_transfers / n,
        }
    }

    /// Adds another cache's counters (for cluster totals).
    pub fn add(&mut self, o: &CacheStats) {
        self.lookups += o.lookups;
        self.query_tokens += o.query_tokens;
        self.device_hit_tokens += o.device_hit_tokens;
        self.host_hit_tokens += o.host_hit_tokens;
        self.miss_tokens += o.miss_tokens;
        self.device_evicted_blocks += o.device_evicted_blocks;
        self.host_evicted_blocks += o.host_evicted_blocks;
        self.admitted_blocks += o.admitted_blocks;
        self.rejected_blocks += o.rejected_blocks;
        self.promoted_blocks += o.promoted_blocks;
        self.write_through_blocks += o.write_through_blocks;
        self.h2d_bytes += o.h2d_bytes;
        self.d2h_bytes += o.d2h_bytes;
        self.failed_transfers += o.failed_transfers;
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}
