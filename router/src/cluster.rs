//! What a routing policy sees of the cluster: the candidate replicas with their load, and an
//! index of which replica holds which prefix block (merged from their hotness summaries).
//!
//! This module does no I/O: the router fills it from Redis and its own counters, the simulator
//! from its simulated engines, and both hand it to the same policies.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use hotprefix_protocol::cluster::SummaryEntry;
use hotprefix_protocol::{BlockHash, ReplicaId, Tier};

/// A replica's load as a policy sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplicaLoad {
    /// Requests queued at the replica (last load report).
    pub waiting: u32,
    /// Requests running at the replica (last load report).
    pub running: u32,
    /// Prompt tokens queued or admitted and not yet prefilled (last load report).
    pub pending_prefill_tokens: u64,
    /// Fraction of the device KV tier in use (last load report).
    pub device_utilisation: f64,
    /// Requests this router sent to it since that report (or in flight, without reports).
    pub in_flight: u32,
}

impl ReplicaLoad {
    /// Requests queued, running or on their way.
    pub fn requests(&self) -> u64 {
        u64::from(self.waiting) + u64::from(self.running) + u64::from(self.in_flight)
    }
}

/// One replica a request may be sent to.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Its id.
    pub id: ReplicaId,
    /// Its load.
    pub load: ReplicaLoad,
}

/// The request being routed, reduced to what policies use.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// Chained hashes of the prompt's full blocks (under the replicas' salt and block size).
    pub blocks: &'a [BlockHash],
    /// Tokens per block.
    pub block_size: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Session key (a header such as `x-session-id`), for session-affine policies.
    pub session: Option<&'a str>,
    /// Current time in milliseconds on the caller's clock (wall clock in the router, simulated
    /// time in the simulator); policies with memory expire it against this.
    pub now_ms: u64,
}

/// Hashes a [`BlockHash`] to itself. Block hashes are already uniformly distributed 64-bit
/// xxh3 values, so hashing them again (std's SipHash) only costs time: a request's lookups are
/// most of a routing decision.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `BlockHash`'s derived `Hash`; anything else is folded in
        // so that the hasher stays correct for other keys.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map keyed by block hash, without rehashing.
pub type BlockMap<V> = HashMap<BlockHash, V, BuildHasherDefault<BlockHasher>>;

/// One replica's holding of a block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Holding {
    /// The replica's slot in the index ([`PrefixIndex::slot`]).
    pub slot: u32,
    /// Tier of the block there.
    pub tier: Tier,
    /// Its hotness there.
    pub hotness: f32,
}

/// Which replicas hold which blocks: every replica's latest summary merged into one map, so a
/// request's blocks are looked up once for all replicas.
#[derive(Clone, Debug, Default)]
pub struct PrefixIndex {
    slots: HashMap<ReplicaId, u32>,
    /// Per slot: the hashes it holds (to remove them when its summary is replaced).
    held: Vec<Vec<BlockHash>>,
    by_hash: BlockMap<Vec<Holding>>,
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> PrefixIndex {
        PrefixIndex::default()
    }

    /// The slot of `id`, if it has ever had a summary.
    pub fn slot(&self, id: &ReplicaId) -> Option<u32> {
        self.slots.get(id).copied()
    }

    /// Replaces what `id` holds by `entries`.
    pub fn set_summary(&mut self, id: &ReplicaId, entries: &[SummaryEntry]) {
        let slot = match self.slots.get(id) {
            Some(&s) => s,
            None => {
                let s = self.held.len() as u32;
                self.slots.insert(id.clone(), s);
                self.held.push(Vec::new());
                s
            }
        };
        self.clear_slot(slot);
        let mut held = Vec::with_capacity(entries.len());
        for e in entries {
            let holders = self.by_hash.entry(e.hash).or_default();
            // A summary lists each block once; a repeated hash keeps its first entry.
            if holders.iter().any(|h| h.slot == slot) {
                continue;
            }
            holders.push(Holding {
                slot,
                tier: e.tier,
                hotness: e.hotness,
            });
            held.push(e.hash);
        }
        self.held[slot as usize] = held;
    }

    /// Forgets everything `id` holds (it died or left). Its slot stays reserved for it.
    pub fn remove(&mut self, id: &ReplicaId) {
        if let Some(&slot) = self.slots.get(id) {
            self.clear_slot(slot);
        }
    }

    fn clear_slot(&mut self, slot: u32) {
        for h in std::mem::take(&mut self.held[slot as usize]) {
            if let Some(v) = self.by_hash.get_mut(&h) {
                v.retain(|x| x.slot != slot);
                if v.is_empty() {
                    self.by_hash.remove(&h);
                }
            }
        }
    }

