//! Discrete-event model of a cluster of engine replicas, each driving the real prefix cache.
//!
//! Each replica runs the engine's loop: continuous batching with a chunked-prefill token budget,
//! FCFS admission limited by running requests and by KV blocks (the cache's `allocate`), prefix
//! matching through the cache (device hits are free, host hits are loaded over the host link),
//! insertion of every computed prompt block, and the cache's periodic `tick`. Step durations and
//! transfer durations come from [`CostModel`]; the host link is one FIFO queue per direction.
//!
//! Layer-wise overlap: without it, a request that hit host blocks starts its prefill when the
//! whole load has arrived. With it, prefill starts once the first layer has arrived and the step
//! that finishes the request's prefill cannot end before the load's end plus one layer's share of
//! that step (the last layer's compute cannot precede its KV).
//!
//! Routing runs the router crate's policies on what a router would see, not on the simulator's
//! live state: every `load_interval_ms` of simulated time each replica reports its load
//! (waiting, running, pending prefill tokens, device use), and every `summary_interval_ms` its
//! cache's hottest `summary_top_k` blocks, which the router merges into its prefix index as it
//! does from Redis. Between load reports the router counts the requests it sent each replica
//! (`in_flight`). Policies are told of every decision (`on_sent`), so those that learn from
//! their own decisions (`hotprefix`'s recent memory, `approx-tree`) do so. Engines publish
//! independently of arrivals, so reports are events of their own, at multiples of the interval
//! from the first arrival; an interval of 0 refreshes right before every decision instead (an
//! idealised router that sees the replicas' state exactly).
//!
//! The `global` router is a bound, not a policy: see [`RouterKind::Global`].

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use hotprefix_cache::{
    CacheConfig, CacheStats, HotnessConfig, Lease, PolicyKind, PrefixCache, SlotId, Transfer,
    TransferCause, TransferId, TransferKind,
};
use hotprefix_protocol::cluster::{
    DEFAULT_SUMMARY_ENTRIES, LOAD_INTERVAL_MS, MAX_SUMMARY_ENTRIES, SUMMARY_INTERVAL_MS,
    SummaryEntry,
};
use hotprefix_protocol::{BlockHash, ReplicaId};
use hotprefix_router::cluster::{Candidate, PrefixIndex, ReplicaLoad, RouteRequest, matched_runs};
use hotprefix_router::policy::{
    self as route_policy, ApproxTreeConfig, HotPrefixWeights, PolicyConfig,
    PolicyKind as RoutePolicy, RoutingPolicy,
};
use thiserror::Error;

use crate::cost::{Chunk, CostModel};
use crate::trace::Trace;

/// How arrivals are spread over replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterKind {
    /// One of the router's policies (`hotprefix_router::policy`), the very code the router runs.
    Policy(RoutePolicy),
    /// The bound a router can approach: the replicas' compute (each its own engine, queue and
    /// host link; arrivals dispatched by `least-load` on the same load reports) sharing **one**
    /// cache with the whole cluster's capacity, device and host, as if every GPU could read
    /// every other GPU's KV for free. Its hit ratio is what the cluster's memory could give if
    /// routing never had to choose between a prefix and a replica; no replica ever holds a copy
    /// of a block another holds. A request must still fit one replica's device tier.
    Global,
}

impl RouterKind {
    /// `hotprefix`.
    pub const HOTPREFIX: RouterKind = RouterKind::Policy(RoutePolicy::HotPrefix);
    /// `least-load`.
    pub const LEAST_LOAD: RouterKind = RouterKind::Policy(RoutePolicy::LeastLoad);
    /// `round-robin`.
    pub const ROUND_ROBIN: RouterKind = RouterKind::Policy(RoutePolicy::RoundRobin);
    /// `consistent-hash`.
    pub const CONSISTENT_HASH: RouterKind = RouterKind::Policy(RoutePolicy::ConsistentHash);
    /// `approx-tree`.
    pub const APPROX_TREE: RouterKind = RouterKind::Policy(RoutePolicy::ApproxTree);

    /// Every router, the bound last.
    pub const ALL: [RouterKind; 6] = [
        RouterKind::HOTPREFIX,
        RouterKind::LEAST_LOAD,
        RouterKind::ROUND_ROBIN,
        RouterKind::CONSISTENT_HASH,
        RouterKind::APPROX_TREE,
        RouterKind::Global,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterKind::Policy(k) => k.as_str(),
            RouterKind::Global => "global",
        }
    }

    /// The policy that picks a replica (`least-load` for the bound).
    fn policy(self) -> RoutePolicy {
        match self {
            RouterKind::Policy(k) => k,
            RouterKind::Global => RoutePolicy::LeastLoad,
        }
    }
}

impl fmt::Display for RouterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RouterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RouterKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = RouterKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown router {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// What the simulated router sees and how its policies are set.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    /// Weights of the `hotprefix` routing policy.
    pub hotprefix: HotPrefixWeights,
    /// Settings of the `approx-tree` routing policy; its `max_blocks_per_replica` is replaced
    /// by [`RoutingConfig::approx_tree_blocks`].
    pub approx_tree: ApproxTreeConfig,
    /// Blocks `approx-tree` remembers per replica. `None`: one replica's device plus host
    /// capacity in blocks, so its memory is as large as the cache it imitates (the most
    /// favourable size for it).
    pub approx_tree_blocks: Option<usize>,
    /// Simulated milliseconds between hotness summaries (0: before every decision).
    pub summary_interval_ms: u64,
    /// Entries per summary.
    pub summary_top_k: usize,
    /// Simulated milliseconds between load reports (0: before every decision).
    pub load_interval_ms: u64,
}

impl Default for RoutingConfig {
    /// The engines' publishing defaults (`hotprefix_protocol::cluster`) and the policies'.
    fn default() -> Self {
        RoutingConfig {
            hotprefix: HotPrefixWeights::default(),
            approx_tree: ApproxTreeConfig::default(),
            approx_tree_blocks: None,
            summary_interval_ms: SUMMARY_INTERVAL_MS,
            summary_top_k: DEFAULT_SUMMARY_ENTRIES,
            load_interval_ms: LOAD_INTERVAL_MS,
        }
    }
}

/// Everything one simulation run needs besides the trace.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Cache policy of every replica.
    pub policy: PolicyKind,
    /// Hotness knobs (the `hotprefix` policy's, and the half-life of reported hotness).
    pub hotness: HotnessConfig,
    /// Number of engine replicas.
    pub replicas: u32,
    /// Routing across replicas.
    pub router: RouterKind,
    /// What the router sees and its policies' settings.
    pub routing: RoutingConfig,
    /// Timing model.
    pub cost: CostModel,
    /// Device KV capacity per replica, tokens.
    pub device_tokens: u64,
    /// Host KV capacity per replica, tokens.
    pub host_tokens: u64,
    /// Most requests running at once per replica (vLLM's `max_num_seqs` default is 256).
    pub max_running: usize,
    /// Tokens per step, prefill chunks and decode tokens together (the chunked-prefill budget;
    /// SGLang's `chunked_prefill_size` and vLLM's `max_num_batched_tokens` default to 8192 on
    /// large GPUs).
    pub step_tokens: u64,
}

