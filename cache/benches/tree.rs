//! Benchmarks of the prefix cache's hot paths at production scale: one 8k-token request against a
//! device holding about a million blocks, and raw eviction throughput.
//!
//! Run with `cargo bench -p hotprefix-cache --bench tree` (add `-- --quick` for a fast pass).
//! Each large cache is built once, outside the timed loop; the timed requests keep evicting, so
//! the tree stays at its size while they run.

// A benchmark is not a test, so clippy's allow-unwrap-in-tests does not cover it; every unwrap
// here is on a cache that was sized so the call cannot fail, and a panic is the right report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hotprefix_cache::{CacheConfig, PolicyKind, PrefixCache, SlotId};
use hotprefix_protocol::{BlockHash, Salt, hash_blocks};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Tokens per block (the protocol default).
const BLOCK_TOKENS: usize = 16;
/// Bytes of KV per block: Llama-3.1-8B in bf16 keeps 128 KiB per token.
const BLOCK_BYTES: u64 = 16 * 128 * 1024;
/// Resident blocks the big cache is filled to.
const RESIDENT_BLOCKS: u32 = 1 << 20;
/// Device capacity: a bit above `RESIDENT_BLOCKS`, so the cache holds a million blocks and a few
/// requests' worth of slack.
const DEVICE_BLOCKS: u32 = RESIDENT_BLOCKS + 4096;
/// Prompt length of the timed requests: 8k tokens, 512 blocks.
const PROMPT_TOKENS: usize = 8192;
/// Shared preambles (organisation-wide instructions) that system prompts start with.
const PREAMBLES: usize = 16;
/// Distinct system prompts, each a preamble plus its own text.
const SYSTEM_PROMPTS: usize = 300;

fn salt() -> Salt {
    Salt::new("meta-llama/Llama-3.1-8B-Instruct", None, None)
}

fn random_tokens(rng: &mut SmallRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..128_000)).collect()
}

/// The shared prefixes of a realistic workload: a few hundred system prompts of varied lengths
/// (16 to about 300 blocks), built on a handful of shared preambles. Requests pick them with a
/// skew (a few are very popular) and append a unique tail up to 8k tokens.
#[derive(Debug)]
struct Workload {
    system: Vec<Vec<u32>>,
    rng: SmallRng,
}

impl Workload {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let preambles: Vec<Vec<u32>> = (0..PREAMBLES)
            .map(|_| {
                let blocks = rng.random_range(4..=64);
                random_tokens(&mut rng, blocks * BLOCK_TOKENS)
            })
            .collect();
        let system = (0..SYSTEM_PROMPTS)
            .map(|_| {
                let mut p = preambles[rng.random_range(0..PREAMBLES)].clone();
                // Own text of 12 to 240 blocks, and a partial block so that prefix lengths do not
                // all fall on block boundaries.
                let own = rng.random_range(12 * BLOCK_TOKENS..=240 * BLOCK_TOKENS);
                p.extend(random_tokens(&mut rng, own));
                p
            })
            .collect();
        Workload { system, rng }
    }

    /// An 8k-token prompt: a system prompt (skewed towards the first ones) and a unique tail.
    fn prompt(&mut self) -> Vec<u32> {
        let u: f64 = self.rng.random();
        let pick = ((u * u * u) * SYSTEM_PROMPTS as f64) as usize;
        let mut p = self.system[pick.min(SYSTEM_PROMPTS - 1)].clone();
        let tail = PROMPT_TOKENS - p.len();
        p.extend(random_tokens(&mut self.rng, tail));
        p
    }
}

/// One full request: match (hashing `tokens` first), allocate the uncached remainder, insert it,
/// release, and complete whatever transfers were planned.
fn request_tokens(cache: &mut PrefixCache, tokens: &[u32], now: f64) -> usize {
    let (m, hashes) = cache.match_prefix(tokens, salt(), now);
    finish_request(cache, m, &hashes, now)
}

/// The same request with the block hashes already computed (as the router and simulator do).
fn request_hashes(cache: &mut PrefixCache, hashes: &[BlockHash], now: f64) -> usize {
    let m = cache.match_hashes(hashes, hashes.len() * BLOCK_TOKENS, now);
    finish_request(cache, m, hashes, now)
}

fn finish_request(
    cache: &mut PrefixCache,
    m: hotprefix_cache::Match,
    hashes: &[BlockHash],
    now: f64,
) -> usize {
    let matched = m.blocks();
    let mut lease = m.lease;
    let rest = &hashes[matched..];
    let slots = cache.allocate(rest.len(), now).unwrap();
    cache.insert(&mut lease, rest, &slots, now).unwrap();
    cache.release(lease);
    for t in cache.take_transfers() {
        cache.complete_transfer(t.id);
    }
    matched
}

/// A cache filled to about `RESIDENT_BLOCKS` blocks by requests of the workload, and the clock
/// reached.
fn filled_cache(policy: PolicyKind, workload: &mut Workload) -> (PrefixCache, f64) {
    let cfg = CacheConfig::new(policy, BLOCK_TOKENS, BLOCK_BYTES, DEVICE_BLOCKS, 0);
    let mut cache = PrefixCache::new(cfg).unwrap();
    let mut now = 0.0;
    while cache.usage().device_cached < RESIDENT_BLOCKS as usize {
        let tokens = workload.prompt();
        let hashes = hash_blocks(&tokens, BLOCK_TOKENS, salt(), BlockHash::ROOT);
        request_hashes(&mut cache, &hashes, now);
        now += 0.01;
    }
    (cache, now)
}

