//! The offline hit-ratio bound: Belady's MIN over prefix-chained blocks.
//!
//! On every miss MIN keeps the blocks whose next use is soonest and evicts (or bypasses) the one
//! used furthest in the future. With prefix-chained ids a block's use implies its ancestors' use
//! in the same request, so an ancestor's next use is never later than a descendant's: MIN evicts
//! descendants first (ties go to the deeper block), and what it keeps is always a set of usable
//! prefixes. It ignores time, batching and the memory running requests occupy, and for a cluster
//! it pools the capacity of all replicas into one cache (perfect routing), so no online policy
//! on the same capacity can beat its hit ratio: it is an upper bound, not a target.

use std::collections::{BTreeSet, HashMap};

use crate::trace::Trace;

/// Hit ratio of the bound.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OptimalResult {
    /// Prompt tokens of all requests.
    pub prompt_tokens: u64,
    /// Prompt tokens MIN serves from cache.
    pub hit_tokens: u64,
}

impl OptimalResult {
    /// Hit tokens over prompt tokens.
    pub fn hit_ratio(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// Runs MIN with room for `capacity_blocks` blocks over the requests of `trace` in arrival order.
pub fn belady(trace: &Trace, capacity_blocks: u64) -> OptimalResult {
    const NEVER: usize = usize::MAX;
    let reqs = &trace.requests;
    // next[i][j]: index of the next request after i that uses block j of request i.
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); reqs.len()];
    let mut upcoming: HashMap<u64, usize> = HashMap::new();
    for (i, r) in reqs.iter().enumerate().rev() {
        next[i] = r
            .blocks
            .iter()
            .map(|b| upcoming.get(b).copied().unwrap_or(NEVER))
            .collect();
        for &b in &r.blocks {
            upcoming.insert(b, i);
        }
    }
    // Cached blocks ordered by (next use, depth): the last element is the eviction victim.
    let mut order: BTreeSet<(usize, usize, u64)> = BTreeSet::new();
    let mut cached: HashMap<u64, (usize, usize)> = HashMap::new();
    let mut out = OptimalResult::default();
    let bt = u64::from(trace.block_tokens);
    for (i, r) in reqs.iter().enumerate() {
        let hit = r
            .blocks
            .iter()
            .take_while(|b| cached.contains_key(b))
            .count() as u64;
        let input = u64::from(r.input_tokens);
        out.prompt_tokens += input;
        out.hit_tokens += (hit * bt).min(input);
        for (depth, (&b, &nu)) in r.blocks.iter().zip(&next[i]).enumerate() {
            if let Some(old) = cached.remove(&b) {
                order.remove(&(old.0, old.1, b));
            }
            if nu == NEVER || capacity_blocks == 0 {
                continue;
            }
            if cached.len() as u64 >= capacity_blocks {
                let Some(&victim) = order.last() else {
                    continue;
                };
                if (nu, depth) >= (victim.0, victim.1) {
                    // Bypass: this block is needed later than everything cached.
                    continue;
                }
                order.remove(&victim);
                cached.remove(&victim.2);
            }
            order.insert((nu, depth, b));
            cached.insert(b, (nu, depth));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceRequest;

    fn trace(reqs: &[&[u64]]) -> Trace {
        Trace {
            name: "t".into(),
            block_tokens: 512,
            requests: reqs
                .iter()
                .enumerate()
                .map(|(i, b)| TraceRequest {
                    arrival_s: i as f64,
                    input_tokens: b.len() as u32 * 512,
                    output_tokens: 1,
                    blocks: b.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn infinite_capacity_hits_every_reuse() {
        let t = trace(&[&[1, 2], &[1, 2, 3], &[1, 4]]);
        let r = belady(&t, 1000);
        assert_eq!(r.prompt_tokens, 7 * 512);
        assert_eq!(r.hit_tokens, 3 * 512);
    }

    #[test]
    fn keeps_what_is_needed_soonest() {
        // Capacity 2: after [1,2] and [3,4], the next request is [1,2]: MIN keeps 1,2 (needed
        // next) and bypasses 3,4 (needed later).
        let t = trace(&[&[1, 2], &[3, 4], &[1, 2], &[3, 4]]);
        let r = belady(&t, 2);
        assert_eq!(r.hit_tokens, 2 * 512);
        // LRU would hit nothing on this cyclic pattern; MIN is an upper bound for it.
    }

    #[test]
    fn zero_capacity_hits_nothing() {
        let t = trace(&[&[1], &[1]]);
        assert_eq!(belady(&t, 0).hit_tokens, 0);
    }
}