/// Invalid simulation settings.
#[derive(Debug, Error)]
pub enum SimError {
    /// A setting is out of range.
    #[error("invalid simulation setting: {0}")]
    Invalid(String),
    /// The cache rejected its configuration.
    #[error(transparent)]
    Cache(#[from] hotprefix_cache::CacheError),
    /// The simulation ended with requests neither completed nor refused: a scheduling bug.
    #[error("{lost} of {requests} requests were never completed (simulation stalled)")]
    Stalled {
        /// Requests unaccounted for.
        lost: u64,
        /// Requests in the trace.
        requests: u64,
    },
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct SimResult {
    /// Requests that completed.
    pub completed: u64,
    /// Requests that could never fit a replica's device tier and were refused.
    pub refused: u64,
    /// Time to first token of every completed request, seconds, sorted ascending.
    pub ttft_s: Vec<f64>,
    /// Mean arrival-to-admission wait, seconds.
    pub queue_mean_s: f64,
    /// Mean arrival-to-last-token time, seconds.
    pub e2e_mean_s: f64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Prompt tokens found on the device at admission.
    pub device_hit_tokens: u64,
    /// Prompt tokens found on the host at admission (and loaded).
    pub host_hit_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// First arrival to last completion, seconds of simulated time.
    pub makespan_s: f64,
    /// Cache counters summed over replicas.
    pub cache: CacheStats,
    /// Wall-clock seconds the simulation took.
    pub wall_s: f64,
    /// What routing cost in hits (empty with one replica).
    pub routing: RoutingStats,
}

impl SimResult {
    /// Prompt tokens served from either tier, as a fraction of prompt tokens.
    pub fn hit_ratio(&self) -> f64 {
        frac(
            self.device_hit_tokens + self.host_hit_tokens,
            self.prompt_tokens,
        )
    }
    /// Device share of prompt tokens.
    pub fn device_hit_ratio(&self) -> f64 {
        frac(self.device_hit_tokens, self.prompt_tokens)
    }
    /// Host share of prompt tokens.
    pub fn host_hit_ratio(&self) -> f64 {
        frac(self.host_hit_tokens, self.prompt_tokens)
    }
    /// Mean TTFT, seconds.
    pub fn ttft_mean(&self) -> f64 {
        if self.ttft_s.is_empty() {
            return f64::NAN;
        }
        self.ttft_s.iter().sum::<f64>() / self.ttft_s.len() as f64
    }
    /// TTFT quantile `q` in `[0, 1]` (nearest rank), seconds.
    pub fn ttft_quantile(&self, q: f64) -> f64 {
        if self.ttft_s.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.ttft_s.len() as f64).ceil() as usize).clamp(1, self.ttft_s.len());
        self.ttft_s[rank - 1]
    }
    /// Prompt plus generated tokens per second of makespan.
    pub fn throughput_tok_s(&self) -> f64 {
        if self.makespan_s <= 0.0 {
            return 0.0;
        }
        (self.prompt_tokens + self.output_tokens) as f64 / self.makespan_s
    }
}

/// What the router's decisions cost in cache hits, measured against the replicas' real caches
/// (which the simulator sees and the router does not). Tokens are prompt tokens, counted as
/// the hit ratio counts them; "held" means on a replica's device tier or ready on its host tier
/// at the moment of the decision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutingStats {
    /// Routing decisions.
    pub decisions: u64,
    /// Decisions per reason the policy gave (`prefix`, `load`, `hot-spot`, ...).
    pub reasons: Vec<(&'static str, u64)>,
    /// Prompt tokens of the routed requests.
    pub prompt_tokens: u64,
    /// Per decision, the longest prefix of the request any replica held: what an omniscient
    /// affine router could have reused at that moment.
    pub best_held_tokens: u64,
    /// Per decision, what the chosen replica held.
    pub chosen_held_tokens: u64,
    /// Decisions that went to a replica holding less than the best holder.
    pub off_best: u64,
    /// `best - chosen` where the router's view (summaries and its memory) did not show the best
    /// holder ahead of the chosen replica: lost to what the router could not see.
    pub missed_unseen_tokens: u64,
    /// `best - chosen` where the view showed the best holder ahead and the score (load, cache
    /// pressure) still chose another: lost to the load trade-off.
    pub missed_score_tokens: u64,
    /// `best - chosen` where hot-spot protection moved the request off the winner.
    pub missed_hot_spot_tokens: u64,
    /// Per decision, how much of the best holder's prefix its summary did not list.
    pub summary_short_tokens: u64,
    /// Of `summary_short_tokens`, what the router's memory of its own decisions made up for.
    pub memory_covered_tokens: u64,
    /// Per decision, how much more the router believed the chosen replica held than it did
    /// (evicted since its summary, or a remembered decision that did not cache).
    pub chosen_overestimate_tokens: u64,
    /// At admission, prompt tokens the chosen replica held at the decision but no longer had
    /// (evicted while the request queued).
    pub lost_in_queue_tokens: u64,
    /// At admission, prompt tokens cached beyond what the replica held at the decision
    /// (computed meanwhile by an earlier request of the same prefix).
    pub gained_in_queue_tokens: u64,
    /// Sampled at every summary interval (not with an interval of 0): blocks resident on all
    /// replicas together, summed over samples.
    pub resident_blocks: u64,
    /// Distinct blocks among them, summed over the same samples.
    pub distinct_blocks: u64,
}

impl RoutingStats {
    /// Adds `o`'s counters to these.
    pub fn add(&mut self, o: &RoutingStats) {
        self.decisions += o.decisions;
        for &(r, n) in &o.reasons {
            self.count_reason(r, n);
        }
        self.prompt_tokens += o.prompt_tokens;
        self.best_held_tokens += o.best_held_tokens;
        self.chosen_held_tokens += o.chosen_held_tokens;
        self.off_best += o.off_best;
        self.missed_unseen_tokens += o.missed_unseen_tokens;
        self.missed_score_tokens += o.missed_score_tokens;
        self.missed_hot_spot_tokens += o.missed_hot_spot_tokens;
        self.summary_short_tokens += o.summary_short_tokens;
        self.memory_covered_tokens += o.memory_covered_tokens;
        self.chosen_overestimate_tokens += o.chosen_overestimate_tokens;
        self.lost_in_queue_tokens += o.lost_in_queue_tokens;
        self.gained_in_queue_tokens += o.gained_in_queue_tokens;
        self.resident_blocks += o.resident_blocks;
        self.distinct_blocks += o.distinct_blocks;
    }

    fn count_reason(&mut self, reason: &'static str, n: u64) {
        match self.reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, c)) => *c += n,
            None => self.reasons.push((reason, n)),
        }
    }

    /// Resident blocks per distinct block, over the samples (1.0: no block on two replicas).
    pub fn replication(&self) -> f64 {
        if self.distinct_blocks == 0 {
            return f64::NAN;
        }
        self.resident_blocks as f64 / self.distinct_blocks as f64
    }
}

