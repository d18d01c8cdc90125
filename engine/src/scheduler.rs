//! Continuous batching over the prefix cache: admits waiting requests in cache-aware order,
//! builds each step from decode tokens and chunked prefill under a token budget, runs it on the
//! backend, samples, streams tokens out, inserts every newly filled block into the cache as it
//! is produced, and preempts by recompute when blocks run out. Tier transfers are submitted to
//! the backend as the cache plans them and completed as the backend reports them, so a request
//! waiting on a host-tier load never holds up the others.
//!
//! Single-threaded by design: the engine thread ([`crate::engine`]) owns it and calls
//! [`Scheduler::step`] in a loop; nothing here blocks except the bounded wait for transfers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hotprefix_cache::{
    CacheConfig, CacheError, HotnessConfig, Lease, LeaseState, PolicyKind, PrefixCache, SlotId,
};
use hotprefix_protocol::{BlockHash, Salt, hash_blocks};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{Backend, BackendError, KvLayout, SeqSpan, StepBatch, kv_block_bytes};
use crate::decoder::Decoder;
use crate::metrics::EngineMetrics;
use crate::sampling::{Sampler, SamplingParams};

/// Scheduling and cache knobs, validated by [`SchedulerConfig::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the device tier.
    pub device_blocks: u32,
    /// Blocks in the host tier.
    pub host_blocks: u32,
    /// Cache policy.
    pub policy: PolicyKind,
    /// Hotness and policy knobs.
    pub hotness: HotnessConfig,
    /// Requests running (admitted, holding blocks) at once.
    pub max_running: usize,
    /// Tokens (prefill and decode together) per step.
    pub max_batch_tokens: usize,
    /// Requests allowed to wait; more are refused (HTTP 429).
    pub max_waiting: usize,
    /// Above this many waiting requests, admission is first come first served instead of
    /// longest cached prefix first (ordering costs a lookup per waiting request).
    pub fcfs_above: usize,
    /// A request waiting this long is admitted before any other (no starvation).
    pub max_wait: Duration,
    /// Salt of the block hashes (model identity).
    pub salt: Salt,
}

impl SchedulerConfig {
    /// Defaults for a cache of the given sizes.
    pub fn new(block_size: usize, device_blocks: u32, host_blocks: u32, salt: Salt) -> Self {
        SchedulerConfig {
            block_size,
            device_blocks,
            host_blocks,
            policy: PolicyKind::HotPrefix,
            hotness: HotnessConfig::default(),
            max_running: 16,
            max_batch_tokens: 512,
            max_waiting: 256,
            fcfs_above: 64,
            max_wait: Duration::from_secs(10),
            salt,
        }
    }

    /// Checks ranges and cross-field constraints.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_size == 0 || self.block_size > 1024 {
            return Err(format!("block size {} not in 1..=1024", self.block_size));
        }
        if self.device_blocks < 2 {
            return Err("the device cache needs at least 2 blocks".into());
        }
        if self.max_running == 0 || self.max_batch_tokens == 0 {
            return Err("max running requests and max batch tokens must be at least 1".into());
        }
        if self.max_batch_tokens < self.max_running {
            return Err(format!(
                "max batch tokens ({}) below max running requests ({}): decode steps could not \
                 serve every running request",
                self.max_batch_tokens, self.max_running
            ));
        }
        Ok(())
    }
}

/// What a request produced, streamed to its submitter.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Prefill is about to start; the prompt's cached part is known.
    Admitted {
        /// Prompt tokens served from the cache.
        cached_tokens: usize,
    },
    /// One generated token.
    Token(u32),
    /// The request ended; nothing follows.
    Done(Finish),
    /// The engine refused the request before queuing it; nothing follows.
    Rejected(SubmitError),
}

/// Why a request ended, with its token counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finish {
    /// Why.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the cache (at first admission).
    pub cached_tokens: usize,
}

/// Why a request ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The engine could not continue (the message says why).
    Error(String),
}

