//! The CUDA backend: bf16 weights and KV, f32 activations and accumulation, matrix products
//! through cuBLAS, every other operation an NVRTC kernel from `kernels/`, the device tier one
//! block pool in device memory and the host tier one pinned arena, with tier copies on their
//! own streams overlapped with compute layer by layer.
//!
//! Streams and ordering. Compute (kernels and cuBLAS) runs on one stream in the decoder's
//! program order. Loads (host to device) run on their own stream after waiting for the compute
//! stream's work so far (so a slot being loaded into is no longer read); stores (device to host)
//! run on a third stream after waiting for compute (so they see every write of the slots they
//! read) and for the load stream (so a host slot a load still reads is never overwritten).
//! An eviction store makes the compute stream wait for it, because the cache has already handed
//! its source slots to someone else. With layer-wise overlap on, a load is reported finished
//! as soon as it is queued: the cache marks the blocks ready, the request runs, and the compute
//! stream waits for the load's per-layer event before the first kernel that touches that layer
//! of the pool (`write_kv`), so layer l + 1 is copied while layer l computes.
//!
//! Tensors carry an f32 buffer and a bf16 copy: the kernels whose output feeds a matrix product
//! (RMSNorm, SiLU-and-mul, attention) write both, so cuBLAS reads bf16 with no conversion
//! pass; any other writer marks the copy stale and a product refreshes it first.
//!
//! Numbers are not bit-identical to the CPU backend's (bf16 rounding; cuBLAS picks its kernels by
//! shape, so a row's result can depend on how many rows share its product). A request computed
//! with the same step shapes gets the same tokens whether its prefix comes from a cold prefill,
//! the device tier or the host tier, since cached KV is exactly what the cold run stored.

pub mod device;
pub mod plan;

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use hotprefix_cache::{Transfer, TransferCause, TransferId, TransferKind};
use hotprefix_kernels::{MMA_THREADS, mma_smem_bytes, simple_smem_bytes};
use rayon::prelude::*;

use self::device::{Arg, DeviceInfo, PinnedArena, device_error, launch};
use self::plan::{AttentionChoice, AttentionKernel, AttentionPlan, AttentionShape, StepPlan};
use super::{Backend, BackendError, KvLayout, StepBatch};
use crate::model::{LlamaConfig, Matrix, RopeStyle};

/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

/// How tier copies move their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCopyMode {
    /// The `hp_kv_copy` kernel on the copy stream, reading or writing the pinned arena in place
    /// through its device mapping: one launch per transfer (per layer with overlap) however
    /// scattered the blocks are.
    Kernel,
    /// One `cuMemcpyAsync` per block (per layer chunk with overlap), adjacent blocks merged.
    Memcpy,
}

impl FromStr for KvCopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(KvCopyMode::Kernel),
            "memcpy" => Ok(KvCopyMode::Memcpy),
            other => Err(format!(
                "unknown KV copy mode {other:?}; expected kernel or memcpy"
            )),
        }
    }
}

impl fmt::Display for KvCopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvCopyMode::Kernel => "kernel",
            KvCopyMode::Memcpy => "memcpy",
        })
    }
}

impl FromStr for AttentionChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AttentionChoice::Auto),
            "simple" => Ok(AttentionChoice::Simple),
            "mma" => Ok(AttentionChoice::Mma),
            other => Err(format!(
                "unknown attention kernel {other:?}; expected auto, simple or mma"
            )),
        }
    }
}

impl fmt::Display for AttentionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttentionChoice::Auto => "auto",
            AttentionChoice::Simple => "simple",
            AttentionChoice::Mma => "mma",
        })
    }
}

/// The CUDA backend's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// Which attention kernel runs.
    pub attention: AttentionChoice,
    /// How tier copies move bytes.
    pub kv_copy: KvCopyMode,
    /// Whether host-tier loads overlap with compute layer by layer.
    pub layer_overlap: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            attention: AttentionChoice::Auto,
            // The copy engines, as the design asks: they move bytes without taking
            // multiprocessors from the compute the loads overlap with. The copy kernel stays
            // selectable; the GPU check's `transfers` and `greedy` sections measure both.
            kv_copy: KvCopyMode::Memcpy,
            layer_overlap: true,
        }
    }
}

/// Activations on the device: f32 values and their bf16 copy.
pub struct CudaTensor {
    rows: usize,
    cols: usize,
    f: CudaSlice<f32>,
    b: CudaSlice<u16>,
    /// Whether `b` holds the current values of `f`.
    fresh: Cell<bool>,
}

impl fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaTensor")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// A weight matrix in bf16, row-major.
#[derive(Debug)]
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    w: CudaSlice<u16>,
}

/// A weight vector in f32.
#[derive(Debug)]
pub struct CudaVector {
    len: usize,
    v: CudaSlice<f32>,
}

/// The kernels, loaded from the compiled module.
#[derive(Debug)]
struct Kernels {
    embed: CudaFunction,
    rms_norm: CudaFunction,
    add_bias: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    add: CudaFunction,
    to_bf16: CudaFunction,
    gather_rows: CudaFunction,
    argmax: CudaFunction,
    write_kv: CudaFunction,
    kv_copy: CudaFunction,
    attention_simple: CudaFunction,
    attention_mma: CudaFunction,
    attention_combine: CudaFunction,
}

/// The KV pools' shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KvGeometry {
    block_size: usize,
    layers: usize,
    kv_dim: usize,
    shape: AttentionShape,
    device_blocks: usize,
    host_blocks: usize,
}

impl KvGeometry {
    /// bf16 values per block (every layer's keys and values).
    fn block_elems(&self) -> usize {
        2 * self.layers * self.block_size * self.kv_dim
    }
    /// Bytes per block.
    fn block_bytes(&self) -> usize {
        2 * self.block_elems()
    }
}

/// The metadata of the step being run, on the device.
#[derive(Debug)]
struct Uploaded {
    key: StepBatch,
    /// Every device slot the step's kernels read or write.
    slots: std::collections::HashSet<u32>,
    buf: CudaSlice<u32>,
    offs: [usize; 5],
    attention: AttentionPlan,
    rows: usize,
}

