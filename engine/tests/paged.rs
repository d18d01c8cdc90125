//! Prefix caching end to end on the real model: the paged decoder over the cache's blocks, with
//! cold runs, device-tier hits, partial hits and host-tier hits, each giving exactly the greedy
//! tokens of the dense reference run.

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use hotprefix_cache::PolicyKind;
use hotprefix_engine::model::{LlamaModel, argmax};
use hotprefix_engine::runner::{RunError, Runner};
use hotprefix_engine::sampling::{Sampler, SamplingParams};
use hotprefix_protocol::{BlockHash, Salt, hash_blocks};

const BS: usize = 16;
const DEVICE_BLOCKS: u32 = 16;
const HOST_BLOCKS: u32 = 64;
const NEW_TOKENS: usize = 12;

/// Greedy tokens and prefill logits of the dense reference path, no cache involved.
fn reference(model: &LlamaModel, ids: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut kv = model.new_kv();
    let mut logits = model.forward(ids, &mut kv);
    let first = logits.clone();
    let mut out = Vec::new();
    loop {
        out.push(argmax(&logits));
        if out.len() == NEW_TOKENS {
            return (out, first);
        }
        logits = model.forward(&out[out.len() - 1..], &mut kv);
    }
}

#[test]
fn cache_hits_in_either_tier_give_the_tokens_of_a_cold_run() {
    let m = common::load();
    let salt = Salt::new("smollm2-135m-instruct-q4_1", None, None);
    let france = m.prompt("What is the capital of France?");
    let italy = m.prompt("What is the capital of Italy?");
    let model = LlamaModel::from_gguf(&m.gguf).unwrap();
    let (ref_france, ref_logits) = reference(&model, &france);
    let (ref_italy, _) = reference(&model, &italy);
    assert!(m.tok.decode(&ref_france, true).unwrap().contains("Paris"));
    let mut r = Runner::new(
        model,
        PolicyKind::LruOffload,
        BS,
        DEVICE_BLOCKS,
        HOST_BLOCKS,
        salt,
    )
    .unwrap();
    let mut greedy = Sampler::new(SamplingParams::greedy());
    let mut run = |r: &mut Runner, ids: &[u32]| {
        let out = r.generate(ids, NEW_TOKENS, &mut greedy, &[]).unwrap();
        r.cache().check_invariants().unwrap();
        out
    };

    let cold = run(&mut r, &france);
    assert_eq!(cold.cached_tokens, 0);
    assert_eq!(
        cold.tokens, ref_france,
        "paged cold run differs from the dense reference"
    );
    let max_diff = cold
        .first_logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        max_diff <= 1e-4,
        "paged and dense logits differ by {max_diff}"
    );

    let hit = run(&mut r, &france);
    assert!(
        hit.cached_tokens >= france.len() - BS,
        "full-prefix hit, got {} cached",
        hit.cached_tokens
    );
    assert_eq!(hit.host_blocks, 0);
    assert_eq!(
        hit.tokens, ref_france,
        "device-tier hit differs from the cold run"
    );

    let partial = run(&mut r, &italy);
    assert!(partial.cached_tokens > 0 && partial.cached_tokens < italy.len() - BS);
    assert_eq!(
        partial.tokens, ref_italy,
        "partial hit differs from the cold run"
    );

    // Push everything to the host tier, then hit it from there.
    let all = r.cache_mut().allocate(DEVICE_BLOCKS as usize, 0.0).unwrap();
    r.run_transfers();
    r.cache_mut().free(all).unwrap();
    assert_eq!(
        r.cache()
            .peek(&hash_blocks(&france, BS, salt, BlockHash::ROOT))
            .device_blocks,
        0
    );
    let from_host = run(&mut r, &france);
    assert!(from_host.host_blocks > 0, "expected a host-tier hit");
    assert_eq!(
        from_host.tokens, ref_france,
        "host-tier hit differs from the cold run"
    );

    assert_eq!(r.cache().usage().device_outstanding, 0);
    assert!(
        r.cache().resident_blocks().iter().all(|b| !b.locked),
        "a block was left locked"
    );
}

#[test]
fn requests_that_cannot_fit_fail_cleanly_and_leak_nothing() {
    let cfg = hotprefix_engine::model::LlamaConfig::preset("tiny").unwrap();
    let model = LlamaModel::random(cfg, 1);
    let mut r = Runner::new(model, PolicyKind::HotPrefix, 4, 4, 8, Salt::NONE).unwrap();
    let mut s = Sampler::new(SamplingParams::greedy());
    assert!(matches!(
        r.generate(&[], 4, &mut s, &[]),
        Err(RunError::EmptyPrompt)
    ));
    assert!(matches!(
        r.generate(&[1, 512], 4, &mut s, &[]),
        Err(RunError::BadToken { id: 512, .. })
    ));
    let long: Vec<u32> = (0..20).collect();
    assert!(matches!(
        r.generate(&long, 1, &mut s, &[]),
        Err(RunError::TooLong { .. })
    ));
    // A stop token ends the answer early; the blocks it computed are cached.
    let ids: Vec<u32> = (1..10).collect();
    let out = r.generate(&ids, 6, &mut s, &[]).unwrap();
    // Stop on the first token that differs from the first one (random weights repeat a lot).
    let stop = out
        .tokens
        .iter()
        .copied()
        .find(|&t| t != out.tokens[0])
        .unwrap_or(out.tokens[0]);
    let until = out.tokens.iter().position(|&t| t == stop).unwrap();
    let early = r.generate(&ids, 6, &mut s, &[stop]).unwrap();
    assert_eq!(early.tokens, out.tokens[..until]);
    assert!(early.cached_tokens > 0);
    r.cache().check_invariants().unwrap();
    assert_eq!(r.cache().usage().device_outstanding, 0);
    assert!(r.cache().resident_blocks().iter().all(|b| !b.locked));
}
