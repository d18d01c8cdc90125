//! `hotprefix`: send a request where its prefix already is, unless that replica is overloaded.
//!
//! For each candidate the policy finds the longest run of the request's blocks, from the first,
//! that the candidate holds (from the replicas' hotness summaries, plus this router's own recent
//! decisions that the summaries have not caught up with yet), and credits each block with the
//! prefill it saves: `block_size` tokens times a tier weight (a device block saves everything, a
//! host block must still be loaded) times a hotness factor (a cold block is likelier to be
//! evicted before the request arrives). From that it subtracts the replica's queued work in
//! tokens: its pending prefill, a fixed cost per queued or running request, and the requests this
//! router sent it since its last load report (each assumed to prefill what this request would),
//! and a cache-pressure term: the tokens it would add to the candidate's device tier times how
//! full that tier is (new KV on a full cache evicts someone's prefix). The best score wins.
//!
//! **Queueing externality.** Weighing a request's wait against its own prefill one to one
//! minimises that request's time to first token and nothing else: a prefix computed a second
//! time also delays every request that queues behind that work, and its copy takes cache room.
//! The saved prefill is therefore credited `1 + k` times, `k` being the requests queued per
//! replica across the cluster (pending prefill in requests of the recent mean size, plus the
//! requests sent since the last report). In a first-come-first-served queue in steady state a
//! request leaves as many requests behind it as it found (level crossing), and the router
//! spreads later arrivals over the replicas, so that mean estimates how many requests a
//! recomputed token delays besides this one. An idle cluster has `k` = 0: nobody is delayed, and
//! the rule is the one-to-one exchange again.
//!
//! **Hot-spot protection.** The externality asks a request to wait at the holder of its prefix
//! for the others' sake. Protection bounds that: when what the request would pay at the winner
//! (queued work plus its own prefill there) exceeds `hot_spot_factor` times the least it would
//! pay anywhere plus `hot_spot_slack_tokens`, the request goes to the best-scoring candidate
//! within that bound. That replica then computes and caches the prefix, which deliberately
//! replicates a hot prefix instead of queueing every request for it on one replica.
//!
//! **Recent decisions.** Summaries arrive about once a second. Without memory, a burst of
//! requests for a new prefix would scatter (nobody holds it yet) and every replica would
//! compute it. The policy remembers, for `recent_ms`, which replica it sent each block to and
//! credits those blocks like device blocks, so the burst lands together.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use hotprefix_protocol::{BlockHash, ReplicaId, Tier};

use crate::cluster::{BlockMap, Candidate, PrefixIndex, RouteRequest, matched_runs};

use super::{Decision, PolicyKind, RoutingPolicy, Score};

/// Weights of the `hotprefix` policy (all documented in the README's router flags).
#[derive(Clone, Debug, PartialEq)]
pub struct HotPrefixWeights {
    /// Credit of a device-tier block, per token.
    pub device_weight: f64,
    /// Credit of a host-tier block, per token (it saves the prefill but must be loaded).
    pub host_weight: f64,
    /// Hotness at or above which a block gets full credit.
    pub hot_reference: f64,
    /// Fraction of the credit a block of zero hotness still gets.
    pub cold_floor: f64,
    /// Cost of one token of queued work against one token of saved prefill.
    pub load_weight: f64,
    /// Weight of the queueing externality (module docs): the saved prefill is credited `1 + k`
    /// times, `k` being this weight times the requests queued per replica across the cluster.
    /// Zero weighs a request's own wait against its own prefill alone.
    pub queue_externality: f64,
    /// Queued work charged per waiting or running request, in tokens (decode steps it takes).
    pub request_cost_tokens: f64,
    /// Weight of the cache-pressure term: the expected recomputation, per token, of the prefix
    /// KV a request's new blocks evict on a full device tier.
    pub cache_pressure_weight: f64,
    /// Hot-spot protection (module docs): the winner is skipped when the request would pay
    /// there (queued work plus its own prefill, in tokens) more than this times the least it
    /// would pay at any candidate plus `hot_spot_slack_tokens`. At least 1; zero disables
    /// protection.
    pub hot_spot_factor: f64,
    /// See `hot_spot_factor`.
    pub hot_spot_slack_tokens: f64,
    /// How long the router's own decisions count as cached, in milliseconds.
    pub recent_ms: u64,
    /// Most blocks remembered.
    pub recent_capacity: usize,
}