fn frac(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[derive(Debug, PartialEq)]
enum EvKind {
    Arrival(usize),
    StepEnd(usize),
    Wake(usize),
    TransferDone(usize, TransferId),
    /// Every replica publishes its load (the `k`-th report since the first arrival).
    LoadReport(u64),
    /// Every replica publishes its hotness summary (the `k`-th).
    Summary(u64),
}

#[derive(Debug)]
struct Ev {
    t: f64,
    seq: u64,
    kind: EvKind,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    // Reversed, so the max-heap pops the earliest event (FIFO among equal times).
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug)]
struct Run {
    req: usize,
    lease: Lease,
    /// Slots from `allocate` not yet handed to the tree: uncached prompt blocks first, then
    /// the blocks generated tokens will fill.
    owned: Vec<SlotId>,
    /// Prompt tokens still to compute.
    prefill_left: u64,
    /// Tokens in KV so far (cached prefix plus computed).
    context: u64,
    generated: u32,
    ready_at: f64,
    load_end: f64,
}

#[derive(Debug, Clone, Copy)]
enum Work {
    Prefill(u64),
    Decode,
}

/// A prefix cache and the copies in flight on it: one per replica, or one for all under the
/// `global` bound.
#[derive(Debug)]
struct Pool {
    cache: PrefixCache,
    /// Loads in flight: (start, end) on the host link of the replica that planned them.
    loads: HashMap<TransferId, (f64, f64)>,
    /// Replicas that use it.
    replicas: Vec<usize>,
}

#[derive(Debug)]
struct Replica {
    /// Its cache, in `Sim::pools`.
    pool: usize,
    waiting: VecDeque<usize>,
    running: Vec<Run>,
    step: Vec<(usize, Work)>,
    busy: bool,
    wake_at: Option<f64>,
    blocked: bool,
    h2d_free: f64,
    h2d_background_free: f64,
    d2h_free: f64,
    /// How many requests at the front of `waiting` have been hinted to the cache.
    hinted: usize,
}

/// The simulated router: a policy and what it knows of the replicas.
#[derive(Debug)]
struct Router {
    policy: Box<dyn RoutingPolicy>,
    /// One per replica, in replica order; loads as of the last report plus `in_flight`.
    candidates: Vec<Candidate>,
    /// Merged summaries; kept only for a policy that reads them.
    index: PrefixIndex,
    reads_summaries: bool,
    /// First arrival, seconds: reports are taken at multiples of their interval from it.
    start_s: f64,
    /// Last arrival, seconds: no report is taken after it.
    end_s: f64,
}

struct Sim<'a> {
    trace: &'a Trace,
    hashes: Vec<Vec<BlockHash>>,
    cfg: &'a SimConfig,
    pools: Vec<Pool>,
    reps: Vec<Replica>,
    /// `None` with a single replica: nothing to choose.
    router: Option<Router>,
    events: BinaryHeap<Ev>,
    seq: u64,
    block_tokens: u64,
    device_blocks: u64,
    res: SimResult,
    queue_sum: f64,
    e2e_sum: f64,
    last_finish: f64,
    progress: Option<&'a dyn Fn(u64)>,
    /// Per request, the prompt tokens its replica held when it was routed.
    routed_held: Vec<u64>,
}

/// Replays `trace` through the cluster described by `cfg`. `progress` is called with the number
/// of requests finished since its previous call.
pub fn simulate(
    trace: &Trace,
    cfg: &SimConfig,
    progress: Option<&dyn Fn(u64)>,
) -> Result<SimResult, SimError> {
    if cfg.replicas == 0 {
        return Err(SimError::Invalid("replicas must be at least 1".into()));
    }
    if cfg.max_running == 0 || cfg.step_tokens == 0 {
        return Err(SimError::Invalid(
            "max_running and step_tokens must be at least 1".into(),
        ));
    }
    let block_tokens = u64::from(trace.block_tokens.max(1));
    let device_blocks = cfg.device_tokens / block_tokens;
    let host_blocks = cfg.host_tokens / block_tokens;
    if device_blocks == 0 {
        return Err(SimError::Invalid(format!(
            "device capacity of {} tokens holds no {block_tokens}-token block",
            cfg.device_tokens
        )));
    }
    let to_u32 = |b: u64, what: &str| {
        u32::try_from(b)
            .map_err(|_| SimError::Invalid(format!("{what} capacity of {b} blocks is too large")))
    };
    // The bound pools every replica's capacity into one cache.
    let (n_pools, scale) = match cfg.router {
        RouterKind::Global => (1, u64::from(cfg.replicas)),
        RouterKind::Policy(_) => (cfg.replicas as usize, 1),
    };
    let mut cache_cfg = CacheConfig::new(
        cfg.policy,
        block_tokens as usize,
        block_tokens * cfg.cost.model.kv_bytes_per_token,
        to_u32(device_blocks.saturating_mul(scale), "device")?,
        to_u32(host_blocks.saturating_mul(scale), "host")?,
    );
    cache_cfg.hotness = cfg.hotness.clone();
    let mut pools = Vec::with_capacity(n_pools);
    for _ in 0..n_pools {
        pools.push(Pool {
            cache: PrefixCache::new(cache_cfg.clone())?,
            loads: HashMap::new(),
            replicas: Vec::new(),
        });
    }
    let mut reps = Vec::with_capacity(cfg.replicas as usize);
    for r in 0..cfg.replicas as usize {
        let pool = r % n_pools;
        pools[pool].replicas.push(r);
        reps.push(Replica {
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            step: Vec::new(),
            busy: false,
            wake_at: None,
            blocked: false,
            h2d_free: 0.0,
            h2d_background_free: 0.0,
            d2h_free: 0.0,
            hinted: 0,
        });
    }
    let router = if cfg.replicas > 1 {
        Some(new_router(trace, cfg, device_blocks + host_blocks)?)
    } else {
        None
    };
    let started = Instant::now();
    let mut sim = Sim {
        trace,
        hashes: trace
            .requests
            .iter()
            .map(|r| r.blocks.iter().map(|&b| BlockHash(b)).collect())
            .collect(),
        cfg,
        pools,
        reps,
        router,
        events: BinaryHeap::new(),
        seq: 0,
        block_tokens,
        device_blocks,
        res: SimResult::default(),
        queue_sum: 0.0,
        e2e_sum: 0.0,
        last_finish: 0.0,
        progress,
        routed_held: vec![0; trace.requests.len()],
    };
    for (i, r) in trace.requests.iter().enumerate() {
        sim.push(r.arrival_s, EvKind::Arrival(i));
    }
    // Reports start with the first arrival; each schedules the next.
    if let Some(rt) = &sim.router {
        let start = rt.start_s;
        if cfg.routing.load_interval_ms > 0 {
            sim.push(start, EvKind::LoadReport(0));
        }
        // Every router gets the summary events: those that do not read summaries only have the
        // copies across replicas counted there (which changes nothing in the simulation).
        if cfg.routing.summary_interval_ms > 0 {
            sim.push(start, EvKind::Summary(0));
        }
    }
    sim.run();
    let requests = trace.requests.len() as u64;
    if sim.res.completed + sim.res.refused != requests {
        return Err(SimError::Stalled {
            lost: requests - sim.res.completed - sim.res.refused,
            requests,
        });
    }
    let mut res = sim.res;
    res.ttft_s.sort_by(f64::total_cmp);
    let n = res.completed.max(1) as f64;
    res.queue_mean_s = sim.queue_sum / n;
    res.e2e_mean_s = sim.e2e_sum / n;
    let first = trace.requests.first().map_or(0.0, |r| r.arrival_s);
    res.makespan_s = (sim.last_finish - first).max(0.0);
    for p in &sim.pools {
        res.cache.add(p.cache.stats());
    }
    res.wall_s = started.elapsed().as_secs_f64();
    Ok(res)
}

