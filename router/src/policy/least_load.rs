//! `least-load`: the replica with the fewest requests queued, running and in flight, ties
//! broken by fewer pending prefill tokens. Blind to prefixes: the baseline a prefix-aware policy
//! must beat.

use crate::cluster::{Candidate, PrefixIndex, RouteRequest};

use super::{Decision, PolicyKind, RoutingPolicy, argmax, load_scores};

/// See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastLoadPolicy;

/// Load in requests, with pending prefill as a fractional tie-breaker (a million pending tokens
/// count as less than one request, so it only orders equal request counts).
pub(crate) fn request_load(c: &Candidate) -> f64 {
    c.load.requests() as f64 + (c.load.pending_prefill_tokens as f64 / 1e6).min(0.999)
}

impl RoutingPolicy for LeastLoadPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::LeastLoad
    }

    fn route(
        &self,
        _req: &RouteRequest<'_>,
        candidates: &[Candidate],
        _: &PrefixIndex,
    ) -> Decision {
        let scores = load_scores(candidates, request_load);
        Decision {
            chosen: argmax(&scores),
            reason: "load",
            scores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ReplicaLoad;
    use hotprefix_protocol::ReplicaId;

    fn cand(id: &str, running: u32, in_flight: u32, pending: u64) -> Candidate {
        Candidate {
            id: ReplicaId(id.into()),
            load: ReplicaLoad {
                running,
                in_flight,
                pending_prefill_tokens: pending,
                ..ReplicaLoad::default()
            },
        }
    }

    #[test]
    fn picks_the_fewest_requests_then_the_least_pending_prefill() {
        let req = RouteRequest {
            blocks: &[],
            block_size: 16,
            prompt_tokens: 10,
            session: None,
            now_ms: 0,
        };
        let ix = PrefixIndex::new();
        let c = [cand("a", 3, 0, 0), cand("b", 1, 1, 0), cand("c", 1, 0, 0)];
        assert_eq!(LeastLoadPolicy.route(&req, &c, &ix).chosen, 2);
        let c = [cand("a", 1, 0, 5000), cand("b", 1, 0, 100)];
        let d = LeastLoadPolicy.route(&req, &c, &ix);
        assert_eq!(d.chosen, 1);
        assert_eq!(d.reason, "load");
        assert_eq!(d.scores.len(), 2);
    }
}
