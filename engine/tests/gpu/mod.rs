//! Cross-checks of the CUDA backend against the CPU backend, shared by the GPU tests
//! (`engine/tests/cuda.rs`, run with `HOTPREFIX_GPU_TESTS=1`) and the GPU check program
//! (`engine/examples/gpu_check.rs`, which `scripts/gpu-check.sh` runs on a GPU machine).
//!
//! Every check feeds both backends the same inputs, already rounded to bf16 so the GPU holds
//! them exactly, runs the same generic code on each, and compares what comes back.

#![allow(dead_code)]

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hotprefix_cache::{PolicyKind, SlotId, Transfer, TransferCause, TransferId, TransferKind};
use hotprefix_engine::backend::cpu::CpuBackend;
use hotprefix_engine::backend::cuda::{CudaBackend, CudaOptions};
use hotprefix_engine::backend::{Backend, KvLayout, SeqSpan, StepBatch};
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::metrics::EngineMetrics;
use hotprefix_engine::model::{LlamaConfig, LlamaModel, Matrix, RopeStyle, argmax};
use hotprefix_engine::sampling::SamplingParams;
use hotprefix_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use hotprefix_protocol::Salt;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// Tokens per KV block in every check.
pub const BS: usize = 16;

/// How one output of the CUDA backend compares with the CPU backend's.
#[derive(Clone, Debug)]
pub struct Compare {
    /// What was compared.
    pub what: String,
    /// ||cuda - cpu|| / ||cpu||.
    pub rel_l2: f64,
    /// Largest |cuda - cpu|.
    pub max_abs: f64,
    /// Largest |cpu|.
    pub ref_max: f64,
    /// Rows (of `row_len` values) whose largest value is at the same index, of all rows.
    pub argmax_agree: Option<(usize, usize)>,
    /// The relative L2 error allowed.
    pub tolerance: f64,
}

impl Compare {
    /// Whether it is within tolerance (and finite).
    pub fn pass(&self) -> bool {
        self.rel_l2.is_finite() && self.rel_l2 <= self.tolerance
    }
}

impl fmt::Display for Compare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: rel L2 {:.2e} (tolerance {:.0e}), max |diff| {:.3e} of max |ref| {:.3e}",
            if self.pass() { "ok  " } else { "FAIL" },
            self.what,
            self.rel_l2,
            self.tolerance,
            self.max_abs,
            self.ref_max
        )?;
        if let Some((a, n)) = self.argmax_agree {
            write!(f, ", argmax agrees on {a}/{n} rows")?;
        }
        Ok(())
    }
}

/// Compares `got` with `want` (rows of `row_len` values for the argmax count, 0 for none).
pub fn compare(what: &str, got: &[f32], want: &[f32], row_len: usize, tolerance: f64) -> Compare {
    let (mut num, mut den, mut max_abs, mut ref_max) = (0f64, 0f64, 0f64, 0f64);
    if got.len() != want.len() {
        return Compare {
            what: format!("{what} (lengths {} vs {})", got.len(), want.len()),
            rel_l2: f64::INFINITY,
            max_abs: f64::INFINITY,
            ref_max: 0.0,
            argmax_agree: None,
            tolerance,
        };
    }
    for (&g, &w) in got.iter().zip(want) {
        let d = f64::from(g) - f64::from(w);
        num += d * d;
        den += f64::from(w) * f64::from(w);
        max_abs = max_abs.max(d.abs());
        ref_max = ref_max.max(f64::from(w).abs());
        if !g.is_finite() {
            max_abs = f64::INFINITY;
            num = f64::INFINITY;
        }
    }
    let argmax_agree = (row_len > 0).then(|| {
        let rows = want.len() / row_len;
        let agree = (0..rows)
            .filter(|&r| {
                let s = r * row_len..(r + 1) * row_len;
                argmax(&got[s.clone()]) == argmax(&want[s])
            })
            .count();
        (agree, rows)
    });
    Compare {
        what: what.to_string(),
        rel_l2: (num / den.max(1e-30)).sqrt(),
        max_abs,
        ref_max,
        argmax_agree,
        tolerance,
    }
}

