//! The CPU backend: f32 matrices multiplied by `faer` on rayon's threads, attention over the
//! paged KV pools gathered per sequence, and two separate host arenas for the device and host
//! tiers with a copy thread between them, so every tier path (load, write-back, promotion)
//! runs for real and asynchronously.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use faer::{Accum, MatMut, MatRef, Par};
use hotprefix_cache::{SlotId, Transfer, TransferCause, TransferId, TransferKind};
use rayon::prelude::*;

use super::{Backend, BackendError, KvLayout, StepBatch};
use crate::model::{LlamaConfig, Matrix, RopeStyle};

/// Multiply-adds below which work runs on the calling thread (splitting it costs more than it
/// saves).
const PARALLEL_MIN_FLOPS: usize = 1 << 20;
/// Query tokens per attention tile, so score matrices stay a few megabytes however long the
/// prompt.
const ATTENTION_TILE: usize = 256;

/// Row-major activations on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuTensor {
    /// The values, row after row.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

/// One tier's blocks. Each block holds every layer's keys and values for `block_size`
/// positions (`[layer][k or v][offset][kv_dim]`) behind its own lock, so the copy thread and
/// the compute threads touch different blocks without coordinating otherwise.
#[derive(Debug, Default)]
struct Pool {
    blocks: Vec<RwLock<Vec<f32>>>,
}

impl Pool {
    fn new(blocks: usize, floats: usize) -> Result<Pool, BackendError> {
        let mut v = Vec::new();
        v.try_reserve_exact(blocks)
            .map_err(|_| BackendError::Alloc(format!("{blocks} KV blocks")))?;
        for _ in 0..blocks {
            let mut b = Vec::new();
            b.try_reserve_exact(floats)
                .map_err(|_| BackendError::Alloc(format!("{blocks} KV blocks of {floats} f32")))?;
            b.resize(floats, 0.0);
            v.push(RwLock::new(b));
        }
        Ok(Pool { blocks: v })
    }

    fn block(&self, slot: SlotId) -> Result<&RwLock<Vec<f32>>, BackendError> {
        self.blocks
            .get(slot.0 as usize)
            .ok_or_else(|| BackendError::Shape(format!("slot {} out of range", slot.0)))
    }
}

/// Both tiers' pools.
#[derive(Debug, Default)]
struct Pools {
    device: Pool,
    host: Pool,
}

impl Pools {
    /// Runs one transfer's copies.
    fn copy(&self, t: &Transfer) -> Result<(), BackendError> {
        let (src, dst) = match t.kind {
            TransferKind::Load => (&self.host, &self.device),
            TransferKind::Store => (&self.device, &self.host),
        };
        for &(s, d) in &t.copies {
            let from = src.block(s)?.read().unwrap_or_else(PoisonError::into_inner);
            let mut to = dst
                .block(d)?
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            to.copy_from_slice(&from);
        }
        Ok(())
    }
}

type Job = (Transfer, Arc<Pools>);