impl Default for HotPrefixWeights {
    fn default() -> Self {
        HotPrefixWeights {
            device_weight: 1.0,
            // A host block saves its prefill but must be loaded first. Measured on the CPU engine,
            // a host-tier hit costs 1.04x a device-tier hit; in the simulator's H100 cost model
            // loading a token over PCIe takes 2.56 us against about 32 us to recompute it, so a
            // host hit still saves about 92% of what a device hit saves. 0.9 keeps device
            // copies preferred by that margin.
            host_weight: 0.9,
            hot_reference: 1.0,
            cold_floor: 0.5,
            load_weight: 1.0,
            // The estimate the queueing argument gives (module docs), not a tuned value.
            queue_externality: 1.0,
            request_cost_tokens: 64.0,
            cache_pressure_weight: 0.25,
            // Tuned on the synthetic Mooncake trace and generated workloads (docs/benchmarks.md,
            // "Cluster routing"): a request never pays more than 1.5 times the least it could.
            hot_spot_factor: 1.5,
            hot_spot_slack_tokens: 0.0,
            recent_ms: 3_000,
            recent_capacity: 200_000,
        }
    }
}

impl HotPrefixWeights {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite_nonneg = [
            ("device_weight", self.device_weight),
            ("host_weight", self.host_weight),
            ("hot_reference", self.hot_reference),
            ("load_weight", self.load_weight),
            ("queue_externality", self.queue_externality),
            ("request_cost_tokens", self.request_cost_tokens),
            ("cache_pressure_weight", self.cache_pressure_weight),
            ("hot_spot_factor", self.hot_spot_factor),
            ("hot_spot_slack_tokens", self.hot_spot_slack_tokens),
        ];
        for (name, v) in finite_nonneg {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0, got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&self.cold_floor) {
            return Err(format!(
                "cold_floor must be in [0, 1], got {}",
                self.cold_floor
            ));
        }
        if self.host_weight > self.device_weight {
            return Err("host_weight must not exceed device_weight".into());
        }
        if self.hot_spot_factor > 0.0 && self.hot_spot_factor < 1.0 {
            return Err(format!(
                "hot_spot_factor must be 0 (off) or at least 1, got {}",
                self.hot_spot_factor
            ));
        }
        Ok(())
    }
}

/// Blocks recently sent to a replica.
#[derive(Debug, Default)]
struct Recent {
    by_hash: BlockMap<(ReplicaId, u64)>,
    /// (expiry, hash) in insertion order, for pruning.
    order: VecDeque<(u64, BlockHash)>,
}

impl Recent {
    fn prune(&mut self, now_ms: u64, capacity: usize) {
        while let Some(&(expiry, h)) = self.order.front() {
            if expiry > now_ms && self.order.len() <= capacity {
                break;
            }
            self.order.pop_front();
            // Only drop the entry if it was not refreshed by a later decision.
            if self.by_hash.get(&h).is_some_and(|(_, e)| *e == expiry) {
                self.by_hash.remove(&h);
            }
        }
    }
}

/// What the policy learns from its own decisions.
#[derive(Debug, Default)]
struct State {
    recent: Recent,
    /// Mean prefill (prompt tokens not held where it went) of the requests routed lately, an
    /// exponential moving average over about [`NEW_TOKENS_WINDOW`] decisions; 0 before the
    /// first.
    new_tokens_mean: f64,
}

/// Decisions the mean request prefill is averaged over: enough to smooth single long prompts,
/// few enough to follow a change of workload within seconds.
const NEW_TOKENS_WINDOW: f64 = 64.0;

/// See the module docs.
#[derive(Debug)]
pub struct HotPrefixPolicy {
    w: HotPrefixWeights,
    state: Mutex<State>,
}

impl HotPrefixPolicy {
    /// A policy with these weights.
    pub fn new(w: HotPrefixWeights) -> HotPrefixPolicy {
        HotPrefixPolicy {
            w,
            state: Mutex::new(State::default()),
        }
    }