/// `n` values uniform in [-scale, scale), rounded to bf16 (SplitMix64 from `seed`).
pub fn bf16_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            half::bf16::from_f32(u * scale).to_f32()
        })
        .collect()
}

/// A `rows` x `cols` tensor holding `data` (rows of an uploaded table, looked up by `embed`).
fn input<B: Backend>(b: &mut B, rows: usize, cols: usize, data: Vec<f32>) -> Result<B::Tensor> {
    let table = b.upload_matrix(Matrix::new(rows, cols, data)?)?;
    let mut t = b.tensor(rows, cols)?;
    let ids: Vec<u32> = (0..rows as u32).collect();
    b.embed(&table, &ids, &mut t)?;
    Ok(t)
}

/// The tiny preset's shape with a given head layout, for the op checks.
fn shape(layers: usize, heads: usize, kv_heads: usize, head_dim: usize) -> LlamaConfig {
    let mut c = LlamaConfig::preset("tiny").expect("tiny preset");
    c.layers = layers;
    c.heads = heads;
    c.kv_heads = kv_heads;
    c.head_dim = head_dim;
    c.hidden = heads * head_dim;
    c
}

/// A batch of sequences `(start, new tokens)` with block tables drawn from `slots` in order.
fn batch_of(seqs: &[(usize, usize)], slots: &mut impl Iterator<Item = u32>) -> StepBatch {
    let mut row = 0;
    let spans = seqs
        .iter()
        .map(|&(start, n)| {
            let blocks = (start + n).div_ceil(BS);
            let s = SeqSpan {
                rows: row..row + n,
                start,
                table: slots.by_ref().take(blocks).map(SlotId).collect(),
            };
            row += n;
            s
        })
        .collect();
    StepBatch {
        seqs: spans,
        block_size: BS,
    }
}

/// The row-wise and element-wise operations on one backend, in a fixed order, named.
fn elementwise_outputs<B: Backend>(b: &mut B) -> Result<Vec<(String, Vec<f32>, usize)>> {
    let cfg = shape(1, 4, 2, 16);
    b.allocate_kv(
        &cfg,
        KvLayout {
            block_size: BS,
            device_blocks: 8,
            host_blocks: 0,
        },
    )?;
    let (rows, cols, n_out) = (7, 320, 96);
    let mut out = Vec::new();
    let x = input(b, rows, cols, bf16_values(rows * cols, 1, 2.0))?;
    let w = b.upload_vector(bf16_values(cols, 2, 1.0))?;
    let mut xn = b.tensor(rows, cols)?;
    b.rms_norm(&x, &w, 1e-5, &mut xn)?;
    out.push(("rms_norm".into(), b.to_host(&xn)?, 0));
    let m = b.upload_matrix(Matrix::new(n_out, cols, bf16_values(n_out * cols, 3, 0.1))?)?;
    let mut y = b.tensor(rows, n_out)?;
    // The RMSNorm output carries its bf16 copy; the embedded input's copy is made first.
    b.matmul(&xn, &m, &mut y)?;
    out.push(("matmul after rms_norm".into(), b.to_host(&y)?, n_out));
    b.matmul(&x, &m, &mut y)?;
    out.push(("matmul of a stale bf16 copy".into(), b.to_host(&y)?, n_out));
    let am = b.argmax_rows(&y, n_out)?;
    out.push((
        "argmax_rows".into(),
        am.iter().map(|&i| i as f32).collect(),
        0,
    ));
    let one = b.select_rows(&x, &[3])?;
    let mut y1 = b.tensor(1, n_out)?;
    b.matmul(&one, &m, &mut y1)?;
    out.push(("matmul of one row".into(), b.to_host(&y1)?, n_out));
    let picked = b.select_rows(&x, &[6, 0, 3])?;
    out.push(("select_rows".into(), b.to_host(&picked)?, 0));
    let bias = b.upload_vector(bf16_values(n_out, 4, 1.0))?;
    b.add_bias(&mut y, &bias)?;
    out.push(("add_bias".into(), b.to_host(&y)?, 0));
    let mut g = input(b, rows, n_out, bf16_values(rows * n_out, 5, 4.0))?;
    b.silu_mul(&mut g, &y)?;
    out.push(("silu_mul".into(), b.to_host(&g)?, 0));
    b.add(&mut g, &y)?;
    out.push(("add".into(), b.to_host(&g)?, 0));
    let positions = batch_of(&[(0, 3), (300, 1), (17, 3)], &mut (0u32..).map(|i| i % 8));
    for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
        let mut q = input(b, rows, 64, bf16_values(rows * 64, 6, 1.0))?;
        b.rope(&mut q, &positions, 16, 10_000.0, style)?;
        out.push((format!("rope {style:?}"), b.to_host(&q)?, 0));
    }
    Ok(out)
}