/// A transfer on a copy stream.
#[derive(Debug)]
struct InFlight {
    id: TransferId,
    /// Recorded after the whole copy.
    done: CudaEvent,
    /// Loads with layer-wise overlap: recorded after each layer's copy.
    layers: Vec<CudaEvent>,
    /// Loads: the device slots written.
    slots: Vec<u32>,
    /// Already reported by `poll_transfers` (early, for overlapped loads).
    reported: bool,
}

/// A cuBLAS handle bound to the compute stream. Its own type, rather than cudarc's `CudaBlas`,
/// because that one unwraps the result of destroying the handle, which fails after a device
/// fault and would turn a reported error into an abort while unwinding.
#[derive(Debug)]
struct BlasHandle(blas_sys::cublasHandle_t);

// SAFETY: the handle is used only through `&mut CudaBackend` (one thread at a time) and cuBLAS
// handles may move between threads.
unsafe impl Send for BlasHandle {}

impl BlasHandle {
    fn new(stream: &CudaStream) -> Result<BlasHandle, BackendError> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| device_error("binding the CUDA context", e))?;
        let h = blas::create_handle().map_err(|e| device_error("cuBLAS", e))?;
        // SAFETY: `h` is a live handle; the stream outlives it (the handle is the backend's
        // first field, so it is dropped before the stream).
        unsafe { blas::set_stream(h, stream.cu_stream() as _) }.map_err(|e| {
            // SAFETY: `h` is live and not used after this.
            let _ = unsafe { blas::destroy_handle(h) };
            device_error("cuBLAS stream", e)
        })?;
        Ok(BlasHandle(h))
    }
}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and destroyed once; an error (after a device fault) is
        // ignored, there being nothing left to do with it.
        let _ = unsafe { blas::destroy_handle(self.0) };
    }
}

/// NVIDIA GPU compute.
pub struct CudaBackend {
    // Fields drop in declaration order: the cuBLAS handle goes first, while the compute stream
    // it is bound to (`compute`, possibly its last owner) still exists.
    blas: BlasHandle,
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    opts: CudaOptions,
    compute: Arc<CudaStream>,
    h2d: Arc<CudaStream>,
    d2h: Arc<CudaStream>,
    k: Kernels,
    geo: Option<KvGeometry>,
    pool: Option<CudaSlice<u16>>,
    host: Option<PinnedArena>,
    step: Option<Uploaded>,
    inv_freq: Option<((u32, usize), CudaSlice<f32>)>,
    partial: Option<CudaSlice<f32>>,
    inflight: Vec<InFlight>,
    finished: Vec<TransferId>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.info)
            .field("options", &self.opts)
            .field("kv", &self.geo)
            .field("in_flight", &self.inflight.len())
            .finish()
    }
}

/// Converts f32 values to bf16 words, rounding to nearest even (as the kernels' `cvt.rn`).
pub fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.par_iter()
        .with_min_len(1 << 16)
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

fn grid_1d(n: u64) -> u32 {
    // Grid-stride kernels: enough blocks to fill the device, never more than the work.
    n.div_ceil(u64::from(THREADS)).clamp(1, 65_535) as u32
}

fn shape(what: &str, ok: bool) -> Result<(), BackendError> {
    if ok {
        Ok(())
    } else {
        Err(BackendError::Shape(what.to_string()))
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| BackendError::Shape(format!("{what} {v} exceeds i32")))
}

