//! The router's live view of the replicas: where they are (static list, Redis registrations),
//! whether they are healthy, their latest load and summaries, and this router's own in-flight
//! counts. Feeds ([`crate::redis_feed`], [`crate::health`], the proxy) write it; each request
//! reads a snapshot of candidates from it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use hotprefix_protocol::cluster::{HotnessSummary, LoadReport, Registration};
use hotprefix_protocol::{ReplicaId, Salt};
use serde::Serialize;

use crate::cluster::{Candidate, PrefixIndex, ReplicaLoad};

/// Where a replica was learned from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `--replicas`.
    Static,
    /// A Redis registration.
    Redis,
    /// A Kubernetes EndpointSlice of the engines' Service.
    Kubernetes,
}

/// How a replica hashes its blocks (from its registration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashScheme {
    /// Tokens per block.
    pub block_size: usize,
    /// Salt of its hashes.
    pub salt: Salt,
}

/// Counters shared with in-flight requests (which outlive registry locks).
#[derive(Debug, Default)]
pub struct Flight {
    /// Requests this router is proxying to the replica now.
    pub active: AtomicU32,
    /// Requests sent since the replica's last load report.
    pub since_report: AtomicU32,
    /// Requests sent in total.
    pub sent: AtomicU64,
}

/// One replica.
#[derive(Debug)]
pub struct Replica {
    /// Its id.
    pub id: ReplicaId,
    /// Base URL, without a trailing slash.
    pub url: String,
    /// Where it came from.
    pub source: Source,
    /// The model it serves, when known.
    pub model: Option<String>,
    /// Its hash scheme, when known.
    pub scheme: Option<HashScheme>,
    /// Its registration's start time (a change means it restarted).
    pub started_at_ms: u64,
    /// When its registration was last read (Redis replicas).
    pub seen_at: Instant,
    /// Latest load report.
    pub load: Option<LoadReport>,
    /// Latest summary's sequence number.
    pub summary_seq: u64,
    /// When the latest summary arrived.
    pub summary_at: Option<Instant>,
    /// Health.
    pub healthy: bool,
    /// Consecutive failed probes or requests.
    pub failures: u32,
    /// In-flight counters.
    pub flight: Arc<Flight>,
}

impl Replica {
    /// A healthy replica with nothing known about it yet beyond where it is.
    fn new(id: ReplicaId, url: &str, source: Source) -> Replica {
        Replica {
            id,
            url: url.trim_end_matches('/').to_string(),
            source,
            model: None,
            scheme: None,
            started_at_ms: 0,
            seen_at: Instant::now(),
            load: None,
            summary_seq: 0,
            summary_at: None,
            healthy: true,
            failures: 0,
            flight: Arc::default(),
        }
    }
}

/// What `/debug` and `/health` show of a replica.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    /// Id.
    pub id: ReplicaId,
    /// URL.
    pub url: String,
    /// Source.
    pub source: Source,
    /// Model.
    pub model: Option<String>,
    /// Healthy (not ejected).
    pub healthy: bool,
    /// Requests in flight through this router.
    pub in_flight: u32,
    /// Blocks in its latest summary.
    pub summary_blocks: usize,
}

#[derive(Debug, Default)]
struct Inner {
    replicas: BTreeMap<ReplicaId, Replica>,
    index: PrefixIndex,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// Consecutive failures after which a replica is ejected.
    eject_after: u32,
}

/// A read view: candidates plus the index, valid while held.
#[derive(Debug)]
pub struct Snapshot<'a> {
    guard: RwLockReadGuard<'a, Inner>,
}

impl Snapshot<'_> {
    /// The merged prefix index.
    pub fn index(&self) -> &PrefixIndex {
        &self.guard.index
    }

    /// A replica by id.
    pub fn replica(&self, id: &ReplicaId) -> Option<&Replica> {
        self.guard.replicas.get(id)
    }

    /// Healthy replicas that serve `model` (replicas whose model is unknown serve anything),
    /// with their load. `use_reports` false ignores load reports (stale while Redis is down)
    /// and counts this router's active requests instead.
    pub fn candidates(&self, model: Option<&str>, use_reports: bool) -> Vec<Candidate> {
        self.guard
            .replicas
            .values()
            .filter(|r| r.healthy)
            .filter(|r| match (model, &r.model) {
                (Some(want), Some(has)) => want == has,
                _ => true,
            })
            .map(|r| Candidate {
                id: r.id.clone(),
                load: load_of(r, use_reports),
            })
            .collect()
    }

    /// Every replica's status.
    pub fn statuses(&self) -> Vec<ReplicaStatus> {
        self.guard
            .replicas
            .values()
            .map(|r| ReplicaStatus {
                id: r.id.clone(),
                url: r.url.clone(),
                source: r.source,
                model: r.model.clone(),
                healthy: r.healthy,
                in_flight: r.flight.active.load(Ordering::Relaxed),
                summary_blocks: self.guard.index.blocks_of(&r.id),
            })
            .collect()
    }
}