    /// Who holds block `h`.
    pub fn holders(&self, h: &BlockHash) -> &[Holding] {
        self.by_hash.get(h).map_or(&[], Vec::as_slice)
    }

    /// Blocks `id` holds.
    pub fn blocks_of(&self, id: &ReplicaId) -> usize {
        self.slot(id).map_or(0, |s| self.held[s as usize].len())
    }

    /// Distinct blocks held by anyone.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether nobody holds anything.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// For each candidate, the longest run of the request's blocks from its start that the
/// candidate holds, with a per-block callback for crediting: `credit(candidate, block, holding)`.
/// Walks each block's holders once (not every candidate per block), and stops as soon as no
/// candidate's run continues, so the cost is the number of holdings along the matched path.
/// Returns the run length per candidate.
pub fn matched_runs(
    blocks: &[BlockHash],
    candidates: &[Candidate],
    index: &PrefixIndex,
    mut credit: impl FnMut(usize, usize, Holding),
) -> Vec<usize> {
    const NONE: u32 = u32::MAX;
    let mut run = vec![0usize; candidates.len()];
    // Slot -> candidate position.
    let mut of_slot: Vec<u32> = Vec::new();
    for (ci, c) in candidates.iter().enumerate() {
        if let Some(s) = index.slot(&c.id) {
            let s = s as usize;
            if of_slot.len() <= s {
                of_slot.resize(s + 1, NONE);
            }
            of_slot[s] = ci as u32;
        }
    }
    for (bi, h) in blocks.iter().enumerate() {
        let mut advanced = false;
        for &holding in index.holders(h) {
            let ci = match of_slot.get(holding.slot as usize) {
                Some(&ci) if ci != NONE => ci as usize,
                _ => continue,
            };
            // Only a run unbroken from the first block counts.
            if run[ci] == bi {
                run[ci] += 1;
                credit(ci, bi, holding);
                advanced = true;
            }
        }
        if !advanced {
            break;
        }
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ReplicaId {
        ReplicaId(s.into())
    }

    fn entry(h: u64, tier: Tier) -> SummaryEntry {
        SummaryEntry {
            hash: BlockHash(h),
            tier,
            hotness: 1.0,
            depth: 1,
        }
    }

    fn cand(s: &str) -> Candidate {
        Candidate {
            id: id(s),
            load: ReplicaLoad::default(),
        }
    }

    #[test]
    fn summaries_replace_what_a_replica_holds() {
        let mut ix = PrefixIndex::new();
        ix.set_summary(&id("a"), &[entry(1, Tier::Device), entry(2, Tier::Host)]);
        ix.set_summary(&id("b"), &[entry(1, Tier::Device)]);
        assert_eq!(ix.holders(&BlockHash(1)).len(), 2);
        assert_eq!(ix.len(), 2);
        ix.set_summary(&id("a"), &[entry(3, Tier::Device)]);
        assert_eq!(ix.holders(&BlockHash(1)).len(), 1);
        assert!(ix.holders(&BlockHash(2)).is_empty());
        assert_eq!(ix.blocks_of(&id("a")), 1);
        ix.remove(&id("a"));
        ix.remove(&id("b"));
        assert!(ix.is_empty());
        assert_eq!(ix.blocks_of(&id("a")), 0);
        // A duplicate entry is held once.
        ix.set_summary(&id("a"), &[entry(1, Tier::Device), entry(1, Tier::Host)]);
        assert_eq!(ix.holders(&BlockHash(1)).len(), 1);
        assert_eq!(ix.blocks_of(&id("a")), 1);
    }

    #[test]
    fn runs_count_only_consecutive_blocks_from_the_start() {
        let mut ix = PrefixIndex::new();
        ix.set_summary(&id("a"), &[entry(1, Tier::Device), entry(2, Tier::Device)]);
        // b holds the second and third blocks but not the first: no run.
        ix.set_summary(&id("b"), &[entry(2, Tier::Device), entry(3, Tier::Device)]);
        ix.set_summary(
            &id("c"),
            &[
                entry(1, Tier::Host),
                entry(2, Tier::Host),
                entry(3, Tier::Host),
            ],
        );
        let blocks = [BlockHash(1), BlockHash(2), BlockHash(3), BlockHash(4)];
        let cands = [cand("a"), cand("b"), cand("c"), cand("unknown")];
        let mut credited = Vec::new();
        let run = matched_runs(&blocks, &cands, &ix, |c, b, h| {
            credited.push((c, b, h.tier))
        });
        assert_eq!(run, vec![2, 0, 3, 0]);
        assert_eq!(credited.len(), 5);
        assert!(credited.contains(&(2, 2, Tier::Host)));
        // Replicas not among the candidates are ignored.
        let run = matched_runs(&blocks, &cands[1..2], &ix, |_, _, _| {});
        assert_eq!(run, vec![0]);
    }
}