impl CudaBackend {
    /// Opens GPU 0 and compiles the kernels for it. Fails with [`BackendError::Unavailable`]
    /// when no usable GPU or CUDA library is found (the caller decides whether to fall back).
    pub fn new(opts: CudaOptions) -> Result<CudaBackend, BackendError> {
        let (ctx, info) = device::probe().map_err(BackendError::Unavailable)?;
        // SAFETY: the backend orders its streams itself (events between compute and the copy
        // streams, described in the module docs); cudarc's per-buffer event tracking would
        // add an event record to every launch and is not needed.
        unsafe { ctx.disable_event_tracking() };
        // Compute gets the highest priority and the copy streams the lowest, so a copy kernel
        // waiting on PCIe never holds a multiprocessor a compute kernel could use.
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(|e| device_error("stream priorities", e))?;
        let compute = ctx
            .new_stream_with_priority(greatest)
            .map_err(|e| device_error("creating the compute stream", e))?;
        let h2d = ctx
            .new_stream_with_priority(least)
            .map_err(|e| device_error("creating the load stream", e))?;
        let d2h = ctx
            .new_stream_with_priority(least)
            .map_err(|e| device_error("creating the store stream", e))?;
        let blas = BlasHandle::new(&compute)?;
        let started = Instant::now();
        let module = load_kernels(&ctx, &info)?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| device_error(&format!("kernel {name}"), e))
        };
        let k = Kernels {
            embed: f("hp_embed")?,
            rms_norm: f("hp_rms_norm")?,
            add_bias: f("hp_add_bias")?,
            rope: f("hp_rope")?,
            silu_mul: f("hp_silu_mul")?,
            add: f("hp_add")?,
            to_bf16: f("hp_to_bf16")?,
            gather_rows: f("hp_gather_rows")?,
            argmax: f("hp_argmax")?,
            write_kv: f("hp_write_kv")?,
            kv_copy: f("hp_kv_copy")?,
            attention_simple: f("hp_attention_simple")?,
            attention_mma: f("hp_attention_mma")?,
            attention_combine: f("hp_attention_combine")?,
        };
        keep_pool_memory(&ctx)?;
        tracing::info!(
            device = %info.name,
            compute_capability = %format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
            multiprocessors = info.multiprocessors,
            memory_gib = info.total_memory as f64 / (1u64 << 30) as f64,
            kernels_ready_s = started.elapsed().as_secs_f64(),
            attention = %opts.attention,
            kv_copy = %opts.kv_copy,
            layer_overlap = opts.layer_overlap,
            "CUDA backend ready"
        );
        Ok(CudaBackend {
            ctx,
            info,
            opts,
            compute,
            h2d,
            d2h,
            blas,
            k,
            geo: None,
            pool: None,
            host: None,
            step: None,
            inv_freq: None,
            partial: None,
            inflight: Vec::new(),
            finished: Vec::new(),
        })
    }

    /// The device.
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// The options it runs with.
    pub fn options(&self) -> CudaOptions {
        self.opts
    }

    /// Changes how later transfers copy and overlap (benchmarks compare the modes).
    pub fn set_transfer_options(&mut self, kv_copy: KvCopyMode, layer_overlap: bool) {
        self.opts.kv_copy = kv_copy;
        self.opts.layer_overlap = layer_overlap;
    }

    /// Changes the attention kernel choice for later steps.
    pub fn set_attention(&mut self, choice: AttentionChoice) {
        self.opts.attention = choice;
        self.step = None;
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize), BackendError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| device_error("querying device memory", e))
    }

    /// Waits until every stream is idle.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        for s in [&self.compute, &self.h2d, &self.d2h] {
            s.synchronize()
                .map_err(|e| device_error("synchronizing", e))?;
        }
        Ok(())
    }

    /// Time of one plain `cuMemcpyAsync` of `bytes` from the pinned host arena into the device
    /// pool, start to finish: the yardstick tier loads are measured against.
    pub fn time_plain_load(&self, bytes: usize) -> Result<Duration, BackendError> {
        let (Some(host), Some(pool)) = (&self.host, &self.pool) else {
            return Err(BackendError::Shape("KV pools not allocated".into()));
        };
        let bytes = bytes.min(host.bytes()).min(pool.num_bytes());
        self.synchronize()?;
        let (dst, _g) = pool.device_ptr(&self.h2d);
        let started = Instant::now();
        // SAFETY: both ranges lie inside allocations the backend owns; nothing else runs.
        let r = unsafe {
            cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                dst,
                host.host_ptr(),
                bytes,
                self.h2d.cu_stream(),
            )
        };
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            return Err(device_error("plain pinned copy", r));
        }
        self.h2d
            .synchronize()
            .map_err(|e| device_error("synchronizing", e))?;
        Ok(started.elapsed())
    }

    /// Time of one device-to-device copy of `bytes` (reads and writes `bytes` each): the
    /// device memory's practical bandwidth.
    pub fn time_device_copy(&self, bytes: usize) -> Result<Duration, BackendError> {
        let n = bytes / 4;
        let src = self
            .compute
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| BackendError::Alloc(format!("{bytes} bytes: {e:?}")))?;
        let mut dst = self
            .compute
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| BackendError::Alloc(format!("{bytes} bytes: {e:?}")))?;
        self.compute
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| device_error("copy", e))?;
        self.synchronize()?;
        let started = Instant::now();
        self.compute
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| device_error("copy", e))?;
        self.synchronize()?;
        Ok(started.elapsed())
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, BackendError> {
        // SAFETY: every caller writes the buffer (by a copy or a kernel) before reading it.
        unsafe { self.compute.alloc::<T>(n.max(1)) }.map_err(|e| {
            BackendError::Alloc(format!(
                "{n} x {} bytes of device memory: {e:?}",
                std::mem::size_of::<T>()
            ))
        })
    }

    /// Copies `v` into a new device buffer on `stream`.
    fn upload_u32(
        &self,
        stream: &Arc<CudaStream>,
        v: &[u32],
    ) -> Result<CudaSlice<u32>, BackendError> {
        // SAFETY: the buffer is filled by the copy right after.
        let mut buf = unsafe { stream.alloc::<u32>(v.len().max(1)) }
            .map_err(|e| BackendError::Alloc(format!("{} words: {e:?}", v.len())))?;
        if !v.is_empty() {
            stream
                .memcpy_htod(v, &mut buf)
                .map_err(|e| device_error("uploading step metadata", e))?;
        }
        Ok(buf)
    }

    fn geometry(&self) -> Result<KvGeometry, BackendError> {
        self.geo
            .ok_or_else(|| BackendError::Shape("KV pools not allocated".into()))
    }

    /// Makes sure the device holds `batch`'s metadata (once per step: the decoder passes the
    /// same batch to every layer).
    fn ensure_step(&mut self, batch: &StepBatch) -> Result<(), BackendError> {
        if self.step.as_ref().is_some_and(|u| &u.key == batch) {
            return Ok(());
        }
        let geo = self.geometry()?;
        shape("batch block size", batch.block_size == geo.block_size)?;
        plan::check_slots(batch, geo.device_blocks)?;
        let plan: StepPlan = plan::plan_step(
            batch,
            geo.shape,
            self.opts.attention,
            self.info.multiprocessors,
        )?;
        let (words, offs) = plan.packed();
        let buf = self.upload_u32(&self.compute, &words)?;
        self.step = Some(Uploaded {
            slots: plan.tables.iter().copied().collect(),
            key: batch.clone(),
            buf,
            offs,
            rows: batch.rows(),
            attention: plan.attention,
        });
        Ok(())
    }

    /// Device address of word `i` of the step's metadata array `which` (see
    /// [`StepPlan::packed`]).
    fn step_ptr(&self, which: usize) -> Result<CUdeviceptr, BackendError> {
        let u = self
            .step
            .as_ref()
            .ok_or_else(|| BackendError::Shape("no step uploaded".into()))?;
        Ok(ptr(&u.buf, &self.compute) + (u.offs[which] * 4) as u64)
    }

    /// The bf16 copy of `x`, refreshed first if stale.
    fn bf16_ptr(&self, x: &CudaTensor) -> Result<CUdeviceptr, BackendError> {
        let n = (x.rows * x.cols) as u64;
        if !x.fresh.get() && n > 0 {
            launch(
                &self.compute,
                &self.k.to_bf16,
                (grid_1d(n), 1, 1),
                THREADS,
                0,
                &[
                    Arg::Ptr(ptr(&x.f, &self.compute)),
                    Arg::Ptr(ptr(&x.b, &self.compute)),
                    Arg::U64(n),
                ],
            )?;
            x.fresh.set(true);
        }
        Ok(ptr(&x.b, &self.compute))
    }

    /// Makes the compute stream wait for `layer` of every overlapped load still in flight
    /// into a slot the step uses (its blocks are the only ones its kernels touch; other loads
    /// go on behind the step).
    fn wait_loads(&self, layer: usize) -> Result<(), BackendError> {
        let Some(step) = &self.step else {
            return Ok(());
        };
        for t in &self.inflight {
            if t.layers.is_empty() || !t.slots.iter().any(|s| step.slots.contains(s)) {
                continue;
            }
            if let Some(e) = t.layers.get(layer) {
                self.compute
                    .wait(e)
                    .map_err(|e| device_error("waiting for a KV load", e))?;
            }
        }
        Ok(())
    }

    /// The rotation frequencies for `(base, head_dim)`, computed as the CPU backend does.
    fn inv_freq_ptr(&mut self, base: f32, head_dim: usize) -> Result<CUdeviceptr, BackendError> {
        let key = (base.to_bits(), head_dim);
        if self.inv_freq.as_ref().is_none_or(|(k, _)| *k != key) {
            let v: Vec<f32> = (0..head_dim / 2)
                .map(|i| base.powf(-((2 * i) as f32) / head_dim as f32))
                .collect();
            let mut buf = self.alloc::<f32>(v.len())?;
            self.compute
                .memcpy_htod(&v, &mut buf)
                .map_err(|e| device_error("uploading RoPE frequencies", e))?;
            self.inv_freq = Some((key, buf));
        }
        Ok(self
            .inv_freq
            .as_ref()
            .map_or(0, |(_, b)| ptr(b, &self.compute)))
    }

    /// Partial-result space for `floats` values (grown, never shrunk).
    fn partial_ptr(&mut self, floats: usize) -> Result<CUdeviceptr, BackendError> {
        if self.partial.as_ref().is_none_or(|p| p.len() < floats) {
            self.partial = Some(self.alloc::<f32>(floats.next_power_of_two())?);
        }
        Ok(self.partial.as_ref().map_or(0, |p| ptr(p, &self.compute)))
    }

    /// Queues the copies of transfer `t` on `stream`, from `src` to `dst` (device addresses of
    /// the two tiers' first slot), recording an event after each layer when `per_layer`.
    fn enqueue_copy(
        &self,
        stream: &Arc<CudaStream>,
        t: &Transfer,
        src: (CUdeviceptr, *const u8),
        dst: (CUdeviceptr, *mut u8),
        host_is_src: bool,
        per_layer: bool,
    ) -> Result<Vec<CudaEvent>, BackendError> {
        let geo = self.geometry()?;
        let block = geo.block_bytes() as u64;
        let layer_bytes = block / geo.layers as u64;
        let chunks: Vec<(u64, u64)> = if per_layer {
            (0..geo.layers as u64)
                .map(|l| (l * layer_bytes, layer_bytes))
                .collect()
        } else {
            vec![(0, block)]
        };
        let mut events = Vec::new();
        match self.opts.kv_copy {
            KvCopyMode::Kernel => {
                let pairs: Vec<u32> = t.copies.iter().flat_map(|&(s, d)| [s.0, d.0]).collect();
                let pairs_buf = self.upload_u32(stream, &pairs)?;
                let pairs_ptr = ptr(&pairs_buf, stream);
                let npairs = u32::try_from(t.copies.len())
                    .map_err(|_| BackendError::Shape("too many copies in one transfer".into()))?;
                for &(off, len) in &chunks {
                    let words = len / 16;
                    // A block per pair up to one per multiprocessor (they stride over the rest),
                    // and up to four per pair for big chunks: enough PCIe reads in flight
                    // without filling the device.
                    let per_pair = words.div_ceil(u64::from(THREADS) * 16).clamp(1, 4) as u32;
                    let blocks = npairs.min(self.info.multiprocessors.max(1) as u32).max(1);
                    // hp_kv_copy(const uint4* src, uint4* dst, const u32* pairs, u32 npairs,
                    //            u64 block_words, u64 offset, u64 chunk)
                    launch(
                        stream,
                        &self.k.kv_copy,
                        (blocks, per_pair, 1),
                        THREADS,
                        0,
                        &[
                            Arg::Ptr(src.0),
                            Arg::Ptr(dst.0),
                            Arg::Ptr(pairs_ptr),
                            Arg::U32(npairs),
                            Arg::U64(block / 16),
                            Arg::U64(off / 16),
                            Arg::U64(words),
                        ],
                    )?;
                    if per_layer {
                        events.push(record(stream)?);
                    }
                }
                // Freed in stream order, after the launches above.
                drop(pairs_buf);
            }
            KvCopyMode::Memcpy => {
                // Runs of consecutive slots on both sides move in one copy when whole blocks
                // move.
                let mut runs: Vec<(u32, u32, u32)> = Vec::new();
                for &(s, d) in &t.copies {
                    match runs.last_mut() {
                        Some((rs, rd, n)) if !per_layer && *rs + *n == s.0 && *rd + *n == d.0 => {
                            *n += 1
                        }
                        _ => runs.push((s.0, d.0, 1)),
                    }
                }
                for &(off, len) in &chunks {
                    for &(s, d, n) in &runs {
                        let bytes = (len * u64::from(n)) as usize;
                        let so = u64::from(s) * block + off;
                        let dof = u64::from(d) * block + off;
                        // SAFETY: slots come from the cache and lie inside the pools (checked
                        // against their sizes in submit_transfer); the pinned arena stays alive
                        // until every copy stream is synchronised (Drop, allocate_kv).
                        let r = unsafe {
                            if host_is_src {
                                cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                                    dst.0 + dof,
                                    src.1.add(so as usize) as *const std::ffi::c_void,
                                    bytes,
                                    stream.cu_stream(),
                                )
                            } else {
                                cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                                    dst.1.add(dof as usize) as *mut std::ffi::c_void,
                                    src.0 + so,
                                    bytes,
                                    stream.cu_stream(),
                                )
                            }
                        };
                        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                            return Err(device_error("KV copy", r));
                        }
                    }
                    if per_layer {
                        events.push(record(stream)?);
                    }
                }
            }
        }
        Ok(events)
    }
}

