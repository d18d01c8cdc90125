//! `approx-tree`: SGLang router's `cache_aware` policy, on block hashes. It knows nothing the
//! replicas publish about their caches; it remembers which prefixes it sent where and assumes
//! they are still cached there. The baseline for what a router gets without engine summaries.
//!
//! **Memory.** For every replica, the blocks of the requests this router sent it, each with the
//! time it was last sent there. Block hashes are chained (a block's hash names the whole prefix
//! ending in it), so a map from hash to the replicas that were sent it is a radix tree over
//! prefixes: the longest run of a request's blocks from the first that a replica was sent is its
//! longest matched prefix there. Each replica's memory is bounded by `max_blocks_per_replica`,
//! least recently sent first; within one request's path, deeper blocks count as older than
//! shallower ones, so eviction takes leaves first and what remains stays prefix-closed (as
//! SGLang's tree evicts leaves). A replica that leaves is forgotten at once.
//!
//! **Decision** (SGLang's `select_worker` of `cache_aware`):
//! 1. If the load is imbalanced, `max - min > balance_abs_threshold` **and**
//!    `max > balance_rel_threshold * min` over the candidates' requests (queued, running and in
//!    flight), send to the least loaded (reason `load`).
//! 2. Otherwise, if the best match ratio (matched blocks over the request's blocks) is above
//!    `cache_threshold` (strictly, as SGLang compares), send to the replica with the longest
//!    match (reason `prefix`).
//! 3. Otherwise send to the replica whose memory is smallest, the one with the most room
//!    (reason `room`).
//!
//! Ties go to the less loaded candidate, then to the earlier one (SGLang picks among ties at
//! random; a deterministic rule keeps the simulator reproducible). A prompt shorter than one
//! block has no blocks and a match ratio of 0. The tree knows no tiers: matched blocks are not
//! reported as device blocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use hotprefix_protocol::{BlockHash, ReplicaId};

use crate::cluster::{Candidate, PrefixIndex, RouteRequest};

use super::{Decision, PolicyKind, RoutingPolicy, Score};

/// Settings of the `approx-tree` policy. Defaults are SGLang's `CacheAwareConfig` defaults
/// (its library's; its command line defaults to 0.3, 64 and 1.5 instead).
#[derive(Clone, Debug, PartialEq)]
pub struct ApproxTreeConfig {
    /// Smallest match ratio (matched blocks / request blocks) that routes by prefix; the
    /// comparison is strict.
    pub cache_threshold: f64,
    /// Load is imbalanced when the most loaded candidate has more than this many requests more
    /// than the least loaded...
    pub balance_abs_threshold: u64,
    /// ...and more than this times as many.
    pub balance_rel_threshold: f64,
    /// Blocks remembered per replica; the least recently sent go first. The default, 65,536
    /// blocks, is a 1M-token KV cache at the engine's default 16-token blocks (SGLang bounds its
    /// tree in characters or tokens; the simulator sets this to each replica's capacity).
    pub max_blocks_per_replica: usize,
}

impl Default for ApproxTreeConfig {
    fn default() -> Self {
        ApproxTreeConfig {
            cache_threshold: 0.5,
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.1,
            max_blocks_per_replica: 65_536,
        }
    }
}

impl ApproxTreeConfig {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.cache_threshold) {
            return Err(format!(
                "cache_threshold must be in [0, 1], got {}",
                self.cache_threshold
            ));
        }
        if !(self.balance_rel_threshold.is_finite() && self.balance_rel_threshold >= 1.0) {
            return Err(format!(
                "balance_rel_threshold must be a finite number >= 1, got {}",
                self.balance_rel_threshold
            ));
        }
        if self.max_blocks_per_replica == 0 {
            return Err("max_blocks_per_replica must be at least 1".into());
        }
        Ok(())
    }
}

/// What one replica was sent.
#[derive(Debug, Default)]
struct ReplicaTree {
    /// Block -> stamp of its last sending.
    stamp: HashMap<BlockHash, u64>,
    /// Stamp -> block, oldest first.
    by_age: BTreeMap<u64, BlockHash>,
}

#[derive(Debug, Default)]
struct Trees {
    slots: HashMap<ReplicaId, u32>,
    /// Per slot.
    trees: Vec<ReplicaTree>,
    /// Block -> slots that were sent it.
    holders: HashMap<BlockHash, Vec<u32>>,
    /// Next stamp.
    clock: u64,
}

impl Trees {
    fn slot(&mut self, id: &ReplicaId) -> u32 {
        if let Some(&s) = self.slots.get(id) {
            return s;
        }
        let s = self.trees.len() as u32;
        self.slots.insert(id.clone(), s);
        self.trees.push(ReplicaTree::default());
        s
    }