/// The router for `cfg`: its policy, a candidate per replica (ids `replica-0`, ...), an empty
/// index. `replica_blocks` is one replica's device plus host capacity in blocks.
fn new_router(trace: &Trace, cfg: &SimConfig, replica_blocks: u64) -> Result<Router, SimError> {
    let rc = &cfg.routing;
    if rc.summary_top_k == 0 || rc.summary_top_k > MAX_SUMMARY_ENTRIES {
        return Err(SimError::Invalid(format!(
            "summary top-K must be in 1..={MAX_SUMMARY_ENTRIES} (what routers accept), got {}",
            rc.summary_top_k
        )));
    }
    let mut approx_tree = rc.approx_tree.clone();
    approx_tree.max_blocks_per_replica = match rc.approx_tree_blocks {
        Some(b) => b,
        None => usize::try_from(replica_blocks).unwrap_or(usize::MAX).max(1),
    };
    let policy_cfg = PolicyConfig {
        kind: cfg.router.policy(),
        hotprefix: rc.hotprefix.clone(),
        approx_tree,
    };
    policy_cfg.validate().map_err(SimError::Invalid)?;
    let kind = policy_cfg.kind;
    Ok(Router {
        policy: route_policy::build(&policy_cfg),
        candidates: (0..cfg.replicas)
            .map(|r| Candidate {
                id: ReplicaId(format!("replica-{r}")),
                load: ReplicaLoad::default(),
            })
            .collect(),
        index: PrefixIndex::new(),
        // Only `hotprefix` reads summaries; the rest would pay for building them and ignore it.
        reads_summaries: kind == RoutePolicy::HotPrefix,
        start_s: trace
            .requests
            .iter()
            .map(|r| r.arrival_s)
            .reduce(f64::min)
            .unwrap_or(0.0),
        end_s: trace
            .requests
            .iter()
            .map(|r| r.arrival_s)
            .reduce(f64::max)
            .unwrap_or(0.0),
    })
}