fn match_insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("match_insert_8k_at_1m_blocks");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    for policy in [PolicyKind::HotPrefix, PolicyKind::Lru] {
        let mut workload = Workload::new(7);
        let (mut cache, mut now) = filled_cache(policy, &mut workload);
        let u = cache.usage();
        eprintln!(
            "{policy}: {} resident blocks in {} nodes, {} free",
            u.device_cached, u.nodes, u.device_free
        );
        // The requests' token ids are drawn in the untimed setup; the clock advances per request.
        group.bench_function(BenchmarkId::new(policy.as_str(), "tokens"), |b| {
            b.iter_batched(
                || workload.prompt(),
                |tokens| {
                    now += 0.01;
                    black_box(request_tokens(&mut cache, &tokens, now))
                },
                BatchSize::SmallInput,
            );
        });
        group.bench_function(BenchmarkId::new(policy.as_str(), "hashes"), |b| {
            b.iter_batched(
                || hash_blocks(&workload.prompt(), BLOCK_TOKENS, salt(), BlockHash::ROOT),
                |hashes| {
                    now += 0.01;
                    black_box(request_hashes(&mut cache, &hashes, now))
                },
                BatchSize::SmallInput,
            );
        });
        let u = cache.usage();
        eprintln!(
            "{policy} after: {} resident blocks in {} nodes; hit ratio {:.3}",
            u.device_cached,
            u.nodes,
            cache.stats().hit_ratio()
        );
    }
    // Hashing alone, the part of `match_prefix` that does not depend on the tree.
    let mut workload = Workload::new(7);
    group.bench_function("hash_blocks_only", |b| {
        b.iter_batched(
            || workload.prompt(),
            |tokens| black_box(hash_blocks(&tokens, BLOCK_TOKENS, salt(), BlockHash::ROOT)),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// Blocks per leaf in the eviction benchmark.
const LEAF_BLOCKS: usize = 4;
/// Blocks allocated (and so evicted) per timed call.
const EVICT_BATCH: usize = 4096;

/// Inserts the leaves named `first..first + slots.len() / LEAF_BLOCKS` under the root, into the
/// given slots.
fn add_leaves(cache: &mut PrefixCache, first: u64, slots: &[SlotId], now: f64) -> u64 {
    let mut next = first;
    for chunk in slots.chunks(LEAF_BLOCKS) {
        let hashes: Vec<BlockHash> = (0..chunk.len() as u64)
            .map(|j| BlockHash((next << 8) | (j + 1)))
            .collect();
        let m = cache.match_hashes(&hashes, hashes.len() * BLOCK_TOKENS, now);
        let mut lease = m.lease;
        cache.insert(&mut lease, &hashes, chunk, now).unwrap();
        cache.release(lease);
        next += 1;
    }
    next
}

fn eviction(c: &mut Criterion) {
    let mut group = c.benchmark_group("eviction_throughput");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(EVICT_BATCH as u64));
    // `hotprefix` with a full host tier also admits every victim (displacing a host node) and
    // plans its store, the full cost of an eviction in the two-tier design.
    let cases = [
        ("lru", PolicyKind::Lru, 0),
        ("hotprefix", PolicyKind::HotPrefix, 0),
        ("hotprefix-host", PolicyKind::HotPrefix, RESIDENT_BLOCKS),
    ];
    for (name, policy, host) in cases {
        let mut cfg = CacheConfig::new(policy, BLOCK_TOKENS, BLOCK_BYTES, RESIDENT_BLOCKS, host);
        // Write-through would copy leaves on their second access; none is accessed twice here.
        cfg.hotness.write_through_hotness = None;
        let mut cache = PrefixCache::new(cfg).unwrap();
        let mut now = 0.0;
        let all = cache.allocate(RESIDENT_BLOCKS as usize, now).unwrap();
        let mut next = add_leaves(&mut cache, 0, &all, now);
        // Fill the host tier too: evict the whole device once (every leaf is admitted) and
        // refill it.
        if host > 0 {
            now += 1.0;
            let all = cache.allocate(RESIDENT_BLOCKS as usize, now).unwrap();
            for t in cache.take_transfers() {
                cache.complete_transfer(t.id);
            }
            next = add_leaves(&mut cache, next, &all, now);
        }
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    now += 0.001;
                    let start = Instant::now();
                    let slots = black_box(cache.allocate(EVICT_BATCH, now).unwrap());
                    timed += start.elapsed();
                    // Untimed: finish the stores and refill the device with fresh leaves.
                    for t in cache.take_transfers() {
                        cache.complete_transfer(t.id);
                    }
                    next = add_leaves(&mut cache, next, &slots, now);
                }
                timed
            });
        });
        let s = cache.stats();
        eprintln!(
            "{name}: {} device blocks evicted, {} admitted to host, {} host blocks evicted",
            s.device_evicted_blocks, s.admitted_blocks, s.host_evicted_blocks
        );
    }
    group.finish();
}

criterion_group!(benches, match_insert, eviction);
criterion_main!(benches);