/// One generation request.
#[derive(Debug)]
pub struct Request {
    /// Request id, for logs.
    pub id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Sampling settings (validated).
    pub sampling: SamplingParams,
    /// Token ids that end the answer (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Where tokens go. Dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
}

/// Why a request was refused before it was queued.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum SubmitError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Prompt plus `max_tokens` exceeds the model's context.
    #[error(
        "this model's maximum context length is {context} tokens; the request needs {needed} \
         ({prompt} in the prompt plus {max_tokens} to generate)"
    )]
    ContextLength {
        /// The model's context.
        context: usize,
        /// Prompt plus max_tokens.
        needed: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested tokens.
        max_tokens: usize,
    },
    /// Prompt plus `max_tokens` would not fit the device cache even alone.
    #[error(
        "the request needs {blocks} KV blocks but the device cache holds {capacity}; shorten the \
         prompt or max_tokens"
    )]
    TooLarge {
        /// Blocks needed.
        blocks: usize,
        /// Device blocks in all.
        capacity: usize,
    },
    /// Too many requests are waiting.
    #[error("the engine is overloaded: {0} requests are waiting")]
    QueueFull(usize),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// Limits a request is checked against before it is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model context.
    pub context: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Device blocks.
    pub device_blocks: usize,
}

impl Limits {
    /// Checks `prompt` with `max_tokens` to generate.
    pub fn check(&self, prompt: &[u32], max_tokens: usize) -> Result<(), SubmitError> {
        if prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::BadToken {
                id,
                vocab: self.vocab,
            });
        }
        let needed = prompt.len().saturating_add(max_tokens);
        if needed > self.context {
            return Err(SubmitError::ContextLength {
                context: self.context,
                needed,
                prompt: prompt.len(),
                max_tokens,
            });
        }
        let blocks = needed.div_ceil(self.block_size);
        if blocks > self.device_blocks {
            return Err(SubmitError::TooLarge {
                blocks,
                capacity: self.device_blocks,
            });
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Matched, waiting for host-tier loads on its path.
    Loading,
    /// Computing (prefill chunks or decode tokens).
    Running,
}

#[derive(Debug)]
struct Seq {
    req: Request,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    generated: usize,
    /// Chained hashes of the full blocks of `tokens` computed so far (grown lazily).
    hashes: Vec<BlockHash>,
    lease: Option<Lease>,
    /// Device slots: the lease's blocks, then blocks this sequence allocated and owns.
    table: Vec<SlotId>,
    /// Positions whose KV is in `table`.
    computed: usize,
    /// Prompt tokens served from the cache at first admission.
    cached_tokens: Option<usize>,
    sampler: Sampler,
    arrived: Instant,
    admitted: u64,
    phase: Phase,
    last_token: Option<Instant>,
}

impl Seq {
    /// Extends `hashes` to cover the first `blocks` full blocks of `tokens`.
    fn hash_through(&mut self, blocks: usize, bs: usize, salt: Salt) {
        let have = self.hashes.len();
        if blocks > have {
            let parent = self.hashes.last().copied().unwrap_or(BlockHash::ROOT);
            let more = hash_blocks(&self.tokens[have * bs..blocks * bs], bs, salt, parent);
            self.hashes.extend(more);
        }
    }
}

/// Counts and cache state for metrics and `/debug/cache`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SchedulerStatus {
    /// Requests queued.
    pub waiting: usize,
    /// Requests admitted (computing or loading).
    pub running: usize,
    /// Of those, waiting on host-tier loads.
    pub loading: usize,
    /// Transfers submitted and not yet complete.
    pub transfers_in_flight: usize,
    /// Tier occupancy.
    pub usage: hotprefix_cache::Usage,
    /// Cache counters.
    pub stats: hotprefix_cache::CacheStats,
    /// Requests preempted (recomputed) so far.
    pub preemptions: u64,
    /// Steps run so far.
    pub steps: u64,
}