impl Sim<'_> {
    fn push(&mut self, t: f64, kind: EvKind) {
        self.seq += 1;
        self.events.push(Ev {
            t,
            seq: self.seq,
            kind,
        });
    }

    fn run(&mut self) {
        while let Some(ev) = self.events.pop() {
            let now = ev.t;
            match ev.kind {
                EvKind::Arrival(q) => {
                    let r = self.route(q, now);
                    self.reps[r].waiting.push_back(q);
                    if !self.reps[r].busy {
                        self.plan(r, now);
                    }
                }
                EvKind::StepEnd(r) => {
                    let freed = self.finish_step(r, now);
                    self.plan(r, now);
                    if freed {
                        // Memory came back to a cache other replicas may share and wait on.
                        self.wake_pool(self.reps[r].pool, Some(r), now);
                    }
                }
                EvKind::Wake(r) => {
                    if !self.reps[r].busy && self.reps[r].wake_at == Some(now) {
                        self.plan(r, now);
                    }
                }
                EvKind::TransferDone(r, id) => {
                    let p = self.reps[r].pool;
                    self.pools[p].cache.complete_transfer(id);
                    self.pools[p].loads.remove(&id);
                    // Finished copies can make blocks evictable again (a load's destination,
                    // a write-through's source): a blocked admission may fit now.
                    self.wake_pool(p, None, now);
                }
                EvKind::LoadReport(k) => {
                    self.refresh_loads();
                    self.next_report(k, self.cfg.routing.load_interval_ms, EvKind::LoadReport);
                }
                EvKind::Summary(k) => {
                    self.count_copies();
                    self.refresh_summaries(now);
                    self.next_report(k, self.cfg.routing.summary_interval_ms, EvKind::Summary);
                }
            }
        }
    }

    /// Unblocks every replica of cache `p` but `except` and plans the idle ones.
    fn wake_pool(&mut self, p: usize, except: Option<usize>, now: f64) {
        for i in 0..self.pools[p].replicas.len() {
            let r = self.pools[p].replicas[i];
            if Some(r) == except {
                continue;
            }
            self.reps[r].blocked = false;
            if !self.reps[r].busy {
                self.plan(r, now);
            }
        }
    }

    /// Schedules report `k + 1`, unless it would come after the last arrival (nothing is
    /// routed after it, and the simulation must run out of events).
    fn next_report(&mut self, k: u64, interval_ms: u64, kind: fn(u64) -> EvKind) {
        let Some(rt) = &self.router else { return };
        let t = rt.start_s + (k + 1) as f64 * interval_ms as f64 / 1000.0;
        if t <= rt.end_s {
            self.push(t, kind(k + 1));
        }
    }

    /// Every replica's load report, as an engine publishes it; resets the router's count of
    /// requests sent since the last report.
    fn refresh_loads(&mut self) {
        let Some(rt) = &mut self.router else { return };
        for (c, rep) in rt.candidates.iter_mut().zip(&self.reps) {
            let u = self.pools[rep.pool].cache.usage();
            let cap = f64::from(u.device_capacity).max(1.0);
            // As the engine counts it (`Scheduler::pending_prefill_tokens`): the prompt tokens
            // of each queued request that its cached prefix does not cover now, and what
            // admitted requests still have to compute.
            let cache = &self.pools[rep.pool].cache;
            let queued: u64 = rep
                .waiting
                .iter()
                .map(|&q| {
                    let p = cache.peek(&self.hashes[q]);
                    let cached = (p.device_blocks + p.host_blocks) as u64 * self.block_tokens;
                    u64::from(self.trace.requests[q].input_tokens).saturating_sub(cached)
                })
                .sum();
            let admitted: u64 = rep.running.iter().map(|run| run.prefill_left).sum();
            c.load = ReplicaLoad {
                waiting: u32::try_from(rep.waiting.len()).unwrap_or(u32::MAX),
                running: u32::try_from(rep.running.len()).unwrap_or(u32::MAX),
                pending_prefill_tokens: queued + admitted,
                device_utilisation: (cap - u.device_free as f64) / cap,
                in_flight: 0,
            };
        }
    }

    /// Counts the blocks resident on the replicas and how many of them are distinct, for
    /// [`RoutingStats::replication`] (one cache under the bound has no copies to count).
    fn count_copies(&mut self) {
        if self.router.is_none() || self.pools.len() < 2 {
            return;
        }
        let mut distinct: hotprefix_router::cluster::BlockMap<()> = Default::default();
        for p in &self.pools {
            for b in p.cache.resident_blocks() {
                if b.device_ready || b.host_ready {
                    self.res.routing.resident_blocks += 1;
                    distinct.insert(b.hash, ());
                }
            }
        }
        self.res.routing.distinct_blocks += distinct.len() as u64;
    }

    /// Every replica's hotness summary, merged into the router's index.
    fn refresh_summaries(&mut self, now: f64) {
        let Some(rt) = &mut self.router else { return };
        if !rt.reads_summaries {
            return;
        }
        let top_k = self.cfg.routing.summary_top_k;
        for (c, rep) in rt.candidates.iter().zip(&self.reps) {
            let entries: Vec<SummaryEntry> = self.pools[rep.pool]
                .cache
                .summary(top_k, now)
                .into_iter()
                .map(|e| SummaryEntry {
                    hash: e.hash,
                    tier: e.tier,
                    hotness: e.hotness as f32,
                    depth: u32::try_from(e.depth).unwrap_or(u32::MAX),
                })
                .collect();
            rt.index.set_summary(&c.id, &entries);
        }
    }

    /// Picks a replica for request `q` with the configured policy, on what the router knows.
    fn route(&mut self, q: usize, now: f64) -> usize {
        if self.router.is_none() {
            return 0;
        }
        if self.cfg.routing.load_interval_ms == 0 {
            self.refresh_loads();
        }
        if self.cfg.routing.summary_interval_ms == 0 {
            self.refresh_summaries(now);
        }
        let Some(rt) = &mut self.router else { return 0 };
        let req = RouteRequest {
            blocks: &self.hashes[q],
            block_size: self.block_tokens as usize,
            prompt_tokens: self.trace.requests[q].input_tokens as usize,
            // Traces carry no session ids: `consistent-hash` keys by the first block.
            session: None,
            // The policies' clock is simulated time, so their memory expires as it would live.
            now_ms: (now.max(0.0) * 1000.0) as u64,
        };
        let d = rt.policy.route(&req, &rt.candidates, &rt.index);
        let r = d.chosen.min(rt.candidates.len() - 1);
        rt.policy.on_sent(&req, &rt.candidates[r].id);
        rt.candidates[r].load.in_flight += 1;
        // Measure the decision against the real caches.
        let input = u64::from(self.trace.requests[q].input_tokens);
        let tokens = |blocks: usize| (blocks as u64 * self.block_tokens).min(input);
        let held: Vec<usize> = self
            .reps
            .iter()
            .map(|rep| {
                let p = self.pools[rep.pool].cache.peek(&self.hashes[q]);
                p.device_blocks + p.host_blocks
            })
            .collect();
        let listed = matched_runs(&self.hashes[q], &rt.candidates, &rt.index, |_, _, _| {});
        let view: Vec<usize> = d.scores.iter().map(|s| s.matched_blocks).collect();
        let best = (0..held.len())
            .max_by_key(|&i| (held[i], i == r))
            .unwrap_or(r);
        let st = &mut self.res.routing;
        st.decisions += 1;
        st.count_reason(d.reason, 1);
        st.prompt_tokens += input;
        st.best_held_tokens += tokens(held[best]);
        st.chosen_held_tokens += tokens(held[r]);
        if held[best] > held[r] {
            st.off_best += 1;
            let lost = tokens(held[best]) - tokens(held[r]);
            if d.reason == "hot-spot" {
                st.missed_hot_spot_tokens += lost;
            } else if view.get(best) > view.get(r) {
                st.missed_score_tokens += lost;
            } else {
                st.missed_unseen_tokens += lost;
            }
        }
        let listed_best = listed.get(best).copied().unwrap_or(0);
        let view_best = view.get(best).copied().unwrap_or(0);
        st.summary_short_tokens += tokens(held[best]).saturating_sub(tokens(listed_best));
        st.memory_covered_tokens +=
            tokens(view_best.min(held[best])).saturating_sub(tokens(listed_best));
        st.chosen_overestimate_tokens +=
            tokens(view.get(r).copied().unwrap_or(0)).saturating_sub(tokens(held[r]));
        self.routed_held[q] = tokens(held[r]);
        r
    }

    /// Puts the cache's planned copies on the host link queues. Loads a request waits on
    /// (`Hit`) have strict priority over promotions, as an engine issues prefetches at low
    /// priority: a hit load starts as soon as earlier hit loads are done, and a promotion only
    /// starts once the hit loads queued before it are. The model does not slow a promotion
    /// already in flight when a hit load starts beside it, which flatters promotion (opt-in)
    /// slightly. Stores use the other direction's link.
    fn schedule_transfers(&mut self, r: usize, now: f64) {
        // Under the bound several replicas share the cache: a copy goes over the link of the
        // replica whose request or tick planned it (each takes the plans right after its call).
        let p = self.reps[r].pool;
        let transfers: Vec<Transfer> = self.pools[p].cache.take_transfers();
        let block_bytes = self.pools[p].cache.config().block_bytes;
        for t in transfers {
            let dur = self
                .cfg
                .cost
                .transfer_time(t.copies.len() as u64 * block_bytes);
            let rep = &mut self.reps[r];
            let (start, end) = match (t.kind, t.cause) {
                (TransferKind::Store, _) => {
                    let start = rep.d2h_free.max(now);
                    rep.d2h_free = start + dur;
                    (start, start + dur)
                }
                (TransferKind::Load, TransferCause::Promotion) => {
                    let start = rep.h2d_free.max(rep.h2d_background_free).max(now);
                    rep.h2d_background_free = start + dur;
                    (start, start + dur)
                }
                (TransferKind::Load, _) => {
                    let start = rep.h2d_free.max(now);
                    rep.h2d_free = start + dur;
                    (start, start + dur)
                }
            };
            if t.kind == TransferKind::Load {
                self.pools[p].loads.insert(t.id, (start, end));
            }
            self.push(end, EvKind::TransferDone(r, t.id));
        }
    }

    fn admit(&mut self, r: usize, now: f64) {
        let bt = self.block_tokens;
        let layers = f64::from(self.cfg.cost.model.layers);
        let trace = self.trace;
        while !self.reps[r].blocked && self.reps[r].running.len() < self.cfg.max_running {
            let Some(&q) = self.reps[r].waiting.front() else {
                break;
            };
            let req = &trace.requests[q];
            let input = u64::from(req.input_tokens);
            let total_blocks = (input + u64::from(req.output_tokens))
                .div_ceil(bt)
                .max(req.blocks.len() as u64);
            if total_blocks > self.device_blocks {
                self.reps[r].waiting.pop_front();
                self.reps[r].hinted = self.reps[r].hinted.saturating_sub(1);
                self.res.refused += 1;
                continue;
            }
            // Ask first, so a request that cannot be admitted yet leaves no trace in the cache
            // (no hotness counted, no load started, no eviction) before it is tried again.
            let p = self.reps[r].pool;
            let cache = &self.pools[p].cache;
            let peek = cache.peek(&self.hashes[q]);
            let new_blocks = total_blocks as usize - peek.device_blocks - peek.host_blocks;
            if !cache.fits(&self.hashes[q], new_blocks) {
                // Memory is held by running requests or in-flight copies: wait for one to end.
                self.reps[r].blocked = true;
                break;
            }
            let m = self.pools[p]
                .cache
                .match_hashes(&self.hashes[q], input as usize, now);
            self.schedule_transfers(r, now);
            let need = total_blocks as usize - m.blocks();
            let owned = match self.pools[p].cache.allocate(need, now) {
                Ok(s) => s,
                Err(_) => {
                    // `fits` said yes, so this does not happen; stay safe if it ever does.
                    self.pools[p].cache.release(m.lease);
                    self.reps[r].blocked = true;
                    break;
                }
            };
            self.schedule_transfers(r, now);
            let rep = &mut self.reps[r];
            rep.waiting.pop_front();
            rep.hinted = rep.hinted.saturating_sub(1);
            // Wait for every load on the path: this match's, and any another request or a
            // promotion started (those already finished are no longer in `loads`).
            let pool = &self.pools[p];
            let waits: Vec<(f64, f64)> = pool
                .cache
                .lease_transfers(&m.lease)
                .iter()
                .filter_map(|t| pool.loads.get(t).copied())
                .collect();
            let load_start = waits.iter().map(|w| w.0).reduce(f64::min).unwrap_or(now);
            let load_end = waits.iter().map(|w| w.1).fold(now, f64::max);
            let ready_at = if self.cfg.cost.layerwise_overlap {
                load_start + (load_end - load_start) / layers
            } else {
                load_end
            };
            let cached = m.cached_tokens as u64;
            if self.router.is_some() {
                let held = self.routed_held[q];
                self.res.routing.lost_in_queue_tokens += held.saturating_sub(cached);
                self.res.routing.gained_in_queue_tokens += cached.saturating_sub(held);
            }
            let dev = (m.device_blocks as u64 * bt).min(input);
            self.res.prompt_tokens += input;
            self.res.device_hit_tokens += dev;
            self.res.host_hit_tokens += cached - dev;
            self.queue_sum += now - req.arrival_s;
            // A fully cached prompt still computes its last token to produce logits.
            let prefill = (input - cached).max(1);
            rep.running.push(Run {
                req: q,
                lease: m.lease,
                owned,
                prefill_left: prefill,
                context: input - prefill,
                generated: 0,
                ready_at,
                load_end,
            });
        }
    }

    fn plan(&mut self, r: usize, now: f64) {
        let p = self.reps[r].pool;
        self.pools[p].cache.tick(now);
        self.schedule_transfers(r, now);
        self.admit(r, now);
        // Requests that could not be admitted now will be: tell the cache once per request, as
        // an engine's scheduler would after each scheduling pass.
        let rep = &mut self.reps[r];
        for &q in rep.waiting.iter().skip(rep.hinted) {
            self.pools[p].cache.hint_queued(&self.hashes[q], now);
        }
        rep.hinted = rep.waiting.len();
        let rep = &mut self.reps[r];
        rep.step.clear();
        let mut budget = self.cfg.step_tokens;
        let mut decodes = Vec::new();
        let mut chunks = Vec::new();
        let mut finish_after = now;
        // Decode first: one token each, so running requests keep streaming (as vLLM's and
        // SGLang's schedulers do under chunked prefill).
        for (i, run) in rep.running.iter().enumerate() {
            if run.prefill_left == 0 && budget > 0 {
                decodes.push(run.context);
                rep.step.push((i, Work::Decode));
                budget -= 1;
            }
        }
        let mut next_ready = f64::INFINITY;
        for (i, run) in rep.running.iter().enumerate() {
            if run.prefill_left == 0 {
                continue;
            }
            if run.ready_at > now {
                next_ready = next_ready.min(run.ready_at);
                continue;
            }
            if budget == 0 {
                break;
            }
            let n = run.prefill_left.min(budget);
            budget -= n;
            chunks.push(Chunk {
                new: n,
                context: run.context,
            });
            rep.step.push((i, Work::Prefill(n)));
            if n == run.prefill_left && run.load_end > now {
                finish_after = finish_after.max(run.load_end);
            }
        }
        if rep.step.is_empty() {
            rep.busy = false;
            rep.wake_at = next_ready.is_finite().then_some(next_ready);
            if let Some(t) = rep.wake_at {
                self.push(t, EvKind::Wake(r));
            }
            return;
        }
        let dur = self.cfg.cost.step_time(&chunks, &decodes);
        let layers = f64::from(self.cfg.cost.model.layers);
        let end = (now + dur).max(finish_after + dur / layers);
        rep.busy = true;
        rep.wake_at = None;
        self.push(end, EvKind::StepEnd(r));
    }

    /// Ends replica `r`'s step; true when requests finished (and gave memory back).
    fn finish_step(&mut self, r: usize, now: f64) -> bool {
        let step = std::mem::take(&mut self.reps[r].step);
        let trace = self.trace;
        let mut finished = 0;
        for (i, work) in step {
            let q = self.reps[r].running[i].req;
            let req = &trace.requests[q];
            match work {
                Work::Prefill(n) => {
                    let rep = &mut self.reps[r];
                    let run = &mut rep.running[i];
                    run.prefill_left -= n;
                    run.context += n;
                    if run.prefill_left == 0 {
                        run.generated = 1;
                        self.res.ttft_s.push(now - req.arrival_s);
                        self.insert_prompt(r, i, now);
                    }
                }
                Work::Decode => {
                    let run = &mut self.reps[r].running[i];
                    run.generated += 1;
                    run.context += 1;
                }
            }
            let run = &self.reps[r].running[i];
            if run.prefill_left == 0 && run.generated >= req.output_tokens.max(1) {
                finished += 1;
            }
        }
        if finished > 0 {
            let rep = &mut self.reps[r];
            let cache = &mut self.pools[rep.pool].cache;
            let mut i = 0;
            while i < rep.running.len() {
                let run = &rep.running[i];
                let req = &trace.requests[run.req];
                if run.prefill_left == 0 && run.generated >= req.output_tokens.max(1) {
                    let run = rep.running.swap_remove(i);
                    cache.release(run.lease);
                    let freed = cache.free(run.owned);
                    debug_assert!(freed.is_ok(), "the simulator frees only slots it holds");
                    self.res.completed += 1;
                    self.res.output_tokens += u64::from(run.generated);
                    self.e2e_sum += now - req.arrival_s;
                    self.last_finish = self.last_finish.max(now);
                } else {
                    i += 1;
                }
            }
            // swap_remove reorders; keep admission order for fair chunking.
            rep.running.sort_by_key(|run| run.req);
            rep.blocked = false;
            if let Some(p) = self.progress {
                p(finished);
            }
        }
        self.schedule_transfers(r, now);
        finished > 0
    }

    /// Hands the request's computed prompt blocks to the cache.
    fn insert_prompt(&mut self, r: usize, i: usize, now: f64) {
        let rep = &mut self.reps[r];
        let cache = &mut self.pools[rep.pool].cache;
        let run = &mut rep.running[i];
        let lease = &mut run.lease;
        let hashes = &self.hashes[run.req];
        let start = lease.blocks();
        if start >= hashes.len() {
            return;
        }
        let n = hashes.len() - start;
        if let Ok(ins) = cache.insert(lease, &hashes[start..], &run.owned[..n], now) {
            run.owned.drain(..ins.merged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{GpuSpec, ModelSpec};
    use crate::trace::{Trace, TraceRequest};

    fn cfg(policy: PolicyKind, device_tokens: u64, host_tokens: u64) -> SimConfig {
        SimConfig {
            policy,
            hotness: HotnessConfig::default(),
            replicas: 1,
            router: RouterKind::ROUND_ROBIN,
            routing: RoutingConfig::default(),
            cost: CostModel::new(ModelSpec::LLAMA_3_1_8B, GpuSpec::H100),
            device_tokens,
            host_tokens,
            max_running: 256,
            step_tokens: 8192,
        }
    }

    fn req(t: f64, blocks: &[u64], output: u32) -> TraceRequest {
        TraceRequest {
            arrival_s: t,
            input_tokens: blocks.len() as u32 * 512,
            output_tokens: output,
            blocks: blocks.to_vec(),
        }
    }

    fn trace(requests: Vec<TraceRequest>) -> Trace {
        Trace {
            name: "t".into(),
            block_tokens: 512,
            requests,
        }
    }

    #[test]
    fn a_repeated_prompt_hits_and_gets_a_shorter_ttft() {
        let t = trace(vec![
            req(0.0, &[1, 2, 3, 4], 2),
            req(10.0, &[1, 2, 3, 4], 2),
        ]);
        let res = simulate(&t, &cfg(PolicyKind::Lru, 100_000, 0), None).unwrap();
        assert_eq!(res.completed, 2);
        assert_eq!(res.device_hit_tokens, 2048);
        assert!((res.hit_ratio() - 0.5).abs() < 1e-9);
        assert!(res.ttft_s[0] < res.ttft_s[1] / 10.0, "{:?}", res.ttft_s);
    }

    #[test]
    fn host_hits_are_loaded_and_counted() {
        // Device of 4 blocks: the second prompt evicts the first, which lru-offload keeps on host.
        let t = trace(vec![
            req(0.0, &[1, 2, 3], 1),
            req(10.0, &[7, 8, 9], 1),
            req(20.0, &[1, 2, 3], 1),
        ]);
        let res = simulate(&t, &cfg(PolicyKind::LruOffload, 4 * 512, 16 * 512), None).unwrap();
        assert_eq!(res.completed, 3);
        assert_eq!(res.host_hit_tokens, 3 * 512);
        assert!(res.cache.h2d_bytes >= 3 * 512 * 131_072);
        let lru = simulate(&t, &cfg(PolicyKind::Lru, 4 * 512, 16 * 512), None).unwrap();
        assert_eq!(lru.host_hit_tokens, 0);
        assert!(
            res.ttft_s[0] < lru.ttft_s[2],
            "a host hit beats recomputing"
        );
    }

    #[test]
    fn layerwise_overlap_hides_most_of_a_host_load() {
        // A 40-block prefix (2.6 GiB of KV) comes back from host, about 52 ms over PCIe, and
        // 40 new blocks are computed after it (about 0.8 s): with overlap the load hides behind
        // that compute except for its first layer's share.
        let prefix: Vec<u64> = (1..=40).collect();
        let other: Vec<u64> = (100..160).collect();
        let extended: Vec<u64> = (1..=40).chain(200..240).collect();
        let t = trace(vec![
            req(0.0, &prefix, 1),
            req(10.0, &other, 1),
            req(20.0, &extended, 1),
        ]);
        let mut c = cfg(PolicyKind::LruOffload, 84 * 512, 200 * 512);
        let with = simulate(&t, &c, None).unwrap();
        c.cost.layerwise_overlap = false;
        let without = simulate(&t, &c, None).unwrap();
        assert_eq!(with.host_hit_tokens, 40 * 512);
        let load = c
            .cost
            .transfer_time(40 * 512 * c.cost.model.kv_bytes_per_token);
        // Only the extended request differs between the runs.
        let (w, wo): (f64, f64) = (with.ttft_s.iter().sum(), without.ttft_s.iter().sum());
        assert!(
            (wo - w - load * (1.0 - 1.0 / 32.0)).abs() < 0.2 * load,
            "with {w} without {wo} load {load}"
        );
    }

    #[test]
    fn a_blocked_replica_wakes_when_a_copy_finishes() {
        // Promotion fills the free slots with blocks still loading just before a request needs
        // the whole device: admission must wait for the load, not stall forever.
        let t = trace(vec![
            req(0.0, &[1, 2, 3, 4], 1),
            req(10.0, &[11, 12, 13, 14], 2048),
            req(12.0, &[21, 22, 23, 24, 25, 26, 27], 1),
            req(100.0, &[31], 1),
        ]);
        let mut c = cfg(PolicyKind::HotPrefix, 8 * 512, 32 * 512);
        c.hotness.promotion_budget_bytes = 8 * 512 * c.cost.model.kv_bytes_per_token;
        c.hotness.promotion_interval_s = 0.001;
        let res = simulate(&t, &c, None).unwrap();
        assert_eq!(res.completed, 4);
    }

    #[test]
    fn a_request_sharing_an_in_flight_load_waits_for_it() {
        // Two requests share a prefix that is on the host: the first starts the load, the
        // second finds it loading and must not get its first token before the data arrives.
        let prefix: Vec<u64> = (1..=40).collect();
        let other: Vec<u64> = (100..160).collect();
        let t = trace(vec![
            req(0.0, &prefix, 1),
            req(10.0, &other, 1),
            req(20.0, &prefix, 1),
            req(20.0, &prefix, 1),
        ]);
        let mut c = cfg(PolicyKind::LruOffload, 84 * 512, 200 * 512);
        c.cost.layerwise_overlap = false;
        let res = simulate(&t, &c, None).unwrap();
        let load = c
            .cost
            .transfer_time(40 * 512 * c.cost.model.kv_bytes_per_token);
        assert!(
            res.ttft_s[0] >= load,
            "fastest TTFT {} < load time {load}",
            res.ttft_s[0]
        );
        assert!(res.ttft_s[1] >= load);
    }

    #[test]
    fn requests_larger_than_the_device_are_refused_not_stuck() {
        let t = trace(vec![req(0.0, &[1, 2, 3, 4, 5], 1), req(1.0, &[6], 1)]);
        let res = simulate(&t, &cfg(PolicyKind::HotPrefix, 4 * 512, 0), None).unwrap();
        assert_eq!(res.refused, 1);
        assert_eq!(res.completed, 1);
    }

    #[test]
    fn load_beyond_capacity_queues_instead_of_failing() {
        let reqs: Vec<_> = (0..200)
            .map(|i| req(0.0, &[1000 + i, 2000 + i], 50))
            .collect();
        let res = simulate(
            &trace(reqs),
            &cfg(PolicyKind::HotPrefix, 16 * 512, 64 * 512),
            None,
        )
        .unwrap();
        assert_eq!(res.completed, 200);
        assert!(res.queue_mean_s > 0.0);
    }

    #[test]
    fn least_load_spreads_a_burst() {
        let reqs: Vec<_> = (0..8).map(|i| req(0.0, &[i], 100)).collect();
        let mut c = cfg(PolicyKind::Lru, 100_000, 0);
        c.replicas = 4;
        c.router = RouterKind::LEAST_LOAD;
        let spread = simulate(&trace(reqs.clone()), &c, None).unwrap();
        c.replicas = 1;
        let single = simulate(&trace(reqs), &c, None).unwrap();
        assert!(spread.makespan_s < single.makespan_s);
    }

    #[test]
    fn router_names_round_trip() {
        for r in RouterKind::ALL {
            assert_eq!(r.as_str().parse::<RouterKind>().unwrap(), r);
        }
        assert_eq!(
            "round-robin".parse::<RouterKind>().unwrap(),
            RouterKind::ROUND_ROBIN
        );
        assert_eq!(
            "least-load".parse::<RouterKind>().unwrap(),
            RouterKind::LEAST_LOAD
        );
        let err = "random".parse::<RouterKind>().unwrap_err();
        assert!(
            err.contains("unknown router") && err.contains("global"),
            "{err}"
        );
    }

    /// 8 system prompts of 8 blocks, 16 questions each, 8 requests a second.
    fn shared_prefix_workload() -> Trace {
        crate::workload::GeneratedSharedPrefix {
            groups: 8,
            prompts_per_group: 16,
            system_prompt_tokens: 4096,
            question_tokens: 128,
            output_tokens: 32,
            request_rate: 8.0,
            seed: 7,
        }
        .generate()
        .unwrap()
    }

    fn run_router(t: &Trace, router: RouterKind, replicas: u32) -> SimResult {
        let mut c = cfg(PolicyKind::Lru, 40 * 512, 0);
        c.replicas = replicas;
        c.router = router;
        let res = simulate(t, &c, None).unwrap();
        assert_eq!(res.completed, t.requests.len() as u64, "{router}");
        res
    }

    #[test]
    fn hotprefix_routing_hits_more_than_round_robin() {
        // Each replica's device holds 5 of the 8 prefixes. Round robin sends every prefix to
        // every replica, which computes it (and evicts others); hotprefix keeps each prefix
        // where it was computed.
        let t = shared_prefix_workload();
        let rr = run_router(&t, RouterKind::ROUND_ROBIN, 4);
        let hp = run_router(&t, RouterKind::HOTPREFIX, 4);
        assert!(
            hp.hit_ratio() > rr.hit_ratio() + 0.1,
            "hotprefix {} round-robin {}",
            hp.hit_ratio(),
            rr.hit_ratio()
        );
        assert!(hp.ttft_mean() < rr.ttft_mean());
    }

    #[test]
    fn every_router_completes_and_the_bound_hits_most() {
        let t = shared_prefix_workload();
        let hits: Vec<(RouterKind, f64)> = RouterKind::ALL
            .into_iter()
            .map(|r| (r, run_router(&t, r, 4).hit_ratio()))
            .collect();
        let global = hits[hits.len() - 1].1;
        // One shared cache of 4 x 40 blocks holds every prefix: only the first request of each
        // group misses it (a prefix is 8 of a request's 9 blocks).
        assert!(global > 0.8, "{hits:?}");
        // Not a strict bound: a request arriving while its prefix is still being computed
        // misses it, and the bound's least-load dispatch starts such requests on other
        // replicas while an affine router queues them behind the first.
        for &(r, h) in &hits {
            assert!(h <= global + 0.02, "{r} beats the bound: {hits:?}");
        }
        // Prefix-affine routers keep a group on one replica.
        for (r, h) in &hits[..] {
            if matches!(
                *r,
                RouterKind::HOTPREFIX | RouterKind::CONSISTENT_HASH | RouterKind::APPROX_TREE
            ) {
                assert!(*h > 0.7, "{r}: {hits:?}");
            }
        }
    }

    #[test]
    fn the_bound_shares_one_cache_between_replicas() {
        // The second request arrives while the first replica is decoding the first: least-load
        // sends it to the idle replica, which only the shared cache lets hit.
        let t = trace(vec![
            req(0.0, &[1, 2, 3, 4], 2000),
            req(1.0, &[1, 2, 3, 4], 2),
        ]);
        let own = run_router(&t, RouterKind::LEAST_LOAD, 2);
        let shared = run_router(&t, RouterKind::Global, 2);
        assert_eq!(own.device_hit_tokens, 0);
        assert_eq!(shared.device_hit_tokens, 2048);
    }

    #[test]
    fn routing_stats_measure_decisions_against_the_real_caches() {
        let t = shared_prefix_workload();
        let ll = run_router(&t, RouterKind::LEAST_LOAD, 4);
        let st = &ll.routing;
        assert_eq!(st.decisions, t.requests.len() as u64);
        assert_eq!(st.prompt_tokens, ll.prompt_tokens);
        // Least-load ignores prefixes: some requests go elsewhere while a replica holds theirs.
        assert!(st.off_best > 0, "{st:?}");
        assert!(st.best_held_tokens > st.chosen_held_tokens, "{st:?}");
        // It reads no prefix information, so everything it missed was unseen.
        assert_eq!(
            st.missed_unseen_tokens,
            st.best_held_tokens - st.chosen_held_tokens
        );
        assert_eq!(st.missed_score_tokens + st.missed_hot_spot_tokens, 0);
        assert_eq!(st.summary_short_tokens, st.best_held_tokens);
        // What the chosen replicas held at the decisions, corrected by what changed while the
        // requests queued, is exactly what they hit.
        assert_eq!(
            ll.device_hit_tokens + ll.host_hit_tokens,
            st.chosen_held_tokens - st.lost_in_queue_tokens + st.gained_in_queue_tokens
        );
        assert!(st.replication() >= 1.0, "{st:?}");
        assert_eq!(st.reasons, vec![("load", st.decisions)]);
        // The prefix-aware router goes where the prefixes are.
        let hp = run_router(&t, RouterKind::HOTPREFIX, 4);
        assert!(
            hp.routing.chosen_held_tokens as f64 >= 0.95 * hp.routing.best_held_tokens as f64,
            "{:?}",
            hp.routing
        );
        // Under the bound every replica shares one cache: nobody holds more than another, and
        // there are no copies to count.
        let g = run_router(&t, RouterKind::Global, 4);
        assert_eq!(g.routing.off_best, 0);
        assert_eq!(g.routing.distinct_blocks, 0);
        assert!(g.routing.replication().is_nan());
        // One replica routes nothing.
        let one = run_router(&t, RouterKind::LEAST_LOAD, 1);
        assert_eq!(one.routing, RoutingStats::default());
    }

    #[test]
    fn the_router_counts_what_it_sent_between_load_reports() {
        // A burst at one instant sees the same report: only `in_flight` spreads it.
        let reqs: Vec<_> = (0..8).map(|i| req(0.0, &[100 + i], 100)).collect();
        let mut c = cfg(PolicyKind::Lru, 100_000, 0);
        c.replicas = 4;
        c.router = RouterKind::LEAST_LOAD;
        c.routing.load_interval_ms = 60_000;
        let spread = simulate(&trace(reqs.clone()), &c, None).unwrap();
        // Round robin spreads it too, so the makespans match; one replica alone is slower.
        c.router = RouterKind::ROUND_ROBIN;
        let rr = simulate(&trace(reqs.clone()), &c, None).unwrap();
        assert!((spread.makespan_s - rr.makespan_s).abs() < 1e-9);
        c.replicas = 1;
        let single = simulate(&trace(reqs), &c, None).unwrap();
        assert!(spread.makespan_s < single.makespan_s);
    }

    #[test]
    fn routing_settings_are_checked() {
        let t = shared_prefix_workload();
        let mut c = cfg(PolicyKind::Lru, 40 * 512, 0);
        c.replicas = 2;
        c.router = RouterKind::HOTPREFIX;
        c.routing.summary_top_k = 0;
        assert!(matches!(simulate(&t, &c, None), Err(SimError::Invalid(_))));
        c.routing.summary_top_k = 16;
        c.routing.hotprefix.cold_floor = 2.0;
        let err = simulate(&t, &c, None).unwrap_err().to_string();
        assert!(err.contains("hotprefix: cold_floor"), "{err}");
        // Live summaries and loads (interval 0) work too.
        c.routing = RoutingConfig {
            summary_interval_ms: 0,
            load_interval_ms: 0,
            ..RoutingConfig::default()
        };
        assert!(simulate(&t, &c, None).unwrap().hit_ratio() > 0.7);
    }
}
