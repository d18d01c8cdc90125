//! The router's Prometheus metrics: requests by policy, replica and status, routing decision
//! latency, matched prefix blocks, fallbacks, retries, replica health and the Redis feed state.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};

use hotprefix_engine::metrics::Histogram;

use crate::redis_feed::FeedStatus;
use crate::registry::ReplicaStatus;

const DECISION_BUCKETS: [f64; 10] = [
    1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 5e-3, 2.5e-2,
];
const BLOCK_BUCKETS: [f64; 10] = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];

#[derive(Debug)]
struct Inner {
    /// (policy, replica, status) -> count.
    requests: BTreeMap<(String, String, u16), u64>,
    decision: Histogram,
    matched: Histogram,
    /// reason -> count.
    fallbacks: BTreeMap<&'static str, u64>,
    /// reason -> count.
    decisions: BTreeMap<&'static str, u64>,
    retries: u64,
    unavailable: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct RouterMetrics {
    inner: Mutex<Inner>,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        RouterMetrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                decision: Histogram::new(&DECISION_BUCKETS),
                matched: Histogram::new(&BLOCK_BUCKETS),
                fallbacks: BTreeMap::new(),
                decisions: BTreeMap::new(),
                retries: 0,
                unavailable: 0,
            }),
        }
    }
}

impl RouterMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A routing decision: how long it took, its reason and the chosen replica's matched blocks.
    pub fn decision(&self, seconds: f64, reason: &'static str, matched_blocks: usize) {
        let mut g = self.lock();
        g.decision.observe(seconds);
        g.matched.observe(matched_blocks as f64);
        *g.decisions.entry(reason).or_default() += 1;
    }

    /// A request answered with `status` by `replica` (empty when none was reached).
    pub fn request(&self, policy: &str, replica: &str, status: u16) {
        *self
            .lock()
            .requests
            .entry((policy.to_string(), replica.to_string(), status))
            .or_default() += 1;
    }

    /// The configured policy could not be used (e.g. no summaries while Redis is down).
    pub fn fallback(&self, reason: &'static str) {
        *self.lock().fallbacks.entry(reason).or_default() += 1;
    }

    /// A request retried on another replica.
    pub fn retry(&self) {
        self.lock().retries += 1;
    }

    /// A request refused because no replica was available.
    pub fn unavailable(&self) {
        self.lock().unavailable += 1;
    }

    /// The text exposition.
    pub fn render(&self, replicas: &[ReplicaStatus], feed: Option<&FeedStatus>) -> String {
        let g = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_requests_total Requests by policy, replica and status.\n\
             # TYPE hotprefix_router_requests_total counter"
        );
        for ((policy, replica, status), n) in &g.requests {
            let _ = writeln!(
                out,
                "hotprefix_router_requests_total{{policy=\"{policy}\",replica=\"{replica}\",\
                 status=\"{status}\"}} {n}"
            );
        }
        g.decision.render(
            &mut out,
            "hotprefix_router_decision_seconds",
            "Time to choose a replica (tokenizing excluded).",
        );
        g.matched.render(
            &mut out,
            "hotprefix_router_matched_blocks",
            "Prefix blocks the chosen replica holds, per request.",
        );
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_decisions_total Decisions by reason.\n\
             # TYPE hotprefix_router_decisions_total counter"
        );
        for (reason, n) in &g.decisions {
            let _ = writeln!(
                out,
                "hotprefix_router_decisions_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_fallbacks_total Requests routed by the fallback policy.\n\
             # TYPE hotprefix_router_fallbacks_total counter"
        );
        for (reason, n) in &g.fallbacks {
            let _ = writeln!(
                out,
                "hotprefix_router_fallbacks_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_retries_total Requests retried on another replica.\n\
             # TYPE hotprefix_router_retries_total counter\nhotprefix_router_retries_total {}\n\
             # HELP hotprefix_router_unavailable_total Requests refused: no replica available.\n\
             # TYPE hotprefix_router_unavailable_total counter\n\
             hotprefix_router_unavailable_total {}",
            g.retries, g.unavailable
        );
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_replica_up Whether a replica is healthy (1) or ejected (0).\n\
             # TYPE hotprefix_router_replica_up gauge"
        );
        for r in replicas {
            let _ = writeln!(
                out,
                "hotprefix_router_replica_up{{replica=\"{}\"}} {}",
                r.id,
                u8::from(r.healthy)
            );
        }
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_replica_in_flight Requests in flight per replica.\n\
             # TYPE hotprefix_router_replica_in_flight gauge"
        );
        for r in replicas {
            let _ = writeln!(
                out,
                "hotprefix_router_replica_in_flight{{replica=\"{}\"}} {}",
                r.id, r.in_flight
            );
        }
        let _ = writeln!(
            out,
            "# HELP hotprefix_router_redis_up Whether the Redis feed is connected (absent without \
             Redis).\n# TYPE hotprefix_router_redis_up gauge"
        );
        if let Some(f) = feed {
            let _ = writeln!(
                out,
                "hotprefix_router_redis_up {}\n\
                 # HELP hotprefix_router_redis_errors_total Failed Redis sessions.\n\
                 # TYPE hotprefix_router_redis_errors_total counter\n\
                 hotprefix_router_redis_errors_total {}\n\
                 # HELP hotprefix_router_redis_announcements_total Announcements received.\n\
                 # TYPE hotprefix_router_redis_announcements_total counter\n\
                 hotprefix_router_redis_announcements_total {}",
                u8::from(f.up.load(Ordering::Relaxed)),
                f.errors.load(Ordering::Relaxed),
                f.announcements.load(Ordering::Relaxed)
            );
        }
        out
    }
}
