//! The GPU check: the CUDA backend's correctness against the CPU backend and its speed against
//! the card's limits, one section per run (`--section NAME`), so a device fault in one section
//! (which poisons the CUDA context) cannot take the others with it. Each section appends its
//! results to `--out`/gpu-check.md (a table per section) and gpu-check.jsonl (one JSON object per
//! figure). `scripts/gpu-check.sh` runs every section in order on a GPU machine.
//!
//! Sections: `device`, `ops`, `logits`, `greedy`, `ceilings`, `prefill`, `decode`,
//! `transfers`, `ttft`. Models are random-weight presets (`random:`), so nothing large has to
//! travel to the GPU machine; the performance model is Llama 3.1 8B's shape with `--layers`
//! layers (default 8) and its full vocabulary.

#[path = "../tests/gpu/mod.rs"]
mod gpu;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hotprefix_cache::{PolicyKind, SlotId, Transfer, TransferCause, TransferId, TransferKind};
use hotprefix_engine::backend::cuda::{CudaBackend, CudaOptions, KvCopyMode};
use hotprefix_engine::backend::{Backend, KvLayout, SeqSpan, StepBatch, kv_block_bytes};
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::metrics::EngineMetrics;
use hotprefix_engine::model::{LlamaConfig, LlamaModel, Matrix};
use hotprefix_engine::sampling::SamplingParams;
use hotprefix_engine::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use hotprefix_protocol::Salt;
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

/// A card's vendor figures, the yardsticks the issue names; the measured cuBLAS and copy
/// ceilings are reported beside them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Peaks {
    /// Which card the figures are for.
    card: &'static str,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    bf16_tflops: f64,
    /// Memory bandwidth, GB/s.
    hbm_gbps: f64,
}

/// The vendor's figures for the card named `name` (as the driver names it). A card not listed
/// gets the H100 SXM's, said so in the card field.
fn peaks(name: &str) -> Peaks {
    let n = name.to_ascii_uppercase();
    let (card, bf16_tflops, hbm_gbps) = if n.contains("H200") {
        ("H200", 989.0, 4800.0)
    } else if n.contains("H100") && n.contains("NVL") {
        ("H100 NVL", 835.0, 3900.0)
    } else if n.contains("H100") && n.contains("PCIE") {
        ("H100 PCIe", 756.0, 2000.0)
    } else if n.contains("H100") {
        ("H100 SXM", 989.0, 3350.0)
    } else if n.contains("A100") && n.contains("40GB") {
        ("A100 40GB", 312.0, 1555.0)
    } else if n.contains("A100") {
        ("A100 80GB", 312.0, 2039.0)
    } else {
        ("unknown card: H100 SXM figures", 989.0, 3350.0)
    };
    Peaks {
        card,
        bf16_tflops,
        hbm_gbps,
    }
}

struct Out {
    dir: PathBuf,
    section: String,
    ok: bool,
}

impl Out {
    /// Prints a line and appends it to gpu-check.md at once, so a section that faults or
    /// times out keeps what it had found.
    fn line(&mut self, s: &str) {
        println!("{s}");
        let _ = append(&self.dir.join("gpu-check.md"), &format!("{s}\n"));
    }

    fn figure(&mut self, name: &str, value: serde_json::Value) {
        let rec = json!({"section": self.section, "name": name, "value": value});
        let _ = append(&self.dir.join("gpu-check.jsonl"), &format!("{rec}\n"));
    }