/// The scheduler with its model, backend and cache.
#[derive(Debug)]
pub struct Scheduler<B: Backend> {
    cfg: SchedulerConfig,
    decoder: Decoder<B>,
    backend: B,
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    limits: Limits,
    started: Instant,
    admissions: u64,
    preemptions: u64,
    steps: u64,
    metrics: std::sync::Arc<EngineMetrics>,
}

impl<B: Backend> Scheduler<B> {
    /// Allocates the KV pools in `backend` and builds the cache.
    pub fn new(
        cfg: SchedulerConfig,
        decoder: Decoder<B>,
        mut backend: B,
        metrics: std::sync::Arc<EngineMetrics>,
    ) -> Result<Self, SchedulerError> {
        cfg.validate().map_err(SchedulerError::Config)?;
        let mcfg = decoder.config().clone();
        let mut cache_cfg = CacheConfig::new(
            cfg.policy,
            cfg.block_size,
            kv_block_bytes(&mcfg, cfg.block_size, backend.kv_value_bytes()),
            cfg.device_blocks,
            cfg.host_blocks,
        );
        cache_cfg.hotness = cfg.hotness.clone();
        let cache = PrefixCache::new(cache_cfg)?;
        backend.allocate_kv(
            &mcfg,
            KvLayout {
                block_size: cfg.block_size,
                device_blocks: cfg.device_blocks as usize,
                host_blocks: cache.usage().host_capacity as usize,
            },
        )?;
        Ok(Scheduler {
            limits: Limits {
                vocab: mcfg.vocab,
                context: mcfg.context,
                block_size: cfg.block_size,
                device_blocks: cfg.device_blocks as usize,
            },
            cfg,
            decoder,
            backend,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            started: Instant::now(),
            admissions: 0,
            preemptions: 0,
            steps: 0,
            metrics,
        })
    }

