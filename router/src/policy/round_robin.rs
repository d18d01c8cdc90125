//! `round-robin`: each candidate in turn. Blind to prefixes and load.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cluster::{Candidate, PrefixIndex, RouteRequest};

use super::least_load::request_load;
use super::{Decision, PolicyKind, RoutingPolicy, load_scores};

/// See the module docs.
#[derive(Debug, Default)]
pub struct RoundRobinPolicy {
    next: AtomicUsize,
}

impl RoutingPolicy for RoundRobinPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::RoundRobin
    }

    fn route(
        &self,
        _req: &RouteRequest<'_>,
        candidates: &[Candidate],
        _: &PrefixIndex,
    ) -> Decision {
        let chosen = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len().max(1);
        Decision {
            chosen,
            reason: "turn",
            // Scores are reported for /debug/route; the choice ignores them.
            scores: load_scores(candidates, request_load),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ReplicaLoad;
    use hotprefix_protocol::ReplicaId;

    #[test]
    fn visits_every_candidate_in_turn() {
        let req = RouteRequest {
            blocks: &[],
            block_size: 16,
            prompt_tokens: 10,
            session: None,
            now_ms: 0,
        };
        let c: Vec<Candidate> = ["a", "b", "c"]
            .iter()
            .map(|s| Candidate {
                id: ReplicaId((*s).into()),
                load: ReplicaLoad::default(),
            })
            .collect();
        let p = RoundRobinPolicy::default();
        let ix = PrefixIndex::new();
        let picks: Vec<usize> = (0..6).map(|_| p.route(&req, &c, &ix).chosen).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }
}
