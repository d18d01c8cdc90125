//! Routing policies: one trait, one file per policy, built from [`PolicyConfig`] by [`build`].
//!
//! A policy sees the request reduced to its block hashes ([`RouteRequest`]), the candidate
//! replicas with their load ([`Candidate`]) and the merged prefix index ([`PrefixIndex`]); it
//! scores every candidate and picks one. Policies do no I/O and read time only from the request,
//! so the router and the simulator run the very same code.

use std::fmt;
use std::str::FromStr;

use hotprefix_protocol::ReplicaId;
use serde::Serialize;

use crate::cluster::{Candidate, PrefixIndex, RouteRequest};

pub mod approx_tree;
pub mod consistent_hash;
pub mod hotprefix;
pub mod least_load;
pub mod round_robin;

pub use approx_tree::{ApproxTreeConfig, ApproxTreePolicy};
pub use consistent_hash::ConsistentHashPolicy;
pub use hotprefix::{HotPrefixPolicy, HotPrefixWeights};
pub use least_load::LeastLoadPolicy;
pub use round_robin::RoundRobinPolicy;

/// A routing policy.
pub trait RoutingPolicy: Send + Sync + fmt::Debug {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;

    /// Scores every candidate and picks one. `candidates` is never empty (the caller answers
    /// 503 itself when no replica is available).
    fn route(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate],
        index: &PrefixIndex,
    ) -> Decision;

    /// Told once the request has been sent to `replica`, so policies that learn from their own
    /// decisions can remember it.
    fn on_sent(&self, _req: &RouteRequest<'_>, _replica: &ReplicaId) {}

    /// Told when a replica leaves the cluster.
    fn forget(&self, _replica: &ReplicaId) {}
}

/// A candidate's score in one decision, for `/debug/route` and metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Score {
    /// The replica.
    pub replica: ReplicaId,
    /// Higher is better; comparable only within one decision.
    pub score: f64,
    /// Blocks of the request's prefix it holds (consecutive from the start).
    pub matched_blocks: usize,
    /// Of those, blocks on its device tier.
    pub device_blocks: usize,
    /// The load term the policy used (policy-specific units).
    pub load: f64,
}

/// A routing decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Position of the chosen replica in the candidates.
    pub chosen: usize,
    /// Why, in a word (e.g. `prefix`, `load`, `hot-spot`, `session`).
    pub reason: &'static str,
    /// Every candidate's score, in candidate order.
    pub scores: Vec<Score>,
}

impl Decision {
    /// The chosen replica's score.
    pub fn chosen_score(&self) -> &Score {
        &self.scores[self.chosen]
    }
}

/// The policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Longest held prefix weighted by tier and hotness, minus load; hot-spot protection.
    #[default]
    HotPrefix,
    /// Fewest requests queued, running and in flight.
    LeastLoad,
    /// Each healthy replica in turn.
    RoundRobin,
    /// Rendezvous hashing of the session, else of the first block: affinity without state.
    ConsistentHash,
    /// SGLang's cache-aware policy over a tree of this router's own past decisions.
    ApproxTree,
}

impl PolicyKind {
    /// Every policy.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::HotPrefix,
        PolicyKind::LeastLoad,
        PolicyKind::RoundRobin,
        PolicyKind::ConsistentHash,
        PolicyKind::ApproxTree,
    ];

    /// The name used in flags and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::HotPrefix => "hotprefix",
            PolicyKind::LeastLoad => "least-load",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::ConsistentHash => "consistent-hash",
            PolicyKind::ApproxTree => "approx-tree",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = PolicyKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown routing policy {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Everything needed to build a policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyConfig {
    /// Which policy.
    pub kind: PolicyKind,
    /// Weights of the `hotprefix` policy.
    pub hotprefix: HotPrefixWeights,
    /// Settings of the `approx-tree` policy.
    pub approx_tree: ApproxTreeConfig,
}

impl PolicyConfig {
    /// Checks the settings of the chosen policy; the message names the policy and the field.
    pub fn validate(&self) -> Result<(), String> {
        let res = match self.kind {
            PolicyKind::HotPrefix => self.hotprefix.validate(),
            PolicyKind::ApproxTree => self.approx_tree.validate(),
            PolicyKind::LeastLoad | PolicyKind::RoundRobin | PolicyKind::ConsistentHash => Ok(()),
        };
        res.map_err(|e| format!("{}: {e}", self.kind))
    }
}

/// Builds the configured policy.
pub fn build(cfg: &PolicyConfig) -> Box<dyn RoutingPolicy> {
    match cfg.kind {
        PolicyKind::HotPrefix => Box::new(HotPrefixPolicy::new(cfg.hotprefix.clone())),
        PolicyKind::LeastLoad => Box::new(LeastLoadPolicy),
        PolicyKind::RoundRobin => Box::new(RoundRobinPolicy::default()),
        PolicyKind::ConsistentHash => Box::new(ConsistentHashPolicy),
        PolicyKind::ApproxTree => Box::new(ApproxTreePolicy::new(cfg.approx_tree.clone())),
    }
}

/// Index of the best candidate by `key` (largest wins; ties go to the earliest).
pub(crate) fn argmax(scores: &[Score]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate().skip(1) {
        if s.score > scores[best].score {
            best = i;
        }
    }
    best
}

/// Scores of candidates that carry no prefix information: `score` is the negated load.
pub(crate) fn load_scores(
    candidates: &[Candidate],
    load: impl Fn(&Candidate) -> f64,
) -> Vec<Score> {
    candidates
        .iter()
        .map(|c| {
            let l = load(c);
            Score {
                replica: c.id.clone(),
                score: -l,
                matched_blocks: 0,
                device_blocks: 0,
                load: l,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>().unwrap(), k);
            assert_eq!(
                build(&PolicyConfig {
                    kind: k,
                    ..PolicyConfig::default()
                })
                .kind(),
                k
            );
        }
        let err = "random".parse::<PolicyKind>().unwrap_err();
        assert!(err.contains("hotprefix"), "{err}");
        assert!(err.contains("approx-tree"), "{err}");
        assert_eq!(PolicyKind::default(), PolicyKind::HotPrefix);
    }

    #[test]
    fn the_chosen_policys_settings_are_validated() {
        let mut cfg = PolicyConfig::default();
        assert!(cfg.validate().is_ok());
        cfg.approx_tree.cache_threshold = 2.0;
        // Only the chosen policy's settings matter.
        assert!(cfg.validate().is_ok());
        cfg.kind = PolicyKind::ApproxTree;
        let err = cfg.validate().unwrap_err();
        assert!(err.starts_with("approx-tree: cache_threshold"), "{err}");
        cfg.kind = PolicyKind::HotPrefix;
        cfg.hotprefix.cold_floor = -1.0;
        assert!(cfg.validate().unwrap_err().starts_with("hotprefix: "));
    }
}