    /// Queued work of a candidate in tokens. Each request this router sent it since its last
    /// load report is assumed to be like this one: it costs the part of this prompt the
    /// candidate does not hold (requests of one burst share their prefix, so only the first of
    /// them computes it).
    fn load_tokens(&self, c: &Candidate, req: &RouteRequest<'_>, matched_blocks: usize) -> f64 {
        let l = &c.load;
        let unmatched = req
            .prompt_tokens
            .saturating_sub(matched_blocks * req.block_size);
        l.pending_prefill_tokens as f64
            + self.w.request_cost_tokens * f64::from(l.waiting + l.running)
            + f64::from(l.in_flight) * (unmatched as f64 + self.w.request_cost_tokens)
    }

    /// Cost of the KV this request adds to a candidate's cache: the tokens it must compute
    /// there, times the fraction of that device tier in use (about the share of new blocks that
    /// will evict someone's cached prefix), times `cache_pressure_weight` (the chance an evicted
    /// token is needed again and recomputed). It keeps a short shared head (a chat template's
    /// first block) from pulling every new prefix onto one replica while another's cache is
    /// emptier.
    fn pressure(&self, c: &Candidate, req: &RouteRequest<'_>, matched_blocks: usize) -> f64 {
        let new_tokens = req
            .prompt_tokens
            .saturating_sub(matched_blocks * req.block_size);
        self.w.cache_pressure_weight * c.load.device_utilisation.clamp(0.0, 1.0) * new_tokens as f64
    }

    fn credit(&self, tier: Tier, hotness: f64, block_size: usize) -> f64 {
        let weight = match tier {
            Tier::Device => self.w.device_weight,
            Tier::Host => self.w.host_weight,
        };
        let hot = if self.w.hot_reference <= 0.0 {
            1.0
        } else {
            (hotness / self.w.hot_reference).clamp(0.0, 1.0)
        };
        let factor = self.w.cold_floor + (1.0 - self.w.cold_floor) * hot;
        block_size as f64 * weight * factor
    }
}

/// Requests queued for prefill per candidate, on average: each candidate's pending prefill in
/// requests of the mean size `mean_new`, plus the requests this router sent it since its report.
fn queued_requests(candidates: &[Candidate], mean_new: f64) -> f64 {
    if candidates.is_empty() {
        return 0.0;
    }
    let total: f64 = candidates
        .iter()
        .map(|c| {
            c.load.pending_prefill_tokens as f64 / mean_new.max(1.0) + f64::from(c.load.in_flight)
        })
        .sum();
    total / candidates.len() as f64
}

/// The best score; equal scores (typically a new prefix on idle replicas, where everyone
/// scores 0) go to the replica with the emptiest device tier, then to the one a hash of the
/// request's first block picks (rendezvous hashing). Without this, every new prefix on an idle
/// cluster would land on the first replica; with it, new prefixes spread and each one still
/// lands on the same replica every time.
fn best_with_ties_broken(
    scores: &[Score],
    candidates: &[Candidate],
    req: &RouteRequest<'_>,
) -> usize {
    let key = req.blocks.first().map_or(0, |b| b.0);
    let rank = |i: usize| {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(candidates[i].id.0.as_bytes(), key);
        (scores[i].score, -candidates[i].load.device_utilisation, h)
    };
    let mut best = 0;
    for i in 1..scores.len() {
        let (a, b) = (rank(i), rank(best));
        let better = a.0 > b.0 || (a.0 == b.0 && (a.1 > b.1 || (a.1 == b.1 && a.2 > b.2)));
        if better {
            best = i;
        }
    }
    best
}