    /// The backend's name (`cpu`, `cuda`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// What requests are checked against.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The prefix cache (tests and `/debug/cache` read it).
    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }

    /// The prefix cache, to drive it directly (tests force evictions this way); call
    /// [`Scheduler::flush_transfers`] after anything that may plan copies.
    pub fn cache_mut(&mut self) -> &mut PrefixCache {
        &mut self.cache
    }

    /// Seconds since the scheduler started: the cache's clock.
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Queues a request (checked against [`Scheduler::limits`] and the queue bound).
    pub fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        self.limits.check(&req.prompt, req.max_tokens)?;
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(SubmitError::QueueFull(self.waiting.len()));
        }
        let bs = self.cfg.block_size;
        let hashes = hash_blocks(&req.prompt, bs, self.cfg.salt, BlockHash::ROOT);
        // Look-ahead: a queued request's cached prefix counts as accessed now, so it is less
        // likely to be evicted before the request runs (policies without look-ahead ignore it).
        let now = self.now();
        self.cache.hint_queued(&hashes, now);
        let sampler = Sampler::new(req.sampling.clone());
        self.waiting.push_back(Seq {
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            generated: 0,
            hashes,
            lease: None,
            table: Vec::new(),
            computed: 0,
            cached_tokens: None,
            sampler,
            arrived: Instant::now(),
            admitted: 0,
            phase: Phase::Loading,
            last_token: None,
            req,
        });
        Ok(())
    }

    /// Whether anything is queued, running or in flight.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty()
            || !self.running.is_empty()
            || self.backend.transfers_in_flight() > 0
    }

    /// Counts and cache state.
    pub fn status(&self) -> SchedulerStatus {
        SchedulerStatus {
            waiting: self.waiting.len(),
            running: self.running.len(),
            loading: self
                .running
                .iter()
                .filter(|s| s.phase == Phase::Loading)
                .count(),
            transfers_in_flight: self.backend.transfers_in_flight(),
            usage: self.cache.usage(),
            stats: self.cache.stats().clone(),
            preemptions: self.preemptions,
            steps: self.steps,
        }
    }

    /// Tokens still to prefill: the tokens of each queued request that its cached prefix does
    /// not cover now (a preempted one recomputes what it had generated too), and the
    /// uncomputed tokens of running requests that are still prefilling (a decoding request's
    /// one next token is not prefill). Counting a queued request's cached prefix as work would
    /// make a replica that queues requests for the prefixes it holds look busier than it is,
    /// and push routers away from exactly the replica that serves them fastest.
    pub fn pending_prefill_tokens(&self) -> usize {
        let bs = self.cfg.block_size;
        let queued: usize = self
            .waiting
            .iter()
            .map(|s| {
                let left = s.tokens.len().saturating_sub(s.computed);
                let mb = (s.tokens.len().saturating_sub(1) / bs).min(s.hashes.len());
                let p = self.cache.peek(&s.hashes[..mb]);
                let cached = (p.device_blocks + p.host_blocks) * bs;
                left.saturating_sub(cached.saturating_sub(s.computed))
            })
            .sum();
        let running: usize = self
            .running
            .iter()
            .map(|s| (s.tokens.len().saturating_sub(s.computed), s.generated))
            .filter(|&(left, generated)| left > 1 || generated == 0)
            .map(|(left, _)| left)
            .sum();
        queued + running
    }

    /// The `top_k` hottest cached prefixes now.
    pub fn summary(&self, top_k: usize) -> Vec<hotprefix_cache::SummaryEntry> {
        self.cache.summary(top_k, self.now())
    }

    /// Submits every transfer the cache has planned to the backend.
    pub fn flush_transfers(&mut self) {
        for t in self.cache.take_transfers() {
            let id = t.id;
            if let Err(e) = self.backend.submit_transfer(t) {
                tracing::error!(error = %e, transfer = id.0, "KV transfer could not start");
                self.cache.fail_transfer(id);
            }
        }
    }

    /// Completes transfers the backend finished, waiting up to `wait` for one.
    fn complete_transfers(&mut self, wait: Duration) {
        for id in self.backend.poll_transfers(wait) {
            self.cache.complete_transfer(id);
        }
        // A failed load is planned again by the cache; start it.
        self.flush_transfers();
    }

    /// Waits for every in-flight transfer and completes it (tests use it before checking
    /// invariants).
    pub fn drain_transfers(&mut self) {
        while self.backend.transfers_in_flight() > 0 {
            self.complete_transfers(Duration::from_millis(50));
        }
    }

    /// One round: completes transfers, drops cancelled requests, admits, runs one batched
    /// forward step, samples and streams, inserts filled blocks. Returns whether a forward
    /// step ran.
    pub fn step(&mut self) -> bool {
        let idle_wait = if self.running.iter().any(|s| s.phase == Phase::Running) {
            Duration::ZERO
        } else {
            Duration::from_millis(2)
        };
        self.complete_transfers(idle_wait);
        self.drop_cancelled();
        self.admit();
        for s in &mut self.running {
            if s.phase == Phase::Loading
                && s.lease
                    .as_ref()
                    .is_some_and(|l| self.cache.lease_state(l) == LeaseState::Ready)
            {
                s.phase = Phase::Running;
            }
        }
        let ran = self.forward();
        let now = self.now();
        self.cache.tick(now);
        self.flush_transfers();
        self.publish_gauges();
        ran
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.set_status(self.status());
    }

    /// Removes requests whose receiver is gone, releasing everything they hold.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].req.events.is_closed() {
                if let Some(s) = self.waiting.remove(i) {
                    self.metrics.cancelled();
                    tracing::debug!(request = %s.req.id, "cancelled while waiting");
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.events.is_closed() {
                let s = self.running.swap_remove(i);
                self.metrics.cancelled();
                tracing::debug!(request = %s.req.id, "cancelled while running");
                self.retire(s, None);
            } else {
                i += 1;
            }
        }
    }

    /// Index of the next waiting request to admit.
    fn pick(&self) -> usize {
        let front_aged = self
            .waiting
            .front()
            .is_some_and(|s| s.arrived.elapsed() >= self.cfg.max_wait);
        if front_aged || self.waiting.len() > self.cfg.fcfs_above {
            return 0;
        }
        // Longest cached prefix first (device blocks count fully, host blocks half: they cost
        // a load); ties go to the earlier arrival.
        let mut best = (0usize, 0usize);
        for (i, s) in self.waiting.iter().enumerate() {
            let mb = (s.tokens.len() - 1) / self.cfg.block_size;
            let p = self.cache.peek(&s.hashes[..mb.min(s.hashes.len())]);
            let score = 2 * p.device_blocks + p.host_blocks;
            if score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }

    /// Admits waiting requests while there is room: matches their prefix (starting host
    /// loads) and allocates blocks for the rest of the prompt and the first generated token.
    fn admit(&mut self) {
        let bs = self.cfg.block_size;
        while self.running.len() < self.cfg.max_running && !self.waiting.is_empty() {
            let i = self.pick();
            let now = self.now();
            let s = &mut self.waiting[i];
            // The last token is always computed: its logits give the next token.
            let mb = (s.tokens.len() - 1) / bs;
            s.hash_through(mb, bs, self.cfg.salt);
            let peek = self.cache.peek(&s.hashes[..mb]);
            let total = (s.tokens.len() + 1).div_ceil(bs);
            let new_blocks = total - (peek.device_blocks + peek.host_blocks);
            if !self.cache.fits(&s.hashes[..mb], new_blocks) {
                // Wait for running requests to free blocks rather than letting a smaller one
                // overtake (which could starve this one).
                break;
            }
            let m = self
                .cache
                .match_hashes(&s.hashes[..mb], s.tokens.len() - 1, now);
            let need = total - m.blocks();
            let fresh = match self.cache.allocate(need, now) {
                Ok(f) => f,
                Err(e) => {
                    // `fits` said yes, so this is unexpected; retry next step.
                    tracing::warn!(error = %e, "allocation failed after fits");
                    self.cache.release(m.lease);
                    self.flush_transfers();
                    break;
                }
            };
            let Some(mut s) = self.waiting.remove(i) else {
                break;
            };
            s.computed = m.blocks() * bs;
            s.table = m.slots;
            s.table.extend(fresh);
            s.phase = if self.cache.lease_state(&m.lease) == LeaseState::Ready {
                Phase::Running
            } else {
                Phase::Loading
            };
            s.lease = Some(m.lease);
            self.admissions += 1;
            s.admitted = self.admissions;
            if s.cached_tokens.is_none() {
                s.cached_tokens = Some(s.computed);
                self.metrics.prefix_hit(
                    s.prompt_len,
                    m.device_blocks * bs,
                    (m.host_blocks * bs).min(s.computed),
                );
                let _ = s.req.events.send(Event::Admitted {
                    cached_tokens: s.computed,
                });
            }
            self.running.push(s);
            self.flush_transfers();
        }
    }

    /// Builds and runs one step. Returns whether it ran.
    fn forward(&mut self) -> bool {
        let bs = self.cfg.block_size;
        // Decode tokens first (they are latency-critical and cheap), then prefill chunks, each
        // group in admission order.
        let mut order: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].phase == Phase::Running)
            .collect();
        order.sort_by_key(|&i| {
            let s = &self.running[i];
            (s.tokens.len() - s.computed > 1, s.admitted)
        });
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut k = 0;
        while k < order.len() && budget > 0 {
            let i = order[k];
            let s = &self.running[i];
            let n = (s.tokens.len() - s.computed).min(budget);
            let need = (s.computed + n).div_ceil(bs);
            if need > s.table.len() {
                let more = need - s.table.len();
                match self.cache.allocate(more, self.now()) {
                    Ok(f) => self.running[i].table.extend(f),
                    Err(_) => {
                        // Out of blocks: preempt the most recently admitted request that has
                        // not been given rows in this step (possibly this one).
                        let Some(&victim) =
                            order[k..].iter().max_by_key(|&&j| self.running[j].admitted)
                        else {
                            break;
                        };
                        order.retain(|&j| j != victim);
                        self.preempt(victim);
                        // Indices above the victim moved down by one.
                        for j in order.iter_mut().chain(plan.iter_mut().map(|p| &mut p.0)) {
                            if *j > victim {
                                *j -= 1;
                            }
                        }
                        continue;
                    }
                }
            }
            plan.push((i, n));
            budget -= n;
            k += 1;
        }
        self.flush_transfers();
        if plan.is_empty() {
            return false;
        }
        let mut tokens = Vec::new();
        let mut batch = StepBatch {
            seqs: Vec::with_capacity(plan.len()),
            block_size: bs,
        };
        let mut logits_rows = Vec::new();
        let mut wants = Vec::new();
        for &(i, n) in &plan {
            let s = &self.running[i];
            let start = tokens.len();
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + n]);
            batch.seqs.push(SeqSpan {
                rows: start..start + n,
                start: s.computed,
                table: s.table.clone(),
            });
            let last = s.computed + n == s.tokens.len();
            if last {
                logits_rows.push(start + n - 1);
            }
            wants.push(last);
        }
        let step_start = Instant::now();
        // When every row that samples is greedy, the backend takes the argmax itself and only
        // token ids come back (a GPU then copies 4 bytes per row instead of a row of logits).
        let greedy = plan
            .iter()
            .zip(&wants)
            .all(|(&(i, _), &want)| !want || self.running[i].sampler.is_greedy());
        let result = if greedy {
            self.decoder
                .step_greedy(&mut self.backend, &tokens, &batch, &logits_rows)
                .map(|ids| ids.into_iter().map(Sampled::Token).collect::<Vec<_>>())
        } else {
            self.decoder
                .step(&mut self.backend, &tokens, &batch, &logits_rows)
                .map(|l| l.into_iter().map(Sampled::Logits).collect())
        };
        self.steps += 1;
        self.metrics
            .step(tokens.len(), logits_rows.len(), step_start.elapsed());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward step failed");
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in idx {
                    let s = self.running.swap_remove(i);
                    self.retire(s, Some(FinishReason::Error(e.to_string())));
                }
                return true;
            }
        };
        let mut logits = logits.into_iter();
        let mut finished: Vec<(usize, Option<FinishReason>)> = Vec::new();
        let now = Instant::now();
        for (&(i, n), want) in plan.iter().zip(wants) {
            let s = &mut self.running[i];
            s.computed += n;
            if !want {
                continue;
            }
            let next = match logits.next() {
                Some(Sampled::Token(t)) => t,
                Some(Sampled::Logits(l)) => s.sampler.sample(&l),
                None => break,
            };
            if s.req.stop_tokens.contains(&next) {
                finished.push((i, Some(FinishReason::Stop)));
                continue;
            }
            s.tokens.push(next);
            s.generated += 1;
            match s.last_token {
                None => self.metrics.first_token(now.duration_since(s.arrived)),
                Some(t) => self.metrics.inter_token(now.duration_since(t)),
            }
            s.last_token = Some(now);
            if s.req.events.send(Event::Token(next)).is_err() {
                self.metrics.cancelled();
                finished.push((i, None));
            } else if s.generated >= s.req.max_tokens || s.tokens.len() >= self.limits.context {
                finished.push((i, Some(FinishReason::Length)));
            }
        }
        // Cache every block that filled up in this step, so concurrent and later requests
        // (and this conversation's next turn) hit it.
        for &(i, _) in &plan {
            self.insert_full(i);
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let s = self.running.swap_remove(i);
            self.retire(s, reason);
        }
        true
    }

    /// Inserts the sequence's computed full blocks beyond its lease into the cache.
    fn insert_full(&mut self, i: usize) {
        let (bs, salt) = (self.cfg.block_size, self.cfg.salt);
        let now = self.now();
        let s = &mut self.running[i];
        insert_blocks(&mut self.cache, s, bs, salt, now);
    }

    /// Takes a running request back to the front of the queue, keeping its tokens: its
    /// computed blocks go to the cache (so recomputing it will likely hit them) and the rest
    /// are freed.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.preemptions += 1;
        self.metrics.preempted();
        tracing::info!(request = %s.req.id, tokens = s.tokens.len(), "preempted (recompute)");
        let (bs, salt, now) = (self.cfg.block_size, self.cfg.salt, self.now());
        insert_blocks(&mut self.cache, &mut s, bs, salt, now);
        give_back(&mut self.cache, &mut s);
        s.computed = 0;
        s.phase = Phase::Loading;
        self.waiting.push_front(s);
        self.flush_transfers();
    }

    /// Ends a request: caches its blocks, frees the rest, tells the submitter why (`None`:
    /// cancelled, nobody is listening).
    fn retire(&mut self, mut s: Seq, reason: Option<FinishReason>) {
        let (bs, salt, now) = (self.cfg.block_size, self.cfg.salt, self.now());
        insert_blocks(&mut self.cache, &mut s, bs, salt, now);
        give_back(&mut self.cache, &mut s);
        if let Some(reason) = reason {
            self.metrics.finished(&reason, s.prompt_len, s.generated);
            let _ = s.req.events.send(Event::Done(Finish {
                reason,
                prompt_tokens: s.prompt_len,
                completion_tokens: s.generated,
                cached_tokens: s.cached_tokens.unwrap_or(0),
            }));
        }
        self.flush_transfers();
    }

    /// Cancels everything queued or running (shutdown), telling each submitter.
    pub fn abort_all(&mut self, why: &str) {
        while let Some(s) = self.running.pop() {
            self.retire(s, Some(FinishReason::Error(why.to_string())));
        }
        while let Some(s) = self.waiting.pop_front() {
            self.retire(s, Some(FinishReason::Error(why.to_string())));
        }
    }

    /// Checks the cache's invariants and that nothing is held (for tests, when idle).
    pub fn check_idle(&self) -> Result<(), String> {
        self.cache.check_invariants()?;
        let u = self.cache.usage();
        if !self.running.is_empty() || !self.waiting.is_empty() {
            return Err("requests remain".into());
        }
        if u.device_outstanding != 0 {
            return Err(format!(
                "{} device blocks outstanding",
                u.device_outstanding
            ));
        }
        if self
            .cache
            .resident_blocks()
            .iter()
            .any(|b| b.locked || b.device_loading || b.host_writing)
        {
            return Err("blocks still locked or in transfer".into());
        }
        Ok(())
    }
}

