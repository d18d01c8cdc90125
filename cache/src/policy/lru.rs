//! `lru`: device tier only, evict the least recently used unlocked leaf (SGLang RadixAttention).

use super::{NodeInfo, Policy};
use crate::config::PolicyKind;

/// Device-only leaf LRU.
#[derive(Debug, Clone, Copy, Default)]
pub struct LruPolicy;

impl Policy for LruPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }
    fn uses_host(&self) -> bool {
        false
    }
    fn device_priority(&self, n: &NodeInfo) -> f64 {
        n.last_access
    }
    fn host_priority(&self, n: &NodeInfo) -> f64 {
        n.last_access
    }
    fn admit(&self, _n: &NodeInfo, _now: f64, _victim: Option<f64>) -> bool {
        false
    }
}