/// Compiles the kernels for the device and loads them: machine code for its exact
/// architecture first (no JIT, and it loads even when the toolkit is newer than the driver),
/// PTX for the driver to compile as the fall-back.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    info: &DeviceInfo,
) -> Result<Arc<cudarc::driver::CudaModule>, BackendError> {
    let (major, minor) = info.compute_capability;
    tracing::info!(
        nvrtc = ?device::nvrtc_version(),
        driver_cuda = ?device::driver_version(),
        "compiling the CUDA kernels"
    );
    let real = format!("sm_{major}{minor}");
    let cubin_error = match device::compile_cached(&real) {
        Ok(c) => match &c.cubin {
            Some(bin) => match ctx.load_module(Ptx::from_binary(bin.clone())) {
                Ok(m) => return Ok(m),
                Err(e) => format!("loading the {real} machine code: {e:?}"),
            },
            None => format!("NVRTC made no {real} machine code"),
        },
        Err(e) => e.to_string(),
    };
    tracing::warn!(reason = %cubin_error, "falling back to PTX for the CUDA kernels");
    let virt = format!("compute_{major}{minor}");
    let c = device::compile_cached(&virt)?;
    ctx.load_module(Ptx::from_src(c.ptx.clone()))
        .map_err(|e| device_error(&format!("loading the kernels (PTX for {virt})"), e))
}