/// f32 compute on the host's cores.
#[derive(Debug)]
pub struct CpuBackend {
    pools: Arc<Pools>,
    kv_dim: usize,
    block_size: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// `(cos, sin)` of every position's rotation angles, `head_dim / 2` per position, grown on
    /// demand: the same angles serve every layer, head and step.
    rope_table: Vec<(f32, f32)>,
    rope_key: (u32, usize),
    jobs: Option<Sender<Job>>,
    done: Receiver<TransferId>,
    worker: Option<JoinHandle<()>>,
    in_flight: usize,
    finished: Vec<TransferId>,
    /// Gather buffers (keys, values) per sequence, reused across layers and steps: fresh
    /// megabyte-sized allocations cost a page fault per page on every layer.
    gather: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        // Closing the job channel ends the copy thread once it has drained what it holds.
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl CpuBackend {
    /// A backend with no KV pools yet (see [`Backend::allocate_kv`]).
    pub fn new() -> CpuBackend {
        let (jobs, inbox) = channel::<Job>();
        let (report, done) = channel();
        // The copy thread plays the DMA engine: it runs loads and write-back stores while the
        // scheduler computes, and reports each finished transfer. Jobs carry the pools they
        // copy between, so re-allocating the pools never races a copy of the old ones.
        let worker = std::thread::Builder::new()
            .name("kv-copy".into())
            .spawn(move || {
                while let Ok((t, pools)) = inbox.recv() {
                    // Slots come from the cache and are always in range; a failure here is a
                    // cache bug. Reporting the transfer anyway keeps requests from waiting
                    // forever on it.
                    if let Err(e) = pools.copy(&t) {
                        tracing::error!(error = %e, transfer = t.id.0, "KV copy failed");
                    }
                    if report.send(t.id).is_err() {
                        return;
                    }
                }
            })
            .ok();
        CpuBackend {
            pools: Arc::default(),
            kv_dim: 0,
            block_size: 0,
            layers: 0,
            heads: 0,
            kv_heads: 0,
            head_dim: 0,
            rope_table: Vec::new(),
            rope_key: (0, 0),
            jobs: Some(jobs),
            done,
            worker,
            in_flight: 0,
            finished: Vec::new(),
            gather: Vec::new(),
        }
    }

    /// Makes sure the rotation table covers `positions` for `base` and `head_dim`.
    fn rope_angles(&mut self, base: f32, head_dim: usize, positions: usize) {
        let half = head_dim / 2;
        if self.rope_key != (base.to_bits(), head_dim) {
            self.rope_table.clear();
            self.rope_key = (base.to_bits(), head_dim);
        }
        let have = self.rope_table.len() / half.max(1);
        for pos in have..positions {
            for i in 0..half {
                // The same expression as `model::rope`, so both give identical rotations.
                let theta = pos as f32 * base.powf(-((2 * i) as f32) / head_dim as f32);
                let (s, c) = theta.sin_cos();
                self.rope_table.push((c, s));
            }
        }
    }

    /// Offset of `(layer, k or v, offset)` inside a block.
    fn kv_offset(&self, layer: usize, value: bool, offset: usize) -> usize {
        ((layer * 2 + usize::from(value)) * self.block_size + offset) * self.kv_dim
    }
}

fn shape(what: &str, ok: bool) -> Result<(), BackendError> {
    if ok {
        Ok(())
    } else {
        Err(BackendError::Shape(what.to_string()))
    }
}

/// `out = a * b` on the calling thread, or split by output columns over rayon's threads when
/// it is big enough to pay for it. Every piece runs `faer` single-threaded: `faer`'s own
/// parallel mode keeps worker threads spinning between calls, which on a small machine starved
/// the rayon tasks that attention runs right after (measured: a 10 us attention tile waited
/// 100 us and more). Splitting by columns leaves every output element's sum in the same order,
/// so the numbers do not depend on the split.
fn product(a: MatRef<'_, f32>, b: MatRef<'_, f32>, out: MatMut<'_, f32>, parallel: bool) {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    let pieces = rayon::current_num_threads();
    if !parallel || pieces < 2 || n < 32 || m * k * n < PARALLEL_MIN_FLOPS {
        faer::linalg::matmul::matmul(out, Accum::Replace, a, b, 1.0, Par::Seq);
        return;
    }
    split_columns(a, b, out, n.div_ceil(pieces).next_multiple_of(16));
}

fn split_columns(a: MatRef<'_, f32>, b: MatRef<'_, f32>, out: MatMut<'_, f32>, width: usize) {
    let n = b.ncols();
    if n <= width {
        faer::linalg::matmul::matmul(out, Accum::Replace, a, b, 1.0, Par::Seq);
        return;
    }
    let mid = (n / 2).next_multiple_of(16).min(n - 1).max(1);
    let (ol, or) = out.split_at_col_mut(mid);
    let (bl, br) = b.split_at_col(mid);
    rayon::join(
        || split_columns(a, bl, ol, width),
        || split_columns(a, br, or, width),
    );
}

/// `out[m, n] = a[m, k] * b[k, n]`, row-major `a` and `out`, `b` any view. `faer` takes a
/// different (matrix-vector) path for a single row, whose rounding differs from the path for two
/// or more; a single row is therefore computed as two, so a row's result never depends on how
/// many rows share the call (a sequence batched with others gets exactly the numbers it gets
/// alone, and a cache hit exactly those of a cold run).
fn matmul_rows(a: &[f32], m: usize, k: usize, b: MatRef<'_, f32>, out: &mut [f32], parallel: bool) {
    let n = b.ncols();
    if m == 1 {
        let mut a2 = Vec::with_capacity(2 * k);
        a2.extend_from_slice(a);
        a2.extend_from_slice(a);
        let mut o2 = vec![0f32; 2 * n];
        matmul_rows(&a2, 2, k, b, &mut o2, parallel);
        out.copy_from_slice(&o2[..n]);
        return;
    }
    let am = MatRef::from_row_major_slice(a, m, k);
    let om = MatMut::from_row_major_slice_mut(out, m, n);
    product(am, b, om, parallel);
}

/// `e^x` to within a few f32 ulps, written so the compiler vectorises it. Calling libm's
/// `expf` once per element made attention softmax and SiLU the slowest part of a long prefill
/// on this machine (measured: about 50 times slower per element than this loop).
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    // Plain comparisons (not `clamp`) and no float-to-int cast keep the loop vectorisable.
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    // e^r on [-ln2/2, ln2/2]: Taylor to the 7th power, error below 2e-8 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^k: adding 2^23 puts the integer k + 127 in the low mantissa bits; shifting them into
    // the exponent field builds the power of two.
    let scale = f32::from_bits((k + (127.0 + 8_388_608.0)).to_bits() << 23);
    p * scale
}

