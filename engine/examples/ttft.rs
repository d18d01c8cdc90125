//! Time to first token with the default model on this machine's CPU, through the prefix cache:
//! a 1,024-token shared prefix plus a 32-token suffix, cold, as a device-tier hit, and as a
//! host-tier hit, against prefilling the 32-token suffix alone (issue 3's TTFT benchmark).
//!
//! Run: `cargo run --release -p hotprefix-engine --example ttft` (after scripts/fetch-model.sh).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hotprefix_cache::PolicyKind;
use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::model::LlamaModel;
use hotprefix_engine::runner::Runner;
use hotprefix_engine::sampling::{Sampler, SamplingParams};
use hotprefix_protocol::Salt;

const PREFIX: usize = 1024;
const SUFFIX: usize = 32;
const BS: usize = 16;
const REPEATS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let path = Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(path).context("run scripts/fetch-model.sh first")?;
    let model = LlamaModel::from_gguf(&g)?;
    // Deterministic ordinary tokens (ids past the special ones), distinct per suffix.
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
    let blocks = ((PREFIX + SUFFIX + 1).div_ceil(BS) + 1) as u32;
    let mut r = Runner::new(
        model,
        PolicyKind::LruOffload,
        BS,
        blocks,
        4 * blocks,
        Salt::NONE,
    )?;
    let mut greedy = Sampler::new(SamplingParams::greedy());

    let mut cold = Vec::new();
    let mut device = Vec::new();
    let mut host = Vec::new();
    let mut alone = Vec::new();
    for k in 0..REPEATS {
        // Cold: flush both tiers' view by filling the device with scratch and dropping it.
        let scratch = r.cache_mut().allocate(blocks as usize, 0.0)?;
        r.run_transfers();
        r.cache_mut().free(scratch)?;
        let fresh_prefix: Vec<u32> = text(500 + k, PREFIX)
            .into_iter()
            .chain(text(600 + k, SUFFIX))
            .collect();
        let c = r.generate(&fresh_prefix, 1, &mut greedy, &[])?;
        assert_eq!(c.cached_tokens, 0);
        cold.push(c.ttft);
        // Warm the shared prefix, then hit it on the device.
        r.generate(&prompt(10 * k), 1, &mut greedy, &[])?;
        let d = r.generate(&prompt(10 * k + 1), 1, &mut greedy, &[])?;
        assert!(d.cached_tokens >= PREFIX - BS && d.host_blocks == 0);
        device.push(d.ttft);
        // Push it to the host tier and hit it there.
        let scratch = r.cache_mut().allocate(blocks as usize, 0.0)?;
        r.run_transfers();
        r.cache_mut().free(scratch)?;
        let h = r.generate(&prompt(10 * k + 2), 1, &mut greedy, &[])?;
        assert!(h.host_blocks > 0);
        host.push(h.ttft);
        // The suffix alone, nothing cached.
        let a = r.generate(&text(700 + k, SUFFIX), 1, &mut greedy, &[])?;
        alone.push(a.ttft);
    }
    let (cold, device, host, alone) = (median(cold), median(device), median(host), median(alone));
    println!("prefix {PREFIX} + suffix {SUFFIX} tokens, block {BS}, median of {REPEATS}:");
    println!("  cold (no cache)        {cold:>10.1?}");
    println!(
        "  device-tier hit        {device:>10.1?}  ({:.2}x the suffix alone)",
        device.as_secs_f64() / alone.as_secs_f64()
    );
    println!(
        "  host-tier hit          {host:>10.1?}  ({:.2}x the device-tier hit)",
        host.as_secs_f64() / device.as_secs_f64()
    );
    println!("  suffix alone           {alone:>10.1?}");
    println!(
        "  cold / device-tier hit {:.1}x",
        cold.as_secs_f64() / device.as_secs_f64()
    );
    Ok(())
}