/// Keeps freed stream-ordered allocations in the device's memory pool instead of returning them
/// to the driver at every synchronisation: activations are allocated and freed every step.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<(), BackendError> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver queries on the context's device; `threshold` outlives the call.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS
        {
            // No memory pools (very old drivers): allocations are then synchronous; fine.
            return Ok(());
        }
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(device_error("configuring the memory pool", r));
        }
        // Memory freed on a copy stream must not be handed to the compute stream with a
        // dependency the driver inserts on its own: that would make the next step wait for a
        // whole load and undo the layer-wise overlap.
        let mut no: i32 = 0;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
            &mut no as *mut i32 as *mut std::ffi::c_void,
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(device_error("configuring the memory pool", r));
        }
    }
    Ok(())
}

fn record(stream: &Arc<CudaStream>) -> Result<CudaEvent, BackendError> {
    stream
        .record_event(None)
        .map_err(|e| device_error("recording an event", e))
}

/// A buffer's device address (no event tracking: see `CudaBackend::new`).
fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> CUdeviceptr {
    let (p, _sync) = s.device_ptr(stream);
    p
}

fn ptr_mut<T>(s: &mut CudaSlice<T>, stream: &CudaStream) -> CUdeviceptr {
    let (p, _sync) = cudarc::driver::DevicePtrMut::device_ptr_mut(s, stream);
    p
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // The pinned arena and the pools must outlive every copy that uses them.
        let _ = self.synchronize();
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type Vector = CudaVector;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn kv_value_bytes(&self) -> usize {
        2
    }

    fn upload_matrix(&mut self, m: Matrix) -> Result<CudaMatrix, BackendError> {
        let bits = to_bf16_bits(m.data());
        let mut w = self.alloc::<u16>(bits.len())?;
        self.compute
            .memcpy_htod(&bits, &mut w)
            .map_err(|e| device_error("uploading weights", e))?;
        Ok(CudaMatrix {
            rows: m.rows(),
            cols: m.cols(),
            w,
        })
    }

    fn upload_vector(&mut self, v: Vec<f32>) -> Result<CudaVector, BackendError> {
        let mut d = self.alloc::<f32>(v.len())?;
        self.compute
            .memcpy_htod(&v, &mut d)
            .map_err(|e| device_error("uploading weights", e))?;
        Ok(CudaVector { len: v.len(), v: d })
    }

    fn tensor(&mut self, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| BackendError::Alloc(format!("{rows} x {cols} tensor")))?;
        let mut f = self.alloc::<f32>(n)?;
        self.compute
            .memset_zeros(&mut f)
            .map_err(|e| device_error("clearing a tensor", e))?;
        let b = self.alloc::<u16>(n)?;
        Ok(CudaTensor {
            rows,
            cols,
            f,
            b,
            fresh: Cell::new(false),
        })
    }

    fn embed(
        &mut self,
        table: &CudaMatrix,
        tokens: &[u32],
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        shape(
            "embed output",
            out.rows == tokens.len() && out.cols == table.cols,
        )?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(BackendError::Shape(format!(
                "token {t} outside the vocabulary of {}",
                table.rows
            )));
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let tok = self.upload_u32(&self.compute, tokens)?;
        // hp_embed(const bf16_t* table, const u32* tokens, float* out, int cols)
        launch(
            &self.compute,
            &self.k.embed,
            (tokens.len() as u32, 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr(&table.w, &self.compute)),
                Arg::Ptr(ptr(&tok, &self.compute)),
                Arg::Ptr(ptr_mut(&mut out.f, &self.compute)),
                Arg::I32(i32_of(table.cols, "columns")?),
            ],
        )?;
        out.fresh.set(false);
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        shape(
            "rms_norm",
            x.cols == w.len && out.cols == x.cols && out.rows == x.rows,
        )?;
        if x.rows == 0 {
            return Ok(());
        }
        // hp_rms_norm(const float* x, const float* w, float* out, bf16_t* out_bf, int cols,
        //             float eps)
        launch(
            &self.compute,
            &self.k.rms_norm,
            (x.rows as u32, 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr(&x.f, &self.compute)),
                Arg::Ptr(ptr(&w.v, &self.compute)),
                Arg::Ptr(ptr_mut(&mut out.f, &self.compute)),
                Arg::Ptr(ptr_mut(&mut out.b, &self.compute)),
                Arg::I32(i32_of(x.cols, "columns")?),
                Arg::F32(eps),
            ],
        )?;
        out.fresh.set(true);
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &CudaTensor,
        w: &CudaMatrix,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        shape(
            "matmul",
            x.cols == w.cols && out.rows == x.rows && out.cols == w.rows,
        )?;
        if x.rows == 0 {
            return Ok(());
        }
        // cuBLAS runs in the thread's current context; the engine thread is not the one that
        // created the backend.
        self.ctx
            .bind_to_thread()
            .map_err(|e| device_error("binding the CUDA context", e))?;
        let xb = self.bf16_ptr(x)?;
        let (m, n, k) = (
            i32_of(w.rows, "rows")?,
            i32_of(x.rows, "rows")?,
            i32_of(w.cols, "columns")?,
        );
        let (alpha, beta) = (1.0f32, 0.0f32);
        let wp = ptr(&w.w, &self.compute);
        let op = ptr_mut(&mut out.f, &self.compute);
        // Row-major out[n x m] = x[n x k] * w[m x k]^T is, column-major, out^T = w^T^T * x^T:
        // cuBLAS computes C (m x n) = op(A) B with A = w (k x m column-major, transposed) and
        // B = x (k x n column-major).
        // SAFETY: the handle runs on the compute stream; the pointers address live buffers of
        // exactly the sizes the dimensions describe (checked above); alpha and beta are host
        // values read during the call.
        unsafe {
            blas::gemm_ex(
                self.blas.0,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const std::ffi::c_void,
                wp as *const std::ffi::c_void,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                k,
                xb as *const std::ffi::c_void,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                k,
                &beta as *const f32 as *const std::ffi::c_void,
                op as *mut std::ffi::c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| device_error("cuBLAS GEMM", e))?;
        out.fresh.set(false);
        Ok(())
    }

    fn add_bias(&mut self, x: &mut CudaTensor, b: &CudaVector) -> Result<(), BackendError> {
        shape("bias", x.cols == b.len)?;
        let n = (x.rows * x.cols) as u64;
        if n == 0 {
            return Ok(());
        }
        // hp_add_bias(float* x, const float* b, u64 n, int cols)
        launch(
            &self.compute,
            &self.k.add_bias,
            (grid_1d(n), 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr_mut(&mut x.f, &self.compute)),
                Arg::Ptr(ptr(&b.v, &self.compute)),
                Arg::U64(n),
                Arg::I32(i32_of(x.cols, "columns")?),
            ],
        )?;
        x.fresh.set(false);
        Ok(())
    }

    fn rope(
        &mut self,
        x: &mut CudaTensor,
        batch: &StepBatch,
        head_dim: usize,
        base: f32,
        style: RopeStyle,
    ) -> Result<(), BackendError> {
        shape(
            "rope",
            batch.rows() == x.rows
                && head_dim.is_multiple_of(2)
                && head_dim > 0
                && x.cols.is_multiple_of(head_dim),
        )?;
        if x.rows == 0 {
            return Ok(());
        }
        self.ensure_step(batch)?;
        let freq = self.inv_freq_ptr(base, head_dim)?;
        let pos = self.step_ptr(0)?;
        let pairs = (x.rows * x.cols / 2) as u64;
        // hp_rope(float* x, const u32* pos, const float* inv_freq, int rows, int cols,
        //         int head_dim, int half_split)
        launch(
            &self.compute,
            &self.k.rope,
            (grid_1d(pairs), 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr_mut(&mut x.f, &self.compute)),
                Arg::Ptr(pos),
                Arg::Ptr(freq),
                Arg::I32(i32_of(x.rows, "rows")?),
                Arg::I32(i32_of(x.cols, "columns")?),
                Arg::I32(i32_of(head_dim, "head dim")?),
                Arg::I32(i32::from(style == RopeStyle::HalfSplit)),
            ],
        )?;
        x.fresh.set(false);
        Ok(())
    }

    fn silu_mul(&mut self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<(), BackendError> {
        shape("silu_mul", gate.rows == up.rows && gate.cols == up.cols)?;
        let n = (gate.rows * gate.cols) as u64;
        if n == 0 {
            return Ok(());
        }
        // hp_silu_mul(float* gate, const float* up, bf16_t* gate_bf, u64 n)
        launch(
            &self.compute,
            &self.k.silu_mul,
            (grid_1d(n), 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr_mut(&mut gate.f, &self.compute)),
                Arg::Ptr(ptr(&up.f, &self.compute)),
                Arg::Ptr(ptr_mut(&mut gate.b, &self.compute)),
                Arg::U64(n),
            ],
        )?;
        gate.fresh.set(true);
        Ok(())
    }

    fn add(&mut self, x: &mut CudaTensor, y: &CudaTensor) -> Result<(), BackendError> {
        shape("add", x.rows == y.rows && x.cols == y.cols)?;
        let n = (x.rows * x.cols) as u64;
        if n == 0 {
            return Ok(());
        }
        // hp_add(float* x, const float* y, u64 n)
        launch(
            &self.compute,
            &self.k.add,
            (grid_1d(n), 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr_mut(&mut x.f, &self.compute)),
                Arg::Ptr(ptr(&y.f, &self.compute)),
                Arg::U64(n),
            ],
        )?;
        x.fresh.set(false);
        Ok(())
    }

    fn write_kv(
        &mut self,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        batch: &StepBatch,
    ) -> Result<(), BackendError> {
        let geo = self.geometry()?;
        shape(
            "write_kv",
            k.cols == geo.kv_dim
                && v.cols == geo.kv_dim
                && k.rows == batch.rows()
                && v.rows == k.rows
                && layer < geo.layers
                && batch.block_size == geo.block_size,
        )?;
        if k.rows == 0 {
            return Ok(());
        }
        self.ensure_step(batch)?;
        self.wait_loads(layer)?;
        let n = (k.rows * geo.kv_dim) as u64;
        let (slots, offs) = (self.step_ptr(1)?, self.step_ptr(2)?);
        let pool = self
            .pool
            .as_mut()
            .map(|p| ptr_mut(p, &self.compute))
            .unwrap_or(0);
        // hp_write_kv(const float* k, const float* v, bf16_t* pool, const u32* row_slot,
        //             const u32* row_off, int rows, int kv_dim, int layer, int layers,
        //             int block_size)
        launch(
            &self.compute,
            &self.k.write_kv,
            (grid_1d(n), 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr(&k.f, &self.compute)),
                Arg::Ptr(ptr(&v.f, &self.compute)),
                Arg::Ptr(pool),
                Arg::Ptr(slots),
                Arg::Ptr(offs),
                Arg::I32(i32_of(k.rows, "rows")?),
                Arg::I32(i32_of(geo.kv_dim, "kv dim")?),
                Arg::I32(i32_of(layer, "layer")?),
                Arg::I32(i32_of(geo.layers, "layers")?),
                Arg::I32(i32_of(geo.block_size, "block size")?),
            ],
        )
    }

    fn attention(
        &mut self,
        layer: usize,
        q: &CudaTensor,
        batch: &StepBatch,
        out: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let geo = self.geometry()?;
        let s = geo.shape;
        let qd = s.heads * s.head_dim;
        shape(
            "attention",
            q.cols == qd
                && out.cols == qd
                && q.rows == batch.rows()
                && out.rows == q.rows
                && layer < geo.layers
                && batch.block_size == geo.block_size,
        )?;
        if q.rows == 0 {
            return Ok(());
        }
        self.ensure_step(batch)?;
        self.wait_loads(layer)?;
        let (tables, items) = (self.step_ptr(3)?, self.step_ptr(4)?);
        let (a, rows) = match &self.step {
            Some(u) => (u.attention.clone(), u.rows),
            None => return Err(BackendError::Shape("no step uploaded".into())),
        };
        let qvecs = rows * s.heads;
        let (part_o, part_ml) = if a.splits > 1 {
            let o = a.splits * qvecs * s.head_dim;
            let base = self.partial_ptr(o + 2 * a.splits * qvecs)?;
            (base, base + (o * 4) as u64)
        } else {
            (0, 0)
        };
        let (f, threads, smem) = match a.kernel {
            AttentionKernel::Mma => (
                &self.k.attention_mma,
                MMA_THREADS as u32,
                mma_smem_bytes(s.head_dim),
            ),
            AttentionKernel::Simple => {
                let warps = a.tokens_per_item * s.group();
                (
                    &self.k.attention_simple,
                    (32 * warps) as u32,
                    simple_smem_bytes(s.head_dim, warps),
                )
            }
        };
        let pool = self
            .pool
            .as_ref()
            .map(|p| ptr(p, &self.compute))
            .unwrap_or(0);
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let qp = ptr(&q.f, &self.compute);
        let (of, ob) = (
            ptr_mut(&mut out.f, &self.compute),
            ptr_mut(&mut out.b, &self.compute),
        );
        // hp_attention_{simple,mma}(const float* q, const bf16_t* pool, const u32* tables,
        //     const u32* items, float* out, bf16_t* out_bf, float* part_o, float* part_ml,
        //     int rows, int layer, int layers, int block_size, int heads, int kv_heads,
        //     int head_dim, int split_len, float scale)
        launch(
            &self.compute,
            f,
            (a.item_count() as u32, s.kv_heads as u32, a.splits as u32),
            threads,
            smem as u32,
            &[
                Arg::Ptr(qp),
                Arg::Ptr(pool),
                Arg::Ptr(tables),
                Arg::Ptr(items),
                Arg::Ptr(of),
                Arg::Ptr(ob),
                Arg::Ptr(part_o),
                Arg::Ptr(part_ml),
                Arg::I32(i32_of(rows, "rows")?),
                Arg::I32(i32_of(layer, "layer")?),
                Arg::I32(i32_of(geo.layers, "layers")?),
                Arg::I32(i32_of(geo.block_size, "block size")?),
                Arg::I32(i32_of(s.heads, "heads")?),
                Arg::I32(i32_of(s.kv_heads, "KV heads")?),
                Arg::I32(i32_of(s.head_dim, "head dim")?),
                Arg::I32(i32_of(a.split_len, "split length")?),
                Arg::F32(scale),
            ],
        )?;
        if a.splits > 1 {
            let threads = s.head_dim.next_multiple_of(32).min(128) as u32;
            // hp_attention_combine(const float* part_o, const float* part_ml, float* out,
            //     bf16_t* out_bf, int rows, int heads, int head_dim, int splits)
            launch(
                &self.compute,
                &self.k.attention_combine,
                (qvecs as u32, 1, 1),
                threads,
                0,
                &[
                    Arg::Ptr(part_o),
                    Arg::Ptr(part_ml),
                    Arg::Ptr(of),
                    Arg::Ptr(ob),
                    Arg::I32(i32_of(rows, "rows")?),
                    Arg::I32(i32_of(s.heads, "heads")?),
                    Arg::I32(i32_of(s.head_dim, "head dim")?),
                    Arg::I32(i32_of(a.splits, "splits")?),
                ],
            )?;
        }
        out.fresh.set(true);
        Ok(())
    }

    fn select_rows(&mut self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor, BackendError> {
        shape("select_rows", rows.iter().all(|&r| r < x.rows))?;
        let mut out = self.tensor(rows.len(), x.cols)?;
        if rows.is_empty() {
            return Ok(out);
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = self.upload_u32(&self.compute, &idx)?;
        // hp_gather_rows(const float* x, const u32* rows, float* out, int cols)
        launch(
            &self.compute,
            &self.k.gather_rows,
            (rows.len() as u32, 1, 1),
            THREADS,
            0,
            &[
                Arg::Ptr(ptr(&x.f, &self.compute)),
                Arg::Ptr(ptr(&idx, &self.compute)),
                Arg::Ptr(ptr_mut(&mut out.f, &self.compute)),
                Arg::I32(i32_of(x.cols, "columns")?),
            ],
        )?;
        Ok(out)
    }

    fn to_host(&mut self, x: &CudaTensor) -> Result<Vec<f32>, BackendError> {
        let n = x.rows * x.cols;
        let mut v = vec![0f32; n];
        if n > 0 {
            self.compute
                .memcpy_dtoh(&x.f.slice(..n), &mut v)
                .map_err(|e| device_error("reading results", e))?;
        }
        self.compute
            .synchronize()
            .map_err(|e| device_error("synchronizing", e))?;
        Ok(v)
    }

    fn argmax_rows(&mut self, x: &CudaTensor, cols: usize) -> Result<Vec<u32>, BackendError> {
        // Computed on the device: one word per row crosses to the host instead of a row of
        // logits (half a megabyte for a 128k vocabulary).
        shape("argmax_rows", cols == x.cols)?;
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        let mut out = self.alloc::<u32>(x.rows)?;
        launch(
            &self.compute,
            &self.k.argmax,
            (x.rows as u32, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(ptr(&x.f, &self.compute)),
                Arg::Ptr(ptr_mut(&mut out, &self.compute)),
                Arg::I32(i32_of(x.cols, "columns")?),
            ],
        )?;
        let mut v = vec![0u32; x.rows];
        self.compute
            .memcpy_dtoh(&out, &mut v)
            .map_err(|e| device_error("reading argmax", e))?;
        self.compute
            .synchronize()
            .map_err(|e| device_error("synchronizing", e))?;
        Ok(v)
    }

    fn allocate_kv(&mut self, cfg: &LlamaConfig, layout: KvLayout) -> Result<(), BackendError> {
        // Copies into the old pools must finish before they go.
        self.synchronize()?;
        self.inflight.clear();
        self.finished.clear();
        self.pool = None;
        self.host = None;
        self.step = None;
        let shape_ = AttentionShape {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        };
        if !shape_.simple_supported() {
            return Err(BackendError::Unavailable(format!(
                "the CUDA attention kernels take head dims that are multiples of 4 up to 256 \
                 and at most 16 query heads per KV head; this model has head dim {} and {} / {} \
                 heads",
                cfg.head_dim, cfg.heads, cfg.kv_heads
            )));
        }
        if !(layout.block_size * cfg.kv_dim()).is_multiple_of(4) {
            return Err(BackendError::Unavailable(format!(
                "block size {} x KV width {} must be a multiple of 4 (16-byte copies)",
                layout.block_size,
                cfg.kv_dim()
            )));
        }
        let geo = KvGeometry {
            block_size: layout.block_size,
            layers: cfg.layers,
            kv_dim: cfg.kv_dim(),
            shape: shape_,
            device_blocks: layout.device_blocks,
            host_blocks: layout.host_blocks,
        };
        let elems = geo
            .block_elems()
            .checked_mul(layout.device_blocks)
            .ok_or_else(|| BackendError::Alloc("device KV pool size overflows".into()))?;
        let mut pool = self.alloc::<u16>(elems).map_err(|e| {
            BackendError::Alloc(format!(
                "device KV pool of {} blocks ({} MiB): {e}",
                layout.device_blocks,
                elems * 2 / (1 << 20)
            ))
        })?;
        self.compute
            .memset_zeros(&mut pool)
            .map_err(|e| device_error("clearing the KV pool", e))?;
        self.pool = Some(pool);
        if layout.host_blocks > 0 {
            let bytes = geo
                .block_bytes()
                .checked_mul(layout.host_blocks)
                .ok_or_else(|| BackendError::Alloc("host KV arena size overflows".into()))?;
            self.host = Some(PinnedArena::new(&self.ctx, bytes)?);
        }
        // The CUDA-core kernel needs more than the default 48 KiB of shared memory for head
        // dims above 128.
        let simple_max = simple_smem_bytes(cfg.head_dim, hotprefix_kernels::SIMPLE_MAX_WARPS);
        if simple_max > 48 * 1024 {
            if simple_max > self.info.max_shared_per_block {
                return Err(BackendError::Unavailable(format!(
                    "head dim {} needs {simple_max} bytes of shared memory; the device allows {}",
                    cfg.head_dim, self.info.max_shared_per_block
                )));
            }
            self.k
                .attention_simple
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    simple_max as i32,
                )
                .map_err(|e| device_error("shared memory attribute", e))?;
        }
        self.geo = Some(geo);
        self.synchronize()
    }

    fn submit_transfer(&mut self, t: Transfer) -> Result<(), BackendError> {
        let geo = self.geometry()?;
        let (Some(pool), Some(host)) = (&self.pool, &self.host) else {
            return Err(BackendError::Shape(
                "a tier transfer with no host tier allocated".into(),
            ));
        };
        let (dev_max, host_max) = (geo.device_blocks as u32, geo.host_blocks as u32);
        let in_range = t.copies.iter().all(|&(s, d)| match t.kind {
            TransferKind::Load => s.0 < host_max && d.0 < dev_max,
            TransferKind::Store => s.0 < dev_max && d.0 < host_max,
        });
        shape("transfer slots outside the pools", in_range)?;
        let pool_dev = ptr(pool, &self.compute);
        let host_dev = host.device_ptr();
        let host_ptr = host.host_ptr() as *mut u8;
        // Whatever the compute stream has queued so far runs first.
        let after_compute = record(&self.compute)?;
        let queued = match t.kind {
            TransferKind::Load => self
                .h2d
                .wait(&after_compute)
                .map_err(|e| device_error("ordering a load", e))
                .and_then(|()| {
                    let layers = self.enqueue_copy(
                        &self.h2d,
                        &t,
                        (host_dev, host_ptr as *const u8),
                        (pool_dev, std::ptr::null_mut()),
                        true,
                        self.opts.layer_overlap,
                    )?;
                    Ok((record(&self.h2d)?, layers))
                }),
            TransferKind::Store => self
                .d2h
                .wait(&after_compute)
                .map_err(|e| device_error("ordering a store", e))
                .and_then(|()| {
                    let after_loads = record(&self.h2d)?;
                    self.d2h
                        .wait(&after_loads)
                        .map_err(|e| device_error("ordering a store", e))?;
                    self.enqueue_copy(
                        &self.d2h,
                        &t,
                        (pool_dev, std::ptr::null()),
                        (host_dev, host_ptr),
                        false,
                        false,
                    )?;
                    let done = record(&self.d2h)?;
                    if t.cause == TransferCause::Eviction {
                        // The cache has freed the source slots: nothing computed later may
                        // write them before they are copied.
                        self.compute
                            .wait(&done)
                            .map_err(|e| device_error("ordering an eviction", e))?;
                    }
                    Ok((done, Vec::new()))
                }),
        };
        let (done, layers) = match queued {
            Ok(q) => q,
            Err(e) => {
                // Part of the copy may be queued: let it finish before the cache hands the
                // slots of the failed transfer to anyone else.
                let _ = self.h2d.synchronize();
                let _ = self.d2h.synchronize();
                return Err(e);
            }
        };
        let slots = match t.kind {
            TransferKind::Load => t.copies.iter().map(|&(_, d)| d.0).collect(),
            TransferKind::Store => Vec::new(),
        };
        let early = t.kind == TransferKind::Load && self.opts.layer_overlap;
        if early {
            self.finished.push(t.id);
        }
        self.inflight.push(InFlight {
            id: t.id,
            done,
            layers,
            slots,
            reported: early,
        });
        Ok(())
    }

    fn poll_transfers(&mut self, wait: Duration) -> Vec<TransferId> {
        let deadline = Instant::now() + wait;
        if let Err(e) = self.ctx.bind_to_thread() {
            tracing::error!(error = ?e, "cannot bind the CUDA context");
        }
        let mut out = std::mem::take(&mut self.finished);
        loop {
            let mut i = 0;
            while i < self.inflight.len() {
                let t = &self.inflight[i];
                let complete = match t.done.try_is_complete() {
                    Ok(c) => c,
                    Err(e) => {
                        // A failed copy is a device fault; report it finished so no request
                        // waits forever, and say so.
                        tracing::error!(transfer = t.id.0, error = ?e, "KV transfer failed on the device");
                        true
                    }
                };
                if complete {
                    let t = self.inflight.swap_remove(i);
                    if !t.reported {
                        out.push(t.id);
                    }
                } else {
                    i += 1;
                }
            }
            let waiting = self.inflight.iter().any(|t| !t.reported);
            if !out.is_empty() || !waiting || Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn transfers_in_flight(&self) -> usize {
        self.inflight.iter().filter(|t| !t.reported).count() + self.finished.len()
    }
}
