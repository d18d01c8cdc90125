//! `lru-offload`: LRU on both tiers; every node evicted from the device is written to the host,
//! displacing the host's least recently used node (SGLang HiCache write-back).

use super::{NodeInfo, Policy};
use crate::config::PolicyKind;

/// Two-tier LRU with unconditional host admission.
#[derive(Debug, Clone, Copy, Default)]
pub struct LruOffloadPolicy;

impl Policy for LruOffloadPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LruOffload
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
    fn admit(&self, _n: &NodeInfo, _now: f64, _victim: Option<f64>) -> bool {
        true
    }
}
