//! Routing decision latency at production scale: an 8k-token prompt (512 blocks) against 16
//! replicas whose summaries hold 4,096 blocks each, with the `hotprefix` policy (issue 4's goal:
//! p99 under 50 us), from the prompt's tokens to the choice (block hashing included).
//!
//! Run with `cargo bench -p hotprefix-router --bench route`. Besides criterion's mean, each case
//! prints the p50/p99 of 20,000 single decisions timed one by one, since the goal is a tail.
//! Tokenizing the prompt is measured separately when the default model is installed: it is
//! done once per request before routing and depends on the tokenizer, not on the router.

// A benchmark is not a test; a panic on the fixed setup below is the right report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hotprefix_protocol::cluster::SummaryEntry;
use hotprefix_protocol::{BlockHash, ReplicaId, Salt, Tier, hash_blocks};
use hotprefix_router::cluster::{Candidate, PrefixIndex, ReplicaLoad, RouteRequest};
use hotprefix_router::policy::{HotPrefixPolicy, HotPrefixWeights, RoutingPolicy};

const REPLICAS: usize = 16;
const ENTRIES: usize = 4096;
const PROMPT_TOKENS: usize = 8192;
const BLOCK: usize = 16;

fn salt() -> Salt {
    Salt::new("meta-llama/Llama-3.1-8B-Instruct", None, None)
}

/// Tokens of a prompt family: `family` picks the system prompt, `tail` the question.
fn prompt(family: u32, tail: u32) -> Vec<u32> {
    (0..PROMPT_TOKENS as u32)
        .map(|i| {
            if i < 6144 {
                1000 + family * 7919 + i
            } else {
                500_000 + tail * 104_729 + i
            }
        })
        .collect()
}

/// 16 replicas, 4,096 summary entries each. `all_hold` false: replica 0 holds the whole timed
/// prompt's system part (384 blocks), replicas 1-3 its first half, the rest other families'
/// prefixes. `all_hold` true (the worst case for the walk): every replica holds the whole
/// system part of the timed prompt.
fn cluster(all_hold: bool) -> (PrefixIndex, Vec<Candidate>) {
    let mut ix = PrefixIndex::new();
    let timed = hash_blocks(&prompt(0, 0), BLOCK, salt(), BlockHash::ROOT);
    let mut cands = Vec::new();
    for r in 0..REPLICAS {
        let id = ReplicaId(format!("engine-{r}"));
        let mut entries: Vec<SummaryEntry> = Vec::with_capacity(ENTRIES);
        let held = match (all_hold, r) {
            (true, _) | (false, 0) => 384,
            (false, 1..=3) => 192,
            _ => 0,
        };
        for (d, &h) in timed.iter().take(held).enumerate() {
            entries.push(SummaryEntry {
                hash: h,
                tier: if d % 5 == 0 { Tier::Host } else { Tier::Device },
                hotness: 2.0,
                depth: d as u32 + 1,
            });
        }
        // Fill up with other prefix families' blocks.
        let mut family = 1 + r as u32 * 100;
        while entries.len() < ENTRIES {
            for (d, h) in hash_blocks(&prompt(family, 0), BLOCK, salt(), BlockHash::ROOT)
                .into_iter()
                .take(ENTRIES - entries.len())
                .enumerate()
            {
                entries.push(SummaryEntry {
                    hash: h,
                    tier: Tier::Device,
                    hotness: 1.0,
                    depth: d as u32 + 1,
                });
            }
            family += 1;
        }
        ix.set_summary(&id, &entries);
        cands.push(Candidate {
            id,
            load: ReplicaLoad {
                waiting: r as u32 % 3,
                running: 8,
                pending_prefill_tokens: 1000 * r as u64,
                device_utilisation: 0.8,
                in_flight: 1,
            },
        });
    }
    (ix, cands)
}

/// One decision from tokens: hash the prompt's blocks, then route.
fn decide(p: &HotPrefixPolicy, tokens: &[u32], ix: &PrefixIndex, cands: &[Candidate]) -> usize {
    let blocks = hash_blocks(tokens, BLOCK, salt(), BlockHash::ROOT);
    let req = RouteRequest {
        blocks: &blocks,
        block_size: BLOCK,
        prompt_tokens: tokens.len(),
        session: None,
        now_ms: 0,
    };
    p.route(&req, cands, ix).chosen
}

fn percentiles(name: &str, mut f: impl FnMut()) {
    for _ in 0..1000 {
        f();
    }
    let mut times: Vec<Duration> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    let q = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "{name}: p50 {:.1?}  p99 {:.1?}  max {:.1?}  (20,000 decisions timed one by one)",
        q(0.5),
        q(0.99),
        times[times.len() - 1]
    );
}

fn bench(c: &mut Criterion) {
    let policy = HotPrefixPolicy::new(HotPrefixWeights::default());
    let tokens = prompt(0, 0);
    for (name, all) in [("typical", false), ("every-replica-holds-it", true)] {
        let (ix, cands) = cluster(all);
        assert!(!ix.is_empty());
        let chosen = decide(&policy, &tokens, &ix, &cands);
        assert!(all || chosen == 0, "replica 0 holds the prefix");
        let label = format!("route/8k-tokens/16x4096/{name}");
        percentiles(&label, || {
            black_box(decide(&policy, black_box(&tokens), &ix, &cands));
        });
        c.bench_function(&label, |b| {
            b.iter(|| decide(&policy, black_box(&tokens), &ix, &cands))
        });
    }
    // Hashing alone, for the split.
    c.bench_function("hash_blocks/8k-tokens", |b| {
        b.iter(|| hash_blocks(black_box(&tokens), BLOCK, salt(), BlockHash::ROOT))
    });
    // Tokenizing an 8k-token prompt with the default model's tokenizer, when installed.
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if model.exists() {
        let src = hotprefix_engine::source::ModelSource::Gguf(model);
        let text = hotprefix_engine::source::load_text(&src).unwrap();
        let words = "the quick brown fox jumps over the lazy dog ".repeat(1000);
        let n = text.tokenizer.encode(&words).unwrap().len();
        println!("tokenize: {n} tokens of English text");
        percentiles("tokenize/smollm2/~9k-tokens", || {
            black_box(text.tokenizer.encode(black_box(&words)).unwrap());
        });
    } else {
        println!("tokenize: skipped, the default model is not installed (scripts/fetch-model.sh)");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