/// What a step gives back for a row that samples: its logits, or (greedy steps) its token.
enum Sampled {
    Logits(Vec<f32>),
    Token(u32),
}

/// Inserts `s`'s computed full blocks beyond its lease; canonical slots replace its own where
/// the tree already held a block.
fn insert_blocks(cache: &mut PrefixCache, s: &mut Seq, bs: usize, salt: Salt, now: f64) {
    let Some(lease) = s.lease.as_mut() else {
        return;
    };
    let full = (s.computed / bs).min(s.table.len());
    let have = lease.blocks();
    if full <= have {
        return;
    }
    s.hash_through(full, bs, salt);
    let Some(lease) = s.lease.as_mut() else {
        return;
    };
    match cache.insert(lease, &s.hashes[have..full], &s.table[have..full], now) {
        Ok(ins) => {
            s.table[have..have + ins.merged].copy_from_slice(&ins.slots);
        }
        Err(e) => tracing::warn!(error = %e, "cache insert refused"),
    }
}

/// Frees the blocks `s` owns and releases its lease.
fn give_back(cache: &mut PrefixCache, s: &mut Seq) {
    let held = s.lease.as_ref().map_or(0, Lease::blocks);
    let owned: Vec<SlotId> = s.table.drain(held.min(s.table.len())..).collect();
    if let Err(e) = cache.free(owned) {
        tracing::error!(error = %e, "freeing blocks failed");
    }
    s.table.clear();
    if let Some(l) = s.lease.take() {
        cache.release(l);
    }
}

/// Why a scheduler could not be built.
#[derive(Debug, Error)]
pub enum SchedulerError {
    /// A knob is out of range.
    #[error("scheduler: {0}")]
    Config(String),
    /// The cache refused its configuration.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The backend could not allocate the KV pools.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