/// Attention over a cached prefix and the step's own tokens: step one writes each sequence's
/// prefix `0..start` into its blocks, step two writes the new tokens and attends. With
/// `via_host`, every block then goes to the host tier and back into other device slots, and
/// the step is rerun over those: the result must not change.
fn attention_outputs<B: Backend>(
    b: &mut B,
    cfg: &LlamaConfig,
    seqs: &[(usize, usize)],
    via_host: bool,
) -> Result<Vec<f32>> {
    let layer = cfg.layers - 1;
    let blocks: usize = seqs.iter().map(|&(s, n)| (s + n).div_ceil(BS)).sum();
    b.allocate_kv(
        cfg,
        KvLayout {
            block_size: BS,
            device_blocks: 2 * blocks + 2,
            host_blocks: blocks + 1,
        },
    )?;
    // Scrambled slots: every other one, from the top; each sequence its own blocks.
    let order: Vec<u32> = (0..blocks as u32).rev().map(|i| 2 * i + 1).collect();
    let (kvd, qd) = (cfg.kv_dim(), cfg.heads * cfg.head_dim);
    let mut slots = order.clone().into_iter();
    let step = batch_of(seqs, &mut slots);
    // Step one writes each sequence's cached prefix 0..start into the first blocks of its own
    // table (sequences without a prefix take no part).
    let mut pre = StepBatch {
        seqs: Vec::new(),
        block_size: BS,
    };
    let mut pr = 0;
    for s in &step.seqs {
        if s.start > 0 {
            pre.seqs.push(SeqSpan {
                rows: pr..pr + s.start,
                start: 0,
                table: s.table[..s.start.div_ceil(BS)].to_vec(),
            });
            pr += s.start;
        }
    }
    if pr > 0 {
        let k = input(b, pr, kvd, bf16_values(pr * kvd, 11, 1.0))?;
        let v = input(b, pr, kvd, bf16_values(pr * kvd, 12, 1.0))?;
        b.write_kv(layer, &k, &v, &pre)?;
    }
    let rows = step.rows();
    let q = input(b, rows, qd, bf16_values(rows * qd, 13, 1.0))?;
    let k = input(b, rows, kvd, bf16_values(rows * kvd, 14, 1.0))?;
    let v = input(b, rows, kvd, bf16_values(rows * kvd, 15, 1.0))?;
    b.write_kv(layer, &k, &v, &step)?;
    let mut out = b.tensor(rows, qd)?;
    b.attention(layer, &q, &step, &mut out)?;
    let first = b.to_host(&out)?;
    if !via_host {
        return Ok(first);
    }
    // Every block to host slots 0.., then back into the even device slots.
    let store = Transfer {
        id: TransferId(1),
        kind: TransferKind::Store,
        cause: TransferCause::WriteThrough,
        copies: order
            .iter()
            .enumerate()
            .map(|(i, &s)| (SlotId(s), SlotId(i as u32)))
            .collect(),
    };
    b.submit_transfer(store)?;
    wait_transfer(b, TransferId(1))?;
    let moved: Vec<u32> = (0..blocks as u32).map(|i| 2 * i).collect();
    let load = Transfer {
        id: TransferId(2),
        kind: TransferKind::Load,
        cause: TransferCause::Hit,
        copies: moved
            .iter()
            .enumerate()
            .map(|(i, &d)| (SlotId(i as u32), SlotId(d)))
            .collect(),
    };
    b.submit_transfer(load)?;
    wait_transfer(b, TransferId(2))?;
    let mut again = moved.into_iter();
    let step2 = batch_of(seqs, &mut again);
    b.write_kv(layer, &k, &v, &step2)?;
    b.attention(layer, &q, &step2, &mut out)?;
    let second = b.to_host(&out)?;
    if second != first {
        let c = compare("after the host round trip", &second, &first, 0, 0.0);
        bail!("attention over blocks moved through the host tier changed: {c}");
    }
    Ok(second)
}

