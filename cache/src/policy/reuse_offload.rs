//! `reuse-offload`: LRU device tier; a node evicted from the device is stored on the host only if
//! it was accessed at least twice, and the host is LRU (vLLM's CPU offloading connector, which
//! stores a block only once it has been seen again).

use super::{NodeInfo, Policy};
use crate::config::PolicyKind;

/// Accesses a node needs before it is worth a host copy.
pub const REUSE_THRESHOLD: u32 = 2;

/// LRU with a "seen twice" host admission filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReuseOffloadPolicy;

impl Policy for ReuseOffloadPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::ReuseOffload
    }
    fn uses_host(&self) -> bool {
        true
    }
    fn device_priority(&self, n: &NodeInfo) -> f64 {
        n.last_access
    }
    fn host_priority(&self, n: &NodeInfo) -> f64 {
        n.last_access
    }
    fn admit(&self, n: &NodeInfo, _now: f64, _victim: Option<f64>) -> bool {
        n.accesses >= REUSE_THRESHOLD
    }
}
