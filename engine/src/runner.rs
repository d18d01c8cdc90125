//! One request at a time through the prefix cache and the paged decoder: match the prompt, run
//! the cache's copies between the tiers, allocate blocks for the rest, compute it, decode, hand
//! the computed blocks to the cache, release. This is the per-sequence path the scheduler will
//! batch; tests and the TTFT measurement use it directly.

use std::time::{Duration, Instant};

use hotprefix_cache::{CacheConfig, CacheError, LeaseState, PolicyKind, PrefixCache, TransferKind};
use hotprefix_protocol::{BlockHash, Salt, hash_blocks};
use thiserror::Error;

use crate::model::{KvStore, LlamaModel};
use crate::paged::{KvArena, PagedKv};
use crate::sampling::Sampler;

/// Why a request could not run.
#[derive(Debug, Error)]
pub enum RunError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Prompt plus answer would not fit the device tier even with nothing else cached.
    #[error("{needed} tokens need {blocks} blocks, more than the {capacity} device blocks")]
    TooLong {
        /// Prompt plus requested tokens.
        needed: usize,
        /// Blocks they need.
        blocks: usize,
        /// Device blocks in all.
        capacity: usize,
    },
    /// The cache refused (for example, every block is held by other requests).
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What one request produced and how long it took.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Generated tokens (the stop token, if one ended the answer, is not included).
    pub tokens: Vec<u32>,
    /// Prompt tokens served from the cache.
    pub cached_tokens: usize,
    /// Matched blocks that had to be loaded from the host tier.
    pub host_blocks: usize,
    /// Logits after the prompt.
    pub first_logits: Vec<f32>,
    /// Time to the first generated token (match, copies, prefill of the uncached part).
    pub ttft: Duration,
}

/// The model, the prefix cache and the two KV arenas it manages.
#[derive(Debug)]
pub struct Runner {
    model: LlamaModel,
    cache: PrefixCache,
    dev: KvArena,
    host: KvArena,
    block_size: usize,
    salt: Salt,
    started: Instant,
}

impl Runner {
    /// A runner with `device_blocks` and `host_blocks` blocks of `block_size` tokens.
    pub fn new(
        model: LlamaModel,
        policy: PolicyKind,
        block_size: usize,
        device_blocks: u32,
        host_blocks: u32,
        salt: Salt,
    ) -> Result<Runner, RunError> {
        let kv_bytes = 2 * model.cfg.layers * model.cfg.kv_heads * model.cfg.head_dim * 4;
        let cfg = CacheConfig::new(
            policy,
            block_size,
            (block_size * kv_bytes) as u64,
            device_blocks,
            host_blocks,
        );
        let cache = PrefixCache::new(cfg)?;
        Ok(Runner {
            dev: KvArena::new(&model.cfg, block_size, device_blocks as usize),
            host: KvArena::new(&model.cfg, block_size, cache.usage().host_capacity as usize),
            model,
            cache,
            block_size,
            salt,
            started: Instant::now(),
        })
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The prefix cache.
    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }

    /// The prefix cache, to drive it directly (tests force evictions this way). Run
    /// [`Runner::run_transfers`] after anything that may plan copies.
    pub fn cache_mut(&mut self) -> &mut PrefixCache {
        &mut self.cache
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Executes every copy the cache planned, synchronously, as the CPU backend does: a store
    /// runs before anything can write the slots it reads.
    pub fn run_transfers(&mut self) {
        for t in self.cache.take_transfers() {
            for &(src, dst) in &t.copies {
                match t.kind {
                    TransferKind::Load => KvArena::copy_block(&self.host, src, &mut self.dev, dst),
                    TransferKind::Store => KvArena::copy_block(&self.dev, src, &mut self.host, dst),
                }
            }
            self.cache.complete_transfer(t.id);
        }
    }

    /// Runs `prompt` and generates up to `max_new` tokens, stopping after a token in `stop`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        stop: &[u32],
    ) -> Result<RunResult, RunError> {
        if prompt.is_empty() {
            return Err(RunError::EmptyPrompt);
        }
        let vocab = self.model.cfg.vocab;
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(RunError::BadToken { id, vocab });
        }
        let bs = self.block_size;
        let needed = prompt.len() + max_new;
        let blocks = needed.div_ceil(bs);
        let capacity = self.cache.usage().device_capacity as usize;
        if blocks > capacity {
            return Err(RunError::TooLong {
                needed,
                blocks,
                capacity,
            });
        }
        let start = Instant::now();
        // The last prompt token is always computed: its logits start the answer.
        let (m, _) = self
            .cache
            .match_prefix(&prompt[..prompt.len() - 1], self.salt, self.now());
        self.run_transfers();
        debug_assert_eq!(self.cache.lease_state(&m.lease), LeaseState::Ready);
        let cached = m.blocks() * bs;
        let mut table = m.slots.clone();
        let fresh = match self.cache.allocate(blocks - table.len(), self.now()) {
            Ok(s) => s,
            Err(e) => {
                self.cache.release(m.lease);
                return Err(e.into());
            }
        };
        self.run_transfers();
        table.extend(fresh);
        let mut tokens = Vec::new();
        let (first_logits, ttft, computed) = {
            let mut kv = PagedKv::new(&mut self.dev, &table, cached);
            let first = self.model.forward(&prompt[cached..], &mut kv);
            let ttft = start.elapsed();
            let mut logits = first.clone();
            while tokens.len() < max_new {
                let next = sampler.sample(&logits);
                if stop.contains(&next) {
                    break;
                }
                tokens.push(next);
                if tokens.len() < max_new {
                    logits = self.model.forward(&[next], &mut kv);
                }
            }
            (first, ttft, kv.len())
        };
        // Everything that went through the model is cached: the prompt and the generated
        // tokens whose KV was computed (all but a last one that was never fed back).
        let done: Vec<u32> = prompt
            .iter()
            .chain(&tokens)
            .take(computed)
            .copied()
            .collect();
        let hashes = hash_blocks(&done, bs, self.salt, BlockHash::ROOT);
        let mut lease = m.lease;
        let from = lease.blocks();
        let merged = self
            .cache
            .insert(
                &mut lease,
                &hashes[from..],
                &table[from..hashes.len()],
                self.now(),
            )
            .map(|ins| ins.merged)
            .unwrap_or(0);
        let unused = table[from + merged..].to_vec();
        self.cache.free(unused)?;
        self.cache.release(lease);
        self.run_transfers();
        Ok(RunResult {
            tokens,
            cached_tokens: cached,
            host_blocks: m.host_blocks,
            first_logits,
            ttft,
        })
    }
}
