//! Prefix caching end to end on the real model: the paged decoder over the cache's blocks, with
//! cold runs, device-tier hits, partial hits and host-tier hits, each giving exactly the greedy
//! tokens of the dense reference run.

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use hotprefix_cache::{CacheConfig, LeaseState, PolicyKind, PrefixCache, TransferKind};
use hotprefix_engine::model::{LlamaModel, argmax};
use hotprefix_engine::paged::{KvArena, PagedKv};
use hotprefix_protocol::{BlockHash, Salt, hash_blocks};

const BS: usize = 16;
const DEVICE_BLOCKS: u32 = 16;
const HOST_BLOCKS: u32 = 64;
const NEW_TOKENS: usize = 12;

struct Engine {
    model: LlamaModel,
    cache: PrefixCache,
    dev: KvArena,
    host: KvArena,
    now: f64,
    salt: Salt,
}

struct Run {
    tokens: Vec<u32>,
    cached: usize,
    host_blocks: usize,
    logits: Vec<f32>,
}

impl Engine {
    /// Executes every planned copy at once, as the CPU backend does (stores before any later
    /// write into the slots they read).
    fn transfers(&mut self) {
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

    /// One request: match, load, allocate, compute the rest, decode greedily, insert, release.
    fn generate(&mut self, ids: &[u32]) -> Run {
        self.now += 1.0;
        // The last prompt token is always computed: its logits start the answer.
        let (m, _) = self
            .cache
            .match_prefix(&ids[..ids.len() - 1], self.salt, self.now);
        self.transfers();
        assert_eq!(self.cache.lease_state(&m.lease), LeaseState::Ready);
        let cached = m.blocks() * BS;
        let mut table = m.slots.clone();
        let need = (ids.len() + NEW_TOKENS).div_ceil(BS) - table.len();
        table.extend(self.cache.allocate(need, self.now).unwrap());
        self.transfers();
        let mut out = Vec::new();
        let prefill_logits;
        {
            let mut kv = PagedKv::new(&mut self.dev, &table, cached);
            let mut logits = self.model.forward(&ids[cached..], &mut kv);
            prefill_logits = logits.clone();
            loop {
                out.push(argmax(&logits));
                if out.len() == NEW_TOKENS {
                    break;
                }
                logits = self.model.forward(&out[out.len() - 1..], &mut kv);
            }
        }
        // Every token but the last generated one went through the model: cache its full blocks.
        let done: Vec<u32> = ids.iter().chain(&out[..out.len() - 1]).copied().collect();
        let hashes = hash_blocks(&done, BS, self.salt, BlockHash::ROOT);
        let mut lease = m.lease;
        let start = lease.blocks();
        let ins = self
            .cache
            .insert(
                &mut lease,
                &hashes[start..],
                &table[start..hashes.len()],
                self.now,
            )
            .unwrap();
        self.cache
            .free(table[start + ins.merged..].to_vec())
            .unwrap();
        self.cache.release(lease);
        self.transfers();
        self.cache.check_invariants().unwrap();
        Run {
            tokens: out,
            cached,
            host_blocks: m.host_blocks,
            logits: prefill_logits,
        }
    }

    /// Greedy tokens and prefill logits of the dense reference path, no cache involved.
    fn reference(&self, ids: &[u32]) -> (Vec<u32>, Vec<f32>) {
        let mut kv = self.model.new_kv();
        let mut logits = self.model.forward(ids, &mut kv);
        let first = logits.clone();
        let mut out = Vec::new();
        loop {
            out.push(argmax(&logits));
            if out.len() == NEW_TOKENS {
                return (out, first);
            }
            logits = self.model.forward(&out[out.len() - 1..], &mut kv);
        }
    }
}

#[test]
fn cache_hits_in_either_tier_give_the_tokens_of_a_cold_run() {
    let m = common::load();
    let tok = &m.tok;
    let model = LlamaModel::from_gguf(&m.gguf).unwrap();
    let prompt = |q: &str| m.prompt(q);
    let france = prompt("What is the capital of France?");
    let italy = prompt("What is the capital of Italy?");
    let mut e = Engine {
        dev: KvArena::new(&model.cfg, BS, DEVICE_BLOCKS as usize),
        host: KvArena::new(&model.cfg, BS, HOST_BLOCKS as usize),
        model,
        cache: PrefixCache::new(CacheConfig::new(
            PolicyKind::LruOffload,
            BS,
            1,
            DEVICE_BLOCKS,
            HOST_BLOCKS,
        ))
        .unwrap(),
        now: 0.0,
        salt: Salt::new("smollm2-135m-instruct-q4_1", None, None),
    };
    let (ref_france, ref_logits) = e.reference(&france);
    let (ref_italy, _) = e.reference(&italy);
    assert!(tok.decode(&ref_france, true).unwrap().contains("Paris"));

    let cold = e.generate(&france);
    assert_eq!(cold.cached, 0);
    assert_eq!(
        cold.tokens, ref_france,
        "paged cold run differs from the dense reference"
    );
    let max_diff = cold
        .logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        max_diff <= 1e-4,
        "paged and dense logits differ by {max_diff}"
    );

    let hit = e.generate(&france);
    assert!(
        hit.cached >= france.len() - BS,
        "full-prefix hit, got {} cached",
        hit.cached
    );
    assert_eq!(hit.host_blocks, 0);
    assert_eq!(
        hit.tokens, ref_france,
        "device-tier hit differs from the cold run"
    );

    let partial = e.generate(&italy);
    assert!(
        partial.cached > 0 && partial.cached < italy.len() - BS,
        "partial hit: {}",
        partial.cached
    );
    assert_eq!(
        partial.tokens, ref_italy,
        "partial hit differs from the cold run"
    );

    // Push everything to the host tier, then hit it from there.
    let all = e.cache.allocate(DEVICE_BLOCKS as usize, e.now).unwrap();
    e.transfers();
    e.cache.free(all).unwrap();
    assert_eq!(
        e.cache
            .peek(&hash_blocks(&france, BS, e.salt, BlockHash::ROOT))
            .device_blocks,
        0
    );
    let from_host = e.generate(&france);
    assert!(from_host.host_blocks > 0, "expected a host-tier hit");
    assert_eq!(
        from_host.tokens, ref_france,
        "host-tier hit differs from the cold run"
    );

    assert_eq!(e.cache.usage().device_outstanding, 0);
    assert!(
        e.cache.resident_blocks().iter().all(|b| !b.locked),
        "a block was left locked"
    );
}
