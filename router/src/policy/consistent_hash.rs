//! `consistent-hash`: rendezvous (highest-random-weight) hashing of a request key over the
//! candidate replicas. Blind to load and to what replicas hold; it keeps requests with the same
//! key on the same replica, which is what session affinity in front of a prefix cache wants.
//!
//! **Key.** The request's session (a header such as `x-session-id`) when it has one; otherwise
//! its first block hash, which names the first `block_size` tokens under the replicas' salt, so
//! requests that share a system prompt or a conversation's opening share a replica. A prompt
//! shorter than one block has no full block that any replica could cache, so affinity buys it
//! nothing; it is keyed by its length in tokens, which is stable (a retried request lands on the
//! same replica) and still spreads short prompts over up to `block_size - 1` distinct keys
//! instead of sending them all to one replica. The policy never looks at load: when every
//! request starts with the same block (one system prompt for all, as in the Mooncake
//! conversation trace) and carries no session, every request goes to one replica.
//!
//! **Why rendezvous.** Each candidate gets the weight `xxh3(replica id, seed = xxh3(key))` and
//! the heaviest wins. A key's winner only changes when the winner itself leaves (its keys spread
//! over the rest as if it had never existed) or when a new replica outweighs it (it takes about
//! `1/n` of the keys), so removing a replica moves only that replica's keys, with no ring and no
//! virtual nodes to size. The weights depend only on the key and the replica's id, never on the
//! candidates' order or number, so every router of a fleet agrees without coordination.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::cluster::{Candidate, PrefixIndex, RouteRequest};

use super::least_load::request_load;
use super::{Decision, PolicyKind, RoutingPolicy, Score};

/// See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsistentHashPolicy;

/// What a request is keyed by, with a domain tag so that a session named like a block's bytes
/// cannot collide with it.
fn key_hash(req: &RouteRequest<'_>) -> (u64, &'static str) {
    if let Some(s) = req.session {
        let mut bytes = Vec::with_capacity(s.len() + 2);
        bytes.extend_from_slice(b"s:");
        bytes.extend_from_slice(s.as_bytes());
        return (xxh3_64(&bytes), "session");
    }
    if let Some(first) = req.blocks.first() {
        let mut bytes = [0u8; 10];
        bytes[..2].copy_from_slice(b"b:");
        bytes[2..].copy_from_slice(&first.0.to_le_bytes());
        return (xxh3_64(&bytes), "prefix");
    }
    let mut bytes = [0u8; 10];
    bytes[..2].copy_from_slice(b"l:");
    bytes[2..].copy_from_slice(&(req.prompt_tokens as u64).to_le_bytes());
    (xxh3_64(&bytes), "length")
}

/// The rendezvous weight of `replica` for a key.
fn weight(key: u64, replica: &str) -> u64 {
    xxh3_64_with_seed(replica.as_bytes(), key)
}