fn load_of(r: &Replica, use_reports: bool) -> ReplicaLoad {
    match (&r.load, use_reports) {
        (Some(l), true) => ReplicaLoad {
            waiting: l.waiting,
            running: l.running,
            pending_prefill_tokens: l.pending_prefill_tokens,
            device_utilisation: l.device_utilisation(),
            in_flight: r.flight.since_report.load(Ordering::Relaxed),
        },
        _ => ReplicaLoad {
            in_flight: r.flight.active.load(Ordering::Relaxed),
            ..ReplicaLoad::default()
        },
    }
}

/// The id a statically listed replica gets: its URL without the scheme.
pub fn static_id(url: &str) -> ReplicaId {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    ReplicaId(rest.trim_end_matches('/').to_string())
}

impl Registry {
    /// An empty registry ejecting replicas after `eject_after` consecutive failures.
    pub fn new(eject_after: u32) -> Registry {
        Registry {
            inner: RwLock::default(),
            eject_after: eject_after.max(1),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A read view.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            guard: self.inner.read().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Adds a statically listed replica (healthy until a probe says otherwise).
    pub fn add_static(&self, url: &str) -> ReplicaId {
        let id = static_id(url);
        let mut g = self.write();
        g.replicas
            .entry(id.clone())
            .or_insert_with(|| Replica::new(id.clone(), url, Source::Static));
        id
    }

    /// Makes the replicas of `source` exactly `members` (id, base URL): new ones are added
    /// healthy, missing ones removed, moved ones get their new URL. For discovery feeds that
    /// know the whole membership at once (Kubernetes EndpointSlices). A member already known
    /// from Redis keeps its registration (which carries more: model, hash scheme).
    pub fn set_members(&self, source: Source, members: &[(ReplicaId, String)]) {
        let mut g = self.write();
        let gone: Vec<ReplicaId> = g
            .replicas
            .values()
            .filter(|r| r.source == source && !members.iter().any(|(id, _)| *id == r.id))
            .map(|r| r.id.clone())
            .collect();
        for id in gone {
            g.replicas.remove(&id);
            g.index.remove(&id);
        }
        for (id, url) in members {
            let url = url.trim_end_matches('/').to_string();
            match g.replicas.get_mut(id) {
                Some(r) if r.source == source => r.url = url,
                Some(_) => {}
                None => {
                    g.replicas
                        .insert(id.clone(), Replica::new(id.clone(), &url, source));
                }
            }
        }
    }

    /// Applies a registration read from Redis. A restarted replica (new start time) has its
    /// sequence numbers and summary reset.
    pub fn register(&self, reg: &Registration) {
        let mut g = self.write();
        let scheme = HashScheme {
            block_size: reg.block_size as usize,
            salt: reg.salt,
        };
        let url = reg.url.trim_end_matches('/').to_string();
        let restarted = match g.replicas.get_mut(&reg.replica) {
            Some(r) => {
                let restarted = r.started_at_ms != reg.started_at_ms;
                r.url = url;
                r.model = Some(reg.model.clone());
                r.scheme = Some(scheme);
                r.source = Source::Redis;
                r.seen_at = Instant::now();
                if restarted {
                    r.started_at_ms = reg.started_at_ms;
                    r.load = None;
                    r.summary_seq = 0;
                    r.summary_at = None;
                }
                restarted
            }
            None => {
                let mut r = Replica::new(reg.replica.clone(), &url, Source::Redis);
                r.model = Some(reg.model.clone());
                r.scheme = Some(scheme);
                r.started_at_ms = reg.started_at_ms;
                g.replicas.insert(reg.replica.clone(), r);
                false
            }
        };
        if restarted {
            g.index.remove(&reg.replica);
        }
    }

    /// Applies a load report unless an equal or newer one was already applied.
    pub fn set_load(&self, id: &ReplicaId, load: LoadReport) -> bool {
        let mut g = self.write();
        let Some(r) = g.replicas.get_mut(id) else {
            return false;
        };
        if r.load.as_ref().is_some_and(|old| old.seq >= load.seq) {
            return false;
        }
        r.load = Some(load);
        r.flight.since_report.store(0, Ordering::Relaxed);
        true
    }

    /// Applies a summary unless an equal or newer one was already applied.
    pub fn set_summary(&self, id: &ReplicaId, s: &HotnessSummary) -> bool {
        let mut g = self.write();
        let Some(r) = g.replicas.get_mut(id) else {
            return false;
        };
        if r.summary_seq >= s.seq && r.summary_at.is_some() {
            return false;
        }
        r.summary_seq = s.seq;
        r.summary_at = Some(Instant::now());
        g.index.set_summary(id, &s.entries);
        true
    }

    /// Drops a replica learned from Redis (its registration expired or it left). Static
    /// replicas stay.
    pub fn remove_dynamic(&self, id: &ReplicaId) -> bool {
        let mut g = self.write();
        if g.replicas
            .get(id)
            .is_some_and(|r| r.source == Source::Redis)
        {
            g.replicas.remove(id);
            g.index.remove(id);
            true
        } else {
            false
        }
    }

    /// Drops replicas learned from Redis whose registration has not been read for `max_age`.
    /// Not the moment it is missing: a Redis that restarted empty holds no registration until
    /// the engines write theirs again (within a load interval), and dropping every replica in
    /// between would refuse requests for nothing.
    pub fn remove_stale_dynamic(&self, max_age: Duration) -> Vec<ReplicaId> {
        let mut g = self.write();
        let now = Instant::now();
        let stale: Vec<ReplicaId> = g
            .replicas
            .values()
            .filter(|r| r.source == Source::Redis && now.duration_since(r.seen_at) > max_age)
            .map(|r| r.id.clone())
            .collect();
        for id in &stale {
            g.replicas.remove(id);
            g.index.remove(id);
        }
        stale
    }

    /// Forgets every summary older than `max_age` (a replica whose summaries stopped while its
    /// registration lives on, or all of them while Redis is unreachable).
    pub fn expire_summaries(&self, max_age: Duration) {
        let mut g = self.write();
        let now = Instant::now();
        let stale: Vec<ReplicaId> = g
            .replicas
            .values()
            .filter(|r| {
                r.summary_at
                    .is_some_and(|t| now.duration_since(t) > max_age)
            })
            .map(|r| r.id.clone())
            .collect();
        for id in stale {
            if let Some(r) = g.replicas.get_mut(&id) {
                r.summary_at = None;
                r.summary_seq = 0;
            }
            g.index.remove(&id);
        }
    }

    /// Records a successful probe or request: the replica is healthy.
    pub fn mark_ok(&self, id: &ReplicaId) {
        let mut g = self.write();
        if let Some(r) = g.replicas.get_mut(id) {
            if !r.healthy {
                tracing::info!(replica = %id, "replica recovered");
            }
            r.healthy = true;
            r.failures = 0;
        }
    }

    /// Records a failed probe or request; ejects the replica after `eject_after` in a row.
    /// Returns whether it is (now) ejected.
    pub fn mark_failed(&self, id: &ReplicaId, why: &str) -> bool {
        let mut g = self.write();
        let Some(r) = g.replicas.get_mut(id) else {
            return true;
        };
        r.failures = r.failures.saturating_add(1);
        if r.healthy && r.failures >= self.eject_after {
            r.healthy = false;
            tracing::warn!(replica = %id, failures = r.failures, reason = why, "replica ejected");
        }
        !r.healthy
    }

    /// Every replica's (id, URL), for probing.
    pub fn targets(&self) -> Vec<(ReplicaId, String)> {
        self.snapshot()
            .guard
            .replicas
            .values()
            .map(|r| (r.id.clone(), r.url.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotprefix_protocol::cluster::{SCHEMA_VERSION, SummaryEntry};
    use hotprefix_protocol::{BlockHash, Tier};

    fn reg(id: &str, started: u64) -> Registration {
        Registration {
            schema: SCHEMA_VERSION,
            replica: ReplicaId(id.into()),
            url: format!("http://{id}:8000/"),
            model: "m".into(),
            block_size: 16,
            salt: Salt(1),
            block_hash_scheme: 1,
            started_at_ms: started,
            version: "0".into(),
        }
    }

    fn summary(seq: u64, hashes: &[u64]) -> HotnessSummary {
        HotnessSummary {
            seq,
            at_ms: 0,
            block_size: 16,
            entries: hashes
                .iter()
                .map(|&h| SummaryEntry {
                    hash: BlockHash(h),
                    tier: Tier::Device,
                    hotness: 1.0,
                    depth: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn old_records_never_replace_newer_ones_and_a_restart_resets_them() {
        let r = Registry::new(3);
        let id = ReplicaId("e0".into());
        r.register(&reg("e0", 1));
        assert!(r.set_summary(&id, &summary(5, &[1, 2])));
        assert!(!r.set_summary(&id, &summary(4, &[9])));
        assert_eq!(r.snapshot().index().blocks_of(&id), 2);
        let load = |seq| LoadReport {
            schema: SCHEMA_VERSION,
            seq,
            ..LoadReport::default()
        };
        assert!(r.set_load(&id, load(3)));
        assert!(!r.set_load(&id, load(3)));
        // The engine restarted: its counters begin again at 1.
        r.register(&reg("e0", 2));
        assert_eq!(r.snapshot().index().blocks_of(&id), 0);
        assert!(r.set_summary(&id, &summary(1, &[7])));
        assert!(r.set_load(&id, load(1)));
        assert_eq!(r.snapshot().replica(&id).unwrap().url, "http://e0:8000");
    }

    #[test]
    fn a_discovery_feed_sets_its_whole_membership() {
        let r = Registry::new(2);
        let k = Source::Kubernetes;
        let m = |v: &[(&str, &str)]| -> Vec<(ReplicaId, String)> {
            v.iter()
                .map(|(id, url)| (ReplicaId((*id).into()), (*url).to_string()))
                .collect()
        };
        r.set_members(
            k,
            &m(&[
                ("e0", "http://10.0.0.1:8000"),
                ("e1", "http://10.0.0.2:8000"),
            ]),
        );
        assert_eq!(r.targets().len(), 2);
        // e1 moved, e0 left, e2 joined; a Redis-registered e3 is not the feed's to remove.
        r.register(&reg("e3", 1));
        r.set_members(
            k,
            &m(&[
                ("e1", "http://10.0.0.9:8000"),
                ("e2", "http://10.0.0.3:8000"),
            ]),
        );
        let t = r.targets();
        assert_eq!(t.len(), 3, "{t:?}");
        assert!(t.contains(&(ReplicaId("e1".into()), "http://10.0.0.9:8000".into())));
        assert!(!t.iter().any(|(id, _)| id.0 == "e0"));
    }

    #[test]
    fn failures_eject_and_success_restores() {
        let r = Registry::new(2);
        let id = r.add_static("http://127.0.0.1:9/");
        assert_eq!(id.0, "127.0.0.1:9");
        assert!(!r.mark_failed(&id, "connect"));
        assert!(r.mark_failed(&id, "connect"));
        assert!(r.snapshot().candidates(None, true).is_empty());
        r.mark_ok(&id);
        assert_eq!(r.snapshot().candidates(None, true).len(), 1);
        // Static replicas are not removed by Redis expiry.
        assert!(!r.remove_dynamic(&id));
    }

    #[test]
    fn candidates_serve_the_requested_model_and_count_requests_since_the_report() {
        let r = Registry::new(3);
        r.register(&reg("a", 1));
        let mut other = reg("b", 1);
        other.model = "other".into();
        r.register(&other);
        let s = r.snapshot();
        assert_eq!(s.candidates(Some("m"), true).len(), 1);
        assert_eq!(s.candidates(None, true).len(), 2);
        drop(s);
        let id = ReplicaId("a".into());
        let flight = r.snapshot().replica(&id).unwrap().flight.clone();
        flight.since_report.fetch_add(2, Ordering::Relaxed);
        flight.active.fetch_add(5, Ordering::Relaxed);
        r.set_load(
            &id,
            LoadReport {
                schema: SCHEMA_VERSION,
                seq: 1,
                running: 3,
                ..LoadReport::default()
            },
        );
        flight.since_report.fetch_add(1, Ordering::Relaxed);
        let c = r.snapshot().candidates(Some("m"), true);
        assert_eq!((c[0].load.running, c[0].load.in_flight), (3, 1));
        // Without trusted reports the router's own active count stands in.
        let c = r.snapshot().candidates(Some("m"), false);
        assert_eq!((c[0].load.running, c[0].load.in_flight), (0, 5));
        assert!(r.remove_dynamic(&id));
        // "b" was read just now: not stale yet; after the age limit it is.
        assert!(r.remove_stale_dynamic(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            r.remove_stale_dynamic(Duration::from_millis(1)),
            vec![ReplicaId("b".into())]
        );
        assert!(r.snapshot().candidates(None, true).is_empty());
    }
}
