//! The scheduler end to end on the CPU backend: cold runs, device-tier hits, partial hits and
//! host-tier hits give exactly the greedy tokens of the dense reference; requests batched
//! together get the tokens they get alone; preemption, cancellation, stop tokens and refusals
//! leave no block locked or leaked.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use hotprefix_cache::PolicyKind;
use hotprefix_engine::backend::cpu::CpuBackend;
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::metrics::EngineMetrics;
use hotprefix_engine::model::{LlamaConfig, LlamaModel, argmax};
use hotprefix_engine::sampling::SamplingParams;
use hotprefix_engine::scheduler::{
    Event, Finish, FinishReason, Request, Scheduler, SchedulerConfig, SubmitError,
};
use hotprefix_protocol::{BlockHash, Salt, hash_blocks};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const BS: usize = 16;
const NEW_TOKENS: usize = 12;

fn scheduler(
    model: LlamaModel,
    policy: PolicyKind,
    device_blocks: u32,
    host_blocks: u32,
    tweak: impl FnOnce(&mut SchedulerConfig),
) -> Scheduler<CpuBackend> {
    let mut backend = CpuBackend::new();
    let decoder = Decoder::new(model, &mut backend).unwrap();
    let mut cfg = SchedulerConfig::new(BS, device_blocks, host_blocks, Salt(7));
    cfg.policy = policy;
    tweak(&mut cfg);
    Scheduler::new(cfg, decoder, backend, Arc::new(EngineMetrics::new("test"))).unwrap()
}

fn submit(
    s: &mut Scheduler<CpuBackend>,
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    s.submit(Request {
        id: "t".into(),
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_tokens: stop.to_vec(),
        events: tx,
    })
    .unwrap();
    rx
}

/// Tokens and finish of one request's events (all already sent).
fn drain(rx: &mut UnboundedReceiver<Event>) -> Option<(Vec<u32>, Finish)> {
    let mut tokens = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            Event::Token(t) => tokens.push(t),
            Event::Done(f) => return Some((tokens, f)),
            Event::Admitted { .. } => {}
            Event::Rejected(e) => panic!("rejected: {e}"),
        }
    }
    None
}

/// Runs the scheduler until every receiver has its `Done`, returning each one's tokens.
fn run_all(
    s: &mut Scheduler<CpuBackend>,
    mut rxs: Vec<UnboundedReceiver<Event>>,
) -> Vec<(Vec<u32>, Finish)> {
    let mut out: Vec<Option<(Vec<u32>, Finish)>> = vec![None; rxs.len()];
    let mut partial: Vec<Vec<u32>> = vec![Vec::new(); rxs.len()];
    for _ in 0..100_000 {
        s.step();
        for (i, rx) in rxs.iter_mut().enumerate() {
            if out[i].is_some() {
                continue;
            }
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Token(t) => partial[i].push(t),
                    Event::Done(f) => {
                        out[i] = Some((std::mem::take(&mut partial[i]), f));
                        break;
                    }
                    Event::Admitted { .. } => {}
                    Event::Rejected(e) => panic!("rejected: {e}"),
                }
            }
        }
        if out.iter().all(Option::is_some) {
            s.drain_transfers();
            return out.into_iter().map(Option::unwrap).collect();
        }
    }
    panic!("requests did not finish");
}

fn run_one(s: &mut Scheduler<CpuBackend>, prompt: &[u32]) -> (Vec<u32>, Finish) {
    let rx = submit(s, prompt, NEW_TOKENS, &[]);
    let r = run_all(s, vec![rx]).remove(0);
    s.check_idle().unwrap();
    r
}

/// Greedy tokens of the dense reference path, no cache involved.
fn reference(model: &LlamaModel, ids: &[u32], n: usize) -> Vec<u32> {
    let mut kv = model.new_kv();
    let mut logits = model.forward(ids, &mut kv);
    let mut out = Vec::new();
    loop {
        out.push(argmax(&logits));
        if out.len() == n {
            return out;
        }
        logits = model.forward(&out[out.len() - 1..], &mut kv);
    }
}

