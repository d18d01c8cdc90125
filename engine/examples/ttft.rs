//! Time to first token with the default model on this machine's CPU, through the scheduler and
//! the prefix cache: a 1,024-token shared prefix plus a 32-token suffix, cold, as a device-tier
//! hit, and as a host-tier hit, against prefilling the 32-token suffix alone (issue 3's TTFT
//! benchmark). Each measurement is one request on an otherwise idle engine, from submission to
//! its first token.
//!
//! Run: `cargo run --release -p hotprefix-engine --example ttft` (after scripts/fetch-model.sh).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hotprefix_cache::PolicyKind;
use hotprefix_engine::backend::cpu::CpuBackend;
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::metrics::EngineMetrics;
use hotprefix_engine::model::LlamaModel;
use hotprefix_engine::sampling::SamplingParams;
use hotprefix_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use hotprefix_protocol::Salt;
use tokio::sync::mpsc::unbounded_channel;

const PREFIX: usize = 1024;
const SUFFIX: usize = 32;
const BS: usize = 16;
const REPEATS: usize = 11;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Submits `prompt` for one token and returns (time to it, cached tokens).
fn ttft(s: &mut Scheduler<CpuBackend>, prompt: &[u32]) -> Result<(Duration, usize)> {
    let (tx, mut rx) = unbounded_channel();
    let start = Instant::now();
    s.submit(Request {
        id: "ttft".into(),
        prompt: prompt.to_vec(),
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop_tokens: vec![],
        events: tx,
    })?;
    let mut first = None;
    let mut cached = 0;
    loop {
        s.step();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Token(_) => first = first.or(Some(start.elapsed())),
                Event::Admitted { cached_tokens } => cached = cached_tokens,
                Event::Done(_) => {
                    s.drain_transfers();
                    return Ok((first.context("no token")?, cached));
                }
                Event::Rejected(e) => bail!("rejected: {e}"),
            }
        }
    }
}

/// Evicts every unlocked device block (to the host tier, for policies with one).
fn flush_device(s: &mut Scheduler<CpuBackend>, blocks: usize) -> Result<()> {
    let all = s.cache_mut().allocate(blocks, 0.0)?;
    s.flush_transfers();
    s.cache_mut().free(all)?;
    s.drain_transfers();
    Ok(())
}

fn main() -> Result<()> {
    let path = Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(path).context("run scripts/fetch-model.sh first")?;
    let model = LlamaModel::from_gguf(&g)?;
    // Deterministic ordinary tokens (ids past the special ones), distinct per seed.
    let text = |seed: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| (1000 + (seed * 7919 + i * 104_729) % 40_000) as u32)
            .collect()
    };
    let prefix = text(1, PREFIX);
    let prompt = |k: usize| -> Vec<u32> {
        prefix
            .iter()
            .copied()
            .chain(text(100 + k, SUFFIX))
            .collect()
    };
    let blocks = (PREFIX + SUFFIX + 1).div_ceil(BS) + 2;
    let mut backend = CpuBackend::new();
    let decoder = Decoder::new(model, &mut backend)?;
    let mut cfg = SchedulerConfig::new(BS, blocks as u32, 4 * blocks as u32, Salt::NONE);
    cfg.policy = PolicyKind::LruOffload;
    cfg.max_batch_tokens = 2048;
    let mut s = Scheduler::new(cfg, decoder, backend, Arc::new(EngineMetrics::new("ttft")))?;

    let (mut cold, mut device, mut host, mut alone) = (vec![], vec![], vec![], vec![]);
    for k in 0..REPEATS {
        flush_device(&mut s, blocks)?;
        let fresh: Vec<u32> = text(500 + k, PREFIX)
            .into_iter()
            .chain(text(600 + k, SUFFIX))
            .collect();
        let (t, cached) = ttft(&mut s, &fresh)?;
        assert_eq!(cached, 0);
        cold.push(t);
        // Warm the shared prefix, then hit it on the device.
        ttft(&mut s, &prompt(10 * k))?;
        let (t, cached) = ttft(&mut s, &prompt(10 * k + 1))?;
        assert!(
            cached >= PREFIX - BS,
            "device hit expected, {cached} cached"
        );
        device.push(t);
        // Push it to the host tier and hit it there.
        flush_device(&mut s, blocks)?;
        let before = s.cache().stats().host_hit_tokens;
        let (t, _) = ttft(&mut s, &prompt(10 * k + 2))?;
        assert!(
            s.cache().stats().host_hit_tokens > before,
            "host hit expected"
        );
        host.push(t);
        // The suffix alone, nothing cached.
        let (t, cached) = ttft(&mut s, &text(700 + k, SUFFIX))?;
        assert_eq!(cached, 0);
        alone.push(t);
    }
    // Ratios per repeat (each repeat measures its cases back to back), then their median: on a
    // noisy machine this is steadier than a ratio of medians taken minutes apart.
    let ratio = |a: &[Duration], b: &[Duration]| -> f64 {
        let mut r: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let (hit_vs_alone, host_vs_hit) = (ratio(&device, &alone), ratio(&host, &device));
    let (cold, device, host, alone) = (median(cold), median(device), median(host), median(alone));
    println!(
        "prefix {PREFIX} + suffix {SUFFIX} tokens, block {BS}, {} rayon threads, median of \
         {REPEATS}:",
        rayon::current_num_threads()
    );
    println!("  cold (no cache)        {cold:>10.1?}");
    println!(
        "  device-tier hit        {device:>10.1?}  ({hit_vs_alone:.2}x the suffix alone, median \
         ratio; goal <= 1.3x)"
    );
    println!(
        "  host-tier hit          {host:>10.1?}  ({host_vs_hit:.2}x the device-tier hit, median \
         ratio; goal <= 1.5x)"
    );
    println!("  suffix alone           {alone:>10.1?}");
    println!(
        "  cold / device-tier hit {:.1}x",
        cold.as_secs_f64() / device.as_secs_f64()
    );
    Ok(())
}