fn wait_transfer<B: Backend>(b: &mut B, id: TransferId) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if b.poll_transfers(Duration::from_millis(10)).contains(&id) {
            return Ok(());
        }
    }
    bail!("transfer {} did not finish in 30 s", id.0)
}

/// An attention check: its name, the model shape, the sequences (start, new tokens).
type AttentionCase = (&'static str, LlamaConfig, Vec<(usize, usize)>);

/// The attention cases: decode, prefill after a prefix, several sequences of different
/// contexts, many decodes (no key splits), for the model shapes served: tiny (head dim 16, group
/// 2), SmolLM2 (64, group 3), Llama 3.1 8B (128, group 4).
fn attention_cases() -> Vec<AttentionCase> {
    vec![
        (
            "tiny prefill + decode",
            shape(2, 4, 2, 16),
            vec![(0, 40), (37, 1)],
        ),
        (
            "smollm2 shape prefill after prefix",
            shape(2, 9, 3, 64),
            vec![(70, 30), (5, 9)],
        ),
        (
            "llama shape decode, long context",
            shape(2, 32, 8, 128),
            vec![(3000, 1)],
        ),
        (
            "llama shape mixed batch",
            shape(2, 32, 8, 128),
            vec![(100, 20), (900, 1), (0, 64)],
        ),
        (
            "llama shape 40 decodes",
            shape(1, 32, 8, 128),
            (0..40).map(|i| (50 + 37 * i, 1)).collect(),
        ),
    ]
}

/// Every operation of the CUDA backend against the CPU backend's, on the same inputs.
pub fn op_checks(cuda: &mut CudaBackend) -> Result<Vec<Compare>> {
    let mut cpu = CpuBackend::new();
    let mut out = Vec::new();
    let want = elementwise_outputs(&mut cpu)?;
    let got = elementwise_outputs(cuda)?;
    for ((name, g, row), (_, w, _)) in got.iter().zip(&want) {
        // Products of bf16 inputs accumulate in f32 on both sides: only the order differs.
        out.push(compare(&format!("op {name}"), g, w, *row, 1e-4));
    }
    let cases = attention_cases();
    let opts = cuda.options();
    for (name, cfg, seqs) in &cases {
        let want = attention_outputs(&mut cpu, cfg, seqs, false)?;
        for choice in ["simple", "mma"] {
            let c = choice.parse().map_err(anyhow::Error::msg)?;
            cuda.set_attention(c);
            // The tensor-core kernel rounds the scaled queries and probabilities to bf16.
            let tol = if choice == "mma" { 2e-2 } else { 1e-4 };
            match attention_outputs(cuda, cfg, seqs, false) {
                Ok(got) => out.push(compare(
                    &format!("attention {choice} {name}"),
                    &got,
                    &want,
                    0,
                    tol,
                )),
                Err(e) => out.push(failed(&format!("attention {choice} {name}"), &e)),
            }
        }
        cuda.set_attention(opts.attention);
    }
    // Tier round trips with every copy mode, overlapped or not.
    let (name, cfg, seqs) = &cases[3];
    let want = attention_outputs(&mut cpu, cfg, seqs, true)?;
    for mode in ["kernel", "memcpy"] {
        for overlap in [false, true] {
            cuda.set_transfer_options(mode.parse().map_err(anyhow::Error::msg)?, overlap);
            let what = format!("host round trip ({mode}, overlap {overlap}) {name}");
            match attention_outputs(cuda, cfg, seqs, true) {
                Ok(got) => out.push(compare(&what, &got, &want, 0, 2e-2)),
                Err(e) => out.push(failed(&what, &e)),
            }
        }
    }
    cuda.set_transfer_options(opts.kv_copy, opts.layer_overlap);
    Ok(out)
}

fn failed(what: &str, e: &anyhow::Error) -> Compare {
    Compare {
        what: format!("{what}: {e:#}"),
        rel_l2: f64::INFINITY,
        max_abs: f64::INFINITY,
        ref_max: 0.0,
        argmax_agree: None,
        tolerance: 0.0,
    }
}

/// Logits of a whole model on both backends: a prefill of `prompt` tokens, then
/// `decode_steps` greedy steps fed the CPU's tokens, every step's last-row logits compared.
pub fn logits_check(
    name: &str,
    mut model: LlamaModel,
    prompt: usize,
    decode_steps: usize,
    cuda: &mut CudaBackend,
    tolerance: f64,
) -> Result<Vec<Compare>> {
    model.round_matrices_to_bf16();
    let cfg = model.cfg.clone();
    let mut cpu = CpuBackend::new();
    let dc = Decoder::new(model.clone(), &mut cpu)?;
    let dg = Decoder::new(model, cuda)?;
    let blocks = (prompt + decode_steps).div_ceil(BS) + 1;
    let layout = KvLayout {
        block_size: BS,
        device_blocks: blocks,
        host_blocks: 0,
    };
    cpu.allocate_kv(&cfg, layout)?;
    cuda.allocate_kv(&cfg, layout)?;
    let table: Vec<SlotId> = (0..blocks as u32).rev().map(SlotId).collect();
    let mut tokens: Vec<u32> = (0..prompt)
        .map(|i| ((i * 7919 + 13) % cfg.vocab) as u32)
        .collect();
    let mut out = Vec::new();
    let mut start = 0;
    for step in 0..=decode_steps {
        let new = &tokens[start..];
        let n = new.len();
        let batch = StepBatch {
            seqs: vec![SeqSpan {
                rows: 0..n,
                start,
                table: table.clone(),
            }],
            block_size: BS,
        };
        let rows: Vec<usize> = (n.saturating_sub(4)..n).collect();
        let want = dc.step(&mut cpu, new, &batch, &rows)?;
        let got = dg.step(cuda, new, &batch, &rows)?;
        let (w, g): (Vec<f32>, Vec<f32>) = (want.concat(), got.concat());
        let what = if step == 0 {
            format!("{name} logits, prefill of {prompt}")
        } else {
            format!("{name} logits, decode step {step}")
        };
        out.push(compare(&what, &g, &w, cfg.vocab, tolerance));
        start += n;
        let next = argmax(want.last().context("no logits")?);
        tokens.push(next);
    }
    Ok(out)
}

/// Greedy tokens of one request `prefix + suffix` run cold, as a device-tier hit and as a
/// host-tier hit (another request sharing `prefix` ran first), on `backend`s made by `make`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greedy {
    /// Tokens of the cold run.
    pub cold: Vec<u32>,
    /// Tokens with the prefix in the device tier, and the prompt tokens served from it.
    pub device_hit: (Vec<u32>, usize),
    /// Tokens with the prefix in the host tier, and the prompt tokens served from it.
    pub host_hit: (Vec<u32>, usize),
}