#[test]
fn cache_hits_in_either_tier_give_the_tokens_of_a_cold_run() {
    let m = common::load();
    let model = LlamaModel::from_gguf(&m.gguf).unwrap();
    let france = m.prompt("What is the capital of France?");
    let italy = m.prompt("What is the capital of Italy?");
    let ref_france = reference(&model, &france, NEW_TOKENS);
    let ref_italy = reference(&model, &italy, NEW_TOKENS);
    assert!(m.tok.decode(&ref_france, true).unwrap().contains("Paris"));
    let mut s = scheduler(model, PolicyKind::LruOffload, 16, 64, |_| {});

    let (cold, f) = run_one(&mut s, &france);
    assert_eq!(f.cached_tokens, 0);
    assert_eq!(
        cold, ref_france,
        "cold run differs from the dense reference"
    );

    let (hit, f) = run_one(&mut s, &france);
    assert_eq!(
        f.cached_tokens,
        (france.len() - 1) / BS * BS,
        "full-prefix hit"
    );
    assert_eq!(hit, ref_france, "device-tier hit differs from the cold run");

    let (partial, f) = run_one(&mut s, &italy);
    assert!(f.cached_tokens > 0 && f.cached_tokens < italy.len() - BS);
    assert_eq!(partial, ref_italy, "partial hit differs from the cold run");

    // Push everything to the host tier, then hit it from there.
    let all = s.cache_mut().allocate(16, 0.0).unwrap();
    s.flush_transfers();
    s.cache_mut().free(all).unwrap();
    s.drain_transfers();
    let hashes = hash_blocks(&france, BS, Salt(7), BlockHash::ROOT);
    let peek = s.cache().peek(&hashes);
    assert_eq!(peek.device_blocks, 0);
    assert!(peek.host_blocks > 0, "France's blocks are on the host");
    let before = s.cache().stats().host_hit_tokens;
    let (from_host, f) = run_one(&mut s, &france);
    assert!(
        s.cache().stats().host_hit_tokens > before,
        "a host-tier hit"
    );
    assert!(f.cached_tokens > 0);
    assert_eq!(
        from_host, ref_france,
        "host-tier hit differs from the cold run"
    );
}

#[test]
fn requests_batched_together_get_the_tokens_they_get_alone() {
    let m = common::load();
    let model = LlamaModel::from_gguf(&m.gguf).unwrap();
    let questions = [
        "What is the capital of France?",
        "What is the capital of Italy?",
        "Name a color.",
        "What is 2 plus 2?",
    ];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| m.prompt(q)).collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| reference(&model, p, NEW_TOKENS))
        .collect();
    // Small steps so prefill chunks and decode tokens of different requests share steps.
    let mut s = scheduler(model, PolicyKind::HotPrefix, 64, 64, |c| {
        c.max_batch_tokens = 24;
        c.max_running = 4;
    });
    let rxs = prompts
        .iter()
        .map(|p| submit(&mut s, p, NEW_TOKENS, &[]))
        .collect();
    let together = run_all(&mut s, rxs);
    for (i, (t, f)) in together.iter().enumerate() {
        assert_eq!(t, &alone[i], "request {i} differs when batched");
        assert_eq!(f.reason, FinishReason::Length);
        assert_eq!(f.completion_tokens, NEW_TOKENS);
    }
    s.check_idle().unwrap();
    assert!(s.status().steps > 10, "chunked prefill took several steps");
}