    fn drop_holding(&mut self, h: BlockHash, slot: u32) {
        if let Some(v) = self.holders.get_mut(&h) {
            v.retain(|&s| s != slot);
            if v.is_empty() {
                self.holders.remove(&h);
            }
        }
    }

    fn size(&self, id: &ReplicaId) -> usize {
        self.slots
            .get(id)
            .map_or(0, |&s| self.trees[s as usize].stamp.len())
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct ApproxTreePolicy {
    cfg: ApproxTreeConfig,
    trees: Mutex<Trees>,
}

impl ApproxTreePolicy {
    /// A policy with these settings (validate them first; a zero bound is read as 1).
    pub fn new(cfg: ApproxTreeConfig) -> ApproxTreePolicy {
        ApproxTreePolicy {
            cfg,
            trees: Mutex::new(Trees::default()),
        }
    }

    /// Blocks remembered for `replica`.
    pub fn tree_size(&self, replica: &ReplicaId) -> usize {
        self.lock().size(replica)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Trees> {
        self.trees.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Index of the smallest `key`, ties to the less loaded, then to the earliest.
fn argmin_by(loads: &[u64], key: impl Fn(usize) -> u64) -> usize {
    (0..loads.len())
        .min_by_key(|&i| (key(i), loads[i], i))
        .unwrap_or(0)
}

impl RoutingPolicy for ApproxTreePolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::ApproxTree
    }

    fn route(&self, req: &RouteRequest<'_>, candidates: &[Candidate], _: &PrefixIndex) -> Decision {
        let n = candidates.len();
        let loads: Vec<u64> = candidates.iter().map(|c| c.load.requests()).collect();
        let (runs, sizes) = {
            let trees = self.lock();
            let sizes: Vec<u64> = candidates
                .iter()
                .map(|c| trees.size(&c.id) as u64)
                .collect();
            // Slot -> candidate position, then one walk down the request's blocks (as
            // `cluster::matched_runs` does for summaries).
            let mut of_slot: HashMap<u32, usize> = HashMap::new();
            for (ci, c) in candidates.iter().enumerate() {
                if let Some(&s) = trees.slots.get(&c.id) {
                    of_slot.insert(s, ci);
                }
            }
            let mut runs = vec![0usize; n];
            for (bi, h) in req.blocks.iter().enumerate() {
                let mut advanced = false;
                for s in trees.holders.get(h).map_or(&[][..], Vec::as_slice) {
                    if let Some(&ci) = of_slot.get(s)
                        && runs[ci] == bi
                    {
                        runs[ci] += 1;
                        advanced = true;
                    }
                }
                if !advanced {
                    break;
                }
            }
            (runs, sizes)
        };
        let max = loads.iter().copied().max().unwrap_or(0);
        let min = loads.iter().copied().min().unwrap_or(0);
        let imbalanced = max - min > self.cfg.balance_abs_threshold
            && max as f64 > min as f64 * self.cfg.balance_rel_threshold;
        let longest = argmin_by(&loads, |i| u64::MAX - runs[i] as u64);
        let ratio = if req.blocks.is_empty() {
            0.0
        } else {
            runs[longest] as f64 / req.blocks.len() as f64
        };
        // Each branch reports what it compared as the score (higher is better).
        let (chosen, reason, score): (usize, &'static str, Box<dyn Fn(usize) -> f64>) =
            if imbalanced {
                (
                    argmin_by(&loads, |i| loads[i]),
                    "load",
                    Box::new(|i| -(loads[i] as f64)),
                )
            } else if ratio > self.cfg.cache_threshold {
                (longest, "prefix", Box::new(|i| runs[i] as f64))
            } else {
                (
                    argmin_by(&loads, |i| sizes[i]),
                    "room",
                    Box::new(|i| -(sizes[i] as f64)),
                )
            };
        let scores = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| Score {
                replica: c.id.clone(),
                score: score(i),
                matched_blocks: runs[i],
                device_blocks: 0,
                load: loads[i] as f64,
            })
            .collect();
        Decision {
            chosen,
            reason,
            scores,
        }
    }

    fn on_sent(&self, req: &RouteRequest<'_>, replica: &ReplicaId) {
        if req.blocks.is_empty() {
            return;
        }
        let cap = self.cfg.max_blocks_per_replica.max(1);
        let mut trees = self.lock();
        let slot = trees.slot(replica);
        let n = req.blocks.len() as u64;
        // Stamps decrease with depth within one path, and every later stamp is larger than all
        // of these: a parent is always at least as recent as its children, so the oldest block
        // is a leaf.
        let base = trees.clock;
        trees.clock += n + 1;
        for (i, &h) in req.blocks.iter().enumerate() {
            let stamp = base + (n - i as u64);
            let tree = &mut trees.trees[slot as usize];
            match tree.stamp.insert(h, stamp) {
                Some(old) => {
                    tree.by_age.remove(&old);
                }
                None => trees.holders.entry(h).or_default().push(slot),
            }
            trees.trees[slot as usize].by_age.insert(stamp, h);
        }
        while trees.trees[slot as usize].stamp.len() > cap {
            let tree = &mut trees.trees[slot as usize];
            let Some((_, h)) = tree.by_age.pop_first() else {
                break;
            };
            tree.stamp.remove(&h);
            trees.drop_holding(h, slot);
        }
    }

    fn forget(&self, replica: &ReplicaId) {
        let mut trees = self.lock();
        let Some(&slot) = trees.slots.get(replica) else {
            return;
        };
        let tree = std::mem::take(&mut trees.trees[slot as usize]);
        for h in tree.stamp.into_keys() {
            trees.drop_holding(h, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ReplicaLoad;

    fn cand(id: &str, running: u32) -> Candidate {
        Candidate {
            id: ReplicaId(id.into()),
            load: ReplicaLoad {
                running,
                ..ReplicaLoad::default()
            },
        }
    }

    fn req(blocks: &[BlockHash]) -> RouteRequest<'_> {
        RouteRequest {
            blocks,
            block_size: 16,
            prompt_tokens: blocks.len() * 16 + 5,
            session: None,
            now_ms: 0,
        }
    }

    fn b(hashes: &[u64]) -> Vec<BlockHash> {
        hashes.iter().copied().map(BlockHash).collect()
    }

    fn id(s: &str) -> ReplicaId {
        ReplicaId(s.into())
    }

    fn route(p: &ApproxTreePolicy, blocks: &[BlockHash], c: &[Candidate]) -> Decision {
        p.route(&req(blocks), c, &PrefixIndex::new())
    }

    #[test]
    fn defaults_are_sglangs_and_are_validated() {
        let d = ApproxTreeConfig::default();
        assert_eq!(
            (
                d.cache_threshold,
                d.balance_abs_threshold,
                d.balance_rel_threshold
            ),
            (0.5, 32, 1.1)
        );
        assert!(d.validate().is_ok());
        for bad in [
            ApproxTreeConfig {
                cache_threshold: 1.5,
                ..d.clone()
            },
            ApproxTreeConfig {
                cache_threshold: f64::NAN,
                ..d.clone()
            },
            ApproxTreeConfig {
                balance_rel_threshold: 0.5,
                ..d.clone()
            },
            ApproxTreeConfig {
                balance_rel_threshold: f64::INFINITY,
                ..d.clone()
            },
            ApproxTreeConfig {
                max_blocks_per_replica: 0,
                ..d.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_prefix_sent_before_draws_requests_that_share_most_of_it() {
        let p = ApproxTreePolicy::new(ApproxTreeConfig::default());
        let c = [cand("a", 0), cand("b", 0), cand("c", 0)];
        p.on_sent(&req(&b(&[1, 2, 3, 4])), &id("b"));
        // 3 of 4 blocks match on b: ratio 0.75 > 0.5, even though b is busier.
        let c2 = [cand("a", 0), cand("b", 5), cand("c", 0)];
        let d = route(&p, &b(&[1, 2, 3, 9]), &c2);
        assert_eq!((d.chosen, d.reason), (1, "prefix"));
        assert_eq!(d.scores[1].matched_blocks, 3);
        assert_eq!(d.scores[0].matched_blocks, 0);
        assert_eq!(d.scores[1].device_blocks, 0);
        // A run must start at the first block: [9, 2, 3] matches nothing (with chained hashes
        // this cannot happen, but the walk must not rely on it).
        let d = route(&p, &b(&[9, 2, 3]), &c);
        assert_eq!(d.scores[1].matched_blocks, 0);
        assert_eq!(d.reason, "room");
    }

    #[test]
    fn a_weak_match_goes_to_the_replica_with_the_most_room() {
        let p = ApproxTreePolicy::new(ApproxTreeConfig::default());
        let c = [cand("a", 0), cand("b", 0), cand("c", 0)];
        p.on_sent(&req(&b(&[1, 2, 3, 4])), &id("a"));
        p.on_sent(&req(&b(&[10, 11])), &id("c"));
        // 1 of 4 blocks on a (0.25): not enough; b remembers nothing, so it has the most room.
        let d = route(&p, &b(&[1, 7, 8, 9]), &c);
        assert_eq!((d.chosen, d.reason), (1, "room"));
        assert_eq!(d.scores[0].matched_blocks, 1);
        assert_eq!(
            d.scores.iter().map(|s| s.score).collect::<Vec<_>>(),
            vec![-4.0, 0.0, -2.0]
        );
        // Exactly at the threshold is not above it (2 of 4 = 0.5): SGLang compares strictly.
        let d = route(&p, &b(&[1, 2, 8, 9]), &c);
        assert_eq!(d.reason, "room");
        // Equal room: the less loaded wins, then the earlier.
        let p = ApproxTreePolicy::new(ApproxTreeConfig::default());
        let d = route(&p, &b(&[5]), &[cand("a", 3), cand("b", 1), cand("c", 1)]);
        assert_eq!(d.chosen, 1);
        // A prompt shorter than a block has a ratio of 0.
        let d = route(&p, &[], &[cand("a", 3), cand("b", 1)]);
        assert_eq!((d.chosen, d.reason), (1, "room"));
    }

    #[test]
    fn imbalance_needs_both_thresholds_and_then_wins_over_the_prefix() {
        let p = ApproxTreePolicy::new(ApproxTreeConfig::default());
        let prefix = b(&[1, 2, 3, 4]);
        p.on_sent(&req(&prefix), &id("a"));
        let pick = |la: u32, lb: u32| {
            let d = route(&p, &prefix, &[cand("a", la), cand("b", lb)]);
            (d.chosen, d.reason)
        };
        // Difference 33 > 32 and 34 > 1.1 x 1: least loaded.
        assert_eq!(pick(34, 1), (1, "load"));
        // Difference exactly 32: balanced, the prefix wins.
        assert_eq!(pick(33, 1), (0, "prefix"));
        // Difference 40 > 32 but 1,000 < 1.1 x 960: balanced.
        assert_eq!(pick(1000, 960), (0, "prefix"));
        // Difference 40 and 340 > 1.1 x 300: imbalanced.
        assert_eq!(pick(340, 300), (1, "load"));
        // In-flight and waiting requests count as load too.
        let mut a = cand("a", 0);
        a.load.in_flight = 20;
        a.load.waiting = 20;
        let d = route(&p, &prefix, &[a, cand("b", 0)]);
        assert_eq!((d.chosen, d.reason), (1, "load"));
        assert_eq!(d.scores[0].load, 40.0);
    }

    #[test]
    fn memory_is_bounded_per_replica_least_recently_sent_first() {
        let p = ApproxTreePolicy::new(ApproxTreeConfig {
            max_blocks_per_replica: 10,
            ..ApproxTreeConfig::default()
        });
        let c = [cand("a", 0), cand("b", 0)];
        let (x, y, z) = (b(&[1, 2, 3, 4]), b(&[11, 12, 13, 14]), b(&[21, 22, 23, 24]));
        p.on_sent(&req(&x), &id("a"));
        p.on_sent(&req(&y), &id("a"));
        // x is sent again: now y is the least recent.
        p.on_sent(&req(&x), &id("a"));
        p.on_sent(&req(&z), &id("a"));
        assert_eq!(p.tree_size(&id("a")), 10);
        assert_eq!(route(&p, &x, &c).scores[0].matched_blocks, 4);
        assert_eq!(route(&p, &z, &c).scores[0].matched_blocks, 4);
        // y lost its two deepest blocks (leaves go first); its start is still there.
        assert_eq!(route(&p, &y, &c).scores[0].matched_blocks, 2);
        // Another replica's memory is separate.
        p.on_sent(&req(&y), &id("b"));
        assert_eq!(p.tree_size(&id("b")), 4);
        assert_eq!(route(&p, &y, &c).scores[1].matched_blocks, 4);
        // A path longer than the bound keeps its first blocks.
        let long: Vec<BlockHash> = (100..130).map(BlockHash).collect();
        p.on_sent(&req(&long), &id("b"));
        assert_eq!(p.tree_size(&id("b")), 10);
        assert_eq!(route(&p, &long, &c).scores[1].matched_blocks, 10);
        assert_eq!(route(&p, &y, &c).scores[1].matched_blocks, 0);
    }

    #[test]
    fn a_replica_that_leaves_is_forgotten() {
        let p = ApproxTreePolicy::new(ApproxTreeConfig::default());
        let c = [cand("a", 0), cand("b", 0)];
        let x = b(&[1, 2, 3]);
        p.on_sent(&req(&x), &id("a"));
        p.on_sent(&req(&x), &id("b"));
        p.forget(&id("a"));
        p.forget(&id("never-seen"));
        assert_eq!(p.tree_size(&id("a")), 0);
        let d = route(&p, &x, &c);
        assert_eq!(d.scores[0].matched_blocks, 0);
        assert_eq!((d.chosen, d.reason), (1, "prefix"));
        p.forget(&id("b"));
        assert!(p.lock().holders.is_empty());
        // It learns again when it comes back.
        p.on_sent(&req(&x), &id("a"));
        assert_eq!(route(&p, &x, &c).chosen, 0);
    }
}