    fn check(&mut self, c: &gpu::Compare) {
        self.ok &= c.pass();
        let line = format!("- {c}");
        self.line(&line);
        self.figure(
            &c.what,
            json!({"rel_l2": c.rel_l2, "max_abs": c.max_abs, "ref_max": c.ref_max,
                   "tolerance": c.tolerance, "pass": c.pass(),
                   "argmax_agree": c.argmax_agree}),
        );
    }
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn main() -> Result<()> {
    let mut section = None;
    let mut dir = PathBuf::from("gpu-check-out");
    let mut layers = 8usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--section" => section = args.next(),
            "--out" => dir = args.next().map(PathBuf::from).context("--out DIR")?,
            "--layers" => layers = args.next().context("--layers N")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let section = section.context("--section NAME")?;
    std::fs::create_dir_all(&dir)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,hotprefix_engine=info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut out = Out {
        dir: dir.clone(),
        section: section.clone(),
        ok: true,
    };
    out.line(&format!("\n## {section}\n"));
    let started = Instant::now();
    let result = match section.as_str() {
        "device" => device(&mut out),
        "ops" => ops(&mut out),
        "logits" => logits(&mut out),
        "greedy" => greedy(&mut out),
        "ceilings" => ceilings(&mut out),
        "prefill" => prefill(&mut out, layers),
        "decode" => decode(&mut out, layers),
        "transfers" => transfers(&mut out, layers),
        "ttft" => ttft(&mut out, layers),
        other => Err(anyhow::anyhow!("unknown section {other:?}")),
    };
    if let Err(e) = &result {
        out.ok = false;
        out.line(&format!("- ERROR: {e:#}"));
    }
    let verdict = if out.ok { "PASS" } else { "FAIL" };
    out.line(&format!(
        "\n{section}: {verdict} in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    out.figure(
        "verdict",
        json!({"pass": out.ok, "seconds": started.elapsed().as_secs_f64()}),
    );
    if out.ok {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

fn backend(opts: CudaOptions) -> Result<CudaBackend> {
    Ok(CudaBackend::new(opts)?)
}

fn device(out: &mut Out) -> Result<()> {
    let t = Instant::now();
    let b = backend(CudaOptions::default())?;
    let d = b.device().clone();
    let (free, total) = b.memory()?;
    out.line(&format!(
        "- device: {} (compute capability {}.{}, {} multiprocessors, {:.1} GiB, {:.1} GiB free), \
         kernels compiled and loaded in {:.2} s",
        d.name,
        d.compute_capability.0,
        d.compute_capability.1,
        d.multiprocessors,
        total as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    ));
    let arch = format!(
        "compute_{}{}",
        d.compute_capability.0, d.compute_capability.1
    );
    let c = hotprefix_engine::backend::cuda::device::compile(&arch)?;
    out.line(&format!(
        "- NVRTC for {arch}: {} bytes of PTX, log: {}",
        c.ptx.len(),
        if c.log.is_empty() { "empty" } else { &c.log }
    ));
    out.figure(
        "device",
        json!({"name": d.name, "cc": [d.compute_capability.0, d.compute_capability.1],
               "sms": d.multiprocessors, "memory": total}),
    );
    Ok(())
}

fn ops(out: &mut Out) -> Result<()> {
    let mut b = backend(CudaOptions::default())?;
    for c in gpu::op_checks(&mut b)? {
        out.check(&c);
    }
    Ok(())
}

fn llama(layers: usize) -> Result<LlamaConfig> {
    let mut c = LlamaConfig::preset("llama-3.1-8b")?;
    c.layers = layers;
    Ok(c)
}

fn logits(out: &mut Out) -> Result<()> {
    let mut b = backend(CudaOptions::default())?;
    let models = [
        ("tiny", LlamaConfig::preset("tiny")?, 40, 3),
        (
            "smollm2-135m (30 layers)",
            LlamaConfig::preset("smollm2-135m")?,
            40,
            3,
        ),
        ("llama-3.1-8b shape, 2 layers", llama(2)?, 40, 2),
    ];
    // bf16 activations and KV against an f32 CPU run of the same bf16 weights.
    let tolerance = 3e-2;
    for (name, cfg, prompt, steps) in models {
        let model = LlamaModel::random(cfg, 3);
        for c in gpu::logits_check(name, model, prompt, steps, &mut b, tolerance)? {
            out.check(&c);
        }
    }
    Ok(())
}

fn greedy(out: &mut Out) -> Result<()> {
    let tiny = LlamaModel::random(LlamaConfig::preset("tiny")?, 5);
    let big = LlamaModel::random(llama(2)?, 5);
    let cpu = gpu::greedy_runs(&tiny, 256, 32, 16, || {
        Ok(hotprefix_engine::backend::cpu::CpuBackend::new())
    })?;
    let mut cases = Vec::new();
    for kv_copy in [KvCopyMode::Kernel, KvCopyMode::Memcpy] {
        for layer_overlap in [true, false] {
            cases.push(("tiny", &tiny, kv_copy, layer_overlap));
        }
    }
    cases.push((
        "llama-3.1-8b shape, 2 layers",
        &big,
        KvCopyMode::Memcpy,
        true,
    ));
    cases.push((
        "llama-3.1-8b shape, 2 layers",
        &big,
        KvCopyMode::Memcpy,
        false,
    ));
    for (name, model, kv_copy, layer_overlap) in cases {
        let opts = CudaOptions {
            kv_copy,
            layer_overlap,
            ..CudaOptions::default()
        };
        let g = gpu::greedy_runs(model, 256, 32, 16, gpu::cuda_maker(opts))?;
        let same = g.device_hit.0 == g.cold && g.host_hit.0 == g.cold;
        let served = g.device_hit.1 == 256 && g.host_hit.1 == 256;
        out.ok &= same && served;
        out.line(&format!(
            "- {} {name} ({kv_copy}, overlap {layer_overlap}): cold {:?}; device hit ({} cached) \
             {}; host hit ({} cached) {}",
            if same && served { "ok  " } else { "FAIL" },
            g.cold,
            g.device_hit.1,
            if g.device_hit.0 == g.cold {
                "same"
            } else {
                "DIFFERENT"
            },
            g.host_hit.1,
            if g.host_hit.0 == g.cold {
                "same"
            } else {
                "DIFFERENT"
            },
        ));
        if name == "tiny" && kv_copy == CudaOptions::default().kv_copy && layer_overlap {
            let agree = g
                .cold
                .iter()
                .zip(&cpu.cold)
                .take_while(|(a, b)| a == b)
                .count();
            out.line(&format!(
                "- tiny: the CUDA cold run's first {agree} of {} tokens equal the CPU backend's \
                 (bf16 rounding may change a near tie; informative, not a pass criterion)",
                g.cold.len()
            ));
        }
        out.figure(
            &format!("greedy {name} {kv_copy} overlap {layer_overlap}"),
            json!({"same": same, "served": served}),
        );
    }
    Ok(())
}

/// `rows` x `cols` activations of value 0.01 (the numbers do not matter for timing).
fn filler(
    b: &mut CudaBackend,
    rows: usize,
    cols: usize,
) -> Result<<CudaBackend as Backend>::Tensor> {
    let table = b.upload_matrix(Matrix::new(1, cols, vec![0.01; cols])?)?;
    let mut t = b.tensor(rows, cols)?;
    b.embed(&table, &vec![0u32; rows], &mut t)?;
    Ok(t)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut(&mut CudaBackend) -> Result<()>>(
    b: &mut CudaBackend,
    warm: usize,
    reps: usize,
    mut f: F,
) -> Result<f64> {
    for _ in 0..warm {
        f(b)?;
    }
    b.synchronize()?;
    let mut t = Vec::new();
    for _ in 0..reps {
        let s = Instant::now();
        f(b)?;
        b.synchronize()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn ceilings(out: &mut Out) -> Result<()> {
    let mut b = backend(CudaOptions::default())?;
    let pk = peaks(&b.device().name);
    let n = 8192;
    let w = b.upload_matrix(Matrix::new(n, n, vec![0.01; n * n])?)?;
    let x = filler(&mut b, n, n)?;
    let mut y = b.tensor(n, n)?;
    let s = time(&mut b, 2, 10, |b| Ok(b.matmul(&x, &w, &mut y)?))?;
    let tflops = 2.0 * (n as f64).powi(3) / s / 1e12;
    out.line(&format!(
        "- cuBLAS bf16 GEMM {n}^3 (bf16 in, f32 out, as the backend calls it): {:.2} ms, {tflops:.0} \
         TFLOP/s ({:.0}% of the {:.0} TFLOP/s dense bf16 spec of the {})",
        s * 1e3,
        100.0 * tflops / pk.bf16_tflops,
        pk.bf16_tflops,
        pk.card
    ));
    out.figure("gemm_tflops", json!(tflops));
    drop((x, y, w));
    let bytes = 4usize << 30;
    b.time_device_copy(bytes)?;
    let mut t = Vec::new();
    for _ in 0..5 {
        t.push(b.time_device_copy(bytes)?.as_secs_f64());
    }
    let s = median(t);
    let gbps = 2.0 * bytes as f64 / s / 1e9;
    out.line(&format!(
        "- device-to-device copy of 4 GiB: {:.2} ms, {gbps:.0} GB/s read + write ({:.0}% of the \
         {:.0} GB/s HBM spec of the {})",
        s * 1e3,
        100.0 * gbps / pk.hbm_gbps,
        pk.hbm_gbps,
        pk.card
    ));
    out.figure("hbm_copy_gbps", json!(gbps));
    Ok(())
}

/// Bytes of every weight matrix a step reads (the embedding is the tied output head).
fn weight_bytes(c: &LlamaConfig) -> f64 {
    let qd = c.heads * c.head_dim;
    let per_layer = c.hidden * qd * 2 + c.hidden * c.kv_dim() * 2 + 3 * c.hidden * c.ffn;
    2.0 * (c.layers * per_layer + c.vocab * c.hidden) as f64
}

/// Multiply-add pairs (FLOPs) of a step's matrix products for `tokens` rows and `logits` rows.
fn matmul_flops(c: &LlamaConfig, tokens: usize, logits: usize) -> f64 {
    let qd = c.heads * c.head_dim;
    let per_layer = c.hidden * qd * 2 + c.hidden * c.kv_dim() * 2 + 3 * c.hidden * c.ffn;
    2.0 * (tokens * c.layers * per_layer + logits * c.vocab * c.hidden) as f64
}

/// FLOPs of causal attention for sequences of `(start, new)` tokens.
fn attention_flops(c: &LlamaConfig, seqs: &[(usize, usize)]) -> f64 {
    let seen: usize = seqs
        .iter()
        .map(|&(s, n)| (s + 1..=s + n).sum::<usize>())
        .sum();
    4.0 * (seen * c.heads * c.head_dim * c.layers) as f64
}

fn batch(seqs: &[(usize, usize)], bs: usize) -> StepBatch {
    let mut row = 0;
    let mut slot = 0u32;
    StepBatch {
        seqs: seqs
            .iter()
            .map(|&(start, n)| {
                let blocks = (start + n).div_ceil(bs) as u32;
                let s = SeqSpan {
                    rows: row..row + n,
                    start,
                    table: (slot..slot + blocks).map(SlotId).collect(),
                };
                row += n;
                slot += blocks;
                s
            })
            .collect(),
        block_size: bs,
    }
}

fn perf_model(out: &mut Out, layers: usize) -> Result<(LlamaModel, f64)> {
    let cfg = llama(layers)?;
    let t = Instant::now();
    let model = LlamaModel::random(cfg, 9);
    let s = t.elapsed().as_secs_f64();
    let wb = weight_bytes(&model.cfg);
    out.line(&format!(
        "- model: Llama 3.1 8B shape with {layers} layers, random weights ({:.2} GB of bf16 \
         matrices; generated on the host in {s:.1} s)",
        wb / 1e9
    ));
    Ok((model, wb))
}

fn prefill(out: &mut Out, layers: usize) -> Result<()> {
    let (model, _) = perf_model(out, layers)?;
    let cfg = model.cfg.clone();
    let mut b = backend(CudaOptions::default())?;
    let dec = Decoder::new(model, &mut b)?;
    let pk = peaks(&b.device().name);
    b.allocate_kv(
        &cfg,
        KvLayout {
            block_size: 16,
            device_blocks: 1024,
            host_blocks: 0,
        },
    )?;
    for seqs in [
        vec![(0usize, 512usize); 8],
        vec![(0, 4096)],
        vec![(0, 2048); 2],
    ] {
        let st = batch(&seqs, 16);
        let tokens: Vec<u32> = (0..st.rows()).map(|i| (i % 1000) as u32).collect();
        let last: Vec<usize> = st.seqs.iter().map(|s| s.rows.end - 1).collect();
        let s = time(&mut b, 1, 3, |b| {
            dec.step(b, &tokens, &st, &last)?;
            Ok(())
        })?;
        let (mf, af) = (
            matmul_flops(&cfg, st.rows(), last.len()),
            attention_flops(&cfg, &seqs),
        );
        let tflops = (mf + af) / s / 1e12;
        let what = format!("{} x {} tokens", seqs.len(), seqs[0].1);
        out.line(&format!(
            "- prefill {what}: {:.1} ms per step, {:.0} tokens/s, {tflops:.0} TFLOP/s \
             ({:.0}% of the {:.0} TFLOP/s bf16 spec of the {}; attention is {:.0}% of the FLOPs)",
            s * 1e3,
            st.rows() as f64 / s,
            100.0 * tflops / pk.bf16_tflops,
            pk.bf16_tflops,
            pk.card,
            100.0 * af / (mf + af)
        ));
        out.figure(
            &format!("prefill {what}"),
            json!({"step_s": s, "tokens_per_s": st.rows() as f64 / s, "tflops": tflops}),
        );
    }
    Ok(())
}

fn decode(out: &mut Out, layers: usize) -> Result<()> {
    let (model, wb) = perf_model(out, layers)?;
    let cfg = model.cfg.clone();
    let mut b = backend(CudaOptions::default())?;
    let dec = Decoder::new(model, &mut b)?;
    let pk = peaks(&b.device().name);
    let ctx = 1024;
    b.allocate_kv(
        &cfg,
        KvLayout {
            block_size: 16,
            device_blocks: 128 * (ctx / 16 + 1),
            host_blocks: 0,
        },
    )?;
    let kv_per_token = kv_block_bytes(&cfg, 1, 2) as f64;
    for n in [1usize, 32, 128] {
        let seqs = vec![(ctx - 1, 1usize); n];
        let st = batch(&seqs, 16);
        let tokens = vec![7u32; n];
        let rows: Vec<usize> = (0..n).collect();
        // Greedy decoding, as the engine runs it: the argmax on the device, token ids back.
        let s = time(&mut b, 2, 10, |b| {
            dec.step_greedy(b, &tokens, &st, &rows)?;
            Ok(())
        })?;
        let bytes = wb + n as f64 * ctx as f64 * kv_per_token;
        let gbps = bytes / s / 1e9;
        out.line(&format!(
            "- decode batch {n} (context {ctx}): {:.2} ms per step, {:.0} tokens/s, {:.0} GB/s of \
             weights and KV read ({:.0}% of the {:.0} GB/s spec of the {}; greedy, token ids \
             copied back every step)",
            s * 1e3,
            n as f64 / s,
            gbps,
            100.0 * gbps / pk.hbm_gbps,
            pk.hbm_gbps,
            pk.card
        ));
        out.figure(
            &format!("decode batch {n}"),
            json!({"step_s": s, "tokens_per_s": n as f64 / s, "gbps": gbps}),
        );
    }
    Ok(())
}

fn transfers(out: &mut Out, layers: usize) -> Result<()> {
    let cfg = llama(layers)?;
    let mut b = backend(CudaOptions::default())?;
    let blocks = 2048usize;
    b.allocate_kv(
        &cfg,
        KvLayout {
            block_size: 16,
            device_blocks: 2 * blocks,
            host_blocks: 2 * blocks,
        },
    )?;
    let block = kv_block_bytes(&cfg, 16, 2) as usize;
    let bytes = blocks * block;
    // Every host block is written once before anything reads it.
    let seed = Transfer {
        id: TransferId(1),
        kind: TransferKind::Store,
        cause: TransferCause::WriteThrough,
        copies: (0..2 * blocks as u32)
            .map(|i| (SlotId(i), SlotId(i)))
            .collect(),
    };
    b.submit_transfer(seed)?;
    b.synchronize()?;
    let _ = b.poll_transfers(Duration::ZERO);
    let mut plain = Vec::new();
    for _ in 0..5 {
        plain.push(b.time_plain_load(bytes)?.as_secs_f64());
    }
    let plain = median(plain);
    let plain_gbps = bytes as f64 / plain / 1e9;
    out.line(&format!(
        "- plain pinned cuMemcpyAsync host to device of {:.2} GB: {:.2} ms, {plain_gbps:.1} GB/s \
         ({blocks} blocks of {} KiB)",
        bytes as f64 / 1e9,
        plain * 1e3,
        block / 1024
    ));
    out.figure("plain_h2d_gbps", json!(plain_gbps));
    let mut id = 10;
    for mode in [KvCopyMode::Kernel, KvCopyMode::Memcpy] {
        for per_layer in [false, true] {
            for scattered in [false, true] {
                b.set_transfer_options(mode, per_layer);
                let mut t = Vec::new();
                for _ in 0..4 {
                    id += 1;
                    let copies = (0..blocks as u32)
                        .map(|i| {
                            let src = if scattered {
                                (i * 7919) % (2 * blocks as u32)
                            } else {
                                i
                            };
                            let dst = if scattered {
                                2 * blocks as u32 - 1 - i
                            } else {
                                i
                            };
                            (SlotId(src), SlotId(dst))
                        })
                        .collect();
                    let s = Instant::now();
                    b.submit_transfer(Transfer {
                        id: TransferId(id),
                        kind: TransferKind::Load,
                        cause: TransferCause::Hit,
                        copies,
                    })?;
                    b.synchronize()?;
                    t.push(s.elapsed().as_secs_f64());
                    let _ = b.poll_transfers(Duration::ZERO);
                }
                t.remove(0);
                let s = median(t);
                let gbps = bytes as f64 / s / 1e9;
                let what = format!(
                    "{mode}, {}, {}",
                    if per_layer {
                        "per layer"
                    } else {
                        "whole blocks"
                    },
                    if scattered {
                        "scattered slots"
                    } else {
                        "contiguous slots"
                    }
                );
                out.line(&format!(
                    "- tier load ({what}): {:.2} ms, {gbps:.1} GB/s = {:.0}% of the plain copy",
                    s * 1e3,
                    100.0 * gbps / plain_gbps
                ));
                out.figure(
                    &format!("tier load {what}"),
                    json!({"gbps": gbps, "of_plain": gbps / plain_gbps}),
                );
            }
        }
    }
    Ok(())
}

/// Time to the first token of `prompt` (one new token), stepping the scheduler.
fn first_token<B: Backend>(s: &mut Scheduler<B>, prompt: Vec<u32>) -> Result<(f64, usize)> {
    let (tx, mut rx) = unbounded_channel();
    let t = Instant::now();
    s.submit(Request {
        id: "ttft".into(),
        prompt,
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop_tokens: Vec::new(),
        events: tx,
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cached = 0;
    loop {
        s.step();
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Admitted { cached_tokens } => cached = cached_tokens,
                Event::Token(_) => {
                    let ttft = t.elapsed().as_secs_f64();
                    while s.has_work() {
                        s.step();
                    }
                    s.drain_transfers();
                    return Ok((ttft, cached));
                }
                Event::Done(_) => bail!("finished without a token"),
                Event::Rejected(e) => bail!("rejected: {e}"),
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("no first token in 120 s");
        }
    }
}

fn ttft(out: &mut Out, layers: usize) -> Result<()> {
    let (model, _) = perf_model(out, layers)?;
    let prefix = 4096usize;
    let suffix = 32usize;
    let vocab = model.cfg.vocab;
    let shared: Vec<u32> = (0..prefix).map(|i| ((i * 31 + 5) % vocab) as u32).collect();
    let prompt = |k: usize| {
        let mut p = shared.clone();
        p.extend((0..suffix).map(|i| ((i * 17 + k * 101 + 3) % vocab) as u32));
        p
    };
    let blocks = ((prefix + suffix) / 16 + 8) as u32;
    let mut k = 0;
    let mut rows = String::new();
    for overlap in [false, true] {
        let mut b = backend(CudaOptions {
            layer_overlap: overlap,
            ..CudaOptions::default()
        })?;
        let dec = Decoder::new(model.clone(), &mut b)?;
        let mut cfg = SchedulerConfig::new(16, blocks, 2 * blocks, Salt(1));
        cfg.policy = PolicyKind::LruOffload;
        cfg.max_batch_tokens = 8192;
        cfg.max_running = 1;
        let mut s = Scheduler::new(cfg, dec, b, Arc::new(EngineMetrics::new("ttft")))?;
        let (mut cold, mut dev, mut host) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            // Cold: a prefix never seen before.
            k += 1;
            let unique: Vec<u32> = (0..prefix + suffix)
                .map(|i| ((i * 7 + k * 7919 + 11) % vocab) as u32)
                .collect();
            let (t, c) = first_token(&mut s, unique)?;
            if c == 0 {
                cold.push(t);
            }
            // The shared prefix in the device tier (the first time this computes it), then a
            // request that hits it there.
            k += 1;
            first_token(&mut s, prompt(k))?;
            k += 1;
            let (t, c) = first_token(&mut s, prompt(k))?;
            if c >= prefix {
                dev.push(t);
            }
            // Filling the device tier moves everything cached to the host tier; then a
            // request hits the prefix there.
            let all = s.cache_mut().allocate(blocks as usize, 0.0)?;
            s.flush_transfers();
            s.cache_mut().free(all)?;
            s.drain_transfers();
            k += 1;
            let (t, c) = first_token(&mut s, prompt(k))?;
            if c >= prefix {
                host.push(t);
            }
        }
        let m = |v: &Vec<f64>| {
            if v.is_empty() {
                f64::NAN
            } else {
                median(v.clone())
            }
        };
        let (c, d, h) = (m(&cold), m(&dev), m(&host));
        writeln!(
            rows,
            "- overlap {overlap}: cold {:.1} ms (n={}), device hit {:.1} ms (n={}), host hit \
             {:.1} ms (n={}) = {:.2}x the cold run",
            c * 1e3,
            cold.len(),
            d * 1e3,
            dev.len(),
            h * 1e3,
            host.len(),
            h / c
        )?;
        out.figure(
            &format!("ttft 4k prefix overlap {overlap}"),
            json!({"cold_s": c, "device_hit_s": d, "host_hit_s": h}),
        );
    }
    for r in rows.lines() {
        out.line(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_card_is_measured_against_its_own_figures() {
        assert_eq!(peaks("NVIDIA H200").hbm_gbps, 4800.0);
        assert_eq!(peaks("NVIDIA H100 80GB HBM3").card, "H100 SXM");
        assert_eq!(peaks("NVIDIA H100 80GB HBM3").hbm_gbps, 3350.0);
        assert_eq!(peaks("NVIDIA H100 PCIe").bf16_tflops, 756.0);
        assert_eq!(peaks("NVIDIA H100 NVL").card, "H100 NVL");
        assert_eq!(peaks("NVIDIA A100-SXM4-40GB").hbm_gbps, 1555.0);
        assert!(peaks("NVIDIA L4").card.starts_with("unknown card"));
    }
}