#[test]
fn preemption_recomputes_and_gives_the_same_tokens() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let model = LlamaModel::random(cfg, 11);
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|k| {
            (0..30)
                .map(|i| ((i * 13 + k * 101) % 500 + 1) as u32)
                .collect()
        })
        .collect();
    let n = 40;
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| reference(&model, p, n)).collect();
    // 12 device blocks: three requests of 30 + 40 tokens (5 blocks each) cannot all grow.
    let mut s = scheduler(model, PolicyKind::Lru, 12, 0, |c| {
        c.max_running = 3;
        c.max_batch_tokens = 96;
    });
    let rxs = prompts.iter().map(|p| submit(&mut s, p, n, &[])).collect();
    let out = run_all(&mut s, rxs);
    for (i, (t, _)) in out.iter().enumerate() {
        assert_eq!(t, &alone[i], "request {i} differs after preemption");
    }
    assert!(s.status().preemptions > 0, "the test must preempt");
    s.check_idle().unwrap();
}

#[test]
fn cancelled_and_refused_requests_leak_nothing() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let model = LlamaModel::random(cfg, 1);
    let mut s = scheduler(model, PolicyKind::HotPrefix, 8, 16, |c| c.max_waiting = 2);
    let (tx, _) = unbounded_channel();
    let req = |prompt: Vec<u32>, max_tokens| Request {
        id: "r".into(),
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_tokens: vec![],
        events: tx.clone(),
    };
    assert_eq!(s.submit(req(vec![], 4)), Err(SubmitError::EmptyPrompt));
    assert!(matches!(
        s.submit(req(vec![1, 512], 4)),
        Err(SubmitError::BadToken { id: 512, .. })
    ));
    assert!(matches!(
        s.submit(req(vec![1; 100], 100)),
        Err(SubmitError::TooLarge { .. })
    ));
    assert!(matches!(
        s.submit(req(vec![1; 10], 5000)),
        Err(SubmitError::ContextLength { .. })
    ));
    // Cancel one while running (after a few tokens) and one while waiting.
    let mut running = submit(&mut s, &[5; 20], 30, &[]);
    let waiting = submit(&mut s, &[6; 20], 30, &[]);
    assert_eq!(
        s.submit(req(vec![1; 3], 1)),
        Err(SubmitError::QueueFull(2)),
        "the queue holds two"
    );
    for _ in 0..5 {
        s.step();
    }
    assert!(drain(&mut running).is_none());
    drop(running);
    drop(waiting);
    for _ in 0..5 {
        s.step();
    }
    s.drain_transfers();
    s.check_idle().unwrap();
    // A stop token ends the answer early; the blocks it computed are cached.
    let ids: Vec<u32> = (1..40).collect();
    let (all, _) = run_one(&mut s, &ids);
    let stop = all.iter().copied().find(|&t| t != all[0]).unwrap_or(all[0]);
    let until = all.iter().position(|&t| t == stop).unwrap();
    let rx = submit(&mut s, &ids, NEW_TOKENS, &[stop]);
    let (early, f) = run_all(&mut s, vec![rx]).remove(0);
    assert_eq!(early, all[..until]);
    assert_eq!(f.reason, FinishReason::Stop);
    assert!(f.cached_tokens > 0);
    s.check_idle().unwrap();
}

#[test]
fn a_conversation_hits_its_own_generated_history() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let model = LlamaModel::random(cfg, 2);
    let mut s = scheduler(model, PolicyKind::HotPrefix, 32, 32, |_| {});
    let turn1: Vec<u32> = (1..20).collect();
    let (answer, _) = {
        let rx = submit(&mut s, &turn1, 30, &[]);
        run_all(&mut s, vec![rx]).remove(0)
    };
    // The next turn sends the history back: prompt + answer + a new question.
    let mut turn2 = turn1.clone();
    turn2.extend(&answer);
    turn2.extend(100..110);
    let rx = submit(&mut s, &turn2, 4, &[]);
    let (_, f) = run_all(&mut s, vec![rx]).remove(0);
    // Everything computed in turn 1 (prompt + all but the last answer token) was cached,
    // in whole blocks.
    let computed = turn1.len() + answer.len() - 1;
    assert_eq!(f.cached_tokens, computed / BS * BS);
    assert!(
        f.cached_tokens > turn1.len(),
        "generated tokens were cached too"
    );
    s.check_idle().unwrap();
}