/// Largest value, in eight independent lanes so the loop vectorises (`f32::max` keeps NaN
/// semantics the vector instruction lacks, which would keep the loop scalar).
#[inline(always)]
fn max8(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    tail.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sum in eight independent lanes, for the same reason.
#[inline(always)]
fn sum8(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Softmax of `scale * v`, in place. Each pass is a separate loop with no carried dependency
/// so that all three vectorise; a combined exp-and-sum loop stays scalar.
#[inline(always)]
fn softmax_scaled(v: &mut [f32], scale: f32) {
    let m = max8(v);
    for x in v.iter_mut() {
        *x = exp_fast((*x - m) * scale);
    }
    let inv = 1.0 / sum8(v);
    for x in v.iter_mut() {
        *x *= inv;
    }
}

/// Causal softmax of one attention tile's scores, rows of `ctx` positions, `group` query heads
/// per token. Run through [`pulp::Arch::dispatch`] so that the loops, all inlined into it, are
/// compiled for the widest vector instructions this CPU has (AVX2 and FMA on x86-64) instead of
/// the SSE2 baseline: measured, the exponentials of a short step over a long context were a
/// fifth of its time at SSE2 width. Only plain IEEE operations are used (no fused
/// multiply-add contraction), so the result is the same whichever instruction set runs it.
struct CausalSoftmax<'a> {
    scores: &'a mut [f32],
    ctx: usize,
    /// Position of the tile's first token.
    first_pos: usize,
    group: usize,
    scale: f32,
}

impl pulp::WithSimd for CausalSoftmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        for (r, row) in self.scores.chunks_exact_mut(self.ctx).enumerate() {
            // Causal: a token sees its own position and everything before it.
            let pos = self.first_pos + r / self.group;
            let (seen, future) = row.split_at_mut(pos + 1);
            softmax_scaled(seen, self.scale);
            future.fill(0.0);
        }
    }
}

/// `gate = silu(gate) * up`, dispatched like [`CausalSoftmax`] for the same reason.
struct SiluMul<'a> {
    gate: &'a mut [f32],
    up: &'a [f32],
}

impl pulp::WithSimd for SiluMul<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        for (g, &u) in self.gate.iter_mut().zip(self.up) {
            *g = *g / (1.0 + exp_fast(-*g)) * u;
        }
    }
}