/// Prefill chunks of this many tokens, a divisor of the prefix, so the suffix is computed in
/// a step of the same shape whether or not the prefix was cached.
pub const CHUNK: usize = 128;

pub fn greedy_runs<B: Backend + 'static>(
    model: &LlamaModel,
    prefix: usize,
    suffix: usize,
    new_tokens: usize,
    mut make: impl FnMut() -> Result<B>,
) -> Result<Greedy> {
    let vocab = model.cfg.vocab;
    let shared: Vec<u32> = (0..prefix).map(|i| ((i * 31 + 5) % vocab) as u32).collect();
    let tail = |k: usize| -> Vec<u32> {
        (0..suffix)
            .map(|i| ((i * 17 + k * 101 + 3) % vocab) as u32)
            .collect()
    };
    let mut a = shared.clone();
    a.extend(tail(1));
    let mut b = shared;
    b.extend(tail(2));
    let blocks = (2 * (prefix + suffix + new_tokens)).div_ceil(BS) as u32 + 4;
    let mut sched = |host: u32| -> Result<Scheduler<B>> {
        let mut backend = make()?;
        let decoder = Decoder::new(model.clone(), &mut backend)?;
        let mut cfg = SchedulerConfig::new(BS, blocks, host, Salt(7));
        cfg.policy = PolicyKind::LruOffload;
        cfg.max_batch_tokens = CHUNK;
        cfg.max_running = 1;
        Ok(Scheduler::new(
            cfg,
            decoder,
            backend,
            Arc::new(EngineMetrics::new("gpu-check")),
        )?)
    };
    let mut s = sched(0)?;
    let (cold, _) = run(&mut s, &b, new_tokens)?;
    let mut s = sched(0)?;
    run(&mut s, &a, new_tokens)?;
    let device_hit = run(&mut s, &b, new_tokens)?;
    let mut s = sched(2 * blocks)?;
    run(&mut s, &a, new_tokens)?;
    // Fill the device tier so everything cached moves to the host, then free it again.
    let all = s.cache_mut().allocate(blocks as usize, 0.0)?;
    s.flush_transfers();
    s.cache_mut().free(all)?;
    s.drain_transfers();
    let host_hit = run(&mut s, &b, new_tokens)?;
    s.check_idle().map_err(anyhow::Error::msg)?;
    Ok(Greedy {
        cold,
        device_hit,
        host_hit,
    })
}

