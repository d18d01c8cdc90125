//! The operator's Prometheus metrics, rendered in the text exposition format at `/metrics`:
//! reconciliations and their failures by kind, reconcile latency, leadership, and the
//! HotPrefixServices by phase.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Upper bounds of the reconcile latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default)]
struct Inner {
    reconciles: u64,
    failures: BTreeMap<&'static str, u64>,
    bucket_counts: [u64; BUCKETS.len()],
    duration_sum: f64,
    duration_count: u64,
    leader: bool,
    /// `namespace/name` -> phase of every HotPrefixService last reconciled.
    phases: BTreeMap<String, &'static str>,
}

/// Everything `/metrics` reports; shared by the controller and the HTTP server.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Counters stay meaningful after a panic elsewhere; never propagate the poison.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one finished reconciliation and its duration.
    pub fn reconciled(&self, took: Duration) {
        let mut m = self.lock();
        m.reconciles += 1;
        let s = took.as_secs_f64();
        for (b, c) in BUCKETS.iter().zip(m.bucket_counts.iter_mut()) {
            if s <= *b {
                *c += 1;
            }
        }
        m.duration_sum += s;
        m.duration_count += 1;
    }

    /// Counts a failed reconciliation of `kind` (the error's label).
    pub fn failed(&self, kind: &'static str) {
        *self.lock().failures.entry(kind).or_default() += 1;
    }

    /// Records whether this process holds the lease.
    pub fn set_leader(&self, leader: bool) {
        self.lock().leader = leader;
    }

    /// Whether this process holds the lease (or runs without leader election).
    pub fn is_leader(&self) -> bool {
        self.lock().leader
    }

    /// Records the phase of a HotPrefixService.
    pub fn set_phase(&self, key: String, phase: &'static str) {
        self.lock().phases.insert(key, phase);
    }

    /// Forgets a HotPrefixService that no longer exists.
    pub fn forget(&self, key: &str) {
        self.lock().phases.remove(key);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hotprefix_operator_reconciliations_total Reconciliations of HotPrefixServices.\n\
             # TYPE hotprefix_operator_reconciliations_total counter\n\
             hotprefix_operator_reconciliations_total {}",
            m.reconciles
        );
        let _ = writeln!(
            out,
            "# HELP hotprefix_operator_reconcile_failures_total Failed reconciliations by kind.\n\
             # TYPE hotprefix_operator_reconcile_failures_total counter"
        );
        for (kind, n) in &m.failures {
            let _ = writeln!(
                out,
                "hotprefix_operator_reconcile_failures_total{{kind=\"{kind}\"}} {n}"
            );
        }
        let name = "hotprefix_operator_reconcile_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time a reconciliation took.\n# TYPE {name} histogram"
        );
        for (b, c) in BUCKETS.iter().zip(&m.bucket_counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            m.duration_count, m.duration_sum, m.duration_count
        );
        let _ = writeln!(
            out,
            "# HELP hotprefix_operator_leader Whether this replica holds the leader lease.\n\
             # TYPE hotprefix_operator_leader gauge\n\
             hotprefix_operator_leader {}",
            u8::from(m.leader)
        );
        let _ = writeln!(
            out,
            "# HELP hotprefix_operator_services HotPrefixServices by phase.\n\
             # TYPE hotprefix_operator_services gauge"
        );
        let mut by_phase: BTreeMap<&str, u64> = ["Pending", "Progressing", "Ready", "Degraded"]
            .into_iter()
            .map(|p| (p, 0))
            .collect();
        for p in m.phases.values() {
            *by_phase.entry(p).or_default() += 1;
        }
        for (p, n) in by_phase {
            let _ = writeln!(out, "hotprefix_operator_services{{phase=\"{p}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histogram_and_gauges_render() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30));
        m.reconciled(Duration::from_secs(2));
        m.failed("apply");
        m.set_leader(true);
        m.set_phase("default/a".into(), "Ready");
        m.set_phase("default/b".into(), "Degraded");
        m.set_phase("default/b".into(), "Ready");
        m.set_phase("x/c".into(), "Progressing");
        m.forget("x/c");
        let text = m.render();
        for line in [
            "hotprefix_operator_reconciliations_total 2",
            "hotprefix_operator_reconcile_failures_total{kind=\"apply\"} 1",
            "hotprefix_operator_reconcile_duration_seconds_bucket{le=\"0.025\"} 0",
            "hotprefix_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1",
            "hotprefix_operator_reconcile_duration_seconds_bucket{le=\"2.5\"} 2",
            "hotprefix_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2",
            "hotprefix_operator_reconcile_duration_seconds_count 2",
            "hotprefix_operator_leader 1",
            "hotprefix_operator_services{phase=\"Ready\"} 2",
            "hotprefix_operator_services{phase=\"Progressing\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