impl RoutingPolicy for HotPrefixPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::HotPrefix
    }

    fn route(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[Candidate],
        index: &PrefixIndex,
    ) -> Decision {
        let n = candidates.len();
        let mut saved = vec![0.0; n];
        let mut device = vec![0usize; n];
        let mut runs = matched_runs(req.blocks, candidates, index, |ci, _, h| {
            saved[ci] += self.credit(h.tier, f64::from(h.hotness), req.block_size);
            if h.tier == Tier::Device {
                device[ci] += 1;
            }
        });
        // Extend each run with blocks this router recently sent there.
        let mean_new = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let recent = &mut state.recent;
            recent.prune(req.now_ms, self.w.recent_capacity);
            if !recent.by_hash.is_empty() {
                for (ci, c) in candidates.iter().enumerate() {
                    while let Some(h) = req.blocks.get(runs[ci]) {
                        match recent.by_hash.get(h) {
                            Some((id, _)) if *id == c.id => {
                                runs[ci] += 1;
                                device[ci] += 1;
                                saved[ci] +=
                                    self.credit(Tier::Device, self.w.hot_reference, req.block_size);
                            }
                            _ => break,
                        }
                    }
                }
            }
            state.new_tokens_mean
        };
        let loads: Vec<f64> = candidates
            .iter()
            .zip(&runs)
            .map(|(c, &run)| self.load_tokens(c, req, run))
            .collect();
        // Before there is a history, this request stands for the typical one.
        let mean_new = if mean_new > 0.0 {
            mean_new
        } else {
            req.prompt_tokens as f64
        };
        let k = self.w.queue_externality * queued_requests(candidates, mean_new);
        let scores: Vec<Score> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| Score {
                replica: c.id.clone(),
                score: (1.0 + k) * saved[i]
                    - self.w.load_weight * loads[i]
                    - self.pressure(c, req, runs[i]),
                matched_blocks: runs[i],
                device_blocks: device[i],
                load: loads[i],
            })
            .collect();
        let best = best_with_ties_broken(&scores, candidates, req);
        let mut reason = if runs[best] > 0 { "prefix" } else { "load" };
        let mut chosen = best;
        if n > 1 && self.w.hot_spot_factor > 0.0 {
            // What this request alone would pay at each candidate, in tokens: the work queued
            // in front of it plus the prefill it would do there. Without the externality the
            // best score is the least of these (up to cache pressure), so protection only ever
            // bounds what the externality asks of one request.
            let own: Vec<f64> = (0..n)
                .map(|i| loads[i] + req.prompt_tokens as f64 - saved[i])
                .collect();
            let least = own.iter().copied().fold(f64::INFINITY, f64::min);
            let bound = self.w.hot_spot_factor * least + self.w.hot_spot_slack_tokens;
            if own[best] > bound {
                // The candidate with the least cost is always within the bound.
                let mut alt = None;
                for (i, s) in scores.iter().enumerate() {
                    if own[i] <= bound && alt.is_none_or(|a: usize| s.score > scores[a].score) {
                        alt = Some(i);
                    }
                }
                if let Some(a) = alt {
                    chosen = a;
                    reason = "hot-spot";
                }
            }
        }
        let new_tokens = req
            .prompt_tokens
            .saturating_sub(runs[chosen] * req.block_size)
            .max(1) as f64;
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.new_tokens_mean = if state.new_tokens_mean > 0.0 {
                state.new_tokens_mean + (new_tokens - state.new_tokens_mean) / NEW_TOKENS_WINDOW
            } else {
                new_tokens
            };
        }
        Decision {
            chosen,
            reason,
            scores,
        }
    }

    fn on_sent(&self, req: &RouteRequest<'_>, replica: &ReplicaId) {
        if self.w.recent_ms == 0 || req.blocks.is_empty() {
            return;
        }
        let expiry = req.now_ms.saturating_add(self.w.recent_ms);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let recent = &mut state.recent;
        for &h in req.blocks {
            recent.by_hash.insert(h, (replica.clone(), expiry));
            recent.order.push_back((expiry, h));
        }
        recent.prune(req.now_ms, self.w.recent_capacity);
    }

    fn forget(&self, replica: &ReplicaId) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.recent.by_hash.retain(|_, (id, _)| id != replica);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ReplicaLoad;
    use hotprefix_protocol::cluster::SummaryEntry;

    fn cand(id: &str, pending: u64) -> Candidate {
        Candidate {
            id: ReplicaId(id.into()),
            load: ReplicaLoad {
                pending_prefill_tokens: pending,
                ..ReplicaLoad::default()
            },
        }
    }

    fn hold(ix: &mut PrefixIndex, id: &str, hashes: &[u64], tier: Tier, hotness: f32) {
        let e: Vec<SummaryEntry> = hashes
            .iter()
            .enumerate()
            .map(|(i, &h)| SummaryEntry {
                hash: BlockHash(h),
                tier,
                hotness,
                depth: i as u32 + 1,
            })
            .collect();
        ix.set_summary(&ReplicaId(id.into()), &e);
    }

    fn req(blocks: &[BlockHash], now_ms: u64) -> RouteRequest<'_> {
        RouteRequest {
            blocks,
            block_size: 16,
            prompt_tokens: blocks.len() * 16 + 8,
            session: None,
            now_ms,
        }
    }

    fn blocks(n: u64) -> Vec<BlockHash> {
        (1..=n).map(BlockHash).collect()
    }

    #[test]
    fn the_replica_holding_the_longest_prefix_wins() {
        let mut ix = PrefixIndex::new();
        hold(&mut ix, "a", &[1, 2], Tier::Device, 5.0);
        hold(&mut ix, "b", &[1, 2, 3, 4], Tier::Device, 5.0);
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let b = blocks(6);
        let d = p.route(
            &req(&b, 0),
            &[cand("a", 0), cand("b", 0), cand("c", 0)],
            &ix,
        );
        assert_eq!(d.chosen, 1);
        assert_eq!(d.reason, "prefix");
        assert_eq!(d.scores[1].matched_blocks, 4);
        assert_eq!(d.scores[1].device_blocks, 4);
        assert_eq!(d.scores[0].matched_blocks, 2);
    }

    #[test]
    fn device_blocks_beat_host_blocks_and_hot_beats_cold() {
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let b = blocks(4);
        let mut ix = PrefixIndex::new();
        hold(&mut ix, "host", &[1, 2, 3, 4], Tier::Host, 5.0);
        hold(&mut ix, "dev", &[1, 2, 3, 4], Tier::Device, 5.0);
        let d = p.route(&req(&b, 0), &[cand("host", 0), cand("dev", 0)], &ix);
        assert_eq!(d.chosen, 1);
        let mut ix = PrefixIndex::new();
        hold(&mut ix, "cold", &[1, 2, 3, 4], Tier::Device, 0.0);
        hold(&mut ix, "hot", &[1, 2, 3, 4], Tier::Device, 2.0);
        let d = p.route(&req(&b, 0), &[cand("cold", 0), cand("hot", 0)], &ix);
        assert_eq!(d.chosen, 1);
        assert!(d.scores[1].score > d.scores[0].score);
    }

    #[test]
    fn queued_work_outweighs_a_short_prefix() {
        let mut ix = PrefixIndex::new();
        hold(&mut ix, "a", &[1], Tier::Device, 5.0);
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let b = blocks(1);
        // One block saves 16 tokens; 1,000 queued tokens cost more.
        let d = p.route(&req(&b, 0), &[cand("a", 1000), cand("b", 0)], &ix);
        assert_eq!(d.chosen, 1);
        assert_eq!(d.reason, "load");
    }

    #[test]
    fn an_overloaded_holder_is_skipped_for_the_best_of_the_rest() {
        let mut ix = PrefixIndex::new();
        // A long prefix (32,000 tokens) only "a" holds, behind 100,000 queued tokens. With a
        // strong externality its score still wins...
        let held: Vec<u64> = (1..=2000).collect();
        hold(&mut ix, "a", &held, Tier::Device, 5.0);
        let b = blocks(2000);
        let w = HotPrefixWeights {
            queue_externality: 4.0,
            ..HotPrefixWeights::default()
        };
        let p = HotPrefixPolicy::new(w.clone());
        let c = [cand("a", 100_000), cand("b", 10_000), cand("c", 5_000)];
        let d = p.route(&req(&b, 0), &c, &ix);
        assert!(d.scores[0].score > d.scores[2].score);
        assert!(d.scores[2].score > d.scores[1].score);
        // ...but the request would pay 100,008 tokens there against 37,008 at "c", more than
        // 1.5 times: protection sends it to the best-scoring replica within the bound.
        assert_eq!(d.chosen, 2);
        assert_eq!(d.reason, "hot-spot");
        // Without protection it stays.
        let p = HotPrefixPolicy::new(HotPrefixWeights {
            hot_spot_factor: 0.0,
            ..w.clone()
        });
        assert_eq!(p.route(&req(&b, 0), &c, &ix).chosen, 0);
        // A shorter queue is within the bound: the holder keeps the request.
        let p = HotPrefixPolicy::new(w);
        let c = [cand("a", 50_000), cand("b", 10_000), cand("c", 5_000)];
        let d = p.route(&req(&b, 0), &c, &ix);
        assert_eq!((d.chosen, d.reason), (0, "prefix"));
    }

    #[test]
    fn without_the_externality_protection_never_overrides_the_score() {
        // The one-to-one exchange already picks the least the request pays anywhere.
        let mut ix = PrefixIndex::new();
        let held: Vec<u64> = (1..=2000).collect();
        hold(&mut ix, "a", &held, Tier::Device, 5.0);
        let b = blocks(2000);
        let p = HotPrefixPolicy::new(HotPrefixWeights {
            queue_externality: 0.0,
            ..HotPrefixWeights::default()
        });
        for queued in [0, 20_000, 40_000, 100_000, 1_000_000] {
            let c = [cand("a", queued), cand("b", 10_000), cand("c", 5_000)];
            let d = p.route(&req(&b, 0), &c, &ix);
            assert_ne!(d.reason, "hot-spot", "{queued}");
        }
    }

    #[test]
    fn a_busy_cluster_keeps_a_request_with_its_prefix() {
        // "a" holds 40 of the prompt's 50 blocks (640 of 808 tokens) behind 1,000 queued
        // tokens; "b" has 200 and nothing. Alone, the request is better off on "b" (1,008
        // tokens to pay against 1,168)...
        let mut ix = PrefixIndex::new();
        let held: Vec<u64> = (1..=40).collect();
        hold(&mut ix, "a", &held, Tier::Device, 5.0);
        let b = blocks(50);
        let c = [cand("a", 1000), cand("b", 200)];
        let greedy = HotPrefixPolicy::new(HotPrefixWeights {
            queue_externality: 0.0,
            ..HotPrefixWeights::default()
        });
        assert_eq!(greedy.route(&req(&b, 0), &c, &ix).chosen, 1);
        // ...but the cluster has 0.74 requests' worth of prefill queued per replica, which the
        // 640 tokens "b" would compute again would delay too.
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let d = p.route(&req(&b, 0), &c, &ix);
        assert_eq!((d.chosen, d.reason), (0, "prefix"));
        // Idle replicas delay nobody: the score is the one-to-one exchange.
        let idle = [cand("a", 0), cand("b", 0)];
        let d = HotPrefixPolicy::new(HotPrefixWeights::default()).route(&req(&b, 0), &idle, &ix);
        let dg = greedy.route(&req(&b, 0), &idle, &ix);
        assert_eq!(d.scores, dg.scores);
    }

    #[test]
    fn the_mean_request_size_follows_the_requests_routed() {
        let ix = PrefixIndex::new();
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let c = [cand("a", 0), cand("b", 0)];
        let mean = || p.state.lock().unwrap().new_tokens_mean;
        assert_eq!(mean(), 0.0);
        // The first decision sets it: 8 blocks of 16 plus 8 tokens, nothing held.
        p.route(&req(&blocks(8), 0), &c, &ix);
        assert_eq!(mean(), 136.0);
        // Later ones move it a 64th of the way each.
        p.route(&req(&blocks(72), 0), &c, &ix);
        assert!((mean() - (136.0 + (1160.0 - 136.0) / 64.0)).abs() < 1e-9);
        for _ in 0..2000 {
            p.route(&req(&blocks(72), 0), &c, &ix);
        }
        assert!((mean() - 1160.0).abs() < 1.0);
        // It scales the queue estimate: 4,640 pending tokens are 4 requests of that size.
        let c = [cand("a", 4640), cand("b", 4640)];
        assert!((queued_requests(&c, mean()) - 4.0).abs() < 0.01);
    }

    #[test]
    fn a_burst_of_a_new_prefix_lands_on_one_replica_until_memory_expires() {
        let ix = PrefixIndex::new();
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let b = blocks(8);
        let c = [cand("a", 0), cand("b", 0), cand("c", 0)];
        let first = p.route(&req(&b, 0), &c, &ix);
        p.on_sent(&req(&b, 0), &c[first.chosen].id);
        // Even with the first replica slightly busier, the burst follows it.
        let mut c2 = c.clone();
        c2[first.chosen].load.in_flight = 1;
        for t in [10, 500, 2_999] {
            let d = p.route(&req(&b, t), &c2, &ix);
            assert_eq!(d.chosen, first.chosen, "at {t} ms");
            assert_eq!(d.scores[first.chosen].matched_blocks, 8);
        }
        // After `recent_ms` the memory is gone and the less loaded replicas win again.
        let d = p.route(&req(&b, 3_001), &c2, &ix);
        assert_ne!(d.chosen, first.chosen);
        // A replica that leaves is forgotten at once.
        p.on_sent(&req(&b, 4_000), &c[0].id);
        p.forget(&c[0].id);
        assert_eq!(
            p.route(&req(&b, 4_001), &c, &ix).scores[0].matched_blocks,
            0
        );
    }

    #[test]
    fn new_prefixes_on_idle_replicas_spread_by_room_then_by_hash() {
        let ix = PrefixIndex::new();
        let p = HotPrefixPolicy::new(HotPrefixWeights {
            recent_ms: 0,
            ..HotPrefixWeights::default()
        });
        let mut c = vec![cand("a", 0), cand("b", 0), cand("c", 0)];
        // The emptiest device tier wins a tie.
        c[0].load.device_utilisation = 0.5;
        c[2].load.device_utilisation = 0.5;
        assert_eq!(p.route(&req(&blocks(4), 0), &c, &ix).chosen, 1);
        // Equal room: the first block's hash decides, the same way every time, and different
        // prefixes reach every replica.
        let c = vec![cand("a", 0), cand("b", 0), cand("c", 0)];
        let mut seen = std::collections::HashSet::new();
        for first in 0..64u64 {
            let b: Vec<BlockHash> = vec![BlockHash(first * 7919 + 1)];
            let d = p.route(&req(&b, 0), &c, &ix).chosen;
            assert_eq!(p.route(&req(&b, 0), &c, &ix).chosen, d);
            seen.insert(d);
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn a_short_shared_head_does_not_outweigh_a_fuller_cache() {
        // Replica "a" holds the first block (a chat template's head) and is 40% full; "b" is
        // empty. A long new prompt belongs on "b".
        let mut ix = PrefixIndex::new();
        hold(&mut ix, "a", &[1], Tier::Device, 5.0);
        let p = HotPrefixPolicy::new(HotPrefixWeights::default());
        let mut c = vec![cand("a", 0), cand("b", 0)];
        c[0].load.device_utilisation = 0.4;
        let b = blocks(50);
        let d = p.route(&req(&b, 0), &c, &ix);
        assert_eq!(d.scores[0].matched_blocks, 1);
        assert_eq!(d.chosen, 1);
        // A long held prefix still wins over the emptier cache.
        let held: Vec<u64> = (1..=40).collect();
        hold(&mut ix, "a", &held, Tier::Device, 5.0);
        assert_eq!(p.route(&req(&b, 0), &c, &ix).chosen, 0);
    }

    #[test]
    fn memory_is_bounded() {
        let p = HotPrefixPolicy::new(HotPrefixWeights {
            recent_capacity: 100,
            ..HotPrefixWeights::default()
        });
        let id = ReplicaId("a".into());
        for i in 0..50u64 {
            let b: Vec<BlockHash> = (0..10).map(|j| BlockHash(i * 10 + j + 1)).collect();
            p.on_sent(&req(&b, i), &id);
        }
        let s = p.state.lock().unwrap();
        let r = &s.recent;
        assert!(r.order.len() <= 100 && r.by_hash.len() <= 100);
    }

    #[test]
    fn weights_are_validated() {
        assert!(HotPrefixWeights::default().validate().is_ok());
        for w in [
            HotPrefixWeights {
                host_weight: 2.0,
                ..HotPrefixWeights::default()
            },
            HotPrefixWeights {
                load_weight: f64::NAN,
                ..HotPrefixWeights::default()
            },
            HotPrefixWeights {
                cold_floor: 1.5,
                ..HotPrefixWeights::default()
            },
            HotPrefixWeights {
                queue_externality: -1.0,
                ..HotPrefixWeights::default()
            },
            HotPrefixWeights {
                hot_spot_factor: 0.5,
                ..HotPrefixWeights::default()
            },
        ] {
            assert!(w.validate().is_err());
        }
    }
}