thread_local! {
    /// Each compute thread's attention score buffer, reused across tiles, layers and steps.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One unit of attention work: a tile of one sequence's query tokens, one KV head.
struct AttnTask {
    seq: usize,
    kv_head: usize,
    /// Token range of the sequence's new tokens in this tile.
    tokens: std::ops::Range<usize>,
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = Matrix;
    type Vector = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload_matrix(&mut self, m: Matrix) -> Result<Matrix, BackendError> {
        Ok(m)
    }

    fn upload_vector(&mut self, v: Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(v)
    }

    fn tensor(&mut self, rows: usize, cols: usize) -> Result<CpuTensor, BackendError> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| BackendError::Alloc(format!("{rows} x {cols} tensor")))?;
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; len],
        })
    }

    fn embed(
        &mut self,
        table: &Matrix,
        tokens: &[u32],
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        shape(
            "embed output",
            out.rows == tokens.len() && out.cols == table.cols(),
        )?;
        for (row, &t) in out.data.chunks_exact_mut(table.cols()).zip(tokens) {
            let t = t as usize;
            if t >= table.rows() {
                return Err(BackendError::Shape(format!(
                    "token {t} outside the vocabulary of {}",
                    table.rows()
                )));
            }
            row.copy_from_slice(&table.data()[t * table.cols()..(t + 1) * table.cols()]);
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &CpuTensor,
        w: &Vec<f32>,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        shape(
            "rms_norm",
            x.cols == w.len() && out.cols == x.cols && out.rows == x.rows,
        )?;
        let norm = |(row, o): (&[f32], &mut [f32])| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &xi), &wi) in o.iter_mut().zip(row).zip(w.iter()) {
                *o = xi * inv * wi;
            }
        };
        if x.data.len() >= PARALLEL_MIN_FLOPS / 8 {
            x.data
                .par_chunks_exact(x.cols)
                .zip(out.data.par_chunks_exact_mut(x.cols))
                .for_each(norm);
        } else {
            x.data
                .chunks_exact(x.cols)
                .zip(out.data.chunks_exact_mut(x.cols))
                .for_each(norm);
        }
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &CpuTensor,
        w: &Matrix,
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        shape(
            "matmul",
            x.cols == w.cols() && out.rows == x.rows && out.cols == w.rows(),
        )?;
        if x.rows == 0 {
            return Ok(());
        }
        let wm = MatRef::from_row_major_slice(w.data(), w.rows(), w.cols());
        matmul_rows(&x.data, x.rows, x.cols, wm.transpose(), &mut out.data, true);
        Ok(())
    }

    fn add_bias(&mut self, x: &mut CpuTensor, b: &Vec<f32>) -> Result<(), BackendError> {
        shape("bias", x.cols == b.len())?;
        for row in x.data.chunks_exact_mut(x.cols) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn rope(
        &mut self,
        x: &mut CpuTensor,
        batch: &StepBatch,
        head_dim: usize,
        base: f32,
        style: RopeStyle,
    ) -> Result<(), BackendError> {
        let positions = batch.positions();
        shape(
            "rope",
            positions.len() == x.rows
                && head_dim.is_multiple_of(2)
                && x.cols.is_multiple_of(head_dim),
        )?;
        let max = positions.iter().copied().max().map_or(0, |p| p + 1);
        self.rope_angles(base, head_dim, max);
        let half = head_dim / 2;
        let table = &self.rope_table;
        for (row, &pos) in x.data.chunks_exact_mut(x.cols).zip(&positions) {
            let angles = &table[pos * half..(pos + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(c, s)) in angles.iter().enumerate() {
                    let (ia, ib) = match style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::HalfSplit => (i, i + half),
                    };
                    let (a, b) = (head[ia], head[ib]);
                    head[ia] = a * c - b * s;
                    head[ib] = a * s + b * c;
                }
            }
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<(), BackendError> {
        shape("silu_mul", gate.data.len() == up.data.len())?;
        pulp::Arch::new().dispatch(SiluMul {
            gate: &mut gate.data,
            up: &up.data,
        });
        Ok(())
    }

    fn add(&mut self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), BackendError> {
        shape("add", x.data.len() == y.data.len())?;
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn write_kv(
        &mut self,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        batch: &StepBatch,
    ) -> Result<(), BackendError> {
        shape(
            "write_kv",
            k.cols == self.kv_dim
                && v.cols == self.kv_dim
                && k.rows == batch.rows()
                && v.rows == k.rows
                && layer < self.layers
                && batch.block_size == self.block_size,
        )?;
        let d = self.kv_dim;
        for s in &batch.seqs {
            for (i, row) in s.rows.clone().enumerate() {
                let pos = s.start + i;
                let slot = s.table[pos / self.block_size];
                let off = pos % self.block_size;
                let mut b = self
                    .pools
                    .device
                    .block(slot)?
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                let ko = self.kv_offset(layer, false, off);
                b[ko..ko + d].copy_from_slice(&k.data[row * d..(row + 1) * d]);
                let vo = self.kv_offset(layer, true, off);
                b[vo..vo + d].copy_from_slice(&v.data[row * d..(row + 1) * d]);
            }
        }
        Ok(())
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &CpuTensor,
        batch: &StepBatch,
        out: &mut CpuTensor,
    ) -> Result<(), BackendError> {
        let (hd, d, group) = (
            self.head_dim,
            self.kv_dim,
            self.heads / self.kv_heads.max(1),
        );
        let qd = self.heads * hd;
        shape(
            "attention",
            q.cols == qd
                && out.cols == qd
                && q.rows == batch.rows()
                && out.rows == q.rows
                && layer < self.layers
                && batch.block_size == self.block_size,
        )?;
        batch.validate()?;
        // Gather each sequence's keys and values for this layer into contiguous rows: one
        // pass over its blocks, after which every head's products are plain matrix products.
        let bs = self.block_size;
        let pools = &self.pools;
        let (ko, vo) = (
            self.kv_offset(layer, false, 0),
            self.kv_offset(layer, true, 0),
        );
        let mut gathered = std::mem::take(&mut self.gather);
        gathered.resize_with(batch.seqs.len().max(gathered.len()), Default::default);
        gathered
            .par_iter_mut()
            .zip(batch.seqs.par_iter())
            .try_for_each(|((kg, vg), s)| {
                let ctx = s.start + s.rows.len();
                // Every element below `ctx * d` is overwritten by the copy.
                kg.resize(ctx * d, 0.0);
                vg.resize(ctx * d, 0.0);
                // Blocks are copied in parallel: for a long context this copy is a
                // noticeable share of a short step.
                kg.par_chunks_mut(bs * d)
                    .zip(vg.par_chunks_mut(bs * d))
                    .zip(s.table.par_iter())
                    .try_for_each(|((kc, vc), &slot)| {
                        let n = kc.len();
                        let b = pools
                            .device
                            .block(slot)?
                            .read()
                            .unwrap_or_else(PoisonError::into_inner);
                        kc.copy_from_slice(&b[ko..ko + n]);
                        vc.copy_from_slice(&b[vo..vo + n]);
                        Ok::<_, BackendError>(())
                    })
            })?;
        // Tiles of query tokens per KV head: small enough that a short step still yields a
        // task per core, large enough that each cached key is reused across many queries.
        let threads = rayon::current_num_threads().max(1);
        let mut tasks = Vec::new();
        for (si, s) in batch.seqs.iter().enumerate() {
            let n = s.rows.len();
            let per_head = (2 * threads).div_ceil(self.kv_heads * batch.seqs.len());
            let tile = n.div_ceil(per_head.max(1)).clamp(8, ATTENTION_TILE);
            for t0 in (0..n).step_by(tile) {
                for kv_head in 0..self.kv_heads {
                    tasks.push(AttnTask {
                        seq: si,
                        kv_head,
                        tokens: t0..(t0 + tile).min(n),
                    });
                }
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|task| {
                let s = &batch.seqs[task.seq];
                let (kg, vg) = &gathered[task.seq];
                // Causal: the tile's last token sees positions up to its own, nothing later.
                let ctx = s.start + task.tokens.end;
                let m = task.tokens.len() * group;
                // Queries of the group's heads, one row per (token, head), contiguous.
                let mut qg = Vec::with_capacity(m * hd);
                for t in task.tokens.clone() {
                    let row = s.rows.start + t;
                    let at = row * qd + task.kv_head * group * hd;
                    qg.extend_from_slice(&q.data[at..at + group * hd]);
                }
                let kh = &kg[task.kv_head * hd..];
                let vh = &vg[task.kv_head * hd..];
                let kv = MatRef::from_row_major_slice_with_stride(kh, ctx, hd, d);
                let vv = MatRef::from_row_major_slice_with_stride(vh, ctx, hd, d);
                let mut scores = SCORES.with_borrow_mut(std::mem::take);
                scores.clear();
                scores.resize(m * ctx, 0.0);
                // Tiles run in parallel already, so each product stays on its thread.
                matmul_rows(&qg, m, hd, kv.transpose(), &mut scores, false);
                pulp::Arch::new().dispatch(CausalSoftmax {
                    scores: &mut scores,
                    ctx,
                    first_pos: s.start + task.tokens.start,
                    group,
                    scale,
                });
                let mut o = vec![0f32; m * hd];
                matmul_rows(&scores, m, ctx, vv, &mut o, false);
                SCORES.with_borrow_mut(|b| *b = scores);
                o
            })
            .collect();
        for (task, o) in tasks.iter().zip(results) {
            let s = &batch.seqs[task.seq];
            for (i, t) in task.tokens.clone().enumerate() {
                let row = s.rows.start + t;
                let at = row * qd + task.kv_head * group * hd;
                out.data[at..at + group * hd]
                    .copy_from_slice(&o[i * group * hd..(i + 1) * group * hd]);
            }
        }
        self.gather = gathered;
        Ok(())
    }

    fn select_rows(&mut self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor, BackendError> {
        shape("select_rows", rows.iter().all(|&r| r < x.rows))?;
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor {
            rows: rows.len(),
            cols: x.cols,
            data,
        })
    }

    fn to_host(&mut self, x: &CpuTensor) -> Result<Vec<f32>, BackendError> {
        Ok(x.data.clone())
    }

    fn allocate_kv(&mut self, cfg: &LlamaConfig, layout: KvLayout) -> Result<(), BackendError> {
        let floats = 2 * cfg.layers * layout.block_size * cfg.kv_dim();
        self.pools = Arc::new(Pools {
            device: Pool::new(layout.device_blocks, floats)?,
            host: Pool::new(layout.host_blocks, floats)?,
        });
        self.kv_dim = cfg.kv_dim();
        self.block_size = layout.block_size;
        self.layers = cfg.layers;
        self.heads = cfg.heads;
        self.kv_heads = cfg.kv_heads;
        self.head_dim = cfg.head_dim;
        Ok(())
    }

    fn submit_transfer(&mut self, t: Transfer) -> Result<(), BackendError> {
        if t.kind == TransferKind::Store && t.cause == TransferCause::Eviction {
            // The source slots are already free in the cache: copy before anything can
            // write them.
            self.pools.copy(&t)?;
            self.finished.push(t.id);
            return Ok(());
        }
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| BackendError::Unavailable("the copy thread has stopped".into()))?;
        if self.worker.is_none() {
            // No copy thread could be started: copy inline.
            self.pools.copy(&t)?;
            self.finished.push(t.id);
            return Ok(());
        }
        let id = t.id;
        match jobs.send((t, Arc::clone(&self.pools))) {
            Ok(()) => self.in_flight += 1,
            Err(e) => {
                let (t, _) = e.0;
                self.pools.copy(&t)?;
                self.finished.push(id);
            }
        }
        Ok(())
    }

    fn poll_transfers(&mut self, wait: Duration) -> Vec<TransferId> {
        let mut out = std::mem::take(&mut self.finished);
        let before = out.len();
        while let Ok(id) = self.done.try_recv() {
            out.push(id);
        }
        if out.is_empty() && self.in_flight > 0 && !wait.is_zero() {
            match self.done.recv_timeout(wait) {
                Ok(id) => out.push(id),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
        }
        self.in_flight -= (out.len() - before).min(self.in_flight);
        out
    }

    fn transfers_in_flight(&self) -> usize {
        self.in_flight + self.finished.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_matches_libm_to_a_few_ulps() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (175.0 / 200_000.0);
            let (a, b) = (exp_fast(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(
            exp_fast(f32::NEG_INFINITY),
            (-87f32).exp().max(exp_fast(-87.0))
        );
    }
}
