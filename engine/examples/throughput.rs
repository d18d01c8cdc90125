//! Prefill and decode throughput of the CPU backend with the default model, at batch 1 and
//! batch 16, through the scheduler (issue 3's throughput benchmark), next to this machine's
//! measured limits in the same run: the f32 matrix-product rate `faer` reaches on a large
//! product and the memory bandwidth of summing a buffer far larger than the caches.
//!
//! Run: `cargo run --release -p hotprefix-engine --example throughput`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use faer::{Accum, Mat, Par};
use hotprefix_cache::PolicyKind;
use hotprefix_engine::backend::cpu::CpuBackend;
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::metrics::EngineMetrics;
use hotprefix_engine::model::{LlamaConfig, LlamaModel};
use hotprefix_engine::sampling::SamplingParams;
use hotprefix_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use hotprefix_protocol::Salt;
use rayon::prelude::*;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const PROMPT: usize = 256;
const DECODE: usize = 32;

/// Weights read per forward step (every layer matrix, f32) and multiply-adds per token.
fn model_cost(c: &LlamaConfig) -> (f64, f64) {
    let (h, qd, kv, f) = (c.hidden, c.heads * c.head_dim, c.kv_dim(), c.ffn);
    let per_layer = h * qd + 2 * h * kv + qd * h + 3 * h * f;
    let params = (c.layers * per_layer) as f64;
    (params * 4.0, params)
}

/// Runs `prompts` together, each generating `new_tokens` tokens, and returns (time to the last first
/// token, total time).
fn run(
    s: &mut Scheduler<CpuBackend>,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut rxs: Vec<UnboundedReceiver<Event>> = Vec::new();
    for p in prompts {
        let (tx, rx) = unbounded_channel();
        s.submit(Request {
            id: "bench".into(),
            prompt: p.clone(),
            max_tokens: new_tokens,
            sampling: SamplingParams::greedy(),
            stop_tokens: vec![],
            events: tx,
        })?;
        rxs.push(rx);
    }
    let mut first = vec![None; prompts.len()];
    let mut done = 0;
    while done < prompts.len() {
        s.step();
        for (i, rx) in rxs.iter_mut().enumerate() {
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Token(_) => first[i] = first[i].or(Some(start.elapsed())),
                    Event::Done(_) => done += 1,
                    Event::Admitted { .. } => {}
                    Event::Rejected(e) => bail!("rejected: {e}"),
                }
            }
        }
    }
    let last_first = first.into_iter().flatten().max().context("no tokens")?;
    Ok((last_first, start.elapsed()))
}

fn main() -> Result<()> {
    let g = GgufFile::open(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .context("run scripts/fetch-model.sh first")?;
    let model = LlamaModel::from_gguf(&g)?;
    let cfg = model.cfg.clone();
    let (weight_bytes, params) = model_cost(&cfg);
    let mut backend = CpuBackend::new();
    let decoder = Decoder::new(model, &mut backend)?;
    // Caching off in effect: every prompt is distinct, and LRU keeps nothing that matters.
    let mut sc = SchedulerConfig::new(16, 2048, 0, Salt::NONE);
    sc.policy = PolicyKind::Lru;
    sc.max_running = 16;
    sc.max_batch_tokens = 4096;
    let mut s = Scheduler::new(sc, decoder, backend, Arc::new(EngineMetrics::new("bench")))?;
    let mut seed = 0usize;
    let mut prompt = |n: usize| -> Vec<u32> {
        seed += 1;
        (0..n)
            .map(|i| (1000 + (seed * 7919 + i * 104_729) % 40_000) as u32)
            .collect()
    };
    // Warm up allocations and threads.
    run(&mut s, &[prompt(64)], 2)?;

    println!(
        "model: {} layers, d {}, {:.0}M layer parameters ({:.0} MB f32)",
        cfg.layers,
        cfg.hidden,
        params / 1e6,
        weight_bytes / 1e6
    );
    println!("| batch | prefill tok/s | prefill GFLOP/s | decode tok/s | decode weight GB/s |");
    println!("|---:|---:|---:|---:|---:|");
    for batch in [1usize, 16] {
        // Prefill: PROMPT tokens per request, one token out.
        let ps: Vec<Vec<u32>> = (0..batch).map(|_| prompt(PROMPT)).collect();
        let (_, t) = run(&mut s, &ps, 1)?;
        let prefill_tps = (batch * PROMPT) as f64 / t.as_secs_f64();
        // Decode: short prompts, DECODE tokens each; time after every request's first token.
        let ps: Vec<Vec<u32>> = (0..batch).map(|_| prompt(16)).collect();
        let (first, total) = run(&mut s, &ps, DECODE)?;
        let steps = (DECODE - 1) as f64;
        let decode_time = (total - first).as_secs_f64();
        let decode_tps = batch as f64 * steps / decode_time;
        println!(
            "| {batch} | {prefill_tps:.0} | {:.1} | {decode_tps:.1} | {:.1} |",
            prefill_tps * 2.0 * params / 1e9,
            steps * weight_bytes / decode_time / 1e9,
        );
    }

    // This machine's limits, measured now: a large f32 product on every core, and the
    // bandwidth of reading a 1 GiB buffer.
    let n = 2048;
    let a = Mat::<f32>::from_fn(n, n, |i, j| ((i * 31 + j * 17) % 97) as f32 / 97.0);
    let b = Mat::<f32>::from_fn(n, n, |i, j| ((i * 13 + j * 7) % 89) as f32 / 89.0);
    let mut c = Mat::<f32>::zeros(n, n);
    let t = Instant::now();
    for _ in 0..3 {
        faer::linalg::matmul::matmul(
            c.as_mut(),
            Accum::Replace,
            a.as_ref(),
            b.as_ref(),
            1.0,
            Par::rayon(0),
        );
    }
    let gflops = 3.0 * 2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let buf = vec![1.0f32; 1 << 28];
    let t = Instant::now();
    let mut sum = 0.0f32;
    for _ in 0..3 {
        // Eight independent lanes per chunk so the sum is limited by memory, not by a chain
        // of dependent additions; chunks spread over every core.
        sum += buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 8];
                for x in c.chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] += x[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
    }
    let gbs = 3.0 * (buf.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!(
        "machine limits now: f32 matrix product {gflops:.0} GFLOP/s ({} threads), memory read {gbs:.1} GB/s (checksum {sum})",
        rayon::current_num_threads()
    );
    Ok(())
}