impl RoutingPolicy for ConsistentHashPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::ConsistentHash
    }

    fn route(&self, req: &RouteRequest<'_>, candidates: &[Candidate], _: &PrefixIndex) -> Decision {
        let (key, reason) = key_hash(req);
        let weights: Vec<u64> = candidates.iter().map(|c| weight(key, &c.id.0)).collect();
        // Compared as integers: the f64 score below keeps only 53 bits and could tie.
        let mut chosen = 0;
        for (i, w) in weights.iter().enumerate().skip(1) {
            if *w > weights[chosen] {
                chosen = i;
            }
        }
        let scores = candidates
            .iter()
            .zip(&weights)
            .map(|(c, &w)| Score {
                replica: c.id.clone(),
                // The weight scaled into [0, 1) for display.
                score: (w >> 11) as f64 / (1u64 << 53) as f64,
                matched_blocks: 0,
                device_blocks: 0,
                load: request_load(c),
            })
            .collect();
        Decision {
            chosen,
            reason,
            scores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ReplicaLoad;
    use hotprefix_protocol::{BlockHash, ReplicaId};

    fn cands(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                id: ReplicaId(format!("engine-{i}")),
                load: ReplicaLoad::default(),
            })
            .collect()
    }

    fn req<'a>(blocks: &'a [BlockHash], session: Option<&'a str>) -> RouteRequest<'a> {
        RouteRequest {
            blocks,
            block_size: 16,
            prompt_tokens: blocks.len() * 16 + 3,
            session,
            now_ms: 0,
        }
    }

    fn pick(c: &[Candidate], r: &RouteRequest<'_>) -> String {
        let d = ConsistentHashPolicy.route(r, c, &PrefixIndex::new());
        c[d.chosen].id.0.clone()
    }

    #[test]
    fn the_same_key_goes_to_the_same_replica_whatever_the_order_or_load() {
        let c = cands(5);
        let blocks = [BlockHash(42), BlockHash(7)];
        let first = pick(&c, &req(&blocks, None));
        // Same first block, different rest: same replica.
        assert_eq!(pick(&c, &req(&[BlockHash(42), BlockHash(9)], None)), first);
        // Candidates reversed and loaded differently: same replica.
        let mut rev: Vec<Candidate> = c.iter().rev().cloned().collect();
        for (i, r) in rev.iter_mut().enumerate() {
            r.load.running = i as u32 * 10;
        }
        assert_eq!(pick(&rev, &req(&blocks, None)), first);
        let d = ConsistentHashPolicy.route(&req(&blocks, None), &c, &PrefixIndex::new());
        assert_eq!(d.reason, "prefix");
        assert_eq!(d.scores.len(), 5);
        assert!(d.scores.iter().all(|s| (0.0..1.0).contains(&s.score)));
    }

    #[test]
    fn a_session_outranks_the_prefix_and_a_short_prompt_is_keyed_by_length() {
        let c = cands(16);
        // Requests of one session follow it whatever their prefix.
        let a = pick(&c, &req(&[BlockHash(1)], Some("user-7")));
        for b in 2..40 {
            assert_eq!(pick(&c, &req(&[BlockHash(b)], Some("user-7"))), a);
        }
        let d = ConsistentHashPolicy.route(&req(&[], Some("x")), &c, &PrefixIndex::new());
        assert_eq!(d.reason, "session");
        // Prompts shorter than a block: same length, same replica; many lengths, many replicas.
        let short = |tokens: usize| RouteRequest {
            blocks: &[],
            block_size: 16,
            prompt_tokens: tokens,
            session: None,
            now_ms: 0,
        };
        assert_eq!(pick(&c, &short(5)), pick(&c, &short(5)));
        let d = ConsistentHashPolicy.route(&short(5), &c, &PrefixIndex::new());
        assert_eq!(d.reason, "length");
        let distinct: std::collections::HashSet<String> =
            (1..16).map(|t| pick(&c, &short(t))).collect();
        assert!(distinct.len() >= 5, "{distinct:?}");
    }

    #[test]
    fn keys_spread_over_replicas() {
        let c = cands(4);
        let mut counts = [0usize; 4];
        for k in 0..4000u64 {
            let b = [BlockHash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15))];
            let d = ConsistentHashPolicy.route(&req(&b, None), &c, &PrefixIndex::new());
            counts[d.chosen] += 1;
        }
        // 1,000 expected each; a fair hash stays well within 15%.
        assert!(
            counts.iter().all(|&n| (850..=1150).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn removing_a_replica_moves_only_its_keys_and_adding_one_moves_few() {
        let all = cands(5);
        let keys: Vec<[BlockHash; 1]> = (0..2000u64).map(|k| [BlockHash(k * 7 + 1)]).collect();
        let before: Vec<String> = keys.iter().map(|b| pick(&all, &req(b, None))).collect();
        // engine-2 leaves.
        let rest: Vec<Candidate> = all
            .iter()
            .filter(|c| c.id.0 != "engine-2")
            .cloned()
            .collect();
        let mut moved = 0;
        for (b, old) in keys.iter().zip(&before) {
            let new = pick(&rest, &req(b, None));
            if old == "engine-2" {
                moved += 1;
                assert_ne!(new, "engine-2");
            } else {
                assert_eq!(&new, old, "a key of a remaining replica moved");
            }
        }
        assert!(moved > 0);
        // engine-2 comes back: exactly its keys return to it, nothing else moves.
        let again: Vec<String> = keys.iter().map(|b| pick(&all, &req(b, None))).collect();
        assert_eq!(again, before);
        // A sixth replica takes about a sixth of the keys, each from whoever had it.
        let six = cands(6);
        let taken = keys
            .iter()
            .zip(&before)
            .filter(|(b, old)| {
                let new = pick(&six, &req(*b, None));
                assert!(new == **old || new == "engine-5");
                new != **old
            })
            .count();
        assert!((200..=470).contains(&taken), "{taken} of 2000 moved");
    }
}