/// Runs one greedy request to its end: its tokens and the prompt tokens served from cache.
fn run<B: Backend>(s: &mut Scheduler<B>, prompt: &[u32], n: usize) -> Result<(Vec<u32>, usize)> {
    let (tx, mut rx): (_, UnboundedReceiver<Event>) = unbounded_channel();
    s.submit(Request {
        id: "gpu-check".into(),
        prompt: prompt.to_vec(),
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_tokens: Vec::new(),
        events: tx,
    })
    .map_err(|e| anyhow::anyhow!("submit: {e}"))?;
    let mut tokens = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        s.step();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Token(t) => tokens.push(t),
                Event::Done(f) => {
                    s.drain_transfers();
                    return Ok((tokens, f.cached_tokens));
                }
                Event::Admitted { .. } => {}
                Event::Rejected(e) => bail!("rejected: {e}"),
            }
        }
    }
    bail!(
        "the request did not finish in 60 s ({} tokens so far); scheduler: {:?}",
        tokens.len(),
        s.status()
    )
}

/// A CUDA backend with `opts`, for [`greedy_runs`].
pub fn cuda_maker(opts: CudaOptions) -> impl FnMut() -> Result<CudaBackend> {
    move || Ok(CudaBackend::new(opts)?)
}

/// Runs the checks' own machinery on the CPU backend alone (every case, the host round trip,
/// the three greedy runs), so a harness bug shows on every CI run rather than on a GPU lease.
pub fn cpu_self_check() -> Result<Greedy> {
    let mut cpu = CpuBackend::new();
    let a = elementwise_outputs(&mut cpu)?;
    let b = elementwise_outputs(&mut cpu)?;
    if a != b {
        bail!("the element-wise outputs are not deterministic");
    }
    for (name, cfg, seqs) in attention_cases() {
        let direct = attention_outputs(&mut cpu, &cfg, &seqs, false)?;
        let moved = attention_outputs(&mut cpu, &cfg, &seqs, true)
            .with_context(|| format!("host round trip, {name}"))?;
        if direct != moved {
            bail!("{name}: the host round trip changed the result");
        }
    }
    let model = LlamaModel::random(LlamaConfig::preset("tiny")?, 5);
    greedy_runs(&model, 256, 32, 8, || Ok(CpuBackend::new()))
}
